// Command compat-suites runs the drivers' own test suites (pgx and lib/pq,
// fetched from the Go module proxy at pinned versions) directly against
// PostgreSQL and through cascata in session and transaction mode, and
// writes a table of pass/fail/skip per suite and mode with every failing
// test listed under a documented reason (reasons.txt) or as an
// undocumented defect.
//
// `make compat-suites` runs it through run.sh, which builds bin/cascata
// first and puts an outer timeout around everything. Each suite gets a
// throw-away cluster (internal/pgcluster) prepared the way the suite's own
// CI prepares its database (roles, extensions, pg_hba.conf, server TLS),
// plus a cascata project whose roles are the suite's roles and whose
// passwords are minted JWTs. See README.md in this directory.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Modes, in the order they run and appear in the table.
const (
	modeDirect      = "direct"
	modeSession     = "session"
	modeTransaction = "transaction"
)

var allModes = []string{modeDirect, modeSession, modeTransaction}

type options struct {
	bin          string // the cascata binary
	reasonsPath  string // documented reasons
	out          string // RESULTS.md to write; "" prints the report only
	suites       *regexp.Regexp
	modes        []string
	run          string        // go test -run
	skip         string        // go test -skip
	pkgs         string        // packages of each suite, default ./...
	testTimeout  time.Duration // go test -timeout (per package binary)
	runTimeout   time.Duration // outer limit of one suite in one mode
	budget       time.Duration // all runs together; runs past it are reported as not run
	strict       bool          // exit 1 on undocumented failures
	keep         bool          // keep the work directory
	workDir      string        // "" = a new temp dir
	srcDir       string        // where the suites' modules are copied
	logProxy     bool          // CASCATA_LOG_LEVEL=debug for the proxy
	serial       bool          // run the modes one after another
	fromLogs     string        // report from the logs of an earlier run's work dir
	hold         string        // prepare, start the proxy in this mode, print the environment, wait
	defaultTable bool          // the run covers every suite, mode and test (may write out)
}

