package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"cascata/internal/stats"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/puddle/v2"
	"golang.org/x/sync/semaphore"
)

// pool holds the backend connections of one project to one server (one
// database URL). Its size is the project's pool_size; the host limiter above
// it caps the connections to that server over all projects.
type pool struct {
	key     string // project ref + URL
	ref     string
	hostKey string
	cfg     *pgconn.Config // dials sockets with raw calls (withRawSocket)
	host    *hostLimiter
	p       *puddle.Pool[*backend]
	params  atomic.Pointer[map[string]string]
	lastUse atomic.Int64 // unix nanos of the last acquire or release
	waiting atomic.Int32 // acquirers blocked in this pool
	open    atomic.Int32 // backends of this pool that exist
	size    int32
	log     *slog.Logger
	metrics serverMetrics

	// The server's settings by lower-case name, with their pg_settings
	// context, loaded at the first login that needs them (startup.go).
	settingsMu sync.Mutex
	settings   atomic.Pointer[map[string]string]
}

// hostLimiter is the hard cap of backend connections to one host:port. Its
// semaphore is FIFO, so waiters of all tenants are served in arrival order.
type hostLimiter struct {
	key string
	cap int64
	sem *semaphore.Weighted

	mu      sync.Mutex
	pools   map[*pool]struct{}
	waiters map[*pool]int
	nwait   atomic.Int32 // len of waiters' sum, read without the lock
	open    atomic.Int64
}

// pools is the registry of all pools and host limiters of a server.
type pools struct {
	maxPerHost     int
	connectTimeout time.Duration
	waitTimeout    time.Duration
	log            *slog.Logger
	metrics        *Metrics

	mu    sync.Mutex
	byKey map[string]*pool
	hosts map[string]*hostLimiter
}

func newPools(maxPerHost int, connectTimeout, waitTimeout time.Duration, log *slog.Logger, m *Metrics) *pools {
	return &pools{
		maxPerHost:     maxPerHost,
		connectTimeout: connectTimeout,
		waitTimeout:    waitTimeout,
		log:            log,
		metrics:        m,
		byKey:          map[string]*pool{},
		hosts:          map[string]*hostLimiter{},
	}
}

// get returns the pool of a project for a URL, creating it on first use.
func (ps *pools) get(ref, url string, size int, cfg *pgconn.Config) (*pool, error) {
	key := ref + "\x00" + url
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if p, ok := ps.byKey[key]; ok {
		return p, nil
	}
	hostKey := fmt.Sprintf("%s:%d", cfg.Host, cfg.Port)
	h, ok := ps.hosts[hostKey]
	if !ok {
		h = &hostLimiter{key: hostKey, cap: int64(ps.maxPerHost), sem: semaphore.NewWeighted(int64(ps.maxPerHost)),
			pools: map[*pool]struct{}{}, waiters: map[*pool]int{}}
		ps.hosts[hostKey] = h
	}
	pl := &pool{key: key, ref: ref, hostKey: hostKey, cfg: withRawSocket(cfg), host: h, size: int32(size), log: ps.log, metrics: ps.metrics.forServers(ref)}
	pp, err := puddle.NewPool(&puddle.Config[*backend]{
		Constructor: pl.construct(ps),
		Destructor: func(b *backend) {
			b.close()
			h.sem.Release(1)
			h.open.Add(-1)
			pl.open.Add(-1)
			pl.metrics.serverClosed()
		},
		MaxSize: int32(size),
	})
	if err != nil {
		return nil, fmt.Errorf("create pool: %w", err)
	}
	pl.p = pp
	pl.lastUse.Store(time.Now().UnixNano())
	ps.byKey[key] = pl
	h.mu.Lock()
	h.pools[pl] = struct{}{}
	h.mu.Unlock()
	return pl, nil
}

