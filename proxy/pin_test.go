package proxy_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"cascata/internal/stats"
	"cascata/proxy"

	"github.com/jackc/pgx/v5"
)

// Pinning: in transaction mode a client that creates session state it
// means to keep (a temporary table, LISTEN, a WITH HOLD cursor, a session
// advisory lock) keeps its backend while the state lasts, and nobody else
// ever sees it.

const pinProject = "p2"

// pinStat is the pin statistics of project ref.
func pinStat(t testing.TB, h *harness, ref string) stats.Pin {
	t.Helper()
	for _, ps := range h.srv.PinStats() {
		if ps.Project == ref {
			return ps
		}
	}
	t.Fatalf("no pin statistics for %s", ref)
	return stats.Pin{}
}

func pinnedCount(t testing.TB, h *harness, ref string) int {
	t.Helper()
	return pinStat(t, h, ref).Pinned
}

func backendPID(t testing.TB, c *pgx.Conn) int {
	t.Helper()
	var pid int
	if err := c.QueryRow(context.Background(), "SELECT pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	return pid
}

func TestPinTemporaryTable(t *testing.T) {
	for _, m := range execModes {
		t.Run(m.name, func(t *testing.T) {
			h := startProxy(t, harnessOpts{poolSize: 3, projects: []string{pinProject}})
			ctx := context.Background()
			a := h.connect(pinProject, "authenticated", "alice")
			b := h.connect(pinProject, "authenticated", "bob")
			if _, err := a.Exec(ctx, "CREATE TEMP TABLE scratch (x int)", m.mode); err != nil {
				t.Fatal(err)
			}
			if got := pinnedCount(t, h, pinProject); got != 1 {
				t.Fatalf("%d pinned clients after CREATE TEMP TABLE, want 1", got)
			}
			pid := backendPID(t, a)
			// Many transactions later, and while another client works, the
			// table is there, on the same backend, and only for its client.
			for i := range 5 {
				if _, err := a.Exec(ctx, "INSERT INTO scratch VALUES ($1)", m.mode, i); err != nil {
					t.Fatalf("insert %d: %v", i, err)
				}
				if _, err := b.Exec(ctx, "SELECT * FROM scratch", m.mode); sqlstate(err) != "42P01" {
					t.Fatalf("another client reads the temporary table: %v", err)
				}
			}
			var n int
			if err := a.QueryRow(ctx, "SELECT count(*) FROM scratch", m.mode).Scan(&n); err != nil || n != 5 {
				t.Fatalf("count: %d, %v", n, err)
			}
			if got := backendPID(t, a); got != pid {
				t.Fatalf("the pinned client moved from backend %d to %d", pid, got)
			}
			if got := backendPID(t, b); got == pid {
				t.Fatal("another client got the pinned backend")
			}
			// Dropping the table gives the backend back.
			if _, err := a.Exec(ctx, "DROP TABLE scratch", m.mode); err != nil {
				t.Fatal(err)
			}
			if got := pinnedCount(t, h, pinProject); got != 0 {
				t.Fatalf("%d pinned clients after DROP TABLE, want 0", got)
			}
			// A temporary table created and rolled back pins nothing.
			tx, err := a.Begin(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := tx.Exec(ctx, "CREATE TEMP TABLE gone (x int)", m.mode); err != nil {
				t.Fatal(err)
			}
			if err := tx.Rollback(ctx); err != nil {
				t.Fatal(err)
			}
			if got := pinnedCount(t, h, pinProject); got != 0 {
				t.Fatalf("%d pinned clients after a rolled back CREATE TEMP TABLE, want 0", got)
			}
		})
	}
}

// A pinned client that leaves gives its backend back as a new connection
// would be, and its slot with it.
func TestPinnedClientLeaves(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1, projects: []string{pinProject}})
	ctx := context.Background()
	a := h.connect(pinProject, "anon", "attacker")
	for _, sql := range []string{
		"CREATE TEMP TABLE items (id int, owner text, body text)",
		"LISTEN loot",
		"SELECT pg_advisory_lock(77)",
		"BEGIN; DECLARE loot CURSOR WITH HOLD FOR SELECT 1; COMMIT",
		"SET search_path = pg_temp, public",
	} {
		if _, err := a.Exec(ctx, sql, pgx.QueryExecModeSimpleProtocol); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	pid := backendPID(t, a)
	a.Close(ctx)
	waitFor(t, "the slot to come back", 5*time.Second, func() bool { return pinnedCount(t, h, pinProject) == 0 })
	v := h.connect(pinProject, "authenticated", "victim")
	if got := backendPID(t, v); got != pid {
		t.Fatalf("pool_size 1: the victim runs on backend %d, not the pinned one %d", got, pid)
	}
	var user, sp string
	var temps, listens, locks, cursors int
	if err := v.QueryRow(ctx, `SELECT current_user, current_setting('search_path'),
		(SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())::int,
		(SELECT count(*) FROM pg_listening_channels())::int,
		(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())::int,
		(SELECT count(*) FROM pg_class WHERE relname = 'loot')::int`).Scan(&user, &sp, &temps, &listens, &locks, &cursors); err != nil {
		t.Fatal(err)
	}
	if user != "authenticated" || strings.Contains(sp, "pg_temp") || temps != 0 || listens != 0 || locks != 0 {
		t.Fatalf("the next client found: user %s, search_path %q, %d temporary objects, %d channels, %d advisory locks",
			user, sp, temps, listens, locks)
	}
}

// Past max_pinned a statement that would pin waits query_wait_timeout for
// a slot, then gets 53300 naming the setting, runs nothing, and the client
// goes on; a slot given back is free again.
func TestPinBound(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 4, maxPinned: 1, projects: []string{pinProject},
		opts: proxy.Options{QueryWaitTimeout: 300 * time.Millisecond}})
	ctx := context.Background()
	a := h.connect(pinProject, "authenticated", "alice")
	b := h.connect(pinProject, "authenticated", "bob")
	if _, err := a.Exec(ctx, "SELECT pg_advisory_lock(4711)"); err != nil {
		t.Fatal(err)
	}
	for _, m := range execModes {
		for _, sql := range []string{"CREATE TEMP TABLE t (x int)", "LISTEN ch", "SELECT pg_advisory_lock(1)"} {
			_, err := b.Exec(ctx, sql, m.mode)
			if sqlstate(err) != "53300" || !strings.Contains(err.Error(), "max_pinned") {
				t.Fatalf("%s %s past max_pinned: %v, want 53300 naming max_pinned", m.name, sql, err)
			}
		}
		// Inside a transaction the refusal aborts it, as an error would.
		tx, err := b.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, "CREATE TEMP TABLE t (x int)", m.mode); sqlstate(err) != "53300" {
			t.Fatalf("%s: in a transaction: %v", m.name, err)
		}
		if _, err := tx.Exec(ctx, "SELECT 1"); sqlstate(err) != "25P02" {
			t.Fatalf("%s: the transaction goes on after the refusal: %v", m.name, err)
		}
		_ = tx.Rollback(ctx)
	}
	var held bool
	if err := b.QueryRow(ctx, "SELECT NOT pg_try_advisory_xact_lock(4711)").Scan(&held); err != nil || !held {
		t.Fatalf("the pinned client's advisory lock: held %v, %v", held, err)
	}
	if _, err := a.Exec(ctx, "SELECT pg_advisory_unlock(4711)"); err != nil {
		t.Fatal(err)
	}
	if got := pinnedCount(t, h, pinProject); got != 0 {
		t.Fatalf("%d pinned after the unlock, want 0", got)
	}
	if _, err := b.Exec(ctx, "CREATE TEMP TABLE t (x int)"); err != nil {
		t.Fatalf("a free slot: %v", err)
	}
}

