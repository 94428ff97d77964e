package proxy_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"cascata/internal/pgtest"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Errors reach the client with PostgreSQL's own fields: a syntax error the
// guard finds carries the position PostgreSQL would report (psql's LINE 1:
// caret), and a server's FATAL keeps its message, cascata's explanation
// going into the detail.
func TestErrorFieldsAsPostgreSQL(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	ctx := context.Background()
	direct := pgtest.Connect(t, cluster.Primary.SuperuserURL("p3"))
	c := h.connect("p3", "anon", "fields")
	for _, q := range []string{"SELECT 1 FRM items", "SELEC 1", "SELECT (1", "SELECT 'é' é é"} {
		_, werr := direct.Exec(ctx, q, pgx.QueryExecModeSimpleProtocol)
		_, gerr := c.Exec(ctx, q, pgx.QueryExecModeSimpleProtocol)
		var want, got *pgconn.PgError
		if !errors.As(werr, &want) || !errors.As(gerr, &got) {
			t.Fatalf("%q: direct %v, through cascata %v", q, werr, gerr)
		}
		if got.Code != want.Code || got.Position != want.Position || got.Position == 0 {
			t.Errorf("%q: through cascata %s at %d, PostgreSQL %s at %d", q, got.Code, got.Position, want.Code, want.Position)
		}
	}

	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	if err := tx.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	if _, err := superConn(t).Exec(ctx, "SELECT pg_terminate_backend($1)", pid); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the backend to exit", 5*time.Second, func() bool { return backendState(t, pid) == "gone" })
	_, err = tx.Exec(ctx, "SELECT 1")
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "57P01" || pe.Message != "terminating connection due to administrator command" || pe.Detail == "" {
		t.Fatalf("statement on the terminated backend: %#v", err)
	}
	_ = tx.Rollback(ctx)
	if _, err := c.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatalf("the next statement: %v", err)
	}
}
