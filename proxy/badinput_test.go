package proxy_test

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"cascata/proxy"

	"github.com/jackc/pgx/v5/pgproto3"
)

const (
	proto30 = 3<<16 | 0
	proto32 = 3<<16 | 2
	proto20 = 2<<16 | 0
)

// rawClient speaks the protocol by hand over TCP.
type rawClient struct {
	t  *testing.T
	c  net.Conn
	fe *pgproto3.Frontend
}

func (h *harness) rawDial(t *testing.T) *rawClient {
	t.Helper()
	c, err := net.DialTimeout("tcp", h.addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	return &rawClient{t: t, c: c, fe: pgproto3.NewFrontend(c, c)}
}

// startupPacket builds a startup packet of a protocol version with key/value pairs.
func startupPacket(version uint32, kv ...string) []byte {
	body := binary.BigEndian.AppendUint32(nil, version)
	for _, s := range kv {
		body = append(body, s...)
		body = append(body, 0)
	}
	body = append(body, 0)
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(body)+4)), body...)
}

func (r *rawClient) write(b []byte) {
	r.t.Helper()
	if _, err := r.c.Write(b); err != nil {
		r.t.Fatalf("write: %v", err)
	}
}

func (r *rawClient) send(msgs ...pgproto3.FrontendMessage) {
	r.t.Helper()
	for _, m := range msgs {
		r.fe.Send(m)
	}
	if err := r.fe.Flush(); err != nil {
		r.t.Fatalf("send: %v", err)
	}
}

// receive returns the next message, or fails the test.
func (r *rawClient) receive() pgproto3.BackendMessage {
	r.t.Helper()
	m, err := r.fe.Receive()
	if err != nil {
		r.t.Fatalf("receive: %v", err)
	}
	return m
}

// login answers the password request and reads up to ReadyForQuery. It
// returns the BackendKeyData.
func (r *rawClient) login(tok string) pgproto3.BackendKeyData {
	r.t.Helper()
	if _, ok := r.receive().(*pgproto3.AuthenticationCleartextPassword); !ok {
		r.t.Fatal("want AuthenticationCleartextPassword")
	}
	r.send(&pgproto3.PasswordMessage{Password: tok})
	var key pgproto3.BackendKeyData
	for {
		switch m := r.receive().(type) {
		case *pgproto3.AuthenticationOk, *pgproto3.ParameterStatus:
		case *pgproto3.BackendKeyData:
			key = pgproto3.BackendKeyData{ProcessID: m.ProcessID, SecretKey: append([]byte(nil), m.SecretKey...)}
		case *pgproto3.ReadyForQuery:
			return key
		case *pgproto3.ErrorResponse:
			r.t.Fatalf("login failed: %s %s %s", m.Severity, m.Code, m.Message)
		default:
			r.t.Fatalf("unexpected %T during login", m)
		}
	}
}

// query runs a simple query and returns its first column's values.
func (r *rawClient) query(sql string) ([]string, *pgproto3.ErrorResponse) {
	r.t.Helper()
	r.send(&pgproto3.Query{String: sql})
	return r.readQuery()
}

// readQuery reads a simple query's answer up to ReadyForQuery and returns
// its first column's values.
func (r *rawClient) readQuery() ([]string, *pgproto3.ErrorResponse) {
	r.t.Helper()
	var vals []string
	var perr *pgproto3.ErrorResponse
	for {
		switch m := r.receive().(type) {
		case *pgproto3.DataRow:
			vals = append(vals, string(m.Values[0]))
		case *pgproto3.ErrorResponse:
			e := *m
			perr = &e
		case *pgproto3.ReadyForQuery:
			return vals, perr
		}
	}
}

// outcome is how the proxy ended a connection: its last error, if it sent
// one, and whether the connection was then closed.
type outcome struct {
	err     *pgproto3.ErrorResponse
	closed  bool
	readErr error
}

func (o outcome) String() string {
	s := "no error"
	if o.err != nil {
		s = o.err.Severity + " " + o.err.Code + " " + o.err.Message
	}
	if o.closed {
		return s + ", closed"
	}
	return s + ", NOT closed (" + o.readErr.Error() + ")"
}

// finish reads until the proxy closes the connection (or within d does not).
func (r *rawClient) finish(d time.Duration) outcome {
	_ = r.c.SetDeadline(time.Now().Add(d))
	var o outcome
	for {
		m, err := r.fe.Receive()
		if err != nil {
			var ne net.Error
			o.closed = !(errors.As(err, &ne) && ne.Timeout())
			o.readErr = err
			return o
		}
		if e, ok := m.(*pgproto3.ErrorResponse); ok {
			c := *e
			o.err = &c
		}
	}
}

