package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
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
	return startLoopPool(t, testPoolConfig(size), runEventLoopPool)
}

// startCoroPool runs pool-coro until the test ends.
func startCoroPool(t *testing.T, size int) string {
	t.Helper()
	return startLoopPool(t, testPoolConfig(size), runCoroPool)
}

// startLoopPool runs one of the gnet prototypes with cfg (Listen is set
// here) until the test ends.
func startLoopPool(t *testing.T, cfg poolConfig, run func(context.Context, poolConfig) error) string {
	t.Helper()
	port, err := pgcluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	cfg.Listen = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	return runUntilCleanup(t, cfg.Listen, func(ctx context.Context) error { return run(ctx, cfg) })
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

// connector connects a client to a prototype at addr.
type connector func(ctx context.Context, t *testing.T, addr string) *pgconn.PgConn

func connectTo(ctx context.Context, t *testing.T, addr string) *pgconn.PgConn {
	t.Helper()
	return connectWith(ctx, t, addr, nil)
}

// connectTLS connects over TLS (sslmode=require) and checks it is in use.
func connectTLS(ctx context.Context, t *testing.T, addr string) *pgconn.PgConn {
	t.Helper()
	c := connectWith(ctx, t, addr, &tls.Config{InsecureSkipVerify: true}) // the test CA is not trusted here
	if _, ok := c.Conn().(*tls.Conn); !ok {
		t.Fatalf("connection to %s is not TLS", addr)
	}
	return c
}

func connectWith(ctx context.Context, t *testing.T, addr string, tlsConf *tls.Config) *pgconn.PgConn {
	t.Helper()
	c, err := dialPrototype(ctx, addr, tlsConf)
	if err != nil {
		t.Fatalf("connect through the prototype: %v", err)
	}
	return c
}

// dialPrototype logs in to a prototype at addr, over TLS when tlsConf is
// set (plain otherwise, with no fallback).
func dialPrototype(ctx context.Context, addr string, tlsConf *tls.Config) (*pgconn.PgConn, error) {
	cfg, err := connConfig(addr, "bench", "anyone", "")
	if err != nil {
		return nil, err
	}
	cfg.TLSConfig, cfg.Fallbacks = tlsConf, nil
	return pgconn.ConnectConfig(ctx, cfg)
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
func exercisePool(t *testing.T, addr string, connect connector) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const clients, rounds = 8, 40
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for id := 1; id <= clients; id++ {
		c := connect(ctx, t, addr)
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
func leaveMidStatement(t *testing.T, addr string, inTxn bool, connect connector) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	a := connect(ctx, t, addr)
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

	b := connect(ctx, t, addr)
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

// leaveInTransaction has a client open a transaction block, run a
// statement and drop its socket while it thinks; the next client on the
// one-connection pool must get the same server (rolled back and pooled
// again, not closed) outside any transaction.
func leaveInTransaction(t *testing.T, addr string, connect connector) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	a := connect(ctx, t, addr)
	if _, err := a.Exec(ctx, "BEGIN").ReadAll(); err != nil {
		t.Fatal(err)
	}
	pid, err := simpleRow(ctx, a, "SELECT pg_backend_pid()")
	if err != nil {
		t.Fatal(err)
	}
	if a.TxStatus() != 'T' {
		t.Fatalf("first client's status %q, want T", a.TxStatus())
	}
	_ = a.Conn().Close() // gone without a Terminate

	b := connect(ctx, t, addr)
	defer b.Close(context.Background())
	row, err := simpleRow(ctx, b, "SELECT pg_backend_pid()")
	if err != nil {
		t.Fatalf("next client: %v", err)
	}
	if b.TxStatus() != 'I' {
		t.Errorf("next client's status %q, want I: the transaction left was not ended", b.TxStatus())
	}
	if row[0] != pid[0] {
		t.Errorf("next client on server %s, want %s rolled back and pooled again", row[0], pid[0])
	}
}

// prototypes start each prototype with a pool of the given size.
var prototypes = []struct {
	name  string
	start func(t *testing.T, size int) string
}{
	{"goroutine", startGoroutinePool},
	{"eventloop", startEventLoopPool},
	{"coroutine", startCoroPool},
}

func TestPoolPrototypes(t *testing.T) {
	for _, p := range prototypes {
		t.Run(p.name, func(t *testing.T) { exercisePool(t, p.start(t, 3), connectTo) })
	}
}

func TestPoolPrototypesClientLeavesMidStatement(t *testing.T) {
	for _, p := range prototypes {
		t.Run(p.name, func(t *testing.T) {
			addr := p.start(t, 1)
			t.Run("autocommit", func(t *testing.T) { leaveMidStatement(t, addr, false, connectTo) })
			t.Run("transaction block", func(t *testing.T) { leaveMidStatement(t, addr, true, connectTo) })
			t.Run("idle in a transaction block", func(t *testing.T) { leaveInTransaction(t, addr, connectTo) })
		})
	}
}

// serverSSL reports whether the server connection a client's statements
// run on is TLS (pg_stat_ssl, read as the superuser: the client's role may
// not see it).
func serverSSL(ctx context.Context, t *testing.T, c *pgconn.PgConn) bool {
	t.Helper()
	row, err := simpleRow(ctx, c, "SELECT pg_backend_pid()")
	if err != nil {
		t.Fatal(err)
	}
	return pgtest.QueryValue(t, cluster.Primary.SuperuserURL("bench"), "SELECT ssl FROM pg_stat_ssl WHERE pid = $1", row[0]) == "t"
}

// TestPoolLoopTLS: both gnet prototypes serve TLS clients, with plain and
// with TLS server connections; every handshake ran in a goroutine before
// the loop took the socket over, and the loop reads and writes the records
// itself from then on. A client that does not ask for TLS is refused.
func TestPoolLoopTLS(t *testing.T) {
	ctx := context.Background()
	cert, _ := pgtest.TestCA(t, t.TempDir())
	certPEM, keyPEM := pgtest.CertPEM(t, cert)
	clientTLS := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if err := cluster.Primary.EnableTLS(ctx, certPEM, keyPEM); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := cluster.Primary.DisableTLS(context.Background()); err != nil {
			t.Error(err)
		}
	})
	loops := []struct {
		name string
		run  func(context.Context, poolConfig) error
	}{{"eventloop", runEventLoopPool}, {"coroutine", runCoroPool}}
	for _, loop := range loops {
		for _, serverTLS := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s server TLS %v", loop.name, serverTLS), func(t *testing.T) {
				testLoopTLS(ctx, t, loop.run, clientTLS, serverTLS)
			})
		}
	}
}

