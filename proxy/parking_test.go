package proxy_test

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"cascata/proxy"

	"github.com/jackc/pgx/v5"
)

// sessionGoroutines counts the goroutines serving a client session.
func sessionGoroutines() int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return strings.Count(string(buf[:n]), "proxy.(*session).serve(")
		}
		buf = make([]byte, 2*len(buf))
	}
}

// whoAmI asks through c who the proxy says the client is, on the protocol
// mode given.
func whoAmI(ctx context.Context, c *pgx.Conn, mode pgx.QueryExecMode) (string, string, error) {
	var user, sub string
	err := c.QueryRow(ctx, "SELECT current_user::text, coalesce(current_setting('request.jwt.claims', true)::json->>'sub', '')", mode).Scan(&user, &sub)
	return user, sub, err
}

// TestIdleClientsPark: idle clients in transaction mode give up their
// goroutine (the session parks on the server's epoll set) and come back
// with their own identity on both protocols, several times; a client that
// leaves while parked ends its session; what a parked client sent before
// it parked is not lost.
func TestIdleClientsPark(t *testing.T) {
	h := startProxy(t, harnessOpts{})
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	const clients = 40
	roles := []string{"anon", "authenticated"}
	conns := make([]*pgx.Conn, clients)
	for i := range conns {
		conns[i] = h.connect("p1", roles[i%2], fmt.Sprintf("parker-%d", i))
		if _, err := conns[i].Exec(ctx, "SELECT 1"); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the idle clients to park", 10*time.Second, func() bool { return proxy.ParkedClients(h.srv) == clients })
	if n := sessionGoroutines(); n != 0 {
		t.Errorf("%d client goroutines with all %d clients parked", n, clients)
	}

	check := func(round int) {
		t.Helper()
		var wg sync.WaitGroup
		errs := make(chan error, clients)
		for i, c := range conns {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for _, mode := range []pgx.QueryExecMode{pgx.QueryExecModeSimpleProtocol, pgx.QueryExecModeExec, pgx.QueryExecModeCacheStatement} {
					user, sub, err := whoAmI(ctx, c, mode)
					if err != nil {
						errs <- fmt.Errorf("round %d client %d mode %v: %w", round, i, mode, err)
						return
					}
					if user != roles[i%2] || sub != fmt.Sprintf("parker-%d", i) {
						errs <- fmt.Errorf("round %d client %d mode %v is %s/%s, want %s/parker-%d", round, i, mode, user, sub, roles[i%2], i)
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	}
	for round := range 3 {
		check(round)
		waitFor(t, "the clients to park again", 10*time.Second, func() bool { return proxy.ParkedClients(h.srv) == clients })
	}

	// A statement sent right as the session parks: the bytes wait in the
	// socket and wake it.
	if err := conns[0].PgConn().Exec(ctx, "SELECT 1; SELECT 2").Close(); err != nil {
		t.Fatal(err)
	}

	// Half the clients leave while parked: their sessions end.
	for _, c := range conns[clients/2:] {
		waitFor(t, "the client to park", 10*time.Second, func() bool { return proxy.ParkedClients(h.srv) >= clients/2 })
		if err := c.Close(ctx); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the sessions of the clients that left to end", 10*time.Second, func() bool {
		return h.srv.ClientCount() == clients/2 && proxy.ParkedClients(h.srv) <= clients/2
	})
	conns = conns[:clients/2]
	check(3)
}

// TestShutdownWakesParkedClients: a graceful shutdown tells parked clients
// 57P01 at once and returns without waiting for its deadline.
func TestShutdownWakesParkedClients(t *testing.T) {
	h := startProxy(t, harnessOpts{})
	ctx := context.Background()
	const clients = 8
	conns := make([]*pgx.Conn, clients)
	for i := range conns {
		conns[i] = h.connect("p1", "anon", fmt.Sprintf("parked-at-shutdown-%d", i))
		if _, err := conns[i].Exec(ctx, "SELECT 1"); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the idle clients to park", 10*time.Second, func() bool { return proxy.ParkedClients(h.srv) == clients })
	sctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	start := time.Now()
	if err := h.srv.Shutdown(sctx); err != nil {
		t.Fatalf("shutdown with parked clients: %v", err)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Fatalf("shutdown took %v: the parked clients were not woken", took)
	}
	for i, c := range conns {
		if _, err := c.Exec(ctx, "SELECT 1"); sqlstate(err) != "57P01" {
			t.Errorf("parked client %d after shutdown: want 57P01, got %v", i, err)
		}
	}
	if n := h.srv.ClientCount(); n != 0 {
		t.Fatalf("%d clients counted after shutdown", n)
	}
}
