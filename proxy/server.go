package proxy

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/subtle"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"cascata/auth"
	"cascata/internal/parking"
	"cascata/internal/stats"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/prometheus/client_golang/prometheus"
)

// Authenticator verifies a client's password (a JWT) for a project: the
// role it claims and the claims themselves, put in force on every backend
// the client uses (*auth.Verifier). An *auth.Error, or an error with a
// SQLState method, decides the SQLSTATE the client sees (28P01 otherwise).
type Authenticator interface {
	Verify(ctx context.Context, ref, userRole, password string) (auth.Identity, error)
}

// ProjectConfig is what the proxy needs of a project.
type ProjectConfig struct {
	Ref         string
	DatabaseURL string
	ReplicaURLs []string
	PoolSize    int
	SessionMode bool
	// MaxPinned bounds the clients that keep a backend for session state
	// in transaction mode. 0 = PoolSize/4, at least 1.
	MaxPinned int
	// TrustedRoles may run DO blocks and CREATE FUNCTION (the Classifier decides).
	TrustedRoles []string
	// MaxReplicaLag: a replica further behind is not used. 0 = 1s.
	MaxReplicaLag time.Duration
	// Consistency of reads: ConsistencyReadYourWrites (default),
	// ConsistencyEventual or ConsistencyPrimaryOnly.
	Consistency string
	// ClaimsMAC, when set, signs a client's claims; the MAC is put in force
	// as request.jwt.claims_mac next to the claims, for cascata.claims().
	ClaimsMAC func(claims string) string
	// RoleURLs gives roles their own login (role_logins): backends of a
	// client with that role log in as it, in pools of their own.
	RoleURLs map[string]string
	// LegacyClaimGUCs also puts each top-level claim in force as
	// request.jwt.claim.<name> (older PostgREST policies read those).
	LegacyClaimGUCs bool
}

// Options configure a Server. Zero values take the defaults named.
type Options struct {
	MaxClientConn        int           // 0 = 10000
	MaxServerConnPerHost int           // 0 = 90
	ClientLoginTimeout   time.Duration // 0 = 10s
	QueryWaitTimeout     time.Duration // 0 = 30s
	ServerIdleTimeout    time.Duration // 0 = 60s
	ServerConnectTimeout time.Duration // 0 = 5s
	MaxMessageBytes      int           // 0 = 1 GiB
	// MaxPreparedStatements bounds the statements the proxy keeps prepared
	// on one backend in transaction mode; the least recently used is closed. 0 = 200.
	MaxPreparedStatements int
	// TLS enables client-side TLS; nil answers SSLRequest with 'N'.
	TLS *tls.Config
	// Cleartext says where a cleartext password is accepted without TLS:
	// "never", "loopback" (default) or "always".
	Cleartext string
	Auth      Authenticator
	// Classifier guards and routes statements; nil sends everything to the
	// primary and refuses nothing.
	Classifier Classifier
	// ReplicaCheckInterval is how often replicas' replay positions are
	// polled. 0 = 100ms.
	ReplicaCheckInterval time.Duration
	Metrics              *Metrics     // nil = unregistered collectors
	Logger               *slog.Logger // nil = discard
}

