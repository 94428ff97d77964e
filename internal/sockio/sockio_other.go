//go:build !linux

package sockio

import (
	"net"
	"syscall"
)

// New returns c.
func New(c net.Conn) net.Conn { return c }

// CanWait reports false: readers keep their buffers.
func CanWait(net.Conn) bool { return false }

// WaitReadable returns at once.
func WaitReadable(net.Conn) error { return nil }

// Pending reports false: nothing to look with.
func Pending(syscall.RawConn) bool { return false }