// testLoopTLS runs the TLS checks against one gnet prototype.
func testLoopTLS(ctx context.Context, t *testing.T, run func(context.Context, poolConfig) error, clientTLS *tls.Config, serverTLS bool) {
	cfg := testPoolConfig(3)
	cfg.ClientTLS, cfg.ServerTLS = clientTLS, serverTLS
	addr := startLoopPool(t, cfg, run)
	exercisePool(t, addr, connectTLS)

	c := connectTLS(ctx, t, addr)
	defer c.Close(ctx)
	if got := serverSSL(ctx, t, c); got != serverTLS {
		t.Errorf("server connection TLS: %v, want %v", got, serverTLS)
	}
	// A result larger than any one TLS record or read, both ways.
	long := strings.Repeat("x", 200_000)
	row, err := simpleRow(ctx, c, "SELECT length('"+long+"'), repeat('y', 300000)")
	if err != nil {
		t.Fatal(err)
	}
	if row[0] != "200000" || row[1] != strings.Repeat("y", 300000) {
		t.Errorf("large statement and row: length %s, row of %d bytes", row[0], len(row[1]))
	}

	if pc, err := dialPrototype(ctx, addr, nil); err == nil {
		_ = pc.Close(ctx)
		t.Error("a client without TLS got in")
	} else if !strings.Contains(err.Error(), "TLS required") {
		t.Errorf("a client without TLS: %v, want TLS required", err)
	}

	one := testPoolConfig(1)
	one.ClientTLS, one.ServerTLS = clientTLS, serverTLS
	addr = startLoopPool(t, one, run)
	t.Run("client leaves mid-statement", func(t *testing.T) { leaveMidStatement(t, addr, true, connectTLS) })
	t.Run("client leaves in a transaction", func(t *testing.T) { leaveInTransaction(t, addr, connectTLS) })
}

