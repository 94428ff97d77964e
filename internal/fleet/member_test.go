package fleet_test

import (
	"context"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cascata/internal/controldb"
	"cascata/internal/fleet"
	"cascata/internal/pgcluster"
	"cascata/internal/pgtest"

	"github.com/jackc/pgx/v5/pgxpool"
)

var ctl *pgcluster.Cluster

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m, pgcluster.Options{}, &ctl)) }

func controlDB(t *testing.T) *pgxpool.Pool {
	t.Helper()
	pool, err := controldb.Open(context.Background(), pgtest.NewDatabase(t, ctl, "fleet"), 4)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// proxyState is the part of the proxy a member drives: its cap share, the
// connections it holds, its paused projects.
type proxyState struct {
	mu     sync.Mutex
	limit  int
	held   int // connections held to the one host
	paused map[string]bool
}

func newProxyState() *proxyState { return &proxyState{paused: map[string]bool{}} }

func (s *proxyState) SetMaxServerConnPerHost(n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.limit = n
	s.held = min(s.held, n) // idle connections above the share are closed
}

func (s *proxyState) HostConns() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return map[string]int{"127.0.0.1:5432": s.held}
}

func (s *proxyState) Pause(ctx context.Context, ref string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.paused[ref] = true
	return nil
}

func (s *proxyState) Resume(ref string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.paused, ref)
}

func (s *proxyState) Paused(ref string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.paused[ref]
}

// catalogRev is a catalog whose revision the test moves.
type catalogRev struct{ rev atomic.Int64 }

func (c *catalogRev) Revision() int64                { return c.rev.Load() }
func (c *catalogRev) Sync(ctx context.Context) error { return nil }

type node struct {
	m    *fleet.Member
	srv  *proxyState
	cat  *catalogRev
	stop func()
}

// join starts an instance; with, if given, changes its options first.
func join(t *testing.T, pool *pgxpool.Pool, id string, cap int, timeout time.Duration, with ...func(*fleet.Options)) *node {
	t.Helper()
	n := &node{srv: newProxyState(), cat: &catalogRev{}}
	opts := fleet.Options{Pool: pool, ID: id, Timeout: timeout, Cap: cap, Server: n.srv, Catalog: n.cat, Dir: t.TempDir()}
	for _, w := range with {
		w(&opts)
	}
	m, err := fleet.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); m.Run(ctx) }()
	var once sync.Once
	n.m, n.stop = m, func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(n.stop)
	return n
}

