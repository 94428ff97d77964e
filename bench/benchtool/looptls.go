package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"time"

	"github.com/panjf2000/gnet/v2"
)

// TLS on an event loop. crypto/tls wants a net.Conn to read records from
// and write them to, and its handshake is sequential code that blocks. So
// the handshake runs where blocking is cheap: in a goroutine on the plain
// TCP connection, before the loop knows the socket (a client's after its
// SSLRequest, a server's inside pgconn's login). Then the socket is
// enrolled in the loop and loopConn, the net.Conn beneath the TLS layer,
// turns from a pass-through into a view of the loop's buffers: reads
// return the ciphertext the loop took off the socket and then a temporary
// error, which crypto/tls keeps no record of (it keeps the bytes it
// buffered and reads on at the next call), and writes go straight to the
// loop's connection. The handshake's CPU stays off the loop, as a real core
// would want it.

// errWouldBlock ends a TLS read on the loop when the ciphertext the loop
// read is used up. It is temporary: crypto/tls does not make it stick.
var errWouldBlock error = wouldBlock{}

type wouldBlock struct{}

func (wouldBlock) Error() string   { return "no more bytes read from the socket" }
func (wouldBlock) Timeout() bool   { return true }
func (wouldBlock) Temporary() bool { return true }

// loopConn is the net.Conn beneath a TLS connection on the loop: tcp until
// enrolled, then the loop's connection. Before enrolment only the
// goroutine that logs in touches it, after only the loop.
type loopConn struct {
	tcp    net.Conn  // the plain connection, until enrolled
	gc     gnet.Conn // the loop's connection, once enrolled
	in     []byte    // ciphertext read by the loop and not yet taken by TLS
	local  net.Addr
	remote net.Addr
}

func newLoopConn(tcp net.Conn) *loopConn {
	return &loopConn{tcp: tcp, local: tcp.LocalAddr(), remote: tcp.RemoteAddr()}
}

// enrolled hands the connection to the loop; called on the loop (OnOpen).
// The plain connection is gnet's to close: it keeps a duplicate of the
// socket.
func (c *loopConn) enrolled(gc gnet.Conn) { c.tcp, c.gc = nil, gc }

func (c *loopConn) Read(p []byte) (int, error) {
	if c.tcp != nil {
		return c.tcp.Read(p)
	}
	if len(c.in) == 0 {
		return 0, errWouldBlock
	}
	n := copy(p, c.in)
	c.in = c.in[n:]
	return n, nil
}

func (c *loopConn) Write(p []byte) (int, error) {
	if c.tcp != nil {
		return c.tcp.Write(p)
	}
	if c.gc == nil {
		return 0, net.ErrClosed
	}
	return c.gc.Write(p) // on the loop: what the socket does not take now, gnet keeps
}

// Close closes the plain connection before enrolment; after it the loop
// closes its socket itself.
func (c *loopConn) Close() error {
	if c.tcp != nil {
		return c.tcp.Close()
	}
	return nil
}

func (c *loopConn) LocalAddr() net.Addr  { return c.local }
func (c *loopConn) RemoteAddr() net.Addr { return c.remote }

func (c *loopConn) SetDeadline(t time.Time) error {
	if c.tcp != nil {
		return c.tcp.SetDeadline(t)
	}
	return nil
}

func (c *loopConn) SetReadDeadline(t time.Time) error {
	if c.tcp != nil {
		return c.tcp.SetReadDeadline(t)
	}
	return nil
}

func (c *loopConn) SetWriteDeadline(t time.Time) error {
	if c.tcp != nil {
		return c.tcp.SetWriteDeadline(t)
	}
	return nil
}

// loopTLS is a TLS connection on the loop and the plaintext it has
// decrypted and not yet passed on.
type loopTLS struct {
	conn  *tls.Conn
	under *loopConn
	plain []byte
}

// pull decrypts what the loop has read from gc's socket and appends the
// plaintext to t.plain. It fails for a connection TLS has ended (a
// close_notify is io.EOF) or broken.
func (t *loopTLS) pull(gc gnet.Conn) error {
	t.under.in, _ = gc.Next(-1)
	for {
		if cap(t.plain)-len(t.plain) < 4<<10 {
			t.plain = slices.Grow(t.plain, 16<<10)
		}
		n, err := t.conn.Read(t.plain[len(t.plain):cap(t.plain)])
		t.plain = t.plain[:len(t.plain)+n]
		if err != nil {
			t.under.in = nil
			if errors.Is(err, errWouldBlock) {
				return nil
			}
			return err
		}
	}
}

