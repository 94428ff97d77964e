package proxy_test

import (
	"context"
	"fmt"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"cascata/internal/projectdb"
	"cascata/proxy"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// setApplyDelay holds the replica's apply back by d (recovery_min_apply_delay)
// until the test ends.
func setApplyDelay(t *testing.T, d string) {
	t.Helper()
	rs := connectURL(t, cluster.Replica.SuperuserURL("postgres"))
	set := func(d string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := rs.Exec(ctx, "ALTER SYSTEM SET recovery_min_apply_delay = '"+d+"'"); err != nil {
			return fmt.Errorf("set recovery_min_apply_delay: %w", err)
		}
		if _, err := rs.Exec(ctx, "SELECT pg_reload_conf()"); err != nil {
			return fmt.Errorf("reload: %w", err)
		}
		return nil
	}
	if err := set(d); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := set("0"); err != nil {
			t.Error(err)
		}
	})
}

// replicaHas returns a check of whether the replica shows a row of p3's
// items with a given body.
func replicaHas(t *testing.T) func(body string) bool {
	rp := connectURL(t, cluster.Replica.SuperuserURL("p3"))
	return func(body string) bool {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var n int
		if err := rp.QueryRow(ctx, "SELECT count(*) FROM items WHERE body = $1", body).Scan(&n); err != nil {
			t.Fatalf("read the replica: %v", err)
		}
		return n > 0
	}
}

// TestReplicaLagAfterIdle: after the project idled longer than
// max_replica_lag, a burst of writes leaves a replica 500 ms behind. A
// reader whose own writes the replica already has keeps reading from the
// replica: its lag is measured by WAL position over time, not as the age
// of the last transaction it replayed (which would be the whole idle time).
func TestReplicaLagAfterIdle(t *testing.T) {
	h := startProxy(t, harnessOpts{replicas: true})
	ctx := context.Background()
	reader := h.connect("p3", "service_role", "lag-reader")
	writer := h.connect("p3", "service_role", "lag-writer")
	waitReplicaRouting(t, reader)
	setApplyDelay(t, "500ms")
	has := replicaHas(t)

	run := time.Now().UnixNano() // rows of an earlier run (-count) stay in the table
	mine := fmt.Sprintf("lag-reader-%d", run)
	if _, err := reader.Exec(ctx, "INSERT INTO items (body) VALUES ($1)", mine); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the replica to replay the reader's write", 10*time.Second, func() bool { return has(mine) })

	// Idle for twice max_replica_lag (1s): no transaction commits.
	time.Sleep(2 * time.Second)

	last := ""
	for i := range 20 {
		last = fmt.Sprintf("lag-burst-%d-%d", run, i)
		if _, err := writer.Exec(ctx, "INSERT INTO items (body) VALUES ($1)", last); err != nil {
			t.Fatal(err)
		}
	}
	// Read until the replica has the burst: each read has everything it
	// needs on the replica, which is at most ~500 ms behind.
	reads, onRep := 0, 0
	deadline := time.Now().Add(5 * time.Second)
	for reads < 500 && time.Now().Before(deadline) && !has(last) {
		var rec bool
		var n int
		if err := reader.QueryRow(ctx, "SELECT pg_is_in_recovery(), count(*) FROM items WHERE body = $1", mine).Scan(&rec, &n); err != nil {
			t.Fatal(err)
		}
		if n != 1 {
			t.Fatalf("the reader sees %d copies of its row, want 1", n)
		}
		reads++
		if rec {
			onRep++
		}
		time.Sleep(20 * time.Millisecond) // pace the reads over the replica's delay
	}
	if reads < 5 {
		t.Fatalf("the replica replayed the burst after %d reads: the test proves nothing", reads)
	}
	if onRep != reads {
		t.Fatalf("%d of %d reads went to the replica while it was ~500 ms behind after an idle period (max_replica_lag 1s)", onRep, reads)
	}
}

