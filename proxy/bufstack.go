package proxy

import (
	"bufio"
	"sync"
	"sync/atomic"
)

// bufStack keeps the buffers idle clients gave back for the clients with
// bytes in flight. Unlike a sync.Pool it survives garbage collections: a
// busy proxy collects often, and a pool emptied by each collection made
// every transaction allocate (and zero) fresh 32 KiB buffers. It keeps at
// most max; more go to the collector, and so do those nobody took between
// two trims (a burst of clients that has gone idle leaves no spares).
type bufStack[T any] struct {
	mu    sync.Mutex
	items []T
	low   int // the fewest items since the last trim: those nobody took
	max   int
	make  func() T
	// dropped counts buffers left to the collector (the stack was full, or
	// trim dropped them).
	dropped atomic.Int64
}

func (s *bufStack[T]) get() T {
	s.mu.Lock()
	if n := len(s.items); n > 0 {
		it := s.items[n-1]
		var zero T
		s.items[n-1] = zero
		s.items = s.items[:n-1]
		s.low = min(s.low, n-1)
		s.mu.Unlock()
		return it
	}
	s.mu.Unlock()
	return s.make()
}

func (s *bufStack[T]) put(it T) {
	s.mu.Lock()
	if len(s.items) < s.max {
		s.items = append(s.items, it)
	} else {
		s.dropped.Add(1)
	}
	s.mu.Unlock()
}

// trim drops the items that stayed in the stack since the last trim, the
// bottom ones (the top is taken first), and reports how many.
func (s *bufStack[T]) trim() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := min(s.low, len(s.items))
	if n > 0 {
		clear(s.items[:n])
		s.items = append(s.items[:0], s.items[n:]...)
		s.dropped.Add(int64(n))
	}
	s.low = len(s.items)
	return n
}

// maxSpareBuffers bounds each stack: enough for the clients of a busy
// moment, 8 MiB of readers and as much of writers at most.
const maxSpareBuffers = 256

func newReaderStack() *bufStack[*bufio.Reader] {
	return &bufStack[*bufio.Reader]{max: maxSpareBuffers, make: func() *bufio.Reader { return bufio.NewReaderSize(nil, ioBufSize) }}
}

func newWriterStack() *bufStack[*bufio.Writer] {
	return &bufStack[*bufio.Writer]{max: maxSpareBuffers, make: func() *bufio.Writer { return bufio.NewWriterSize(nil, ioBufSize) }}
}
