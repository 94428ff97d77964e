package parking

import (
	"syscall"
	"testing"
	"time"
)

// pair returns the two ends of a connected stream socket pair.
func pair(t *testing.T) (int, int) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = syscall.Close(fds[0])
		_ = syscall.Close(fds[1])
	})
	return fds[0], fds[1]
}

func newLot(t *testing.T) *Lot {
	t.Helper()
	l, err := New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Error(err)
		}
	})
	return l
}

// woken returns a wake function and a channel it signals once.
func woken() (func(), chan struct{}) {
	ch := make(chan struct{}, 2)
	return func() { ch <- struct{}{} }, ch
}

func expectWake(t *testing.T, ch chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatalf("no wake-up after %s", what)
	}
}

func expectNoWake(t *testing.T, ch chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
		t.Fatalf("woken after %s", what)
	case <-time.After(100 * time.Millisecond):
	}
}

func TestParkWakesOnData(t *testing.T) {
	l := newLot(t)
	a, b := pair(t)
	wake, ch := woken()
	if err := l.Park(a, wake); err != nil {
		t.Fatal(err)
	}
	expectNoWake(t, ch, "nothing was written")
	if l.Len() != 1 {
		t.Fatalf("Len %d, want 1", l.Len())
	}
	if _, err := syscall.Write(b, []byte("x")); err != nil {
		t.Fatal(err)
	}
	expectWake(t, ch, "a write")
	if l.Len() != 0 || l.Unpark(a) {
		t.Fatal("a woken socket is still parked")
	}
	// One wake-up per Park: the unread byte wakes it again only once parked again.
	expectNoWake(t, ch, "the first wake-up")
	if err := l.Park(a, wake); err != nil {
		t.Fatal(err)
	}
	expectWake(t, ch, "parking a socket with data waiting")
}

func TestParkWakesOnHangUp(t *testing.T) {
	l := newLot(t)
	a, b := pair(t)
	wake, ch := woken()
	if err := l.Park(a, wake); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Shutdown(b, syscall.SHUT_WR); err != nil {
		t.Fatal(err)
	}
	expectWake(t, ch, "the peer hung up")
}

func TestUnparkBeforeData(t *testing.T) {
	l := newLot(t)
	a, b := pair(t)
	wake, ch := woken()
	if err := l.Park(a, wake); err != nil {
		t.Fatal(err)
	}
	if err := l.Park(a, wake); err == nil {
		t.Fatal("a second Park of the same socket was accepted")
	}
	if !l.Unpark(a) {
		t.Fatal("Unpark of a parked socket reported false")
	}
	if l.Unpark(a) {
		t.Fatal("a second Unpark reported true")
	}
	if _, err := syscall.Write(b, []byte("x")); err != nil {
		t.Fatal(err)
	}
	expectNoWake(t, ch, "Unpark")
}

func TestManyParked(t *testing.T) {
	l := newLot(t)
	const n = 300 // more than one epoll_wait batch
	ends := make([]int, n)
	wakes := make(chan int, n)
	for i := range n {
		a, b := pair(t)
		ends[i] = b
		if err := l.Park(a, func() { wakes <- i }); err != nil {
			t.Fatal(err)
		}
	}
	for _, b := range ends {
		if _, err := syscall.Write(b, []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	seen := make(map[int]bool, n)
	deadline := time.After(10 * time.Second)
	for len(seen) < n {
		select {
		case i := <-wakes:
			if seen[i] {
				t.Fatalf("socket %d woken twice", i)
			}
			seen[i] = true
		case <-deadline:
			t.Fatalf("%d of %d woken", len(seen), n)
		}
	}
}

func TestCloseWithParked(t *testing.T) {
	l, err := New()
	if err != nil {
		t.Fatal(err)
	}
	a, _ := pair(t)
	wake, ch := woken()
	if err := l.Park(a, wake); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := l.Park(a, wake); err != ErrClosed {
		t.Fatalf("Park after Close: %v, want ErrClosed", err)
	}
	expectNoWake(t, ch, "Close")
}
