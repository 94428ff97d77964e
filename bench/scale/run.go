package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// step is what one client count measured.
type step struct {
	clients      int
	projects     int // projects with clients
	connect      time.Duration
	connectFails int
	live         int // clients connected
	firstFail    string
	loadAvg      string

	opened reading // right after the clients connected (their pools still open)
	idle   reading // after the pools of idle projects were dropped

	lightActive int
	lightProjs  int
	light       *latencies
	lightRead   reading
	lightWin    window // backends during the light activity
	lightDials  dialWindow

	phases  []*probePhase // newly active projects, one phase per busy query
	stepWin window        // backends over the whole step
}

// probePhase is one run of the newly-active probes while busy clients of
// other projects, running query back to back, hold the host cap.
type probePhase struct {
	query        string
	dials        dialWindow // cascata's backend logins during the probes
	busyAloneQPS float64    // busy clients' queries per second before the probes
	busyAloneWin window     // backends then
	probes       probeResult
	probeBusyQPS float64
	probeWin     window // backends while probing
}

// busyAlone is how long the busy clients are measured before the probes.
const busyAlone = 3 * time.Second

// baselineProbes is how many logins each baseline times.
const baselineProbes = 50

// drainLimit bounds the wait for the pools to go once every client closed.
const drainLimit = 45 * time.Second

// outcome is the whole run, for the report.
type outcome struct {
	o          *options
	started    time.Time
	elapsed    time.Duration
	loadStart  string
	loadEnd    string
	pgVersion  string
	commit     string
	nofile     string
	startup    time.Duration
	base       reading
	steps      []*step
	direct     latencies     // PostgreSQL login + SELECT 1, no proxy, nothing else running
	free       probeResult   // newly active projects through cascata, nothing else running
	final      reading       // after every client closed: no pool, no backend, or drainLimit passed
	drain      time.Duration // from the last client's close to the final reading
	runWin     window
	alive      bool
	panics     int
	errorLines int
	aborted    string // why the steps stopped early ("" = all ran)
}

// sleepCtx sleeps d or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return fmt.Errorf("interrupted: %w", ctx.Err())
	case <-time.After(d):
		return nil
	}
}

func run(ctx context.Context, o *options) (err error) {
	res := &outcome{o: o, started: time.Now(), loadStart: loadAvg(), commit: gitCommit()}
	maxClients := o.steps[len(o.steps)-1]
	if err := raiseNoFile(uint64(maxClients + o.busyProjects*o.busyPer + 4096)); err != nil {
		return err
	}
	if _, err := os.Stat(o.cascataBin); err != nil {
		return fmt.Errorf("cascata binary (make build): %w", err)
	}
	w := &world{}
	if w.dir, err = os.MkdirTemp("/var/tmp", "cascata-scale-"); err != nil {
		return fmt.Errorf("scratch dir: %w", err)
	}
	if err := os.Chmod(w.dir, 0o755); err != nil { // the postgres OS user must reach the cluster
		return fmt.Errorf("scratch dir: %w", err)
	}
	defer func() {
		stopCascata(w)
		if w.cluster != nil {
			// The cluster's files go with it; its log stays with the run's.
			if b, rerr := os.ReadFile(filepath.Join(w.dir, "pg", "primary.log")); rerr == nil {
				_ = os.WriteFile(filepath.Join(w.dir, "postgres.log"), b, 0o644)
			}
			sctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			if serr := w.cluster.Stop(sctx); serr != nil {
				say("stop postgres: %v", serr)
			}
			cancel()
		}
		if o.keep || err != nil {
			say("kept %s (cascata.log, cascata.toml, postgres.log)", w.dir)
			return
		}
		_ = os.RemoveAll(w.dir)
	}()

	say("starting PostgreSQL in %s", w.dir)
	password, err := startPostgres(ctx, w, o)
	if err != nil {
		return err
	}
	res.pgVersion = w.pgVersion
	if err := writeConfig(w, o, password); err != nil {
		return err
	}
	say("starting cascata with %d projects", len(w.load)+len(w.probe))
	t0 := time.Now()
	if err := startCascata(ctx, w, o); err != nil {
		return err
	}
	res.startup = time.Since(t0)
	res.nofile = w.nofile
	say("cascata up in %.1f s (pid %d, open files limit %s)", res.startup.Seconds(), w.cmd.Process.Pid, w.nofile)
	smp, err := startSampler(ctx, w)
	if err != nil {
		return err
	}
	defer smp.stop(context.WithoutCancel(ctx))
	d, err := newDialer(w.proxyAddr)
	if err != nil {
		return err
	}
	if err := sleepCtx(ctx, 2*time.Second); err != nil {
		return err
	}
	if res.base, err = w.read(ctx, smp); err != nil {
		return err
	}
	w.baseRSS = res.base.rssKB
	say("before clients: RSS %d KiB, %d goroutines, %d fds", res.base.rssKB, res.base.goroutines, res.base.fds)

	// Baselines, nothing else running: one backend login, and a newly
	// active project through cascata with the host cap free.
	url := fmt.Sprintf("postgres://authenticator:%s@127.0.0.1:%d/%s?sslmode=disable", password, w.cluster.Primary.Port, w.load[0].db)
	if err := direct(ctx, url, baselineProbes, &res.direct); err != nil {
		return err
	}
	if err := probe(ctx, d, w.probe[len(w.probe)-min(baselineProbes, len(w.probe)):], "", &res.free); err != nil {
		return err
	}
	say("baselines: PostgreSQL login + SELECT 1 p50 %.1f ms, p99 %.1f ms; newly active project through cascata p50 %.1f ms, p99 %.1f ms",
		res.direct.pct(0.5), res.direct.pct(0.99), res.free.lat.pct(0.5), res.free.lat.pct(0.99))

	fl := &fleet{}
	for _, n := range o.steps {
		st, err := measureStep(ctx, w, o, d, fl, smp, n)
		if st != nil {
			res.steps = append(res.steps, st)
		}
		if err != nil {
			res.aborted = fmt.Sprintf("at %d clients: %v", n, err)
			say("stopping early: %s", res.aborted)
			break
		}
	}
	fl.close(context.WithoutCancel(ctx))
	// No client is left: after the idle timeout (and a reaper pass) no pool
	// and no backend may remain; how long they take is reported.
	if res.aborted == "" {
		closed := time.Now()
		for {
			if err := sleepCtx(ctx, time.Second); err != nil {
				res.aborted = fmt.Sprintf("waiting for the pools to drain: %v", err)
				break
			}
			if res.final, err = w.read(ctx, smp); err != nil {
				res.aborted = fmt.Sprintf("final reading: %v", err)
				break
			}
			res.drain = time.Since(closed)
			if (res.final.pools == 0 && res.final.backends == 0) || res.drain > drainLimit {
				break
			}
		}
	}
	res.runWin = smp.window(res.started, time.Now().Add(time.Second))
	res.alive = w.alive()
	logText, _ := os.ReadFile(w.logPath)
	res.panics = strings.Count(string(logText), "panic:") + strings.Count(string(logText), "fatal error:")
	res.errorLines = strings.Count(string(logText), "level=ERROR")
	res.loadEnd = loadAvg()
	res.elapsed = time.Since(res.started)
	if err := writeReport(res); err != nil {
		return err
	}
	switch {
	case res.runWin.max > o.hostCap:
		return fmt.Errorf("cascata had %d backends at once, over max_server_conn_per_host = %d", res.runWin.max, o.hostCap)
	case !res.alive:
		return errors.New("cascata exited during the run (see the kept cascata.log)")
	case res.aborted != "":
		return errors.New("the run stopped early: " + res.aborted)
	}
	return nil
}

