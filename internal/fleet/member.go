package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"cascata/internal/catalog"
	"cascata/internal/controldb"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// channel is the NOTIFY channel of pause changes; the payload is the ref.
const channel = "cascata_fleet"

// Server is the local proxy as the fleet drives it (*proxy.Server).
type Server interface {
	// SetMaxServerConnPerHost sets this instance's share of the host cap.
	SetMaxServerConnPerHost(n int)
	// HostConns is, per host, the backend connections held or being dialed.
	HostConns() map[string]int
	Pause(ctx context.Context, ref string) error
	Resume(ref string)
	Paused(ref string) bool
}

// Catalog is the shared catalog as pauses need it (*catalog.Shared).
type Catalog interface {
	// Revision is the newest catalog revision in force here.
	Revision() int64
	// Sync reads the changes not seen yet.
	Sync(ctx context.Context) error
}

// Options configure a Member.
type Options struct {
	// Pool is the control database. Required.
	Pool *pgxpool.Pool
	// ID names this instance; AdminURL, ProxyURL and Version describe it in
	// GET /v1/instances.
	ID, AdminURL, ProxyURL, Version string
	// Timeout is [catalog].instance_timeout. Required.
	Timeout time.Duration
	// Cap is max_server_conn_per_host: the cap of the whole fleet.
	Cap int
	// Server and Catalog are this instance's proxy and catalog. Required.
	Server  Server
	Catalog Catalog
	// Dir is the state directory: the fleet's size last seen is kept there
	// (fleet-cache.json) to size the share of a start without the control
	// database.
	Dir    string
	Logger *slog.Logger
}

// Instance is one instance of the fleet, as GET /v1/instances shows it.
type Instance struct {
	ID        string    `json:"id"`
	AdminURL  string    `json:"admin_url"`
	ProxyURL  string    `json:"proxy_url"`
	Version   string    `json:"version"`
	Heartbeat time.Time `json:"heartbeat"`
	Live      bool      `json:"live"`
	// Share is the backend connections per host the instance may hold.
	Share int `json:"share"`
}

// Member is this instance's part in the fleet: it writes its heartbeat,
// takes its share of the host cap, and holds and releases projects paused
// anywhere in the fleet. Run drives it; Pause and Resume start fleet-wide
// pauses.
type Member struct {
	opts  Options
	log   *slog.Logger
	every time.Duration
	wake  chan struct{}

	place  string       // where this instance runs (thisPlace)
	client *http.Client // for probes of stale instances

	mu      sync.Mutex
	limit   int                           // the share in force
	held    map[string]*hold              // projects this instance holds for a fleet pause
	resumes map[string]int64              // resumes not yet written (control database down)
	cancels map[string]context.CancelFunc // running local pauses
	gone    map[string]time.Time          // stale instances of this place found gone, at their heartbeat then
	probing bool                          // a round of probes is under way
	wg      sync.WaitGroup
	ctx     context.Context
}

type hold struct {
	epoch int64 // the fleet pause this instance holds the project for
}

