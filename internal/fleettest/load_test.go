package fleettest

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cascata/internal/pgtest"
)

const (
	hostCap    = 30
	capClients = 300
	// capLoad is how long the host cap test keeps its clients busy.
	capLoad = 3 * time.Second
	// busyQuery holds a backend a little while, so that many clients make
	// every instance want more backends than its share.
	busyQuery = "SELECT pg_sleep(0.02)"
)

// capProject is the project of the host cap tests: pool_size 20 on each of
// three instances would make 60 backends without a fleet-wide cap.
var capProject = project{ref: refCap, login: capLogin, poolSize: 20}

// backendSampler counts, every 10ms, the data primary's connections of the
// cap project's login role, until finished: the pools' backends (they carry
// the clients' application_name) and the others (readiness checks, the
// function volatility learner), which no share covers.
type backendSampler struct {
	*group
	start   time.Time
	samples atomic.Int64
	highest atomic.Int64 // pool backends
	outside atomic.Int64 // the most connections outside the pools at once

	mu   sync.Mutex
	over []string // samples above the cap, the first ones
	err  error
}

func sampleBackends(t *testing.T) *backendSampler {
	t.Helper()
	conn := pgtest.Connect(t, data.Primary.SuperuserURL("postgres"))
	s := &backendSampler{group: newGroup(t), start: time.Now()}
	s.goRun(func() {
		for !s.stopped() {
			var pooled, other int64
			if err := conn.QueryRow(context.Background(), `SELECT count(*) FILTER (WHERE application_name = $2),
				count(*) FILTER (WHERE application_name <> $2) FROM pg_stat_activity WHERE usename = $1`,
				capLogin, clientAppName).Scan(&pooled, &other); err != nil {
				s.mu.Lock()
				s.err = err
				s.mu.Unlock()
				return
			}
			s.samples.Add(1)
			s.highest.Store(max(s.highest.Load(), pooled))
			s.outside.Store(max(s.outside.Load(), other))
			if pooled > hostCap {
				s.mu.Lock()
				if len(s.over) < 10 {
					s.over = append(s.over, fmt.Sprintf("+%v: %d", time.Since(s.start).Round(time.Millisecond), pooled))
				}
				s.mu.Unlock()
			}
			s.pause(10 * time.Millisecond)
		}
	})
	return s
}

// check stops the sampler and fails the test if the pools passed the cap.
func (s *backendSampler) check(t *testing.T) {
	t.Helper()
	s.finish()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		t.Errorf("sampling pg_stat_activity: %v", s.err)
	}
	t.Logf("%d samples of pg_stat_activity: at most %d pool backends of %s (cap %d), and at most %d of its connections outside the pools",
		s.samples.Load(), s.highest.Load(), capLogin, hostCap, s.outside.Load())
	if len(s.over) > 0 {
		t.Errorf("more pool backends than max_server_conn_per_host = %d (time since sampling began: count): %v", hostCap, s.over)
	}
}

func TestFleetWideHostCap(t *testing.T) {
	f := newFleet(t, fleetOptions{n: 3, hostCap: hostCap, projects: []project{capProject}})
	f.waitLive(t, 3)
	f.waitShares(t, hostCap)

	sampler := sampleBackends(t)
	// A third of the clients on each instance.
	var loads []*clientLoad
	for _, in := range f.insts {
		loads = append(loads, startClients(t, clientURL(t, in.proxyAddr, refCap), capClients/len(f.insts), 1000, busyQuery))
	}
	<-time.After(capLoad)
	for _, l := range loads {
		l.finish()
	}
	for i, l := range loads {
		t.Logf("clients of %s: %s", f.insts[i].name, l.summary())
		if errs, fresh, inConn := l.errors(); fresh+inConn > 0 {
			t.Errorf("clients of %s saw errors:\n%s", f.insts[i].name, describe(errs, sampler.start))
		}
	}
	sampler.check(t)
}

