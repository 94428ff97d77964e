package fleet_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"cascata/internal/controldb"
	"cascata/internal/fleet"
	"cascata/internal/pgtest"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// cuttable opens a pool on pool's database through a relay the test can
// cut, to take the control database away from one member alone.
func cuttable(t *testing.T, pool *pgxpool.Pool) (*pgxpool.Pool, *pgtest.Relay) {
	t.Helper()
	cfg := pool.Config().ConnConfig
	relay := pgtest.NewRelay(t, net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port))))
	u, err := url.Parse(pool.Config().ConnString())
	if err != nil {
		t.Fatal(err)
	}
	u.Host = relay.Addr()
	p, err := controldb.Open(context.Background(), u.String(), 4)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p, relay
}

// instanceColumn is one column of an instance's row, as text.
func instanceColumn(t *testing.T, pool *pgxpool.Pool, column, id string) string {
	t.Helper()
	return pgtest.QueryValue(t, pool.Config().ConnString(), "SELECT "+column+" FROM cascata_control.instances WHERE id = $1", id)
}

// adminPlane answers GET /healthz as the admin plane of the instance named
// in it.
func adminPlane(t *testing.T, id *atomic.Value) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("X-Cascata-Instance", id.Load().(string))
		w.WriteHeader(http.StatusOK)
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

// closedAddr is a loopback address nothing listens on.
func closedAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// An instance that alone loses the control database keeps serving with
// its share; the others, which see its heartbeat stop, must not take its
// room while it is alive, or the fleet passes the cap. Once its address
// is held by another instance (it was restarted under a new id), its
// room is free.
func TestShareOfACutOffInstanceIsKept(t *testing.T) {
	pool := controlDB(t)
	aPool, relay := cuttable(t, pool)
	var answerAs atomic.Value
	answerAs.Store("a")
	const cap, timeout = 30, 1500 * time.Millisecond
	a := join(t, aPool, "a", cap, timeout, func(o *fleet.Options) { o.AdminURL = adminPlane(t, &answerAs) })
	b := join(t, pool, "b", cap, timeout)
	c := join(t, pool, "c", cap, timeout)
	pgtest.WaitFor(t, 10*time.Second, "three instances take 10 each", func() bool {
		return a.m.Share() == 10 && b.m.Share() == 10 && c.m.Share() == 10
	})

	relay.Cut()
	sharesWithinCap(t, []*node{a, b, c}, cap, 3*timeout, "after a lost the control database")
	list, err := b.m.Instances(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range list {
		if i.ID == "a" && i.Live {
			t.Fatalf("a still counts as live %v after it lost the control database: the test proves nothing", 3*timeout)
		}
	}
	if a.m.Share() != 10 {
		t.Fatalf("a, cut off, holds a share of %d, want the 10 it had", a.m.Share())
	}

	answerAs.Store("a-restarted") // another process holds a's address: a is gone
	pgtest.WaitFor(t, 10*time.Second, "b and c take 15 each once a is gone", func() bool {
		return b.m.Share() == 15 && c.m.Share() == 15
	})
	if v := instanceColumn(t, pool, "stopped", "a"); v != "t" {
		t.Fatalf("a gone, yet its row says stopped = %s", v)
	}
}

// Silent instances are judged only where they ran, and only on evidence:
// an address that refuses connections or that another instance answers.
// One whose address does not answer, or that ran elsewhere, keeps its room.
func TestSilentInstancesJudgedOnEvidence(t *testing.T) {
	ctx := context.Background()
	pool := controlDB(t)
	const cap, timeout = 30, 1500 * time.Millisecond
	scout := join(t, pool, "scout", cap, timeout)
	scout.stop()
	place := instanceColumn(t, pool, "place", "scout")
	if place == "" {
		t.Fatal("an instance published no place")
	}
	// Accepts connections (the kernel does) and never answers.
	hung, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hung.Close() })
	var other atomic.Value
	other.Store("someone-else")
	rows := []struct {
		id, admin, proxy, place string
		gone                    bool
	}{
		{"refused", "http://" + closedAddr(t), "", place, true},
		{"taken", adminPlane(t, &other), "", place, true},
		{"proxy-refused", "", closedAddr(t), place, true},
		{"hung", "http://" + hung.Addr().String(), "", place, false},
		{"elsewhere", "http://" + closedAddr(t), "", "another-boot/net:[1]", false},
		{"nowhere", "", "", place, false},
	}
	for _, r := range rows {
		if _, err := pool.Exec(ctx, `INSERT INTO cascata_control.instances (id, admin_url, proxy_url, place, share, heartbeat)
			VALUES ($1, $2, $3, $4, 4, now() - interval '1 hour')`, r.id, r.admin, r.proxy, r.place); err != nil {
			t.Fatal(err)
		}
	}
	b := join(t, pool, "b", cap, timeout)
	if s := b.m.Share(); s != cap-4*len(rows) {
		t.Fatalf("b started with a share of %d, want %d: the silent instances' room is theirs until judged", s, cap-4*len(rows))
	}
	pgtest.WaitFor(t, 10*time.Second, "b takes the room of the three gone", func() bool { return b.m.Share() == cap-4*3 })
	held := time.Now()
	for time.Since(held) < 2*timeout {
		if s := b.m.Share(); s != cap-4*3 {
			t.Fatalf("b's share went to %d, want %d: an instance was judged gone without evidence", s, cap-4*3)
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, r := range rows {
		want := "f"
		if r.gone {
			want = "t"
		}
		if v := instanceColumn(t, pool, "stopped", r.id); v != want {
			t.Errorf("%s: stopped = %s, want %s", r.id, v, want)
		}
	}
}

// An instance gone where no other instance runs is found gone by nobody;
// Forget hands its room to the others. A live instance is not forgotten.
func TestForgetASilentInstance(t *testing.T) {
	ctx := context.Background()
	pool := controlDB(t)
	const cap, timeout = 30, 1500 * time.Millisecond
	// The migrations first: the row below goes into their table.
	if err := fleet.Migrate(ctx, pool); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `INSERT INTO cascata_control.instances (id, admin_url, place, share, heartbeat)
		VALUES ('vanished', 'http://127.0.0.1:1', 'another-boot/net:[1]', 10, now() - interval '1 hour')`); err != nil {
		t.Fatal(err)
	}
	b := join(t, pool, "b", cap, timeout)
	if s := b.m.Share(); s != cap-10 {
		t.Fatalf("b's share is %d, want %d beside a silent instance of another place", s, cap-10)
	}
	if err := b.m.Forget(ctx, "nobody"); !errors.Is(err, fleet.ErrNoInstance) {
		t.Fatalf("forget an unknown instance: %v, want ErrNoInstance", err)
	}
	if err := b.m.Forget(ctx, "b"); !errors.Is(err, fleet.ErrLive) {
		t.Fatalf("forget a live instance: %v, want ErrLive", err)
	}
	if err := b.m.Forget(ctx, "vanished"); err != nil {
		t.Fatal(err)
	}
	pgtest.WaitFor(t, 5*time.Second, "b takes the forgotten instance's room", func() bool { return b.m.Share() == cap })
}

