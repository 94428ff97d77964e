package main

import (
	"context"
	"fmt"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"cascata/auth"

	"github.com/jackc/pgx/v5/pgconn"
)

// clientRole is the role every client's JWT claims and logs in as.
const clientRole = "authenticated"

// dialer makes client connections through the proxy, each with a JWT of its
// own (a distinct sub) signed with its project's secret.
type dialer struct {
	host, port string
	minted     atomic.Int64
}

func newDialer(addr string) (*dialer, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("proxy address: %w", err)
	}
	return &dialer{host: host, port: port}, nil
}

// open connects as a new user of p and runs SELECT 1, so the client's
// session has used a backend once.
func (d *dialer) open(ctx context.Context, p project) (*pgconn.PgConn, error) {
	conn, err := d.login(ctx, p)
	if err != nil {
		return nil, err
	}
	if err := query(ctx, conn, "SELECT 1"); err != nil {
		_ = conn.Close(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("first query of %s: %w", p.ref, err)
	}
	return conn, nil
}

// login connects as a new user of p.
func (d *dialer) login(ctx context.Context, p project) (*pgconn.PgConn, error) {
	n := d.minted.Add(1)
	tok, err := auth.Mint(auth.MintKey{Secret: p.secret},
		map[string]any{"role": clientRole, "ref": p.ref, "sub": fmt.Sprintf("00000000-0000-4000-8000-%012d", n)}, 2*time.Hour)
	if err != nil {
		return nil, fmt.Errorf("mint token: %w", err)
	}
	cfg, err := pgconn.ParseConfig(fmt.Sprintf("host=%s port=%s dbname=%s user=%s sslmode=disable connect_timeout=20", d.host, d.port, p.ref, clientRole))
	if err != nil {
		return nil, fmt.Errorf("client config: %w", err)
	}
	cfg.Password = tok
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", p.ref, err)
	}
	return conn, nil
}

// query runs sql (simple protocol) within 30 s.
func query(ctx context.Context, conn *pgconn.PgConn, sql string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	_, err := conn.Exec(ctx, sql).ReadAll()
	return err
}

// client is one connection held open through the proxy.
type client struct {
	conn *pgconn.PgConn
	proj int // index into world.load
}

// fleet is every idle client of the run.
type fleet struct {
	clients []client
	perProj []int
}

// growth is what one grow did.
type growth struct {
	took      time.Duration
	failures  int
	firstFail error
}

// clientsFor says how many clients each project has at a client count:
// per clients each on as many projects as that takes (the last may have
// fewer), none on the others.
func clientsFor(n, per, projects int) []int {
	out := make([]int, projects)
	for i := range out {
		out[i] = min(per, max(0, n-i*per))
	}
	return out
}

// grow opens the clients that bring the fleet to n, project after project
// (a project's new clients come together, as an application's pool starts),
// on o.workers goroutines.
func (f *fleet) grow(ctx context.Context, d *dialer, load []project, n, per, workers int) (growth, error) {
	var g growth
	want := clientsFor(n, per, len(load))
	if f.perProj == nil {
		f.perProj = make([]int, len(load))
	}
	var toProbe []int
	for p := range load {
		for range want[p] - f.perProj[p] {
			toProbe = append(toProbe, p)
		}
	}
	var (
		mu   sync.Mutex
		next atomic.Int64
		wg   sync.WaitGroup
	)
	start := time.Now()
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				i := int(next.Add(1)) - 1
				if i >= len(toProbe) {
					return
				}
				p := toProbe[i]
				conn, err := d.open(ctx, load[p])
				mu.Lock()
				f.perProj[p]++ // counted as tried: a failed client is not tried again
				if err != nil {
					g.failures++
					if g.firstFail == nil {
						g.firstFail = err
					}
				} else {
					f.clients = append(f.clients, client{conn: conn, proj: p})
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	g.took = time.Since(start)
	if err := ctx.Err(); err != nil {
		return g, fmt.Errorf("opening clients: %w", err)
	}
	return g, nil
}

func (f *fleet) close(ctx context.Context) {
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for _, c := range f.clients {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			_ = c.conn.Close(cctx)
			<-sem
		}()
	}
	wg.Wait()
	f.clients = nil
}

// latencies collects durations and errors from many goroutines.
type latencies struct {
	mu    sync.Mutex
	ds    []time.Duration
	errs  int
	first error
}

func (l *latencies) add(d time.Duration, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err != nil {
		l.errs++
		if l.first == nil {
			l.first = err
		}
		return
	}
	l.ds = append(l.ds, d)
}

// pct is the nearest-rank percentile (0 < q ≤ 1) in milliseconds.
func (l *latencies) pct(q float64) float64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.ds) == 0 {
		return 0
	}
	s := slices.Clone(l.ds)
	slices.Sort(s)
	i := int(float64(len(s))*q+0.999999) - 1
	return float64(s[min(max(i, 0), len(s)-1)].Microseconds()) / 1000
}

func (l *latencies) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.ds)
}

