package proxy_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
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
