package proxy_test

import (
	"testing"
	"time"

	"cascata/proxy"

	"github.com/jackc/pgx/v5"
)

// A client of a paused project waits at most query_wait_timeout, then gets
// 57P03 and keeps its connection: once the project resumes, its next
// statement runs. Over the simple and the extended protocol; another
// project's clients are not held.
func TestPausedProjectPastWaitTimeout(t *testing.T) {
	const wait = 300 * time.Millisecond
	h := startProxy(t, harnessOpts{projects: []string{"p1", "p2"}, opts: proxy.Options{QueryWaitTimeout: wait}})
	ctx := t.Context()
	clients := map[string]*pgx.Conn{
		"simple":   h.connect("p1", "authenticated", "paused-simple"),
		"extended": h.connectMode("p1", "authenticated", "paused-extended", "cache_statement"),
	}
	other := h.connect("p2", "authenticated", "not-paused")
	if err := h.srv.Pause(ctx, "p1"); err != nil {
		t.Fatal(err)
	}
	for name, c := range clients {
		start := time.Now()
		var v int
		err := c.QueryRow(ctx, "SELECT 1").Scan(&v)
		took := time.Since(start)
		if sqlstate(err) != "57P03" {
			t.Fatalf("%s: a statement of a paused project: %v, want 57P03", name, err)
		}
		if took < wait || took > wait+5*time.Second {
			t.Errorf("%s: 57P03 after %v, want after query_wait_timeout %v", name, took, wait)
		}
	}
	var v int
	if err := other.QueryRow(ctx, "SELECT 1").Scan(&v); err != nil {
		t.Fatalf("another project's client while p1 is paused: %v", err)
	}
	h.srv.Resume("p1")
	for name, c := range clients {
		if err := c.QueryRow(ctx, "SELECT 2").Scan(&v); err != nil || v != 2 {
			t.Fatalf("%s: the same connection after the resume: %d %v", name, v, err)
		}
	}
}