// expectFatal wants a FATAL with code and a closed connection.
func (r *rawClient) expectFatal(code string) {
	r.t.Helper()
	o := r.finish(3 * time.Second)
	if o.err == nil || o.err.Severity != "FATAL" || o.err.Code != code || !o.closed {
		r.t.Fatalf("want FATAL %s and a closed connection, got %v", code, o)
	}
}

// expectClosed wants the connection closed, with a FATAL error or without.
func (r *rawClient) expectClosed(d time.Duration) outcome {
	r.t.Helper()
	o := r.finish(d)
	if !o.closed {
		r.t.Fatalf("connection not closed: %v", o)
	}
	if o.err != nil && o.err.Severity != "FATAL" {
		r.t.Fatalf("want FATAL or nothing before the close, got %v", o)
	}
	return o
}

// TestBadInput: each bad input gets a clear error and a closed connection,
// and afterwards no backend has leaked and the proxy serves normally.
func TestBadInput(t *testing.T) {
	waitNoBackends(t)
	const poolSize = 2
	h := startProxy(t, harnessOpts{poolSize: poolSize, opts: proxy.Options{MaxMessageBytes: 1 << 20}})
	ctx := context.Background()
	tok := token(t, "p1", "authenticated", "bad", nil)
	// A first normal client, so pools exist.
	h.connect("p1", "authenticated", "first").Close(ctx)

	t.Run("startup packet over 10000 bytes", func(t *testing.T) {
		r := h.rawDial(t)
		// Only the header and a little of the body: the proxy must not wait for the rest.
		pkt := startupPacket(proto30, "user", "authenticated", "database", "p1", "application_name", strings.Repeat("a", 20000))
		r.write(pkt[:200])
		o := r.expectClosed(3 * time.Second)
		if o.err != nil && o.err.Code != "08P01" {
			t.Fatalf("want 08P01, got %v", o)
		}
	})
	t.Run("startup packet over 10000 bytes sent whole", func(t *testing.T) {
		r := h.rawDial(t)
		r.write(startupPacket(proto30, "user", "authenticated", "database", "p1", "x", strings.Repeat("a", 20000)))
		r.expectClosed(3 * time.Second)
	})
	t.Run("startup packet too short", func(t *testing.T) {
		r := h.rawDial(t)
		r.write([]byte{0, 0, 0, 4, 0, 3, 0, 0})
		r.expectClosed(3 * time.Second)
	})
	t.Run("garbage at startup", func(t *testing.T) {
		r := h.rawDial(t)
		r.write([]byte("GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"))
		r.expectClosed(3 * time.Second)
	})
	t.Run("garbage with a valid length", func(t *testing.T) {
		r := h.rawDial(t)
		r.write([]byte{0, 0, 0, 16, 0x12, 0x34, 0x56, 0x78, 1, 2, 3, 4, 5, 6, 7, 8})
		r.expectClosed(3 * time.Second)
	})
	t.Run("startup without user", func(t *testing.T) {
		r := h.rawDial(t)
		r.write(startupPacket(proto30, "database", "p1"))
		r.expectFatal("28000")
	})
	t.Run("protocol 2.0", func(t *testing.T) {
		r := h.rawDial(t)
		r.write(startupPacket(proto20, "user", "authenticated", "database", "p1"))
		o := r.expectClosed(3 * time.Second)
		if o.err == nil {
			t.Fatalf("want a FATAL error for protocol 2.0, got %v", o)
		}
	})
	t.Run("protocol 3.2 negotiated down", func(t *testing.T) {
		r := h.rawDial(t)
		r.write(startupPacket(proto32, "user", "authenticated", "database", "p1", "_pq_.cascata_test", "1"))
		npv, ok := r.receive().(*pgproto3.NegotiateProtocolVersion)
		if !ok {
			t.Fatal("want NegotiateProtocolVersion")
		}
		if npv.NewestMinorProtocol != 0 || len(npv.UnrecognizedOptions) != 1 || npv.UnrecognizedOptions[0] != "_pq_.cascata_test" {
			t.Fatalf("NegotiateProtocolVersion %+v", npv)
		}
		key := r.login(tok)
		if key.ProcessID == 0 {
			t.Fatalf("BackendKeyData %+v", key)
		}
		vals, perr := r.query("SELECT current_user")
		if perr != nil || len(vals) != 1 || vals[0] != "authenticated" {
			t.Fatalf("query after negotiation: %v %v", vals, perr)
		}
		r.send(&pgproto3.Terminate{})
	})
	t.Run("unknown project", func(t *testing.T) {
		_, err := h.tryConnect("nope", "authenticated", token(t, "nope", "authenticated", "x", nil))
		if code := sqlstate(err); code != "3D000" {
			t.Fatalf("want 3D000, got %v", err)
		}
	})
	t.Run("unknown project in role.ref user name", func(t *testing.T) {
		r := h.rawDial(t)
		r.write(startupPacket(proto30, "user", "authenticated.nope"))
		if _, ok := r.receive().(*pgproto3.AuthenticationCleartextPassword); ok {
			r.send(&pgproto3.PasswordMessage{Password: token(t, "nope", "authenticated", "x", nil)})
		}
		r.expectFatal("3D000")
	})
	t.Run("malformed JWT", func(t *testing.T) {
		_, err := h.tryConnect("p1", "authenticated", "not-a-jwt")
		if code := sqlstate(err); code != "28P01" {
			t.Fatalf("want 28P01, got %v", err)
		}
	})
	t.Run("JWT of another project", func(t *testing.T) {
		_, err := h.tryConnect("p1", "authenticated", token(t, "p2", "authenticated", "x", nil))
		if code := sqlstate(err); code != "28P01" {
			t.Fatalf("want 28P01, got %v", err)
		}
	})
	t.Run("expired JWT", func(t *testing.T) {
		old := token(t, "p1", "authenticated", "x", map[string]any{"exp": time.Now().Add(-time.Hour).Unix(), "iat": time.Now().Add(-2 * time.Hour).Unix()})
		_, err := h.tryConnect("p1", "authenticated", old)
		if code := sqlstate(err); code != "28P01" {
			t.Fatalf("want 28P01, got %v", err)
		}
	})
	t.Run("role not allowed", func(t *testing.T) {
		_, err := h.tryConnect("p1", "postgres", token(t, "p1", "postgres", "x", nil))
		if code := sqlstate(err); code != "28000" {
			t.Fatalf("want 28000, got %v", err)
		}
	})
	t.Run("user name is not the claimed role", func(t *testing.T) {
		_, err := h.tryConnect("p1", "anon", token(t, "p1", "service_role", "x", nil))
		if code := sqlstate(err); code != "28000" {
			t.Fatalf("want 28000, got %v", err)
		}
	})
	t.Run("no password message", func(t *testing.T) {
		r := h.rawDial(t)
		r.write(startupPacket(proto30, "user", "authenticated", "database", "p1"))
		r.receive() // the password request
		r.send(&pgproto3.Query{String: "SELECT 1"})
		r.expectFatal("08P01")
	})
	t.Run("message over the maximum", func(t *testing.T) {
		r := h.rawDial(t)
		r.write(startupPacket(proto30, "user", "authenticated", "database", "p1"))
		r.login(tok)
		// Only the header and a little of the body: the proxy must judge by the header.
		hdr := []byte{'Q', 0, 0, 0, 0}
		binary.BigEndian.PutUint32(hdr[1:], 2<<20+4)
		r.write(append(hdr, "SELECT '"...))
		r.expectFatal("08P01")
	})
	t.Run("message over the maximum inside a transaction", func(t *testing.T) {
		r := h.rawDial(t)
		r.write(startupPacket(proto30, "user", "authenticated", "database", "p1"))
		r.login(tok)
		if _, perr := r.query("BEGIN; SELECT 1 FROM items LIMIT 1 FOR UPDATE"); perr != nil {
			t.Fatal(perr.Message)
		}
		hdr := []byte{'P', 0, 0, 0, 0}
		binary.BigEndian.PutUint32(hdr[1:], 3<<20+4)
		r.write(hdr)
		r.expectFatal("08P01")
		waitFor(t, "the transaction to be rolled back", 3*time.Second, func() bool { return idleInTx(t) == 0 })
	})
	t.Run("unknown message type", func(t *testing.T) {
		r := h.rawDial(t)
		r.write(startupPacket(proto30, "user", "authenticated", "database", "p1"))
		r.login(tok)
		r.write([]byte{'z', 0, 0, 0, 4})
		r.expectFatal("08P01")
	})
	t.Run("invalid message length", func(t *testing.T) {
		r := h.rawDial(t)
		r.write(startupPacket(proto30, "user", "authenticated", "database", "p1"))
		r.login(tok)
		r.write([]byte{'Q', 0, 0, 0, 2, 'x'})
		r.expectClosed(3 * time.Second)
	})
	// Nothing leaked: no client left, no backend beyond the pools, nothing
	// idle in a transaction; and the proxy still serves.
	waitFor(t, "all bad clients to be gone", 3*time.Second, func() bool { return h.srv.ClientCount() == 0 })
	if n := proxyBackends(t, ""); n > poolSize*len(testProjects) {
		t.Fatalf("%d proxy backends; the pools hold at most %d", n, poolSize*len(testProjects))
	}
	if n := idleInTx(t); n != 0 {
		t.Fatalf("%d proxy backends idle in transaction", n)
	}
	for _, ref := range testProjects {
		c := h.connect(ref, "anon", "after")
		var user string
		if err := c.QueryRow(ctx, "SELECT current_user").Scan(&user); err != nil || user != "anon" {
			t.Fatalf("normal client of %s after the bad inputs: %q %v", ref, user, err)
		}
	}
}

