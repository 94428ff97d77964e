package eject_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cascata/internal/catalog"
	"cascata/internal/config"
	"cascata/internal/eject"
	"cascata/internal/jobs"
	"cascata/internal/pgcluster"
	"cascata/internal/pgtest"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// sample is one acknowledged write and how long it took.
type sample struct {
	start time.Time
	took  time.Duration
}

// load is writers inserting acknowledged rows and readers reading, all
// through the proxy, until stop.
type load struct {
	t       *testing.T
	stopped atomic.Bool
	wg      sync.WaitGroup

	mu      sync.Mutex
	acked   map[[2]int]int64 // (writer, n) -> id
	samples []sample
	errs    []string
	reads   atomic.Int64
}

func startLoad(t *testing.T, e *env, ref string, writers, readers int) *load {
	t.Helper()
	ld := &load{t: t, acked: map[[2]int]int64{}}
	conns := make([]*pgx.Conn, writers+readers)
	for i := range conns {
		conns[i] = pgtest.Connect(t, e.clientURL(ref))
	}
	t.Cleanup(ld.stop) // runs before the connections close
	for w := range writers {
		ld.wg.Add(1)
		go func() {
			defer ld.wg.Done()
			c := conns[w]
			for n := 1; !ld.stopped.Load(); n++ {
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				start := time.Now()
				var id int64
				err := c.QueryRow(ctx, "INSERT INTO items (writer, n, payload) VALUES ($1, $2, 'w') RETURNING id", w, n).Scan(&id)
				took := time.Since(start)
				cancel()
				ld.mu.Lock()
				if err != nil {
					ld.errs = append(ld.errs, fmt.Sprintf("writer %d insert %d: %v", w, n, err))
				} else {
					ld.acked[[2]int{w, n}] = id
					ld.samples = append(ld.samples, sample{start: start, took: took})
				}
				ld.mu.Unlock()
				if err != nil {
					time.Sleep(50 * time.Millisecond)
				}
			}
		}()
	}
	for r := range readers {
		ld.wg.Add(1)
		go func() {
			defer ld.wg.Done()
			c := conns[writers+r]
			for !ld.stopped.Load() {
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				var id int64
				err := c.QueryRow(ctx, "SELECT coalesce(max(id), 0) FROM items WHERE writer = $1", r).Scan(&id)
				cancel()
				if err != nil {
					ld.mu.Lock()
					ld.errs = append(ld.errs, fmt.Sprintf("reader %d: %v", r, err))
					ld.mu.Unlock()
					time.Sleep(50 * time.Millisecond)
					continue
				}
				ld.reads.Add(1)
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	return ld
}

func (ld *load) stop() {
	ld.stopped.Store(true)
	ld.wg.Wait()
}

// stats returns count, p99 and max latency of writes started in [from, to).
func (ld *load) stats(from, to time.Time) (int, time.Duration, time.Duration) {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	var ds []time.Duration
	for _, s := range ld.samples {
		if !s.start.Before(from) && s.start.Before(to) {
			ds = append(ds, s.took)
		}
	}
	if len(ds) == 0 {
		return 0, 0, 0
	}
	slices.Sort(ds)
	return len(ds), ds[(len(ds)*99)/100], ds[len(ds)-1]
}

// rowsOf returns (writer, n) -> id of the load's rows in a database.
func rowsOf(t *testing.T, connURL string) (map[[2]int]int64, int) {
	t.Helper()
	c := pgtest.Connect(t, connURL)
	rows, err := c.Query(t.Context(), "SELECT writer, n, id FROM items WHERE writer >= 0")
	if err != nil {
		t.Fatal(err)
	}
	got := map[[2]int]int64{}
	total := 0
	for rows.Next() {
		var w, n int
		var id int64
		if err := rows.Scan(&w, &n, &id); err != nil {
			t.Fatal(err)
		}
		got[[2]int{w, n}] = id
		total++
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return got, total
}

// checkExactly fails unless db holds exactly the acknowledged rows.
func checkExactly(t *testing.T, where string, got map[[2]int]int64, total int, acked map[[2]int]int64) {
	t.Helper()
	if total != len(got) {
		t.Errorf("%s: %d load rows but %d distinct (writer, n)", where, total, len(got))
	}
	missing, extra := 0, 0
	for k, id := range acked {
		if gid, ok := got[k]; !ok || gid != id {
			missing++
		}
	}
	for k := range got {
		if _, ok := acked[k]; !ok {
			extra++
		}
	}
	if missing > 0 || extra > 0 || len(got) != len(acked) {
		t.Errorf("%s: %d acknowledged writes, %d rows; %d acknowledged missing, %d not acknowledged", where, len(acked), len(got), missing, extra)
	}
}

func TestEjectUnderLoad(t *testing.T) {
	for _, tc := range []struct {
		ref    string
		method eject.Method
	}{{"ej_logical", eject.Logical}, {"ej_dump", eject.Dump}} {
		t.Run(string(tc.method), func(t *testing.T) {
			e := newEnv(t, nil, tc.ref, "ej_other")
			if got := e.serverPort(tc.ref); got != source.Primary.Port {
				t.Fatalf("before: port %d, want source %d", got, source.Primary.Port)
			}
			ld := startLoad(t, e, tc.ref, 20, 10)
			time.Sleep(time.Second)
			ejectStart := time.Now()
			st := e.waitJob(e.startEject(tc.ref, tc.method).ID)
			ejectEnd := time.Now()
			if st.State != jobs.Succeeded {
				ld.stop()
				t.Fatalf("ejection %s: %s\n%s", st.State, st.Error, jobLog(st))
			}
			time.Sleep(time.Second)
			afterEnd := time.Now()
			ld.stop()
			t.Logf("job log:\n%s", jobLog(st))

			for i, msg := range ld.errs {
				if i < 10 {
					t.Errorf("client error: %s", msg)
				}
			}
			if len(ld.errs) > 0 {
				t.Errorf("%d client errors", len(ld.errs))
			}
			tgtOwner := target.Primary.SuperuserURL(tc.ref)
			got, total := rowsOf(t, tgtOwner)
			checkExactly(t, "target", got, total, ld.acked)
			if n := pgtest.QueryValue(t, tgtOwner, "SELECT count(*) FROM items WHERE writer = -1"); n != fmt.Sprint(seedRows()) {
				t.Errorf("target holds %s seeded rows, want %d", n, seedRows())
			}
			if v := pgtest.QueryValue(t, tgtOwner, "SELECT last_value || '/' || is_called FROM counter"); v != "100/true" {
				t.Errorf("target counter sequence %s, want 100/true", v)
			}

			// New connections with old-style JWTs land on the target, and the
			// sequence continues past every acknowledged id.
			if got := e.serverPort(tc.ref); got != target.Primary.Port {
				t.Errorf("after: port %d, want target %d", got, target.Primary.Port)
			}
			var maxID int64
			for _, id := range ld.acked {
				maxID = max(maxID, id)
			}
			c := pgtest.Connect(t, e.clientURL(tc.ref))
			var next int64
			if err := c.QueryRow(t.Context(), "INSERT INTO items (writer, n) VALUES (999, 1) RETURNING id").Scan(&next); err != nil {
				t.Fatalf("insert after ejection: %v", err)
			}
			if next <= maxID {
				t.Errorf("sequence went back: new id %d <= acknowledged %d", next, maxID)
			}
			// No replication objects remain.
			if n := pgtest.QueryValue(t, source.Primary.SuperuserURL(tc.ref), "SELECT (SELECT count(*) FROM pg_publication) + (SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'cascata_eject_%')"); n != "0" {
				t.Errorf("%s publications/slots left on the source", n)
			}
			if n := pgtest.QueryValue(t, tgtOwner, "SELECT count(*) FROM pg_subscription"); n != "0" {
				t.Errorf("%s subscriptions left on the target", n)
			}

			nb, p99b, maxb := ld.stats(time.Time{}, ejectStart)
			nd, p99d, maxd := ld.stats(ejectStart, ejectEnd)
			na, p99a, maxa := ld.stats(ejectEnd, afterEnd)
			t.Logf("%s ejection of %d seeded rows (~%d MB) took %s; %d reads; writes before: n=%d p99=%s max=%s; during: n=%d p99=%s max=%s; after: n=%d p99=%s max=%s",
				tc.method, seedRows(), seedRows()/1000, ejectEnd.Sub(ejectStart).Round(time.Millisecond), ld.reads.Load(),
				nb, p99b, maxb, nd, p99d, maxd, na, p99a, maxa)

			// A restart reads the switch back from the state directory.
			var applied []config.Project
			if _, err := catalog.Open(catalog.Options{Dir: e.stateDir, Config: e.cfg, Apply: func(ps []config.Project) error {
				applied = ps
				return nil
			}}); err != nil {
				t.Fatal(err)
			}
			for _, p := range applied {
				if p.Ref == tc.ref && p.DatabaseURL != target.Primary.URL("authenticator", loginPassword, tc.ref) {
					t.Errorf("after restart %s points at %s", tc.ref, config.RedactURL(p.DatabaseURL))
				}
			}
		})
	}
}

func TestEjectFailureLeavesSource(t *testing.T) {
	for _, tc := range []struct {
		ref       string
		method    eject.Method
		failPhase string
	}{{"ej_fail_logical", eject.Logical, "initial_sync"}, {"ej_fail_dump", eject.Dump, "copy"}} {
		t.Run(string(tc.method), func(t *testing.T) {
			var stopped atomic.Bool
			e := newEnv(t, func(ref, phase string) {
				if ref == tc.ref && phase == tc.failPhase {
					ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
					defer cancel()
					if err := target.Primary.Stop(ctx, "immediate"); err != nil {
						t.Errorf("stop target: %v", err)
					}
					stopped.Store(true)
				}
			}, tc.ref)
			t.Cleanup(func() {
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				if err := target.Primary.Start(ctx); err != nil {
					t.Errorf("restart target: %v", err)
				}
				dropSubscriptions(t, target.Primary.SuperuserURL(tc.ref))
			})
			ld := startLoad(t, e, tc.ref, 5, 3)
			time.Sleep(300 * time.Millisecond)
			st := e.waitJob(e.startEject(tc.ref, tc.method).ID)
			time.Sleep(300 * time.Millisecond)
			ld.stop()
			if !stopped.Load() {
				t.Fatalf("the failure was not injected; job %s: %s\n%s", st.State, st.Error, jobLog(st))
			}
			if st.State != jobs.Failed || !strings.Contains(st.Error, tc.failPhase[:4]) {
				t.Fatalf("job %s, error %q; want failed in %s\n%s", st.State, st.Error, tc.failPhase, jobLog(st))
			}
			t.Logf("job error: %s", st.Error)
			for _, msg := range ld.errs {
				t.Errorf("client error: %s", msg)
			}
			if got := e.serverPort(tc.ref); got != source.Primary.Port {
				t.Errorf("after failure: port %d, want source %d", got, source.Primary.Port)
			}
			if e.srv.Paused(tc.ref) {
				t.Error("project left paused")
			}
			got, total := rowsOf(t, source.Primary.SuperuserURL(tc.ref))
			checkExactly(t, "source", got, total, ld.acked)
			if n := pgtest.QueryValue(t, source.Primary.SuperuserURL(tc.ref), "SELECT (SELECT count(*) FROM pg_publication) + (SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'cascata_eject_%')"); n != "0" {
				t.Errorf("%s publications/slots left on the source", n)
			}
			if entry, _ := e.cat.Project(tc.ref); entry.Source != catalog.SourceFile {
				t.Errorf("catalog changed: %+v", entry)
			}
		})
	}
}

// dropSubscriptions removes subscriptions a failed ejection could not drop.
func dropSubscriptions(t *testing.T, connURL string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgconn.Connect(ctx, connURL)
	if err != nil {
		t.Errorf("drop subscriptions: %v", err)
		return
	}
	defer c.Close(ctx)
	rr := c.ExecParams(ctx, "SELECT subname FROM pg_subscription WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())", nil, nil, nil, nil).Read()
	if rr.Err != nil {
		t.Errorf("drop subscriptions: %v", rr.Err)
		return
	}
	for _, row := range rr.Rows {
		name := pgx.Identifier{string(row[0])}.Sanitize()
		for _, sql := range []string{"ALTER SUBSCRIPTION %s DISABLE", "ALTER SUBSCRIPTION %s SET (slot_name = NONE)", "DROP SUBSCRIPTION %s"} {
			if err := c.Exec(ctx, fmt.Sprintf(sql, name)).Close(); err != nil {
				t.Errorf("drop subscription %s: %v", name, err)
			}
		}
	}
}

// The dump method refuses a database larger than MaxDumpBytes before pausing.
func TestDumpRefusesLargeDatabase(t *testing.T) {
	e := newEnv(t, nil, "ej_other")
	bins, err := pgcluster.FindBinaries(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	ej, err := eject.New(eject.Options{Pauser: e.srv, Catalog: e.cat, BinDir: bins.Dir, MaxDumpBytes: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	entry, _ := e.cat.Project("ej_other")
	req := eject.Request{
		Project:        entry.Project,
		TargetURL:      target.Primary.URL("authenticator", loginPassword, "ej_other"),
		TargetOwnerURL: target.Primary.SuperuserURL("ej_other"),
		Method:         eject.Dump,
	}
	st, err := e.runner.Start("eject", "ej_other", func(ctx context.Context, j *jobs.Job) error { return ej.Run(ctx, req, j) })
	if err != nil {
		t.Fatal(err)
	}
	st = e.waitJob(st.ID)
	if st.State != jobs.Failed || !strings.Contains(st.Error, "use the logical method") {
		t.Fatalf("job %s: %s", st.State, st.Error)
	}
	if e.srv.Paused("ej_other") || e.serverPort("ej_other") != source.Primary.Port {
		t.Fatal("project paused or moved")
	}
	if n := pgtest.QueryValue(t, target.Primary.SuperuserURL("ej_other"), "SELECT count(*) FROM pg_class WHERE relname = 'items'"); n != "0" {
		t.Fatalf("target touched: %s", n)
	}
}
