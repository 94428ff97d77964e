package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"
)

// Outcomes of a test.
const (
	outPass = "pass"
	outFail = "fail"
	outSkip = "skip"
	// outUnfinished: started, never ended (its test binary timed out or
	// crashed, or the outer limit killed it).
	outUnfinished = "unfinished"
)

// testResult is one test or subtest of one package.
type testResult struct {
	pkg, test string
	outcome   string
	last      string   // the last of run, pause, cont
	output    []string // its output lines (capped)
	reason    *reason  // for failures: the documented reason, nil if none
	panicked  bool     // its output has a panic
	// timeoutVictim: the binary's timeout panic was printed as its output.
	timeoutVictim bool
}

// name is how reasons.txt and the report name a test: "<package>:<test>".
func (t *testResult) name() string { return t.pkg + ":" + t.test }

type pkgResult struct {
	name       string
	importPath string
	outcome    string // pass, fail, skip (no test files)
	output     []string
	timedOut   bool     // "panic: test timed out"
	running    []string // the tests a timeout names as running
	inRunning  bool     // reading the list of running tests
	// mainFailed: the binary failed after its tests passed (TestMain).
	mainFailed bool
	mainOutput []string
	elapsed    float64
	// reruns says how the package's binary died and what ran again.
	reruns []string
	// culprits are the top-level tests that killed the package's test
	// binary: never run again.
	culprits map[string]bool
}

// runResult is one suite in one mode.
type runResult struct {
	suite        *suite
	mode         string
	notRun       string // why it did not run at all
	err          error  // the run itself failed (go test could not start, ...)
	outerTimeout time.Duration
	elapsed      time.Duration
	tests        map[string]*testResult
	pkgs         map[string]*pkgResult
	order        []*testResult

	pass, fail, skip          int // tests and subtests
	topPass, topFail, topSkip int // top-level tests only
	failures                  []*testResult
	pkgFailures               []*pkgResult // packages that failed with no failing test
	unfinished                []*testResult
}

func newRunResult(s *suite, mode string) *runResult {
	return &runResult{suite: s, mode: mode, tests: map[string]*testResult{}, pkgs: map[string]*pkgResult{}}
}

// topLevel is the top-level test of a test or subtest name.
func topLevel(test string) string {
	t, _, _ := strings.Cut(test, "/")
	return t
}

// rerunPlan is what to run again in a package whose test binary died.
type rerunPlan struct {
	pkg   *pkgResult // of the merged result
	tests []string   // top-level tests
	cause string
}

// rerunPlans finds the packages whose test binary died in latest (the
// last go test run merged into r) and the top-level tests of each that
// have not finished yet, leaving out the tests that killed it.
func (r *runResult) rerunPlans(latest *runResult, list func(importPath string) ([]string, error)) []rerunPlan {
	var names []string
	for n := range latest.pkgs {
		names = append(names, n)
	}
	sort.Strings(names)
	var plans []rerunPlan
	for _, name := range names {
		lp := latest.pkgs[name]
		if lp.outcome == outPass || lp.outcome == outSkip {
			continue
		}
		var tests []*testResult
		died := lp.timedOut
		for _, t := range latest.order {
			if t.pkg == name {
				tests = append(tests, t)
				died = died || t.outcome == "" || t.panicked
			}
		}
		if !died {
			continue
		}
		mp := r.pkgs[name]
		if mp.culprits == nil {
			mp.culprits = map[string]bool{}
		}
		var culprits []string
		add := func(test string) {
			top := topLevel(test)
			if !mp.culprits[top] {
				mp.culprits[top] = true
				culprits = append(culprits, top)
			}
		}
		cause := "it exited"
		if lp.timedOut {
			cause = "go test -timeout while running"
			for _, t := range lp.running {
				add(t)
			}
		}
		for _, t := range tests {
			if t.panicked {
				cause = "a panic in"
				add(t.test)
			}
		}
		if len(culprits) == 0 {
			for _, t := range tests {
				if t.outcome == "" && (t.last == "run" || t.last == "cont") {
					add(t.test)
				}
			}
			cause = "it exited while running"
		}
		cause += " " + strings.Join(culprits, ", ")
		listed, err := list(lp.importPath)
		if err != nil {
			mp.reruns = append(mp.reruns, "its test binary died ("+cause+"); listing its tests failed: "+err.Error())
			continue
		}
		done := map[string]bool{}
		for _, t := range r.order {
			if t.pkg == name && !strings.Contains(t.test, "/") && t.outcome != "" {
				done[t.test] = true
			}
		}
		var again []string
		for _, t := range listed {
			if !done[t] && !mp.culprits[t] {
				again = append(again, t)
			}
		}
		plans = append(plans, rerunPlan{pkg: mp, tests: again, cause: cause})
	}
	return plans
}

