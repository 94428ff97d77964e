package proxy_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// After DDL, a Parse of a text the proxy prepared before gets a statement
// prepared after the change, as it would on PostgreSQL: no parameter types
// of the old table, no "cached plan must not change result type" that
// outlives a re-prepare, no lookup of a dropped type.

const staleProject = "p1"

func staleStart(t *testing.T) (*harness, *pgx.Conn, *pgx.Conn) {
	t.Helper()
	serviceSchema(t, staleProject, "stale")
	h := startProxy(t, harnessOpts{poolSize: 1, projects: []string{staleProject}})
	return h, h.connect(staleProject, "service_role", "a"), h.connect(staleProject, "service_role", "b")
}

// prepareExec prepares sql under name (after deallocating it), and runs it.
func prepareExec(ctx context.Context, c *pgx.Conn, name, sql string, args ...any) error {
	_ = c.Deallocate(ctx, name)
	if _, err := c.Prepare(ctx, name, sql); err != nil {
		return err
	}
	_, err := c.Exec(ctx, name, args...)
	return err
}

func TestStaleStatementsAfterDDL(t *testing.T) {
	_, a, b := staleStart(t)
	ctx := context.Background()
	exec := func(c *pgx.Conn, sql string) {
		t.Helper()
		if _, err := c.Exec(ctx, sql, pgx.QueryExecModeSimpleProtocol); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}

	t.Run("column type changed", func(t *testing.T) {
		exec(a, "CREATE TABLE stale.t1 (c date)")
		const ins = "INSERT INTO stale.t1 (c) VALUES ($1)"
		if err := prepareExec(ctx, a, "ins", ins, "2026-01-02"); err != nil {
			t.Fatal(err)
		}
		exec(b, "DROP TABLE stale.t1; CREATE TABLE stale.t1 (c int)")
		for _, c := range []*pgx.Conn{a, b} {
			if err := prepareExec(ctx, c, "ins", ins, 5); err != nil {
				t.Fatalf("the same text prepared again after the change: %v", err)
			}
		}
	})

	t.Run("column dropped", func(t *testing.T) {
		exec(a, "CREATE TABLE stale.t2 (x int, y int); INSERT INTO stale.t2 VALUES (1, 2)")
		const sel = "SELECT * FROM stale.t2"
		if err := prepareExec(ctx, a, "sel", sel); err != nil {
			t.Fatal(err)
		}
		exec(a, "ALTER TABLE stale.t2 DROP COLUMN y")
		// The client's statement from before the change fails as it does
		// on PostgreSQL...
		if _, err := a.Exec(ctx, "sel"); sqlstate(err) != "0A000" {
			t.Fatalf("the statement prepared before the change: %v, want 0A000", err)
		}
		// ... and prepared again it works.
		_ = a.Deallocate(ctx, "sel")
		sd, err := a.Prepare(ctx, "sel", sel)
		if err != nil {
			t.Fatal(err)
		}
		if len(sd.Fields) != 1 {
			t.Fatalf("prepared again: %d columns, want 1", len(sd.Fields))
		}
		var x int
		if err := a.QueryRow(ctx, "sel").Scan(&x); err != nil || x != 1 {
			t.Fatalf("prepared again: %d, %v", x, err)
		}
		// pgx's statement cache does the same on its own.
		if err := b.QueryRow(ctx, sel).Scan(&x); err != nil || x != 1 {
			t.Fatalf("another client: %d, %v", x, err)
		}
	})

	t.Run("type dropped and created again", func(t *testing.T) {
		exec(a, "CREATE TYPE stale.mood AS ENUM ('ok')")
		const cast = "SELECT $1::text::stale.mood"
		if err := prepareExec(ctx, a, "cast", cast, "ok"); err != nil {
			t.Fatal(err)
		}
		exec(a, "DROP TYPE stale.mood; CREATE TYPE stale.mood AS ENUM ('ok', 'sad')")
		for _, c := range []*pgx.Conn{a, b} {
			if err := prepareExec(ctx, c, "cast", cast, "sad"); err != nil {
				t.Fatalf("prepared again after the type changed: %v", err)
			}
		}
	})

	t.Run("in one transaction", func(t *testing.T) {
		exec(a, "CREATE TABLE stale.t3 (x int, y int)")
		tx, err := a.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = tx.Rollback(ctx) }()
		const sel = "SELECT * FROM stale.t3"
		if _, err := tx.Prepare(ctx, "s3", sel); err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, "ALTER TABLE stale.t3 DROP COLUMN y"); err != nil {
			t.Fatal(err)
		}
		if err := tx.Conn().Deallocate(ctx, "s3"); err != nil {
			t.Fatal(err)
		}
		sd, err := tx.Prepare(ctx, "s3", sel)
		if err != nil || len(sd.Fields) != 1 {
			t.Fatalf("prepared again in the transaction: %v, %v", sd, err)
		}
		if err := tx.Commit(ctx); err != nil {
			t.Fatal(err)
		}
	})

	// The protocol's own Parse over pgconn, for a driver without pgx's cache.
	t.Run("pgconn", func(t *testing.T) {
		exec(a, "CREATE TABLE stale.t4 (v date)")
		pc := a.PgConn()
		const q = "SELECT $1::text = v::text FROM stale.t4"
		if _, err := pc.Prepare(ctx, "p4", q, nil); err != nil {
			t.Fatal(err)
		}
		exec(b, "ALTER TABLE stale.t4 ALTER COLUMN v TYPE text")
		if err := pc.Deallocate(ctx, "p4"); err != nil {
			t.Fatal(err)
		}
		if _, err := pc.Prepare(ctx, "p4", q, nil); err != nil {
			t.Fatal(err)
		}
		rr := pc.ExecPrepared(ctx, "p4", [][]byte{[]byte("x")}, nil, nil).Read()
		if rr.Err != nil {
			t.Fatalf("executed after the change: %v", rr.Err)
		}
	})
}

