package proxy_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"cascata/proxy"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// waitNoBackends waits until the proxies of earlier tests have no backend
// left, so that counts taken by this test are its own.
func waitNoBackends(t *testing.T) {
	t.Helper()
	waitFor(t, "no proxy backend left from earlier tests", 10*time.Second, func() bool {
		return proxyBackends(t, "") == 0
	})
}

// backendSessions is how many backend sessions PostgreSQL has started in
// the test databases so far (pg_stat_database.sessions).
func backendSessions(t *testing.T) int64 {
	t.Helper()
	var n int64
	if err := superConn(t).QueryRow(context.Background(),
		"SELECT coalesce(sum(sessions), 0) FROM pg_stat_database WHERE datname IN ('p1', 'p2', 'p3')").Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// marker returns a value unique to this run of the test, for rows it writes.
func marker(t *testing.T) string {
	return fmt.Sprintf("%s-%d", t.Name(), time.Now().UnixNano())
}

// TestPoolManyClientsBoundedBackends: 200 clients over 3 projects with
// pool_size 5 and a host cap of 10: every transaction succeeds, PostgreSQL
// never sees more than 10 proxy connections, and no project is starved.
func TestPoolManyClientsBoundedBackends(t *testing.T) {
	waitNoBackends(t)
	const (
		clients   = 200
		txPer     = 20
		hostCap   = 10
		projCount = 3
	)
	h := startProxy(t, harnessOpts{poolSize: 5, opts: proxy.Options{MaxServerConnPerHost: hostCap}})
	// 4,000 short transactions over 10 backends take a few seconds (about
	// 1,000 per second under -race when backends are reused); the deadline
	// keeps a proxy that crawls from hanging the suite.
	const runBudget = 25 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), runBudget+20*time.Second)
	defer cancel()

	// Connect everybody first, so that all start together.
	conns := make([]*pgx.Conn, clients)
	var cwg sync.WaitGroup
	connErrs := make(chan error, clients)
	for i := range clients {
		ref := testProjects[i%projCount]
		tok := token(t, ref, "authenticated", fmt.Sprintf("u%d", i), nil)
		cwg.Add(1)
		go func() {
			defer cwg.Done()
			c, err := h.tryConnect(ref, "authenticated", tok)
			if err != nil {
				connErrs <- fmt.Errorf("client %d: connect: %w", i, err)
				return
			}
			conns[i] = c
		}()
	}
	cwg.Wait()
	close(connErrs)
	t.Cleanup(func() {
		for _, c := range conns {
			if c != nil {
				c.Close(context.Background())
			}
		}
	})
	for err := range connErrs {
		t.Fatal(err)
	}

	// Sample pg_stat_activity every 20 ms on a connection of its own.
	sc, err := pgx.Connect(ctx, cluster.Primary.SuperuserURL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close(context.Background())
	stop := make(chan struct{})
	type sample struct {
		max, n int
		err    error
	}
	sampled := make(chan sample, 1)
	go func() {
		var s sample
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				sampled <- s
				return
			case <-tick.C:
			}
			var n int
			if err := sc.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE usename = 'authenticator'").Scan(&n); err != nil {
				s.err = err
				sampled <- s
				return
			}
			s.n++
			s.max = max(s.max, n)
		}
	}()

	// Progress per project; when the first project has finished everything,
	// take a snapshot of the others' progress.
	var done [projCount]atomic.Int64
	var total [projCount]int64
	for i := range clients {
		total[i%projCount] += txPer
	}
	var snapOnce sync.Once
	var snap [projCount]int64
	var firstDone int = -1

	opened0 := backendSessions(t)
	runCtx, runCancel := context.WithTimeout(ctx, runBudget)
	defer runCancel()
	start := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			p := i % projCount
			c := conns[i]
			sub := fmt.Sprintf("u%d", i)
			for j := range txPer {
				tx, err := c.Begin(runCtx)
				if err != nil {
					errs <- fmt.Errorf("client %d tx %d: begin: %w", i, j, err)
					return
				}
				var id int64
				if err := tx.QueryRow(runCtx, "INSERT INTO items (body) VALUES ($1) RETURNING id", fmt.Sprintf("pool-%d-%d", i, j)).Scan(&id); err != nil {
					_ = tx.Rollback(runCtx)
					errs <- fmt.Errorf("client %d tx %d: insert: %w", i, j, err)
					return
				}
				var owner, user string
				if err := tx.QueryRow(runCtx, "SELECT owner, current_user FROM items WHERE id = $1", id).Scan(&owner, &user); err != nil {
					_ = tx.Rollback(runCtx)
					errs <- fmt.Errorf("client %d tx %d: select: %w", i, j, err)
					return
				}
				if err := tx.Commit(runCtx); err != nil {
					errs <- fmt.Errorf("client %d tx %d: commit: %w", i, j, err)
					return
				}
				if owner != sub || user != "authenticated" {
					errs <- fmt.Errorf("client %d tx %d: row owner %q, current_user %q; want %q, authenticated", i, j, owner, user, sub)
					return
				}
				if done[p].Add(1) == total[p] {
					snapOnce.Do(func() {
						firstDone = p
						for k := range projCount {
							snap[k] = done[k].Load()
						}
					})
				}
			}
		}()
	}
	began := time.Now()
	close(start)
	wg.Wait()
	elapsed := time.Since(began)
	close(stop)
	s := <-sampled
	close(errs)
	opened := backendSessions(t) - opened0
	if runCtx.Err() != nil {
		t.Fatalf("only %v of %d transactions (per project) done within %v; %d backend connections were opened meanwhile",
			[]int64{done[0].Load(), done[1].Load(), done[2].Load()}, total, runBudget, opened)
	}
	n := 0
	for err := range errs {
		if n++; n <= 10 {
			t.Error(err)
		}
	}
	if n > 0 {
		t.Fatalf("%d of %d clients failed", n, clients)
	}
	if s.err != nil {
		t.Fatalf("sampler: %v", s.err)
	}
	t.Logf("%d transactions in %v; %d samples of pg_stat_activity, at most %d proxy backends; %d backend connections opened",
		clients*txPer, elapsed, s.n, s.max, opened)
	// Sharing the host cap between tenants must not cost a new backend
	// connection (fork + SCRAM) per transaction: allow one per 40.
	if opened > clients*txPer/40 {
		t.Errorf("%d backend connections were opened for %d transactions: the pool churns (closes and re-dials backends) instead of reusing them",
			opened, clients*txPer)
	}
	if s.n < 5 {
		t.Errorf("only %d samples of pg_stat_activity were taken", s.n)
	}
	if s.max > hostCap {
		t.Errorf("pg_stat_activity showed %d proxy backends; max_server_conn_per_host is %d", s.max, hostCap)
	}
	for p := range projCount {
		if got := done[p].Load(); got != total[p] {
			t.Errorf("project %s: %d of %d transactions", testProjects[p], got, total[p])
		}
	}
	// Fairness: when the first project was through, every other project had
	// done at least a third of its work.
	for p := range projCount {
		if snap[p]*3 < total[p] {
			t.Errorf("unfair: when %s had finished, %s had done only %d of %d transactions (snapshot %v)",
				testProjects[firstDone], testProjects[p], snap[p], total[p], snap)
		}
	}
	if n := proxyBackends(t, ""); n > hostCap {
		t.Errorf("%d proxy backends after the run; cap is %d", n, hostCap)
	}
}

