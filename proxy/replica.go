package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// Consistency levels of a project's reads.
const (
	ConsistencyReadYourWrites = "read_your_writes"
	ConsistencyEventual       = "eventual"
	ConsistencyPrimaryOnly    = "primary_only"
)

// replicaTarget is one replica of a project.
type replicaTarget struct {
	url string
	cfg *pgconn.Config
	mon *monitor
}

// monitor polls one server (host:port) for its WAL position: a replica's
// replay position and lag, or a primary's current position. It serves every
// project on that server.
type monitor struct {
	key     string // addr and whether the server is a replica: its metrics' label
	addr    string // host:port (serverAddr)
	replica bool
	cfg     *pgconn.Config

	healthy   atomic.Bool
	lsn       atomic.Uint64 // replay (replica) or current (primary) WAL position
	lagMicros atomic.Int64  // replica: how long it has lacked WAL its primary had (see lagOf)
	lagBytes  atomic.Uint64 // replica: WAL received but not replayed
	checked   atomic.Int64  // unix nanos of the last good check
	gone      atomic.Bool   // dropped by retain: no more metrics for it

	// upstream is the primary the replica follows, named by the projects
	// that read from it (pick); nil until a project did.
	upstream atomic.Pointer[monitor]

	// Owned by replicaSet.run: written by this monitor's check during a
	// round, read by run after the round.
	conn    *pgconn.PgConn
	history walHistory // primary: its WAL position over time
	tsLag   float64    // replica: seconds since the last replayed commit (fallback)
	at      int64      // unix nanos when the last check's answer arrived
}

// walHistoryLen bounds a primary's position history: at one sample per
// check (100 ms, or 5 ms when reads wait for a replica) it spans 20 s or
// more; a replica behind all of it is at least that far behind.
const walHistoryLen = 4096

// walSample is a primary's WAL position and when the proxy saw it.
type walSample struct {
	lsn uint64
	at  int64 // unix nanos
}

// walHistory is a ring of a primary's WAL positions, strictly increasing,
// each with the time it was first seen.
type walHistory struct {
	ring      []walSample
	start, n  int
	truncated bool // older samples were overwritten
}

func (h *walHistory) get(i int) walSample { return h.ring[(h.start+i)%len(h.ring)] }

// add records lsn seen at at; a position seen before keeps its first time.
// A position before the last one (another server answers at that address,
// e.g. a restored backup) starts the history again.
func (h *walHistory) add(lsn uint64, at int64) {
	if h.n > 0 {
		last := h.get(h.n - 1).lsn
		if lsn == last {
			return
		}
		if lsn < last {
			h.start, h.n, h.truncated = 0, 0, false
		}
	}
	if h.ring == nil {
		h.ring = make([]walSample, walHistoryLen)
	}
	if h.n == len(h.ring) {
		h.start = (h.start + 1) % len(h.ring)
		h.n--
		h.truncated = true
	}
	h.ring[(h.start+h.n)%len(h.ring)] = walSample{lsn: lsn, at: at}
	h.n++
}

// lagOf is how long, at time at, a replica that replayed up to replay has
// lacked WAL the primary had: the age of the oldest primary position it has
// not reached. A replica that lags by 300 ms after an idle hour is 300 ms
// behind (the age of its last replayed commit would say an hour). The
// estimate errs low by at most one check interval. When the history does not
// reach back far enough to say, fallback (the age of the replica's last
// replayed commit) is the answer if it is larger.
func (h *walHistory) lagOf(replay uint64, at int64, fallback time.Duration) time.Duration {
	if h.n == 0 {
		return fallback
	}
	i := sort.Search(h.n, func(i int) bool { return h.get(i).lsn > replay })
	if i == h.n {
		return 0 // it has everything the primary had when last seen
	}
	lag := time.Duration(max(0, at-h.get(i).at))
	if i == 0 {
		// The primary was past replay before the history began.
		lag = max(lag, fallback)
	}
	return lag
}

// replicaSet keeps the monitors and picks replicas for reads.
type replicaSet struct {
	interval time.Duration
	log      *slog.Logger
	m        *Metrics

	mu       sync.Mutex
	monitors map[string]*monitor // by host:port and role
	dropped  []*monitor          // retained no more; run closes their connections

	// refresh asks for a check before the next tick: a read waited for a
	// replica to replay its client's write (read-your-writes on demand).
	refresh chan struct{}
}