// A statement prepared before a change that removed one of its columns,
// executed on a backend that has to prepare it anew, fails as it would on
// PostgreSQL (0A000), not with the Bind's format count (08P01).
func TestStalePlanOnAnotherBackend(t *testing.T) {
	ctx := context.Background()
	serviceSchema(t, staleProject, "stale2")
	h := startProxy(t, harnessOpts{poolSize: 2, projects: []string{staleProject}})
	a := h.connect(staleProject, "service_role", "a")
	if _, err := a.Exec(ctx, "CREATE TABLE stale2.t (id int, f1 int, f2 int); INSERT INTO stale2.t VALUES (1, 2, 3)"); err != nil {
		t.Fatal(err)
	}
	const q = "SELECT * FROM stale2.t WHERE id = $1"
	tx, err := a.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Prepare(ctx, "q", q); err != nil {
		t.Fatal(err)
	}
	var prepared int
	if err := tx.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&prepared); err != nil {
		t.Fatal(err)
	}
	_ = tx.Rollback(ctx)
	// The client hears the ROLLBACK's answer before its backend is back
	// in the pool: wait for that, so that the pool hands the holder the
	// backend it took last.
	waitFor(t, "the backend to go back to its pool", 10*time.Second, func() bool {
		for _, p := range h.srv.PoolStats() {
			if p.Project == staleProject && p.ServersActive > 0 {
				return false
			}
		}
		return true
	})
	// Another client holds the backend that has the statement, a third
	// changes the table on the other one.
	holder := h.connect(staleProject, "service_role", "holder")
	htx, err := holder.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = htx.Rollback(ctx) }()
	var held int
	if err := htx.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&held); err != nil {
		t.Fatal(err)
	}
	if held != prepared {
		t.Fatalf("the holder got backend %d, not %d where the statement is", held, prepared)
	}
	b := h.connect(staleProject, "service_role", "b")
	if _, err := b.Exec(ctx, "ALTER TABLE stale2.t DROP COLUMN f1"); err != nil {
		t.Fatal(err)
	}
	// Executed with one result format per column the client described.
	rr := a.PgConn().ExecPrepared(ctx, "q", [][]byte{[]byte("1")}, nil, []int16{0, 0, 0}).Read()
	if sqlstate(rr.Err) != "0A000" {
		t.Fatalf("the statement prepared before the change, on another backend: %v, want 0A000", rr.Err)
	}
	// Prepared again it works.
	if err := a.Deallocate(ctx, "q"); err != nil {
		t.Fatal(err)
	}
	var id, f2 int
	if err := a.QueryRow(ctx, q, 1).Scan(&id, &f2); err != nil || f2 != 3 {
		t.Fatalf("prepared again: %d %d %v", id, f2, err)
	}
}