// A client waiting for a slot (GET /v1/pools shows it) gets the one given
// back.
func TestPinWaitsForSlot(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 4, maxPinned: 1, projects: []string{pinProject},
		opts: proxy.Options{QueryWaitTimeout: 10 * time.Second}})
	ctx := context.Background()
	a := h.connect(pinProject, "authenticated", "alice")
	b := h.connect(pinProject, "authenticated", "bob")
	if _, err := b.Exec(ctx, "CREATE TEMP TABLE t (x int)"); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := a.Exec(ctx, "LISTEN waiting")
		done <- err
	}()
	waitFor(t, "a to wait for a slot", 5*time.Second, func() bool { return pinStat(t, h, pinProject).Waiting == 1 })
	if _, err := b.Exec(ctx, "DROP TABLE t"); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("the waiting client: %v", err)
	}
	if got := pinnedCount(t, h, pinProject); got != 1 {
		t.Fatalf("%d pinned after the waiting client's LISTEN, want 1", got)
	}
}

// LISTEN works in transaction mode: notifications reach the pinned client
// while it is idle, and UNLISTEN gives its backend back.
func TestPinListenNotify(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 2, projects: []string{pinProject}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	l := h.connect(pinProject, "authenticated", "listener")
	n := h.connect(pinProject, "authenticated", "notifier")
	if _, err := l.Exec(ctx, "LISTEN chan_a"); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		payload := strings.Repeat("x", i+1)
		if _, err := n.Exec(ctx, "SELECT pg_notify('chan_a', $1)", payload); err != nil {
			t.Fatal(err)
		}
		wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
		note, err := l.WaitForNotification(wctx)
		wcancel()
		if err != nil {
			t.Fatalf("notification %d: %v", i, err)
		}
		if note.Channel != "chan_a" || note.Payload != payload {
			t.Fatalf("notification %d: %+v", i, note)
		}
		if _, err := l.Exec(ctx, "SELECT 1"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := l.Exec(ctx, "UNLISTEN chan_a"); err != nil {
		t.Fatal(err)
	}
	if got := pinnedCount(t, h, pinProject); got != 0 {
		t.Fatalf("%d pinned after UNLISTEN, want 0", got)
	}
}

// A pinned client's unnamed statement survives the proxy's look at its
// backend between batches (pgx's describe_exec: Parse and Describe, then
// Bind and Execute).
func TestPinnedUnnamedStatement(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 2, projects: []string{pinProject}})
	ctx := context.Background()
	c := h.connect(pinProject, "authenticated", "unnamed")
	if _, err := c.Exec(ctx, "CREATE TEMP TABLE u (x int)"); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if _, err := c.Exec(ctx, "INSERT INTO u VALUES ($1)", pgx.QueryExecModeDescribeExec, i); err != nil {
			t.Fatalf("insert %d: %v", i, err)
		}
	}
	var n int
	if err := c.QueryRow(ctx, "SELECT count(*) FROM u WHERE x >= $1", pgx.QueryExecModeDescribeExec, 0).Scan(&n); err != nil || n != 3 {
		t.Fatalf("count: %d, %v", n, err)
	}
}