func (o *Options) defaults() {
	if o.MaxClientConn <= 0 {
		o.MaxClientConn = 10000
	}
	if o.MaxServerConnPerHost <= 0 {
		o.MaxServerConnPerHost = 90
	}
	if o.ClientLoginTimeout <= 0 {
		o.ClientLoginTimeout = 10 * time.Second
	}
	if o.QueryWaitTimeout <= 0 {
		o.QueryWaitTimeout = 30 * time.Second
	}
	if o.ServerIdleTimeout <= 0 {
		o.ServerIdleTimeout = 60 * time.Second
	}
	if o.ServerConnectTimeout <= 0 {
		o.ServerConnectTimeout = 5 * time.Second
	}
	if o.MaxMessageBytes <= 0 {
		o.MaxMessageBytes = 1 << 30
	}
	if o.MaxPreparedStatements <= 0 {
		o.MaxPreparedStatements = 200
	}
	if o.Cleartext == "" {
		o.Cleartext = "loopback"
	}
	if o.Metrics == nil {
		o.Metrics = NewMetrics(nil)
	}
	if o.Classifier == nil {
		o.Classifier = allPrimary{}
	}
	if o.ReplicaCheckInterval <= 0 {
		o.ReplicaCheckInterval = 100 * time.Millisecond
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// project is the immutable run-time view of one project; a reload replaces it.
type project struct {
	cfg        ProjectConfig
	primary    *pgconn.Config
	rolePrim   map[string]*pgconn.Config // role_logins
	primaryMon *monitor                  // nil without replicas
	replicas   []replicaTarget
	turn       atomic.Uint64 // round robin among fit replicas
	metrics    *projectMetrics
	gate       *gate
	run        *projectRun
	routesMu   sync.RWMutex
	routes     map[routeKey]prometheus.Counter
	toPrimary  atomic.Int64
	toReplica  atomic.Int64
}

// projectRun is what a project's clients share at run time, kept across
// reloads: its pinned clients and its schema epoch.
type projectRun struct {
	pins pinCount
	// clients counts the project's connected clients; a backend of a
	// project with none is the first to give its slot (evictIdle).
	clients atomic.Int32
	// schema counts the DDL its clients ran; a statement prepared on a
	// backend before the last DDL is prepared again for a client's Parse
	// (prepared.go).
	schema atomic.Uint64
}

// routeKey names a routing decision's counter.
type routeKey struct{ target, reason string }

// route counts one routing decision, with the counter cached per project.
func (p *project) route(target, reason string, m *Metrics) {
	if reason == "" {
		reason = "other"
	}
	k := routeKey{target, reason}
	p.routesMu.RLock()
	c, ok := p.routes[k]
	p.routesMu.RUnlock()
	if !ok {
		c = m.routes.WithLabelValues(p.cfg.Ref, target, reason)
		p.routesMu.Lock()
		if p.routes == nil {
			p.routes = map[routeKey]prometheus.Counter{}
		}
		p.routes[k] = c
		p.routesMu.Unlock()
	}
	c.Inc()
	if target == "replica" {
		p.toReplica.Add(1)
	} else {
		p.toPrimary.Add(1)
	}
}

// RouteStats returns, per project, how many units ran on the primary and
// on replicas since the project was (re)configured.
func (s *Server) RouteStats() []stats.Route {
	m := *s.projects.Load()
	out := make([]stats.Route, 0, len(m))
	for ref, p := range m {
		out = append(out, stats.Route{Project: ref, Primary: p.toPrimary.Load(), Replica: p.toReplica.Load()})
	}
	slices.SortFunc(out, func(a, b stats.Route) int { return strings.Compare(a.Project, b.Project) })
	return out
}

// ReplicaStats returns the replica servers the proxy routes to.
func (s *Server) ReplicaStats() []stats.Replica {
	s.replicas.mu.Lock()
	defer s.replicas.mu.Unlock()
	out := []stats.Replica{}
	for _, m := range s.replicas.monitors {
		if !m.replica {
			continue
		}
		out = append(out, stats.Replica{Server: strings.TrimSuffix(m.key, "/true"), Healthy: m.healthy.Load(), ReplayLSN: m.lsn.Load(),
			LagBytes: m.lagBytes.Load(), LagSeconds: float64(m.lagMicros.Load()) / 1e6})
	}
	slices.SortFunc(out, func(a, b stats.Replica) int { return strings.Compare(a.Server, b.Server) })
	return out
}

// Server is the client-facing side of the proxy.
type Server struct {
	opts       Options
	log        *slog.Logger
	metrics    *Metrics
	pools      *pools
	classifier Classifier
	replicas   *replicaSet
	projects   atomic.Pointer[map[string]*project]
	gates      sync.Map    // ref -> *gate, kept across reloads
	runs       sync.Map    // ref -> *projectRun, kept across reloads
	types      *pgtype.Map // built-in type names by OID (read only)
	// readers and writers hold the 32 KiB buffers idle clients gave back,
	// for the clients with bytes in flight (see session.waitForClient).
	readers *bufStack[*bufio.Reader]
	writers *bufStack[*bufio.Writer]
	sweeps  atomic.Int64 // sweepIdle runs so far
	// droppedFreed and lastFree belong to the sweep (returnMemory).
	droppedFreed int64
	lastFree     time.Time

	clients atomic.Int64
	// phaseFaults counts sessions' phase moves out of order (setPhase):
	// defects, logged where they happen and checked by the tests.
	phaseFaults atomic.Int64
	// waits shares the deadlines of clients' waits for a backend.
	waits *waitDeadlines
	// lot holds the sockets of idle clients whose sessions have no
	// goroutine (session.park); nil where the system has no epoll.
	lot *parking.Lot

	mu       sync.Mutex
	sessions map[uint32]*session // by synthetic backend pid
	lns      []net.Listener
	closing  bool
	wg       sync.WaitGroup
	stopReap context.CancelFunc
	reapDone chan struct{}
	monDone  chan struct{}
}

// NewServer creates a server; call SetProjects and Serve.
func NewServer(opts Options) (*Server, error) {
	opts.defaults()
	if opts.Auth == nil {
		return nil, errors.New("proxy: Options.Auth is required")
	}
	switch opts.Cleartext {
	case "never", "loopback", "always":
	default:
		return nil, fmt.Errorf("proxy: Cleartext must be never, loopback or always, not %q", opts.Cleartext)
	}
	s := &Server{
		opts:       opts,
		log:        opts.Logger,
		metrics:    opts.Metrics,
		classifier: opts.Classifier,
		sessions:   map[uint32]*session{},
		types:      pgtype.NewMap(),
		readers:    newReaderStack(),
		writers:    newWriterStack(),
	}
	if lot, err := parking.New(); err == nil {
		s.lot = lot
	} else {
		s.log.Info("idle clients keep a goroutine each", "reason", err)
	}
	s.waits = newWaitDeadlines(opts.QueryWaitTimeout)
	s.replicas = newReplicaSet(opts.ReplicaCheckInterval, s.log, s.metrics)
	s.pools = newPools(opts.MaxServerConnPerHost, opts.ServerConnectTimeout, opts.QueryWaitTimeout, s.log, s.metrics)
	empty := map[string]*project{}
	s.projects.Store(&empty)
	ctx, cancel := context.WithCancel(context.Background())
	s.stopReap = cancel
	s.reapDone = make(chan struct{})
	s.monDone = make(chan struct{})
	go s.reapLoop(ctx)
	go func() {
		defer close(s.monDone)
		s.replicas.run(ctx)
	}()
	return s, nil
}

// SetProjects replaces the set of projects. Clients of projects that did not
// change are untouched; pools of removed or re-pointed projects are closed
// once their connections come back.
func (s *Server) SetProjects(cfgs []ProjectConfig) error {
	next := make(map[string]*project, len(cfgs))
	used := map[*monitor]bool{}
	for _, c := range cfgs {
		pc, err := pgconn.ParseConfig(c.DatabaseURL)
		if err != nil {
			return fmt.Errorf("project %s: database_url: %w", c.Ref, err)
		}
		if c.PoolSize <= 0 {
			c.PoolSize = 20
		}
		if c.MaxPinned <= 0 {
			c.MaxPinned = max(1, c.PoolSize/4)
		}
		if c.MaxReplicaLag <= 0 {
			c.MaxReplicaLag = time.Second
		}
		if c.Consistency == "" {
			c.Consistency = ConsistencyReadYourWrites
		}
		g, _ := s.gates.LoadOrStore(c.Ref, newGate())
		run, _ := s.runs.LoadOrStore(c.Ref, &projectRun{})
		p := &project{cfg: c, primary: pc, metrics: s.metrics.forProject(c.Ref), gate: g.(*gate), run: run.(*projectRun)}
		for role, u := range c.RoleURLs {
			rc, err := pgconn.ParseConfig(u)
			if err != nil {
				return fmt.Errorf("project %s: role_logins.%s: %w", c.Ref, role, err)
			}
			if p.rolePrim == nil {
				p.rolePrim = map[string]*pgconn.Config{}
			}
			p.rolePrim[role] = rc
		}
		for _, u := range c.ReplicaURLs {
			rc, err := pgconn.ParseConfig(u)
			if err != nil {
				return fmt.Errorf("project %s: replica url: %w", c.Ref, err)
			}
			mon := s.replicas.monitorFor(rc, true)
			used[mon] = true
			p.replicas = append(p.replicas, replicaTarget{url: u, cfg: rc, mon: mon})
		}
		if len(p.replicas) > 0 {
			p.primaryMon = s.replicas.monitorFor(pc, false)
			used[p.primaryMon] = true
		}
		next[c.Ref] = p
	}
	s.replicas.retain(used)
	prev := s.projects.Swap(&next)
	for ref, old := range *prev {
		nw, ok := next[ref]
		keep := map[string]bool{}
		if ok {
			keep[nw.cfg.DatabaseURL] = true
			for _, r := range nw.cfg.ReplicaURLs {
				keep[r] = true
			}
		} else {
			s.gates.Delete(ref)
			s.runs.Delete(ref)
			s.metrics.forgetProject(ref)
		}
		if !ok || old.cfg.DatabaseURL != nw.cfg.DatabaseURL || !slices.Equal(old.cfg.ReplicaURLs, nw.cfg.ReplicaURLs) {
			s.pools.dropProject(ref, keep)
		}
	}
	return nil
}

func (s *Server) project(ref string) *project {
	return (*s.projects.Load())[ref]
}

// Serve accepts clients on ln until Shutdown. It returns nil after Shutdown.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return errors.New("proxy: server is shut down")
	}
	s.lns = append(s.lns, ln)
	s.mu.Unlock()
	for {
		c, err := ln.Accept()
		if err != nil {
			s.mu.Lock()
			closing := s.closing
			s.mu.Unlock()
			if closing {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return fmt.Errorf("accept: %w", err)
		}
		s.wg.Add(1)
		go s.handle(c) // its entry ends in clientGone
	}
}

// Shutdown stops accepting, lets running transactions finish until ctx ends,
// then closes every client and backend.
func (s *Server) Shutdown(ctx context.Context) error {
	s.StopAccepting()
	s.mu.Lock()
	sessions := make([]*session, 0, len(s.sessions))
	for _, ss := range s.sessions {
		sessions = append(sessions, ss)
	}
	s.mu.Unlock()
	for _, ss := range sessions {
		ss.shutdown()
	}
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = fmt.Errorf("shutdown: clients still running: %w", ctx.Err())
		s.mu.Lock()
		for _, ss := range s.sessions {
			ss.kill()
		}
		s.mu.Unlock()
		<-done
	}
	s.stopReap()
	<-s.reapDone
	<-s.monDone
	s.pools.closeAll()
	if s.lot != nil {
		// Every session has ended, the parked ones woken by shutdown or kill.
		err = errors.Join(err, s.lot.Close())
	}
	return err
}