// TestIdlePoolsDisappear: after server_idle_timeout the backends are closed
// and the empty pools dropped; clients still connected get a new pool.
func TestIdlePoolsDisappear(t *testing.T) {
	waitNoBackends(t)
	h := startProxy(t, harnessOpts{poolSize: 2, opts: proxy.Options{ServerIdleTimeout: 500 * time.Millisecond}})
	ctx := context.Background()
	var conns []*pgx.Conn
	for _, ref := range testProjects {
		c := h.connect(ref, "authenticated", "idle-"+ref)
		for range 3 {
			if _, err := c.Exec(ctx, "SELECT 1"); err != nil {
				t.Fatal(err)
			}
		}
		conns = append(conns, c)
	}
	if n := h.srv.PoolCount(); n != len(testProjects) {
		t.Fatalf("PoolCount = %d after use, want %d", n, len(testProjects))
	}
	if n := proxyBackends(t, ""); n < len(testProjects) {
		t.Fatalf("%d proxy backends after use, want at least %d", n, len(testProjects))
	}
	start := time.Now()
	waitFor(t, "idle backends to close", 5*time.Second, func() bool { return proxyBackends(t, "") == 0 })
	waitFor(t, "empty pools to be dropped", 5*time.Second, func() bool { return h.srv.PoolCount() == 0 })
	t.Logf("backends and pools gone %v after last use", time.Since(start))
	if d := time.Since(start); d < 400*time.Millisecond {
		t.Errorf("pools gone after %v, before server_idle_timeout (500ms)", d)
	}
	// The clients are still connected and get a fresh pool.
	for i, c := range conns {
		var user string
		if err := c.QueryRow(ctx, "SELECT current_user").Scan(&user); err != nil || user != "authenticated" {
			t.Fatalf("client of %s after its pool was dropped: %q, %v", testProjects[i], user, err)
		}
	}
	if n := h.srv.PoolCount(); n != len(testProjects) {
		t.Fatalf("PoolCount = %d after reuse, want %d", n, len(testProjects))
	}
}

