// Package parking waits for many idle sockets to become readable on one
// goroutine, so that a connection with nothing to do needs no goroutine of
// its own (and no stack) until its peer speaks.
//
// A Lot is an epoll set. Park registers a socket for one wake-up: when it
// is readable, or its peer hung up, the lot removes it and calls the
// socket's wake function on the lot's goroutine. Unpark takes a socket back
// before that happens. The caller must not close a parked socket: it
// unparks it first. On systems without epoll, New returns ErrUnsupported
// and callers keep a goroutine per connection.
package parking

import "errors"

// ErrUnsupported is returned by New where the system has no epoll.
var ErrUnsupported = errors.New("parking: not supported on this system")

// ErrClosed is returned by Park after Close.
var ErrClosed = errors.New("parking: lot closed")
