package proxy_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cascata/proxy"

	"github.com/jackc/pgx/v5"
)

// capSample is one look at a host's backends: the pids PostgreSQL shows
// for the proxy's login in p1, between two readings of HostConns.
type capSample struct {
	pids          []int32
	before, after int // HostConns of the primary
}

// sampleCap takes a capSample and checks that HostConns was never below
// what PostgreSQL showed. The two readings bracket the query because
// HostConns only falls after the server has dropped a backend and only
// rises before it shows one: in a lowering the first reading bounds what
// the query sees, in a raise the second does.
func sampleCap(t *testing.T, h *harness) capSample {
	t.Helper()
	host := cluster.Primary.Addr()
	var s capSample
	s.before = h.srv.HostConns()[host]
	rows, err := superConn(t).Query(context.Background(),
		"SELECT pid FROM pg_stat_activity WHERE usename = 'authenticator' AND datname = 'p1'")
	if err != nil {
		t.Fatal(err)
	}
	s.pids, err = pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		t.Fatal(err)
	}
	s.after = h.srv.HostConns()[host]
	if n := len(s.pids); n > max(s.before, s.after) {
		t.Errorf("pg_stat_activity showed %d backends of the proxy while HostConns reported %d, then %d", n, s.before, s.after)
	}
	return s
}

// hostCapLoad runs clients that each repeat a short sleep through the proxy
// until stopped, for at most maxQueries each.
type hostCapLoad struct {
	done    []atomic.Int64 // queries each client has finished
	slowest atomic.Int64   // nanoseconds of the slowest query
	stop    chan struct{}
	wg      sync.WaitGroup
	errs    chan error
}

func startHostCapLoad(t *testing.T, conns []*pgx.Conn, maxQueries int) *hostCapLoad {
	l := &hostCapLoad{done: make([]atomic.Int64, len(conns)), stop: make(chan struct{}), errs: make(chan error, len(conns))}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	for i, c := range conns {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for range maxQueries {
				select {
				case <-l.stop:
					return
				default:
				}
				start := time.Now()
				if _, err := c.Exec(ctx, "SELECT pg_sleep(0.05)"); err != nil {
					l.errs <- fmt.Errorf("client %d, query %d after %v: %w", i, l.done[i].Load()+1, time.Since(start), err)
					return
				}
				l.done[i].Add(1)
				for d := int64(time.Since(start)); ; {
					old := l.slowest.Load()
					if d <= old || l.slowest.CompareAndSwap(old, d) {
						break
					}
				}
			}
		}()
	}
	t.Cleanup(cancel)
	return l
}

// end stops the clients, waits for them and reports their errors.
func (l *hostCapLoad) end(t *testing.T) {
	t.Helper()
	select {
	case <-l.stop:
		return // already ended
	default:
	}
	close(l.stop)
	l.wg.Wait()
	close(l.errs)
	for err := range l.errs {
		t.Error(err)
	}
}

func (l *hostCapLoad) counts() []int64 {
	out := make([]int64, len(l.done))
	for i := range l.done {
		out[i] = l.done[i].Load()
	}
	return out
}

func (l *hostCapLoad) total() int64 {
	var n int64
	for i := range l.done {
		n += l.done[i].Load()
	}
	return n
}

