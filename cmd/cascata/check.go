package main

import (
	"errors"
	"flag"
	"fmt"
	"io"

	"cascata/internal/config"
)

// cmdCheck validates a config file and prints every problem with its key path.
func cmdCheck(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "cascata.toml", "config file")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	cfg, err := config.Load(*path)
	if err != nil {
		var ps config.Problems
		if errors.As(err, &ps) {
			for _, p := range ps {
				fmt.Fprintf(stdout, "%s: %s\n", *path, p)
			}
			fmt.Fprintf(stdout, "%d problem(s)\n", len(ps))
			return 1
		}
		fmt.Fprintf(stderr, "cascata check: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "%s: ok (%d projects)\n", *path, len(cfg.Projects))
	return 0
}