// merge takes the results of a re-run into r.
func (r *runResult) merge(next *runResult) {
	for _, t2 := range next.order {
		key := t2.pkg + ":" + t2.test
		if t := r.tests[key]; t != nil {
			*t = *t2
			continue
		}
		t := *t2
		r.tests[key] = &t
		r.order = append(r.order, &t)
	}
	for name, p2 := range next.pkgs {
		mp := r.pkgs[name]
		if mp == nil {
			r.pkgs[name] = p2
			continue
		}
		mp.timedOut = mp.timedOut || p2.timedOut
		if p2.outcome == outFail {
			mp.outcome = outFail
		}
	}
}

// testEvent is a line of `go test -json` (test2json).
type testEvent struct {
	Action  string
	Package string
	Test    string
	Output  string
	Elapsed float64
}

const maxOutputLines = 60

// shortPkg names a package of the suite relative to its module; the
// module's root package by the suite's key.
func (r *runResult) shortPkg(pkg string) string {
	rel := strings.TrimPrefix(strings.TrimPrefix(pkg, r.suite.module), "/")
	if rel == "" {
		return r.suite.key
	}
	return rel
}

func (r *runResult) parseFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	r.parse(f)
	return nil
}

func (r *runResult) parse(in io.Reader) {
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 4<<20), 4<<20)
	for sc.Scan() {
		var ev testEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil || ev.Package == "" {
			continue
		}
		pkg := r.shortPkg(ev.Package)
		p := r.pkgs[pkg]
		if p == nil {
			p = &pkgResult{name: pkg, importPath: ev.Package}
			r.pkgs[pkg] = p
		}
		if ev.Test == "" {
			switch ev.Action {
			case "output", "build-output":
				p.scanPanic(ev.Output)
				if len(p.output) < 400 {
					p.output = append(p.output, strings.TrimRight(ev.Output, "\n"))
				}
			case "pass", "fail", "skip":
				p.outcome = ev.Action
				p.elapsed = ev.Elapsed
			case "build-fail":
				p.outcome = outFail
			}
			continue
		}
		key := pkg + ":" + ev.Test
		t := r.tests[key]
		if t == nil {
			t = &testResult{pkg: pkg, test: ev.Test}
			r.tests[key] = t
			r.order = append(r.order, t)
		}
		switch ev.Action {
		case "output":
			line := strings.TrimRight(ev.Output, "\n")
			if len(t.output) < maxOutputLines {
				t.output = append(t.output, line)
			}
			switch {
			case strings.HasPrefix(line, "panic: test timed out"):
				// test2json pins the timeout on whichever test printed
				// last, and fails it: not a result of its own.
				t.timeoutVictim = true
			case strings.HasPrefix(line, "panic: "):
				t.panicked = true
			}
			p.scanPanic(ev.Output)
		case "run", "pause", "cont":
			t.last = ev.Action
		case "pass", "fail", "skip":
			t.outcome = ev.Action
			if t.timeoutVictim && ev.Action == outFail {
				t.outcome, t.last = "", "cont"
			}
		}
	}
}