func main() {
	o, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "compat-suites:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	code, err := run(ctx, o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "compat-suites:", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

func parseFlags(args []string) (*options, error) {
	fs := flag.NewFlagSet("compat-suites", flag.ContinueOnError)
	o := &options{}
	var suites, modes string
	fs.StringVar(&o.bin, "bin", envOr("CASCATA_BIN", "bin/cascata"), "cascata binary")
	fs.StringVar(&o.reasonsPath, "reasons", "scripts/compat-suites/reasons.txt", "documented reasons of failures")
	fs.StringVar(&o.out, "out", "", "results file to write (default: scripts/compat-suites/RESULTS.md for a full run, none for a partial one)")
	fs.StringVar(&suites, "suites", envOr("COMPAT_SUITES_ONLY", "."), "regexp of suite names to run (pgx, pq)")
	fs.StringVar(&modes, "modes", envOr("COMPAT_SUITES_MODES", strings.Join(allModes, ",")), "comma-separated modes: direct, session, transaction")
	fs.StringVar(&o.run, "run", os.Getenv("COMPAT_SUITES_RUN"), "go test -run pattern (a partial run)")
	fs.StringVar(&o.skip, "skip", os.Getenv("COMPAT_SUITES_SKIP"), "go test -skip pattern (a partial run)")
	fs.StringVar(&o.pkgs, "pkgs", envOr("COMPAT_SUITES_PKGS", "./..."), "packages of each suite (a partial run unless ./...)")
	fs.DurationVar(&o.testTimeout, "test-timeout", 300*time.Second, "go test -timeout, per package")
	fs.DurationVar(&o.runTimeout, "run-timeout", 600*time.Second, "outer limit of one suite in one mode")
	fs.DurationVar(&o.budget, "budget", 13*time.Minute, "time for all runs together; later runs are reported as not run")
	fs.BoolVar(&o.strict, "strict", envBool("COMPAT_SUITES_STRICT"), "exit 1 when a failure has no documented reason")
	fs.BoolVar(&o.keep, "keep", envBool("COMPAT_SUITES_KEEP"), "keep the work directory (clusters are stopped)")
	fs.StringVar(&o.workDir, "work", "", "work directory (default: a new temp dir)")
	fs.StringVar(&o.srcDir, "src", ".cascata/compat-suites", "where the suites' modules are copied (kept, so their test builds stay cached)")
	fs.StringVar(&o.fromLogs, "from-logs", "", "write the report from the go test logs kept in an earlier run's work dir (-keep), running nothing")
	fs.StringVar(&o.hold, "hold", "", "prepare everything, start cascata in this mode (session or transaction; direct: none), print each suite's environment and wait for Ctrl-C, running no test")
	fs.BoolVar(&o.serial, "serial", envBool("COMPAT_SUITES_SERIAL"), "run the modes one after another (default: transaction mode beside the others)")
	fs.BoolVar(&o.logProxy, "debug-proxy", envBool("COMPAT_SUITES_DEBUG_PROXY"), "run the proxy with CASCATA_LOG_LEVEL=debug")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var err error
	if o.suites, err = regexp.Compile(suites); err != nil {
		return nil, fmt.Errorf("-suites: %w", err)
	}
	for _, m := range strings.Split(modes, ",") {
		m = strings.TrimSpace(m)
		if m == "" {
			continue
		}
		if !contains(allModes, m) {
			return nil, fmt.Errorf("-modes: unknown mode %q", m)
		}
		o.modes = append(o.modes, m)
	}
	if len(o.modes) == 0 {
		return nil, errors.New("-modes: no mode")
	}
	o.defaultTable = suites == "." && len(o.modes) == len(allModes) && o.run == "" && o.skip == "" && o.pkgs == "./..."
	if o.out == "" && o.defaultTable {
		o.out = "scripts/compat-suites/RESULTS.md"
	}
	return o, nil
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func envBool(k string) bool {
	switch strings.ToLower(os.Getenv(k)) {
	case "1", "true", "yes", "on":
		return true
	}
	return false
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

func say(format string, args ...any) {
	fmt.Printf("compat-suites: "+format+"\n", args...)
}

// run does the whole job and returns the exit code.
func run(ctx context.Context, o *options) (int, error) {
	start := time.Now()
	reasons, err := loadReasons(o.reasonsPath)
	if err != nil {
		return 2, err
	}
	bin, err := filepath.Abs(o.bin)
	if err != nil {
		return 2, err
	}
	if _, err := os.Stat(bin); err != nil {
		return 2, fmt.Errorf("%s is missing: run make build (%w)", o.bin, err)
	}
	o.bin = bin
	if o.srcDir, err = filepath.Abs(o.srcDir); err != nil {
		return 2, err
	}

	if o.fromLogs != "" {
		return reportFromLogs(o, reasons, start)
	}
	work := o.workDir
	if work == "" {
		if work, err = os.MkdirTemp("", "cascata-suites-"); err != nil {
			return 2, err
		}
	} else if err := os.MkdirAll(work, 0o755); err != nil {
		return 2, err
	}
	if work, err = filepath.Abs(work); err != nil {
		return 2, err
	}
	// The postgres OS user must reach the clusters and files below when
	// this runs as root.
	if err := os.Chmod(work, 0o755); err != nil {
		return 2, err
	}
	if err := os.MkdirAll(filepath.Join(work, "logs"), 0o755); err != nil {
		return 2, err
	}
	say("work directory %s", work)
	defer func() {
		if o.keep {
			say("kept %s", work)
			return
		}
		_ = os.RemoveAll(work)
	}()

	h := &harness{o: o, work: work, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	var selected []*suite
	for _, s := range allSuites() {
		if o.suites.MatchString(s.key) {
			selected = append(selected, s)
		}
	}
	if len(selected) == 0 {
		return 2, fmt.Errorf("no suite matches %q", o.suites)
	}
	defer h.stopAll(context.WithoutCancel(ctx))

	for _, s := range selected {
		if err := h.prepare(ctx, s); err != nil {
			return 2, fmt.Errorf("prepare %s: %w", s.key, err)
		}
	}
	modes := o.modes
	if o.hold != "" {
		modes = []string{o.hold}
	}
	h.targets = map[string][]*suite{}
	for _, mode := range modes {
		for _, s := range selected {
			t0 := time.Now()
			t, err := h.startCluster(ctx, s, mode)
			if err != nil {
				return 2, fmt.Errorf("prepare %s for %s mode: %w", s.key, mode, err)
			}
			h.targets[mode] = append(h.targets[mode], t)
			say("%s %s, %s mode: cluster on 127.0.0.1:%d ready in %.0fs", s.key, s.version, mode, t.cluster.Primary.Port, time.Since(t0).Seconds())
		}
	}
	if err := h.writeConfigs(); err != nil {
		return 2, err
	}
	if err := h.mintTokens(ctx, selected); err != nil {
		return 2, err
	}

	if o.hold != "" {
		return h.holdOpen(ctx, h.targets[o.hold])
	}

	rep := &report{started: start, suites: selected, modes: o.modes, reasons: reasons, partial: !o.defaultTable}
	rep.pgVersion = h.serverVersion(ctx, h.targets[o.modes[0]][0])
	rep.cascataVersion = gitDescribe(ctx)
	deadline := start.Add(o.budget)
	// Transaction mode (the longest) runs beside the others, which run one
	// after another; each mode has clusters and a proxy of its own.
	var groups [][]string
	var rest []string
	for _, m := range o.modes {
		if m == modeTransaction && !o.serial {
			groups = append(groups, []string{m})
		} else {
			rest = append(rest, m)
		}
	}
	if len(rest) > 0 {
		groups = append(groups, rest)
	}
	if o.serial {
		groups = [][]string{o.modes}
	}
	var wg sync.WaitGroup
	errs := make([]error, len(groups))
	for i, g := range groups {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, mode := range g {
				if err := h.runMode(ctx, mode, rep, deadline); err != nil {
					errs[i] = err
					return
				}
			}
		}()
	}
	wg.Wait()
	if ctx.Err() != nil {
		return 130, ctx.Err()
	}
	if err := errors.Join(errs...); err != nil {
		return 2, err
	}
	rep.elapsed = time.Since(start)

	if err := writeMeta(filepath.Join(work, "logs", "report.json"), rep); err != nil {
		say("%v", err)
	}
	text := rep.markdown()
	if o.out != "" {
		if err := os.WriteFile(o.out, []byte(text), 0o644); err != nil {
			return 2, err
		}
		say("wrote %s", o.out)
	}
	fmt.Println()
	fmt.Print(rep.summary())
	if o.out == "" {
		fmt.Println()
		fmt.Print(text)
	}
	say("total %s", rep.elapsed.Round(time.Second))
	if n := rep.undocumented(); n > 0 {
		if o.strict {
			say("%d failures without a documented reason (strict: failing)", n)
			return 1, nil
		}
		say("%d failures without a documented reason (set COMPAT_SUITES_STRICT=1 to fail on them)", n)
	}
	return 0, nil
}

// runMode runs every suite in one mode, through a proxy of its own
// unless the mode is direct.
func (h *harness) runMode(ctx context.Context, mode string, rep *report, deadline time.Time) error {
	targets := h.targets[mode]
	if time.Now().After(deadline) {
		for _, s := range targets {
			rep.add(&runResult{suite: s, mode: mode, notRun: "the time budget (-budget) was spent"})
		}
		return nil
	}
	var px *proxyProc
	if mode != modeDirect {
		var err error
		if px, err = h.startProxy(ctx, mode); err != nil {
			return err
		}
		say("%s mode: cascata on %s", mode, px.addr)
		defer h.stopProxy(context.WithoutCancel(ctx), px, rep)
	}
	for _, s := range targets {
		if time.Now().After(deadline) {
			rep.add(&runResult{suite: s, mode: mode, notRun: "the time budget (-budget) was spent"})
			continue
		}
		limit := min(h.o.runTimeout, time.Until(deadline)+time.Minute)
		r := h.runSuite(ctx, s, mode, px, limit)
		rep.add(r)
		say("%s %s: %s in %.0fs%s", s.key, mode, r.counts(), r.elapsed.Seconds(), r.headline())
		if ctx.Err() != nil {
			return nil
		}
	}
	return nil
}

// reportFromLogs classifies the go test logs of an earlier run again
// (after an edit of reasons.txt) and writes the report as that run would
// have, with its times and notes (logs/report.json).
func reportFromLogs(o *options, reasons *reasons, start time.Time) (int, error) {
	rep := &report{started: start, modes: o.modes, reasons: reasons, partial: !o.defaultTable, pgVersion: "unknown", cascataVersion: "unknown"}
	logs := filepath.Join(o.fromLogs, "logs")
	meta, err := readMeta(filepath.Join(logs, "report.json"))
	if err != nil {
		return 2, err
	}
	for _, s := range allSuites() {
		if o.suites.MatchString(s.key) {
			rep.suites = append(rep.suites, s)
		}
	}
	for _, mode := range o.modes {
		for _, s := range rep.suites {
			r := newRunResult(s, mode)
			m := meta.run(s.key, mode)
			if m != nil && m.NotRun != "" {
				r.notRun = m.NotRun
				rep.add(r)
				continue
			}
			if err := r.parseFile(filepath.Join(logs, s.key+"-"+mode+".json")); err != nil {
				return 2, err
			}
			r.checkMain(r)
			reruns, _ := filepath.Glob(filepath.Join(logs, s.key+"-"+mode+"-rerun*.json"))
			sort.SliceStable(reruns, func(i, j int) bool { return rerunIndex(reruns[i]) < rerunIndex(reruns[j]) })
			for _, f := range reruns {
				next := newRunResult(s, mode)
				if err := next.parseFile(f); err != nil {
					return 2, err
				}
				r.merge(next)
				r.checkMain(next)
			}
			if m != nil {
				m.apply(r)
			}
			r.finish()
			rep.add(r)
		}
	}
	if meta != nil {
		meta.apply(rep)
	}
	text := rep.markdown()
	if o.out != "" {
		if err := os.WriteFile(o.out, []byte(text), 0o644); err != nil {
			return 2, err
		}
		say("wrote %s", o.out)
		fmt.Print(rep.summary())
		return 0, nil
	}
	fmt.Print(text)
	return 0, nil
}

var rerunRE = regexp.MustCompile(`-rerun(\d+)-`)

func rerunIndex(path string) int {
	m := rerunRE.FindStringSubmatch(filepath.Base(path))
	if m == nil {
		return 0
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// holdOpen starts the proxy in o.hold mode and prints what each suite's
// tests would see, for reproducing a failure by hand, until ctx ends.
func (h *harness) holdOpen(ctx context.Context, suites []*suite) (int, error) {
	mode := h.o.hold
	addr := ""
	if mode != modeDirect {
		if mode != modeSession && mode != modeTransaction {
			return 2, fmt.Errorf("-hold: unknown mode %q", mode)
		}
		px, err := h.startProxy(ctx, mode)
		if err != nil {
			return 2, err
		}
		defer func() { _ = px.cmd.Process.Signal(syscall.SIGTERM); <-px.done }()
		addr = px.addr
		say("cascata (%s mode) on %s, log %s", mode, addr, px.logPath)
	}
	for _, s := range suites {
		if err := os.MkdirAll(filepath.Join(h.work, "home-"+s.key+"-"+mode), 0o755); err != nil {
			return 2, err
		}
		fmt.Printf("\n# %s (cd %s)\n", s.title, s.src)
		for _, kv := range s.env(h, s, mode, addr) {
			k, v, _ := strings.Cut(kv, "=")
			fmt.Printf("export %s=%s\n", k, shellQuote(v))
		}
		fmt.Printf("# superuser: psql %s\n", shellQuote(s.cluster.Primary.SuperuserURL(s.db)))
	}
	say("holding; Ctrl-C stops everything")
	<-ctx.Done()
	return 0, nil
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// gitDescribe names the cascata tree the proxy was built from.
func gitDescribe(ctx context.Context) string {
	out, err := exec.CommandContext(ctx, "git", "describe", "--always", "--dirty").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}
