// Command benchtool is the Go side of `make bench` (bench/run.sh): it holds
// a throw-away PostgreSQL primary + streaming replica, mints tokens, and
// drives load that pgbench cannot (many distinct JWTs, thousands of idle
// clients holding prepared statements).
//
//	benchtool cluster -dir D -db NAME -password PW -env FILE
//	benchtool ports N
//	benchtool rsakey -jwks FILE -project REF -role ROLE
//	benchtool idle  -addr H:P -db DB -user U -password PW -n 5000 -stmts 10 -pid PID
//	benchtool load  -addr H:P -db REF -role R -secret-env VAR -n 1000 -dur 15s [-distinct] -pid PID
//	benchtool newcomers -addr H:P -prefix p -n 100 -secret-env VAR [-direct URL] [-only proxy|direct]
//	benchtool relay -listen H:P -target H:P [-dur 1h]
//	benchtool pool-goroutine -listen H:P -target H:P -db DB -user U -password-env VAR -role R -pool 20 [-dur 1h] [-cpuprofile F]
//	benchtool pool-eventloop (the same flags) [-tls-cert F -tls-key F] [-server-sslmode require]
//	benchtool pool-coro (the same flags as pool-eventloop)
//	benchtool tlscert -cert F -key F
//	benchtool setup-cost -url URL [-n 32] [-dur 6s] [-rounds 3] [-modes ...] [-postmaster PID]
//
// Results are printed as key=value lines for the script to pick up.
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: benchtool cluster|ports|rsakey|idle|load|newcomers|relay|pool-goroutine|pool-eventloop|pool-coro|setup-cost|tlscert [flags]")
		os.Exit(2)
	}
	var err error
	args := os.Args[2:]
	switch os.Args[1] {
	case "cluster":
		err = cmdCluster(args)
	case "ports":
		err = cmdPorts(args)
	case "rsakey":
		err = cmdRSAKey(args)
	case "idle":
		err = cmdIdle(args)
	case "load":
		err = cmdLoad(args)
	case "newcomers":
		err = cmdNewcomers(args)
	case "relay":
		err = cmdRelay(args)
	case "pool-goroutine":
		err = cmdPoolGoroutine(args)
	case "pool-eventloop":
		err = cmdPoolEventLoop(args)
	case "pool-coro":
		err = cmdPoolCoro(args)
	case "setup-cost":
		err = cmdSetupCost(args)
	case "tlscert":
		err = cmdTLSCert(args)
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "benchtool %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}
