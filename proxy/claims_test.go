package proxy_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
)

// TestSignedClaims: RLS written with cascata.claims() sees the client's own
// claims, and claims forged through a function the guard cannot see into
// make cascata.claims() fail instead of showing another user's rows.
func TestSignedClaims(t *testing.T) {
	ctx := context.Background()
	owner := connectURL(t, cluster.Primary.SuperuserURL("p1"))
	for _, q := range []string{
		`DROP TABLE IF EXISTS notes`,
		`CREATE TABLE notes (owner text NOT NULL DEFAULT cascata.claims()->>'sub', body text)`,
		`ALTER TABLE notes ENABLE ROW LEVEL SECURITY`,
		`CREATE POLICY own ON notes USING (owner = cascata.claims()->>'sub') WITH CHECK (owner = cascata.claims()->>'sub')`,
		`GRANT SELECT, INSERT ON notes TO authenticated`,
		// What an owner might write carelessly: a SECURITY DEFINER function
		// that passes client input to set_config.
		`CREATE OR REPLACE FUNCTION public.set_pref(name text, val text) RETURNS text
		   LANGUAGE sql SECURITY DEFINER AS $$ SELECT set_config(name, val, false) $$`,
		`GRANT EXECUTE ON FUNCTION public.set_pref(text, text) TO authenticated`,
	} {
		if _, err := owner.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	h := startProxy(t, harnessOpts{poolSize: 3})
	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for i := range 40 {
		sub := fmt.Sprintf("note-user-%d", i)
		tok := token(t, "p1", "authenticated", sub, nil)
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := h.tryConnect("p1", "authenticated", tok)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close(ctx)
			for j := range 3 {
				if _, err := c.Exec(ctx, "INSERT INTO notes (body) VALUES ($1)", fmt.Sprint(j)); err != nil {
					errs <- fmt.Errorf("%s insert: %w", sub, err)
					return
				}
			}
			var n, mine int
			if err := c.QueryRow(ctx, "SELECT count(*), count(*) FILTER (WHERE owner = $1) FROM notes", sub).Scan(&n, &mine); err != nil {
				errs <- fmt.Errorf("%s select: %w", sub, err)
				return
			}
			if n != 3 || mine != 3 {
				errs <- fmt.Errorf("%s sees %d rows, %d of them its own", sub, n, mine)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	// Forge another user's claims through the owner's function, then read
	// in the same transaction (same backend).
	c := h.connect("p1", "authenticated", "attacker")
	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	var dummy string
	if err := tx.QueryRow(ctx, `SELECT public.set_pref('request.jwt.claims', '{"sub":"note-user-1","role":"authenticated"}')`).Scan(&dummy); err != nil {
		t.Fatalf("the forging call itself: %v", err)
	}
	var n int
	err = tx.QueryRow(ctx, "SELECT count(*) FROM notes").Scan(&n)
	if sqlstate(err) != "42501" {
		t.Fatalf("after forged claims: got %d rows, err %v; want 42501 from cascata.claims()", n, err)
	}
}
