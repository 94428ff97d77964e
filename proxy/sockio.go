package proxy

import (
	"net"
	"syscall"
)

// rawConn returns c's socket for the poller-driven calls of waitIdle and
// socketIO, or nil when c is not a plain TCP connection (TLS, a pipe).
func rawConn(c net.Conn) syscall.RawConn {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return nil
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	return raw
}
