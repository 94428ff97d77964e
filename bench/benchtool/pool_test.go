package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"cascata/internal/pgcluster"
	"cascata/internal/pgtest"

	"github.com/jackc/pgx/v5/pgconn"
)

var cluster *pgcluster.Cluster

const testLoginPassword = "pool-prototype-pw"

func TestMain(m *testing.M) {
	os.Exit(pgtest.Main(m, pgcluster.Options{}, &cluster, func(ctx context.Context, c *pgcluster.Cluster) error {
		return pgcluster.SetupProject(ctx, c.Primary, pgcluster.ProjectSpec{Database: "bench", LoginPassword: testLoginPassword})
	}))
}

func testPoolConfig(size int) poolConfig {
	return poolConfig{Target: cluster.Primary.Addr(), DB: "bench", User: "authenticator",
		Password: testLoginPassword, Role: "authenticated", Size: size}
}

// startGoroutinePool runs pool-goroutine until the test ends; it returns
// the address clients connect to.
func startGoroutinePool(t *testing.T, size int) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := testPoolConfig(size)
	cfg.Listen = ln.Addr().String()
	return runUntilCleanup(t, cfg.Listen, func(ctx context.Context) error { return runGoroutinePool(ctx, cfg, ln) })
}

// startEventLoopPool runs pool-eventloop until the test ends.
func startEventLoopPool(t *testing.T, size int) string {
	t.Helper()
	port, err := pgcluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	cfg := testPoolConfig(size)
	cfg.Listen = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	return runUntilCleanup(t, cfg.Listen, func(ctx context.Context) error { return runEventLoopPool(ctx, cfg) })
}

// runUntilCleanup runs a prototype, waits until addr accepts, and stops
// the prototype (and waits for it) when the test ends.
func runUntilCleanup(t *testing.T, addr string, run func(context.Context) error) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("prototype: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Errorf("prototype did not stop within 20 s")
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			_ = c.Close()
			return addr
		}
		select {
		case err := <-done:
			t.Fatalf("prototype stopped: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("prototype not listening on %s: %v", addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func connectTo(ctx context.Context, t *testing.T, addr string) *pgconn.PgConn {
	t.Helper()
	cfg, err := connConfig(addr, "bench", "anyone", "")
	if err != nil {
		t.Fatal(err)
	}
	c, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("connect through the prototype: %v", err)
	}
	return c
}

// simpleRow runs sql with the simple protocol and returns its one row.
func simpleRow(ctx context.Context, c *pgconn.PgConn, sql string) ([]string, error) {
	res, err := c.Exec(ctx, sql).ReadAll()
	if err != nil {
		return nil, err
	}
	last := res[len(res)-1]
	if last.Err != nil {
		return nil, last.Err
	}
	if len(last.Rows) != 1 {
		return nil, fmt.Errorf("%q: %d rows", sql, len(last.Rows))
	}
	var out []string
	for _, v := range last.Rows[0] {
		out = append(out, string(v))
	}
	return out, nil
}

// clientWork is one client's share of exercisePool: simple and extended
// queries, alone and inside a transaction block, rows checked.
func clientWork(ctx context.Context, c *pgconn.PgConn, id, rounds int) error {
	for i := 0; i < rounds; i++ {
		k := id*1000 + i
		row, err := simpleRow(ctx, c, fmt.Sprintf("SELECT %d * 2, current_user", k))
		if err != nil {
			return fmt.Errorf("simple: %w", err)
		}
		if row[0] != strconv.Itoa(2*k) || row[1] != "authenticated" {
			return fmt.Errorf("simple: got %v for %d", row, k)
		}
		res := c.ExecParams(ctx, "SELECT $1::int + 1, current_user", [][]byte{[]byte(strconv.Itoa(k))}, nil, nil, nil).Read()
		if res.Err != nil {
			return fmt.Errorf("extended: %w", res.Err)
		}
		if len(res.Rows) != 1 || string(res.Rows[0][0]) != strconv.Itoa(k+1) || string(res.Rows[0][1]) != "authenticated" {
			return fmt.Errorf("extended: got %q for %d", res.Rows, k)
		}
		if i%4 == 0 {
			// A transaction block keeps its server across messages.
			if _, err := c.Exec(ctx, "BEGIN").ReadAll(); err != nil {
				return fmt.Errorf("begin: %w", err)
			}
			a, err := simpleRow(ctx, c, "SELECT pg_backend_pid()")
			if err != nil {
				return fmt.Errorf("in transaction: %w", err)
			}
			r := c.ExecParams(ctx, "SELECT pg_backend_pid()", nil, nil, nil, nil).Read()
			if r.Err != nil || len(r.Rows) != 1 {
				return fmt.Errorf("in transaction, extended: %v", r.Err)
			}
			if string(r.Rows[0][0]) != a[0] {
				return fmt.Errorf("transaction moved from backend %s to %s", a[0], r.Rows[0][0])
			}
			if _, err := c.Exec(ctx, "COMMIT").ReadAll(); err != nil {
				return fmt.Errorf("commit: %w", err)
			}
		}
	}
	return nil
}

