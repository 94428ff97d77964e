//go:build !linux

package sockio

import "net"

// New returns c.
func New(c net.Conn) net.Conn { return c }

// CanWait reports false: readers keep their buffers.
func CanWait(net.Conn) bool { return false }

// WaitReadable returns at once.
func WaitReadable(net.Conn) error { return nil }