// measureStep brings the fleet to n clients and measures the idle proxy,
// light activity and newly active projects under a held host cap.
func measureStep(ctx context.Context, w *world, o *options, d *dialer, fl *fleet, smp *sampler, n int) (*step, error) {
	st := &step{clients: n, loadAvg: loadAvg()}
	per := o.perProject()
	st.projects = (n + per - 1) / per
	begin := time.Now()
	defer func() { st.stepWin = smp.window(begin, time.Now()) }()
	say("%d clients: %d projects with %d clients each", n, st.projects, per)
	g, err := fl.grow(ctx, d, w.load, n, per, o.workers)
	st.connect, st.connectFails, st.live = g.took, g.failures, len(fl.clients)
	if g.firstFail != nil {
		st.firstFail = g.firstFail.Error()
	}
	if err != nil {
		return st, err
	}
	if st.opened, err = w.read(ctx, smp); err != nil {
		return st, err
	}
	say("%d clients connected in %.1f s (%d failed); %d pools open", n, st.connect.Seconds(), st.connectFails, st.opened.pools)
	if !w.alive() {
		return st, errors.New("cascata exited")
	}

	// Idle: every client has used a backend once; their pools are dropped
	// after server_idle_timeout (the reaper runs every quarter of it).
	if err := sleepCtx(ctx, 2*o.idleTimeout+time.Second); err != nil {
		return st, err
	}
	if o.heapProfiles {
		prof, err := w.admin(ctx, "/debug/pprof/heap")
		if err != nil {
			return st, err
		}
		if err := os.WriteFile(filepath.Join(w.dir, fmt.Sprintf("heap-%d.pb.gz", n)), prof, 0o644); err != nil {
			return st, fmt.Errorf("heap profile: %w", err)
		}
	}
	if st.idle, err = w.read(ctx, smp); err != nil {
		return st, err
	}
	say("%d clients idle: RSS %d KiB (%.1f KiB per client), %d goroutines, %d fds, %d pools, %d backends",
		n, st.idle.rssKB, perClient(st.idle.rssKB-w.baseRSS, st.live), st.idle.goroutines, st.idle.fds, st.idle.pools, st.idle.backends)

	// Light activity: a few per cent of the clients query once a second.
	dials0, err := w.dials(ctx)
	if err != nil {
		return st, err
	}
	lightStart := time.Now()
	lightDone := make(chan struct{})
	go func() {
		defer close(lightDone)
		st.light, st.lightActive, st.lightProjs = fl.light(ctx, o.lightEvery, o.lightDur)
	}()
	if err := sleepCtx(ctx, o.lightDur*3/4); err != nil {
		<-lightDone
		return st, err
	}
	st.lightRead, err = w.read(ctx, smp)
	<-lightDone
	st.lightWin = smp.window(lightStart, time.Now())
	if err != nil {
		return st, err
	}
	dials1, err := w.dials(ctx)
	if err != nil {
		return st, err
	}
	st.lightDials = dials1.since(dials0)
	say("%d clients, %d querying once a second: p50 %.2f ms, p99 %.2f ms, %d errors; %d pools",
		n, st.lightActive, st.light.pct(0.5), st.light.pct(0.99), st.light.errs, st.lightRead.pools)

	// Newly active projects while busy clients of other projects hold the
	// cap: with a heavy busy load, then a calm one.
	for _, q := range o.busyQueries() {
		ph, err := runProbePhase(ctx, w, o, d, smp, n, q)
		st.phases = append(st.phases, ph)
		if err != nil {
			return st, err
		}
	}
	if !w.alive() {
		return st, errors.New("cascata exited")
	}
	return st, nil
}

