// Package sockio reads and writes TCP sockets with raw read and write
// system calls on Linux, for relays that make several of them per
// message round trip; see New.
package sockio

import (
	"net"
	"syscall"
)

// rawConn returns c's socket for the poller-driven calls of waitIdle and
// socketIO, or nil when c is not a plain TCP connection (TLS, a pipe).
func Raw(c net.Conn) syscall.RawConn {
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
