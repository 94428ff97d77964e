package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
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
	lastUse atomic.Int64  // unix nanos of the last acquire or release
	waiting atomic.Int32  // acquirers blocked in this pool
	clients *atomic.Int32 // the project's connected clients (projectRun)
	open    atomic.Int32  // backends of this pool that exist
	dialing atomic.Int32  // constructors of this pool under way
	size    int32
	log     *slog.Logger
	metrics serverMetrics
	// links are the live backends' closing state, by backend (see link).
	links sync.Map

	// The server's settings by lower-case name, with their pg_settings
	// context, loaded at the first login that needs them (startup.go).
	settingsMu sync.Mutex
	settings   atomic.Pointer[map[string]string]
}

// link is what a pool keeps of one of its backends to close it.
type link struct {
	served  chan struct{} // closed when the backend's goroutine (serve) returns
	closing atomic.Bool   // counted in its host's gone
}

// hostLimiter is the hard cap of backend connections to one host:port. Its
// semaphore is FIFO, so waiters of all tenants are served in arrival order.
//
// The cap changes at run time (fleet shares), and replacing the semaphore
// would lose its queue and the slots taken from it. So the semaphore has
// hostSlots units and the limiter itself holds those above the cap
// (reserved): raising the cap gives reserved units back; lowering it takes
// more, which waits until connections have closed. That wait is at the head
// of the queue, so no new dial starts before the host is under the new cap.
type hostLimiter struct {
	key string
	cap atomic.Int64
	sem *semaphore.Weighted

	// taken counts the slots in use: backends dialing, open, or closing
	// until their server has exited, so it is never below what the
	// server sees. gone counts those closing, which the cap no longer
	// needs to close.
	taken atomic.Int64
	gone  atomic.Int64
	// fresh counts the slots of the newcomers' reserve taken by dials
	// still under way: the reserve is filled back only once they are done
	// (dialed).
	fresh atomic.Int64
	// refilling: a refill from idle backends (refillReserves) is due;
	// until it has run, releases of busy backends do not fill the reserve.
	refilling atomic.Bool

	mu      sync.Mutex
	pools   map[*pool]struct{}
	waiters map[*pool]int
	nwait   atomic.Int32 // waiters' sum plus a pending lowering of the cap, read without the lock
	// yielding counts backends closing to give their slot to a starved
	// pool (shouldYield) whose slot is not free yet: a close takes until
	// the server exits, and meanwhile every other release would yield too.
	yielding int
	yielded  map[*backend]bool
	// grants are the waits of pools with no connection, oldest first: a
	// closing backend's slot goes to the first of them (handOff) instead of
	// back into the semaphore, where the dials of busy pools wait too.
	grants   []*grant
	handoffs int64 // slots handed over so far
	refill   chan<- struct{}
	// retiring are the backends the reaper found idle too long, closed one
	// after another by the host's retirer (retire), which runs while there
	// are some: the first is the one it is closing.
	retiring []retiree

	resMu    sync.Mutex
	reserved int64              // semaphore units held above the cap
	resStop  context.CancelFunc // ends the pending lowering, if any
	resDone  chan struct{}      // closed when it has ended; it updates reserved before
}

// grant is one wait of a pool with no connection for a slot handed over.
type grant struct {
	p     *pool              // the waiter's pool
	given bool               // the slot is the waiter's; under the host's mu
	wake  context.CancelFunc // ends the waiter's current semaphore wait
}

// hostSlots is the semaphore's size, the highest cap a host can have.
const hostSlots = 1 << 30

// serverExitWait bounds how long a closed backend's slot stays taken while
// its server has not exited (busy in a statement that does not read the
// socket, or unreachable); it is then taken as gone.
const serverExitWait = 5 * time.Second

// msgTerminate asks a server process to exit.
var msgTerminate = []byte{msgTypeTerminate, 0, 0, 0, 4}

// retiree is a backend the reaper found idle too long, taken from its pool
// so that no client gets it, waiting to be closed.
type retiree struct {
	pl  *pool
	res *puddle.Resource[*backend]
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

	// refill is signalled when a newcomer takes a slot of a host's
	// reserve; the server's reap loop then fills it back (refillReserves).
	refill chan struct{}

	// capMu orders changes of maxPerHost against closeAll, so that no
	// lowering starts on a closed server.
	capMu  sync.Mutex
	closed bool

	retirers sync.WaitGroup // the hosts' retirers running (retire)
	// quit is closed when the pools close (closeAll): the retirers stop
	// waiting for one server's exit before the next.
	quit chan struct{}
}

