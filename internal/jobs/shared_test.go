package jobs_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"cascata/internal/fleet"
	"cascata/internal/jobs"
	"cascata/internal/pgtest"

	"github.com/jackc/pgx/v5/pgxpool"
)

// instanceTimeout is long against a test: an instance's job is swept only
// when a test ages its heartbeat.
const instanceTimeout = time.Minute

var dbSeq atomic.Int32

// controlDB creates an empty control database for one test and returns its
// name and URL.
func controlDB(t *testing.T) (name, url string) {
	t.Helper()
	name = fmt.Sprintf("jobs_control_%d", dbSeq.Add(1))
	pgtest.Exec(t, cluster.Primary.SuperuserURL("postgres"), "CREATE DATABASE "+name)
	return name, cluster.Primary.SuperuserURL(name)
}

// openPool is one instance's connection pool to the control database.
func openPool(t *testing.T, url string) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.New(t.Context(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// addInstances registers live instances as their heartbeat loop would.
func addInstances(t *testing.T, pool *pgxpool.Pool, ids ...string) {
	t.Helper()
	if err := fleet.Migrate(t.Context(), pool); err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		if _, err := pool.Exec(t.Context(), `INSERT INTO cascata_control.instances (id) VALUES ($1)`, id); err != nil {
			t.Fatal(err)
		}
	}
}

func sharedOptions(t *testing.T, pool *pgxpool.Pool, id, dir string) jobs.Options {
	return jobs.Options{
		Dir:    dir,
		Logger: slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})).With("instance", id),
		Shared: &jobs.SharedOptions{Pool: pool, InstanceID: id, InstanceTimeout: instanceTimeout, SweepInterval: 50 * time.Millisecond},
	}
}

// sharedRunner is instance id's runner on pool, with its own directory,
// closed when the test ends.
func sharedRunner(t *testing.T, pool *pgxpool.Pool, id string) (*jobs.Runner, string) {
	t.Helper()
	dir := t.TempDir()
	r, err := jobs.New(sharedOptions(t, pool, id, dir))
	if err != nil {
		t.Fatal(err)
	}
	closeAtEnd(t, r)
	return r, dir
}

// pair is two live instances, a and b, on one new control database.
type pair struct {
	name, url  string
	a, b       *jobs.Runner
	dirA, dirB string
}

func newPair(t *testing.T) pair {
	t.Helper()
	var p pair
	p.name, p.url = controlDB(t)
	poolA, poolB := openPool(t, p.url), openPool(t, p.url)
	addInstances(t, poolA, "a", "b")
	p.a, p.dirA = sharedRunner(t, poolA, "a")
	p.b, p.dirB = sharedRunner(t, poolB, "b")
	return p
}

// released waits for release; a runner closing first is the job's error.
func released(ctx context.Context, release <-chan struct{}) error {
	select {
	case <-release:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// syncForever is a job that stays in phase initial_sync until cancelled.
func syncForever(ctx context.Context, j *jobs.Job) error {
	j.SetPhase("initial_sync")
	<-ctx.Done()
	return ctx.Err()
}

// crash stops an instance the way a dead process does: its pool is gone
// before it could write how its jobs ended.
func crash(t *testing.T, r *jobs.Runner, pool *pgxpool.Pool) {
	t.Helper()
	pool.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := r.Close(ctx); err == nil {
		t.Fatal("close wrote the jobs' final states without a control database")
	}
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, detail := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 20s; last: %s", what, detail)
		}
		<-tick.C
	}
}

// seenIn waits until r reports job id in state, in phase when not "".
func seenIn(t *testing.T, r *jobs.Runner, id string, state jobs.State, phase string) jobs.Status {
	t.Helper()
	var got jobs.Status
	eventually(t, fmt.Sprintf("job %s %s in phase %q", id, state, phase), func() (bool, string) {
		var err error
		got, err = r.Get(id)
		return err == nil && got.State == state && (phase == "" || got.Phase == phase), fmt.Sprintf("%+v %v", got, err)
	})
	return got
}

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func hasLine(st jobs.Status, msg string) bool {
	for _, l := range st.Log {
		if l.Message == msg {
			return true
		}
	}
	return false
}

// readResult reads a job's result file through r.
func readResult(t *testing.T, r *jobs.Runner, id string) (data []byte, path, name string) {
	t.Helper()
	path, name, err := r.Result(id)
	if err != nil {
		t.Fatal(err)
	}
	data, err = os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data, path, name
}

