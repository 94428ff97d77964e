package main

import (
	"crypto/tls"
	"errors"
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
