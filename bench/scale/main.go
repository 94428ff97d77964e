// Command scale is `make bench-scale`: one `cascata serve` process with
// 1,000 projects in its catalog and 1k to 10k client connections spread over
// them, on loopback, in one bounded run (about 5 minutes).
//
// It starts a throw-away PostgreSQL (internal/pgcluster, no replica), writes
// a cascata.toml with one [[projects]] table per project (each its own JWT
// secret and its own pool; their database_url point at a few shared
// databases), starts cascata from a shell with `ulimit -n 65536`, and at
// each client count measures cascata's RSS, goroutines, open fds, the
// backends in pg_stat_activity (asserted never above the host cap), the
// latency of clients that query once a second, and the connect + first-query
// latency of projects that had no client and no pool while other projects'
// busy clients hold the host cap. It replaces the section "Scale: 1,000
// projects" of bench/RESULTS.md and writes bench/scale-plot.svg.
//
//	scale -cascata bin/cascata [-steps 1000,2500,5000,10000] [-keep]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// options are the knobs of one run; the defaults are what `make bench-scale` measures.
type options struct {
	cascataBin    string
	steps         []int
	projects      int
	probeProjects int
	databases     int
	poolSize      int
	hostCap       int
	idleTimeout   time.Duration
	lightEvery    int
	lightDur      time.Duration
	busyProjects  int
	busyPer       int
	busyQuery     string
	calmQuery     string
	probes        int
	probeTime     time.Duration
	workers       int
	budget        time.Duration
	results       string
	svg           string
	keep          bool
	command       string
	viaMake       bool
	heapProfiles  bool
}

func parseOptions(args []string) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("scale", flag.ContinueOnError)
	fs.StringVar(&o.cascataBin, "cascata", "bin/cascata", "cascata binary")
	steps := fs.String("steps", "1000,2500,5000,10000", "client counts, ascending")
	fs.IntVar(&o.projects, "projects", 1000, "projects that carry the clients")
	fs.IntVar(&o.probeProjects, "probe-projects", 250, "further projects kept without clients for the newly-active probes")
	fs.IntVar(&o.databases, "databases", 4, "databases the projects' database_url point at")
	fs.IntVar(&o.poolSize, "pool-size", 2, "pool_size of every project")
	fs.IntVar(&o.hostCap, "cap", 90, "max_server_conn_per_host")
	fs.DurationVar(&o.idleTimeout, "idle-timeout", 3*time.Second, "server_idle_timeout")
	fs.IntVar(&o.lightEvery, "light-every", 50, "light activity: every Nth client runs SELECT 1 once a second")
	fs.DurationVar(&o.lightDur, "light-dur", 8*time.Second, "length of the light-activity phase")
	fs.IntVar(&o.busyProjects, "busy-projects", 45, "projects whose busy clients hold the host cap during the probes")
	fs.IntVar(&o.busyPer, "busy-per-project", 2, "busy clients per busy project")
	fs.StringVar(&o.busyQuery, "busy-query", "SELECT pg_sleep(0.02)", "what busy clients run back to back")
	fs.StringVar(&o.calmQuery, "calm-query", "SELECT pg_sleep(0.2)", "what busy clients run back to back in a second, calmer round of probes (empty: none)")
	fs.IntVar(&o.probes, "probes", 250, "newly-active projects probed at each step (at most -probe-projects)")
	fs.DurationVar(&o.probeTime, "probe-time", 30*time.Second, "the probes of one step stop after this")
	fs.IntVar(&o.workers, "workers", 32, "parallel client connects")
	fs.DurationVar(&o.budget, "budget", 12*time.Minute, "the whole run stops after this")
	fs.StringVar(&o.results, "results", "bench/RESULTS.md", "results file whose section \"Scale: 1,000 projects\" is replaced (or appended)")
	fs.StringVar(&o.svg, "svg", "bench/scale-plot.svg", "plot written by the run")
	fs.BoolVar(&o.keep, "keep", false, "keep the scratch directory")
	fs.BoolVar(&o.heapProfiles, "heap-profiles", false, "save cascata's heap profile (/debug/pprof/heap) at each idle reading, as heap-<clients>.pb.gz in the scratch directory (with -keep)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	for _, s := range strings.Split(*steps, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("-steps: %w", err)
		}
		if n <= 0 {
			return nil, fmt.Errorf("-steps: %d is not a positive count", n)
		}
		if len(o.steps) > 0 && n <= o.steps[len(o.steps)-1] {
			return nil, errors.New("-steps must ascend")
		}
		o.steps = append(o.steps, n)
	}
	switch {
	case o.projects <= 0 || o.databases <= 0 || o.poolSize <= 0 || o.hostCap <= 0 || o.workers <= 0:
		return nil, errors.New("-projects, -databases, -pool-size, -cap and -workers must be positive")
	case o.probes <= 0 || o.probes > o.probeProjects:
		return nil, errors.New("-probes must be between 1 and -probe-projects")
	case o.busyProjects > o.projects || o.busyProjects*o.poolSize < o.hostCap:
		return nil, fmt.Errorf("-busy-projects × -pool-size must reach -cap (%d) for the cap to be held, with at most -projects busy projects", o.hostCap)
	case o.busyPer < o.poolSize:
		return nil, errors.New("-busy-per-project must be at least -pool-size")
	case o.lightEvery <= 0:
		return nil, errors.New("-light-every must be positive")
	}
	o.command = strings.TrimSpace("bin/cascata-scale " + strings.Join(args, " "))
	o.viaMake = strings.Join(args, " ") == "-cascata bin/cascata" // the Makefile's own call
	return o, nil
}

// busyQueries are the busy clients' queries, one probe phase each: the
// heavy load first (it gives the verdicts), then the calm one.
func (o *options) busyQueries() []string {
	if o.calmQuery == "" {
		return []string{o.busyQuery}
	}
	return []string{o.busyQuery, o.calmQuery}
}

// perProject is how many clients a project with clients has: the largest
// count spread over all projects. Lower counts have fewer projects active.
func (o *options) perProject() int {
	n := o.steps[len(o.steps)-1]
	return max(1, (n+o.projects-1)/o.projects)
}

func main() {
	o, err := parseOptions(os.Args[1:])
	code := 2 // a usage error
	if err == nil {
		code, err = 1, runWithin(o)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "scale: %v\n", err)
		os.Exit(code)
	}
}

// runWithin runs the bench until it ends, o.budget passes or a signal comes.
func runWithin(o *options) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, o.budget)
	defer cancel()
	return run(ctx, o)
}

// say prints progress to stderr.
func say(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "scale %s: %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}
