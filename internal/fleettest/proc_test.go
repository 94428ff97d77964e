package fleettest

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// proc is a child process the test owns, its output appended to a log file.
type proc struct {
	name    string
	logPath string
	cmd     *exec.Cmd
	done    chan struct{} // closed when the process has exited
}

// startProc starts bin with args and extra environment; it does not wait
// for the program to serve.
func startProc(t testing.TB, name, logPath string, env []string, bin string, args ...string) *proc {
	t.Helper()
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(logf, "--- fleettest: start %s at %s\n", name, time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// A test binary that dies must not leave its children serving.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	p := &proc{name: name, logPath: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	return p
}

// running reports whether the process has not exited yet.
func (p *proc) running() bool {
	if p == nil {
		return false
	}
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// terminate sends SIGTERM and waits for the exit, SIGKILL after grace
// (reported as an error). It returns how long the exit took.
func (p *proc) terminate(t testing.TB, grace time.Duration) time.Duration {
	if !p.running() {
		return 0
	}
	start := time.Now()
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		t.Errorf("%s did not exit within %v of SIGTERM; killed", p.name, grace)
		p.kill()
	}
	return time.Since(start)
}

// kill sends SIGKILL and waits for the exit.
func (p *proc) kill() {
	if !p.running() {
		return
	}
	_ = p.cmd.Process.Kill()
	<-p.done
}

// logLines returns the lines of the log file.
func (p *proc) logLines() []string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return []string{err.Error()}
	}
	return strings.Split(strings.TrimRight(string(b), "\n"), "\n")
}

// logTail is the last n lines of the log file.
func (p *proc) logTail(n int) string {
	lines := p.logLines()
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// group is goroutines that run until stopped, the test's end at the latest.
type group struct {
	stop chan struct{}
	once sync.Once
	wg   sync.WaitGroup
}

func newGroup(t testing.TB) *group {
	g := &group{stop: make(chan struct{})}
	t.Cleanup(g.finish)
	return g
}

// goRun runs fn in a new goroutine of the group.
func (g *group) goRun(fn func()) {
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		fn()
	}()
}

func (g *group) stopped() bool {
	select {
	case <-g.stop:
		return true
	default:
		return false
	}
}

// pause waits d, or less when the group is stopped meanwhile.
func (g *group) pause(d time.Duration) {
	select {
	case <-g.stop:
	case <-time.After(d):
	}
}

// finish stops the goroutines and waits for them.
func (g *group) finish() {
	g.once.Do(func() { close(g.stop) })
	g.wg.Wait()
}

// waitMore waits until counter has grown by more than it is now.
func waitMore(t testing.TB, counter *atomic.Int64, more int64, within time.Duration, what string) {
	t.Helper()
	goal := counter.Load() + more
	eventually(t, within, fmt.Sprintf("%d more %s", more, what), func() error {
		if n := counter.Load(); n < goal {
			return fmt.Errorf("%d of %d", n, goal)
		}
		return nil
	})
}
