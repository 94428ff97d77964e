package proxy

import "testing"

// TestBufStackTrim: a trim drops what nobody took since the last one and
// keeps what was in use meanwhile, so spares follow the busiest moment of
// the last interval, not of the process's life.
func TestBufStackTrim(t *testing.T) {
	made := 0
	s := &bufStack[*int]{max: 8, make: func() *int { made++; return new(int) }}
	var held []*int
	for range 6 {
		held = append(held, s.get())
	}
	for _, it := range held {
		s.put(it)
	}
	if got := s.trim(); got != 0 {
		t.Fatalf("first trim dropped %d: the low mark starts at the first trim", got)
	}
	// Two taken and given back in this interval: four were never taken.
	a, b := s.get(), s.get()
	s.put(b)
	s.put(a)
	if got := s.trim(); got != 4 {
		t.Fatalf("trim dropped %d, want the 4 nobody took", got)
	}
	if len(s.items) != 2 || s.items[0] != b || s.items[1] != a {
		t.Fatalf("kept %v, want the 2 in use (%p, %p)", s.items, b, a)
	}
	if got := s.trim(); got != 2 {
		t.Fatalf("an idle interval dropped %d, want the 2 left", got)
	}
	if got := s.dropped.Load(); got != 6 {
		t.Fatalf("dropped counts %d, want 6", got)
	}
	before := made
	_ = s.get()
	if made != before+1 {
		t.Fatal("an empty stack did not make a new item")
	}
}
