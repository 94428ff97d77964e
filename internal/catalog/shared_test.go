package catalog_test

import (
	"context"
	"errors"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"cascata/internal/catalog"
	"cascata/internal/config"
	"cascata/internal/controldb"
	"cascata/internal/pgcluster"
	"cascata/internal/pgtest"

	"github.com/jackc/pgx/v5/pgxpool"
)

// ctl is the control database server of the shared catalog's tests.
var ctl *pgcluster.Cluster

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m, pgcluster.Options{}, &ctl)) }

// controlDB creates a fresh database on the control server and returns a
// pool on it, closed at the end of the test.
func controlDB(t *testing.T) (string, *pgxpool.Pool) {
	t.Helper()
	url := pgtest.NewDatabase(t, ctl, "catalog")
	return url, newPool(t, url)
}

func newPool(t *testing.T, url string) *pgxpool.Pool {
	t.Helper()
	pool, err := controldb.Open(context.Background(), url, 4)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// follower records, safely for the follower goroutine, every set put in force.
type follower struct {
	mu   sync.Mutex
	last []config.Project
	n    int
}

func (f *follower) apply(ps []config.Project) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.last = slices.Clone(ps)
	f.n++
	return nil
}

func (f *follower) refs() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]string, 0, len(f.last))
	for _, p := range f.last {
		out = append(out, p.Ref)
	}
	return out
}

func (f *follower) project(ref string) (config.Project, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, p := range f.last {
		if p.Ref == ref {
			return p, true
		}
	}
	return config.Project{}, false
}

// waitFor polls cond until it holds or d passes.