// TestHostCapLoweredUnderLoad: 12 clients keep 6 backends busy; the host
// cap is lowered to 2 at run time. Once that has settled PostgreSQL never
// shows more than 2 backends while the load goes on, they are 2 of the 6
// (no new backend was dialed meanwhile), HostConns agrees, and every
// client's queries still succeed. Raised back to 6, the proxy uses 6
// again. HostConns is never below what PostgreSQL shows. pool_size is 6
// too, so that clients beyond it wait in the pool's FIFO queue: with a
// larger pool, waiters for a slot race the client that has just released
// a backend, and how long one waits would be luck.
func TestHostCapLoweredUnderLoad(t *testing.T) {
	waitNoBackends(t)
	const (
		clients = 12
		high    = 6
		low     = 2
	)
	h := startProxy(t, harnessOpts{poolSize: high, projects: []string{"p1"},
		opts: proxy.Options{MaxServerConnPerHost: high, QueryWaitTimeout: 20 * time.Second}})
	if got := h.srv.MaxServerConnPerHost(); got != high {
		t.Fatalf("MaxServerConnPerHost = %d, want %d", got, high)
	}
	conns := make([]*pgx.Conn, clients)
	for i := range conns {
		conns[i] = h.connect("p1", "authenticated", fmt.Sprintf("cap-%d", i))
	}
	load := startHostCapLoad(t, conns, 5000)
	defer load.end(t)

	var atHigh []int32
	waitFor(t, fmt.Sprintf("the load to use %d backends", high), 15*time.Second, func() bool {
		s := sampleCap(t, h)
		if len(s.pids) > high || s.after > high {
			t.Fatalf("%d backends in pg_stat_activity, HostConns %d; the cap is %d", len(s.pids), s.after, high)
		}
		atHigh = s.pids
		return len(s.pids) == high && s.before == high && s.after == high
	})

	h.srv.SetMaxServerConnPerHost(low)
	if got := h.srv.MaxServerConnPerHost(); got != low {
		t.Fatalf("MaxServerConnPerHost = %d after lowering it to %d", got, low)
	}
	lowered := time.Now()
	atLowering := load.counts()
	t.Logf("%d queries before the cap was lowered", load.total())
	checkOld := func(s capSample) {
		for _, pid := range s.pids {
			if !slices.Contains(atHigh, pid) {
				t.Fatalf("backend %d was dialed while the host was over its lowered cap (backends before: %v)", pid, atHigh)
			}
		}
	}
	waitFor(t, fmt.Sprintf("the host to get down to %d backends", low), 15*time.Second, func() bool {
		s := sampleCap(t, h)
		checkOld(s)
		return len(s.pids) <= low && s.after <= low
	})
	t.Logf("down to %d backends %v after the cap was lowered", low, time.Since(lowered))

	// The lowered cap holds while the load goes on: sample until the
	// clients have run a good number of queries on the 2 backends.
	from, samples := load.total(), 0
	waitFor(t, "queries to run under the lowered cap", 30*time.Second, func() bool {
		s := sampleCap(t, h)
		checkOld(s)
		samples++
		if len(s.pids) > low || s.before > low || s.after > low {
			t.Fatalf("after the cap was lowered to %d and that had settled: %d backends in pg_stat_activity, HostConns %d then %d",
				low, len(s.pids), s.before, s.after)
		}
		if len(s.pids) != s.after {
			t.Errorf("HostConns reports %d, pg_stat_activity shows %d", s.after, len(s.pids))
		}
		return samples >= 20 && load.total()-from >= 60
	})
	t.Logf("%d samples under the lowered cap, %d queries meanwhile", samples, load.total()-from)

	h.srv.SetMaxServerConnPerHost(high)
	raised := time.Now()
	waitFor(t, fmt.Sprintf("the host to use %d backends again", high), 15*time.Second, func() bool {
		s := sampleCap(t, h)
		if len(s.pids) > high || s.after > high {
			t.Fatalf("%d backends in pg_stat_activity, HostConns %d; the cap is %d", len(s.pids), s.after, high)
		}
		return len(s.pids) == high && s.after == high
	})
	t.Logf("back to %d backends %v after the cap was raised", high, time.Since(raised))

	// Every client got its queries through since the cap was lowered.
	waitFor(t, "every client to run queries after the cap changed", 20*time.Second, func() bool {
		for i, n := range load.counts() {
			if n == atLowering[i] {
				return false
			}
		}
		return true
	})
	load.end(t)
	t.Logf("%d queries in all, the slowest took %v", load.total(), time.Duration(load.slowest.Load()))
}

// TestHostCapLoweredClosesIdle: backends left idle above a lowered cap are
// closed without waiting for server_idle_timeout, and the clients go on
// with the backends that remain.
func TestHostCapLoweredClosesIdle(t *testing.T) {
	waitNoBackends(t)
	const (
		clients = 6
		low     = 2
	)
	h := startProxy(t, harnessOpts{poolSize: clients, projects: []string{"p1"}, opts: proxy.Options{MaxServerConnPerHost: clients}})
	ctx := context.Background()
	conns := make([]*pgx.Conn, clients)
	txs := make([]pgx.Tx, clients)
	for i := range conns {
		conns[i] = h.connect("p1", "authenticated", fmt.Sprintf("idle-cap-%d", i))
		// Transactions open at once need a backend each.
		tx, err := conns[i].Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, "SELECT 1"); err != nil {
			t.Fatal(err)
		}
		txs[i] = tx
	}
	for _, tx := range txs {
		if err := tx.Commit(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if s := sampleCap(t, h); len(s.pids) != clients || s.after != clients {
		t.Fatalf("%d backends in pg_stat_activity and HostConns %d after %d transactions at once", len(s.pids), s.after, clients)
	}

	h.srv.SetMaxServerConnPerHost(low)
	var last capSample
	defer func() {
		if t.Failed() {
			// A slow lowering and a stuck one look alike but for this.
			t.Logf("last sample: %d backends in pg_stat_activity, HostConns %d", len(last.pids), last.after)
		}
	}()
	waitFor(t, fmt.Sprintf("idle backends above the cap of %d to close", low), 10*time.Second, func() bool {
		last = sampleCap(t, h)
		return len(last.pids) == low && last.after == low
	})
	for i, c := range conns {
		var v int
		if err := c.QueryRow(ctx, "SELECT 1").Scan(&v); err != nil {
			t.Fatalf("client %d under the lowered cap: %v", i, err)
		}
	}
	if s := sampleCap(t, h); len(s.pids) > low || s.after > low {
		t.Fatalf("%d backends in pg_stat_activity, HostConns %d, after queries under a cap of %d", len(s.pids), s.after, low)
	}
}
