package fleettest

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cascata/admin"
	"cascata/internal/jobs"
	"cascata/internal/pgtest"

	"github.com/jackc/pgx/v5"
)

const (
	ejectWriters = 20
	// writerRowLimit bounds each writer's inserts.
	writerRowLimit = 20000
	// writerPace is the pause between two inserts of one writer.
	writerPace = 10 * time.Millisecond
)

// rowKey is an items row: (writer, n).
type rowKey [2]int

// writers insert items rows through one connection string and keep the
// rows whose COMMIT was acknowledged.
type writers struct {
	*group
	connURL string
	acks    atomic.Int64

	mu     sync.Mutex
	acked  map[rowKey]bool
	failed map[rowKey]string // inserts that answered with an error
}

func startWriters(t *testing.T, connURL string, n int) *writers {
	w := &writers{group: newGroup(t), connURL: connURL, acked: map[rowKey]bool{}, failed: map[rowKey]string{}}
	for i := range n {
		w.goRun(func() { w.run(i) })
	}
	return w
}

// run inserts (id, 1), (id, 2), ... each as its own transaction; after an
// error it goes on with the next row, on a new connection if the old one is
// gone, so retries are bounded by writerRowLimit and clientRunLimit.
func (w *writers) run(id int) {
	end := time.Now().Add(clientRunLimit)
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			_ = conn.Close(context.Background())
		}
	}()
	for n := 1; n <= writerRowLimit && time.Now().Before(end); n++ {
		if w.pause(writerPace); w.stopped() {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if conn == nil {
			var err error
			if conn, err = pgx.Connect(ctx, w.connURL); err != nil {
				cancel()
				w.record(rowKey{id, n}, err)
				conn = nil
				continue
			}
		}
		_, err := conn.Exec(ctx, "INSERT INTO items (writer, n) VALUES ($1, $2)", id, n)
		cancel()
		w.record(rowKey{id, n}, err)
		if err != nil && (conn.IsClosed() || sqlState(err) == "") {
			_ = conn.Close(context.Background())
			conn = nil
		}
	}
}

func (w *writers) record(k rowKey, err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err == nil {
		w.acked[k] = true
		w.acks.Add(1)
	} else {
		w.failed[k] = err.Error()
	}
}