var runningRE = regexp.MustCompile(`^\s+(\S+) \(\S+\)$`)

// scanPanic notes a timeout of the package's test binary and the tests it
// names as running ("panic: test timed out after 5m0s" then "running
// tests:" and one "\tTestX (5m0s)" line each).
func (p *pkgResult) scanPanic(out string) {
	for _, line := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		switch {
		case strings.Contains(line, "panic: test timed out"):
			p.timedOut = true
		case p.timedOut && strings.TrimSpace(line) == "running tests:":
			p.inRunning = true
		case p.inRunning:
			if m := runningRE.FindStringSubmatch(line); m != nil {
				p.running = append(p.running, m[1])
			} else {
				p.inRunning = false
			}
		}
	}
}

// finish counts the outcomes once the stream ended.
func (r *runResult) finish() {
	for _, t := range r.order {
		if t.outcome == "" {
			t.outcome = outUnfinished
		}
		top := !strings.Contains(t.test, "/")
		switch t.outcome {
		case outPass:
			r.pass++
			if top {
				r.topPass++
			}
		case outSkip:
			r.skip++
			if top {
				r.topSkip++
			}
		default:
			r.fail++
			if top {
				r.topFail++
			}
			r.failures = append(r.failures, t)
			if t.outcome == outUnfinished {
				r.unfinished = append(r.unfinished, t)
			}
		}
	}
	failedPkg := map[string]bool{}
	for _, t := range r.failures {
		failedPkg[t.pkg] = true
	}
	var names []string
	for n := range r.pkgs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		p := r.pkgs[n]
		switch {
		case p.mainFailed:
			// Listed (and documented) as the failure of a test named
			// TestMain, e.g. "pq:TestMain"; not counted with the tests.
			r.failures = append(r.failures, &testResult{pkg: n, test: "TestMain", outcome: outFail, output: p.mainOutput})
		case p.outcome == outFail && !failedPkg[n]:
			r.pkgFailures = append(r.pkgFailures, p)
		}
	}
}

// checkMain notes the packages whose test binary failed in latest (a go
// test run merged into r) although none of its tests failed there: its
// TestMain (or the binary itself) failed after the tests.
func (r *runResult) checkMain(latest *runResult) {
	bad := map[string]bool{}
	for _, t := range latest.order {
		if t.outcome != outPass && t.outcome != outSkip {
			bad[t.pkg] = true
		}
	}
	for name, p := range latest.pkgs {
		if p.outcome == outFail && !bad[name] && !p.timedOut {
			if mp := r.pkgs[name]; mp != nil {
				mp.mainFailed = true
				mp.mainOutput = p.output
			}
		}
	}
}

// mainExcerpt is the first line of a failed package's own output that
// says something.
func (p *pkgResult) mainExcerpt() string {
	out := p.mainOutput
	if out == nil {
		out = p.output
	}
	for _, l := range out {
		s := strings.TrimSpace(l)
		if s == "" || s == "FAIL" || s == "PASS" || strings.HasPrefix(s, "FAIL\t") || strings.HasPrefix(s, "ok ") || strings.HasPrefix(s, "exit status") {
			continue
		}
		if r := []rune(s); len(r) > 200 {
			s = string(r[:200]) + "…"
		}
		return s
	}
	return ""
}

func (r *runResult) counts() string {
	if r.notRun != "" {
		return "not run (" + r.notRun + ")"
	}
	return fmt.Sprintf("%d pass / %d fail / %d skip", r.pass, r.fail, r.skip)
}

// headline names what went wrong with the run as a whole.
func (r *runResult) headline() string {
	var parts []string
	if r.err != nil {
		parts = append(parts, "error: "+r.err.Error())
	}
	if r.outerTimeout > 0 {
		parts = append(parts, fmt.Sprintf("killed at the outer limit of %s", r.outerTimeout.Round(time.Second)))
	}
	for _, p := range r.timedOutPkgs() {
		parts = append(parts, "package "+p+" hit go test -timeout")
	}
	if len(parts) == 0 {
		return ""
	}
	return " (" + strings.Join(parts, "; ") + ")"
}