// instance opens a shared catalog with its own state directory and follows
// the control database until the test ends.
func instance(t *testing.T, pool *pgxpool.Pool, dir, text string) (*catalog.Shared, *follower) {
	t.Helper()
	f := &follower{}
	c, err := catalog.OpenShared(context.Background(), catalog.SharedOptions{Pool: pool, Dir: dir, Config: fileConfig(t, text), File: []byte(text), Apply: f.apply, OpTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); c.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return c, f
}

func project(ref string) config.Project {
	return config.Project{Ref: ref, DatabaseURL: "postgres://authenticator:pw@127.0.0.1:5432/" + ref, JWTSecret: secret}
}

func TestSharedChangesReachEveryInstance(t *testing.T) {
	_, pool := controlDB(t)
	a, fa := instance(t, pool, t.TempDir(), twoProjects)
	b, fb := instance(t, pool, t.TempDir(), twoProjects)
	if got := fb.refs(); !slices.Equal(got, []string{"a", "b"}) {
		t.Fatalf("b serves %v, want the file's a and b", got)
	}

	start := time.Now()
	if _, err := a.Add(project("c"), "api"); err != nil {
		t.Fatal(err)
	}
	pgtest.WaitFor(t, time.Second, "a project added on a is served by b", func() bool { return slices.Contains(fb.refs(), "c") })
	t.Logf("added on a, in force on b after %s", time.Since(start).Round(time.Millisecond))
	if e, ok := b.Project("c"); !ok || e.Source != catalog.SourceRuntime || e.Reason != "api" {
		t.Fatalf("b's view of c: %+v %v", e, ok)
	}

	if _, err := b.Change("a", "api", func(p *config.Project) error { p.PoolSize = 7; return nil }); err != nil {
		t.Fatal(err)
	}
	pgtest.WaitFor(t, time.Second, "a change on b is in force on a", func() bool { p, _ := fa.project("a"); return p.PoolSize == 7 })

	if err := a.Remove("b", "api"); err != nil {
		t.Fatal(err)
	}
	pgtest.WaitFor(t, time.Second, "a removal on a is in force on b", func() bool { return !slices.Contains(fb.refs(), "b") })
	if _, err := b.Add(project("c"), "api"); !errors.Is(err, catalog.ErrExists) {
		t.Fatalf("adding c twice across instances: %v, want ErrExists", err)
	}
	if _, err := b.Change("b", "api", func(*config.Project) error { return nil }); !errors.Is(err, catalog.ErrNotFound) {
		t.Fatalf("changing a removed project: %v, want ErrNotFound", err)
	}
}

// The file-versus-run-time rule of the file catalog holds in the shared one:
// a run-time change survives restarts with the same file, the file wins once
// it changes that project, and a refusal in force changes nothing.
func TestSharedSeedRule(t *testing.T) {
	_, pool := controlDB(t)
	dir := t.TempDir()
	a, fa := instance(t, pool, dir, twoProjects)
	if _, err := a.Change("a", "api", func(p *config.Project) error { p.PoolSize = 5; return nil }); err != nil {
		t.Fatal(err)
	}
	if err := a.Remove("b", "api"); err != nil {
		t.Fatal(err)
	}

	_, fb := instance(t, pool, t.TempDir(), twoProjects)
	if p, _ := fb.project("a"); p.PoolSize != 5 || slices.Contains(fb.refs(), "b") {
		t.Fatalf("a restart with the same file lost run-time changes: %v a=%+v", fb.refs(), p)
	}

	edited := twoProjects + "pool_size = 11\n" // changes b, the last table
	c, fc := instance(t, pool, t.TempDir(), edited)
	if got := fc.refs(); !slices.Equal(got, []string{"a", "b"}) {
		t.Fatalf("the file changed b back into existence: serves %v", got)
	}
	if e, _ := c.Project("b"); e.Source != catalog.SourceFile || e.Project.PoolSize != 11 {
		t.Fatalf("b after the file changed it: %+v", e)
	}
	if p, _ := fc.project("a"); p.PoolSize != 5 {
		t.Fatalf("the run-time change of a, untouched by the file, was dropped: %+v", p)
	}
	pgtest.WaitFor(t, time.Second, "the file's b reaches the first instance", func() bool { p, ok := fa.project("b"); return ok && p.PoolSize == 11 })

	bad := project("d")
	bad.DatabaseURL = "not a url"
	if _, err := a.Add(bad, "api"); err == nil {
		t.Fatal("an invalid project was accepted")
	}
	if slices.Contains(fc.refs(), "d") {
		t.Fatal("a refused project reached another instance")
	}
}

// With the control database down, instances keep serving, writes fail with
// ErrUnavailable, a new start serves the cached catalog, and once it is
// back every instance catches up.
func TestSharedOutage(t *testing.T) {
	ctx := context.Background()
	_, pool := controlDB(t)
	dirA := t.TempDir()
	a, fa := instance(t, pool, dirA, twoProjects)
	_, fb := instance(t, pool, t.TempDir(), twoProjects)
	if _, err := a.Add(project("c"), "api"); err != nil {
		t.Fatal(err)
	}
	pgtest.WaitFor(t, time.Second, "c reaches b", func() bool { return slices.Contains(fb.refs(), "c") })

	if err := ctl.Primary.Stop(ctx, "fast"); err != nil {
		t.Fatal(err)
	}
	restarted := false
	t.Cleanup(func() {
		if !restarted {
			_ = ctl.Primary.Start(ctx)
		}
	})
	if _, err := a.Add(project("d"), "api"); !errors.Is(err, catalog.ErrUnavailable) {
		t.Fatalf("a write with the control database down: %v, want ErrUnavailable", err)
	}
	if got := fa.refs(); !slices.Equal(got, []string{"a", "b", "c"}) {
		t.Fatalf("during the outage a serves %v", got)
	}
	// A start during the outage serves what the last run cached.
	_, fr := instance(t, newPool(t, pool.Config().ConnString()), dirA, twoProjects)
	if got := fr.refs(); !slices.Equal(got, []string{"a", "b", "c"}) {
		t.Fatalf("a start without the control database serves %v, want the cached a, b, c", got)
	}

	if err := ctl.Primary.Start(ctx); err != nil {
		t.Fatal(err)
	}
	restarted = true
	var d catalog.Entry
	pgtest.WaitFor(t, 10*time.Second, "a write succeeds once the control database is back", func() bool {
		_, err := a.Add(project("d"), "api")
		var ok bool
		d, ok = a.Project("d")
		return err == nil || ok
	})
	if d.Project.Ref != "d" {
		t.Fatalf("d: %+v", d)
	}
	for name, f := range map[string]*follower{"b": fb, "restarted": fr} {
		pgtest.WaitFor(t, 5*time.Second, name+" catches up after the outage", func() bool { return slices.Contains(f.refs(), "d") })
	}
}

// Two instances starting at the same moment on an empty control database
// create one schema and neither fails.
func TestSharedSimultaneousStart(t *testing.T) {
	url, _ := controlDB(t)
	cfg := fileConfig(t, twoProjects)
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pool, err := controldb.Open(context.Background(), url, 2)
			if err != nil {
				errs[i] = err
				return
			}
			defer pool.Close()
			_, errs[i] = catalog.OpenShared(context.Background(), catalog.SharedOptions{Pool: pool, Dir: t.TempDir(),
				Config: cfg, File: []byte(twoProjects), Apply: (&follower{}).apply})
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("instance %d: %v", i, err)
		}
	}
	if n := pgtest.QueryValue(t, url, "SELECT count(*) FROM cascata_control.migrations WHERE component = 'catalog'"); n != "1" {
		t.Fatalf("catalog migrations recorded: %s, want 1", n)
	}
	if n := pgtest.QueryValue(t, url, "SELECT count(*) FROM cascata_control.projects"); n != "2" {
		t.Fatalf("projects seeded: %s, want 2", n)
	}
}