func newReplicaSet(interval time.Duration, log *slog.Logger, m *Metrics) *replicaSet {
	return &replicaSet{interval: interval, log: log, m: m, monitors: map[string]*monitor{}, refresh: make(chan struct{}, 1)}
}

// monitorFor returns the monitor of a server, creating it on first use.
func (rs *replicaSet) monitorFor(cfg *pgconn.Config, replica bool) *monitor {
	addr := serverAddr(cfg)
	key := fmt.Sprintf("%s/%t", addr, replica)
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if m, ok := rs.monitors[key]; ok {
		return m
	}
	m := &monitor{key: key, addr: addr, replica: replica, cfg: cfg.Copy()}
	rs.monitors[key] = m
	return m
}

// retain drops monitors no project uses any more. Their connections are
// closed by run, which owns them.
func (rs *replicaSet) retain(used map[*monitor]bool) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	for k, m := range rs.monitors {
		if !used[m] {
			m.gone.Store(true)
			rs.dropped = append(rs.dropped, m)
			delete(rs.monitors, k)
		}
	}
}

// closeDropped closes the connections of monitors retain dropped and
// removes their metric series. Only run calls it, between rounds.
func (rs *replicaSet) closeDropped() {
	rs.mu.Lock()
	dropped := rs.dropped
	rs.dropped = nil
	rs.mu.Unlock()
	for _, m := range dropped {
		m.closeConn()
		if m.replica {
			rs.m.forgetServer(m.key, m.addr)
		}
	}
}

func (m *monitor) closeConn() {
	if m.conn != nil {
		_ = m.conn.Close(context.Background())
		m.conn = nil
	}
}

// run polls every monitor each interval until ctx ends. It owns the
// monitors' connections and histories: a round's checks run in goroutines
// run waits for.
func (rs *replicaSet) run(ctx context.Context) {
	t := time.NewTicker(rs.interval)
	defer t.Stop()
	for {
		rs.closeDropped()
		rs.mu.Lock()
		all := make([]*monitor, 0, len(rs.monitors))
		for _, m := range rs.monitors {
			all = append(all, m)
		}
		rs.mu.Unlock()
		var wg sync.WaitGroup
		for _, m := range all {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rs.check(ctx, m)
			}()
		}
		wg.Wait()
		rs.settle(all)
		select {
		case <-ctx.Done():
			for _, m := range all {
				m.closeConn()
			}
			rs.closeDropped()
			return
		case <-t.C:
		case <-rs.refresh:
			// On demand, but at most every refreshGap.
			select {
			case <-time.After(refreshGap):
			case <-ctx.Done():
			}
		}
	}
}

// refreshGap bounds on-demand checks to one per 5 ms.
const refreshGap = 5 * time.Millisecond

const (
	// The age of the last replayed commit is only a fallback for lag (see
	// walHistory.lagOf): after an idle period it is the idle time.
	replicaCheckSQL = "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn(), COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0), pg_last_wal_receive_lsn()"
	primaryCheckSQL = "SELECT pg_is_in_recovery(), pg_current_wal_lsn(), 0, pg_current_wal_lsn()"
)

// check runs one poll of m; a failure takes the server out until it answers again.
func (rs *replicaSet) check(ctx context.Context, m *monitor) {
	cctx, cancel := context.WithTimeout(ctx, max(rs.interval*5, time.Second))
	defer cancel()
	if m.conn == nil || m.conn.IsClosed() {
		c, err := pgconn.ConnectConfig(cctx, m.cfg)
		if err != nil {
			rs.down(m, err)
			return
		}
		m.conn = c
	}
	q := primaryCheckSQL
	if m.replica {
		q = replicaCheckSQL
	}
	res := m.conn.ExecParams(cctx, q, nil, nil, nil, nil).Read()
	if res.Err != nil || len(res.Rows) != 1 || len(res.Rows[0]) != 4 {
		err := res.Err
		if err == nil {
			err = errors.New("unexpected check result")
		}
		m.closeConn()
		rs.down(m, err)
		return
	}
	at := time.Now().UnixNano()
	row := res.Rows[0]
	inRecovery := string(row[0]) == "t"
	lsn, err := parseLSN(string(row[1]))
	if err != nil {
		rs.down(m, fmt.Errorf("bad WAL position: %w", err))
		return
	}
	if inRecovery != m.replica {
		rs.down(m, fmt.Errorf("server role changed (in recovery: %t)", inRecovery))
		return
	}
	m.at = at
	if !m.replica {
		m.history.add(lsn, at)
	} else {
		var lagSec float64
		_, _ = fmt.Sscan(string(row[2]), &lagSec)
		m.tsLag = math.Max(0, lagSec)
		behind := uint64(0)
		if recv, err := parseLSN(string(row[3])); err == nil && recv > lsn {
			behind = recv - lsn
		}
		m.lagBytes.Store(behind)
	}
	m.lsn.Store(lsn)
	m.checked.Store(at)
	if !m.healthy.Swap(true) {
		rs.log.Info("server available for routing", "server", m.key)
	}
}

