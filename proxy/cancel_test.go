package proxy_test

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
)

// sendCancel sends a raw CancelRequest to the proxy.
func (h *harness) sendCancel(t *testing.T, pid uint32, secret []byte) {
	t.Helper()
	c, err := net.DialTimeout("tcp", h.addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	msg, err := (&pgproto3.CancelRequest{ProcessID: pid, SecretKey: secret}).Encode(nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	// The proxy closes the connection once it has handled the request.
	var b [1]byte
	_, _ = c.Read(b[:])
}

// TestCancelSleep: a cancel request stops the client's pg_sleep(10) with
// 57014 within a second, and a concurrent statement of another client on the
// same project runs to its end.
func TestCancelSleep(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 2})
	ctx := context.Background()
	a := h.connect("p1", "authenticated", "canceller")
	b := h.connect("p1", "authenticated", "bystander")
	tag := "cancel-" + marker(t)

	aErr := make(chan error, 1)
	go func() {
		_, err := a.Exec(ctx, "SELECT pg_sleep(10) -- a "+tag)
		aErr <- err
	}()
	bErr := make(chan error, 1)
	go func() {
		_, err := b.Exec(ctx, "SELECT pg_sleep(1) -- b "+tag)
		bErr <- err
	}()
	activeQueryPID(t, "a "+tag)
	activeQueryPID(t, "b "+tag)

	start := time.Now()
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := a.PgConn().CancelRequest(cctx); err != nil {
		t.Fatalf("cancel request: %v", err)
	}
	select {
	case err := <-aErr:
		if code := sqlstate(err); code != "57014" {
			t.Fatalf("cancelled statement: want 57014, got %q (%v)", code, err)
		}
		if d := time.Since(start); d > time.Second {
			t.Fatalf("cancelled statement returned %v after the cancel request", d)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("pg_sleep(10) still running 3s after the cancel request")
	}
	select {
	case err := <-bErr:
		if err != nil {
			t.Fatalf("the other client's pg_sleep(1) failed: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the other client's pg_sleep(1) did not finish")
	}
	// The cancelled client goes on.
	var v int
	if err := a.QueryRow(ctx, "SELECT 5").Scan(&v); err != nil || v != 5 {
		t.Fatalf("after the cancel: %d, %v", v, err)
	}
}

// TestCancelIdleIsHarmless: a cancel request of a client with nothing
// running does not cancel its next statement nor anybody else's.
func TestCancelIdleIsHarmless(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	ctx := context.Background()
	a := h.connect("p2", "authenticated", "idle")
	b := h.connect("p2", "authenticated", "busy")
	tag := "idle-cancel-" + marker(t)
	bErr := make(chan error, 1)
	go func() {
		_, err := b.Exec(ctx, "SELECT pg_sleep(0.5) -- "+tag)
		bErr <- err
	}()
	activeQueryPID(t, tag)
	// a is idle; its cancel must not reach the backend b uses.
	if err := a.PgConn().CancelRequest(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-bErr; err != nil {
		t.Fatalf("another client's statement was hit by an idle client's cancel: %v", err)
	}
	if _, err := a.Exec(ctx, "SELECT pg_sleep(0.2)"); err != nil {
		t.Fatalf("an earlier cancel hit a later statement: %v", err)
	}
}

// TestCancelWrongKey: a cancel request with a wrong secret key, or for a
// process id nobody has, cancels nothing.
func TestCancelWrongKey(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 2})
	ctx := context.Background()
	a := h.connect("p3", "authenticated", "target")
	tag := "wrongkey-" + marker(t)
	aErr := make(chan error, 1)
	start := time.Now()
	go func() {
		_, err := a.Exec(ctx, "SELECT pg_sleep(1) -- "+tag)
		aErr <- err
	}()
	activeQueryPID(t, tag)

	pid, secret := a.PgConn().PID(), a.PgConn().SecretKey()
	wrong := append([]byte(nil), secret...)
	wrong[0] ^= 0xff
	h.sendCancel(t, pid, wrong)
	h.sendCancel(t, pid, secret[:len(secret)-1]) // truncated key
	h.sendCancel(t, pid^0x5a5a, secret)          // someone else's pid
	if err := <-aErr; err != nil {
		t.Fatalf("statement was cancelled by a request with a wrong key: %v", err)
	}
	if d := time.Since(start); d < 900*time.Millisecond {
		t.Fatalf("pg_sleep(1) returned after %v", d)
	}
}

// TestCancelExtendedProtocol: a statement run with the extended protocol is
// cancelled the same way, and the connection goes on.
func TestCancelExtendedProtocol(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	ctx := context.Background()
	a := h.connect("p2", "authenticated", "ext-cancel")
	tag := "ext-cancel-" + marker(t)
	errc := make(chan error, 1)
	go func() {
		errc <- a.PgConn().ExecParams(ctx, "SELECT pg_sleep($1::float8) -- "+tag, [][]byte{[]byte("10")}, nil, nil, nil).Read().Err
	}()
	activeQueryPID(t, tag)
	start := time.Now()
	if err := a.PgConn().CancelRequest(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errc:
		if code := sqlstate(err); code != "57014" {
			t.Fatalf("want 57014, got %v", err)
		}
		if d := time.Since(start); d > time.Second {
			t.Fatalf("cancelled after %v", d)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("extended-protocol pg_sleep(10) still running 3s after the cancel request")
	}
	res := a.PgConn().ExecParams(ctx, "SELECT $1::text", [][]byte{[]byte("ok")}, nil, nil, nil).Read()
	if res.Err != nil || rowsText(res.Rows) != "ok" {
		t.Fatalf("after the cancel: %v %q", res.Err, rowsText(res.Rows))
	}
}

// TestCancelStormHitsNoOtherClient: a client that sends cancel requests all
// the time, while it and another client take turns on the only backend,
// never cancels a statement of the other client.
func TestCancelStormHitsNoOtherClient(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	ctx := context.Background()
	a := h.connect("p3", "authenticated", "storm")
	b := h.connect("p3", "authenticated", "innocent")
	pid, secret := a.PgConn().PID(), a.PgConn().SecretKey()
	stop := make(chan struct{})
	stormDone := make(chan int, 1)
	go func() {
		n := 0
		for {
			select {
			case <-stop:
				stormDone <- n
				return
			default:
			}
			c, err := net.DialTimeout("tcp", h.addr, time.Second)
			if err != nil {
				continue
			}
			msg, _ := (&pgproto3.CancelRequest{ProcessID: pid, SecretKey: secret}).Encode(nil)
			_ = c.SetDeadline(time.Now().Add(2 * time.Second))
			_, _ = c.Write(msg)
			var one [1]byte
			_, _ = c.Read(one[:])
			c.Close()
			n++
		}
	}()
	aErr := make(chan error, 1)
	aCancelled := 0
	go func() {
		for range 60 {
			// Long enough for some of the storm to land on it.
			_, err := a.Exec(ctx, "SELECT pg_sleep(0.02)")
			if sqlstate(err) == "57014" {
				aCancelled++
			} else if err != nil {
				aErr <- err
				return
			}
		}
		aErr <- nil
	}()
	var bad error
	for i := range 60 {
		if _, err := b.Exec(ctx, "SELECT pg_sleep(0.002)"); err != nil {
			bad = fmt.Errorf("statement %d of the other client: %w", i, err)
			break
		}
	}
	if err := <-aErr; err != nil {
		t.Errorf("storming client: %v", err)
	}
	close(stop)
	n := <-stormDone
	t.Logf("%d cancel requests sent; %d of the storming client's 60 statements cancelled", n, aCancelled)
	if bad != nil {
		t.Fatal(bad)
	}
	if aCancelled == 0 {
		t.Fatalf("none of %d cancel requests cancelled the sender's own statements", n)
	}
}