// A job started on instance a is seen, waited for and served by instance b,
// and its project is busy on b while it runs.
func TestSharedJobSeenAndServedByAnotherInstance(t *testing.T) {
	p := newPair(t)
	a, b := p.a, p.b

	payload := randomBytes(t, 300<<10)
	release := make(chan struct{})
	st, err := a.Start("archive", "p1", func(ctx context.Context, j *jobs.Job) error {
		j.SetPhase("dump")
		j.SetProgress(0.5)
		j.Logf("copied %d tables", 3)
		if err := os.WriteFile(j.ResultFile("p1.caf"), payload, 0o600); err != nil {
			return err
		}
		return released(ctx, release)
	})
	if err != nil {
		t.Fatal(err)
	}
	seenIn(t, b, st.ID, jobs.Running, "dump")
	listed := false
	for _, l := range b.List() {
		listed = listed || l.ID == st.ID
	}
	if !listed {
		t.Fatalf("b's list lacks a's job: %+v", b.List())
	}
	if act, ok := b.ActiveFor("p1"); !ok || act.ID != st.ID {
		t.Fatalf("b's active job of p1: %+v %v", act, ok)
	}
	if _, _, err := b.Result(st.ID); !errors.Is(err, jobs.ErrNoResult) {
		t.Fatalf("result of a running job: %v", err)
	}
	if _, err := b.Start("eject", "p1", func(context.Context, *jobs.Job) error { return nil }); !errors.Is(err, jobs.ErrBusy) {
		t.Fatalf("b starting a job of p1 while a runs one: %v", err)
	}

	close(release)
	got := wait(t, b, st.ID)
	if got.State != jobs.Succeeded || got.Progress != 1 || got.Phase != "dump" || !got.HasResult || got.ResultName != "p1.caf" || !hasLine(got, "copied 3 tables") {
		t.Fatalf("b's view of the finished job: %+v", got)
	}
	data, path, name := readResult(t, b, st.ID)
	if !bytes.Equal(data, payload) || name != "p1.caf" {
		t.Fatalf("b served %d bytes named %q, want a's %d bytes", len(data), name, len(payload))
	}
	if filepath.Dir(path) != p.dirB {
		t.Fatalf("b served %s, not a copy in its own directory %s", path, p.dirB)
	}
	if again, _, _ := readResult(t, b, st.ID); !bytes.Equal(again, payload) {
		t.Fatal("b's second read of the result differs")
	}
	if data, _, _ := readResult(t, a, st.ID); !bytes.Equal(data, payload) {
		t.Fatal("a's own result differs")
	}

	// The project is free again, on either instance; b runs what it starts.
	st2, err := b.Start("eject", "p1", func(context.Context, *jobs.Job) error { return errors.New("target unreachable") })
	if err != nil {
		t.Fatal(err)
	}
	if got := wait(t, a, st2.ID); got.State != jobs.Failed || got.Error != "target unreachable" {
		t.Fatalf("a's view of b's job: %+v", got)
	}
	if _, _, err := a.Result(st2.ID); !errors.Is(err, jobs.ErrNoResult) {
		t.Fatalf("result of a failed job: %v", err)
	}
	if _, err := a.Get("nope"); !errors.Is(err, jobs.ErrNotFound) {
		t.Fatal(err)
	}
}

// Two instances starting a job of the same project at the same moment:
// exactly one gets it.
func TestSharedProjectClaimedOnce(t *testing.T) {
	p := newPair(t)
	release := make(chan struct{})
	defer close(release)
	hold := func(ctx context.Context, j *jobs.Job) error { return released(ctx, release) }
	for i := range 10 {
		project := fmt.Sprintf("race%d", i)
		go1 := make(chan struct{})
		errs := make(chan error, 2)
		for _, r := range []*jobs.Runner{p.a, p.b} {
			go func() {
				<-go1
				_, err := r.Start("eject", project, hold)
				errs <- err
			}()
		}
		close(go1)
		ok, busy := 0, 0
		for range 2 {
			switch err := <-errs; {
			case err == nil:
				ok++
			case errors.Is(err, jobs.ErrBusy):
				busy++
			default:
				t.Fatalf("start %s: %v", project, err)
			}
		}
		if ok != 1 || busy != 1 {
			t.Fatalf("%s: %d started, %d busy; want one of each", project, ok, busy)
		}
	}
}

