package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
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
	key     string
	replica bool
	cfg     *pgconn.Config

	healthy   atomic.Bool
	lsn       atomic.Uint64 // replay (replica) or current (primary) WAL position
	lagMicros atomic.Int64  // replica: time since the last replayed transaction while behind
	lagBytes  atomic.Uint64 // replica: WAL received but not replayed
	checked   atomic.Int64  // unix nanos of the last good check
	conn      *pgconn.PgConn
}

// replicaSet keeps the monitors and picks replicas for reads.
type replicaSet struct {
	interval time.Duration
	log      *slog.Logger
	m        *Metrics

	mu       sync.Mutex
	monitors map[string]*monitor // by host:port and role

	// refresh asks for a check before the next tick: a read waited for a
	// replica to replay its client's write (read-your-writes on demand).
	refresh chan struct{}
}

func newReplicaSet(interval time.Duration, log *slog.Logger, m *Metrics) *replicaSet {
	return &replicaSet{interval: interval, log: log, m: m, monitors: map[string]*monitor{}, refresh: make(chan struct{}, 1)}
}

// monitorFor returns the monitor of a server, creating it on first use.
func (rs *replicaSet) monitorFor(cfg *pgconn.Config, replica bool) *monitor {
	key := fmt.Sprintf("%s:%d/%t", cfg.Host, cfg.Port, replica)
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if m, ok := rs.monitors[key]; ok {
		return m
	}
	m := &monitor{key: key, replica: replica, cfg: cfg.Copy()}
	rs.monitors[key] = m
	return m
}

// retain drops monitors no project uses any more.
func (rs *replicaSet) retain(used map[*monitor]bool) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	for k, m := range rs.monitors {
		if !used[m] {
			if m.conn != nil {
				_ = m.conn.Close(context.Background())
			}
			delete(rs.monitors, k)
		}
	}
}

// run polls every monitor each interval until ctx ends.
func (rs *replicaSet) run(ctx context.Context) {
	t := time.NewTicker(rs.interval)
	defer t.Stop()
	for {
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
		select {
		case <-ctx.Done():
			for _, m := range all {
				if m.conn != nil {
					_ = m.conn.Close(context.Background())
				}
			}
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
		_ = m.conn.Close(context.Background())
		m.conn = nil
		rs.down(m, err)
		return
	}
	row := res.Rows[0]
	inRecovery := string(row[0]) == "t"
	lsn, err := parseLSN(string(row[1]))
	if err != nil || inRecovery != m.replica {
		rs.down(m, fmt.Errorf("server role changed or bad position (recovery=%t): %v", inRecovery, err))
		return
	}
	var lagSec float64
	_, _ = fmt.Sscan(string(row[2]), &lagSec)
	m.lsn.Store(lsn)
	m.lagMicros.Store(int64(math.Max(0, lagSec) * 1e6))
	m.checked.Store(time.Now().UnixNano())
	if !m.healthy.Swap(true) {
		rs.log.Info("server available for routing", "server", m.key)
	}
	if m.replica {
		behind := uint64(0)
		if recv, err := parseLSN(string(row[3])); err == nil && recv > lsn {
			behind = recv - lsn
		}
		m.lagBytes.Store(behind)
		rs.m.replicaLSN(m.key, lsn, behind, lagSec)
	}
}

func (rs *replicaSet) down(m *monitor, err error) {
	if m.healthy.Swap(false) {
		rs.log.Warn("server taken out of routing", "server", m.key, "error", err)
	}
	if m.replica {
		rs.m.replicaDown(m.key)
	}
}

// markDown takes a replica out at once after a failed connection; the next
// good check puts it back.
func (rs *replicaSet) markDown(r *replicaTarget) {
	rs.down(r.mon, errors.New("connection to the replica failed"))
}

// pick returns a replica of the project fit for a read that must see
// position need (0 = anything), taking turns among the fit ones, or nil.
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
	var fit [8]*replicaTarget
	n := 0
	for i := range p.replicas {
		r := &p.replicas[i]
		m := r.mon
		if !m.healthy.Load() {
			continue
		}
		lsn := m.lsn.Load()
		if lsn < need {
			select { // this read waits for the replica: look again soon
			case rs.refresh <- struct{}{}:
			default:
			}
			continue
		}
		if primaryLSN > lsn && time.Duration(m.lagMicros.Load())*time.Microsecond > p.cfg.MaxReplicaLag {
			continue
		}
		if n < len(fit) {
			fit[n] = r
			n++
		}
	}
	if n == 0 {
		return nil
	}
	return fit[p.turn.Add(1)%uint64(n)]
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