// construct dials a backend once the host has a free slot. When the host is
// full it first closes an idle connection of another pool on that host, so a
// busy tenant takes capacity from idle ones.
func (pl *pool) construct(ps *pools) puddle.Constructor[*backend] {
	return func(ctx context.Context) (*backend, error) {
		ctx, cancel := context.WithTimeout(ctx, ps.waitTimeout)
		defer cancel()
		if err := pl.host.acquire(ctx, pl); err != nil {
			return nil, err
		}
		dctx, dcancel := context.WithTimeout(ctx, ps.connectTimeout)
		defer dcancel()
		b, err := dialBackend(dctx, pl.cfg)
		if err != nil {
			pl.host.sem.Release(1)
			pl.log.Warn("backend dial failed", "project", pl.ref, "host", pl.hostKey, "error", err)
			return nil, err
		}
		go b.serve() // ends when the backend is closed
		pl.host.open.Add(1)
		pl.open.Add(1)
		pl.metrics.serverOpened()
		if pl.params.Load() == nil {
			params := b.params
			pl.params.Store(&params)
		}
		return b, nil
	}
}

// errHostBusy is returned by a constructor of a pool that already has
// connections when the host has no free slot: its acquirer goes back to wait
// for one of the pool's own connections instead of a new one.
var errHostBusy = errors.New("host connection cap reached")

// hostBusyWait is how long a pool that has connections waits for a new slot
// before its acquirer looks at the pool's own connections again.
const hostBusyWait = 20 * time.Millisecond

// acquire takes one slot of the host's cap, waiting in FIFO order. A pool
// that already has connections waits only briefly (errHostBusy).
func (h *hostLimiter) acquire(ctx context.Context, p *pool) error {
	if h.sem.TryAcquire(1) {
		return nil
	}
	h.mu.Lock()
	h.waiters[p]++
	h.nwait.Add(1)
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		if h.waiters[p]--; h.waiters[p] <= 0 {
			delete(h.waiters, p)
		}
		h.nwait.Add(-1)
		h.mu.Unlock()
	}()
	for {
		// Idle connections of other pools free a slot at once.
		h.evictIdle(p)
		wctx, cancel := context.WithTimeout(ctx, hostBusyWait)
		err := h.sem.Acquire(wctx, 1)
		cancel()
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("wait for a connection slot on %s: %w", h.key, ctx.Err())
		}
		if p.open.Load() > 0 {
			return errHostBusy
		}
	}
}

// shouldYield reports whether p should close a released connection so that
// its slot goes to another pool: only when a pool waits for a slot that has
// fewer connections than its fair share (the host's cap divided among the
// pools that have connections or waiters) and p has at least two more than
// that pool. Capacity so moves from rich to starved tenants, and balanced
// load causes no reconnects.
func (h *hostLimiter) shouldYield(p *pool) bool {
	if h.nwait.Load() == 0 {
		return false // nobody waits for this host: the common case, no lock
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.waiters) == 0 || (len(h.waiters) == 1 && h.waiters[p] > 0) {
		return false
	}
	active := 0
	for q := range h.pools {
		if q.open.Load() > 0 || h.waiters[q] > 0 {
			active++
		}
	}
	share := int32(h.cap / int64(max(active, 1)))
	mine := p.open.Load()
	for q, n := range h.waiters {
		if q == p || n == 0 {
			continue
		}
		if theirs := q.open.Load(); theirs < share && mine > theirs+1 {
			return true
		}
	}
	return false
}

// evictIdle closes one idle connection of a pool other than p, freeing a slot.
func (h *hostLimiter) evictIdle(p *pool) bool {
	h.mu.Lock()
	others := make([]*pool, 0, len(h.pools))
	for q := range h.pools {
		if q != p {
			others = append(others, q)
		}
	}
	h.mu.Unlock()
	for _, q := range others {
		idle := q.p.AcquireAllIdle()
		if len(idle) == 0 {
			continue
		}
		idle[0].Destroy()
		for _, r := range idle[1:] {
			r.ReleaseUnused()
		}
		return true
	}
	return false
}

// waitCtx is the deadline of one wait for a backend; its context (and
// timer) is made only when something has to wait, unless ctx is given.
type waitCtx struct {
	timeout time.Duration
	ctx     context.Context
	cancel  context.CancelFunc
}

func (w *waitCtx) get() context.Context {
	if w.ctx == nil {
		w.ctx, w.cancel = context.WithTimeout(context.Background(), w.timeout)
	}
	return w.ctx
}

func (w *waitCtx) stop() {
	if w.cancel != nil {
		w.cancel()
	}
}