func TestRollingRestart(t *testing.T) {
	f := newFleet(t, fleetOptions{n: 3, projects: []project{{ref: refLoad, replica: true}}})
	lb := startHAProxy(t, f.insts)
	load := startClients(t, clientURL(t, lb.addr, refLoad), 12, 10, "SELECT 1")
	load.waitQueries(t, 300, 10*time.Second)
	start := time.Now()

	// Each window runs from the SIGTERM until haproxy shows the instance
	// down: only there may a new connection meet the instance going away.
	type window struct{ from, to time.Time }
	var windows []window
	for _, in := range f.insts {
		from := time.Now()
		exited := in.terminate(t)
		out := lb.waitStatus(t, "DOWN", 5*time.Second, in.name)
		to := time.Now()
		in.start(t)
		in.waitHealthy(t)
		back := lb.waitStatus(t, "UP", 10*time.Second, in.name)
		t.Logf("%s: exited %v after SIGTERM, down in haproxy %v later, up again %v after the start",
			in.name, exited.Round(time.Millisecond), out.Round(time.Millisecond), back.Round(time.Millisecond))
		windows = append(windows, window{from, to})
		load.waitQueries(t, 100, 10*time.Second)
	}
	load.finish()
	t.Logf("clients through haproxy: %s", load.summary())

	errs, fresh, inConn := load.errors()
	var outside []clientError
	for _, e := range errs {
		in := false
		for _, w := range windows {
			in = in || (!e.at.Before(w.from) && !e.at.After(w.to))
		}
		if e.fresh && !in {
			outside = append(outside, e)
		}
	}
	if fresh+inConn > 0 {
		var b []string
		for _, w := range windows {
			b = append(b, fmt.Sprintf("+%v..+%v", w.from.Sub(start).Round(time.Millisecond), w.to.Sub(start).Round(time.Millisecond)))
		}
		t.Logf("client errors (restart windows %v):\n%s", b, describe(errs, start))
	}
	if len(outside) > 0 {
		t.Errorf("%d new connections failed while haproxy had every running instance in:\n%s", len(outside), describe(outside, start))
	}
}

// One instance alone loses the control database under load. It keeps
// serving with the share it had, and the others, which see its heartbeat
// stop, must not take its room while it is alive: pg_stat_activity never
// shows more than the cap, and no client sees an error.
func TestInstanceCutOffFromControlDatabase(t *testing.T) {
	ctl := newControlDB(t)
	u, err := url.Parse(ctl)
	if err != nil {
		t.Fatal(err)
	}
	relay := pgtest.NewRelay(t, u.Host)
	f := newFleet(t, fleetOptions{n: 3, hostCap: hostCap, projects: []project{capProject},
		control: ctl, controlVia: map[string]string{"i1": relay.Addr()}})
	f.waitLive(t, 3)
	f.waitShares(t, hostCap)
	i2 := f.insts[1]

	sampler := sampleBackends(t)
	var loads []*clientLoad
	for _, in := range f.insts {
		loads = append(loads, startClients(t, clientURL(t, in.proxyAddr, refCap), capClients/len(f.insts), 1000, busyQuery))
	}
	for _, l := range loads {
		l.waitQueries(t, 100, 10*time.Second)
	}
	relay.Cut()
	cut := time.Now()
	eventually(t, 3*instanceTimeout, "i2 counts i1 out", func() error {
		if n := i2.liveCount(t); n != 2 {
			return fmt.Errorf("%d live", n)
		}
		return nil
	})
	// Heartbeats enough for i2 and i3 to raise into i1's room, if they would.
	<-time.After(4 * time.Second)
	for _, v := range i2.instances(t) {
		if v.Share != hostCap/3 {
			t.Errorf("%v after i1 lost the control database: %s holds a share of %d, want %d (all: %+v)",
				time.Since(cut).Round(time.Millisecond), v.ID, v.Share, hostCap/3, i2.instances(t))
		}
	}
	for _, l := range loads {
		l.waitQueries(t, 100, 10*time.Second) // i1's clients too
	}
	relay.Restore()
	f.waitLive(t, 3)
	for i, l := range loads {
		l.finish()
		t.Logf("clients of %s: %s", f.insts[i].name, l.summary())
		if errs, fresh, inConn := l.errors(); fresh+inConn > 0 {
			t.Errorf("clients of %s saw errors (i1 cut off at +%v):\n%s", f.insts[i].name, cut.Sub(sampler.start).Round(time.Millisecond), describe(errs, sampler.start))
		}
	}
	sampler.check(t)

	// Killed, i1 is gone for certain (its ports refuse connections): its
	// room goes to the others once its heartbeat is stale.
	f.insts[0].kill()
	took := eventually(t, 4*instanceTimeout, "i2 and i3 take i1's room", func() error {
		for _, v := range i2.instances(t) {
			if v.Live && v.Share != hostCap/2 {
				return fmt.Errorf("%+v", i2.instances(t))
			}
		}
		return nil
	})
	t.Logf("i2 and i3 took 15 each %v after i1 was killed (instance_timeout %v)", took.Round(time.Millisecond), instanceTimeout)

	// A live instance is not forgotten; an unknown one is not found.
	for _, v := range i2.instances(t) {
		if v.AdminURL == "http://"+i2.adminAddr {
			i2.admin(t, "DELETE", "/v1/instances/"+v.ID, nil, http.StatusConflict, nil)
		}
	}
	i2.admin(t, "DELETE", "/v1/instances/no-such-instance", nil, http.StatusNotFound, nil)
}
