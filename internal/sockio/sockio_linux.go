package sockio

import (
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"
)

// On Linux, New reads and writes plain TCP sockets with raw read and write
// system calls, made inside the socket's RawConn callbacks so the
// network poller still does the waiting. A net.Conn call tells the
// scheduler that its thread enters a system call; a loopback write runs the
// receiver's TCP stack too and is often preempted on a busy machine, and
// the scheduler's monitor then hands the thread's P to another thread,
// which costs futex wake-ups and thread switches, and keeps the monitor
// polling every 20 µs. The sockets are non-blocking, so a raw call never
// waits: EAGAIN hands the wait to the poller as usual.

// New returns c with Read and Write made as above if c is a plain TCP
// connection, and c itself otherwise. A TLS layer over it uses them too.
func New(c net.Conn) net.Conn {
	if _, ok := c.(*net.TCPConn); !ok {
		return c
	}
	raw := Raw(c)
	if raw == nil {
		return c
	}
	s := &conn{Conn: c, raw: raw}
	s.onReadable, s.onWritable = s.readOnce, s.writeAll
	s.onPeek = func(fd uintptr) bool { return peek(fd, &s.peekBuf) }
	return s
}

func (s *conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	r := &s.rd
	r.p, r.n, r.err = p, 0, nil
	err := s.raw.Read(s.onReadable)
	n := r.n
	if err == nil {
		err = r.err
	}
	raceReadDone(p, n)
	r.p, r.err = nil, nil
	return n, err
}

// readOnce reads once; EAGAIN sends the caller to the poller.
func (s *conn) readOnce(fd uintptr) bool {
	r := &s.rd
	for {
		n, _, errno := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&r.p[0])), uintptr(len(r.p)))
		switch errno {
		case 0:
			if n == 0 {
				r.err = io.EOF
			}
			r.n = int(n)
			return true
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		default:
			r.err = &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", errno)}
			return true
		}
	}
}

func (s *conn) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	raceWriteStart(p)
	w := &s.wr
	w.p, w.n, w.err = p, 0, nil
	err := s.raw.Write(s.onWritable)
	n := w.n
	if err == nil {
		err = w.err
	}
	w.p, w.err = nil, nil
	return n, err
}

// writeAll writes until p is gone; EAGAIN (a full send buffer) sends the
// caller to the poller until the socket takes more.
func (s *conn) writeAll(fd uintptr) bool {
	w := &s.wr
	for w.n < len(w.p) {
		rest := w.p[w.n:]
		n, _, errno := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&rest[0])), uintptr(len(rest)))
		switch errno {
		case 0:
			if n == 0 { // a socket never takes nothing without EAGAIN; never spin on it
				w.err = &net.OpError{Op: "write", Net: "tcp", Err: io.ErrShortWrite}
				return true
			}
			w.n += int(n)
		case syscall.EINTR:
		case syscall.EAGAIN:
			return false
		default:
			w.err = &net.OpError{Op: "write", Net: "tcp", Err: os.NewSyscallError("write", errno)}
			return true
		}
	}
	return true
}

// CanWait reports whether WaitReadable can wait on c without a buffer: a
// plain TCP connection (as New returns it or not); not TLS.
func CanWait(c net.Conn) bool { return Raw(c) != nil }

// WaitReadable returns once c has bytes to read (or its peer closed it, or
// it failed), without reading them and without a buffer: a reader may give
// its buffer back while it waits. A peek of one byte tells whether data is
// there; only its EAGAIN hands the wait to the poller, so no readiness edge
// is missed. For a connection CanWait refuses it returns at once.
func WaitReadable(c net.Conn) error {
	if s, ok := c.(*conn); ok {
		return s.raw.Read(s.onPeek) // made once: no allocation per wait
	}
	raw := Raw(c)
	if raw == nil {
		return nil
	}
	var b [1]byte
	return raw.Read(func(fd uintptr) bool { return peek(fd, &b) })
}

// Pending reports whether raw has bytes to read, or its peer closed it, at
// this moment, without reading them and without taking the read side: a
// goroutine waiting on the socket keeps waiting. One system call.
func Pending(raw syscall.RawConn) bool {
	var b [1]byte
	ready := false
	if err := raw.Control(func(fd uintptr) { ready = peek(fd, &b) }); err != nil {
		return true // closed: nothing more will be read from it
	}
	return ready
}

// peek reports whether fd has bytes (or an end or error) to read, without
// reading them; false only for EAGAIN, which sends the caller to the poller.
func peek(fd uintptr, b *[1]byte) bool {
	for {
		_, _, errno := syscall.RawSyscall6(syscall.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&b[0])), 1,
			syscall.MSG_PEEK|syscall.MSG_DONTWAIT, 0, 0)
		switch errno {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		}
		return true
	}
}
