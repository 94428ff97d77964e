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
	"github.com/jackc/pgx/v5/pgproto3"
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

// TestPinnedClientsDoNotPark: a client keeping a backend (LISTEN pins it
// in transaction mode) is not parked while idle, so a notification reaches
// it then; the parked clients beside it are not disturbed.
func TestPinnedClientsDoNotPark(t *testing.T) {
	h := startProxy(t, harnessOpts{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	listener := h.connect("p1", "authenticated", "listener")
	if _, err := listener.Exec(ctx, "LISTEN parked_channel"); err != nil {
		t.Fatal(err)
	}
	idle := h.connect("p1", "anon", "idle-beside")
	if _, err := idle.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the plain client to park", 10*time.Second, func() bool { return proxy.ParkedClients(h.srv) == 1 })
	time.Sleep(2500 * time.Millisecond) // more than two sweeps: the listener would have parked by now
	if n := proxy.ParkedClients(h.srv); n != 1 {
		t.Fatalf("%d clients parked, want only the plain one", n)
	}
	sender := h.connect("p1", "authenticated", "sender")
	if _, err := sender.Exec(ctx, "NOTIFY parked_channel, 'hello'"); err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	n, err := listener.WaitForNotification(wctx)
	if err != nil || n.Payload != "hello" {
		t.Fatalf("notification to the idle pinned client: %+v, %v", n, err)
	}
	if user, sub, err := whoAmI(ctx, idle, pgx.QueryExecModeExec); err != nil || user != "anon" || sub != "idle-beside" {
		t.Fatalf("the parked client after: %s/%s, %v", user, sub, err)
	}
}

// TestParkingSplitMessage: bytes of a message sent in pieces around the
// idle sweep are neither lost nor read twice: half a header before a long
// pause (the session must not park with bytes buffered), the rest after;
// and a whole message written to a parked session in two pieces.
func TestParkingSplitMessage(t *testing.T) {
	h := startProxy(t, harnessOpts{})
	r := h.rawDial(t)
	r.write(startupPacket(proto30, "user", "anon", "database", "p1"))
	r.login(token(t, "p1", "anon", "split", nil))
	_ = r.c.SetDeadline(time.Now().Add(30 * time.Second))

	buf, err := (&pgproto3.Query{String: "SELECT 'split header'"}).Encode(nil)
	if err != nil {
		t.Fatal(err)
	}
	r.write(buf[:3])
	time.Sleep(2500 * time.Millisecond) // two sweeps: nudged, not parked
	if n := proxy.ParkedClients(h.srv); n != 0 {
		t.Fatalf("%d sessions parked with half a message buffered", n)
	}
	r.write(buf[3:])
	if vals, perr := r.readQuery(); perr != nil || len(vals) != 1 || vals[0] != "split header" {
		t.Fatalf("split header: %v %v", vals, perr)
	}

	waitFor(t, "the session to park", 10*time.Second, func() bool { return proxy.ParkedClients(h.srv) == 1 })
	if buf, err = (&pgproto3.Query{String: "SELECT 'split body'"}).Encode(buf[:0]); err != nil {
		t.Fatal(err)
	}
	r.write(buf[:8])
	time.Sleep(50 * time.Millisecond)
	r.write(buf[8:])
	if vals, perr := r.readQuery(); perr != nil || len(vals) != 1 || vals[0] != "split body" {
		t.Fatalf("split body after parking: %v %v", vals, perr)
	}
}
