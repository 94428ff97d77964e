package proxy_test

import (
	"context"
	"testing"
	"time"

	"cascata/internal/pgtest"
)

// TestShutdownLetsTransactionFinish: during a graceful shutdown an open
// transaction can still commit, then its client is told 57P01; idle clients
// are told at once; new connections are refused.
func TestShutdownLetsTransactionFinish(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 2})
	ctx := context.Background()
	a := h.connect("p1", "authenticated", "in-tx")
	idle := h.connect("p1", "anon", "idle")
	if _, err := idle.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	m := marker(t)
	tx, err := a.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "INSERT INTO items (body) VALUES ($1)", m); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	done := make(chan error, 1)
	go func() {
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		done <- h.srv.Shutdown(sctx)
	}()
	waitFor(t, "the idle client to be disconnected", 3*time.Second, func() bool { return h.srv.ClientCount() == 1 })
	if _, err := idle.Exec(ctx, "SELECT 1"); sqlstate(err) != "57P01" {
		t.Fatalf("idle client during shutdown: want 57P01, got %v", err)
	}
	if c, err := h.tryConnect("p1", "anon", token(t, "p1", "anon", "late", nil)); err == nil {
		c.Close(ctx)
		t.Fatal("a new connection was accepted during shutdown")
	} else if code := sqlstate(err); code != "" && code != "57P01" {
		t.Fatalf("new connection during shutdown: want refused or 57P01, got %v", err)
	}

	// The open transaction finishes normally.
	var n int
	if err := tx.QueryRow(ctx, "SELECT count(*) FROM items WHERE body = $1", m).Scan(&n); err != nil || n != 1 {
		t.Fatalf("statement in the open transaction during shutdown: %d, %v", n, err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatalf("commit during shutdown: %v", err)
	}
	// Then the client is told to go.
	if _, err := a.Exec(ctx, "SELECT 1"); sqlstate(err) != "57P01" {
		t.Fatalf("after its commit: want 57P01, got %v", err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("shutdown: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("shutdown did not return after the last transaction ended")
	}
	t.Logf("shutdown took %v", time.Since(start))
	sc := pgtest.Connect(t, cluster.Primary.SuperuserURL("p1"))
	if err := sc.QueryRow(ctx, "SELECT count(*) FROM items WHERE body = $1", m).Scan(&n); err != nil || n != 1 {
		t.Fatalf("committed row after shutdown: %d, %v", n, err)
	}
	waitFor(t, "the proxy's backends to close", 3*time.Second, func() bool { return proxyBackends(t, "p1") == 0 })
}

// TestShutdownDeadline: a transaction still open at the shutdown deadline
// is cut off and rolled back, and Shutdown reports it.
func TestShutdownDeadline(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 2})
	ctx := context.Background()
	a := h.connect("p2", "authenticated", "stuck")
	m := marker(t)
	tx, err := a.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	if err := tx.QueryRow(ctx, "INSERT INTO items (body) VALUES ($1) RETURNING pg_backend_pid()", m).Scan(&pid); err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	err = h.srv.Shutdown(sctx)
	if err == nil {
		t.Fatal("Shutdown returned nil with a transaction open past the deadline")
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("Shutdown took %v with a 300ms deadline", d)
	}
	if err := tx.Commit(ctx); err == nil {
		t.Fatal("commit after the shutdown deadline succeeded")
	}
	waitFor(t, "the cut-off backend to end", 3*time.Second, func() bool { return backendState(t, pid) == "gone" })
	sc := pgtest.Connect(t, cluster.Primary.SuperuserURL("p2"))
	var n int
	if err := sc.QueryRow(ctx, "SELECT count(*) FROM items WHERE body = $1", m).Scan(&n); err != nil || n != 0 {
		t.Fatalf("rows of the cut-off transaction: %d, %v", n, err)
	}
}

// TestShutdownIdleRawClients: clients that logged in and said nothing more
// are told 57P01 and closed at shutdown (and, under -race, without a data
// race between the login reply and the shutdown message).
func TestShutdownIdleRawClients(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	tok := token(t, "p3", "anon", "raw", nil)
	var rs []*rawClient
	for range 3 {
		r := h.rawDial(t)
		r.write(startupPacket(proto30, "user", "anon", "database", "p3"))
		r.login(tok)
		rs = append(rs, r)
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := h.srv.Shutdown(sctx); err != nil {
		t.Fatal(err)
	}
	for _, r := range rs {
		r.expectFatal("57P01")
	}
}