func newPools(maxPerHost int, connectTimeout, waitTimeout time.Duration, log *slog.Logger, m *Metrics) *pools {
	return &pools{
		maxPerHost:     min(maxPerHost, hostSlots),
		connectTimeout: connectTimeout,
		waitTimeout:    waitTimeout,
		log:            log,
		metrics:        m,
		byKey:          map[string]*pool{},
		hosts:          map[string]*hostLimiter{},
		refill:         make(chan struct{}, 1),
		quit:           make(chan struct{}),
	}
}

// get returns the pool of a project for a URL, creating it on first use.
func (ps *pools) get(proj *project, url string, cfg *pgconn.Config) (*pool, error) {
	ref, size := proj.cfg.Ref, proj.cfg.PoolSize
	key := ref + "\x00" + url
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if p, ok := ps.byKey[key]; ok {
		return p, nil
	}
	hostKey := serverAddr(cfg)
	h, ok := ps.hosts[hostKey]
	if !ok {
		h = newHostLimiter(hostKey, int64(ps.maxPerHost))
		h.refill = ps.refill
		ps.hosts[hostKey] = h
	}
	pl := &pool{key: key, ref: ref, hostKey: hostKey, cfg: withRawSocket(cfg), host: h, size: int32(size), log: ps.log, metrics: ps.metrics.forServers(ref),
		clients: &proj.run.clients}
	pp, err := puddle.NewPool(&puddle.Config[*backend]{
		Constructor: pl.construct(ps),
		Destructor:  pl.destroy,
		MaxSize:     int32(size),
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

func newHostLimiter(key string, limit int64) *hostLimiter {
	h := &hostLimiter{key: key, sem: semaphore.NewWeighted(hostSlots), reserved: hostSlots - limit,
		pools: map[*pool]struct{}{}, waiters: map[*pool]int{}, yielded: map[*backend]bool{}}
	h.cap.Store(limit)
	h.sem.TryAcquire(h.reserved) // a fresh semaphore has them all
	return h
}

// destroy is the pool's destructor. The slot is given back only once the
// server process has exited, so that HostConns never reports less than
// the server sees and a lowered cap is met on the server, not only here.
func (pl *pool) destroy(b *backend) {
	h := pl.host
	v, _ := pl.links.LoadAndDelete(b)
	l, _ := v.(*link)
	if l == nil || !l.closing.Swap(true) {
		h.gone.Add(1)
	}
	// The pool has one fewer to use at once: its fair share and its
	// waiters' choice between a slot and its own connections count so.
	pl.open.Add(-1)
	if l != nil {
		awaitExit(b, l.served)
	}
	b.close()
	h.exited()
	h.yieldDone(b)
	pl.metrics.serverClosed()
}

// exited counts a closing connection's server as gone: its slot goes to
// the oldest grant (handOff) or back to the semaphore. Under mu, as one
// step: between a decrement of gone and one of taken, taken-gone counts
// the connection as open again, and a release that looked then (overCap)
// would close a second connection for an excess already met.
func (h *hostLimiter) exited() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.gone.Add(-1)
	if !h.handOffLocked() {
		h.taken.Add(-1)
		h.sem.Release(1)
	}
}

// awaitExit asks b's server process to exit and waits until it has:
// PostgreSQL leaves pg_stat_activity before its socket closes, and the
// close ends the backend's goroutine (served).
func awaitExit(b *backend, served <-chan struct{}) {
	select {
	case <-served:
		return // the server is gone already
	default:
	}
	// A backend closed already (lost: backendLost closes it, and the
	// leaving client's goroutine may still be in a write to it that fails)
	// gets no Terminate: its server is going away, and a second writer on
	// the socket would race the first.
	if !b.closed.Load() {
		_ = b.conn.SetWriteDeadline(time.Now().Add(serverExitWait))
		if _, err := b.conn.Write(msgTerminate); err != nil {
			return
		}
	}
	waitClosed(served, serverExitWait, nil)
}

// serverAddr is a server's host:port: the key of its host limiter and the
// label of its login metrics.
func serverAddr(cfg *pgconn.Config) string {
	return fmt.Sprintf("%s:%d", cfg.Host, cfg.Port)
}

// waitClosed waits until ch is closed, for d at most and not once stop is
// closed (a nil stop never is).
func waitClosed(ch <-chan struct{}, d time.Duration, stop <-chan struct{}) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ch:
	case <-t.C:
	case <-stop:
	}
}