func (r *runResult) timedOutPkgs() []string {
	var out []string
	for _, p := range r.pkgs {
		if p.timedOut {
			out = append(out, p.name)
		}
	}
	sort.Strings(out)
	return out
}

// rerunNotes says, per package, how its test binary died and what ran again.
func (r *runResult) rerunNotes() []string {
	var names []string
	for n, p := range r.pkgs {
		if len(p.reruns) > 0 {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	var out []string
	for _, n := range names {
		for _, line := range r.pkgs[n].reruns {
			out = append(out, fmt.Sprintf("package `%s`: %s", n, line))
		}
	}
	return out
}

// excerpt is the first line of a failure's output that says something.
func (t *testResult) excerpt() string {
	if t.outcome == outUnfinished {
		if t.last == "run" || t.last == "cont" {
			return "did not finish: it hung (go test -timeout) or its test binary died while it ran"
		}
		return "never ran: its package's test binary died first"
	}
	var parts []string
	// testify: the message follows "Error:" (after "Error Trace:").
	for i, l := range t.output {
		if msg, ok := strings.CutPrefix(strings.TrimSpace(l), "Error:"); ok {
			parts = append(parts, strings.TrimSpace(msg))
			for _, m := range t.output[i+1:] {
				m = strings.TrimSpace(m)
				if len(parts) == 3 || m == "" || strings.HasPrefix(m, "Test:") || strings.HasPrefix(m, "Messages:") || strings.HasPrefix(m, "---") {
					break
				}
				parts = append(parts, m)
			}
			break
		}
	}
	indent := func(l string) int { return len(l) - len(strings.TrimLeft(l, " \t")) }
	for i, l := range t.output {
		if len(parts) > 0 {
			break
		}
		s := strings.TrimSpace(l)
		if s == "" || strings.HasPrefix(s, "=== ") || strings.HasPrefix(s, "--- ") {
			continue
		}
		parts = append(parts, s)
		// t.Error's continuation lines are indented further.
		for _, m := range t.output[i+1:] {
			if len(parts) == 3 || strings.TrimSpace(m) == "" || indent(m) <= indent(l) {
				break
			}
			parts = append(parts, strings.TrimSpace(m))
		}
	}
	s := strings.Join(parts, " ")
	if r := []rune(s); len(r) > 240 {
		s = string(r[:240]) + "…"
	}
	return s
}

// writeFailures keeps the output of every failure for whoever reads the
// work directory.
func (r *runResult) writeFailures(path string) {
	var b strings.Builder
	for _, t := range r.failures {
		fmt.Fprintf(&b, "=== %s (%s)\n", t.name(), t.outcome)
		for _, l := range t.output {
			fmt.Fprintf(&b, "    %s\n", l)
		}
	}
	for _, p := range r.pkgFailures {
		fmt.Fprintf(&b, "=== package %s failed\n", p.name)
		for _, l := range p.output {
			fmt.Fprintf(&b, "    %s\n", l)
		}
	}
	_ = os.WriteFile(path, []byte(b.String()), 0o644)
}

// --- reasons ----------------------------------------------------------------------

// reason is a documented cause of failures.
type reason struct {
	id, text string
}

// rule attaches a reason to the tests whose name matches re, for a suite
// and modes.
type rule struct {
	suite string   // suite key or "*"
	modes []string // nil = every mode
	re    *regexp.Regexp
	out   *regexp.Regexp // nil, or what the test's output must contain
	r     *reason
	line  int
}

type reasons struct {
	byID  map[string]*reason
	ids   []string
	rules []rule
}

// loadReasons reads reasons.txt (its header documents the format).
func loadReasons(path string) (*reasons, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	rs := &reasons{byID: map[string]*reason{}}
	sc := bufio.NewScanner(f)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fields := strings.Fields(line)
		switch fields[0] {
		case "reason":
			if len(fields) < 3 {
				return nil, fmt.Errorf("%s:%d: want: reason <id> <text>", path, n)
			}
			id := fields[1]
			if rs.byID[id] != nil {
				return nil, fmt.Errorf("%s:%d: reason %s defined twice", path, n, id)
			}
			text := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(strings.TrimPrefix(line, "reason")), id))
			rs.byID[id] = &reason{id: id, text: text}
			rs.ids = append(rs.ids, id)
		case "match":
			if len(fields) < 5 {
				return nil, fmt.Errorf("%s:%d: want: match <suite> <modes> <reason id> <test regexp> [<output regexp>]", path, n)
			}
			rsn := rs.byID[fields[3]]
			if rsn == nil {
				return nil, fmt.Errorf("%s:%d: unknown reason %q (define it above)", path, n, fields[3])
			}
			re, err := regexp.Compile(fields[4])
			if err != nil {
				return nil, fmt.Errorf("%s:%d: %w", path, n, err)
			}
			// The output regexp is the rest of the line (it may hold spaces).
			var out *regexp.Regexp
			if len(fields) > 5 {
				rest := line
				for i := 0; i < 5; i++ {
					rest = strings.TrimSpace(rest)
					rest = rest[strings.IndexAny(rest, " \t"):]
				}
				if out, err = regexp.Compile(strings.TrimSpace(rest)); err != nil {
					return nil, fmt.Errorf("%s:%d: %w", path, n, err)
				}
			}
			var modes []string
			switch fields[2] {
			case "*":
			case "proxy":
				modes = []string{modeSession, modeTransaction}
			default:
				for _, m := range strings.Split(fields[2], ",") {
					if !contains(allModes, m) {
						return nil, fmt.Errorf("%s:%d: unknown mode %q", path, n, m)
					}
					modes = append(modes, m)
				}
			}
			rs.rules = append(rs.rules, rule{suite: fields[1], modes: modes, re: re, out: out, r: rsn, line: n})
		default:
			return nil, fmt.Errorf("%s:%d: a line starts with reason, match or #", path, n)
		}
	}
	return rs, sc.Err()
}