// An instance that stops (late heartbeat, or its row says stopped) while
// it runs a job: another instance marks the job failed and the project free.
func TestSharedStoppedOwnerJobFails(t *testing.T) {
	for _, tc := range []struct {
		name, stop string
	}{
		{"heartbeat late", `UPDATE cascata_control.instances SET heartbeat = now() - interval '2 minutes' WHERE id = 'a'`},
		{"stopped", `UPDATE cascata_control.instances SET stopped = true WHERE id = 'a'`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, url := controlDB(t)
			poolA, poolB := openPool(t, url), openPool(t, url)
			addInstances(t, poolB, "a", "b")
			a, err := jobs.New(sharedOptions(t, poolA, "a", t.TempDir()))
			if err != nil {
				t.Fatal(err)
			}
			b, _ := sharedRunner(t, poolB, "b")
			st, err := a.Start("eject", "p", syncForever)
			if err != nil {
				t.Fatal(err)
			}
			seenIn(t, b, st.ID, jobs.Running, "initial_sync")
			crash(t, a, poolA)
			if got, err := b.Get(st.ID); err != nil || got.State != jobs.Running {
				t.Fatalf("a live instance's job, as b sees it: %+v %v", got, err)
			}

			pgtest.Exec(t, url, tc.stop)
			got := seenIn(t, b, st.ID, jobs.Failed, "initial_sync")
			want := "instance a stopped while the job ran (no heartbeat for 1m0s)"
			if got.Error != want || !hasLine(got, want) || got.Finished.IsZero() {
				t.Fatalf("swept job: %+v; want error %q", got, want)
			}
			if act, ok := b.ActiveFor("p"); ok {
				t.Fatalf("p still has an active job: %+v", act)
			}
			st2, err := b.Start("eject", "p", func(context.Context, *jobs.Job) error { return nil })
			if err != nil {
				t.Fatalf("p after its job was swept: %v", err)
			}
			if got := wait(t, b, st2.ID); got.State != jobs.Succeeded {
				t.Fatalf("%+v", got)
			}
		})
	}
}