// StopAccepting closes the listeners: new connections are refused by the
// kernel (a load balancer retries them on another instance) instead of
// being accepted and told that the proxy is shutting down. Shutdown does
// it too; a process calls it first thing on SIGTERM.
func (s *Server) StopAccepting() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closing = true
	for _, ln := range s.lns {
		_ = ln.Close()
	}
}

// Accepting reports whether the server takes new clients: false once
// StopAccepting (a shutdown) has begun.
func (s *Server) Accepting() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.closing
}

// PoolStats is a snapshot of every pool.
func (s *Server) PoolStats() []stats.Pool { return s.pools.stats() }

// PoolCount is how many backend pools exist (idle ones are dropped).
func (s *Server) PoolCount() int { return len(s.pools.stats()) }

// ClientCount is the number of connected clients.
func (s *Server) ClientCount() int { return int(s.clients.Load()) }

func (s *Server) reapLoop(ctx context.Context) {
	defer close(s.reapDone)
	every := s.opts.ServerIdleTimeout / 4
	every = max(min(every, 5*time.Second), 50*time.Millisecond)
	t := time.NewTicker(every)
	defer t.Stop()
	sweep := time.NewTicker(idleSweepEvery)
	defer sweep.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.pools.reap(s.opts.ServerIdleTimeout)
		case <-sweep.C:
			s.sweepIdle()
		case <-s.pools.refill:
			s.pools.refillReserves()
		}
	}
}

