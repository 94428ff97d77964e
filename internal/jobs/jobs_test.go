package jobs_test

import (
	"context"
	"errors"
	"os"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"cascata/internal/jobs"
)

func newRunner(t *testing.T, dir string, conc int) *jobs.Runner {
	t.Helper()
	r, err := jobs.New(jobs.Options{Dir: dir, Concurrency: conc})
	if err != nil {
		t.Fatal(err)
	}
	closeAtEnd(t, r)
	return r
}

// closeAtEnd closes r when the test ends; its jobs must end by then.
func closeAtEnd(t *testing.T, r *jobs.Runner) {
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := r.Close(ctx); err != nil {
			t.Error(err)
		}
	})
}

func wait(t *testing.T, r *jobs.Runner, id string) jobs.Status {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := r.Wait(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func TestLifecycleAndResult(t *testing.T) {
	r := newRunner(t, t.TempDir(), 2)
	st, err := r.Start("export", "p1", func(ctx context.Context, j *jobs.Job) error {
		j.SetPhase("dump")
		j.SetProgress(0.5)
		j.Logf("copied %d tables", 3)
		return os.WriteFile(j.ResultFile("p1.caf"), []byte("archive"), 0o600)
	})
	if err != nil {
		t.Fatal(err)
	}
	if st.State != jobs.Queued && st.State != jobs.Running {
		t.Fatalf("initial state %s", st.State)
	}
	st = wait(t, r, st.ID)
	if st.State != jobs.Succeeded || st.Progress != 1 || st.Phase != "dump" || !st.HasResult {
		t.Fatalf("status: %+v", st)
	}
	found := false
	for _, l := range st.Log {
		found = found || l.Message == "copied 3 tables"
	}
	if !found {
		t.Fatalf("log: %+v", st.Log)
	}
	path, name, err := r.Result(st.ID)
	if err != nil || name != "p1.caf" {
		t.Fatal(path, name, err)
	}
	if b, _ := os.ReadFile(path); string(b) != "archive" {
		t.Fatalf("result %q", b)
	}

	st2, _ := r.Start("eject", "p1", func(ctx context.Context, j *jobs.Job) error { return errors.New("target unreachable") })
	st2 = wait(t, r, st2.ID)
	if st2.State != jobs.Failed || st2.Error != "target unreachable" {
		t.Fatalf("failed job: %+v", st2)
	}
	if _, _, err := r.Result(st2.ID); !errors.Is(err, jobs.ErrNoResult) {
		t.Fatalf("result of failed job: %v", err)
	}
	if _, err := r.Get("nope"); !errors.Is(err, jobs.ErrNotFound) {
		t.Fatal(err)
	}
	if len(r.List()) != 2 {
		t.Fatal(r.List())
	}
}

func TestConcurrencyBoundAndProjectBusy(t *testing.T) {
	r := newRunner(t, t.TempDir(), 2)
	var running, peak atomic.Int32
	release := make(chan struct{})
	var ids []string
	for _, p := range []string{"a", "b", "c", "d"} {
		st, err := r.Start("eject", p, func(ctx context.Context, j *jobs.Job) error {
			n := running.Add(1)
			for {
				old := peak.Load()
				if n <= old || peak.CompareAndSwap(old, n) {
					break
				}
			}
			defer running.Add(-1)
			select {
			case <-release:
			case <-ctx.Done():
				return ctx.Err()
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, st.ID)
	}
	if _, err := r.Start("eject", "a", func(context.Context, *jobs.Job) error { return nil }); !errors.Is(err, jobs.ErrBusy) {
		t.Fatalf("second job of a project: %v", err)
	}
	if st, ok := r.ActiveFor("a"); !ok || st.ID != ids[0] {
		t.Fatalf("active: %+v %v", st, ok)
	}
	eventually(t, "two jobs running", func() (bool, string) {
		n := running.Load()
		return n == 2, strconv.Itoa(int(n))
	})
	queued := 0
	for _, id := range ids {
		if st, _ := r.Get(id); st.State == jobs.Queued {
			queued++
		}
	}
	if queued != 2 {
		t.Fatalf("%d queued, want 2", queued)
	}
	close(release)
	for _, id := range ids {
		if st := wait(t, r, id); st.State != jobs.Succeeded {
			t.Fatalf("%+v", st)
		}
	}
	if peak.Load() != 2 {
		t.Fatalf("peak concurrency %d, want 2", peak.Load())
	}
}

// A job running when the process dies is reported failed by the next one.
func TestInterruptedJobFailsOnRestart(t *testing.T) {
	dir := t.TempDir()
	r1 := newRunner(t, dir, 1)
	started := make(chan struct{})
	st, err := r1.Start("eject", "p", func(ctx context.Context, j *jobs.Job) error {
		j.SetPhase("initial_sync")
		close(started)
		<-ctx.Done()
		return ctx.Err()
	})
	if err != nil {
		t.Fatal(err)
	}
	<-started
	queued, err := r1.Start("export", "q", func(context.Context, *jobs.Job) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	// A second runner on the same directory is what a restart sees
	// (the first one never got to finish its jobs).
	r2 := newRunner(t, dir, 1)
	for _, id := range []string{st.ID, queued.ID} {
		got, err := r2.Get(id)
		if err != nil {
			t.Fatal(err)
		}
		if got.State != jobs.Failed || got.Error == "" {
			t.Fatalf("after restart: %+v", got)
		}
	}
	got, _ := r2.Get(st.ID)
	if got.Phase != "initial_sync" {
		t.Fatalf("phase lost: %+v", got)
	}
}