// condemn counts b, which its holder is about to destroy, as closing: the
// cap stops counting it at once, so that the next decision to close one
// above the cap does not pick a second connection for the same excess.
func (pl *pool) condemn(b *backend) {
	if v, ok := pl.links.Load(b); ok && !v.(*link).closing.Swap(true) {
		pl.host.gone.Add(1)
	}
}

// construct dials a backend once the host has a free slot. When the host is
// full it first closes an idle connection of another pool on that host, so a
// busy tenant takes capacity from idle ones.
func (pl *pool) construct(ps *pools) puddle.Constructor[*backend] {
	return func(ctx context.Context) (*backend, error) {
		ctx, cancel := context.WithTimeout(ctx, ps.waitTimeout)
		defer cancel()
		// Only the dial that starts a pool with no connection and no
		// other dial is a newcomer's: the dials a busy tenant starts at
		// once, before any is open, do not take the reserve.
		first := pl.dialing.Add(1) == 1 && pl.open.Load() == 0
		defer pl.dialing.Add(-1)
		reserved, err := pl.host.acquire(ctx, pl, first)
		if err != nil {
			return nil, err
		}
		dctx, dcancel := context.WithTimeout(ctx, ps.connectTimeout)
		defer dcancel()
		dialDone := ps.metrics.forDials(pl.hostKey).dialStarted()
		b, err := dialBackend(dctx, pl.cfg)
		dialDone()
		if err != nil {
			pl.host.giveBack()
		}
		if reserved {
			pl.host.dialed() // after giveBack: a failed dial leaves no reserved slot to fill back
		}
		if err != nil {
			pl.log.Warn("backend dial failed", "project", pl.ref, "host", pl.hostKey, "error", err)
			return nil, err
		}
		l := &link{served: make(chan struct{})}
		pl.links.Store(b, l)
		go func() {
			defer close(l.served)
			b.serve() // ends when the backend is closed
		}()
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

// evictMinIdle is how long a backend must have been idle before a pool
// with no connection may close it to take its slot.
const evictMinIdle = 100 * time.Millisecond

// hostBusyWait is how long a pool that has connections waits for a new slot
// before its acquirer looks at the pool's own connections again.
const hostBusyWait = 20 * time.Millisecond

// acquire takes one slot of the host's cap, waiting in FIFO order. A pool
// that already has connections waits only briefly (errHostBusy). A pool with
// none also waits for a slot handed over by a closing backend (grant): the
// slot a busy pool gives up for it is then not taken by that pool's own dial
// of a replacement, queued ahead of it, which would leave it starved and
// make the next release yield another backend. It reports whether the slot
// is one of the newcomers' reserve; the caller then calls dialed once its
// dial is done.
func (h *hostLimiter) acquire(ctx context.Context, p *pool, first bool) (reserved bool, err error) {
	if h.sem.TryAcquire(1) {
		if ok, res := h.take(first); ok {
			return res, nil
		}
	}
	var g *grant
	h.mu.Lock()
	h.waiters[p]++
	h.nwait.Add(1)
	if p.open.Load() == 0 {
		g = &grant{p: p}
		h.grants = append(h.grants, g)
	}
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		switch {
		case g == nil || !g.given:
			h.unwaitLocked(p)
			if g != nil {
				h.grants = slices.DeleteFunc(h.grants, func(o *grant) bool { return o == g })
			}
		case err != nil:
			h.giveBack() // handed over after the wait had ended
		}
		h.mu.Unlock()
	}()
	for {
		// A pool with no connection takes the slot of another pool's idle
		// one at once. One that has connections does not: it would close
		// backends of busy tenants between their transactions, and the
		// tenants would evict each other's in turn (measured: a third of
		// the host's backends closed and dialled again every second).
		// Only while fewer slots are on their way to the waiting newcomers
		// than there are newcomers: a server takes a while to exit, and a
		// newcomer that evicted again at each turn of this loop closed a
		// second backend where one was enough.
		if p.open.Load() == 0 && h.evictionDue() {
			h.evictIdle(p, false)
		}
		wctx, cancel := context.WithTimeout(ctx, hostBusyWait)
		if g != nil && h.await(g, cancel) {
			cancel()
			return false, nil
		}
		err = h.sem.Acquire(wctx, 1)
		if g != nil && h.await(g, nil) {
			if err == nil {
				h.sem.Release(1) // a second slot, not counted: the grant's is
			}
			cancel()
			return false, nil
		}
		if err == nil {
			var ok bool
			if ok, reserved = h.take(first); !ok {
				// Over a lowered cap, or into the newcomers' reserve: the
				// slot went back to the semaphore, where the lowering or a
				// newcomer waits for it; trying again at once would spin.
				<-wctx.Done()
				err = wctx.Err()
			}
		}
		cancel()
		if err == nil {
			return reserved, nil
		}
		if ctx.Err() != nil {
			return false, fmt.Errorf("wait for a connection slot on %s: %w", h.key, ctx.Err())
		}
		if p.open.Load() > 0 {
			return false, errHostBusy
		}
	}
}

// await reports whether g has been given a slot, and sets the function that
// ends the waiter's next semaphore wait when one is handed over.
func (h *hostLimiter) await(g *grant, wake context.CancelFunc) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	g.wake = wake
	return g.given
}