// An instance cut off from the control database during a fleet pause
// keeps the project held: it cannot see the resume, and does not guess
// that the cutover ended. Back in touch, it releases the project once its
// catalog has the revision the resume names.
func TestPauseHeldWhileCutOff(t *testing.T) {
	pool := controlDB(t)
	aPool, relay := cuttable(t, pool)
	const timeout = 1500 * time.Millisecond
	a := join(t, aPool, "a", 30, timeout)
	b := join(t, pool, "b", 30, timeout)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := b.m.Pause(ctx, "p1"); err != nil {
		t.Fatal(err)
	}
	if !a.srv.Paused("p1") {
		t.Fatal("a does not hold the project")
	}
	relay.Cut()
	b.cat.rev.Store(5) // the switch of the cutover
	b.m.Resume("p1")
	pgtest.WaitFor(t, 3*time.Second, "b releases the project", func() bool { return !b.srv.Paused("p1") })
	cut := time.Now()
	for time.Since(cut) < 2*timeout {
		if !a.srv.Paused("p1") {
			t.Fatalf("a, cut off from the control database, released the project %v after the resume", time.Since(cut).Round(time.Millisecond))
		}
		time.Sleep(10 * time.Millisecond)
	}
	relay.Restore()
	pgtest.WaitFor(t, 10*time.Second, "a beats again", func() bool {
		list, err := b.m.Instances(context.Background())
		return err == nil && slices.ContainsFunc(list, func(i fleet.Instance) bool { return i.ID == "a" && i.Live })
	})
	// Back in touch, with the resume in sight, but its catalog lacks
	// revision 5: a few of its loops, and still held.
	back := time.Now()
	for time.Since(back) < timeout {
		if !a.srv.Paused("p1") {
			t.Fatal("a released the project before its catalog had the resume's revision")
		}
		time.Sleep(10 * time.Millisecond)
	}
	a.cat.rev.Store(5)
	pgtest.WaitFor(t, 5*time.Second, "a releases the project once its catalog has the revision", func() bool { return !a.srv.Paused("p1") })
}

// The row of an instance stopped more than a day ago goes; a younger one
// stays, listed as not live.
func TestOldStoppedInstancesForgotten(t *testing.T) {
	ctx := context.Background()
	pool := controlDB(t)
	if err := fleet.Migrate(ctx, pool); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `INSERT INTO cascata_control.instances (id, stopped, heartbeat) VALUES
		('stopped-long-ago', true, now() - interval '25 hours'),
		('stopped-lately', true, now() - interval '1 hour'),
		('silent-long-ago', false, now() - interval '25 hours')`); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `INSERT INTO cascata_control.pause_acks (ref, epoch, instance, acked) VALUES
		('p', 1, 'stopped-long-ago', now() - interval '25 hours'),
		('p', 1, 'stopped-lately', now() - interval '25 hours'),
		('p', 1, 'silent-long-ago', now() - interval '25 hours')`); err != nil {
		t.Fatal(err)
	}
	b := join(t, pool, "b", 30, 1500*time.Millisecond)
	list, err := b.m.Instances(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, i := range list {
		ids = append(ids, i.ID)
	}
	if want := []string{"b", "silent-long-ago", "stopped-lately"}; !slices.Equal(ids, want) {
		t.Fatalf("instances after a heartbeat: %v, want %v", ids, want)
	}
	// Their pause acknowledgements go with them; those of instances that
	// still have a row stay.
	rows, err := pool.Query(ctx, `SELECT instance FROM cascata_control.pause_acks ORDER BY instance`)
	if err != nil {
		t.Fatal(err)
	}
	acks, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"silent-long-ago", "stopped-lately"}; !slices.Equal(acks, want) {
		t.Fatalf("pause acknowledgements after a heartbeat: %v, want %v", acks, want)
	}
}
