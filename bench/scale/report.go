package main

import (
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// Targets the run is judged against.
const (
	targetKiBPerClient = 20.0 // RSS per idle client, its goroutines included
	targetP99Ms        = 50.0 // connect + first query of a newly active project
)

// sectionPrefix starts the section of RESULTS.md this run owns.
const sectionPrefix = "## Scale: "

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "**not met**"
}

// thousands writes a count with comma separators (10,000).
func thousands(n int) string {
	digits := strconv.Itoa(n)
	var b strings.Builder
	for i, r := range digits {
		if i > 0 && r != '-' && digits[i-1] != '-' && (len(digits)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(r)
	}
	return b.String()
}

func (r reading) kibPerClient(base int64, clients int) float64 {
	return perClient(r.rssKB-base, clients)
}

func (r reading) goroutinesPerClient(base reading, clients int) float64 {
	if clients == 0 {
		return 0
	}
	return float64(r.goroutines-base.goroutines) / float64(clients)
}

func machine() string {
	model := "?"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "model name"); ok {
				model = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	mem := ""
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb int64
		if _, err := fmt.Sscanf(strings.SplitN(string(b), "\n", 2)[0], "MemTotal: %d kB", &kb); err == nil {
			mem = fmt.Sprintf(", %.0f GiB RAM", float64(kb)/(1<<20))
		}
	}
	return fmt.Sprintf("%d CPUs, %s%s", runtime.NumCPU(), model, mem)
}

// busyCeiling is the busy clients' queries per second if the cap's
// backends ran their query back to back, from the pg_sleep in it.
func busyCeiling(o *options) float64 {
	var secs float64
	if _, err := fmt.Sscanf(o.busyQuery, "SELECT pg_sleep(%g)", &secs); err != nil || secs <= 0 {
		return math.NaN()
	}
	return float64(min(o.hostCap, o.busyProjects*o.busyPer)) / secs
}

// mdCode makes text safe inside a code span of a table-free list item.
func mdCode(s string) string {
	return strings.NewReplacer("`", "'", "\n", " ", "\t", " ").Replace(s)
}

// loadAvg is the 1, 5 and 15 minute load average.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// gitCommit names the checkout the binary was built from.
func gitCommit() string {
	out, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return "unknown"
	}
	c := strings.TrimSpace(string(out))
	// Only changes to what goes into the binary count, not results or docs.
	st, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no", "--", "*.go", "go.mod", "go.sum").Output()
	if err == nil && strings.TrimSpace(string(st)) != "" {
		return c + " + uncommitted changes"
	}
	return c
}