// handOffLocked gives the slot of a backend whose server has exited to the
// oldest grant, and reports whether it did; the slot stays taken, now for
// the grant's dial. Above a lowered cap the slot is not handed over: the
// lowering needs it. Call with mu held.
func (h *hostLimiter) handOffLocked() bool {
	if len(h.grants) == 0 || h.taken.Load()-h.gone.Load() > h.cap.Load() {
		return false
	}
	g := h.grants[0]
	h.grants = h.grants[1:]
	g.given = true
	h.handoffs++
	// The waiter is served: it no longer counts as starved, or the next
	// release would yield a second backend for it while it dials.
	h.unwaitLocked(g.p)
	if g.wake != nil {
		g.wake()
	}
	return true
}

// unwaitLocked ends one wait of p for a slot.
func (h *hostLimiter) unwaitLocked(p *pool) {
	if h.waiters[p]--; h.waiters[p] <= 0 {
		delete(h.waiters, p)
	}
	h.nwait.Add(-1)
}

// take counts a slot just acquired from the semaphore, or gives it back
// when the host is at or over its cap (between the lowering of the cap and
// the moment the lowering holds its units, the semaphore still has room
// that the cap no longer gives), or when only the newcomers' reserve is
// left and this is not a newcomer's first dial. It reports whether it
// counted the slot, and whether that slot is one of the reserve.
func (h *hostLimiter) take(first bool) (ok, reserved bool) {
	limit := h.cap.Load()
	unreserved := limit - newcomerReserve(limit)
	if !first {
		limit = unreserved
	}
	// Counted only if within the limit (no add-then-undo), so that taken,
	// which HostConns reports, never shows a slot nobody holds.
	for {
		n := h.taken.Load() + 1
		if n > limit {
			h.sem.Release(1)
			return false, false
		}
		// A slot of the reserve is counted in fresh before it shows in
		// taken, so that reserveShort never counts it while its dial is
		// under way.
		reserved = n > unreserved
		if reserved {
			h.fresh.Add(1)
		}
		if !h.taken.CompareAndSwap(n-1, n) {
			if reserved {
				h.fresh.Add(-1)
			}
			continue
		}
		return true, reserved
	}
}

// dialed ends the dial of a newcomer on a slot of the reserve (done or
// failed), and starts filling the reserve back. Not before: that closes a
// backend, and a server process exiting while the newcomer's starts slows
// the newcomer's login (measured with PostgreSQL 15 on 2 busy cores: a
// third longer, about as long as waiting for the exit first).
func (h *hostLimiter) dialed() {
	h.fresh.Add(-1)
	if h.refill != nil && h.reserveShort() > 0 {
		h.refilling.Store(true)
		select {
		case h.refill <- struct{}{}:
		default:
		}
	}
}

// newcomerReserve is how many slots of a host's cap only pools with no
// connection may take: a tenant that becomes active while busy tenants
// hold the host then dials at once, instead of waiting for a busy backend
// to be released, closed and its server to exit. Small caps keep none.
func newcomerReserve(limit int64) int64 { return min(2, limit/16) }