// New makes a Member; Run starts it.
func New(opts Options) (*Member, error) {
	if opts.Pool == nil || opts.Server == nil || opts.Catalog == nil || opts.Timeout <= 0 || opts.ID == "" {
		return nil, errors.New("fleet: Pool, Server, Catalog, Timeout and ID are required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	every := min(time.Second, opts.Timeout/3)
	// limit -1: the first share decided is put in force whatever it is.
	return &Member{opts: opts, log: opts.Logger, every: every, wake: make(chan struct{}, 1), limit: -1,
		place: thisPlace(), client: &http.Client{Transport: &http.Transport{DisableKeepAlives: true}},
		held: map[string]*hold{}, resumes: map[string]int64{}, cancels: map[string]context.CancelFunc{}}, nil
}

// Start migrates the fleet's tables and takes a first share of the host
// cap: from the control database, or, when it does not answer, from the
// fleet's size last seen (so a fleet restarted without its control database
// stays within the cap).
func (m *Member) Start(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	err := Migrate(ctx, m.opts.Pool)
	if err == nil {
		err = m.beat(ctx)
	}
	if err == nil {
		return nil
	}
	if !controldb.Unreachable(err) {
		return err
	}
	n := m.cachedSize()
	m.setLimit(m.opts.Cap / n)
	m.log.Warn("control database unreachable: taking the share of the fleet size last seen", "instances", n, "share", m.opts.Cap/n, "error", err)
	return nil
}

// Run writes heartbeats, follows pauses and adjusts the share until ctx
// ends; then it marks the instance stopped so the fleet stops counting it.
func (m *Member) Run(ctx context.Context) {
	m.mu.Lock()
	m.ctx = ctx
	m.mu.Unlock()
	defer m.wg.Wait()
	controldb.Follow(ctx, m.log, "fleet", m.follow)
	m.mu.Lock()
	for _, c := range m.cancels {
		c()
	}
	m.mu.Unlock()
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	if _, err := m.opts.Pool.Exec(sctx, `UPDATE `+controldb.Schema+`.instances SET stopped = true WHERE id = $1`, m.opts.ID); err != nil {
		m.log.Warn("fleet: could not mark this instance stopped; the others count it until its heartbeat ages", "error", err)
	}
}

func (m *Member) follow(ctx context.Context, connected func()) error {
	conn, err := controldb.Listen(ctx, m.opts.Pool, channel, 5*time.Second)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	connected()
	next := time.Now()
	for ctx.Err() == nil {
		if !time.Now().Before(next) {
			bctx, cancel := context.WithTimeout(ctx, m.opts.Timeout/2)
			err := m.beat(bctx)
			cancel()
			if err != nil {
				return err
			}
			next = time.Now().Add(m.every)
		}
		if err := m.syncPauses(ctx, conn); err != nil {
			return err
		}
		if err := m.waitWake(ctx, conn, next); err != nil {
			return fmt.Errorf("fleet: listen: %w", err)
		}
	}
	return nil
}

// waitWake waits for a notification, a poke or until.
func (m *Member) waitWake(ctx context.Context, conn *pgx.Conn, until time.Time) error {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-m.wake:
			cancel()
		case <-wctx.Done():
		}
	}()
	return controldb.WaitNotification(wctx, conn, until)
}

// poke makes the local loop look at pauses now.
func (m *Member) poke() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// forgetStoppedAfter is how long the row of a stopped instance is kept
// (GET /v1/instances lists it until then).
const forgetStoppedAfter = 24 * time.Hour

// shareLockKey serializes the beats of the fleet ("shares" in ASCII), so
// that two instances never raise their shares on the same stale reading.
const shareLockKey int64 = 0x736861726573