// light has every every-th client run SELECT 1 once a second for dur, each
// starting at its own offset within the first second. It returns the
// latencies, how many clients and how many projects took part.
func (f *fleet) light(ctx context.Context, every int, dur time.Duration) (*latencies, int, int) {
	res := &latencies{}
	var wg sync.WaitGroup
	active := 0
	projs := map[int]bool{}
	end := time.Now().Add(dur)
	for i := 0; i < len(f.clients); i += every {
		c := f.clients[i]
		projs[c.proj] = true
		offset := time.Duration(active%1000) * time.Millisecond
		active++
		wg.Add(1)
		go func() {
			defer wg.Done()
			next := time.Now().Add(offset)
			for tick := 0; tick <= int(dur/time.Second); tick++ {
				if wait := time.Until(next); wait > 0 {
					select {
					case <-ctx.Done():
						return
					case <-time.After(wait):
					}
				}
				if time.Now().After(end) {
					return
				}
				t0 := time.Now()
				err := query(ctx, c.conn, "SELECT 1")
				res.add(time.Since(t0), err)
				next = next.Add(time.Second)
			}
		}()
	}
	wg.Wait()
	return res, active, len(projs)
}

// busy holds the host cap: per busy project, several clients run a query
// back to back until stop, each at most maxRuns times.
type busy struct {
	conns     []*pgconn.PgConn
	dialFails int
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	runs      atomic.Int64
	errs      atomic.Int64
	first     atomic.Value
}

const maxBusyRuns = 100000

// startBusy connects the busy clients (all at once, within 30 s) and starts
// their loops; a client that cannot connect is counted in dialFails and
// left out.
func startBusy(ctx context.Context, d *dialer, projs []project, per int, sql string) *busy {
	b := &busy{}
	var (
		mu sync.Mutex
		wg sync.WaitGroup
	)
	cctx, ccancel := context.WithTimeout(ctx, 30*time.Second)
	for _, p := range projs {
		for range per {
			wg.Add(1)
			go func() {
				defer wg.Done()
				conn, err := d.open(cctx, p)
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					b.dialFails++
					b.first.CompareAndSwap(nil, "connect: "+err.Error())
					return
				}
				b.conns = append(b.conns, conn)
			}()
		}
	}
	wg.Wait()
	ccancel()
	bctx, cancel := context.WithCancel(ctx)
	b.cancel = cancel
	for _, c := range b.conns {
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			for range maxBusyRuns {
				if bctx.Err() != nil {
					return
				}
				if err := query(bctx, c, sql); err != nil {
					if bctx.Err() != nil {
						return
					}
					b.errs.Add(1)
					b.first.CompareAndSwap(nil, err.Error())
					continue
				}
				b.runs.Add(1)
			}
		}()
	}
	return b
}

func (b *busy) stop(ctx context.Context) {
	if b.cancel != nil {
		b.cancel()
	}
	b.wg.Wait()
	for _, c := range b.conns {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_ = c.Close(cctx)
		cancel()
	}
}

// probeResult is the connect + first-query latency of newly active projects.
type probeResult struct {
	lat       latencies
	connect   latencies // the connect (login) part alone
	floor     latencies // a direct PostgreSQL login + SELECT 1 after each probe
	hadPool   int       // probe projects that still had a pool when probing began
	cut       int       // probes under way when the time for them ran out
	busyRuns  int64
	busyErrs  int64
	busyConns int
	busyFails int // busy clients that could not connect
	busyErr   string
}

// probe connects to each fresh project in turn and runs SELECT 1, timing
// the login and the whole, then disconnects; one probe at a time, each
// project once. With floorURL, each probe is followed by a login to
// PostgreSQL itself and SELECT 1 (res.floor): what the first query of a
// project costs at that moment without cascata, since a project with no
// backend needs a server login whatever proxy it goes through.
func probe(ctx context.Context, d *dialer, fresh []project, floorURL string, res *probeResult) error {
	for _, p := range fresh {
		if ctx.Err() != nil {
			return fmt.Errorf("probes: %w", ctx.Err())
		}
		t0 := time.Now()
		conn, err := d.login(ctx, p)
		if err == nil {
			res.connect.add(time.Since(t0), nil)
			err = query(ctx, conn, "SELECT 1")
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			_ = conn.Close(cctx)
			cancel()
		}
		if err != nil && ctx.Err() != nil {
			res.cut++ // the time for the probes ran out under it
			continue
		}
		res.lat.add(time.Since(t0), err)
		if floorURL != "" {
			if err := direct(ctx, floorURL, 1, &res.floor); err != nil && ctx.Err() == nil {
				return err
			}
		}
	}
	return nil
}

// direct logs in to PostgreSQL itself n times in turn (no proxy) and runs
// SELECT 1, timing both: what one backend connection costs on this machine.
func direct(ctx context.Context, url string, n int, res *latencies) error {
	for range n {
		if ctx.Err() != nil {
			return fmt.Errorf("direct logins: %w", ctx.Err())
		}
		t0 := time.Now()
		conn, err := pgconn.Connect(ctx, url)
		if err == nil {
			err = query(ctx, conn, "SELECT 1")
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			_ = conn.Close(cctx)
			cancel()
		}
		res.add(time.Since(t0), err)
	}
	return nil
}