// idleSweepEvery is how often sweepIdle runs: a client that has waited
// between one and two of these gives its buffers back.
const idleSweepEvery = time.Second

// sweepIdle takes the buffers of clients that have waited for a whole
// sweep interval (see session.waitForClient).
func (s *Server) sweepIdle() {
	now := s.sweeps.Add(1)
	s.mu.Lock()
	idle := make([]*session, 0, len(s.sessions))
	for _, ss := range s.sessions {
		if ss.seen.Load() < now-1 {
			idle = append(idle, ss)
		}
	}
	s.mu.Unlock()
	for _, ss := range idle {
		ss.releaseOut()
		ss.nudge()
	}
	s.readers.trim()
	s.writers.trim()
	s.returnMemory()
}

// returnMemory hands the pages of dropped idle buffers back to the system
// once many have been dropped (clients that connected together and went
// idle): otherwise they stay resident until the heap grows enough for a
// collection and the runtime's scavenger gets to them, which on an idle
// proxy is never. At most every freeMemoryEvery; it costs one full
// collection.
func (s *Server) returnMemory() {
	dropped := s.readers.dropped.Load() + s.writers.dropped.Load()
	if dropped-s.droppedFreed < freeMemoryAfter || time.Since(s.lastFree) < freeMemoryEvery {
		return
	}
	s.droppedFreed, s.lastFree = dropped, time.Now()
	debug.FreeOSMemory()
}