func perClient(deltaKB int64, clients int) float64 {
	if clients == 0 {
		return 0
	}
	return float64(deltaKB) / float64(clients)
}

// waitNoPools waits until none of the projects has a pool, and returns how
// many had one at the first look.
func waitNoPools(ctx context.Context, w *world, projs []project, limit time.Duration) (int, error) {
	deadline := time.Now().Add(limit)
	first := -1
	for {
		pools, err := w.poolProjects(ctx)
		if err != nil {
			return 0, err
		}
		with := 0
		for _, p := range projs {
			if pools[p.ref] {
				with++
			}
		}
		if first < 0 {
			first = with
		}
		if with == 0 {
			return first, nil
		}
		if time.Now().After(deadline) {
			return first, fmt.Errorf("%d probe projects still have a pool after %s: pools are not dropped", with, limit)
		}
		if err := sleepCtx(ctx, 250*time.Millisecond); err != nil {
			return first, err
		}
	}
}

// runProbePhase starts the busy clients running query, measures them alone,
// then probes the newly active projects, at a step of n clients.
func runProbePhase(ctx context.Context, w *world, o *options, d *dialer, smp *sampler, n int, query string) (*probePhase, error) {
	ph := &probePhase{query: query}
	var err error
	fresh := w.probe[:o.probes]
	if ph.probes.hadPool, err = waitNoPools(ctx, w, fresh, 3*o.idleTimeout+2*time.Second); err != nil {
		return ph, err
	}
	b := startBusy(ctx, d, w.load[:o.busyProjects], o.busyPer, query)
	ph.probes.busyConns, ph.probes.busyFails = len(b.conns), b.dialFails
	// The busy clients alone first: 2 s to settle, then 3 s measured, so
	// what the probes change shows against it.
	if err := sleepCtx(ctx, 2*time.Second); err != nil {
		b.stop(context.WithoutCancel(ctx))
		return ph, err
	}
	a0, aruns := time.Now(), b.runs.Load()
	if err := sleepCtx(ctx, busyAlone); err != nil {
		b.stop(context.WithoutCancel(ctx))
		return ph, err
	}
	ph.busyAloneWin = smp.window(a0, time.Now())
	ph.busyAloneQPS = float64(b.runs.Load()-aruns) / time.Since(a0).Seconds()
	dials0, err := w.dials(ctx)
	if err != nil {
		b.stop(context.WithoutCancel(ctx))
		return ph, err
	}
	runs0 := b.runs.Load()
	p0 := time.Now()
	pctx, pcancel := context.WithTimeout(ctx, o.probeTime)
	perr := probe(pctx, d, fresh, w.floorURL, &ph.probes)
	pcancel()
	if dials1, err := w.dials(ctx); err == nil {
		ph.dials = dials1.since(dials0) // else the report shows no logins measured (—)
	}
	if perr != nil && ctx.Err() == nil {
		perr = nil // the step's probe time ran out: the probes not made are reported as missing
	}
	p1 := time.Now()
	ph.probeBusyQPS = float64(b.runs.Load()-runs0) / p1.Sub(p0).Seconds()
	b.stop(context.WithoutCancel(ctx))
	ph.probes.busyRuns, ph.probes.busyErrs = b.runs.Load(), b.errs.Load()
	if v, ok := b.first.Load().(string); ok {
		ph.probes.busyErr = v
	}
	ph.probeWin = smp.window(p0, p1)
	say("%d clients, busy `%s`: %d newly active projects, p50 %.1f ms, p99 %.1f ms, %d failed; PostgreSQL login + SELECT 1 between them p50 %.1f ms, p99 %.1f ms; backends while probing %d–%d (cap %d)",
		n, query, ph.probes.lat.count(), ph.probes.lat.pct(0.5), ph.probes.lat.pct(0.99), ph.probes.lat.errs, ph.probes.floor.pct(0.5), ph.probes.floor.pct(0.99), ph.probeWin.min, ph.probeWin.max, o.hostCap)
	return ph, perr
}
