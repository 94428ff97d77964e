package proxy_test

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cascata/proxy"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
)

// serverConnects reads cascata_server_connects_total of ref.
func serverConnects(t *testing.T, reg *prometheus.Registry, ref string) int {
	t.Helper()
	m := regexp.MustCompile(`cascata_server_connects_total\{project="` + ref + `"\} (\d+)`).FindStringSubmatch(scrape(t, reg))
	if m == nil {
		return 0
	}
	n, err := strconv.Atoi(m[1])
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestNewcomerGetsTheYieldedSlot: busy clients of p1 hold the whole host
// cap, back to back. A newly active project waits for a slot; one busy
// backend is closed for it, and that slot goes to the newcomer, not back
// into the queue where p1's own dials for the closed backend's replacement
// wait too. Before, p1 took the slot again in most rounds, the newcomer
// stayed starved and the next release yielded once more: p1 closed and
// dialled backends over and over (the scale bench measured three closes
// per newcomer and first queries of 150-450 ms).
func TestNewcomerGetsTheYieldedSlot(t *testing.T) {
	waitNoBackends(t)
	const (
		hostCap = 4
		busy    = 8 // p1's clients: twice its pool
	)
	reg := prometheus.NewRegistry()
	h := startProxy(t, harnessOpts{poolSize: hostCap, opts: proxy.Options{MaxServerConnPerHost: hostCap, Metrics: proxy.NewMetrics(reg)}})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	var runs atomic.Int64
	stop := busyClients(ctx, t, h, busy, func() { runs.Add(1) })
	defer stop()
	waitFor(t, "p1 to hold the host cap", 10*time.Second, func() bool {
		return serverConnects(t, reg, "p1") >= hostCap && h.srv.HostConns()[cluster.Primary.Addr()] == hostCap
	})

	// Two newcomers, one after the other; each should cost p1 one backend,
	// and p1 should dial none while the newcomer waits.
	for _, ref := range []string{"p2", "p3"} {
		before, runsBefore := serverConnects(t, reg, "p1"), runs.Load()
		c, err := h.tryConnect(ref, "authenticated", token(t, ref, "authenticated", "newcomer", nil))
		if err != nil {
			t.Fatalf("%s: connect: %v", ref, err)
		}
		var one int
		if err := c.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil || one != 1 {
			t.Fatalf("%s: first query: %d, %v", ref, one, err)
		}
		after := serverConnects(t, reg, "p1")
		_ = c.Close(ctx)
		if got := serverConnects(t, reg, ref); got != 1 {
			t.Errorf("%s dialled %d backends for one client, want 1", ref, got)
		}
		if after != before {
			t.Errorf("p1 dialled %d backends while %s waited for a slot (%d busy statements meanwhile): the yielded slot went back to p1", after-before, ref, runs.Load()-runsBefore)
		}
		if n := h.srv.HostConns()[cluster.Primary.Addr()]; n > hostCap {
			t.Fatalf("host connections %d over the cap %d", n, hostCap)
		}
	}
}

// TestNewcomerReserve: with a cap of 32, two slots are kept for tenants
// with no backend. Busy clients of p1 (pool_size 32) never hold more than
// 30; a newly active p2 dials at once, with no backend closed for it and
// no slot handed over, and the host never exceeds the cap; then the
// reserve fills back up.
func TestNewcomerReserve(t *testing.T) {
	waitNoBackends(t)
	const (
		hostCap = 32
		reserve = 2
		busy    = 40
	)
	reg := prometheus.NewRegistry()
	h := startProxy(t, harnessOpts{poolSize: hostCap, opts: proxy.Options{MaxServerConnPerHost: hostCap, Metrics: proxy.NewMetrics(reg)}})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	host := cluster.Primary.Addr()
	var most atomic.Int64
	stop := busyClients(ctx, t, h, busy, func() {
		n := int64(h.srv.HostConns()[host])
		for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
		}
	})
	defer stop()
	waitFor(t, "p1 to hold the cap less the reserve", 10*time.Second, func() bool {
		return h.srv.HostConns()[host] == hostCap-reserve && serverConnects(t, reg, "p1") == hostCap-reserve
	})
	time.Sleep(300 * time.Millisecond) // p1 keeps trying to grow meanwhile
	if n := most.Load(); n > hostCap-reserve {
		t.Fatalf("p1 alone held %d backends, more than the cap %d less the reserve %d", n, hostCap, reserve)
	}

	before, handed := serverConnects(t, reg, "p1"), proxy.Handoffs(h.srv)
	c, err := h.tryConnect("p2", "authenticated", token(t, "p2", "authenticated", "newcomer", nil))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	var one int
	if err := c.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil || one != 1 {
		t.Fatalf("newcomer's first query: %d, %v", one, err)
	}
	if n := proxy.Handoffs(h.srv) - handed; n != 0 {
		t.Errorf("the newcomer waited for %d slots handed over: the reserve was not free", n)
	}
	if got := serverConnects(t, reg, "p2"); got != 1 {
		t.Errorf("p2 dialled %d backends, want 1", got)
	}
	// p1 gives a backend back to fill the reserve again, and dials none.
	waitFor(t, "the reserve to fill back up", 10*time.Second, func() bool {
		return h.srv.HostConns()[host] <= hostCap-reserve
	})
	if after := serverConnects(t, reg, "p1"); after != before {
		t.Errorf("p1 dialled %d backends after the newcomer came", after-before)
	}
	if n := most.Load(); n > hostCap {
		t.Fatalf("host connections %d over the cap %d", n, hostCap)
	}
}

// busyClients connects n clients of p1 that each run a short statement back
// to back, calling each after every one, until the returned function stops
// them (bounded in count as well); it reports their errors.
func busyClients(ctx context.Context, t *testing.T, h *harness, n int, each func()) func() {
	t.Helper()
	var wg sync.WaitGroup
	fails := make(chan error, n)
	bctx, bstop := context.WithCancel(ctx)
	for i := range n {
		c, err := h.tryConnect("p1", "authenticated", token(t, "p1", "authenticated", fmt.Sprintf("busy%d", i), nil))
		if err != nil {
			bstop()
			wg.Wait()
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close(context.Background())
			for range 20000 {
				if bctx.Err() != nil {
					return
				}
				if _, err := c.Exec(bctx, "SELECT pg_sleep(0.005)", pgx.QueryExecModeSimpleProtocol); err != nil {
					if bctx.Err() == nil {
						fails <- fmt.Errorf("busy client: %w", err)
					}
					return
				}
				each()
			}
		}()
	}
	return func() {
		bstop()
		wg.Wait()
		close(fails)
		for err := range fails {
			t.Error(err)
		}
	}
}