// TestIdleBackendsRetireOneAtATime: backends that fall idle together time
// out together, and the proxy closes them one after another, each once the
// server before it has exited, not all at once. The test stops their server
// processes (SIGSTOP) so that a Terminate the proxy sends stays unread in
// the server's socket; at most one such socket is seen at any time. Then
// the servers go on, and every backend closes.
func TestIdleBackendsRetireOneAtATime(t *testing.T) {
	waitNoBackends(t)
	const n = 4
	h := startProxy(t, harnessOpts{poolSize: n, opts: proxy.Options{ServerIdleTimeout: 400 * time.Millisecond}})
	ctx := context.Background()
	conns, pids := holdBackends(t, h, n)
	stopServers(t, pids)
	waitFor(t, "the proxy to close a backend idle too long", 5*time.Second, func() bool { return told(t, pids) > 0 })
	// The next Terminate would follow within a millisecond if they were
	// closed together; the proxy waits retireWait (1 s) for a server that
	// does not exit.
	for end := time.Now().Add(500 * time.Millisecond); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if k := told(t, pids); k > 1 {
			t.Fatalf("%d stopped servers were sent a Terminate at once, want 1 at a time", k)
		}
	}
	resumeServers(pids)
	waitFor(t, "every idle backend to close", 10*time.Second, func() bool { return proxyBackends(t, "") == 0 })
	waitFor(t, "their slots to be given back", 5*time.Second, func() bool { return h.srv.HostConns()[cluster.Primary.Addr()] == 0 })
	// The clients go on with new backends.
	for i, c := range conns {
		var user string
		if err := c.QueryRow(ctx, "SELECT current_user").Scan(&user); err != nil || user != "authenticated" {
			t.Fatalf("client %d after its backend was retired: %q, %v", i, user, err)
		}
	}
}

// TestShutdownDoesNotWaitForEachRetiringServer: backends retiring one at
// a time wait for each server's exit, but not at shutdown: with eight idle
// backends whose servers are stopped (they never exit by themselves), a
// shutdown takes about serverExitWait (5 s, the servers closed together),
// not one wait after another.
func TestShutdownDoesNotWaitForEachRetiringServer(t *testing.T) {
	waitNoBackends(t)
	const n = 8
	h := startProxy(t, harnessOpts{poolSize: n, opts: proxy.Options{ServerIdleTimeout: 300 * time.Millisecond}})
	_, pids := holdBackends(t, h, n)
	stopServers(t, pids)
	waitFor(t, "the proxy to start retiring the stopped servers' backends", 5*time.Second, func() bool { return told(t, pids) > 0 })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	if err := h.srv.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	// One wait after another would take n-1 retire waits (1 s each) and a
	// last serverExitWait: 12 s.
	if d := time.Since(start); d > 9*time.Second {
		t.Fatalf("shutdown took %v with %d retiring backends of stopped servers", d, n)
	}
	resumeServers(pids)
	waitFor(t, "the stopped servers to exit once resumed", 10*time.Second, func() bool { return proxyBackends(t, "") == 0 })
}

// holdBackends has n clients of p1 hold a backend each at once, then
// release them together, and returns the clients and their servers'
// process IDs.
func holdBackends(t *testing.T, h *harness, n int) ([]*pgx.Conn, []int) {
	t.Helper()
	ctx := context.Background()
	conns := make([]*pgx.Conn, n)
	pids := make([]int, n)
	for i := range conns {
		conns[i] = h.connect("p1", "authenticated", fmt.Sprintf("hold-%d", i))
		if _, err := conns[i].Exec(ctx, "BEGIN"); err != nil {
			t.Fatal(err)
		}
		if err := conns[i].QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pids[i]); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range conns {
		if _, err := c.Exec(ctx, "COMMIT"); err != nil {
			t.Fatal(err)
		}
	}
	return conns, pids
}

// stopServers stops server processes (SIGSTOP): they read nothing, so what
// the proxy sends them stays in their sockets (told). They are resumed when
// the test ends, if not before.
func stopServers(t *testing.T, pids []int) {
	t.Helper()
	t.Cleanup(func() { resumeServers(pids) }) // never leave a server stopped
	for _, pid := range pids {
		if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
			t.Fatalf("stop server %d: %v", pid, err)
		}
	}
}

func resumeServers(pids []int) {
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGCONT)
	}
}

// told counts the stopped servers that were sent something they have not
// read (a Terminate: nothing else goes to an idle backend).
func told(t *testing.T, pids []int) int {
	k := 0
	for _, pid := range pids {
		if unreadBytes(t, pid) > 0 {
			k++
		}
	}
	return k
}