// acquireBackend gets a live backend from the pool within the wait's
// deadline. An idle backend of a full pool is taken without a deadline (no
// timer per transaction); anything that may block uses the wait's context.
func (pl *pool) acquireBackend(wait *waitCtx) (*puddle.Resource[*backend], error) {
	pl.lastUse.Store(time.Now().UnixNano())
	if pl.open.Load() >= pl.size {
		// Full: TryAcquire cannot start a dial, it only finds an idle one.
		if res, err := pl.p.TryAcquire(context.Background()); err == nil {
			if !res.Value().dead.Load() {
				return res, nil
			}
			res.Destroy()
		}
	}
	ctx := wait.get()
	pl.waiting.Add(1)
	defer pl.waiting.Add(-1)
	for {
		res, err := pl.p.Acquire(ctx)
		if errors.Is(err, errHostBusy) {
			continue // the host is full: wait for one of this pool's own connections
		}
		if err != nil {
			return nil, err
		}
		if !res.Value().dead.Load() {
			return res, nil
		}
		pl.log.Debug("dropping dead idle backend", "project", pl.ref, "host", pl.hostKey)
		res.Destroy()
	}
}

// release returns a clean backend, or closes it when another tenant waits
// for a slot on this host and this pool is above its fair share.
func (pl *pool) release(res *puddle.Resource[*backend]) {
	pl.lastUse.Store(time.Now().UnixNano())
	if pl.host.shouldYield(pl) {
		res.Destroy()
		return
	}
	res.Release()
}

// reap closes backends idle longer than idle and drops pools that are empty
// and unused for that long. It returns how many pools remain.
func (ps *pools) reap(idle time.Duration) int {
	ps.mu.Lock()
	all := make([]*pool, 0, len(ps.byKey))
	for _, p := range ps.byKey {
		all = append(all, p)
	}
	ps.mu.Unlock()
	now := time.Now()
	for _, p := range all {
		for _, r := range p.p.AcquireAllIdle() {
			if r.IdleDuration() >= idle {
				r.Destroy()
			} else {
				r.ReleaseUnused()
			}
		}
		st := p.p.Stat()
		if st.TotalResources() == 0 && p.waiting.Load() == 0 && now.Sub(time.Unix(0, p.lastUse.Load())) >= idle {
			ps.drop(p)
		}
	}
	ps.mu.Lock()
	defer ps.mu.Unlock()
	return len(ps.byKey)
}

func (ps *pools) drop(p *pool) {
	ps.mu.Lock()
	if ps.byKey[p.key] == p {
		delete(ps.byKey, p.key)
	}
	ps.mu.Unlock()
	p.host.mu.Lock()
	delete(p.host.pools, p)
	p.host.mu.Unlock()
	p.p.Close()
}

// dropProject closes all pools of a project (removed or changed at reload).
// Connections in use are closed when their client releases them.
func (ps *pools) dropProject(ref string, keepURLs map[string]bool) {
	ps.mu.Lock()
	var victims []*pool
	for _, p := range ps.byKey {
		if p.ref == ref && !keepURLs[p.key[len(ref)+1:]] {
			victims = append(victims, p)
		}
	}
	ps.mu.Unlock()
	for _, p := range victims {
		ps.drop(p)
	}
}

// closeAll closes every pool (shutdown).
func (ps *pools) closeAll() {
	ps.mu.Lock()
	all := make([]*pool, 0, len(ps.byKey))
	for _, p := range ps.byKey {
		all = append(all, p)
	}
	ps.mu.Unlock()
	for _, p := range all {
		ps.drop(p)
	}
}

// stats is a snapshot of every pool, for the admin plane.
func (ps *pools) stats() []stats.Pool {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	out := make([]stats.Pool, 0, len(ps.byKey))
	for _, p := range ps.byKey {
		st := p.p.Stat()
		out = append(out, stats.Pool{
			Project: p.ref, Host: p.hostKey,
			ClientsActive: int(st.AcquiredResources()), ServersActive: int(st.AcquiredResources()), ServersIdle: int(st.IdleResources()),
			ClientsWaiting: int(p.waiting.Load()), PoolSize: int(st.MaxResources()),
			Acquires: st.AcquireCount(), WaitSecondsTotal: st.EmptyAcquireWaitTime().Seconds(),
		})
	}
	return out
}

// errPoolClosed is what Acquire returns on a pool dropped under the caller.
var errPoolClosed = puddle.ErrClosedPool

func isPoolClosed(err error) bool { return errors.Is(err, errPoolClosed) }