func (rs *reasons) find(suiteKey, mode string, t *testResult) *reason {
	name := t.name()
	for _, ru := range rs.rules {
		if ru.suite != "*" && ru.suite != suiteKey {
			continue
		}
		if ru.modes != nil && !contains(ru.modes, mode) {
			continue
		}
		if !ru.re.MatchString(name) {
			continue
		}
		if ru.out != nil && !ru.out.MatchString(strings.Join(t.output, "\n")) {
			continue
		}
		return ru.r
	}
	return nil
}

// inherited is the reason of a test that failed only because subtests
// failed, all for documented reasons.
var inherited = &reason{id: "subtests", text: "failed because of its failing subtests, each listed under its own reason"}

// classify attaches a reason to every failure of the run.
func (r *runResult) classify(rs *reasons) {
	for _, t := range r.failures {
		t.reason = rs.find(r.suite.key, r.mode, t)
	}
	// A parent without a rule of its own whose failing subtests are all
	// documented fails because of them (deepest parents first).
	for changed := true; changed; {
		changed = false
		for _, t := range r.failures {
			if t.reason != nil || t.outcome == outUnfinished {
				continue
			}
			prefix := t.test + "/"
			subs, documented := 0, true
			for _, u := range r.failures {
				if u.pkg == t.pkg && strings.HasPrefix(u.test, prefix) {
					subs++
					if u.reason == nil {
						documented = false
					}
				}
			}
			if subs > 0 && documented {
				t.reason = inherited
				changed = true
			}
		}
	}
}

// --- the report ------------------------------------------------------------------