// beat writes the heartbeat with the share this instance holds at most, and
// moves the share towards an equal part of the cap: down at once (published
// at the next beat, once the connections above it are closed), up only into
// room the others leave, published before it takes effect and under a lock
// every beat takes. Each instance's published share is never below what it
// holds, so the fleet's total never passes the cap while it changes. The
// room of an instance whose heartbeat stopped is left to it until it is
// marked stopped: by itself, on a graceful stop, or by an instance of its
// place that found it gone (probe.go).
func (m *Member) beat(ctx context.Context) error {
	m.mu.Lock()
	cur := m.limit
	adminURL, proxyURL := m.opts.AdminURL, m.opts.ProxyURL
	m.mu.Unlock()
	held := max(cur, 0)
	for _, n := range m.opts.Server.HostConns() {
		held = max(held, n)
	}
	var n, next int
	var stale []candidate
	err := pgx.BeginFunc(ctx, m.opts.Pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_catalog.pg_advisory_xact_lock($1)", shareLockKey); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO `+controldb.Schema+`.instances AS i (id, admin_url, proxy_url, version, share, place)
			VALUES ($1, $2, $3, $4, $5, $6)
			ON CONFLICT (id) DO UPDATE SET admin_url = excluded.admin_url, proxy_url = excluded.proxy_url,
				version = excluded.version, share = excluded.share, place = excluded.place, heartbeat = now(), stopped = false`,
			m.opts.ID, adminURL, proxyURL, m.opts.Version, held, m.place); err != nil {
			return err
		}
		var err error
		if stale, err = m.releaseGone(ctx, tx); err != nil {
			return err
		}
		// Each start without a configured instance_id adds a row: the rows
		// of instances stopped long ago go (jobs and pauses treat an owner
		// with no row as stopped).
		if _, err := tx.Exec(ctx, `DELETE FROM `+controldb.Schema+`.instances WHERE stopped AND heartbeat < now() - $1::interval`,
			forgetStoppedAfter.String()); err != nil {
			return err
		}
		// Their pause acknowledgements go with them. Only old ones: a new
		// instance may acknowledge a pause before its first heartbeat.
		if _, err := tx.Exec(ctx, `DELETE FROM `+controldb.Schema+`.pause_acks a WHERE a.acked < now() - $1::interval
			AND NOT EXISTS (SELECT 1 FROM `+controldb.Schema+`.instances i WHERE i.id = a.instance)`,
			forgetStoppedAfter.String()); err != nil {
			return err
		}
		var others int
		if err := tx.QueryRow(ctx, `SELECT count(*) FILTER (WHERE `+LiveSQL+`),
				coalesce(sum(share) FILTER (WHERE id <> $2 AND NOT stopped), 0)
			FROM `+controldb.Schema+`.instances`,
			m.opts.Timeout.String(), m.opts.ID).Scan(&n, &others); err != nil {
			return err
		}
		n = max(n, 1)
		target := m.opts.Cap / n
		next = target
		if target > cur {
			next = max(cur, min(target, m.opts.Cap-others))
		}
		if next > held {
			_, err := tx.Exec(ctx, `UPDATE `+controldb.Schema+`.instances SET share = $2 WHERE id = $1`, m.opts.ID, next)
			return err
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("fleet: heartbeat: %w", err)
	}
	if next != cur {
		m.log.Info("fleet: backend share per host changed", "from", cur, "to", next, "instances", n, "cap", m.opts.Cap)
	}
	m.setLimit(next)
	m.writeCachedSize(n)
	m.probeLater(stale)
	return nil
}

// releaseGone marks stopped the stale instances of this place that the
// last probe found gone at the heartbeat they still show, and returns the
// others, to be probed again.
func (m *Member) releaseGone(ctx context.Context, tx pgx.Tx) ([]candidate, error) {
	if m.place == "" {
		return nil, nil
	}
	rows, err := tx.Query(ctx, `SELECT id, admin_url, proxy_url, heartbeat FROM `+controldb.Schema+`.instances
		WHERE id <> $2 AND place = $3 AND share > 0 AND NOT stopped AND NOT `+LiveSQL,
		m.opts.Timeout.String(), m.opts.ID, m.place)
	if err != nil {
		return nil, err
	}
	cands, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (candidate, error) {
		var c candidate
		err := r.Scan(&c.id, &c.adminURL, &c.proxyURL, &c.heartbeat)
		return c, err
	})
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	gone := m.gone // replaced whole by each round of probes, never changed
	m.mu.Unlock()
	var again []candidate
	for _, c := range cands {
		if hb, found := gone[c.id]; !found || !hb.Equal(c.heartbeat) {
			again = append(again, c)
			continue
		}
		tag, err := tx.Exec(ctx, `UPDATE `+controldb.Schema+`.instances SET stopped = true
			WHERE id = $1 AND heartbeat = $2 AND NOT stopped`, c.id, c.heartbeat)
		if err != nil {
			return nil, err
		}
		if tag.RowsAffected() > 0 {
			m.log.Warn("fleet: a silent instance is gone (its address refuses connections or another instance holds it); its share is free",
				"instance", c.id, "heartbeat", c.heartbeat)
		}
	}
	return again, nil
}

// probeLater probes the stale instances of this place in the background,
// one round at a time; the next beat acts on the verdicts.
func (m *Member) probeLater(cands []candidate) {
	if len(cands) == 0 {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.probing || m.ctx == nil {
		return
	}
	m.probing = true
	ctx := m.ctx
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		pctx, cancel := context.WithTimeout(ctx, min(time.Second, m.opts.Timeout/4))
		defer cancel()
		found := make([]bool, len(cands))
		var wg sync.WaitGroup
		for i, c := range cands {
			wg.Go(func() { found[i] = foundGone(pctx, m.client, c) })
		}
		wg.Wait()
		gone := map[string]time.Time{}
		for i, c := range cands {
			if found[i] {
				gone[c.id] = c.heartbeat
			}
		}
		m.mu.Lock()
		m.gone = gone
		m.probing = false
		m.mu.Unlock()
	}()
}

func (m *Member) setLimit(n int) {
	m.mu.Lock()
	changed := n != m.limit
	m.limit = n
	m.mu.Unlock()
	if changed {
		m.opts.Server.SetMaxServerConnPerHost(n)
	}
}

// SetAddrs sets the addresses the instance listens on, as GET
// /v1/instances shows them (known once the listeners are open).
func (m *Member) SetAddrs(adminURL, proxyURL string) {
	m.mu.Lock()
	m.opts.AdminURL, m.opts.ProxyURL = adminURL, proxyURL
	m.mu.Unlock()
}

// Share is the backend connections per host this instance may open now.
func (m *Member) Share() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return max(m.limit, 0)
}

type sizeCache struct {
	Instances int `json:"instances"`
}

func (m *Member) cachedSize() int {
	if m.opts.Dir == "" {
		return 1
	}
	data, err := os.ReadFile(filepath.Join(m.opts.Dir, "fleet-cache.json"))
	if err != nil {
		return 1
	}
	var c sizeCache
	if json.Unmarshal(data, &c) != nil || c.Instances < 1 {
		return 1
	}
	return c.Instances
}

func (m *Member) writeCachedSize(n int) {
	if m.opts.Dir == "" || m.cachedSize() == n {
		return
	}
	data, _ := json.Marshal(sizeCache{Instances: n})
	if err := catalog.WriteFileAtomic(filepath.Join(m.opts.Dir, "fleet-cache.json"), data, 0o600); err != nil {
		m.log.Warn("fleet: cannot cache the fleet size", "error", err)
	}
}

// syncPauses holds projects paused in the fleet and releases resumed ones.
// A project held here stays held while the control database is unreachable:
// an instance that cannot see the fleet does not guess that a cutover
// ended. A resume waits until this instance's catalog has the revision the
// resume names, so that a switched database_url is in force first.
func (m *Member) syncPauses(ctx context.Context, q querier) error {
	if err := m.flushResumes(ctx); err != nil {
		return err
	}
	rows, err := q.Query(ctx, `SELECT p.ref, p.epoch, p.paused, p.min_revision,
			p.paused AND p.owner <> '' AND NOT EXISTS (SELECT 1 FROM `+controldb.Schema+`.instances i WHERE i.id = p.owner AND `+LiveSQL+`)
		FROM `+controldb.Schema+`.pauses p`, m.opts.Timeout.String())
	if err != nil {
		return fmt.Errorf("fleet: read pauses: %w", err)
	}
	type pauseRow struct {
		ref          string
		epoch, minR  int64
		paused, lost bool // lost: the instance that paused it stopped
	}
	var ps []pauseRow
	for rows.Next() {
		var p pauseRow
		if err := rows.Scan(&p.ref, &p.epoch, &p.paused, &p.minR, &p.lost); err != nil {
			rows.Close()
			return fmt.Errorf("fleet: read pauses: %w", err)
		}
		ps = append(ps, p)
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("fleet: read pauses: %w", err)
	}
	for _, p := range ps {
		if p.lost {
			m.endLostPause(ctx, p.ref, p.epoch)
			continue
		}
		m.mu.Lock()
		h := m.held[p.ref]
		m.mu.Unlock()
		switch {
		case p.paused && (h == nil || h.epoch != p.epoch):
			m.holdProject(p.ref, p.epoch)
		case !p.paused && h != nil:
			if m.opts.Catalog.Revision() < p.minR {
				if err := m.opts.Catalog.Sync(ctx); err != nil || m.opts.Catalog.Revision() < p.minR {
					m.log.Warn("fleet: a resume waits for the catalog revision it names", "project", p.ref, "revision", p.minR, "error", err)
					continue
				}
			}
			m.release(p.ref)
		}
	}
	return nil
}

// endLostPause resumes a pause whose instance stopped (killed in the
// middle of an ejection, say): nobody else would. The catalog is read first
// so that the resume names the newest revision, a switch the stopped
// instance wrote included; of several instances doing this, one wins.
func (m *Member) endLostPause(ctx context.Context, ref string, epoch int64) {
	if err := m.opts.Catalog.Sync(ctx); err != nil {
		return
	}
	tag, err := m.opts.Pool.Exec(ctx, `WITH r AS (UPDATE `+controldb.Schema+`.pauses SET paused = false, epoch = epoch + 1,
			min_revision = $3, owner = '', changed = now() WHERE ref = $1 AND epoch = $2 AND paused RETURNING ref)
		SELECT pg_catalog.pg_notify($4, ref) FROM r`, ref, epoch, m.opts.Catalog.Revision(), channel)
	if err == nil && tag.RowsAffected() > 0 {
		m.log.Warn("fleet: the instance that paused a project stopped; the pause is ended", "project", ref)
	}
}

type querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// holdProject pauses a project here and acknowledges once its running
// transactions have finished.
func (m *Member) holdProject(ref string, epoch int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if c := m.cancels[ref]; c != nil {
		c()
	}
	parent := m.ctx
	if parent == nil {
		parent = context.Background()
	}
	ctx, cancel := context.WithCancel(parent)
	m.cancels[ref] = cancel
	m.held[ref] = &hold{epoch: epoch}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		if err := m.opts.Server.Pause(ctx, ref); err != nil {
			if ctx.Err() == nil {
				m.log.Warn("fleet: pausing a project here failed", "project", ref, "error", err)
			}
			return
		}
		for ctx.Err() == nil {
			actx, acancel := context.WithTimeout(ctx, 5*time.Second)
			_, err := m.opts.Pool.Exec(actx, `INSERT INTO `+controldb.Schema+`.pause_acks (ref, epoch, instance) VALUES ($1, $2, $3)
				ON CONFLICT (ref, instance) DO UPDATE SET epoch = excluded.epoch, acked = now()`, ref, epoch, m.opts.ID)
			acancel()
			if err == nil {
				m.log.Info("fleet: project held here", "project", ref, "epoch", epoch)
				return
			}
			t := time.NewTimer(200 * time.Millisecond)
			select {
			case <-ctx.Done():
			case <-t.C:
			}
			t.Stop()
		}
	}()
}

func (m *Member) release(ref string) {
	m.mu.Lock()
	if c := m.cancels[ref]; c != nil {
		c()
	}
	delete(m.cancels, ref)
	delete(m.held, ref)
	m.mu.Unlock()
	m.opts.Server.Resume(ref)
	m.log.Info("fleet: project released here", "project", ref)
}

// ErrUnavailable: the control database did not answer.
var ErrUnavailable = catalog.ErrUnavailable

// Pause holds a project on every live instance: it records the pause, and
// waits until every instance whose heartbeat is younger than the instance
// timeout has acknowledged that the project's running transactions have
// finished there, or ctx ends. An instance that stops beating is left out
// once its heartbeat is older than the timeout.
func (m *Member) Pause(ctx context.Context, ref string) error {
	var epoch int64
	err := pgx.BeginFunc(ctx, m.opts.Pool, func(tx pgx.Tx) error {
		if err := tx.QueryRow(ctx, `INSERT INTO `+controldb.Schema+`.pauses AS p (ref, epoch, paused, owner) VALUES ($1, 1, true, $2)
			ON CONFLICT (ref) DO UPDATE SET epoch = p.epoch + 1, paused = true, owner = excluded.owner, changed = now()
			RETURNING epoch`, ref, m.opts.ID).Scan(&epoch); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, "SELECT pg_catalog.pg_notify($1, $2)", channel, ref)
		return err
	})
	if err != nil {
		return fmt.Errorf("%w: pause %s: %w", ErrUnavailable, ref, err)
	}
	m.poke()
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	var waiting []string
	for {
		waiting, err = m.unacked(ctx, ref, epoch)
		if err == nil && len(waiting) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			if err != nil {
				return fmt.Errorf("pause %s: %w (control database: %v)", ref, ctx.Err(), err)
			}
			return fmt.Errorf("pause %s: instances %v did not finish their running transactions: %w", ref, waiting, ctx.Err())
		case <-t.C:
		}
	}
}

func (m *Member) unacked(ctx context.Context, ref string, epoch int64) ([]string, error) {
	rows, err := m.opts.Pool.Query(ctx, `SELECT id FROM `+controldb.Schema+`.instances i WHERE `+LiveSQL+`
		AND NOT EXISTS (SELECT 1 FROM `+controldb.Schema+`.pause_acks a WHERE a.ref = $2 AND a.epoch = $3 AND a.instance = i.id)
		ORDER BY id`, m.opts.Timeout.String(), ref, epoch)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

// Resume releases a project on every instance, once each has the catalog
// revision in force here (a cutover's switch first). When the control
// database does not answer, the resume is written as soon as it does; until
// then the project stays held everywhere.
func (m *Member) Resume(ref string) {
	m.mu.Lock()
	m.resumes[ref] = m.opts.Catalog.Revision()
	m.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := m.flushResumes(ctx); err != nil {
		m.log.Warn("fleet: resume not written yet; it is retried while the control database is down", "project", ref, "error", err)
	}
	m.poke()
}

func (m *Member) flushResumes(ctx context.Context) error {
	m.mu.Lock()
	pending := make(map[string]int64, len(m.resumes))
	for k, v := range m.resumes {
		pending[k] = v
	}
	m.mu.Unlock()
	refs := make([]string, 0, len(pending))
	for r := range pending {
		refs = append(refs, r)
	}
	slices.Sort(refs)
	for _, ref := range refs {
		err := pgx.BeginFunc(ctx, m.opts.Pool, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `UPDATE `+controldb.Schema+`.pauses SET paused = false, epoch = epoch + 1,
				min_revision = $2, owner = '', changed = now() WHERE ref = $1 AND paused`, ref, pending[ref]); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, "SELECT pg_catalog.pg_notify($1, $2)", channel, ref)
			return err
		})
		if err != nil {
			return fmt.Errorf("fleet: resume %s: %w", ref, err)
		}
		m.mu.Lock()
		if m.resumes[ref] == pending[ref] {
			delete(m.resumes, ref)
		}
		m.mu.Unlock()
	}
	return nil
}

// Paused reports whether a project is held on this instance.
func (m *Member) Paused(ref string) bool { return m.opts.Server.Paused(ref) }

// Instances lists the fleet.
func (m *Member) Instances(ctx context.Context) ([]Instance, error) {
	rows, err := m.opts.Pool.Query(ctx, `SELECT id, admin_url, proxy_url, version, heartbeat, `+LiveSQL+`, share
		FROM `+controldb.Schema+`.instances ORDER BY id`, m.opts.Timeout.String())
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Instance, error) {
		var i Instance
		err := r.Scan(&i.ID, &i.AdminURL, &i.ProxyURL, &i.Version, &i.Heartbeat, &i.Live, &i.Share)
		return i, err
	})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return out, nil
}

// ErrNoInstance: no instance of that id is known. ErrLive: the instance
// beats, and is not forgotten.
var (
	ErrNoInstance = errors.New("fleet: no such instance")
	ErrLive       = errors.New("fleet: the instance is live")
)

// Forget marks a silent instance stopped, so the others take its share of
// the host cap at their next heartbeats. It is for an instance known to be
// gone where no instance of its place is left to find it gone (its
// machine or container is gone): an instance cut off from the control
// database alone, forgotten, still holds its backends.
func (m *Member) Forget(ctx context.Context, id string) error {
	err := pgx.BeginFunc(ctx, m.opts.Pool, func(tx pgx.Tx) error {
		var live bool
		err := tx.QueryRow(ctx, `SELECT `+LiveSQL+` FROM `+controldb.Schema+`.instances WHERE id = $2 FOR UPDATE`,
			m.opts.Timeout.String(), id).Scan(&live)
		switch {
		case errors.Is(err, pgx.ErrNoRows):
			return fmt.Errorf("%w: %s", ErrNoInstance, id)
		case err != nil:
			return err
		case live:
			return fmt.Errorf("%w: %s beat less than %v ago", ErrLive, id, m.opts.Timeout)
		}
		_, err = tx.Exec(ctx, `UPDATE `+controldb.Schema+`.instances SET stopped = true WHERE id = $1`, id)
		return err
	})
	if err != nil && !errors.Is(err, ErrNoInstance) && !errors.Is(err, ErrLive) {
		err = fmt.Errorf("%w: forget %s: %w", ErrUnavailable, id, err)
	}
	if err == nil {
		m.log.Warn("fleet: instance forgotten; its share is free", "instance", id)
	}
	return err
}
