package volatility

import (
	"context"
	"log/slog"
	"os"
	"testing"
	"time"

	"cascata/internal/pgcluster"
	"cascata/internal/pgtest"
	"cascata/router"

	"github.com/jackc/pgx/v5"
)

var cluster *pgcluster.Cluster

func TestMain(m *testing.M) {
	os.Exit(pgtest.Main(m, pgcluster.Options{}, &cluster, func(ctx context.Context, c *pgcluster.Cluster) error {
		conn, err := pgx.Connect(ctx, c.Primary.SuperuserURL("postgres"))
		if err != nil {
			return err
		}
		defer conn.Close(ctx)
		_, err = conn.Exec(ctx, `
			CREATE SCHEMA app;
			CREATE FUNCTION app.pure(int) RETURNS int IMMUTABLE LANGUAGE sql AS 'SELECT $1';
			CREATE FUNCTION app.lookup(int) RETURNS int STABLE LANGUAGE sql AS 'SELECT $1';
			CREATE FUNCTION app.bump() RETURNS int VOLATILE LANGUAGE sql AS 'SELECT 1';
			CREATE FUNCTION public.twice(int) RETURNS int IMMUTABLE LANGUAGE sql AS 'SELECT $1 * 2';
			CREATE FUNCTION public.twice(text) RETURNS text VOLATILE LANGUAGE sql AS 'SELECT $1 || $1';
			CREATE FUNCTION public.shown(int) RETURNS int STABLE LANGUAGE sql AS 'SELECT $1';`)
		return err
	}))
}

// learnt waits (bounded) until the learner knows every name, and returns
// what it says of each.
func learnt(t *testing.T, l *Learner, names ...router.QualifiedName) []router.Volatility {
	t.Helper()
	l.Learn(names)
	deadline := time.Now().Add(10 * time.Second)
	for {
		l.mu.Lock()
		done := len(l.inflight) == 0
		l.mu.Unlock()
		if done {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the lookup did not finish within 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	out := make([]router.Volatility, len(names))
	for i, n := range names {
		out[i] = l.Volatility(n.Schema, n.Name)
	}
	return out
}

func TestLearnsFromPgProc(t *testing.T) {
	l := New(cluster.Primary.SuperuserURL("postgres"), nil, nil, slog.Default())
	defer l.Close()
	names := []router.QualifiedName{
		{Schema: "app", Name: "pure"},
		{Schema: "app", Name: "lookup"},
		{Schema: "app", Name: "bump"},
		{Name: "twice"},   // overloads: the most volatile wins
		{Name: "shown"},   // found through the search path
		{Name: "lookup"},  // not on the search path: unknown, so volatile
		{Name: "missing"}, // does not exist: volatile
	}
	if l.Volatility("app", "pure") != router.VolatilityUnknown {
		t.Fatal("a name is known before it is looked up")
	}
	got := learnt(t, l, names...)
	want := []router.Volatility{router.Immutable, router.Stable, router.Volatile, router.Volatile, router.Stable, router.Volatile, router.Volatile}
	for i := range names {
		if got[i] != want[i] {
			t.Errorf("%+v: %v, want %v", names[i], got[i], want[i])
		}
	}
}

// The project's read_only_functions and write_functions override pg_proc.
func TestOverrides(t *testing.T) {
	l := New(cluster.Primary.SuperuserURL("postgres"), []string{"app.bump", "Twice"}, []string{"shown"}, slog.Default())
	defer l.Close()
	got := learnt(t, l, router.QualifiedName{Schema: "app", Name: "bump"}, router.QualifiedName{Name: "twice"},
		router.QualifiedName{Name: "shown"}, router.QualifiedName{Schema: "app", Name: "lookup"})
	want := []router.Volatility{router.Stable, router.Stable, router.Volatile, router.Stable}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("name %d: %v, want %v", i, got[i], want[i])
		}
	}
}

// A server that cannot be reached teaches nothing: calls stay volatile,
// and Close returns.
func TestUnreachableServer(t *testing.T) {
	l := New("postgres://nobody@127.0.0.1:1/none?connect_timeout=1", nil, nil, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})))
	got := learnt(t, l, router.QualifiedName{Schema: "app", Name: "pure"})
	if got[0] != router.VolatilityUnknown {
		t.Fatalf("unreachable server: %v, want unknown", got[0])
	}
	l.Close()
}