// settle computes the lag of each replica checked in the round against its
// primary's position history, and publishes it.
func (rs *replicaSet) settle(all []*monitor) {
	for _, m := range all {
		if !m.replica || !m.healthy.Load() {
			continue
		}
		fallback := time.Duration(m.tsLag * float64(time.Second))
		lag := fallback
		if up := m.upstream.Load(); up != nil {
			lag = up.history.lagOf(m.lsn.Load(), m.at, fallback)
		}
		m.lagMicros.Store(lag.Microseconds())
		if !m.gone.Load() {
			rs.m.replicaLSN(m.key, m.lsn.Load(), m.lagBytes.Load(), lag.Seconds())
		}
	}
}

func (rs *replicaSet) down(m *monitor, err error) {
	if m.healthy.Swap(false) {
		rs.log.Warn("server taken out of routing", "server", m.key, "error", err)
	}
	if m.replica && !m.gone.Load() {
		rs.m.replicaDown(m.key)
	}
}

// markDown takes a replica out at once after a failed connection; the next
// good check puts it back.
func (rs *replicaSet) markDown(r *replicaTarget) {
	rs.down(r.mon, errors.New("connection to the replica failed"))
}

// pick returns a replica of the project fit for a read that must see
// position need (0 = anything), taking turns among the fit ones (any number
// of them), or nil.
func (rs *replicaSet) pick(p *project, need uint64) *replicaTarget {
	if len(p.replicas) == 0 || p.cfg.Consistency == ConsistencyPrimaryOnly {
		return nil
	}
	if p.cfg.Consistency == ConsistencyEventual {
		need = 0
	}
	primaryLSN := uint64(0)
	if p.primaryMon != nil && p.primaryMon.healthy.Load() {
		primaryLSN = p.primaryMon.lsn.Load()
	}
	n := 0
	for i := range p.replicas {
		m := p.replicas[i].mon
		if p.primaryMon != nil && m.upstream.Load() != p.primaryMon {
			m.upstream.Store(p.primaryMon) // the primary its lag is measured against
		}
		if m.healthy.Load() && m.lsn.Load() < need {
			select { // this read waits for the replica: look again soon
			case rs.refresh <- struct{}{}:
			default:
			}
		}
		if replicaFit(m, need, primaryLSN, p.cfg.MaxReplicaLag) {
			n++
		}
	}
	if n == 0 {
		return nil
	}
	k := p.turn.Add(1) % uint64(n)
	var last *replicaTarget
	for i := range p.replicas {
		r := &p.replicas[i]
		if !replicaFit(r.mon, need, primaryLSN, p.cfg.MaxReplicaLag) {
			continue
		}
		if k == 0 {
			return r
		}
		k--
		last = r
	}
	return last // fewer are fit than a moment ago
}

// replicaFit reports whether a replica may serve a read that must see position
// need: it is up, has replayed need, and is not further behind than maxLag.
func replicaFit(m *monitor, need, primaryLSN uint64, maxLag time.Duration) bool {
	if !m.healthy.Load() {
		return false
	}
	lsn := m.lsn.Load()
	if lsn < need {
		return false
	}
	return primaryLSN <= lsn || time.Duration(m.lagMicros.Load())*time.Microsecond <= maxLag
}

// currentLSN asks the primary for its WAL position on an idle backend that
// no client holds.
func (b *backend) currentLSN() (uint64, error) {
	rows, err := b.simpleQuery("SELECT pg_current_wal_lsn()")
	if err != nil {
		return 0, err
	}
	if len(rows) != 1 || len(rows[0]) != 1 || rows[0][0] == nil {
		return 0, errors.New("no WAL position in reply")
	}
	return parseLSN(*rows[0][0])
}
