package proxy_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cascata/internal/stats"
	"cascata/proxy"

	"github.com/jackc/pgx/v5"
)

// onReplica runs a query on c and reports whether the replica answered.
func onReplica(t *testing.T, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, sql string) bool {
	t.Helper()
	var rec bool
	if err := q.QueryRow(context.Background(), sql).Scan(&rec); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return rec
}

// waitReplicaRouting waits until the monitor has seen the replica.
func waitReplicaRouting(t *testing.T, c *pgx.Conn) {
	t.Helper()
	waitFor(t, "reads to reach the replica", 5*time.Second, func() bool {
		return onReplica(t, c, "SELECT pg_is_in_recovery()")
	})
}

// TestRoutingTargets: reads land on the replica, writes, locking reads,
// volatile functions and transactions on the primary.
func TestRoutingTargets(t *testing.T) {
	h := startProxy(t, harnessOpts{replicas: true})
	for _, mode := range []string{"simple_protocol", "cache_statement"} {
		t.Run(mode, func(t *testing.T) {
			c := h.connectMode("p1", "service_role", "router", mode)
			waitReplicaRouting(t, c)
			// Reads of a client that has not written go to the replica.
			for _, q := range []string{"SELECT pg_is_in_recovery()", "select PG_IS_IN_RECOVERY() where random() >= 0", "/* note */ SELECT pg_is_in_recovery()"} {
				if !onReplica(t, c, q) {
					t.Errorf("%s ran on the primary", q)
				}
			}
			// Everything that writes or locks goes to the primary (a separate
			// client: after a write, read-your-writes may hold reads back).
			w := h.connectMode("p1", "service_role", "router-w", mode)
			for _, q := range []string{
				"SELECT pg_is_in_recovery() FROM (SELECT 1) s FOR UPDATE",
				"SELECT pg_is_in_recovery() FROM (SELECT nextval('items_id_seq')) s",
				"WITH x AS (INSERT INTO items (body) VALUES ('r') RETURNING id) SELECT pg_is_in_recovery() FROM x",
				"/* cascata:primary */ SELECT pg_is_in_recovery()",
				"SELECT pg_is_in_recovery() FROM (SELECT set_config('search_path', 'public', false)) s",
			} {
				if onReplica(t, w, q) {
					t.Errorf("%s ran on the replica", q)
				}
			}
			tx, err := c.Begin(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if onReplica(t, tx, "SELECT pg_is_in_recovery()") {
				t.Error("a read inside BEGIN ran on the replica")
			}
			_ = tx.Rollback(context.Background())
			ro, err := c.BeginTx(context.Background(), pgx.TxOptions{AccessMode: pgx.ReadOnly})
			if err != nil {
				t.Fatal(err)
			}
			if !onReplica(t, ro, "SELECT pg_is_in_recovery()") {
				t.Error("a read inside BEGIN READ ONLY ran on the primary")
			}
			_ = ro.Rollback(context.Background())
		})
	}
}

// TestSessionRouteHint: SET cascata.route = 'primary' pins the session's
// reads to the primary until 'auto'.
func TestSessionRouteHint(t *testing.T) {
	h := startProxy(t, harnessOpts{replicas: true})
	c := h.connect("p2", "anon", "hint")
	waitReplicaRouting(t, c)
	if _, err := c.Exec(context.Background(), "SET cascata.route = 'primary'"); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if onReplica(t, c, "SELECT pg_is_in_recovery()") {
			t.Fatal("read went to the replica with route = primary")
		}
	}
	if _, err := c.Exec(context.Background(), "SET cascata.route TO 'auto'"); err != nil {
		t.Fatal(err)
	}
	if !onReplica(t, c, "SELECT pg_is_in_recovery()") {
		t.Fatal("read stayed on the primary with route = auto")
	}
	// What /v1/pools shows: routing counts and the replica's health.
	var p2 *stats.Route
	for _, rs := range h.srv.RouteStats() {
		if rs.Project == "p2" {
			p2 = &rs
		}
	}
	if p2 == nil || p2.Primary < 3 || p2.Replica < 1 {
		t.Fatalf("route stats of p2: %+v", p2)
	}
	reps := h.srv.ReplicaStats()
	if len(reps) != 1 || !reps[0].Healthy || reps[0].ReplayLSN == 0 {
		t.Fatalf("replica stats: %+v", reps)
	}
}

