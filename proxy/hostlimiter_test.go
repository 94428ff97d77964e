package proxy

import (
	"sync"
	"sync/atomic"
	"testing"
)

// A closing connection's server exiting is counted in one step: a look at
// the cap under the lock never sees the host over it meanwhile, and so
// never closes a second connection for an excess already met. The host
// here has 3 connections under a cap of 2, one of them closing; its
// server exits again and again while another goroutine looks.
func TestHostExitNeverLooksOverCap(t *testing.T) {
	const rounds = 200000
	h := newHostLimiter("127.0.0.1:1", 3)
	if !h.sem.TryAcquire(3) {
		t.Fatal("a fresh host with a cap of 3 has no 3 slots")
	}
	h.cap.Store(2)
	h.taken.Store(3)
	h.gone.Store(1)
	q, b := &pool{host: h}, &backend{}

	var stop atomic.Bool
	var looks, over int
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for !stop.Load() {
			looks++
			if h.condemnOver(q, b) {
				over++
			}
		}
	}()
	for range rounds {
		h.exited()
		h.mu.Lock()
		if got := h.taken.Load() - h.gone.Load(); got != 2 {
			h.mu.Unlock()
			stop.Store(true)
			wg.Wait()
			t.Fatalf("after the exit, %d connections count against the cap, want 2", got)
		}
		// The next connection starts closing: it holds a slot again.
		if !h.sem.TryAcquire(1) {
			h.mu.Unlock()
			stop.Store(true)
			wg.Wait()
			t.Fatal("the exit gave no slot back")
		}
		h.taken.Add(1)
		h.gone.Add(1)
		h.mu.Unlock()
	}
	stop.Store(true)
	wg.Wait()
	if over > 0 {
		t.Fatalf("the host looked over its cap %d times in %d looks while only a closing server exited", over, looks)
	}
	t.Logf("%d looks, none over the cap", looks)
}