type report struct {
	mu             sync.Mutex
	started        time.Time
	elapsed        time.Duration
	suites         []*suite
	modes          []string
	reasons        *reasons
	runs           []*runResult
	notes          map[string][]string
	pgVersion      string
	cascataVersion string
	partial        bool
}

func (rep *report) add(r *runResult) {
	if r.notRun == "" {
		r.classify(rep.reasons)
	}
	rep.mu.Lock()
	defer rep.mu.Unlock()
	rep.runs = append(rep.runs, r)
	// In the order of the table: by mode, then suite.
	index := func(r *runResult) int {
		i := 0
		for j, m := range rep.modes {
			if m == r.mode {
				i = j * 100
			}
		}
		for j, s := range rep.suites {
			if s.key == r.suite.key {
				i += j
			}
		}
		return i
	}
	sort.SliceStable(rep.runs, func(i, j int) bool { return index(rep.runs[i]) < index(rep.runs[j]) })
}

func (rep *report) note(mode, text string) {
	rep.mu.Lock()
	defer rep.mu.Unlock()
	if rep.notes == nil {
		rep.notes = map[string][]string{}
	}
	rep.notes[mode] = append(rep.notes[mode], text)
}

func (rep *report) run(s *suite, mode string) *runResult {
	for _, r := range rep.runs {
		if r.suite.key == s.key && r.mode == mode {
			return r
		}
	}
	return nil
}

func (rep *report) undocumented() int {
	n := 0
	for _, r := range rep.runs {
		for _, t := range r.failures {
			if t.reason == nil {
				n++
			}
		}
		n += len(r.pkgFailures)
		if r.err != nil {
			n++
		}
	}
	return n
}

func modeTitle(m string) string {
	switch m {
	case modeSession:
		return "cascata, session mode"
	case modeTransaction:
		return "cascata, transaction mode"
	}
	return "direct"
}