// unreadBytes is how many bytes wait unread in the TCP sockets of process
// pid (the receive queues of /proc/net/tcp and tcp6).
func unreadBytes(t *testing.T, pid int) int64 {
	t.Helper()
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatalf("server %d: %v", pid, err)
	}
	inodes := map[string]bool{}
	for _, fd := range fds {
		l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if err == nil && strings.HasPrefix(l, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] = true
		}
	}
	var total int64
	for _, table := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(table)
		if err != nil {
			continue // no IPv6
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) < 10 || !inodes[f[9]] {
				continue
			}
			_, rx, ok := strings.Cut(f[4], ":") // tx_queue:rx_queue, hex
			if !ok {
				continue
			}
			q, err := strconv.ParseInt(rx, 16, 64)
			if err != nil {
				t.Fatalf("%s: receive queue %q: %v", table, f[4], err)
			}
			total += q
		}
	}
	return total
}

// TestQueryWaitTimeout: with the only backend held by an open transaction, a
// second client's statement fails with 53300 (ERROR) after query_wait_timeout
// and its connection stays usable.
func TestQueryWaitTimeout(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1, opts: proxy.Options{QueryWaitTimeout: 300 * time.Millisecond}})
	ctx := context.Background()
	a := h.connect("p1", "authenticated", "holder")
	b := h.connect("p1", "authenticated", "waiter")
	tx, err := a.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	_, err = b.Exec(ctx, "SELECT 1")
	waited := time.Since(start)
	checkWaitTimeout(t, "simple query", err, waited)
	if b.IsClosed() {
		t.Fatal("the waiting client was disconnected")
	}

	// Extended protocol: the batch fails the same way.
	start = time.Now()
	res := b.PgConn().ExecParams(ctx, "SELECT $1::int", [][]byte{[]byte("7")}, nil, nil, nil).Read()
	checkWaitTimeout(t, "extended query", res.Err, time.Since(start))

	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	var v int
	if err := b.QueryRow(ctx, "SELECT 42").Scan(&v); err != nil || v != 42 {
		t.Fatalf("waiter after the holder committed: %d, %v", v, err)
	}
	res = b.PgConn().ExecParams(ctx, "SELECT $1::int", [][]byte{[]byte("7")}, nil, nil, nil).Read()
	if res.Err != nil || len(res.Rows) != 1 || string(res.Rows[0][0]) != "7" {
		t.Fatalf("extended query after the holder committed: %v %q", res.Err, res.Rows)
	}
	tx2, err := b.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx2.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	if err := tx2.Commit(ctx); err != nil {
		t.Fatal(err)
	}
}

func checkWaitTimeout(t *testing.T, what string, err error, waited time.Duration) {
	t.Helper()
	var pe *pgconn.PgError
	if !errors.As(err, &pe) {
		t.Fatalf("%s: want a 53300 error, got %v after %v", what, err, waited)
	}
	if pe.Code != "53300" || pe.Severity != "ERROR" {
		t.Fatalf("%s: got %s %s %q, want ERROR 53300", what, pe.Severity, pe.Code, pe.Message)
	}
	if waited < 250*time.Millisecond || waited > 3*time.Second {
		t.Fatalf("%s: 53300 after %v, want about query_wait_timeout (300ms)", what, waited)
	}
}

// TestEvictsLongestIdleBackend: a newly active project at a full host cap
// takes the slot of the backend idle longest, as PgBouncer does, not of
// whichever pool comes first. Cap 2, one backend each for p1 and then p2,
// both projects keeping a client; p3's first query must close p1's. Three
// rounds, the order of p1 and p2 swapped in the second, so that a pick
// that ignores idle time passes all of them one time in eight.
func TestEvictsLongestIdleBackend(t *testing.T) {
	ctx := context.Background()
	for round, order := range [][2]string{{"p1", "p2"}, {"p2", "p1"}, {"p1", "p2"}} {
		t.Run(fmt.Sprintf("round %d", round), func(t *testing.T) {
			waitNoBackends(t)
			h := startProxy(t, harnessOpts{poolSize: 1, opts: proxy.Options{MaxServerConnPerHost: 2}})
			older, newer := order[0], order[1]
			for i, ref := range order {
				c := h.connect(ref, "authenticated", "u")
				if _, err := c.Exec(ctx, "SELECT 1"); err != nil {
					t.Fatal(err)
				}
				if i == 0 {
					time.Sleep(300 * time.Millisecond) // the older one's idle time
				}
			}
			time.Sleep(150 * time.Millisecond) // both past evictMinIdle
			newcomer := h.connect("p3", "authenticated", "n")
			if _, err := newcomer.Exec(ctx, "SELECT 1"); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "the evicted backend's server to leave", 5*time.Second, func() bool {
				return proxyBackends(t, "") <= 2
			})
			if o, n := proxyBackends(t, older), proxyBackends(t, newer); o != 0 || n != 1 {
				t.Fatalf("backends of %s (idle longer) %d, of %s %d; want the older one closed", older, o, newer, n)
			}
		})
	}
}