// TestPoolCoroWaitTimeout: with -wait-timeout, a client that waits longer
// for pool-coro's only server is told so (FATAL 08P01) and closed, and the
// server is not lost; a wait that ends in time is not cut short by the
// timer of an earlier one (stopped when that wait ended, or ignored if it
// had fired already).
func TestPoolCoroWaitTimeout(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg := testPoolConfig(1)
	cfg.WaitTimeout = time.Second
	addr := startLoopPool(t, cfg, runCoroPool)

	holder := connectTo(ctx, t, addr)
	defer holder.Close(context.Background())
	waiter := connectTo(ctx, t, addr)
	defer waiter.Close(context.Background())
	hold := func() {
		t.Helper()
		if _, err := holder.Exec(ctx, "BEGIN; SELECT 1").ReadAll(); err != nil {
			t.Fatal(err)
		}
	}
	// release commits the holder's transaction after a while; the
	// returned channel closes when it has.
	release := func(after time.Duration) <-chan struct{} {
		done := make(chan struct{})
		time.AfterFunc(after, func() {
			defer close(done)
			if _, err := holder.Exec(ctx, "COMMIT").ReadAll(); err != nil {
				t.Errorf("commit: %v", err)
			}
		})
		return done
	}

	// Two waits in a row: the first ends after 0.5 s, the second after
	// 0.75 s, past the moment the first wait's timer fires (1 s after the
	// first began) but within its own second.
	hold()
	done := release(500 * time.Millisecond)
	if _, err := simpleRow(ctx, waiter, "SELECT 1"); err != nil {
		t.Fatalf("first wait, ended in time: %v", err)
	}
	<-done
	hold()
	done = release(750 * time.Millisecond)
	if _, err := simpleRow(ctx, waiter, "SELECT 2"); err != nil {
		t.Fatalf("second wait, ended in time: %v", err)
	}
	<-done

	// Held for good: the next wait runs out.
	hold()
	t0 := time.Now()
	_, err := simpleRow(ctx, waiter, "SELECT 3")
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "08P01" || pgErr.Severity != "FATAL" || pgErr.Message != "query_wait_timeout" {
		t.Fatalf("a wait past the timeout: %v, want FATAL 08P01 query_wait_timeout", err)
	}
	if took := time.Since(t0); took < 900*time.Millisecond || took > 5*time.Second {
		t.Errorf("told after %v, want about 1 s", took)
	}
	if _, err := holder.Exec(ctx, "COMMIT").ReadAll(); err != nil {
		t.Fatal(err)
	}
	next := connectTo(ctx, t, addr)
	defer next.Close(context.Background())
	if row, err := simpleRow(ctx, next, "SELECT 4"); err != nil || row[0] != "4" {
		t.Fatalf("the server after a timed-out wait: %v %v", row, err)
	}
}

// TestPoolPrototypesServersTerminated: server connections killed under
// load (pg_terminate_backend, in the middle of statements and while
// pooled) cost their clients an error, but each prototype goes on: it
// dials replacements, a new client is served, and it ends up with exactly
// its pool of server connections again.
func TestPoolPrototypesServersTerminated(t *testing.T) {
	const size = 2
	su := cluster.Primary.SuperuserURL("bench")
	servers := func(t *testing.T) string {
		return pgtest.QueryValue(t, su, "SELECT count(*) FROM pg_stat_activity WHERE usename = 'authenticator' AND backend_type = 'client backend'")
	}
	for _, p := range prototypes {
		t.Run(p.name, func(t *testing.T) {
			addr := p.start(t, size)
			pgtest.WaitFor(t, 10*time.Second, "the pool's server connections", func() bool { return servers(t) == strconv.Itoa(size) })
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			stop := make(chan struct{})
			var wg sync.WaitGroup
			var served atomic.Int64
			for range 6 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						select {
						case <-stop:
							return
						default:
						}
						c, err := dialPrototype(ctx, addr, nil)
						if err != nil {
							continue // the prototype is there; a login may meet a dying server
						}
						for {
							if _, err := c.Exec(ctx, "SELECT pg_sleep(0.005), 1").ReadAll(); err != nil {
								break
							}
							served.Add(1)
							select {
							case <-stop:
								_ = c.Close(context.Background())
								return
							default:
							}
						}
						_ = c.Close(context.Background())
					}
				}()
			}
			for range 5 {
				time.Sleep(200 * time.Millisecond)
				pgtest.QueryValue(t, su, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = 'authenticator' AND backend_type = 'client backend'")
			}
			close(stop)
			wg.Wait()
			if served.Load() == 0 {
				t.Fatal("no statement was served while servers were terminated")
			}
			var row []string
			pgtest.WaitFor(t, 10*time.Second, "a new client to be served", func() bool {
				c, err := dialPrototype(ctx, addr, nil)
				if err != nil {
					return false
				}
				defer c.Close(context.Background())
				row, err = simpleRow(ctx, c, "SELECT 6 * 7")
				return err == nil
			})
			if row[0] != "42" {
				t.Errorf("new client got %v", row)
			}
			pgtest.WaitFor(t, 10*time.Second, "the pool back at its size", func() bool { return servers(t) == strconv.Itoa(size) })
		})
	}
}
