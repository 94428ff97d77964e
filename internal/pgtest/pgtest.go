package pgtest

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"cascata/internal/pgcluster"

	"github.com/jackc/pgx/v5"
)

const (
	startTimeout = 3 * time.Minute
	stopTimeout  = time.Minute
	sqlTimeout   = 30 * time.Second
)

// Main starts a cluster with opts, stores it in *cluster, runs the tests
// and stops and removes the cluster, and returns the exit code for
// os.Exit. When the cluster cannot be started (e.g. binaries missing) or
// stopped it prints the reason to stderr and returns 1. SIGINT/SIGTERM
// during the tests stop the cluster before exiting; when the process is
// killed outright, a watchdog stops and removes it within about a second
// (pgcluster.Cluster.StopWhenGone). A nil opts.Logger logs
// warnings to stderr.
//
// Each setup function runs once after the cluster is up (create databases,
// roles, tables); a failing one fails the package.
func Main(m *testing.M, opts pgcluster.Options, cluster **pgcluster.Cluster, setup ...func(context.Context, *pgcluster.Cluster) error) int {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	c, stopCluster, err := Start(ctx, opts)
	cancel()
	if err != nil {
		fmt.Fprintf(os.Stderr, "pgtest: %v\n", err)
		return 1
	}
	*cluster = c
	stop := sync.OnceValue(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
		defer cancel()
		return stopCluster(ctx)
	})
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	done := make(chan struct{})
	go func() {
		select {
		case sig := <-sigs:
			fmt.Fprintf(os.Stderr, "pgtest: %v: stopping postgres cluster\n", sig)
			if err := stop(); err != nil {
				fmt.Fprintf(os.Stderr, "pgtest: %v\n", err)
			}
			os.Exit(1)
		case <-done:
		}
	}()

	code := 1
	setupFailed := false
	for _, fn := range setup {
		sctx, scancel := context.WithTimeout(context.Background(), startTimeout)
		err := fn(sctx, c)
		scancel()
		if err != nil {
			fmt.Fprintf(os.Stderr, "pgtest: setup: %v\n", err)
			setupFailed = true
			break
		}
	}
	if !setupFailed {
		code = m.Run()
	}
	signal.Stop(sigs)
	close(done)
	if err := stop(); err != nil {
		fmt.Fprintf(os.Stderr, "pgtest: %v\n", err)
		return 1
	}
	return code
}

// Start starts a cluster for a test binary: Main's, or one more beside it
// (a target server, a control database). A test binary killed from outside
// (go test's -timeout, a fuzzing coordinator ending its workers) runs no
// clean-up of its own, so a watchdog stops and removes the cluster within
// about a second of this process's end (pgcluster.Cluster.StopWhenGone).
// stop stops the cluster and ends the watch.
func Start(ctx context.Context, opts pgcluster.Options) (c *pgcluster.Cluster, stop func(context.Context) error, err error) {
	keepInheritedFDs()
	c, err = pgcluster.Start(ctx, opts)
	if err != nil {
		return nil, nil, err
	}
	unwatch, err := c.StopWhenGone(os.Getpid())
	if err != nil {
		fmt.Fprintf(os.Stderr, "pgtest: %v (the cluster outlives this process if it is killed)\n", err)
	}
	return c, func(ctx context.Context) error {
		err := c.Stop(ctx)
		if unwatch != nil {
			unwatch()
		}
		return err
	}, nil
}

// Connect opens a connection to url, closed when the test ends.
func Connect(t testing.TB, url string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), sqlTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatalf("pgtest: connect: %v", err)
	}
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	return conn
}

// Exec runs sql (with optional arguments) on a new connection to url and
// fails the test on error. It works in a cleanup too, where t.Context is
// already done.
func Exec(t testing.TB, url, sql string, args ...any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.WithoutCancel(t.Context()), sqlTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatalf("pgtest: connect: %v", err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, sql, args...); err != nil {
		t.Fatalf("pgtest: exec %q: %v", sql, err)
	}
}

// QueryValue runs sql on a new connection to url and returns the first
// column of the first row in PostgreSQL's text format ("" for NULL). It
// fails the test on error or when there is no row.
func QueryValue(t testing.TB, url, sql string, args ...any) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), sqlTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatalf("pgtest: connect: %v", err)
	}
	defer conn.Close(context.Background())
	rows, err := conn.Query(ctx, sql, append([]any{pgx.QueryResultFormats{pgx.TextFormatCode}}, args...)...)
	if err != nil {
		t.Fatalf("pgtest: query %q: %v", sql, err)
	}
	defer rows.Close()
	if !rows.Next() {
		if err := rows.Err(); err != nil {
			t.Fatalf("pgtest: query %q: %v", sql, err)
		}
		t.Fatalf("pgtest: query %q: no rows", sql)
	}
	raw := rows.RawValues()
	if len(raw) == 0 {
		t.Fatalf("pgtest: query %q: no columns", sql)
	}
	v := string(raw[0])
	rows.Close()
	if err := rows.Err(); err != nil {
		t.Fatalf("pgtest: query %q: %v", sql, err)
	}
	return v
}

// FreePort returns a loopback TCP port that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	port, err := pgcluster.FreePort()
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	return port
}

// NewDatabase creates a database with a name unique to this process on
// the cluster's primary and returns its superuser URL.
func NewDatabase(t testing.TB, c *pgcluster.Cluster, prefix string) string {
	t.Helper()
	name := fmt.Sprintf("%s_%d_%d", prefix, os.Getpid(), dbSeq.Add(1))
	Exec(t, c.Primary.SuperuserURL("postgres"), "CREATE DATABASE "+name)
	return c.Primary.SuperuserURL(name)
}

var dbSeq atomic.Int64

// WaitFor polls cond every 10 ms until it holds, failing the test with what
// once d has passed.
func WaitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// keepInheritedFDs marks the descriptors the test process inherited beyond
// stdin, stdout and stderr close-on-exec, so that the servers it starts do
// not hold them. A fuzzing worker inherits the pipes to its coordinator:
// held open by a postgres daemon, they keep the coordinator waiting
// forever for a worker that has died, and its crash is never reported.
func keepInheritedFDs() {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return // not Linux: nothing to do the same way
	}
	for _, e := range entries {
		var fd int
		if _, err := fmt.Sscan(e.Name(), &fd); err == nil && fd > 2 {
			syscall.CloseOnExec(fd)
		}
	}
}
