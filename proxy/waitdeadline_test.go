package proxy

import (
	"context"
	"errors"
	"testing"
	"time"
)

// Waits that end in the same slot share one context; its deadline is no
// earlier than the wait's timeout and at most a slot later, and it ends.
func TestWaitDeadlinesShareASlot(t *testing.T) {
	const timeout = 200 * time.Millisecond
	d := newWaitDeadlines(timeout)
	if d.slot != int64(2*time.Millisecond) {
		t.Fatalf("slot %v, want a hundredth of the timeout", time.Duration(d.slot))
	}
	start := time.Now()
	a := d.after(timeout)
	b := d.after(timeout)
	end := time.Now()
	deadline, ok := a.Deadline()
	if !ok || deadline.Before(start.Add(timeout)) || deadline.After(end.Add(timeout).Add(time.Duration(d.slot))) {
		t.Fatalf("deadline %v after the start, want [%v, %v]", deadline.Sub(start), timeout, end.Sub(start)+timeout+time.Duration(d.slot))
	}
	if bd, _ := b.Deadline(); bd.Equal(deadline) && a != b {
		t.Fatal("two waits ending in the same slot got two contexts")
	}
	time.Sleep(3 * time.Duration(d.slot))
	c := d.after(timeout)
	if c == a {
		t.Fatal("a wait that ends in a later slot got an earlier slot's context")
	}
	select {
	case <-a.Done():
		if !errors.Is(a.Err(), context.DeadlineExceeded) {
			t.Fatalf("ended with %v", a.Err())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the shared context did not end")
	}
	if waited := time.Since(start); waited < timeout {
		t.Fatalf("ended after %v, before the timeout", waited)
	}
}

// The slot stays within 1 and 100 ms whatever the timeout.
func TestWaitDeadlinesSlotBounds(t *testing.T) {
	for _, c := range []struct{ timeout, slot time.Duration }{
		{10 * time.Millisecond, time.Millisecond},
		{time.Second, 10 * time.Millisecond},
		{time.Hour, 100 * time.Millisecond},
	} {
		if got := time.Duration(newWaitDeadlines(c.timeout).slot); got != c.slot {
			t.Errorf("timeout %v: slot %v, want %v", c.timeout, got, c.slot)
		}
	}
}