// TestClientLoginTimeout: a client that says nothing, or stops after its
// startup packet, is closed after client_login_timeout; a logged-in client
// is not.
func TestClientLoginTimeout(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1, opts: proxy.Options{ClientLoginTimeout: 300 * time.Millisecond}})
	// A logged-in client may stay idle longer than the login timeout. Logins
	// must fit in 300ms; on a busy machine the first may not, so retry.
	var ok bool
	for range 5 {
		c, err := h.tryConnect("p1", "anon", token(t, "p1", "anon", "x", nil))
		if err != nil {
			continue
		}
		ok = true
		time.Sleep(500 * time.Millisecond)
		var v int
		if err := c.QueryRow(context.Background(), "SELECT 1").Scan(&v); err != nil {
			t.Fatalf("logged-in client after 500ms idle: %v", err)
		}
		c.Close(context.Background())
		break
	}
	if !ok {
		t.Fatal("no login succeeded")
	}

	silent := h.rawDial(t)
	start := time.Now()
	silent.expectClosed(3 * time.Second)
	if d := time.Since(start); d < 250*time.Millisecond || d > 2*time.Second {
		t.Fatalf("silent client closed after %v, want about 300ms", d)
	}

	half := h.rawDial(t)
	half.write(startupPacket(proto30, "user", "anon", "database", "p1"))
	start = time.Now()
	if _, ok := half.receive().(*pgproto3.AuthenticationCleartextPassword); !ok {
		t.Fatal("want a password request")
	}
	half.expectClosed(3 * time.Second)
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("client without password closed after %v, want about 300ms", d)
	}

	// A partial packet that never completes.
	part := h.rawDial(t)
	part.write([]byte{0, 0, 0, 40, 0, 3})
	start = time.Now()
	part.expectClosed(3 * time.Second)
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("client with a partial startup packet closed after %v", d)
	}
	waitFor(t, "clients to be gone", 3*time.Second, func() bool { return h.srv.ClientCount() == 0 })
}

