package parking

import (
	"errors"
	"fmt"
	"sync"
	"syscall"
)

// Lot is a set of parked sockets and the goroutine that waits for them.
type Lot struct {
	epfd  int
	pipeR int // readable when Close asks the goroutine to stop
	pipeW int

	mu     sync.Mutex
	parked map[int32]func()
	closed bool
	done   chan struct{}
}

// New makes a lot and starts its goroutine, which runs until Close.
func New() (*Lot, error) {
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("parking: epoll_create1: %w", err)
	}
	var p [2]int
	if err := syscall.Pipe2(p[:], syscall.O_CLOEXEC|syscall.O_NONBLOCK); err != nil {
		_ = syscall.Close(epfd)
		return nil, fmt.Errorf("parking: pipe2: %w", err)
	}
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: int32(p[0])}
	if err := syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, p[0], &ev); err != nil {
		_ = syscall.Close(epfd)
		_ = syscall.Close(p[0])
		_ = syscall.Close(p[1])
		return nil, fmt.Errorf("parking: epoll_ctl: %w", err)
	}
	l := &Lot{epfd: epfd, pipeR: p[0], pipeW: p[1], parked: map[int32]func(){}, done: make(chan struct{})}
	go l.run()
	return l, nil
}

// Park registers fd for one wake-up: wake is called on the lot's goroutine
// when fd is readable or hung up, and must not block. Data already waiting
// wakes it at once.
func (l *Lot) Park(fd int, wake func()) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return ErrClosed
	}
	if _, ok := l.parked[int32(fd)]; ok {
		return fmt.Errorf("parking: fd %d is parked already", fd)
	}
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP | syscall.EPOLLONESHOT, Fd: int32(fd)}
	if err := syscall.EpollCtl(l.epfd, syscall.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return fmt.Errorf("parking: epoll_ctl add %d: %w", fd, err)
	}
	l.parked[int32(fd)] = wake
	return nil
}

// Unpark takes fd back and reports whether it was parked; when it was, its
// wake function has not been called and will not be.
func (l *Lot) Unpark(fd int) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := l.parked[int32(fd)]; !ok {
		return false
	}
	l.removeLocked(int32(fd))
	return true
}

// Len is how many sockets are parked.
func (l *Lot) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.parked)
}

func (l *Lot) removeLocked(fd int32) {
	delete(l.parked, fd)
	_ = syscall.EpollCtl(l.epfd, syscall.EPOLL_CTL_DEL, int(fd), nil)
}

// Close stops the lot's goroutine and releases its descriptors. Sockets
// still parked are dropped without a wake-up: callers unpark theirs first.
func (l *Lot) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		<-l.done
		return nil
	}
	l.closed = true
	l.mu.Unlock()
	if _, err := syscall.Write(l.pipeW, []byte{0}); err != nil && !errors.Is(err, syscall.EAGAIN) {
		return fmt.Errorf("parking: stop: %w", err)
	}
	<-l.done
	l.mu.Lock()
	for fd := range l.parked {
		l.removeLocked(fd)
	}
	l.mu.Unlock()
	return errors.Join(syscall.Close(l.epfd), syscall.Close(l.pipeR), syscall.Close(l.pipeW))
}

// run waits for events until Close. It blocks its thread in epoll_wait;
// the Go scheduler runs other goroutines on other threads meanwhile.
func (l *Lot) run() {
	defer close(l.done)
	events := make([]syscall.EpollEvent, 256)
	for {
		n, err := syscall.EpollWait(l.epfd, events, -1)
		if err != nil {
			if errors.Is(err, syscall.EINTR) {
				continue
			}
			return // the descriptor is gone: Close has run
		}
		for _, ev := range events[:n] {
			if ev.Fd == int32(l.pipeR) {
				return
			}
			l.mu.Lock()
			wake, ok := l.parked[ev.Fd]
			if ok {
				l.removeLocked(ev.Fd)
			}
			l.mu.Unlock()
			if ok {
				wake()
			}
		}
	}
}
