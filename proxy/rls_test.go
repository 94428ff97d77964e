package proxy_test

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// TestRLSHundredUsersThreeBackends: a PostgREST-style RLS policy on
// request.jwt.claims keeps 100 concurrent users apart while they share a
// pool of 3 backends in transaction mode: each sees, changes and deletes
// only its own rows, and cannot write rows for another.
func TestRLSHundredUsersThreeBackends(t *testing.T) {
	ctx := context.Background()
	su := superConnDB(t, "p1")
	if _, err := su.Exec(ctx, `
		DROP TABLE IF EXISTS rls_notes;
		CREATE TABLE rls_notes (
			id bigserial PRIMARY KEY,
			owner text NOT NULL DEFAULT (current_setting('request.jwt.claims', true)::jsonb->>'sub'),
			body text NOT NULL);
		ALTER TABLE rls_notes ENABLE ROW LEVEL SECURITY;
		CREATE POLICY own_rows ON rls_notes TO authenticated
			USING (owner = current_setting('request.jwt.claims', true)::jsonb->>'sub')
			WITH CHECK (owner = current_setting('request.jwt.claims', true)::jsonb->>'sub');
		GRANT SELECT, INSERT, UPDATE, DELETE ON rls_notes TO authenticated;
		GRANT USAGE ON SEQUENCE rls_notes_id_seq TO authenticated;`); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = su.Exec(context.Background(), "DROP TABLE IF EXISTS rls_notes") })

	h := startProxy(t, harnessOpts{poolSize: 3, projects: []string{"p1"}})
	const users, rounds = 100, 3
	modes := []string{"simple_protocol", "cache_statement", "exec"}

	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		pids  = map[uint32]bool{}
		errs  = make(chan error, users*4)
		start = make(chan struct{})
	)
	failf := func(format string, args ...any) { errs <- fmt.Errorf(format, args...) }
	for i := range users {
		sub := fmt.Sprintf("rls-user-%03d", i)
		tok := token(t, "p1", "authenticated", sub, nil)
		wg.Add(1)
		go func() {
			defer wg.Done()
			mode := modes[i%len(modes)]
			u := strings.Replace(h.url("p1", "authenticated", tok),
				"default_query_exec_mode=simple_protocol", "default_query_exec_mode="+mode, 1)
			cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			<-start
			c, err := pgx.Connect(cctx, u)
			if err != nil {
				failf("%s: connect: %v", sub, err)
				return
			}
			defer c.Close(ctx)
			var mine []string
			for r := range rounds {
				body := fmt.Sprintf("%s note %d", sub, r)
				var owner string
				var pid uint32
				if r == 1 {
					// One round inside an explicit transaction.
					tx, err := c.Begin(cctx)
					if err != nil {
						failf("%s: begin: %v", sub, err)
						return
					}
					err = tx.QueryRow(cctx, "INSERT INTO rls_notes (body) VALUES ($1) RETURNING owner, pg_backend_pid()", body).Scan(&owner, &pid)
					if err == nil {
						err = tx.Commit(cctx)
					}
					if err != nil {
						failf("%s: insert in a transaction: %v", sub, err)
						return
					}
				} else if err := c.QueryRow(cctx, "INSERT INTO rls_notes (body) VALUES ($1) RETURNING owner, pg_backend_pid()", body).Scan(&owner, &pid); err != nil {
					failf("%s: insert: %v", sub, err)
					return
				}
				mu.Lock()
				pids[pid] = true
				mu.Unlock()
				if owner != sub {
					failf("%s: inserted row owned by %q", sub, owner)
				}
				mine = append(mine, body)

				rows, err := c.Query(cctx, "SELECT owner, body FROM rls_notes ORDER BY id")
				if err != nil {
					failf("%s: select: %v", sub, err)
					return
				}
				var seen []string
				for rows.Next() {
					var o, b string
					if err := rows.Scan(&o, &b); err != nil {
						failf("%s: scan: %v", sub, err)
						break
					}
					if o != sub {
						failf("%s: sees a row of %s (%q)", sub, o, b)
					}
					seen = append(seen, b)
				}
				rows.Close()
				if err := rows.Err(); err != nil {
					failf("%s: select: %v", sub, err)
					return
				}
				if strings.Join(seen, ",") != strings.Join(mine, ",") {
					failf("%s: round %d sees %q, want %q", sub, r, seen, mine)
				}
			}
			// Writing a row for someone else is refused by the policy.
			victim := fmt.Sprintf("rls-user-%03d", (i+1)%users)
			if _, err := c.Exec(cctx, "INSERT INTO rls_notes (owner, body) VALUES ($1, 'forged')", victim); sqlstate(err) != "42501" {
				failf("%s: insert for %s: %v, want 42501", sub, victim, err)
			}
			// UPDATE and DELETE without a WHERE reach only the user's own rows.
			if tag, err := c.Exec(cctx, "UPDATE rls_notes SET body = body || ' (seen)'"); err != nil || tag.RowsAffected() != rounds {
				failf("%s: update all: %v rows, %v; want %d", sub, tag.RowsAffected(), err, rounds)
			}
			if tag, err := c.Exec(cctx, "DELETE FROM rls_notes WHERE owner = $1", victim); err != nil || tag.RowsAffected() != 0 {
				failf("%s: delete the victim's rows: %v rows, %v; want 0", sub, tag.RowsAffected(), err)
			}
			var n int
			var who string
			if err := c.QueryRow(cctx, "SELECT (SELECT count(*) FROM rls_notes WHERE owner = $1), current_setting('request.jwt.claims')::jsonb->>'sub'", victim).Scan(&n, &who); err != nil || n != 0 || who != sub {
				failf("%s: count of the victim's rows %d as %q (%v), want 0 as %s", sub, n, who, err, sub)
			}
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	nerr := 0
	for err := range errs {
		if nerr++; nerr <= 20 {
			t.Error(err)
		}
	}
	if nerr > 20 {
		t.Errorf("... and %d more errors", nerr-20)
	}

	if len(pids) > 3 {
		t.Errorf("users ran on %d backends, want at most 3", len(pids))
	}
	// As the owner: every user has exactly its own rows, all updated once.
	rows, err := su.Query(ctx, "SELECT owner, count(*), bool_and(body = owner || ' note ' || (rank - 1) || ' (seen)') FROM (SELECT owner, body, rank() OVER (PARTITION BY owner ORDER BY id) FROM rls_notes) s GROUP BY owner")
	if err != nil {
		t.Fatal(err)
	}
	var owners []string
	for rows.Next() {
		var owner string
		var n int
		var ok bool
		if err := rows.Scan(&owner, &n, &ok); err != nil {
			t.Fatal(err)
		}
		owners = append(owners, owner)
		if n != rounds || !ok {
			t.Errorf("owner %s: %d rows (bodies as expected: %v), want %d", owner, n, ok, rounds)
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	sort.Strings(owners)
	if len(owners) != users || owners[0] != "rls-user-000" || owners[users-1] != fmt.Sprintf("rls-user-%03d", users-1) {
		t.Errorf("%d owners in the table (%v ...), want %d", len(owners), owners[:min(3, len(owners))], users)
	}
	t.Logf("%d users on %d backends", users, len(pids))
}
