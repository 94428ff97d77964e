package proxy

import (
	"testing"
	"time"
)

// TestWALHistoryLag: a replica's lag is the age of the oldest primary
// position it has not replayed, whatever the idle time before it.
func TestWALHistoryLag(t *testing.T) {
	sec := int64(time.Second)
	var h walHistory
	if got := h.lagOf(10, 0, 7*time.Second); got != 7*time.Second {
		t.Fatalf("no history: %v, want the fallback", got)
	}
	h.add(100, 0)        // idle for an hour from here
	h.add(100, 3600*sec) // a position seen again keeps its first time
	h.add(200, 3600*sec)
	h.add(300, 3600*sec+sec/2)
	h.add(300, 3601*sec) // a position seen again keeps its first time
	now := 3601 * sec
	for _, tc := range []struct {
		replay   uint64
		fallback time.Duration
		want     time.Duration
	}{
		{300, time.Hour, 0},               // has everything
		{400, time.Hour, 0},               // ahead of the last sample
		{200, time.Hour, time.Second / 2}, // lacks 300, seen half a second ago
		{150, time.Hour, time.Second},     // lacks 200, seen a second ago: not the idle hour
		{100, time.Hour, time.Second},
		{50, time.Hour, time.Hour + time.Second}, // behind the oldest sample: at least its age
		{50, 2 * time.Hour, 2 * time.Hour},       // or the fallback when that is larger
	} {
		if got := h.lagOf(tc.replay, now, tc.fallback); got != tc.want {
			t.Errorf("replay %d: lag %v, want %v", tc.replay, got, tc.want)
		}
	}
	// A position before the last starts again: another server answers.
	h.add(120, 3602*sec)
	if h.n != 1 || h.lagOf(100, 3603*sec, 0) != time.Second || h.lagOf(120, 3603*sec, 0) != 0 {
		t.Fatalf("after the position went back: n=%d", h.n)
	}
	// The ring keeps the newest walHistoryLen positions.
	var r walHistory
	for i := range walHistoryLen + 10 {
		r.add(uint64(i+1), int64(i))
	}
	if r.n != walHistoryLen || !r.truncated || r.get(0).lsn != 11 || r.get(r.n-1).lsn != walHistoryLen+10 {
		t.Fatalf("ring: n=%d truncated=%t first=%d last=%d", r.n, r.truncated, r.get(0).lsn, r.get(r.n-1).lsn)
	}
	if got := r.lagOf(5, int64(walHistoryLen+10), 0); got != time.Duration(walHistoryLen) {
		t.Fatalf("replica behind the whole ring: %v", got)
	}
}