// reserveShort is how many slots of the newcomers' reserve are in use by
// backends open (or dials failed but not given back yet), not by dials
// under way (fresh).
func (h *hostLimiter) reserveShort() int64 {
	limit := h.cap.Load()
	return max(0, h.taken.Load()-h.gone.Load()-h.fresh.Load()-(limit-newcomerReserve(limit)))
}

// giveBack returns a slot that no backend uses (a failed dial).
func (h *hostLimiter) giveBack() {
	h.taken.Add(-1)
	h.sem.Release(1)
}

// overCap reports whether the host has more connections that are not
// closing yet than its cap.
func (h *hostLimiter) overCap() bool {
	return h.taken.Load()-h.gone.Load() > h.cap.Load()
}

// shouldYield reports whether p should close its released connection b.
// While the host is over a lowered cap it should, and b counts as closing
// from then on. Otherwise only so that its slot goes to another pool: when
// a pool waits for a slot that has fewer connections than its fair share
// (the host's cap divided among the pools that have connections or
// waiters) and p has at least two more than that pool. Capacity so moves
// from rich to starved tenants, and balanced load causes no reconnects.
// When no waiting pool is owed one by p, b may still go to fill the
// newcomers' reserve back up, if p keeps a backend after it or its project
// has no client left, and no refill from idle backends is due (refilling).
func (h *hostLimiter) shouldYield(p *pool, b *backend) bool {
	if h.nwait.Load() == 0 && h.reserveShort() == 0 {
		return false // nobody waits for this host: the common case, no lock
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.overCap() {
		p.condemn(b)
		return true
	}
	mine := p.open.Load()
	if len(h.waiters) > 0 && (len(h.waiters) > 1 || h.waiters[p] == 0) {
		active := 0
		for q := range h.pools {
			if q.open.Load() > 0 || h.waiters[q] > 0 {
				active++
			}
		}
		share := int32(h.cap.Load() / int64(max(active, 1)))
		starved, owed := 0, false
		for q, n := range h.waiters {
			if q == p || n == 0 {
				continue
			}
			if theirs := q.open.Load(); theirs < share {
				starved += n
				owed = owed || mine > theirs+1
			}
		}
		if owed {
			if h.yielding >= starved {
				return false // enough slots are on their way to the starved pools
			}
			h.yieldLocked(b)
			return true
		}
		// The other waiters are owed nothing by p (at their share, or
		// holding as many as p): they do not keep the reserve from
		// filling back, or under a steady load, where busy backends are
		// never idle for long, it would stay in use until the load ends.
	}
	// Fill the newcomers' reserve back up, one close per slot missing,
	// from a pool that keeps a backend after it, or whose project has no
	// client left (no look at every pool of the host here: this runs at
	// every release while the reserve is in use). A slot it frees is not
	// taken by the waiters that have backends: for them the reserve is not
	// free (take).
	if short := h.reserveShort(); short == 0 || int64(h.yielding) >= short || (mine < 2 && p.clients.Load() > 0) || h.refilling.Load() {
		return false
	}
	h.yieldLocked(b)
	return true
}

// yieldLocked counts b, about to be closed for a waiter or the newcomers'
// reserve, as yielded until its slot is free (yieldDone), so that another
// close for the same slot is not made meanwhile. Call with mu held.
func (h *hostLimiter) yieldLocked(b *backend) {
	h.yielding++
	h.yielded[b] = true
}

// evictionDue reports whether fewer backends are closing, their slots
// due to the oldest waiting newcomers (handOff), than newcomers wait.
func (h *hostLimiter) evictionDue() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.yielding < len(h.grants)
}

// yieldDone counts a yielded backend's slot as free.
func (h *hostLimiter) yieldDone(b *backend) {
	h.mu.Lock()
	if h.yielded[b] {
		delete(h.yielded, b)
		h.yielding--
	}
	h.mu.Unlock()
}

// evictIdle closes idle connections of pools other than p, freeing slots:
// one for a waiter, or, with overCap, those the host has above its cap.
func (h *hostLimiter) evictIdle(p *pool, overCap bool) bool {
	if overCap && !h.overCap() {
		return false // the common case while a lowering waits for closes
	}
	h.mu.Lock()
	others := make([]*pool, 0, len(h.pools))
	for q := range h.pools {
		if q != p {
			others = append(others, q)
		}
	}
	h.mu.Unlock()
	if overCap {
		return h.closeOverCap(others)
	}
	return h.evictLongestIdle(others)
}