// The fleet's busy instances never hold more than the cap together, while
// instances join and leave, and the shares even out.
func TestSharesStayWithinTheCap(t *testing.T) {
	pool := controlDB(t)
	const cap = 30
	var nodes []*node
	var over atomic.Int64
	sampling, stopSampling := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var mu sync.Mutex
	wg.Add(1)
	go func() {
		defer wg.Done()
		for sampling.Err() == nil {
			// One consistent snapshot: every proxy stands still while the
			// sum is taken, as the connections on the server would.
			mu.Lock()
			total := 0
			for _, n := range nodes {
				n.srv.mu.Lock()
				n.srv.held = n.srv.limit // busy: every connection the share allows
				total += n.srv.held
			}
			for _, n := range nodes {
				n.srv.mu.Unlock()
			}
			mu.Unlock()
			if total > cap {
				over.Store(int64(total))
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	for i := range 3 {
		n := join(t, pool, fmt.Sprintf("i%d", i), cap, 3*time.Second)
		mu.Lock()
		nodes = append(nodes, n)
		mu.Unlock()
	}
	pgtest.WaitFor(t, 10*time.Second, "three instances take 10 each", func() bool {
		for _, n := range nodes {
			if n.m.Share() != 10 {
				return false
			}
		}
		return true
	})
	// A graceful stop drains the proxy first, then marks the instance
	// stopped: its share is free at once.
	nodes[2].srv.SetMaxServerConnPerHost(0)
	nodes[2].stop()
	pgtest.WaitFor(t, 10*time.Second, "two instances take 15 each", func() bool {
		return nodes[0].m.Share() == 15 && nodes[1].m.Share() == 15
	})
	stopSampling()
	wg.Wait()
	if v := over.Load(); v > 0 {
		t.Fatalf("the fleet held %d connections to one host, cap %d", v, cap)
	}
	list, err := nodes[0].m.Instances(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	live := 0
	for _, i := range list {
		if i.Live {
			live++
		}
	}
	if len(list) != 3 || live != 2 {
		t.Fatalf("instances: %+v, want 3 listed, 2 live", list)
	}
}

// A pause holds the project on every live instance before it returns; a
// resume releases it everywhere once each has the catalog revision it names.
func TestPauseHoldsEveryInstance(t *testing.T) {
	pool := controlDB(t)
	a := join(t, pool, "a", 30, 3*time.Second)
	b := join(t, pool, "b", 30, 3*time.Second)
	c := join(t, pool, "c", 30, 3*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := b.m.Pause(ctx, "p1"); err != nil {
		t.Fatal(err)
	}
	for name, n := range map[string]*node{"a": a, "b": b, "c": c} {
		if !n.srv.Paused("p1") {
			t.Fatalf("pause returned before instance %s held the project", name)
		}
	}
	b.cat.rev.Store(7) // the switch a cutover wrote through b
	b.m.Resume("p1")
	pgtest.WaitFor(t, 2*time.Second, "b resumes", func() bool { return !b.srv.Paused("p1") })
	time.Sleep(300 * time.Millisecond) // a and c get every chance to resume early
	if !a.srv.Paused("p1") || !c.srv.Paused("p1") {
		t.Fatal("an instance resumed before its catalog had the cutover's revision")
	}
	a.cat.rev.Store(7)
	c.cat.rev.Store(7)
	pgtest.WaitFor(t, 3*time.Second, "a and c resume", func() bool { return !a.srv.Paused("p1") && !c.srv.Paused("p1") })
}

// An instance that stops beating without leaving (killed) is left out of a
// pause once its heartbeat is older than the timeout.
func TestPauseLeavesOutASilentInstance(t *testing.T) {
	pool := controlDB(t)
	const timeout = 1500 * time.Millisecond
	a := join(t, pool, "a", 30, timeout)
	if _, err := pool.Exec(context.Background(), `INSERT INTO cascata_control.instances (id) VALUES ('killed')`); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	if err := a.m.Pause(ctx, "p1"); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if took < timeout/2 || took > timeout+2*time.Second {
		t.Fatalf("the pause took %s with a silent instance, want about the timeout %s", took, timeout)
	}
	t.Logf("pause with a silent instance: %s", took.Round(time.Millisecond))
}

// A pause whose instance stops (killed in the middle of an ejection) ends:
// the others would otherwise hold the project for ever.
func TestPauseOfAStoppedInstanceEnds(t *testing.T) {
	pool := controlDB(t)
	a := join(t, pool, "a", 30, 1500*time.Millisecond)
	b := join(t, pool, "b", 30, 1500*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := a.m.Pause(ctx, "p1"); err != nil {
		t.Fatal(err)
	}
	if !b.srv.Paused("p1") {
		t.Fatal("b does not hold the project")
	}
	b.cat.rev.Store(3) // the newest revision b has: the resume names it
	a.stop()
	pgtest.WaitFor(t, 5*time.Second, "b releases the project of a stopped instance's pause", func() bool { return !b.srv.Paused("p1") })
	if v := pgtest.QueryValue(t, pool.Config().ConnString(), "SELECT min_revision FROM cascata_control.pauses WHERE ref = 'p1'"); v != "3" {
		t.Fatalf("the resume names revision %s, want b's 3", v)
	}
}

// After an outage of the control database longer than the instance
// timeout every heartbeat is stale; an instance back in touch must not take
// the shares of the others, which are alive and hold them.
func TestSharesAfterAnOutage(t *testing.T) {
	ctx := context.Background()
	pool := controlDB(t)
	const cap, timeout = 30, 1500 * time.Millisecond
	nodes := []*node{join(t, pool, "a", cap, timeout), join(t, pool, "b", cap, timeout), join(t, pool, "c", cap, timeout)}
	pgtest.WaitFor(t, 10*time.Second, "three instances take 10 each", func() bool {
		return nodes[0].m.Share() == 10 && nodes[1].m.Share() == 10 && nodes[2].m.Share() == 10
	})
	if err := ctl.Primary.Stop(ctx, "fast"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * timeout) // the outage: every heartbeat ages past the timeout
	if err := ctl.Primary.Start(ctx); err != nil {
		t.Fatal(err)
	}
	sharesWithinCap(t, nodes, cap, 3*timeout, "after the outage")
}

// sharesWithinCap checks every 10 ms, for d, that the shares of nodes add
// up to cap at most.
func sharesWithinCap(t *testing.T, nodes []*node, cap int, d time.Duration, when string) {
	t.Helper()
	start := time.Now()
	for time.Since(start) < d {
		total := 0
		var each []int
		for _, n := range nodes {
			each = append(each, n.m.Share())
			total += each[len(each)-1]
		}
		if total > cap {
			t.Fatalf("%s (+%v) the shares %v add up to %d, cap %d", when, time.Since(start).Round(time.Millisecond), each, total, cap)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