// section renders the markdown section.
func section(res *outcome, svgLink string) string {
	o := res.o
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	p("%s%s projects", sectionPrefix, thousands(o.projects))
	p("")
	p("Written by `make bench-scale` (bench/scale), which replaces this section on every run; `make bench` rewrites")
	p("the rest of this file and keeps it.")
	p("One `cascata serve` process, %s projects carrying the clients plus %d kept for the newly-active probes", thousands(o.projects), o.probeProjects)
	p("(%s `[[projects]]` in its cascata.toml), each with its own `jwt_secret` and its own pool (pools are keyed", thousands(o.projects+o.probeProjects))
	p("per project); their `database_url` point at %d databases of one PostgreSQL server, so many projects share a database", o.databases)
	p("(`?sslmode=disable`: loopback, one TCP connection per backend login). The projects have no `owner_url`: with one,")
	p("cascata installs `cascata.claims()` in each project's database at start-up, 8 at a time (about 70 ms each in a")
	p("trial here); without it claims are not signed, which nothing of this bench uses.")
	p("")
	p("| | |")
	p("|---|---|")
	p("| date | %s |", res.started.UTC().Format("2006-01-02 15:04:05 UTC"))
	p("| machine | %s |", machine())
	p("| load average (1/5/15 min) | at start %s; at end %s (other work on the machine makes absolute numbers noisy) |", res.loadStart, res.loadEnd)
	p("| PostgreSQL | %s, one server, loopback TCP, fsync off, SCRAM login of `authenticator` |", res.pgVersion)
	p("| cascata | %s; started with `ulimit -n 65536` (its open files limit: %s); up in %.1f s with %s projects |", res.commit, res.nofile, res.startup.Seconds(), thousands(o.projects+o.probeProjects))
	p("| config | `pool_mode = \"transaction\"`, `pool_size = %d`, `max_server_conn_per_host = %d`, `server_idle_timeout = \"%s\"`, PostgreSQL `max_connections = %d` |", o.poolSize, o.hostCap, o.idleTimeout, max(200, o.hostCap+60))
	if o.viaMake {
		p("| command | `make bench-scale` (`%s` with `ulimit -n 65536`), %.0f s |", o.command, res.elapsed.Seconds())
	} else {
		p("| command | `%s`, %.0f s |", o.command, res.elapsed.Seconds())
	}
	p("| baseline: PostgreSQL login (SCRAM) + `SELECT 1`, no proxy, nothing else running | p50 %.1f ms, p99 %.1f ms over %d, %d failed |", res.direct.pct(0.5), res.direct.pct(0.99), res.direct.count(), res.direct.errs)
	p("| baseline: newly active project through cascata, host cap free, no other client | p50 %.1f ms, p99 %.1f ms over %d (login alone p50 %.1f ms), %d failed |", res.free.lat.pct(0.5), res.free.lat.pct(0.99), res.free.lat.count(), res.free.connect.pct(0.5), res.free.lat.errs)
	p("")
	p("Clients: pgconn (simple protocol), each with a JWT of its own (distinct `sub`), on 127.0.0.1. Every project with")
	p("clients has %d of them; lower counts have fewer projects active (1,000 clients: 100 projects), and each step adds", o.perProject())
	p("projects, their clients connecting together (%d connects in parallel).", o.workers)
	p("Each client runs `SELECT 1` once after connecting (so its session has used a backend), then stays idle.")
	p("The idle reading is taken %s after the last client connected (twice `server_idle_timeout` and a second), when", 2*o.idleTimeout+time.Second)
	p("the pools of idle projects have been dropped; RSS is VmRSS of /proc/PID/status, goroutines are `go_goroutines`")
	p("of the admin plane's /metrics, fds count /proc/PID/fd, pools come from `GET /v1/pools`, backends are cascata's")
	p("client backends in `pg_stat_activity` (sampled every 100 ms for the whole run).")
	p("")
	p("### Idle clients")
	p("")
	p("| clients | projects with clients | connect s (failed) | RSS MiB | RSS per client KiB (target < %.0f) | the clients added since the row above, KiB each | Go heap / stacks in use per client KiB | goroutines | per client | open fds | pools: after connecting → at the reading | backends at the reading | most backends in the step (cap %d) | load avg (1 min) |", targetKiBPerClient, o.hostCap)
	p("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	p("| 0 | 0 | — | %.1f | — | — | — | %d | — | %d | %d | %d | — | %s |", float64(res.base.rssKB)/1024, res.base.goroutines, res.base.fds, res.base.pools, res.base.backends, strings.Fields(res.loadStart + " ?")[0])
	prev, prevLive := res.base, 0
	for _, s := range res.steps {
		kib := s.idle.kibPerClient(res.base.rssKB, s.live)
		p("| %s | %s | %.1f (%d) | %.1f | %.1f %s | %.1f | %.1f / %.1f | %d | %.2f | %d | %d → %d | %d | %d | %s |",
			thousands(s.live), thousands(s.projects), s.connect.Seconds(), s.connectFails, float64(s.idle.rssKB)/1024,
			kib, verdict(kib < targetKiBPerClient), s.idle.kibPerClient(prev.rssKB, s.live-prevLive),
			perClient(s.idle.heapKB-res.base.heapKB, s.live), perClient(s.idle.stackKB-res.base.stackKB, s.live), s.idle.goroutines, s.idle.goroutinesPerClient(res.base, s.live),
			s.idle.fds, s.opened.pools, s.idle.pools, s.idle.backends, s.stepWin.max, strings.Fields(s.loadAvg + " ?")[0])
		prev, prevLive = s.idle, s.live
	}
	p("")
	p("### Light activity")
	p("")
	p("Every %dth client runs `SELECT 1` once a second for %s, each at its own offset (their projects keep a pool).", o.lightEvery, o.lightDur)
	p("")
	p("| clients | clients querying (projects) | p50 ms | p99 ms | errors | RSS per client KiB | goroutines | pools | backends, mean / max | cascata's backend logins (per s), p50 / p99 |")
	p("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
	for _, s := range res.steps {
		if s.light == nil {
			p("| %s | not run |||||||||", thousands(s.live))
			continue
		}
		p("| %s | %d (%d) | %.2f | %.2f | %d | %.1f | %d | %d | %.1f / %d | %s |", thousands(s.live), s.lightActive, s.lightProjs,
			s.light.pct(0.5), s.light.pct(0.99), s.light.errs, s.lightRead.kibPerClient(res.base.rssKB, s.live),
			s.lightRead.goroutines, s.lightRead.pools, s.lightWin.mean, s.lightWin.max, s.lightDials)
	}
	p("")
	p("With more projects querying than the host cap holds backends for, each query of a project left without one waits for a backend login (`cascata_server_dial_seconds`, whose bucket bounds the percentiles).")
	p("")
	p("### Newly active projects while the host cap is in use")
	p("")
	p("%d busy clients (%d on each of %d projects, a query back to back) hold the host cap (%d × pool_size %d ≥ %d):", o.busyProjects*o.busyPer, o.busyPer, o.busyProjects, o.busyProjects, o.poolSize, o.hostCap)
	p("first `%s`, a heavy load for this machine, which gives the verdicts below;", o.busyQuery)
	if o.calmQuery != "" {
		p("then, in a second round with the same probe projects once their pools are gone, `%s`: the cap as much in use,", o.calmQuery)
		p("the machine calmer.")
	}
	p("Then up to %d projects that had no client and no pool (checked in `GET /v1/pools` first) are probed one after", o.probes)
	p("another, each once: connect (JWT login) + first `SELECT 1`, timed from the dial to the result; the probes of a")
	p("step stop after %s. Percentiles are over the probes that succeeded (nearest rank: under 100 probes the p99 is the", o.probeTime)
	p("slowest); a failed one counts against the target. After each probe the bench logs in to PostgreSQL itself (SCRAM,")
	p("a role of its own) and runs `SELECT 1`: a project with no backend needs a server login through any proxy, so")
	p("that column is the floor of a newly active project's first query at the same moment, on this machine.")
	p("Backends are sampled in pg_stat_activity; their mean age and the logins PostgreSQL counted to the projects' databases")
	p("(pg_stat_database.sessions; the direct logins go to another database) show how often cascata dialled, and so closed, backends. The busy clients are measured alone for %s first (after 2 s to", busyAlone)
	p("settle); %d backends each running `%s` back to back could serve up to %.0f queries/s.", o.hostCap, o.busyQuery, busyCeiling(o))
	p("")
	p("| clients | busy query | probes | p50 ms | p99 ms (target < %.0f) | max ms | login alone p50 / p99 ms | PostgreSQL login + `SELECT 1` between the probes, p50 / p99 ms | cascata's backend logins (per s), p50 / p99 | failed | backends min / mean / max | mean backend age s | backend logins per s | busy queries/s | before the probes: busy queries/s, backends mean, age s, logins per s |", targetP99Ms)
	p("|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
	for _, s := range res.steps {
		for _, ph := range s.phases {
			probeRow(p, o, s, ph)
		}
	}
	p("")
	p("![RSS per idle client and p99 first-query latency of a newly active project against client count](%s)", svgLink)
	p("")
	p("### Verdicts")
	p("")
	allKiB := len(res.steps) == len(o.steps)
	for _, s := range res.steps {
		allKiB = allKiB && s.idle.kibPerClient(res.base.rssKB, s.live) < targetKiBPerClient
	}
	var perCount []string
	for _, s := range res.steps {
		kib := s.idle.kibPerClient(res.base.rssKB, s.live)
		perCount = append(perCount, fmt.Sprintf("%s at %s (%.1f KiB)", strings.ReplaceAll(verdict(kib < targetKiBPerClient), "**", ""), thousands(s.live), kib))
	}
	p("- RSS per idle client (its goroutines included) under %.0f KiB at every count: %s — %s.", targetKiBPerClient, verdict(allKiB), strings.Join(perCount, ", "))
	for i, q := range o.busyQueries() {
		all := len(res.steps) == len(o.steps)
		var floors []string
		for _, s := range res.steps {
			if i >= len(s.phases) {
				all = false
				continue
			}
			pr := &s.phases[i].probes
			all = all && pr.lat.count() >= o.probes && pr.lat.pct(0.99) < targetP99Ms
			floors = append(floors, fmt.Sprintf("%s at %s (cascata %.1f ms)", floorVerdict(pr.floor.pct(0.99)), thousands(s.live), pr.lat.pct(0.99)))
		}
		p("- Busy clients running `%s`: p99 connect + first query of a newly active project under %.0f ms at every count: %s; p99 of a direct PostgreSQL login + `SELECT 1` between the probes, the floor of that latency here: %s.",
			q, targetP99Ms, verdict(all), strings.Join(floors, ", "))
	}
	capNote := fmt.Sprintf("held: at most %d backends in %d samples", res.runWin.max, res.runWin.samples)
	if res.runWin.max > o.hostCap {
		capNote = fmt.Sprintf("**EXCEEDED**: %d backends", res.runWin.max)
	}
	p("- Host cap (`max_server_conn_per_host = %d`) in pg_stat_activity over the whole run: %s.", o.hostCap, capNote)
	poolNote := "not measured (the run stopped early)"
	if res.aborted == "" {
		poolNote = fmt.Sprintf("%d pools and %d backends %.0f s after the last client closed (server_idle_timeout %s)", res.final.pools, res.final.backends, res.drain.Seconds(), o.idleTimeout)
		if res.final.pools == 0 && res.final.backends == 0 {
			poolNote = "yes: " + poolNote
		} else {
			poolNote = "**no**: " + poolNote
		}
	}
	p("- Idle pools dropped: at each idle reading the pools listed above; %s.", poolNote)
	fresh := 0
	for _, s := range res.steps {
		for _, ph := range s.phases {
			fresh += ph.probes.hadPool
		}
	}
	p("- Probe projects that still had a pool when their step's probes began (the run waits for them): %d.", fresh)
	health := "running"
	if !res.alive {
		health = "**DEAD**"
	}
	p("- cascata at the end: %s; `panic:`/`fatal error:` in its log: %d; `level=ERROR` lines: %d.", health, res.panics, res.errorLines)
	for _, s := range res.steps {
		if s.firstFail != "" {
			p("- First failed client at %s: `%s`.", thousands(s.clients), mdCode(s.firstFail))
		}
		if s.light != nil && s.light.first != nil {
			p("- Light activity at %s: %d errors, the first `%s`.", thousands(s.clients), s.light.errs, mdCode(s.light.first.Error()))
		}
		for _, ph := range s.phases {
			if ph.probes.lat.first != nil {
				p("- First failed probe at %s (busy `%s`): `%s`.", thousands(s.clients), ph.query, mdCode(ph.probes.lat.first.Error()))
			}
			if ph.probes.busyErr != "" {
				p("- Busy clients at %s (`%s`): %d of %d connected, %d query errors; the first error `%s`.", thousands(s.clients), ph.query,
					ph.probes.busyConns, ph.probes.busyConns+ph.probes.busyFails, ph.probes.busyErrs, mdCode(ph.probes.busyErr))
			}
		}
	}
	if res.aborted != "" {
		p("- **The run stopped early** %s.", res.aborted)
	}
	return b.String()
}

// replaceSection puts sec in place of the file's section that starts with
// sectionPrefix, or appends it.
func replaceSection(path, sec string) error {
	old, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("read %s: %w", path, err)
	}
	if err := os.WriteFile(path, []byte(spliceSection(string(old), sec)), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// spliceSection replaces, in text, the section that starts with
// sectionPrefix (up to the next level-2 heading) by sec, or appends sec.
func spliceSection(text, sec string) string {
	lines := strings.Split(text, "\n")
	start, end := -1, len(lines)
	for i, line := range lines {
		if start < 0 && strings.HasPrefix(line, sectionPrefix) {
			start = i
			continue
		}
		if start >= 0 && strings.HasPrefix(line, "## ") {
			end = i
			break
		}
	}
	if start < 0 {
		return strings.TrimRight(text, "\n") + "\n\n" + sec
	}
	out := strings.Join(lines[:start], "\n") + "\n" + sec
	if end < len(lines) {
		out += "\n" + strings.Join(lines[end:], "\n")
	}
	return out
}

func writeReport(res *outcome) error {
	o := res.o
	svg := plot(res)
	if err := os.WriteFile(o.svg, []byte(svg), 0o644); err != nil {
		return fmt.Errorf("write plot: %w", err)
	}
	link, err := filepath.Rel(filepath.Dir(o.results), o.svg)
	if err != nil {
		link = o.svg
	}
	sec := section(res, filepath.ToSlash(link))
	if err := replaceSection(o.results, sec); err != nil {
		return err
	}
	fmt.Print(sec)
	return nil
}

// niceCeil rounds v up to 1, 2, 2.5 or 5 times a power of ten.
func niceCeil(v float64) float64 {
	if v <= 0 {
		return 1
	}
	e := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if m*e >= v {
			return m * e
		}
	}
	return 10 * e
}

// plot draws RSS per idle client (left axis) and the p99 first-query
// latency of newly active projects (right axis) against the client count.
func plot(res *outcome) string {
	const (
		width, height            = 680.0, 380.0
		left, right, top, bottom = 70.0, 90.0, 50.0, 60.0
	)
	pw, ph := width-left-right, height-top-bottom
	maxX, maxKiB, maxMs := 0.0, targetKiBPerClient, targetP99Ms*2
	type pt struct{ x, kib, ms float64 }
	var pts []pt
	for _, s := range res.steps {
		ms := 0.0
		if len(s.phases) > 0 {
			ms = s.phases[0].probes.lat.pct(0.99) // the heavy load's
		}
		q := pt{float64(s.live), s.idle.kibPerClient(res.base.rssKB, s.live), ms}
		pts = append(pts, q)
		maxX, maxKiB, maxMs = max(maxX, q.x), max(maxKiB, q.kib), max(maxMs, q.ms)
	}
	maxX = niceCeil(max(maxX, 1))
	maxKiB = niceCeil(maxKiB * 1.15)
	// Latency on a log scale (powers of ten): the target and seconds both show.
	loExp, hiExp := 1.0, math.Ceil(math.Log10(maxMs*1.1))
	for _, q := range pts {
		if q.ms > 0 {
			loExp = min(loExp, math.Floor(math.Log10(q.ms)))
		}
	}
	loExp = max(loExp, 0)
	sx := func(v float64) float64 { return left + v/maxX*pw }
	sl := func(v float64) float64 { return top + ph - v/maxKiB*ph }
	sr := func(v float64) float64 {
		e := math.Log10(max(v, math.Pow(10, loExp)))
		return top + ph - (e-loExp)/(hiExp-loExp)*ph
	}
	const blue, red = "#1f5fa8", "#c0392b"
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	p(`<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" viewBox="0 0 %.0f %.0f" font-family="sans-serif" font-size="12">`, width, height, width, height)
	p(`<rect width="100%%" height="100%%" fill="white"/>`)
	p(`<text x="%.0f" y="22" text-anchor="middle" font-size="14">cascata, %s projects: memory per idle client and newly-active p99</text>`, width/2, thousands(res.o.projects))
	for i := 0; i <= 5; i++ {
		f := float64(i) / 5
		y := top + ph - f*ph
		p(`<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#e4e4e4"/>`, left, y, left+pw, y)
		p(`<text x="%.1f" y="%.1f" text-anchor="end" fill="%s">%g</text>`, left-6, y+4, blue, f*maxKiB)
		x := left + f*pw
		p(`<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>`, x, top+ph+18, thousands(int(f*maxX)))
	}
	for e := loExp; e <= hiExp; e++ {
		p(`<text x="%.1f" y="%.1f" fill="%s">%s</text>`, left+pw+6, sr(math.Pow(10, e))+4, red, thousands(int(math.Pow(10, e))))
	}
	p(`<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="none" stroke="#444"/>`, left, top, pw, ph)
	p(`<text x="%.1f" y="%.1f" text-anchor="middle">client connections</text>`, left+pw/2, height-14)
	p(`<text transform="translate(18 %.1f) rotate(-90)" text-anchor="middle" fill="%s">RSS per idle client, KiB</text>`, top+ph/2, blue)
	p(`<text transform="translate(%.1f %.1f) rotate(90)" text-anchor="middle" fill="%s">p99 first query, newly active project, ms (log)</text>`, width-14, top+ph/2, red)
	p(`<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-dasharray="6 4"/>`, left, sl(targetKiBPerClient), left+pw, sl(targetKiBPerClient), blue)
	p(`<text x="%.1f" y="%.1f" fill="%s">target %g KiB</text>`, left+6, sl(targetKiBPerClient)-4, blue, targetKiBPerClient)
	p(`<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-dasharray="2 3"/>`, left, sr(targetP99Ms), left+pw, sr(targetP99Ms), red)
	p(`<text x="%.1f" y="%.1f" text-anchor="end" fill="%s">target %g ms</text>`, left+pw-6, sr(targetP99Ms)-4, red, targetP99Ms)
	var kibLine, msLine []string
	for _, q := range pts {
		kibLine = append(kibLine, fmt.Sprintf("%.1f,%.1f", sx(q.x), sl(q.kib)))
		msLine = append(msLine, fmt.Sprintf("%.1f,%.1f", sx(q.x), sr(q.ms)))
	}
	p(`<polyline points="%s" fill="none" stroke="%s" stroke-width="2"/>`, strings.Join(kibLine, " "), blue)
	p(`<polyline points="%s" fill="none" stroke="%s" stroke-width="2"/>`, strings.Join(msLine, " "), red)
	for _, q := range pts {
		p(`<circle cx="%.1f" cy="%.1f" r="4" fill="%s"><title>%s clients: %.1f KiB per client</title></circle>`, sx(q.x), sl(q.kib), blue, thousands(int(q.x)), q.kib)
		p(`<rect x="%.1f" y="%.1f" width="8" height="8" fill="%s"><title>%s clients: p99 %.1f ms</title></rect>`, sx(q.x)-4, sr(q.ms)-4, red, thousands(int(q.x)), q.ms)
	}
	p(`<circle cx="%.1f" cy="38" r="4" fill="%s"/><text x="%.1f" y="42">RSS per idle client (left)</text>`, left+8, blue, left+16)
	p(`<rect x="%.1f" y="34" width="8" height="8" fill="%s"/><text x="%.1f" y="42">p99 connect + first query (right)</text>`, left+pw/2+4, red, left+pw/2+16)
	p(`</svg>`)
	return b.String()
}

// floorVerdict says whether the floor leaves room for the latency target.
func floorVerdict(p99 float64) string {
	if p99 < targetP99Ms {
		return fmt.Sprintf("%.1f ms, under the target", p99)
	}
	return fmt.Sprintf("%.1f ms, itself over the target", p99)
}

// probeRow prints one row of the newly-active table: one phase of a step.
func probeRow(p func(string, ...any), o *options, s *step, ph *probePhase) {
	pr := &ph.probes
	p99 := pr.lat.pct(0.99)
	made := fmt.Sprint(pr.lat.count() + pr.lat.errs)
	if pr.lat.count()+pr.lat.errs < o.probes {
		made += fmt.Sprintf(" of %d (%s ran out", o.probes, o.probeTime)
		if pr.cut > 0 {
			made += fmt.Sprintf(", %d cut short", pr.cut)
		}
		made += ")"
	}
	p("| %s | `%s` | %s | %.1f | %.1f %s | %.1f | %.1f / %.1f | %.1f / %.1f | %s | %d | %d / %.1f / %d | %.2f | %.0f | %.0f | %.0f, %.1f, %.2f, %.0f |",
		thousands(s.live), ph.query, made, pr.lat.pct(0.5), p99, verdict(pr.lat.count() >= o.probes && p99 < targetP99Ms),
		pr.lat.pct(1), pr.connect.pct(0.5), pr.connect.pct(0.99), pr.floor.pct(0.5), pr.floor.pct(0.99), ph.dials, pr.lat.errs,
		ph.probeWin.min, ph.probeWin.mean, ph.probeWin.max, ph.probeWin.meanAge, ph.probeWin.loginsPerSec(), ph.probeBusyQPS,
		ph.busyAloneQPS, ph.busyAloneWin.mean, ph.busyAloneWin.meanAge, ph.busyAloneWin.loginsPerSec())
}
