package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// reading is one look at the cascata process.
type reading struct {
	rssKB      int64
	goroutines int
	heapKB     int64 // Go heap in use
	stackKB    int64 // Go stacks in use
	fds        int
	backends   int // cascata's backends in pg_stat_activity
	pools      int // pools listed by GET /v1/pools
}

// superuser connects to the cluster's postgres database as the superuser.
func superuser(ctx context.Context, w *world) (*pgx.Conn, error) {
	conn, err := pgx.Connect(ctx, w.cluster.Primary.SuperuserURL("postgres"))
	if err != nil {
		return nil, fmt.Errorf("connect as superuser: %w", err)
	}
	return conn, nil
}

// vmRSS reads VmRSS (KiB) from /proc/PID/status.
func vmRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("read status: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("parse VmRSS %q: %w", v, err)
			}
			return kb, nil
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

// fdCount counts /proc/PID/fd.
func fdCount(pid int) (int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0, fmt.Errorf("list fds: %w", err)
	}
	return len(ents), nil
}

// read takes a reading of cascata; the backends come from the sampler.
func (w *world) read(ctx context.Context, s *sampler) (reading, error) {
	var r reading
	var err error
	pid := w.cmd.Process.Pid
	if r.rssKB, err = vmRSS(pid); err != nil {
		return r, err
	}
	if r.fds, err = fdCount(pid); err != nil {
		return r, err
	}
	if err = w.goMetrics(ctx, &r); err != nil {
		return r, err
	}
	pools, err := w.poolProjects(ctx)
	if err != nil {
		return r, err
	}
	r.pools = len(pools)
	r.backends, err = s.now(ctx)
	return r, err
}

// sample is one count of cascata's backends.
type sample struct {
	at       time.Time
	n        int
	age      float64 // mean seconds since the backends started
	sessions int64   // logins so far to the projects' databases (pg_stat_database.sessions)
}

// sampler counts cascata's backends (client backends of the login role) in
// pg_stat_activity every 100 ms, from its own superuser connection.
type sampler struct {
	conn   *pgx.Conn
	mu     sync.Mutex
	all    []sample
	qmu    sync.Mutex // one query at a time on conn
	cancel context.CancelFunc
	done   chan struct{}
}

// maxSamples bounds the sampler: 15 minutes of samples.
const maxSamples = 15 * 60 * 10

const backendsSQL = `SELECT count(*),
	coalesce(avg(extract(epoch FROM now() - backend_start)), 0)::float8,
	(SELECT coalesce(sum(sessions), 0)::int8 FROM pg_catalog.pg_stat_database WHERE datname LIKE 'scale\_%')
	FROM pg_catalog.pg_stat_activity
	WHERE backend_type = 'client backend' AND usename = 'authenticator'`

func startSampler(ctx context.Context, w *world) (*sampler, error) {
	conn, err := superuser(ctx, w)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	s := &sampler{conn: conn, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		// At most one sample per 100 ms, and never more than a run's worth.
		for range maxSamples {
			if sleepCtx(ctx, 100*time.Millisecond) != nil {
				return
			}
			_, _ = s.now(ctx) // a failed count is a missing sample
		}
	}()
	return s, nil
}

// now counts the backends at once and records the sample.
func (s *sampler) now(ctx context.Context) (int, error) {
	s.qmu.Lock()
	defer s.qmu.Unlock()
	x := sample{at: time.Now()}
	if err := s.conn.QueryRow(ctx, backendsSQL).Scan(&x.n, &x.age, &x.sessions); err != nil {
		return 0, fmt.Errorf("count backends: %w", err)
	}
	s.mu.Lock()
	s.all = append(s.all, x)
	s.mu.Unlock()
	return x.n, nil
}

// window summarises the samples taken in [from, to).
type window struct {
	samples  int
	min, max int
	mean     float64
	meanAge  float64 // mean over the samples of the backends' mean age, seconds
	sessions int64   // logins to the projects' databases in the window (backends opened)
	secs     float64
}

// loginsPerSec is the rate of logins to the projects' databases in the
// window: cascata's, the bench's direct logins go elsewhere. PostgreSQL
// counts them at login, and with as many backends at the end of the window
// as at its start as many were closed.
func (w window) loginsPerSec() float64 {
	if w.secs <= 0 {
		return 0
	}
	return float64(w.sessions) / w.secs
}

func (s *sampler) window(from, to time.Time) window {
	s.mu.Lock()
	defer s.mu.Unlock()
	var w window
	total, ages := 0, 0.0
	var first, last sample
	for _, x := range s.all {
		if x.at.Before(from) || !x.at.Before(to) {
			continue
		}
		if w.samples == 0 {
			first, w.min = x, x.n
		}
		last = x
		w.min = min(w.min, x.n)
		w.max = max(w.max, x.n)
		total += x.n
		ages += x.age
		w.samples++
	}
	if w.samples > 0 {
		w.mean = float64(total) / float64(w.samples)
		w.meanAge = ages / float64(w.samples)
		w.sessions = last.sessions - first.sessions
		w.secs = last.at.Sub(first.at).Seconds()
	}
	return w
}

func (s *sampler) stop(ctx context.Context) {
	s.cancel()
	<-s.done
	s.qmu.Lock()
	defer s.qmu.Unlock()
	_ = s.conn.Close(ctx)
}