// closeOverCap closes idle connections of pools while the host has more
// than its cap.
func (h *hostLimiter) closeOverCap(pools []*pool) bool {
	closed := false
	for _, q := range pools {
		for _, r := range q.p.AcquireAllIdle() {
			if h.condemnOver(q, r.Value()) {
				r.Destroy()
				closed = true
			} else {
				r.ReleaseUnused()
			}
		}
	}
	return closed
}

// evictLongestIdle closes one idle connection of pools, as PgBouncer
// does: of a project with no client left if there is one, else the one
// idle longest, the least likely to be wanted again soon. A backend idle
// for a moment only is between the transactions of a busy client: it is
// not taken (shouldYield moves capacity from busy tenants instead, at a
// release), unless its project has no client left to use it. Every other
// idle backend goes back to its pool at once; the best one found so far
// is held while the rest are looked at.
func (h *hostLimiter) evictLongestIdle(pools []*pool) bool {
	var best *puddle.Resource[*backend]
	bestUnused, bestIdle := false, time.Duration(0)
	for _, q := range pools {
		unused := q.clients.Load() == 0
		for _, r := range q.p.AcquireAllIdle() {
			idle := r.IdleDuration()
			better := best == nil || (unused && !bestUnused) || (unused == bestUnused && idle > bestIdle)
			if (idle < evictMinIdle && !unused) || !better {
				r.ReleaseUnused()
				continue
			}
			if best != nil {
				best.ReleaseUnused()
			}
			best, bestUnused, bestIdle = r, unused, idle
		}
	}
	if best == nil {
		return false
	}
	// Counted as yielded like a busy backend closed at its release, so a
	// release meanwhile does not close another.
	h.mu.Lock()
	h.yieldLocked(best.Value())
	h.mu.Unlock()
	best.Destroy()
	return true
}

// condemnOver counts b of q as closing if the host is over its cap. The
// lock makes the check and the count one step, as in shouldYield.
func (h *hostLimiter) condemnOver(q *pool, b *backend) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.overCap() {
		return false
	}
	q.condemn(b)
	return true
}

// setCap changes the cap. Raising it gives reserved units back at once;
// lowering it takes more in the background (lower), after ending a
// lowering still pending. With start false (the server is closing) it only
// ends the pending one.
func (h *hostLimiter) setCap(limit int64, start bool) {
	h.resMu.Lock()
	defer h.resMu.Unlock()
	if h.resStop != nil {
		h.resStop()
		<-h.resDone
		h.resStop, h.resDone = nil, nil
	}
	if !start {
		return
	}
	h.cap.Store(limit)
	want := hostSlots - limit
	switch {
	case want < h.reserved:
		h.sem.Release(h.reserved - want)
		h.reserved = want
	case want > h.reserved:
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		h.resStop, h.resDone = cancel, done
		n := want - h.reserved
		go func() {
			defer close(done)
			if h.lower(ctx, n) {
				h.reserved += n // read by setCap only after done is closed
			}
		}()
	}
}

// lower takes n more units of the semaphore, waiting in its queue until
// enough connections have closed, and reports whether it got them before
// ctx ended. Meanwhile connections above the cap are closed: idle ones
// here, busy ones when released (shouldYield, which nwait sends to its
// slow path).
func (h *hostLimiter) lower(ctx context.Context, n int64) bool {
	h.nwait.Add(1)
	defer h.nwait.Add(-1)
	got := make(chan error, 1)
	go func() { got <- h.sem.Acquire(ctx, n) }()
	tick := time.NewTicker(hostBusyWait)
	defer tick.Stop()
	for {
		// Idle connections can come back above the cap after a pass:
		// released just before the cap was lowered.
		h.evictIdle(nil, true)
		select {
		case err := <-got:
			return err == nil
		case <-tick.C:
		}
	}
}

// waitCtx is the deadline of one wait for a backend: ctx where given,
// else a context of shared, taken only when something has to wait.
type waitCtx struct {
	timeout time.Duration
	shared  *waitDeadlines
	ctx     context.Context
}