// itemRows reads the (writer, n) of every client-written row at url.
func itemRows(t testing.TB, url string) map[rowKey]bool {
	t.Helper()
	conn := pgtest.Connect(t, url)
	rows, err := conn.Query(t.Context(), "SELECT writer, n FROM items WHERE writer >= 0")
	if err != nil {
		t.Fatal(err)
	}
	out := map[rowKey]bool{}
	for rows.Next() {
		var k rowKey
		if err := rows.Scan(&k[0], &k[1]); err != nil {
			t.Fatal(err)
		}
		out[k] = true
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestEjectionThroughLoadBalancer(t *testing.T) {
	f := newFleet(t, fleetOptions{n: 3, projects: []project{
		{ref: refLogical, replica: true, poolSize: 10},
		{ref: refDump, replica: true, poolSize: 10},
	}})
	lb := startHAProxy(t, f.insts)
	for _, tc := range []struct{ ref, method string }{{refLogical, "logical"}, {refDump, "dump"}} {
		t.Run(tc.method, func(t *testing.T) { ejectUnderWrites(t, f, lb, tc.ref, tc.method) })
	}
}

// ejectUnderWrites ejects ref through instance 2 while writers insert
// through haproxy, then checks that every acknowledged row is on the target,
// that no row stayed behind on the source, and that no row reached the
// source after the first row reached the target.
func ejectUnderWrites(t *testing.T, f *fleet, lb *loadBalancer, ref, method string) {
	i2 := f.insts[1]
	sourceURL, targetURL := data.Primary.SuperuserURL(ref), target.Primary.SuperuserURL(ref)
	w := startWriters(t, clientURL(t, lb.addr, ref), ejectWriters)
	waitMore(t, &w.acks, 200, 20*time.Second, "acknowledged inserts")

	var started admin.JobStarted
	i2.admin(t, "POST", "/v1/projects/"+ref+"/eject", admin.EjectRequest{
		TargetURL:      target.Primary.URL("authenticator", loginPassword, ref),
		TargetOwnerURL: targetURL,
		Method:         method,
	}, http.StatusAccepted, &started)
	ejectStart := time.Now()

	everywhere(t, f.insts, ejectStart, propagation, "ejection job visible", func(in *instance) error {
		r, err := in.call(t.Context(), "GET", "/v1/jobs/"+started.Job, nil)
		if err == nil && r.status != http.StatusOK {
			err = fmt.Errorf("%v", r)
		}
		return err
	})
	var job jobs.Status
	eventually(t, 90*time.Second, "ejection job ends", func() error {
		i2.admin(t, "GET", "/v1/jobs/"+started.Job, nil, http.StatusOK, &job)
		if job.State == jobs.Succeeded || job.State == jobs.Failed {
			return nil
		}
		return fmt.Errorf("state %s phase %s", job.State, job.Phase)
	})
	if job.State != jobs.Succeeded {
		w.finish()
		t.Fatalf("ejection %s: %s in phase %s: %s\njob log: %+v", method, job.State, job.Phase, job.Error, job.Log)
	}
	t.Logf("ejection (%s) took %v", method, time.Since(ejectStart).Round(time.Millisecond))

	// Every instance routes the project to the target.
	everywhere(t, f.insts, time.Now(), propagation, "target database_url shown", func(in *instance) error {
		v, err := in.project(t.Context(), ref)
		if err == nil && !sameDatabase(v.DatabaseURL, target.Primary.URL("authenticator", "", ref)) {
			err = fmt.Errorf("database_url %s", v.DatabaseURL)
		}
		return err
	})

	// Writers go on until the target has taken writes of its own.
	tc := pgtest.Connect(t, targetURL)
	eventually(t, 20*time.Second, "writes on the target", func() error {
		var n int
		if err := tc.QueryRow(t.Context(), "SELECT count(*) FROM items WHERE origin = inet_server_port()").Scan(&n); err != nil {
			return err
		}
		if n < 100 {
			return fmt.Errorf("%d rows written on the target", n)
		}
		return nil
	})
	w.finish()

	onTarget, onSource := itemRows(t, targetURL), itemRows(t, sourceURL)
	var lost, staleSource, landedWithError []string
	for k := range w.acked {
		if !onTarget[k] {
			lost = append(lost, fmt.Sprint(k))
		}
	}
	for k := range onSource {
		if !onTarget[k] {
			staleSource = append(staleSource, fmt.Sprint(k))
		}
	}
	for k := range onTarget {
		if msg, ok := w.failed[k]; ok {
			landedWithError = append(landedWithError, fmt.Sprintf("%v: %s", k, msg))
		}
	}
	t.Logf("%d inserts acknowledged, %d answered with an error, %d rows on the target", len(w.acked), len(w.failed), len(onTarget))
	if len(w.failed) > 0 {
		var sample []string
		for k, msg := range w.failed {
			if len(sample) == 5 {
				break
			}
			sample = append(sample, fmt.Sprintf("%v: %s", k, msg))
		}
		t.Logf("some errors writers saw:\n  %s", strings.Join(sample, "\n  "))
	}
	if len(lost) > 0 {
		t.Errorf("%d acknowledged rows are not on the target, e.g. %v", len(lost), lost[:min(10, len(lost))])
	}
	if len(staleSource) > 0 {
		t.Errorf("%d rows written on the source are not on the target, e.g. %v", len(staleSource), staleSource[:min(10, len(staleSource))])
	}
	if len(landedWithError) > 0 {
		t.Errorf("%d inserts answered with an error landed, e.g. %v", len(landedWithError), landedWithError[:min(10, len(landedWithError))])
	}

	// No write reached the source after the first reached the target: at is
	// clock_timestamp() where the row was inserted and both clusters share
	// this machine's clock.
	var lastSource, firstTarget time.Time
	if err := pgtest.Connect(t, sourceURL).QueryRow(t.Context(),
		"SELECT max(at) FROM items WHERE origin = inet_server_port()").Scan(&lastSource); err != nil {
		t.Fatal(err)
	}
	if err := pgtest.Connect(t, targetURL).QueryRow(t.Context(),
		"SELECT min(at) FROM items WHERE origin = inet_server_port()").Scan(&firstTarget); err != nil {
		t.Fatal(err)
	}
	if !lastSource.Before(firstTarget) {
		t.Errorf("a write reached the source at %s, after the first write reached the target at %s",
			lastSource.Format(time.RFC3339Nano), firstTarget.Format(time.RFC3339Nano))
	}
	t.Logf("last write on the source %s, first on the target %s (%v apart)",
		lastSource.Format("15:04:05.000000"), firstTarget.Format("15:04:05.000000"), firstTarget.Sub(lastSource))
}

func TestKilledInstanceDoesNotBlockCutover(t *testing.T) {
	f := newFleet(t, fleetOptions{n: 3, projects: []project{{ref: refLoad}}})
	i1, i2, i3 := f.insts[0], f.insts[1], f.insts[2]
	f.waitLive(t, 3)

	// A transaction left open on i3 keeps i3 from draining: the pause can
	// only finish by leaving the killed instance out.
	open := pgtest.Connect(t, clientURL(t, i3.proxyAddr, refLoad))
	if _, err := open.Exec(t.Context(), "BEGIN; SELECT 1"); err != nil {
		t.Fatal(err)
	}

	type answer struct {
		r   adminResponse
		err error
		at  time.Time
	}
	paused := make(chan answer, 1)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	pauseStart := time.Now()
	go func() {
		r, err := i1.call(ctx, "POST", "/v1/projects/"+refLoad+"/pause", nil)
		paused <- answer{r, err, time.Now()}
	}()
	// The pause is under way once i2 holds the project (or it is over).
	var early *answer
	eventually(t, 10*time.Second, "pause under way on i2", func() error {
		select {
		case a := <-paused:
			early = &a
			return nil
		default:
		}
		var v admin.ProjectView
		i2.admin(t, "GET", "/v1/projects/"+refLoad, nil, http.StatusOK, &v)
		if !v.Paused {
			return fmt.Errorf("i2 does not show %s paused", refLoad)
		}
		return nil
	})
	killed := time.Now()
	i3.kill()
	t.Logf("i3 killed %v after the pause started", killed.Sub(pauseStart).Round(time.Millisecond))

	var a answer
	if early != nil {
		a = *early
		t.Logf("the pause answered before i3 was killed, though i3 held an open transaction: %v", a.r)
	} else {
		select {
		case a = <-paused:
		case <-time.After(instanceTimeout + 10*time.Second):
			t.Fatalf("pause on i1 still running %v after i3 was killed (instance_timeout %v)", time.Since(killed).Round(time.Millisecond), instanceTimeout)
		}
	}
	if a.err != nil {
		t.Fatal(a.err)
	}
	took := a.at.Sub(killed)
	t.Logf("pause answered %v after i3 was killed: %v", took.Round(time.Millisecond), a.r)
	if limit := instanceTimeout + 2*time.Second; took > limit {
		t.Errorf("pause took %v after the kill, more than instance_timeout + 2s (%v)", took.Round(time.Millisecond), limit)
	}
	var res admin.PauseResult
	if a.r.status != http.StatusOK || json.Unmarshal(a.r.body, &res) != nil || !res.Paused || !res.Drained {
		t.Fatalf("pause on i1: %v, want 200 with paused and drained", a.r)
	}

	// The project is held on i2: a write there waits for the resume.
	c2 := pgtest.Connect(t, clientURL(t, i2.proxyAddr, refLoad))
	wrote := make(chan error, 1)
	go func() {
		_, err := c2.Exec(ctx, "INSERT INTO items (writer, n) VALUES (-2, (SELECT coalesce(max(n), 0) + 1 FROM items WHERE writer = -2))")
		wrote <- err
	}()
	select {
	case err := <-wrote:
		t.Errorf("a write through i2 ran while the project was paused (err %v)", err)
	case <-time.After(300 * time.Millisecond):
	}
	i2.admin(t, "POST", "/v1/projects/"+refLoad+"/resume", nil, http.StatusOK, nil)
	select {
	case err := <-wrote:
		if err != nil {
			t.Errorf("write through i2 after resume: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Errorf("write through i2 still waiting 5s after resume")
	}

	eventually(t, 2*instanceTimeout, "i3 shown not live", func() error {
		for _, v := range i1.instances(t) {
			if strings.HasSuffix(v.AdminURL, i3.adminAddr) && v.Live {
				return fmt.Errorf("i3 still live: %+v", v)
			}
		}
		return nil
	})
}