// An instance whose heartbeat was late but which goes on and finishes the
// job: its final state replaces the failure another instance recorded, and
// the log tells both.
func TestSharedLateOwnerFinishReplacesSweep(t *testing.T) {
	p := newPair(t)
	a, b := p.a, p.b
	release := make(chan struct{})
	st, err := a.Start("eject", "p", func(ctx context.Context, j *jobs.Job) error {
		j.SetPhase("initial_sync")
		if err := released(ctx, release); err != nil {
			return err
		}
		j.SetPhase("cutover")
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	seenIn(t, b, st.ID, jobs.Running, "initial_sync")
	pgtest.Exec(t, p.url, `UPDATE cascata_control.instances SET heartbeat = now() - interval '2 minutes' WHERE id = 'a'`)
	swept := seenIn(t, b, st.ID, jobs.Failed, "")
	close(release)
	got := seenIn(t, b, st.ID, jobs.Succeeded, "cutover")
	note := "finished on instance a after it had been marked failed: " + swept.Error
	if got.Error != "" || !hasLine(got, note) {
		t.Fatalf("late final state: %+v; want log line %q", got, note)
	}
}

// The next process of an instance marks failed the jobs its previous
// process left queued or running.
func TestSharedRestartFailsOwnLeftovers(t *testing.T) {
	_, url := controlDB(t)
	pool1 := openPool(t, url)
	addInstances(t, pool1, "a")
	opts := sharedOptions(t, pool1, "a", t.TempDir())
	opts.Concurrency = 1
	r1, err := jobs.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	st, err := r1.Start("eject", "p", syncForever)
	if err != nil {
		t.Fatal(err)
	}
	// Running first, so that the next job waits for its slot (each job
	// takes the slot on a goroutine of its own, in no set order).
	eventually(t, "the running job's phase in the control database", func() (bool, string) {
		phase := pgtest.QueryValue(t, url, `SELECT phase FROM cascata_control.jobs WHERE id = $1`, st.ID)
		return phase == "initial_sync", phase
	})
	queued, err := r1.Start("archive", "q", func(context.Context, *jobs.Job) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	crash(t, r1, pool1)

	r2, _ := sharedRunner(t, openPool(t, url), "a")
	for id, want := range map[string]string{
		st.ID:     `interrupted: cascata stopped while the job was running (phase "initial_sync")`,
		queued.ID: `interrupted: cascata stopped while the job was queued (phase "queued")`,
	} {
		got, err := r2.Get(id)
		if err != nil || got.State != jobs.Failed || got.Error != want {
			t.Fatalf("after restart: %+v %v; want error %q", got, err, want)
		}
	}
}

// The control database goes away while a job runs: the job is not held up,
// its final state waits in memory, and Close writes it once the database
// answers again.
func TestSharedControlDatabaseOutage(t *testing.T) {
	p := newPair(t)
	a, b := p.a, p.b
	super := cluster.Primary.SuperuserURL("postgres")

	payload := randomBytes(t, 5<<19) // several result chunks
	release := make(chan struct{})
	returned := make(chan struct{})
	st, err := a.Start("archive", "p", func(ctx context.Context, j *jobs.Job) error {
		defer close(returned)
		j.SetPhase("dump")
		if err := released(ctx, release); err != nil {
			return err
		}
		j.SetPhase("write")
		j.Logf("written while the control database was away")
		j.SetProgress(0.9)
		return os.WriteFile(j.ResultFile("p.caf"), payload, 0o600)
	})
	if err != nil {
		t.Fatal(err)
	}
	seenIn(t, b, st.ID, jobs.Running, "dump")

	pgtest.Exec(t, super, "ALTER DATABASE "+p.name+" ALLOW_CONNECTIONS false")
	// Back before the runners close at the end, also when the test fails
	// midway (cleanups run last registered first).
	t.Cleanup(func() { pgtest.Exec(t, super, "ALTER DATABASE "+p.name+" ALLOW_CONNECTIONS true") })
	pgtest.Exec(t, super, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", p.name)
	eventually(t, "the control database refuses b", func() (bool, string) {
		got, err := b.Get(st.ID)
		return err != nil, fmt.Sprintf("%+v", got)
	})

	close(release)
	select {
	case <-returned:
	case <-time.After(10 * time.Second):
		t.Fatal("the job stalled while its control database was away")
	}
	// The function has returned; the runner records its end right after.
	var got jobs.Status
	eventually(t, "a's own view to show the job done during the outage", func() (bool, string) {
		var err error
		got, err = a.Get(st.ID)
		return err == nil && got.State == jobs.Succeeded, fmt.Sprintf("%+v %v", got, err)
	})
	if !got.HasResult || !hasLine(got, "written while the control database was away") {
		t.Fatalf("a's own view during the outage: %+v", got)
	}
	if data, _, _ := readResult(t, a, st.ID); !bytes.Equal(data, payload) {
		t.Fatal("a's own result differs during the outage")
	}

	closed := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		closed <- a.Close(ctx)
	}()
	select {
	case err := <-closed:
		t.Fatalf("close returned while the final state could not be written: %v", err)
	default:
	}
	pgtest.Exec(t, super, "ALTER DATABASE "+p.name+" ALLOW_CONNECTIONS true")
	select {
	case err := <-closed:
		if err != nil {
			t.Fatalf("close after the database came back: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("close did not write the final state after the database came back")
	}

	got = wait(t, b, st.ID)
	if got.State != jobs.Succeeded || got.Phase != "write" || got.Progress != 1 || !got.HasResult || !hasLine(got, "written while the control database was away") {
		t.Fatalf("b's view after the outage: %+v", got)
	}
	if data, _, _ := readResult(t, b, st.ID); !bytes.Equal(data, payload) {
		t.Fatal("b's copy of the result differs")
	}
}

// Instances starting at the same moment on an empty control database all
// migrate it without error.
func TestSharedConcurrentMigration(t *testing.T) {
	_, url := controlDB(t)
	const n = 4
	pools := make([]*pgxpool.Pool, n)
	for i := range pools {
		pools[i] = openPool(t, url)
	}
	type opened struct {
		r   *jobs.Runner
		err error
	}
	start := make(chan struct{})
	out := make(chan opened, n)
	for i, pool := range pools {
		opts := sharedOptions(t, pool, fmt.Sprintf("i%d", i), t.TempDir())
		go func() {
			<-start
			r, err := jobs.New(opts)
			out <- opened{r, err}
		}()
	}
	close(start)
	for range n {
		o := <-out
		if o.err != nil {
			t.Errorf("new runner on an empty control database: %v", o.err)
			continue
		}
		closeAtEnd(t, o.r)
	}
	if v := pgtest.QueryValue(t, url, `SELECT max(version) FROM cascata_control.migrations WHERE component = 'jobs'`); v != "1" {
		t.Fatalf("jobs migrated to version %q", v)
	}
}
