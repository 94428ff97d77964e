// Command cascata is a PostgreSQL wire-protocol proxy for a multi-tenant
// backend-as-a-service: JWT logins, bounded shared pools, SQL-aware routing.
package main

import (
	"fmt"
	"io"
	"os"
)

const usage = `usage: cascata <command> [flags]

commands:
  serve    -config cascata.toml              run the proxy and the admin plane (default)
  demo                                       local primary + replica, a demo project, the proxy
  token    -config F -project REF -role R    mint a JWT for a project (development, tests)
  check    -config F                         validate a config; prints every problem
  eject    -project REF -target-url URL ...  move a project to its own PostgreSQL (admin client)
  pause    -project REF / resume -project REF  PgBouncer PAUSE/RESUME for one project (admin client)
  jobs     [-wait] [ID]                      list jobs or show one (admin client)
  archive  export|import|verify ...          .caf archives offline (cascata archive help)
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	cmd := "serve"
	if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		cmd, args = args[0], args[1:]
	}
	var err error
	switch cmd {
	case "serve":
		err = cmdServe(args, stderr)
	case "demo":
		err = cmdDemo(args, stdout, stderr)
	case "token":
		err = cmdToken(args, stdout, stderr)
	case "check":
		return cmdCheck(args, stdout, stderr)
	case "eject":
		err = cmdEject(args, stdout, stderr)
	case "pause":
		err = cmdPause(args, stdout, stderr)
	case "resume":
		err = cmdResume(args, stdout, stderr)
	case "jobs":
		err = cmdJobs(args, stdout, stderr)
	case "archive":
		err = cmdArchive(args, stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "cascata: unknown command %q\n\n%s", cmd, usage)
		return 2
	}
	if err != nil {
		fmt.Fprintf(stderr, "cascata %s: %v\n", cmd, err)
		return 1
	}
	return 0
}