// exercisePool runs several clients at once through a pool smaller than
// their number.
func exercisePool(t *testing.T, addr string) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const clients, rounds = 8, 40
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for id := 1; id <= clients; id++ {
		c := connectTo(ctx, t, addr)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close(context.Background())
			if err := clientWork(ctx, c, id, rounds); err != nil {
				errs <- fmt.Errorf("client %d: %w", id, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// leaveMidStatement has a client start a 5 s statement (inside a
// transaction block when inTxn) and drop its socket; the next client on the
// one-connection pool must get its answer well before the statement would
// have ended, and the statement must no longer run.
func leaveMidStatement(t *testing.T, addr string, inTxn bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	a := connectTo(ctx, t, addr)
	if inTxn {
		if _, err := a.Exec(ctx, "BEGIN").ReadAll(); err != nil {
			t.Fatal(err)
		}
	}
	sleeping := make(chan error, 1)
	go func() {
		_, err := a.Exec(ctx, "SELECT pg_sleep(5)").ReadAll()
		sleeping <- err
	}()
	pgtest.WaitFor(t, 10*time.Second, "the 5 s statement to run", func() bool {
		return pgtest.QueryValue(t, cluster.Primary.SuperuserURL("bench"),
			"SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(5)' AND state = 'active'") != "0"
	})
	t0 := time.Now()
	_ = a.Conn().Close() // gone without a Terminate
	<-sleeping

	b := connectTo(ctx, t, addr)
	defer b.Close(context.Background())
	row, err := simpleRow(ctx, b, "SELECT 41 + 1, current_setting('transaction_isolation') IS NOT NULL")
	if err != nil {
		t.Fatalf("next client: %v", err)
	}
	if took := time.Since(t0); took > 2*time.Second {
		t.Errorf("next client waited %v for the pool's only server", took)
	}
	if row[0] != "42" {
		t.Errorf("next client got %v", row)
	}
	// Not inside the transaction the first client left.
	if _, err := b.Exec(ctx, "BEGIN").ReadAll(); err != nil {
		t.Errorf("BEGIN after the client left: %v", err)
	}
	if _, err := b.Exec(ctx, "ROLLBACK").ReadAll(); err != nil {
		t.Errorf("ROLLBACK: %v", err)
	}
	// The server the prototype cancelled and closed may take a moment to
	// leave pg_stat_activity; the statement must be gone well before its 5 s.
	var got string
	for range 40 {
		got = pgtest.QueryValue(t, cluster.Primary.SuperuserURL("bench"),
			"SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(5)' AND state = 'active'")
		if got == "0" {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got != "0" || time.Since(t0) > 4*time.Second {
		t.Errorf("%s backends still run the statement the client left, %v after it left", got, time.Since(t0))
	}
}

// prototypes start each prototype with a pool of the given size.
var prototypes = []struct {
	name  string
	start func(t *testing.T, size int) string
}{
	{"goroutine", startGoroutinePool},
	{"eventloop", startEventLoopPool},
}

func TestPoolPrototypes(t *testing.T) {
	for _, p := range prototypes {
		t.Run(p.name, func(t *testing.T) { exercisePool(t, p.start(t, 3)) })
	}
}

func TestPoolPrototypesClientLeavesMidStatement(t *testing.T) {
	for _, p := range prototypes {
		t.Run(p.name, func(t *testing.T) {
			addr := p.start(t, 1)
			t.Run("autocommit", func(t *testing.T) { leaveMidStatement(t, addr, false) })
			t.Run("transaction block", func(t *testing.T) { leaveMidStatement(t, addr, true) })
		})
	}
}