// TestMaxClientConn: the client over max_client_conn gets FATAL 53300; once
// a client leaves, a new one gets in.
func TestMaxClientConn(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1, opts: proxy.Options{MaxClientConn: 3}})
	ctx := context.Background()
	first := h.connect("p2", "anon", "c0")
	h.connect("p2", "anon", "c1")
	h.connect("p2", "anon", "c2")
	_, err := h.tryConnect("p2", "anon", token(t, "p2", "anon", "c3", nil))
	if code := sqlstate(err); code != "53300" {
		t.Fatalf("4th client: want 53300, got %v", err)
	}
	// Raw: the error is FATAL and the connection closed.
	r := h.rawDial(t)
	r.write(startupPacket(proto30, "user", "anon", "database", "p2"))
	r.expectFatal("53300")
	// The refused connections leave the count once their goroutines end,
	// which may be just after their FATAL reached the client.
	waitFor(t, "the refused clients to leave the count", 3*time.Second, func() bool { return h.srv.ClientCount() == 3 })
	first.Close(ctx)
	waitFor(t, "a client slot to free", 3*time.Second, func() bool { return h.srv.ClientCount() == 2 })
	c := h.connect("p2", "anon", "c4")
	var v int
	if err := c.QueryRow(ctx, "SELECT 1").Scan(&v); err != nil {
		t.Fatal(err)
	}
}