func thousands(n int) string {
	s := fmt.Sprint(n)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

func (r *runResult) cell() string {
	if r == nil {
		return "—"
	}
	if r.notRun != "" {
		return "not run"
	}
	s := fmt.Sprintf("%s / %s / %s", thousands(r.pass), thousands(r.fail), thousands(r.skip))
	if r.outerTimeout > 0 || len(r.timedOutPkgs()) > 0 {
		s += " ⏱"
	}
	return s
}

// table is the markdown table of pass / fail / skip.
func (rep *report) table() string {
	var b strings.Builder
	b.WriteString("| suite (tests and subtests: pass / fail / skip) |")
	for _, m := range rep.modes {
		b.WriteString(" " + modeTitle(m) + " |")
	}
	b.WriteString("\n|---|")
	for range rep.modes {
		b.WriteString("---:|")
	}
	b.WriteString("\n")
	for _, s := range rep.suites {
		fmt.Fprintf(&b, "| %s %s |", s.title, s.version)
		for _, m := range rep.modes {
			b.WriteString(" " + rep.run(s, m).cell() + " |")
		}
		b.WriteString("\n")
	}
	for _, s := range rep.suites {
		fmt.Fprintf(&b, "| %s, top-level tests only |", s.title)
		for _, m := range rep.modes {
			r := rep.run(s, m)
			if r == nil || r.notRun != "" {
				b.WriteString(" — |")
				continue
			}
			fmt.Fprintf(&b, " %s / %s / %s |", thousands(r.topPass), thousands(r.topFail), thousands(r.topSkip))
		}
		b.WriteString("\n")
	}
	return b.String()
}

func (rep *report) summary() string {
	var b strings.Builder
	b.WriteString(rep.table())
	fmt.Fprintf(&b, "\nundocumented failures: %d; total %s\n", rep.undocumented(), rep.elapsed.Round(time.Second))
	return b.String()
}

func (rep *report) markdown() string {
	var b strings.Builder
	b.WriteString("# Drivers' own test suites through cascata\n\n")
	b.WriteString("Written by `make compat-suites` (scripts/compat-suites): each suite's own tests, fetched from\n")
	b.WriteString("the Go module proxy at the pinned version, run directly against PostgreSQL and through\n")
	b.WriteString("cascata in session and transaction mode, every package under `go test -timeout 300s`.\n")
	b.WriteString("Through cascata the suite's roles are the project's roles and every password is a JWT\n")
	b.WriteString("minted for that role; the strings pgx needs the server itself for (its unix socket, its\n")
	b.WriteString("TLS) are unset. Failures are listed under the reason documented in\n")
	b.WriteString("`scripts/compat-suites/reasons.txt`, or as **undocumented (defect)**. Each mode has throw-away\n")
	b.WriteString("clusters of its own; transaction mode runs beside the other two.\n\n")
	if rep.partial {
		b.WriteString("**A partial run** (a subset of suites, modes or tests).\n\n")
	}
	fmt.Fprintf(&b, "Run %s UTC, %s total; PostgreSQL %s; cascata %s.\n\n",
		rep.started.UTC().Format("2006-01-02 15:04"), rep.elapsed.Round(time.Second), rep.pgVersion, rep.cascataVersion)
	b.WriteString(rep.table())
	b.WriteString("\n⏱ = a test hung: its package hit `go test -timeout` (or the run its outer limit); the tests the\n")
	b.WriteString("package had not finished ran again without it (see Runs).\n")

	b.WriteString("\n## Runs\n\n| suite | mode | time | undocumented | notes |\n|---|---|---:|---:|---|\n")
	for _, r := range rep.runs {
		und := 0
		for _, t := range r.failures {
			if t.reason == nil {
				und++
			}
		}
		und += len(r.pkgFailures)
		notes := strings.TrimPrefix(strings.TrimSuffix(r.headline(), ")"), " (")
		if r.notRun != "" {
			notes = "not run: " + r.notRun
		}
		fmt.Fprintf(&b, "| %s | %s | %.0fs | %d | %s |\n", r.suite.title, r.mode, r.elapsed.Seconds(), und, notes)
	}
	b.WriteString("\n")
	for _, r := range rep.runs {
		for _, line := range r.rerunNotes() {
			fmt.Fprintf(&b, "- %s, %s: %s\n", r.suite.title, r.mode, line)
		}
	}
	for _, m := range rep.modes {
		for _, n := range rep.notes[m] {
			fmt.Fprintf(&b, "- %s: %s\n", m, n)
		}
	}

	b.WriteString("\n## Failures\n")
	for _, r := range rep.runs {
		if r.notRun != "" || (len(r.failures) == 0 && len(r.pkgFailures) == 0 && r.err == nil) {
			continue
		}
		fmt.Fprintf(&b, "\n### %s, %s (%d failing)\n", r.suite.title, modeTitle(r.mode), len(r.failures)+len(r.pkgFailures))
		if r.err != nil {
			fmt.Fprintf(&b, "\nThe run failed: `%s`\n", strings.ReplaceAll(firstLine(r.err.Error()), "`", "'"))
		}
		groups := map[*reason][]*testResult{}
		var order []*reason
		var undoc []*testResult
		for _, t := range r.failures {
			if t.reason == nil {
				undoc = append(undoc, t)
				continue
			}
			if groups[t.reason] == nil {
				order = append(order, t.reason)
			}
			groups[t.reason] = append(groups[t.reason], t)
		}
		if len(undoc) > 0 || len(r.pkgFailures) > 0 {
			fmt.Fprintf(&b, "\n**undocumented (defect)** (%d)\n\n", len(undoc)+len(r.pkgFailures))
			for _, p := range r.pkgFailures {
				what := "package failed without a failing test"
				if p.mainFailed {
					what = "its test binary failed after its tests passed (TestMain)"
				} else if p.timedOut {
					what = "package timed out"
				}
				fmt.Fprintf(&b, "- `%s` (%s)", p.name, what)
				if e := p.mainExcerpt(); e != "" {
					fmt.Fprintf(&b, " — `%s`", strings.ReplaceAll(e, "`", "'"))
				}
				b.WriteString("\n")
			}
			for _, t := range undoc {
				fmt.Fprintf(&b, "- `%s`", t.name())
				if e := t.excerpt(); e != "" {
					fmt.Fprintf(&b, " — `%s`", strings.ReplaceAll(e, "`", "'"))
				}
				b.WriteString("\n")
			}
		}
		sort.SliceStable(order, func(i, j int) bool { return order[i] != inherited && order[j] == inherited })
		for _, rs := range order {
			fmt.Fprintf(&b, "\n**%s**: %s (%d)\n\n", rs.id, rs.text, len(groups[rs]))
			for _, t := range groups[rs] {
				fmt.Fprintf(&b, "- `%s`\n", t.name())
			}
		}
	}
	return b.String()
}

// --- what a run leaves for -from-logs ----------------------------------------------

// reportMeta is what the go test logs do not hold: times, notes, versions.
type reportMeta struct {
	Started   time.Time           `json:"started"`
	ElapsedMS int64               `json:"elapsed_ms"`
	PG        string              `json:"postgres"`
	Cascata   string              `json:"cascata"`
	Partial   bool                `json:"partial"`
	Notes     map[string][]string `json:"notes"`
	Runs      []runMeta           `json:"runs"`
}

type runMeta struct {
	Suite          string              `json:"suite"`
	Mode           string              `json:"mode"`
	ElapsedMS      int64               `json:"elapsed_ms"`
	NotRun         string              `json:"not_run,omitempty"`
	Err            string              `json:"error,omitempty"`
	OuterTimeoutMS int64               `json:"outer_timeout_ms,omitempty"`
	Reruns         map[string][]string `json:"reruns,omitempty"`
}

func writeMeta(path string, rep *report) error {
	m := reportMeta{Started: rep.started, ElapsedMS: rep.elapsed.Milliseconds(), PG: rep.pgVersion,
		Cascata: rep.cascataVersion, Partial: rep.partial, Notes: rep.notes}
	for _, r := range rep.runs {
		rm := runMeta{Suite: r.suite.key, Mode: r.mode, ElapsedMS: r.elapsed.Milliseconds(), NotRun: r.notRun,
			OuterTimeoutMS: r.outerTimeout.Milliseconds(), Reruns: map[string][]string{}}
		if r.err != nil {
			rm.Err = r.err.Error()
		}
		for n, p := range r.pkgs {
			if len(p.reruns) > 0 {
				rm.Reruns[n] = p.reruns
			}
		}
		m.Runs = append(m.Runs, rm)
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

// readMeta reads report.json; nil without one.
func readMeta(path string) (*reportMeta, error) {
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var m reportMeta
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &m, nil
}

func (m *reportMeta) run(suite, mode string) *runMeta {
	if m == nil {
		return nil
	}
	for i := range m.Runs {
		if m.Runs[i].Suite == suite && m.Runs[i].Mode == mode {
			return &m.Runs[i]
		}
	}
	return nil
}

func (m *reportMeta) apply(rep *report) {
	rep.started, rep.elapsed = m.Started, time.Duration(m.ElapsedMS)*time.Millisecond
	rep.pgVersion, rep.cascataVersion, rep.partial = m.PG, m.Cascata, m.Partial || rep.partial
	rep.notes = m.Notes
}

func (m *runMeta) apply(r *runResult) {
	r.elapsed = time.Duration(m.ElapsedMS) * time.Millisecond
	r.outerTimeout = time.Duration(m.OuterTimeoutMS) * time.Millisecond
	if m.Err != "" {
		r.err = errors.New(m.Err)
	}
	for n, lines := range m.Reruns {
		if p := r.pkgs[n]; p != nil {
			p.reruns = lines
		}
	}
}