const (
	// freeMemoryAfter is how many dropped 32 KiB buffers (8 MiB) make
	// returnMemory act.
	freeMemoryAfter = 256
	freeMemoryEvery = 3 * time.Second
)

// register gives a session its synthetic BackendKeyData.
func (s *Server) register(ss *session) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return fatalError(CodeAdminShutdown, "the proxy is shutting down")
	}
	for {
		var b [8]byte
		if _, err := rand.Read(b[:]); err != nil {
			return fmt.Errorf("random key: %w", err)
		}
		pid := binary.BigEndian.Uint32(b[:4]) & 0x7fffffff
		if pid == 0 || s.sessions[pid] != nil {
			continue
		}
		ss.keyPID = pid
		// Protocol 3.0 has a 4-byte secret; libpq refuses any other length.
		ss.keySecret = append([]byte(nil), b[4:8]...)
		s.sessions[pid] = ss
		return nil
	}
}

func (s *Server) unregister(ss *session) {
	s.mu.Lock()
	if s.sessions[ss.keyPID] == ss {
		delete(s.sessions, ss.keyPID)
	}
	s.mu.Unlock()
}

// cancelRequest forwards a client's CancelRequest to the backend running its
// statement, if the key matches and something runs.
func (s *Server) cancelRequest(pid uint32, secret []byte) {
	s.mu.Lock()
	ss := s.sessions[pid]
	s.mu.Unlock()
	if ss == nil || subtle.ConstantTimeCompare(ss.keySecret, secret) != 1 {
		return
	}
	ss.cancelRunning()
}

// Pause holds new transactions of a project (PgBouncer PAUSE) and waits until
// its running ones have finished or ctx ends. Waiting clients get 57P03 once
// query_wait_timeout passes.
func (s *Server) Pause(ctx context.Context, ref string) error {
	g, ok := s.gates.Load(ref)
	if !ok {
		return fmt.Errorf("pause: unknown project %q", ref)
	}
	g.(*gate).pause()
	if err := g.(*gate).waitIdle(ctx); err != nil {
		return fmt.Errorf("pause %s: running transactions did not finish: %w", ref, err)
	}
	return nil
}

// Resume lets a paused project's transactions run again.
func (s *Server) Resume(ref string) {
	if g, ok := s.gates.Load(ref); ok {
		g.(*gate).resume()
	}
}

// Paused reports whether a project is paused.
func (s *Server) Paused(ref string) bool {
	g, ok := s.gates.Load(ref)
	if !ok {
		return false
	}
	gt := g.(*gate)
	gt.mu.Lock()
	defer gt.mu.Unlock()
	return gt.paused
}
