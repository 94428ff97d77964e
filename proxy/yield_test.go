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
	stop := busyClients(ctx, t, h, "p1", "SELECT pg_sleep(0.005)", busy, func() { runs.Add(1) })
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
	stop := busyClients(ctx, t, h, "p1", "SELECT pg_sleep(0.005)", busy, func() {
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

// busyClients connects n clients of project ref that each run query (a
// short one) back to back, calling each after every one, until the
// returned function stops them (bounded in count as well); it reports
// their errors.
func busyClients(ctx context.Context, t *testing.T, h *harness, ref, query string, n int, each func()) func() {
	t.Helper()
	var wg sync.WaitGroup
	fails := make(chan error, n)
	bctx, bstop := context.WithCancel(ctx)
	for i := range n {
		c, err := h.tryConnect(ref, "authenticated", token(t, ref, "authenticated", fmt.Sprintf("busy%d", i), nil))
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
				if _, err := c.Exec(bctx, query, pgx.QueryExecModeSimpleProtocol); err != nil {
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

// Busy projects on database p1 under a host cap of 32 (a newcomers'
// reserve of 2), shaped like the scale bench's: pool_size 2, more clients
// than that, and together more than the cap less the reserve, so 13 of
// them hold 2 backends and 4 hold one and wait for a slot all the time;
// none of those is owed one by the others (they are at their fair share).
const (
	steadyCap      = 32
	steadyReserve  = 2
	steadyProjects = 17
	steadyPool     = 2
	steadyClients  = 4
	steadyQuery    = "SELECT pg_sleep(0.05)"
)

// steadyLoad starts a proxy with the busy projects (b1, b2, ...) and the
// newcomer projects given (ref to database_url), and the busy clients,
// which run until the test ends, and waits until the busy projects hold
// the cap less the reserve. It returns the proxy, the highest HostConns
// seen by the busy clients and the proxy's metrics.
func steadyLoad(ctx context.Context, t *testing.T, newcomers map[string]string) (*harness, *atomic.Int64, *prometheus.Registry) {
	t.Helper()
	waitNoBackends(t)
	refs := []string{}
	urls := map[string]string{}
	for i := range steadyProjects {
		ref := fmt.Sprintf("b%d", i+1)
		refs = append(refs, ref)
		urls[ref] = cluster.Primary.URL("authenticator", loginPassword, "p1")
	}
	for ref, u := range newcomers {
		refs = append(refs, ref)
		urls[ref] = u
	}
	reg := prometheus.NewRegistry()
	h := startProxy(t, harnessOpts{poolSize: steadyPool, projects: refs, urls: urls,
		opts: proxy.Options{MaxServerConnPerHost: steadyCap, Metrics: proxy.NewMetrics(reg)}})
	host := cluster.Primary.Addr()
	most := &atomic.Int64{}
	note := func() {
		n := int64(h.srv.HostConns()[host])
		for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
		}
	}
	// Each busy project's first backend is dialed at its first login,
	// before the load starts: none of them takes a slot of the reserve.
	for _, ref := range refs[:steadyProjects] {
		h.connect(ref, "authenticated", "first")
	}
	for _, ref := range refs[:steadyProjects] {
		t.Cleanup(busyClients(ctx, t, h, ref, steadyQuery, steadyClients, note))
	}
	// Steady: the cap less the reserve in use, by the busy projects,
	// for a while on end.
	var since time.Time
	waitFor(t, "the busy projects to hold the cap less the reserve", 15*time.Second, func() bool {
		if n := proxyBackends(t, ""); n > steadyCap {
			t.Fatalf("%d backends in pg_stat_activity, over the cap %d", n, steadyCap)
		}
		if h.srv.HostConns()[host] != steadyCap-steadyReserve || proxyBackends(t, "p1") != steadyCap-steadyReserve {
			since = time.Time{}
			return false
		}
		if since.IsZero() {
			since = time.Now()
		}
		return time.Since(since) >= 300*time.Millisecond
	})
	return h, most, reg
}

// TestReserveRefilledWhileOthersWait: a newcomer takes a slot of the
// reserve and keeps its backend (a transaction). The busy projects all
// wait for slots, but none is owed one: that must not keep the reserve
// from filling back, from a busy project at its next release (its
// backends are never idle for 100 ms). Before, any other waiter stopped
// the refill, so under a steady load (the scale bench's, its busy
// tenants one backend short of their pool) the reserve stayed in use and
// the next newcomers waited for an idle backend to be closed for them.
func TestReserveRefilledWhileOthersWait(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	h, most, _ := steadyLoad(ctx, t, map[string]string{"p3": cluster.Primary.URL("authenticator", loginPassword, "p3")})
	host := cluster.Primary.Addr()

	tx, err := h.connect("p3", "authenticated", "newcomer").Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the reserve to fill back up from the busy projects", 3*time.Second, func() bool {
		if n := proxyBackends(t, ""); n > steadyCap {
			t.Fatalf("%d backends in pg_stat_activity, over the cap %d", n, steadyCap)
		}
		return h.srv.HostConns()[host] <= steadyCap-steadyReserve
	})
	if n := proxyBackends(t, "p3"); n != 1 {
		t.Errorf("the newcomer has %d backends, want its 1", n)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if n := most.Load(); n > steadyCap {
		t.Fatalf("host connections %d over the cap %d", n, steadyCap)
	}
}

// TestReserveRefilledAfterTheDial: a newcomer takes a slot of the reserve
// and its dial takes a second (post_auth_delay). No busy backend is closed
// to fill the reserve back while that dial is under way: a server process
// exiting while the newcomer's starts slows the newcomer's login about as
// much as waiting for the exit. Once the newcomer is in, the reserve fills
// back up.
func TestReserveRefilledAfterTheDial(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	slow := cluster.Primary.URL("authenticator", loginPassword, "p2") + "&options=-c%20post_auth_delay%3D1"
	h, most, _ := steadyLoad(ctx, t, map[string]string{"p2": slow})
	host := cluster.Primary.Addr()

	var (
		c       *pgx.Conn
		err     error
		settled = make(chan struct{})
	)
	start := time.Now()
	go func() {
		defer close(settled)
		c, err = h.tryConnect("p2", "authenticated", token(t, "p2", "authenticated", "newcomer", nil))
	}()
	t.Cleanup(func() {
		<-settled
		if c != nil {
			_ = c.Close(context.Background())
		}
	})
	// The dial lasts a second at least; look during most of it.
	samples := 0
	for time.Since(start) < 700*time.Millisecond {
		if n := proxyBackends(t, "p1"); n != steadyCap-steadyReserve {
			t.Fatalf("%v into the newcomer's dial the busy projects have %d backends, not %d: one was closed meanwhile",
				time.Since(start).Round(time.Millisecond), n, steadyCap-steadyReserve)
		}
		if n := h.srv.HostConns()[host]; n > steadyCap {
			t.Fatalf("host connections %d over the cap %d", n, steadyCap)
		}
		samples++
		time.Sleep(20 * time.Millisecond)
	}
	<-settled
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < time.Second {
		t.Fatalf("the newcomer's login took %v, under its post_auth_delay: the dial was not held", d)
	}
	t.Logf("%d samples during the newcomer's dial", samples)
	waitFor(t, "the reserve to fill back up once the newcomer is in", 3*time.Second, func() bool {
		if n := proxyBackends(t, ""); n > steadyCap {
			t.Fatalf("%d backends in pg_stat_activity, over the cap %d", n, steadyCap)
		}
		return h.srv.HostConns()[host] <= steadyCap-steadyReserve
	})
	var one int
	if err := c.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil || one != 1 {
		t.Fatalf("newcomer's first query: %d, %v", one, err)
	}
	if n := most.Load(); n > steadyCap {
		t.Fatalf("host connections %d over the cap %d", n, steadyCap)
	}
}

// TestReserveRefilledFromAProjectLeft: a newcomer's backend idles in its
// pool after its only client left, a moment before the next newcomer takes
// a slot of the reserve. The reserve must fill back from that backend,
// which nobody is left to use, not from a busy project's: before, a backend
// idle under 100 ms was taken for a busy client's, so each newcomer closed
// a busy backend (which its project then dialled again) while the one the
// last newcomer left waited for server_idle_timeout, twice the churn of
// server processes on a host already at its cap.
func TestReserveRefilledFromAProjectLeft(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	h, most, reg := steadyLoad(ctx, t, map[string]string{
		"p2": cluster.Primary.URL("authenticator", loginPassword, "p2"),
		"p3": cluster.Primary.URL("authenticator", loginPassword, "p3"),
	})
	host := cluster.Primary.Addr()

	// The first newcomer takes a slot of the reserve, which a busy project
	// fills back at its next release, and leaves.
	a, err := h.tryConnect("p2", "authenticated", token(t, "p2", "authenticated", "first", nil))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	busy := steadyCap - steadyReserve - 1
	waitFor(t, "the reserve to fill back up from a busy project after the first newcomer", 3*time.Second, func() bool {
		return h.srv.HostConns()[host] <= steadyCap-steadyReserve && proxyBackends(t, "p1") == busy
	})
	if err := a.Close(ctx); err != nil {
		t.Fatal(err)
	}
	// The next one comes at once.
	b := h.connect("p3", "authenticated", "next")
	if _, err := b.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the reserve to fill back up from the backend of the project left", 3*time.Second, func() bool {
		if n := proxyBackends(t, ""); n > steadyCap {
			t.Fatalf("%d backends in pg_stat_activity, over the cap %d", n, steadyCap)
		}
		return h.srv.HostConns()[host] <= steadyCap-steadyReserve && proxyBackends(t, "p2") == 0
	})
	if n := proxyBackends(t, "p1"); n < busy {
		t.Errorf("the busy projects went from %d backends to %d: one of theirs filled the reserve", busy, n)
	}
	if n := serverConnects(t, reg, "p3"); n != 1 {
		t.Errorf("the second newcomer's project dialled %d backends, want 1: the one of its login went before its first query", n)
	}
	if n := most.Load(); n > steadyCap {
		t.Fatalf("host connections %d over the cap %d", n, steadyCap)
	}
}