func (w *waitCtx) get() context.Context {
	if w.ctx == nil {
		w.ctx = w.shared.after(w.timeout)
	}
	return w.ctx
}

// waitDeadlines shares the contexts of waits for a backend among the
// waits that end in the same slot of time. On a busy proxy clients often
// wait a moment for a backend (more clients than server connections), and
// each wait made a context, a channel and a timer of its own; now each
// slot makes one. A wait may end up to a slot later than its timeout; a
// slot is a hundredth of query_wait_timeout, from 1 to 100 ms.
type waitDeadlines struct {
	slot int64 // nanoseconds
	last atomic.Pointer[deadlineSlot]
}

// deadlineSlot is the context of the waits that end in slot n (counted
// from the Unix epoch). Its deadline cancels it; nothing cancels it
// earlier, since other waits share it.
type deadlineSlot struct {
	n      int64
	ctx    context.Context
	cancel context.CancelFunc
}

func newWaitDeadlines(timeout time.Duration) *waitDeadlines {
	slot := min(max(timeout/100, time.Millisecond), 100*time.Millisecond)
	return &waitDeadlines{slot: int64(slot)}
}

// after returns a context that ends timeout from now, or up to a slot
// later.
func (d *waitDeadlines) after(timeout time.Duration) context.Context {
	end := time.Now().Add(timeout).UnixNano()
	n := (end + d.slot - 1) / d.slot
	if s := d.last.Load(); s != nil && s.n == n {
		return s.ctx
	}
	// Two waits may make the same slot at once: both contexts end at
	// the same moment, and the next waits share the one stored last.
	ctx, cancel := context.WithDeadline(context.Background(), time.Unix(0, n*d.slot))
	d.last.Store(&deadlineSlot{n: n, ctx: ctx, cancel: cancel})
	return ctx
}

// acquireBackend gets a live backend from the pool within the wait's
// deadline. An idle backend of a full pool is taken without a deadline (no
// timer per transaction); anything that may block uses the wait's context.
// A backend found gone is closed and another one taken (every idle
// backend of a restarted server may be gone).
func (pl *pool) acquireBackend(wait *waitCtx) (*puddle.Resource[*backend], error) {
	pl.lastUse.Store(time.Now().UnixNano())
	if pl.open.Load() >= pl.size {
		// Full: TryAcquire cannot start a dial, it only finds an idle one.
		if res, err := pl.p.TryAcquire(context.Background()); err == nil {
			if !gone(res) {
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
		if !gone(res) {
			return res, nil
		}
		pl.log.Debug("dropping dead idle backend", "project", pl.ref, "host", pl.hostKey)
		res.Destroy()
	}
}

// gone reports whether an idle backend's server went away: its goroutine
// saw it or woke for it (woke), or the server's last words wait on its
// socket because that goroutine has not taken them (a busy machine).
func gone(res *puddle.Resource[*backend]) bool {
	be := res.Value()
	return be.dead.Load() || be.woke.Load() || (be.sock != nil && be.lastWordsWaiting())
}

// release returns a clean backend, or closes it when another tenant waits
// for a slot on this host and this pool is above its fair share.
func (pl *pool) release(res *puddle.Resource[*backend]) {
	pl.lastUse.Store(time.Now().UnixNano())
	if pl.host.shouldYield(pl, res.Value()) {
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
				ps.retire(p, r)
			} else {
				r.ReleaseUnused()
			}
		}
		st := p.p.Stat()
		if st.TotalResources() == 0 && p.waiting.Load() == 0 && now.Sub(time.Unix(0, p.lastUse.Load())) >= idle {
			ps.drop(p)
		}
	}
	ps.refillReserves()
	ps.mu.Lock()
	defer ps.mu.Unlock()
	return len(ps.byKey)
}

// retire closes a backend found idle too long after those of its host
// found before it, each once the server of the one before has exited (or
// retireWait has passed), on a goroutine that runs while there are some.
// Backends that fall idle together (a burst of clients gone) time out
// together; closed at once, their server processes would exit at once, and
// PostgreSQL's postmaster, busy with their exits, would start the logins
// of newly active projects late.
func (ps *pools) retire(p *pool, res *puddle.Resource[*backend]) {
	// Closing from now on for the cap and the newcomers' reserve, so that
	// neither closes another backend for the slot this one will free.
	p.condemn(res.Value())
	h := p.host
	h.mu.Lock()
	h.retiring = append(h.retiring, retiree{pl: p, res: res})
	start := len(h.retiring) == 1 // none was queued: no retirer runs
	h.mu.Unlock()
	if start {
		ps.retirers.Add(1)
		go ps.retireAll(h)
	}
}