// A WITH HOLD cursor outlives its transaction in transaction mode: its
// client keeps the backend until it closes the cursor.
func TestPinHeldCursor(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 2, projects: []string{pinProject}})
	ctx := context.Background()
	c := h.connect(pinProject, "authenticated", "cursor")
	other := h.connect(pinProject, "authenticated", "other")
	if _, err := c.Exec(ctx, "BEGIN; DECLARE held CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 10) g; COMMIT", pgx.QueryExecModeSimpleProtocol); err != nil {
		t.Fatal(err)
	}
	if got := pinnedCount(t, h, pinProject); got != 1 {
		t.Fatalf("%d pinned after DECLARE WITH HOLD, want 1", got)
	}
	for want := 1; want <= 3; want++ {
		var g int
		if err := c.QueryRow(ctx, "FETCH 1 FROM held", pgx.QueryExecModeSimpleProtocol).Scan(&g); err != nil || g != want {
			t.Fatalf("FETCH %d: %d %v", want, g, err)
		}
		if _, err := other.Exec(ctx, "FETCH 1 FROM held", pgx.QueryExecModeSimpleProtocol); sqlstate(err) != "34000" {
			t.Fatalf("another client fetches the held cursor: %v", err)
		}
	}
	if _, err := c.Exec(ctx, "CLOSE held", pgx.QueryExecModeSimpleProtocol); err != nil {
		t.Fatal(err)
	}
	if got := pinnedCount(t, h, pinProject); got != 0 {
		t.Fatalf("%d pinned after CLOSE, want 0", got)
	}
}