// TestReadYourWrites: with the replica applying WAL late, a client that
// just wrote reads its row every time, while a client that never wrote
// keeps reading from the replica.
func TestReadYourWrites(t *testing.T) {
	h := startProxy(t, harnessOpts{replicas: true})
	ctx := context.Background()
	writer := h.connect("p3", "service_role", "ryw")
	reader := h.connect("p3", "service_role", "reader")
	waitReplicaRouting(t, reader)
	// Hold the replica's apply back by 300 ms for this test only.
	rs := connectURL(t, cluster.Replica.SuperuserURL("postgres"))
	setDelay := func(d string) {
		if _, err := rs.Exec(ctx, "ALTER SYSTEM SET recovery_min_apply_delay = '"+d+"'"); err != nil {
			t.Fatal(err)
		}
		if _, err := rs.Exec(ctx, "SELECT pg_reload_conf()"); err != nil {
			t.Fatal(err)
		}
	}
	replicaP3 := connectURL(t, cluster.Replica.SuperuserURL("p3"))
	setDelay("300ms")
	t.Cleanup(func() { setDelay("0") })
	waitFor(t, "the replica to take the apply delay", 10*time.Second, func() bool {
		var d string
		return rs.QueryRow(ctx, "SHOW recovery_min_apply_delay").Scan(&d) == nil && d == "300ms"
	})
	replicaReads, lagged := 0, 0
	run := time.Now().UnixNano() // rows of an earlier run (-count) stay in the table
	for i := range 500 {
		body := fmt.Sprintf("ryw-%d-%d", run, i)
		if _, err := writer.Exec(ctx, "INSERT INTO items (body) VALUES ($1)", body); err != nil {
			t.Fatal(err)
		}
		var n int
		if err := writer.QueryRow(ctx, "SELECT count(*) FROM items WHERE body = $1", body).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n != 1 {
			t.Fatalf("round %d: the writer sees %d copies of its row, want 1", i, n)
		}
		// The replica really is behind: the row is not there yet.
		if i%50 == 0 {
			var m int
			if err := replicaP3.QueryRow(ctx, "SELECT count(*) FROM items WHERE body = $1", body).Scan(&m); err != nil {
				t.Fatal(err)
			}
			if m == 0 {
				lagged++
			}
		}
		if onReplica(t, reader, "SELECT pg_is_in_recovery()") {
			replicaReads++
		}
	}
	if lagged == 0 {
		t.Fatal("the replica was never behind the writer: the test proves nothing")
	}
	if replicaReads < 400 {
		t.Fatalf("only %d of 500 reads of a client without writes went to the replica", replicaReads)
	}
}

// TestFunctionVolatilityLearnt: a read calling the project's own STABLE
// function goes to the primary until its volatility is learnt from
// pg_proc, then to the replica; a VOLATILE one stays on the primary.
func TestFunctionVolatilityLearnt(t *testing.T) {
	ctx := context.Background()
	owner := connectURL(t, cluster.Primary.SuperuserURL("p2"))
	for _, q := range []string{
		`CREATE OR REPLACE FUNCTION public.where_am_i_stable() RETURNS bool STABLE LANGUAGE sql AS 'SELECT pg_is_in_recovery()'`,
		`CREATE OR REPLACE FUNCTION public.where_am_i_volatile() RETURNS bool VOLATILE LANGUAGE sql AS 'SELECT pg_is_in_recovery()'`,
	} {
		if _, err := owner.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	if err := cluster.WaitReplicaCaughtUp(ctx); err != nil {
		t.Fatal(err)
	}
	h := startProxy(t, harnessOpts{replicas: true})
	c := h.connect("p2", "anon", "fn")
	waitReplicaRouting(t, c)
	waitFor(t, "the stable function to be learnt and read on the replica", 5*time.Second, func() bool {
		return onReplica(t, c, "SELECT where_am_i_stable()")
	})
	for range 5 {
		if onReplica(t, c, "SELECT where_am_i_volatile()") {
			t.Fatal("a volatile function ran on the replica")
		}
	}
}

// TestReplicaStoppedUnderLoad: 20 clients read while the replica is
// stopped with -m immediate: no client sees an error, reads move to the
// primary, and come back to the replica after it restarts.
func TestReplicaStoppedUnderLoad(t *testing.T) {
	h := startProxy(t, harnessOpts{replicas: true})
	ctx := context.Background()
	probe := h.connect("p1", "anon", "probe")
	waitReplicaRouting(t, probe)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var reads, onRep, onPrim atomic.Int64
	var warm atomic.Int64 // clients that have read from the replica 5 times
	errs := make(chan error, 20)
	for i := range 20 {
		mode := []string{"simple_protocol", "exec", "describe_exec", "cache_statement", "cache_describe"}[i%5]
		tok := token(t, "p1", "anon", fmt.Sprintf("load-%d", i), nil)
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := h.tryConnectMode("p1", "anon", tok, mode)
			if err != nil {
				errs <- fmt.Errorf("client %d (%s): connect: %w", i, mode, err)
				return
			}
			defer c.Close(ctx)
			mine := 0
			for {
				select {
				case <-stop:
					return
				default:
				}
				var rec bool
				if err := c.QueryRow(ctx, "SELECT pg_is_in_recovery() FROM (SELECT count(*) FROM items) s").Scan(&rec); err != nil {
					errs <- fmt.Errorf("client %d (%s): %w", i, mode, err)
					return
				}
				reads.Add(1)
				if rec {
					onRep.Add(1)
					if mine++; mine == 5 {
						warm.Add(1)
					}
				} else {
					onPrim.Add(1)
				}
			}
		}()
	}
	waitFor(t, "every client to read from the replica", 10*time.Second, func() bool { return warm.Load() == 20 })
	before := onRep.Load()
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := cluster.Replica.Stop(sctx, "immediate"); err != nil {
		t.Fatal(err)
	}
	restarted := false
	defer func() {
		if !restarted {
			_ = cluster.Replica.Start(context.Background())
		}
	}()
	primBefore := onPrim.Load()
	waitFor(t, "reads to move to the primary while the replica is down", 10*time.Second, func() bool { return onPrim.Load() > primBefore+20 })
	if err := cluster.Replica.Start(sctx); err != nil {
		t.Fatal(err)
	}
	restarted = true
	repAfter := onRep.Load()
	waitFor(t, "reads to come back to the replica", 10*time.Second, func() bool { return onRep.Load() > repAfter+20 })
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("%d reads: %d on the replica (%d before the stop), %d on the primary", reads.Load(), onRep.Load(), before, onPrim.Load())
}