// elSock is a connection on the loop, plain or TLS: the bytes that came
// (decrypted) and the way out.
type elSock struct {
	c   gnet.Conn
	tls *loopTLS // nil for a plain connection
}

// enrolled takes up the loop's connection c (OnOpen); a TLS connection's
// records are read and written through it from now on.
func (k *elSock) enrolled(c gnet.Conn) {
	k.c = c
	if k.tls != nil {
		k.tls.under.enrolled(c)
	}
}

// pull decrypts what came on a TLS connection (pending has it then); a
// plain connection's bytes stay in gnet's buffer.
func (k *elSock) pull() error {
	if k.tls == nil {
		return nil
	}
	return k.tls.pull(k.c)
}

// pending is what came and the loop has not passed on yet.
func (k *elSock) pending() []byte {
	if k.tls != nil {
		return k.tls.plain
	}
	b, _ := k.c.Peek(-1)
	return b
}

// discard drops the first n bytes of pending.
func (k *elSock) discard(n int) {
	if k.tls != nil {
		k.tls.plain = k.tls.plain[:copy(k.tls.plain, k.tls.plain[n:])]
		return
	}
	_, _ = k.c.Discard(n)
}

// take returns everything pending and drops it; the bytes are valid until
// the loop reads the connection again.
func (k *elSock) take() []byte {
	if k.tls != nil {
		b := k.tls.plain
		k.tls.plain = k.tls.plain[:0]
		return b
	}
	b, _ := k.c.Next(-1)
	return b
}

// write sends b (a failed write closes the connection).
func (k *elSock) write(b []byte) error {
	if k.tls != nil {
		_, err := k.tls.conn.Write(b)
		return err
	}
	_, err := k.c.Write(b)
	return err
}

// serverSock is the loop side of a logged-in server connection and the
// plain socket to enroll.
func serverSock(sc *serverConn) (elSock, net.Conn) {
	if sc.under == nil {
		return elSock{}, sc.conn
	}
	return elSock{tls: &loopTLS{conn: sc.conn.(*tls.Conn), under: sc.under}}, sc.under.tcp
}

// clientTLS makes clients come over TLS when the configuration has a
// certificate: they are accepted by a listener of their own on cfg.Listen
// (acceptTLS, which run starts once the first server is in) and, after
// their handshake, enrolled in the loop with the state newTLSClient makes;
// gnet's own listener then takes a loopback port no client is told of. It
// returns the address gnet is to listen on and the TLS listener (nil for
// plain clients).
func (b *loopBase) clientTLS() (string, net.Listener, error) {
	if b.cfg.ClientTLS == nil {
		return b.cfg.Listen, nil, nil
	}
	ln, err := net.Listen("tcp", b.cfg.Listen)
	if err != nil {
		return "", nil, fmt.Errorf("listen: %w", err)
	}
	return "127.0.0.1:0", ln, nil
}

// acceptTLS accepts TLS clients until ln closes, each handshake in a
// goroutine of its own.
func (b *loopBase) acceptTLS(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			if err := b.handshake(c); err != nil {
				_ = c.Close()
			}
		}()
	}
}

// handshake answers a client's SSLRequest, runs the TLS handshake on the
// plain socket and enrolls the client in the loop, whose first look at it
// takes what TLS already holds (the StartupMessage may have come with the
// handshake's last flight). A client that does not ask for TLS is refused,
// as PgBouncer's client_tls_sslmode = require does.
func (b *loopBase) handshake(c net.Conn) error {
	ctx, cancel := context.WithTimeout(b.ctx, 10*time.Second)
	defer cancel()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	// Stopping ends a handshake under way at once, not at its deadline.
	defer context.AfterFunc(b.ctx, func() { _ = c.SetDeadline(time.Now()) })()
	var hdr [8]byte
	for {
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return err
		}
		kind := startupKind(hdr[:])
		if startupLen(hdr[:]) == 8 && kind == codeGSSENC {
			if _, err := c.Write([]byte{'N'}); err != nil {
				return err
			}
			continue
		}
		if startupLen(hdr[:]) != 8 || kind != codeSSLRequest {
			_, _ = c.Write(errorResponse("28000", "pool prototype: TLS required"))
			return errors.New("client without TLS")
		}
		break
	}
	if _, err := c.Write([]byte{'S'}); err != nil {
		return err
	}
	under := newLoopConn(c)
	tc := tls.Server(under, b.cfg.ClientTLS)
	if err := tc.HandshakeContext(ctx); err != nil {
		return err
	}
	if err := c.SetDeadline(time.Time{}); err != nil {
		return err
	}
	return b.register(b.newTLSClient(elSock{tls: &loopTLS{conn: tc, under: under}}), c)
}
