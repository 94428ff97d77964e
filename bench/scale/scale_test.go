package main

import (
	"testing"
	"time"
)

func TestThousands(t *testing.T) {
	for n, want := range map[int]string{0: "0", 999: "999", 1000: "1,000", 2500: "2,500", 10000: "10,000", 1234567: "1,234,567", -1000: "-1,000"} {
		if got := thousands(n); got != want {
			t.Errorf("thousands(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestSpliceSection(t *testing.T) {
	sec := "## Scale: 1,000 projects\n\nnew\n"
	cases := []struct{ name, text, want string }{
		{"appended", "# R\n\n## A\n\na\n", "# R\n\n## A\n\na\n\n" + sec},
		{"replaced at the end", "# R\n\n## Scale: 1,000 projects\n\nold\n", "# R\n\n" + sec},
		{"replaced in the middle", "# R\n\n## Scale: 1,000 projects\n\nold\n### sub\n\n## B\n\nb\n", "# R\n\n" + sec + "\n## B\n\nb\n"},
	}
	for _, c := range cases {
		if got := spliceSection(c.text, sec); got != c.want {
			t.Errorf("%s: got\n%q\nwant\n%q", c.name, got, c.want)
		}
	}
}

func TestClientsFor(t *testing.T) {
	got := clientsFor(25, 10, 4)
	want := []int{10, 10, 5, 0}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("clientsFor(25, 10, 4) = %v, want %v", got, want)
		}
	}
}

func TestDialWindow(t *testing.T) {
	t0 := time.Unix(1000, 0)
	before := dialHist{at: t0, count: 10, buckets: map[float64]float64{0.01: 2, 0.05: 8, 1: 10}}
	after := dialHist{at: t0.Add(2 * time.Second), count: 110, buckets: map[float64]float64{0.01: 2, 0.05: 60, 1: 109}}
	win := after.since(before)
	// 100 logins in 2 s: 58 within 50 ms (the median's bucket), 99 within 1 s.
	if win.n != 100 || win.perSec != 50 || win.p50 != 50*time.Millisecond || win.p99 != time.Second {
		t.Fatalf("window = %+v", win)
	}
	if got, want := win.String(), "100 (50.0/s), ≤ 50ms / ≤ 1s"; got != want {
		t.Fatalf("String() = %q, want %q", got, want)
	}
	// One login slower than the last bucket (1 s here): its quantile is
	// beyond it.
	slow := dialHist{at: t0.Add(time.Second), count: 11, buckets: before.buckets}
	if got, want := slow.since(before).String(), "1 (1.0/s), > 1s / > 1s"; got != want {
		t.Fatalf("String() = %q, want %q", got, want)
	}
	if got := (dialWindow{}).String(); got != "—" {
		t.Fatalf("unmeasured window = %q", got)
	}
}