// TestSessionModeRoutes: a session-mode project with a replica reads from
// the replica until the session needs session state (here a temporary
// table); from then on the session keeps one primary backend.
func TestSessionModeRoutes(t *testing.T) {
	h := startProxy(t, harnessOpts{replicas: true, sessionMode: true, poolSize: 2})
	ctx := context.Background()
	for round := range 2 {
		c := h.connect("p1", "anon", fmt.Sprint("session-", round))
		waitReplicaRouting(t, c)
		if _, err := c.Exec(ctx, "CREATE TEMP TABLE mine (x int)"); err != nil {
			t.Fatal(err)
		}
		var pid1, pid2 int
		if err := c.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid1); err != nil {
			t.Fatal(err)
		}
		for range 5 {
			if onReplica(t, c, "SELECT pg_is_in_recovery()") {
				t.Fatal("a pinned session read from the replica")
			}
			var n int
			if err := c.QueryRow(ctx, "SELECT count(*) FROM mine").Scan(&n); err != nil {
				t.Fatalf("the temporary table is gone: %v", err)
			}
		}
		if err := c.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid2); err != nil || pid1 != pid2 {
			t.Fatalf("pinned session moved from backend %d to %d (%v)", pid1, pid2, err)
		}
		c.Close(ctx)
	}
}

// TestReplicasTakeTurns: reads are shared among a project's replicas.
// Two replica URLs (two pools) on the one test replica stand for two.
func TestReplicasTakeTurns(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 2})
	base := cluster.Replica.URL("authenticator", loginPassword, "p3")
	if err := h.srv.SetProjects([]proxy.ProjectConfig{{
		Ref: "p3", DatabaseURL: cluster.Primary.URL("authenticator", loginPassword, "p3"), PoolSize: 2,
		ReplicaURLs: []string{base + "&application_name=replica_a", base + "&application_name=replica_b"},
	}}); err != nil {
		t.Fatal(err)
	}
	c := h.connect("p3", "anon", "turns")
	waitReplicaRouting(t, c)
	for range 40 {
		if !onReplica(t, c, "SELECT pg_is_in_recovery()") {
			t.Fatal("a read left the replicas")
		}
	}
	used := 0
	for _, ps := range h.srv.PoolStats() {
		if ps.Project == "p3" && ps.Host == cluster.Replica.Addr() && ps.Acquires >= 10 {
			used++
		}
	}
	if used != 2 {
		t.Fatalf("%d replica pools served reads, want both: %+v", used, h.srv.PoolStats())
	}
}