// TestManyReplicasTakeTurns: a project with ten replicas reads from every
// one of them (none beyond the eighth is left out).
func TestManyReplicasTakeTurns(t *testing.T) {
	h := startProxy(t, harnessOpts{})
	const n = 10
	run := time.Now().UnixNano()
	var urls []string
	for i := range n {
		urls = append(urls, cluster.Replica.URL("authenticator", loginPassword, "p2")+fmt.Sprintf("&application_name=rep%d_%d", run, i))
	}
	pc := projectConfig("p2")
	pc.ReplicaURLs, pc.PoolSize = urls, 1
	if err := h.srv.SetProjects([]proxy.ProjectConfig{pc}); err != nil {
		t.Fatal(err)
	}
	c := h.connect("p2", "anon", "many-replicas")
	waitReplicaRouting(t, c)
	for range 3 * n {
		if !onReplica(t, c, "SELECT pg_is_in_recovery()") {
			t.Fatal("a read went to the primary with ten healthy replicas")
		}
	}
	rs := connectURL(t, cluster.Replica.SuperuserURL("postgres"))
	var used int
	if err := rs.QueryRow(context.Background(), "SELECT count(DISTINCT application_name) FROM pg_stat_activity WHERE application_name LIKE $1",
		fmt.Sprintf("rep%d\\_%%", run)).Scan(&used); err != nil {
		t.Fatal(err)
	}
	if used != n {
		t.Fatalf("reads used %d of %d replicas", used, n)
	}
}

// TestReplicaMonitorReload: reloads that add and remove a project's
// replica while its monitor polls (run with -race: the monitor's connection
// is owned by the poller, not closed under it), then the replica's metric
// series and monitor connection are gone.
func TestReplicaMonitorReload(t *testing.T) {
	reg := prometheus.NewRegistry()
	h := startProxy(t, harnessOpts{projects: []string{"p1"}, opts: proxy.Options{Metrics: proxy.NewMetrics(reg), ReplicaCheckInterval: 5 * time.Millisecond}})
	base := projectConfig("p1")
	withReplica := base
	withReplica.ReplicaURLs = []string{cluster.Replica.URL("authenticator", loginPassword, "p1") + "&application_name=monitor_reload"}
	healthy := func() bool {
		st := h.srv.ReplicaStats()
		return len(st) == 1 && st[0].Healthy
	}
	for i := range 10 {
		if err := h.srv.SetProjects([]proxy.ProjectConfig{withReplica}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, fmt.Sprintf("round %d: the replica to be checked", i), 10*time.Second, healthy)
		if err := h.srv.SetProjects([]proxy.ProjectConfig{base}); err != nil {
			t.Fatal(err)
		}
	}
	if st := h.srv.ReplicaStats(); len(st) != 0 {
		t.Fatalf("replica stats after the replica was removed: %+v", st)
	}
	waitFor(t, "the replica's series to go", 5*time.Second, func() bool {
		return !strings.Contains(scrape(t, reg), "cascata_replica_healthy")
	})
	rs := connectURL(t, cluster.Replica.SuperuserURL("postgres"))
	waitFor(t, "the monitor's connection to the replica to close", 5*time.Second, func() bool {
		var n int
		if err := rs.QueryRow(context.Background(), "SELECT count(*) FROM pg_stat_activity WHERE usename = 'authenticator' AND datname = 'p1'").Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n == 0
	})
}

// projectConfig is a test project on the primary, for SetProjects.
func projectConfig(ref string) proxy.ProjectConfig {
	return proxy.ProjectConfig{
		Ref:         ref,
		DatabaseURL: cluster.Primary.URL("authenticator", loginPassword, ref),
		PoolSize:    2,
		ClaimsMAC:   func(claims string) string { return projectdb.ClaimsMAC(claimKeys[ref], claims) },
	}
}

// scrape returns the registry's metrics in the text format.
func scrape(t *testing.T, reg *prometheus.Registry) string {
	t.Helper()
	rec := httptest.NewRecorder()
	promhttp.HandlerFor(reg, promhttp.HandlerOpts{}).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 {
		t.Fatalf("scrape: %d %s", rec.Code, rec.Body)
	}
	return rec.Body.String()
}
