// Package sockio reads and writes TCP sockets with raw read and write
// system calls on Linux, for relays that make several of them per
// message round trip; see New.
package sockio

import (
	"net"
	"syscall"
)

// conn is a plain TCP connection whose Read and Write make raw system
// calls; one goroutine may read while another writes. Everything else is
// the connection's own.
type conn struct {
	net.Conn
	raw        syscall.RawConn
	rd, wr     sockOp
	onReadable func(uintptr) bool // readOnce, made once
	onWritable func(uintptr) bool // writeAll, made once
	onPeek     func(uintptr) bool // WaitReadable's peek, made once
	peekBuf    [1]byte
}

// sockOp is the state of the read or write under way.
type sockOp struct {
	p   []byte
	n   int
	err error
}

// Socket returns the TCP socket beneath c, under TLS too (a *tls.Conn
// over a TCP connection), or nil. Unlike Raw it is for looking at the
// socket (Pending), never for reading it: under TLS the bytes there are
// records that only the TLS layer may read.
func Socket(c net.Conn) syscall.RawConn {
	if tc, ok := c.(interface{ NetConn() net.Conn }); ok {
		c = tc.NetConn()
	}
	return Raw(c)
}

// Raw returns the socket of a plain TCP connection (as New returns it or
// not) for calls driven by the network poller, or nil for anything else
// (TLS, a pipe).
func Raw(c net.Conn) syscall.RawConn {
	switch c := c.(type) {
	case *conn:
		return c.raw
	case *net.TCPConn:
		raw, err := c.SyscallConn()
		if err != nil {
			return nil
		}
		return raw
	}
	return nil
}
