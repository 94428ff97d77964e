package proxy_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// TestSettingsFollowTheClient: startup parameters and session SETs follow
// a client across transactions on shared backends, a SET rolled back with
// its transaction is gone, and no other client ever sees them.
func TestSettingsFollowTheClient(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 2})
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for i := range 12 {
		sub := fmt.Sprintf("s%d", i)
		tok := token(t, "p2", "authenticated", sub, nil)
		wg.Add(1)
		go func() {
			defer wg.Done()
			mode := []string{"simple_protocol", "cache_statement"}[i%2]
			u := h.url("p2", "authenticated", tok)
			u = strings.Replace(u, "default_query_exec_mode=simple_protocol", "default_query_exec_mode="+mode, 1)
			u += "&application_name=app-" + sub
			c, err := connectRaw(ctx, u)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close(ctx)
			want := fmt.Sprintf("%d", 100+i)
			if _, err := c.Exec(ctx, "SET statement_timeout = "+want); err != nil {
				errs <- err
				return
			}
			// Rolled back: must not stick.
			tx, err := c.Begin(ctx)
			if err != nil {
				errs <- err
				return
			}
			if _, err := tx.Exec(ctx, "SET work_mem = '77MB'"); err != nil {
				errs <- err
				return
			}
			_ = tx.Rollback(ctx)
			for range 15 {
				var st, app, wm string
				if err := c.QueryRow(ctx, "SELECT current_setting('statement_timeout'), current_setting('application_name'), current_setting('work_mem')").Scan(&st, &app, &wm); err != nil {
					errs <- fmt.Errorf("%s: %w", sub, err)
					return
				}
				if st != want+"ms" || app != "app-"+sub || wm == "77MB" {
					errs <- fmt.Errorf("%s (%s): statement_timeout=%s application_name=%s work_mem=%s", sub, mode, st, app, wm)
					return
				}
			}
			var shown string
			if err := c.QueryRow(ctx, "SHOW statement_timeout").Scan(&shown); err != nil || shown != want+"ms" {
				errs <- fmt.Errorf("%s: SHOW statement_timeout = %q (%v)", sub, shown, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// A client that set nothing sees the defaults.
	c := h.connect("p2", "anon", "plain")
	var st string
	if err := c.QueryRow(ctx, "SELECT current_setting('statement_timeout')").Scan(&st); err != nil || st != "0" {
		t.Fatalf("fresh client sees statement_timeout=%q (%v)", st, err)
	}
}

// TestShortTimeoutNotLeftOnBackend: a statement_timeout below a second
// that a client keeps for its session (set with SET over either protocol,
// with set_config, or given at startup) is put back to the default on its backend at the
// end of each of its units, in the proxy's read-back, so that the next
// client's setup never runs under it. The client keeps its timeout: it is
// in force again in its next unit.
func TestShortTimeoutNotLeftOnBackend(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1, projects: []string{"p1"}})
	ctx := context.Background()
	// resetSeen waits until the backend pid is idle after the proxy's
	// reset of statement_timeout.
	resetSeen := func(what string, pid int) {
		t.Helper()
		waitFor(t, what+": statement_timeout put back on backend "+fmt.Sprint(pid), 10*time.Second, func() bool {
			var q string
			err := superConn(t).QueryRow(ctx, "SELECT query FROM pg_stat_activity WHERE pid = $1 AND state = 'idle'", pid).Scan(&q)
			return err == nil && strings.HasSuffix(q, "RESET statement_timeout")
		})
	}
	check := func(what string, c *pgx.Conn, want string) {
		t.Helper()
		var pid int
		if err := c.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		resetSeen(what, pid)
		var got string
		if err := c.QueryRow(ctx, "SHOW statement_timeout").Scan(&got); err != nil || got != want {
			t.Fatalf("%s: statement_timeout %q (%v), want %q: the client keeps its own", what, got, err, want)
		}
		resetSeen(what+", SHOW", pid)
		_, err := c.Exec(ctx, "SELECT pg_sleep(2)")
		if code := sqlstate(err); code != "57014" {
			t.Fatalf("%s: a 2 s sleep under the client's timeout of %s: %v (SQLSTATE %q), want 57014", what, want, err, code)
		}
	}

	// Each way an anon client can set a short timeout, over the simple and
	// the extended protocol: alone, through set_config, behind another
	// statement in one simple Query, and in a transaction block that
	// commits it.
	for _, f := range []struct {
		what, name, sql string
		mode            pgx.QueryExecMode
		want            string
	}{
		{"SET, simple protocol", "short-simple", "SET statement_timeout = '200ms'", pgx.QueryExecModeSimpleProtocol, "200ms"},
		{"SET, extended protocol", "short-extended", "SET statement_timeout = 300", pgx.QueryExecModeExec, "300ms"},
		{"set_config", "short-set-config", "SELECT pg_catalog.set_config('statement_timeout', '250ms', false)", pgx.QueryExecModeSimpleProtocol, "250ms"},
		{"SET behind another statement", "short-multi", "SELECT 1; SET statement_timeout = 150", pgx.QueryExecModeSimpleProtocol, "150ms"},
		{"SET in a committed block", "short-block", "BEGIN; SET statement_timeout = 175; COMMIT", pgx.QueryExecModeSimpleProtocol, "175ms"},
	} {
		c := h.connect("p1", "anon", f.name)
		if _, err := c.Exec(ctx, f.sql, f.mode); err != nil {
			t.Fatalf("%s: %v", f.what, err)
		}
		check(f.what, c, f.want)
	}

	tok := token(t, "p1", "anon", "short-startup", nil)
	startup, err := pgx.Connect(ctx, h.url("p1", "anon", tok)+"&statement_timeout=400")
	if err != nil {
		t.Fatal(err)
	}
	defer startup.Close(ctx)
	check("startup parameter", startup, "400ms")

	// A timeout of a second or more is the client's as well.
	long := h.connect("p1", "authenticated", "long")
	if _, err := long.Exec(ctx, "SET statement_timeout = '5s'"); err != nil {
		t.Fatal(err)
	}
	if _, err := long.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	var got string
	if err := long.QueryRow(ctx, "SHOW statement_timeout").Scan(&got); err != nil || got != "5s" {
		t.Fatalf("statement_timeout %q (%v), want 5s", got, err)
	}
}