// retireAll is a host's retirer: it closes the host's retiring backends in
// turn and ends when none is left.
func (ps *pools) retireAll(h *hostLimiter) {
	defer ps.retirers.Done()
	h.mu.Lock()
	for len(h.retiring) > 0 {
		r := h.retiring[0]
		h.mu.Unlock()
		r.pl.destroyAndWait(r.res, ps.quit)
		h.mu.Lock()
		h.retiring[0] = retiree{}
		h.retiring = h.retiring[1:]
	}
	h.retiring = nil
	h.mu.Unlock()
}

// retireWait bounds how long a retirer waits for one server to exit before
// it closes the next: exits take milliseconds, and a server that does not
// exit (unreachable) must not hold the others back serverExitWait each.
const retireWait = time.Second

// destroyAndWait destroys a backend taken from the pool and waits until
// its server has exited, for retireWait at most and not once quit is
// closed; destroy itself goes on waiting up to serverExitWait.
func (pl *pool) destroyAndWait(res *puddle.Resource[*backend], quit <-chan struct{}) {
	v, ok := pl.links.Load(res.Value())
	res.Destroy()
	if ok {
		waitClosed(v.(*link).served, retireWait, quit)
	}
}

// refillReserves fills the newcomers' reserve of every host back from
// idle backends, which cost nobody a wait: of projects with no client
// left, or idle for a while; busy tenants give theirs back at their
// releases (shouldYield) when no idle one is left.
func (ps *pools) refillReserves() {
	for _, h := range ps.hostList() {
		for range h.reserveShort() {
			if !h.evictIdle(nil, false) {
				break
			}
		}
		h.refilling.Store(false)
	}
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

// closeAll closes every pool (shutdown), after ending pending lowerings
// of host caps.
func (ps *pools) closeAll() {
	ps.capMu.Lock()
	if !ps.closed {
		close(ps.quit)
	}
	ps.closed = true
	for _, h := range ps.hostList() {
		h.setCap(0, false)
	}
	ps.capMu.Unlock()
	ps.mu.Lock()
	all := make([]*pool, 0, len(ps.byKey))
	for _, p := range ps.byKey {
		all = append(all, p)
	}
	ps.mu.Unlock()
	for _, p := range all {
		ps.drop(p)
	}
	ps.retirers.Wait()
}

func (ps *pools) hostList() []*hostLimiter {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	return slices.Collect(maps.Values(ps.hosts))
}

// setMaxPerHost changes the cap of every host, and of hosts met later.
func (ps *pools) setMaxPerHost(n int) {
	n = min(max(n, 0), hostSlots)
	ps.capMu.Lock()
	defer ps.capMu.Unlock()
	ps.mu.Lock()
	ps.maxPerHost = n
	ps.mu.Unlock()
	for _, h := range ps.hostList() {
		h.setCap(int64(n), !ps.closed)
	}
}

// SetMaxServerConnPerHost changes max_server_conn_per_host at run time, for
// the share of a fleet's cap that this process is given. 0 opens nothing:
// an instance joining a fleet whose others still hold the whole cap waits,
// its clients queued, until they make room. Raising it takes effect at once. Lowering it closes idle
// connections above the new cap soon, and busy ones when their clients
// release them; no new connection to a host is dialed until the host is
// under the new cap.
func (s *Server) SetMaxServerConnPerHost(n int) { s.pools.setMaxPerHost(n) }

// MaxServerConnPerHost is the cap in force.
func (s *Server) MaxServerConnPerHost() int {
	s.pools.mu.Lock()
	defer s.pools.mu.Unlock()
	return s.pools.maxPerHost
}

// HostConns reports, per host:port, the backend connections this process
// holds: open, being dialed, or closed but with a server process that has
// not exited yet. It is never below what the server sees of this process,
// so a fleet can grant shares from it without exceeding a common cap.
func (s *Server) HostConns() map[string]int {
	out := map[string]int{}
	for _, h := range s.pools.hostList() {
		out[h.key] = int(h.taken.Load())
	}
	return out
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
