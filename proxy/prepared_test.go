package proxy_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"cascata/internal/pgtest"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// connectMode connects with a given pgx query exec mode (no simple-protocol override).
func (h *harness) connectMode(ref, role, sub, mode string) *pgx.Conn {
	h.t.Helper()
	c, err := h.tryConnectMode(ref, role, token(h.t, ref, role, sub, nil), mode)
	if err != nil {
		h.t.Fatalf("connect (%s): %v", mode, err)
	}
	h.t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// tryConnectMode is connectMode with a token minted beforehand, for
// goroutines other than the test's: it fails nothing, the caller closes c.
func (h *harness) tryConnectMode(ref, role, tok, mode string) (*pgx.Conn, error) {
	u := strings.Replace(h.url(ref, role, tok), "default_query_exec_mode=simple_protocol", "default_query_exec_mode="+mode, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return pgx.Connect(ctx, u)
}

// TestPreparedStatementsEveryExecMode: every pgx exec mode works in
// transaction mode while clients share few backends.
func TestPreparedStatementsEveryExecMode(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 2})
	ctx := context.Background()
	modes := []string{"cache_statement", "cache_describe", "describe_exec", "exec", "simple_protocol"}
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for i := range 20 {
		mode := modes[i%len(modes)]
		sub := fmt.Sprintf("u%d", i)
		tok := token(t, "p1", "authenticated", sub, nil)
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := h.tryConnectMode("p1", "authenticated", tok, mode)
			if err != nil {
				errs <- fmt.Errorf("%s: connect: %w", mode, err)
				return
			}
			defer c.Close(ctx)
			for j := range 30 {
				var got int
				var who string
				if err := c.QueryRow(ctx, "SELECT $1::int + 1, current_setting('request.jwt.claims')::jsonb->>'sub'", j).Scan(&got, &who); err != nil {
					errs <- fmt.Errorf("%s: %w", mode, err)
					return
				}
				if got != j+1 || who != sub {
					errs <- fmt.Errorf("%s: got %d/%s want %d/%s", mode, got, who, j+1, sub)
					return
				}
				tx, err := c.Begin(ctx)
				if err != nil {
					errs <- fmt.Errorf("%s: begin: %w", mode, err)
					return
				}
				if _, err := tx.Exec(ctx, "INSERT INTO items (body) VALUES ($1)", mode); err != nil {
					errs <- fmt.Errorf("%s: insert: %w", mode, err)
					return
				}
				if err := tx.Rollback(ctx); err != nil {
					errs <- fmt.Errorf("%s: rollback: %w", mode, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestPreparedOncePerBackend: the same text prepared by many clients is
// prepared once on the shared backend.
func TestPreparedOncePerBackend(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	ctx := context.Background()
	for i := range 30 {
		c := h.connectMode("p2", "anon", fmt.Sprint(i), "cache_statement")
		var n int
		if err := c.QueryRow(ctx, "SELECT 42 + $1::int", 1).Scan(&n); err != nil || n != 43 {
			t.Fatalf("client %d: %v %d", i, err, n)
		}
		c.Close(ctx)
	}
	// Clients cannot read pg_prepared_statements in transaction mode (it
	// lists other clients' statements); an owner's function can.
	su := pgtest.Connect(t, cluster.Primary.SuperuserURL("p2"))
	if _, err := su.Exec(ctx, `CREATE OR REPLACE FUNCTION public.count_prepared(q text) RETURNS int LANGUAGE sql SECURITY DEFINER
		AS 'SELECT count(*)::int FROM pg_prepared_statements WHERE statement = q';
		GRANT EXECUTE ON FUNCTION public.count_prepared(text) TO anon`); err != nil {
		t.Fatal(err)
	}
	c := h.connectMode("p2", "anon", "x", "simple_protocol")
	var n int
	if err := c.QueryRow(ctx, "SELECT count_prepared('SELECT 42 + $1::int')").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Fatalf("statement prepared %d times on the backend, want 1", n)
	}
}

// TestPreparedErrors: unknown and duplicate names give PostgreSQL's SQLSTATEs
// with the client's names, and the session stays usable.
func TestPreparedErrors(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	ctx := context.Background()
	c := h.connectMode("p3", "anon", "x", "cache_statement")
	pc := c.PgConn()
	if _, err := pc.Prepare(ctx, "mine", "SELECT 1", nil); err != nil {
		t.Fatal(err)
	}
	_, err := pc.Prepare(ctx, "mine", "SELECT 2", nil)
	if sqlstate(err) != "42P05" || !strings.Contains(err.Error(), `"mine"`) {
		t.Fatalf("duplicate prepare: %v", err)
	}
	res := pc.ExecPrepared(ctx, "nope", nil, nil, nil).Read()
	if sqlstate(res.Err) != "26000" || !strings.Contains(res.Err.Error(), `"nope"`) {
		t.Fatalf("unknown statement: %v", res.Err)
	}
	if _, err := pc.Prepare(ctx, "q2", "SELECT $1::text || 'x'", nil); err != nil {
		t.Fatal(err)
	}
	// Used in a later transaction, after other clients had the backend.
	other := h.connectMode("p3", "authenticated", "y", "cache_statement")
	if _, err := other.Exec(ctx, "SELECT 'other'"); err != nil {
		t.Fatal(err)
	}
	res = pc.ExecPrepared(ctx, "q2", [][]byte{[]byte("a")}, nil, nil).Read()
	if res.Err != nil || string(res.Rows[0][0]) != "ax" {
		t.Fatalf("reuse: %v %v", res.Err, res.Rows)
	}
	if err := pc.Deallocate(ctx, "q2"); err != nil {
		t.Fatal(err)
	}
	res = pc.ExecPrepared(ctx, "q2", [][]byte{[]byte("a")}, nil, nil).Read()
	if sqlstate(res.Err) != "26000" {
		t.Fatalf("after close: %v", res.Err)
	}
	var one int
	if err := c.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil {
		t.Fatal(err)
	}
}

// TestDeallocate: DEALLOCATE name and DEALLOCATE ALL keep PostgreSQL's
// meaning for the client, and the shared backend keeps serving everyone.
func TestDeallocate(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	ctx := context.Background()
	c := h.connectMode("p1", "authenticated", "dealloc", "cache_statement")
	other := h.connectMode("p1", "anon", "other", "cache_statement")
	pc := c.PgConn()
	if _, err := pc.Prepare(ctx, "mine", "SELECT 41 + 1", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, "DEALLOCATE mine"); err != nil {
		t.Fatalf("DEALLOCATE mine: %v", err)
	}
	if res := pc.ExecPrepared(ctx, "mine", nil, nil, nil).Read(); sqlstate(res.Err) != "26000" {
		t.Fatalf("after DEALLOCATE: %v", res.Err)
	}
	if _, err := c.Exec(ctx, "DEALLOCATE nothere"); sqlstate(err) != "26000" || !strings.Contains(err.Error(), "nothere") {
		t.Fatalf("DEALLOCATE of an unknown name: %v", err)
	}
	for range 3 {
		var n int
		if err := c.QueryRow(ctx, "SELECT $1::int * 2", 21).Scan(&n); err != nil || n != 42 {
			t.Fatalf("before DEALLOCATE ALL: %d %v", n, err)
		}
		if err := c.DeallocateAll(ctx); err != nil {
			t.Fatalf("DEALLOCATE ALL: %v", err)
		}
		for _, cl := range []struct {
			conn interface {
				QueryRow(context.Context, string, ...any) pgx.Row
			}
			user string
		}{{c, "authenticated"}, {other, "anon"}} {
			var user string
			if err := cl.conn.QueryRow(ctx, "SELECT current_user").Scan(&user); err != nil || user != cl.user {
				t.Fatalf("after DEALLOCATE ALL: %q %v, want %s", user, err, cl.user)
			}
		}
	}
}

// TestSQLPrepareExecute: SQL-level PREPARE/EXECUTE/DEALLOCATE work across
// transactions on shared backends, and names are per client.
func TestSQLPrepareExecute(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 2})
	ctx := context.Background()
	a := h.connect("p3", "authenticated", "sqlprep-a")
	b := h.connect("p3", "anon", "sqlprep-b")
	if _, err := a.Exec(ctx, "PREPARE twice (int) AS SELECT $1 * 2"); err != nil {
		t.Fatal(err)
	}
	// Another client may use the same name for something else.
	if _, err := b.Exec(ctx, "PREPARE twice AS SELECT 'b'"); err != nil {
		t.Fatalf("the same name in another client: %v", err)
	}
	if _, err := a.Exec(ctx, "PREPARE twice AS SELECT 1"); sqlstate(err) != "42P05" || !strings.Contains(err.Error(), "twice") {
		t.Fatalf("duplicate PREPARE: %v", err)
	}
	for i := range 20 {
		var n int
		if err := a.QueryRow(ctx, fmt.Sprintf("EXECUTE twice(%d)", i)).Scan(&n); err != nil || n != 2*i {
			t.Fatalf("EXECUTE twice(%d): %d %v", i, n, err)
		}
		var s string
		if err := b.QueryRow(ctx, "EXECUTE twice").Scan(&s); err != nil || s != "b" {
			t.Fatalf("b: %q %v", s, err)
		}
		// Other clients take the backends in between.
		c := h.connect("p3", "anon", fmt.Sprint("filler", i))
		if _, err := c.Exec(ctx, "SELECT 1"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := a.Exec(ctx, "DEALLOCATE twice"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Exec(ctx, "EXECUTE twice(1)"); sqlstate(err) != "26000" {
		t.Fatalf("after DEALLOCATE: %v", err)
	}
	var s string
	if err := b.QueryRow(ctx, "EXECUTE twice").Scan(&s); err != nil || s != "b" {
		t.Fatalf("b after a's DEALLOCATE: %q %v", s, err)
	}
}

// TestDeallocateOnAnotherBackend: DEALLOCATE of a statement prepared on a
// backend that another client now holds succeeds wherever it runs.
func TestDeallocateOnAnotherBackend(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 2})
	ctx := context.Background()
	a := h.connect("p2", "authenticated", "dealloc-a")
	filler := h.connect("p2", "anon", "dealloc-filler")
	for i := range 10 {
		name := fmt.Sprintf("t%d", i)
		if _, err := a.Exec(ctx, "PREPARE "+name+" AS SELECT "+fmt.Sprint(i)); err != nil {
			t.Fatal(err)
		}
		pc := a.PgConn()
		if _, err := pc.Prepare(ctx, "p"+name, "SELECT $1::int", nil); err != nil {
			t.Fatal(err)
		}
		// The filler takes a backend (often the one just used) and keeps it.
		tx, err := filler.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, "SELECT 1"); err != nil {
			t.Fatal(err)
		}
		if _, err := a.Exec(ctx, "DEALLOCATE "+name); err != nil {
			t.Fatalf("DEALLOCATE %s: %v", name, err)
		}
		if _, err := a.Exec(ctx, "DEALLOCATE p"+name); err != nil {
			t.Fatalf("DEALLOCATE p%s: %v", name, err)
		}
		if _, err := a.Exec(ctx, "EXECUTE "+name); sqlstate(err) != "26000" {
			t.Fatalf("EXECUTE after DEALLOCATE: %v", err)
		}
		_ = tx.Rollback(ctx)
	}
}

// A Parse that fails, or that PostgreSQL skips after an earlier error of
// its batch, leaves no name behind: the client may Parse it again, a Bind
// of it fails with 26000 as on PostgreSQL, and another client on the same
// backend prepares the same text.
func TestFailedParseLeavesNoName(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	ctx := context.Background()
	c := h.connectMode("p3", "anon", "x", "cache_statement")
	pc := c.PgConn()
	if _, err := pc.Prepare(ctx, "s1", "SELEC 1", nil); sqlstate(err) != "42601" {
		t.Fatalf("bad Parse: %v", err)
	}
	if _, err := pc.Prepare(ctx, "s1", "SELECT 1", nil); err != nil {
		t.Fatalf("Parse again after a failed one: %v", err)
	}
	// In one batch: a failing Parse, then one PostgreSQL skips.
	b := &pgconn.Batch{}
	b.ExecParams("SELEC 2", nil, nil, nil, nil)
	res, err := pc.ExecBatch(ctx, b).ReadAll()
	_ = res
	if sqlstate(err) != "42601" {
		t.Fatalf("batch: %v", err)
	}
	mr := pc.ExecParams(ctx, "SELECT 3", nil, nil, nil, nil)
	if _, err := mr.Close(); err != nil {
		t.Fatal(err)
	}
	// A pipeline: Parse of a bad text, then Parse of s2, then Sync.
	p := pc.StartPipeline(ctx)
	p.SendPrepare("bad", "SELEC 4", nil)
	p.SendPrepare("s2", "SELECT 4", nil)
	if err := p.Sync(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		r, err := p.GetResults()
		if err != nil {
			if sqlstate(err) != "42601" {
				t.Fatalf("pipeline result %d: %v", i, err)
			}
			continue
		}
		if _, ok := r.(*pgconn.PipelineSync); ok {
			break
		}
	}
	if err := p.Close(); err != nil && sqlstate(err) != "42601" {
		t.Fatal(err)
	}
	rr := pc.ExecPrepared(ctx, "s2", nil, nil, nil).Read()
	if sqlstate(rr.Err) != "26000" {
		t.Fatalf("Bind of the skipped s2: %v, want 26000", rr.Err)
	}
	if _, err := pc.Prepare(ctx, "s2", "SELECT 4", nil); err != nil {
		t.Fatalf("Parse s2 after it was skipped: %v", err)
	}
	if _, err := pc.Prepare(ctx, "bad", "SELECT 5", nil); err != nil {
		t.Fatalf("Parse bad after it failed: %v", err)
	}
	other := h.connectMode("p3", "authenticated", "y", "cache_statement")
	if _, err := other.PgConn().Prepare(ctx, "o", "SELECT 4", nil); err != nil {
		t.Fatalf("another client preparing the same text: %v", err)
	}
}

// TestSQLExecuteOfProtocolStatement: a statement prepared with the
// protocol's Parse may be run by SQL EXECUTE and dropped by DEALLOCATE, on
// whichever backend serves the client, as on PostgreSQL (one namespace).
func TestSQLExecuteOfProtocolStatement(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 2})
	ctx := context.Background()
	a := h.connect("p3", "authenticated", "proto-exec-a")
	pc := a.PgConn()
	if _, err := pc.Prepare(ctx, "typed", "SELECT $1 + 1, $2::text", []uint32{23, 25}); err != nil {
		t.Fatal(err)
	}
	if _, err := pc.Prepare(ctx, "untyped", "SELECT $1::int * 3", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := pc.Prepare(ctx, "noparams", "SELECT current_user", nil); err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		var n, m int
		var s string
		if err := a.QueryRow(ctx, fmt.Sprintf("EXECUTE typed(%d, 'x')", i), pgx.QueryExecModeSimpleProtocol).Scan(&n, &s); err != nil || n != i+1 || s != "x" {
			t.Fatalf("EXECUTE typed(%d): %d %q %v", i, n, s, err)
		}
		if err := a.QueryRow(ctx, fmt.Sprintf("EXECUTE untyped(%d)", i), pgx.QueryExecModeSimpleProtocol).Scan(&m); err != nil || m != 3*i {
			t.Fatalf("EXECUTE untyped(%d): %d %v", i, m, err)
		}
		if err := a.QueryRow(ctx, "EXECUTE noparams", pgx.QueryExecModeSimpleProtocol).Scan(&s); err != nil || s != "authenticated" {
			t.Fatalf("EXECUTE noparams: %q %v", s, err)
		}
		// Other clients take the backends in between.
		c := h.connect("p3", "anon", fmt.Sprint("proto-exec-filler", i))
		if _, err := c.Exec(ctx, "SELECT 1"); err != nil {
			t.Fatal(err)
		}
	}
	// Errors name the client's statement.
	if _, err := a.Exec(ctx, "EXECUTE typed(1)", pgx.QueryExecModeSimpleProtocol); sqlstate(err) != "42601" || !strings.Contains(err.Error(), `"typed"`) {
		t.Fatalf("EXECUTE with too few parameters: %v", err)
	}
	// One namespace: SQL PREPARE of a protocol name is a duplicate.
	if _, err := a.Exec(ctx, "PREPARE typed AS SELECT 1", pgx.QueryExecModeSimpleProtocol); sqlstate(err) != "42P05" {
		t.Fatalf("PREPARE of a protocol-level name: %v", err)
	}
	if _, err := a.Exec(ctx, "PREPARE sqlname AS SELECT 1", pgx.QueryExecModeSimpleProtocol); err != nil {
		t.Fatal(err)
	}
	if _, err := pc.Prepare(ctx, "sqlname", "SELECT 2", nil); sqlstate(err) != "42P05" {
		t.Fatalf("Parse of a SQL-prepared name: %v", err)
	}
	if _, err := a.Exec(ctx, "DEALLOCATE untyped", pgx.QueryExecModeSimpleProtocol); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Exec(ctx, "EXECUTE untyped(1)", pgx.QueryExecModeSimpleProtocol); sqlstate(err) != "26000" || !strings.Contains(err.Error(), `"untyped"`) {
		t.Fatalf("EXECUTE after DEALLOCATE: %v", err)
	}
}

// A Parse PostgreSQL refused (two statements) leaves no name that SQL
// EXECUTE could reach, and its text never runs as a query string.
func TestExecuteOfRefusedParse(t *testing.T) {
	ctx := context.Background()
	su := serviceSchema(t, "p1", "multi")
	h := startProxy(t, harnessOpts{poolSize: 2, projects: []string{"p1"}})
	a := h.connect("p1", "service_role", "multi")
	if _, err := a.PgConn().Prepare(ctx, "multi", "SELECT 1; CREATE TABLE multi.pwned (x int)", nil); sqlstate(err) != "42601" {
		t.Fatalf("Parse of two statements: %v", err)
	}
	for range 3 {
		if _, err := a.Exec(ctx, "EXECUTE multi", pgx.QueryExecModeSimpleProtocol); sqlstate(err) != "26000" {
			t.Fatalf("EXECUTE of the refused Parse: %v", err)
		}
	}
	var n int
	if err := su.QueryRow(ctx, "SELECT count(*) FROM pg_class WHERE relname = 'pwned'").Scan(&n); err != nil || n != 0 {
		t.Fatalf("the second statement ran: %d %v", n, err)
	}
}
