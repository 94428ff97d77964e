package catalog

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"cascata/internal/config"
	"cascata/internal/controldb"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// ErrUnavailable: the control database did not answer; nothing changed.
var ErrUnavailable = errors.New("the control database is unreachable")

const (
	// sharedChannel is the NOTIFY channel of catalog changes; the payload is
	// the new revision (informative: followers read every newer row).
	sharedChannel = "cascata_catalog"
	// writeLockKey serializes every write of the shared catalog across the
	// fleet ("catalog" in ASCII). Held until commit, it also makes revisions
	// (taken from a sequence inside the lock) commit in increasing order, so
	// a follower that has seen revision R never misses a row below R.
	writeLockKey  int64 = 0x636174616c6f67
	cacheFileName       = "catalog-cache.json"
	cacheVersion        = 1
	// pollEvery bounds how long a follower trusts its listening connection
	// without hearing from it: a lost connection is noticed and the catalog
	// re-read within this time even if no notification ever comes.
	pollEvery = 2 * time.Second
)

// sharedSteps are the catalog's tables in the control database. Never edit
// a step that has shipped: append one.
var sharedSteps = []controldb.Step{
	// 1: one row per project ref ever served; deletions are tombstones so
	// that followers reading "revision > last" see them.
	`CREATE SEQUENCE project_revision;
	CREATE TABLE projects (
		ref       text PRIMARY KEY,
		revision  bigint NOT NULL,
		deleted   boolean NOT NULL DEFAULT false,
		source    text NOT NULL CHECK (source IN ('file', 'runtime')),
		project   jsonb,
		file_hash text NOT NULL DEFAULT '',
		reason    text NOT NULL DEFAULT '',
		changed   timestamptz NOT NULL DEFAULT now()
	);
	CREATE INDEX projects_revision ON projects (revision);`,
}

// row is one project of the shared catalog, as stored and cached: a
// run-time change's fields (override; FileHash is that of the file's
// version the row follows or overrides), plus where the version comes from
// and the revision it was written under.
type row struct {
	override
	Revision int64  `json:"revision"`
	Source   string `json:"source"`
}

type cacheDoc struct {
	Version  int   `json:"version"`
	Revision int64 `json:"revision"`
	Rows     []row `json:"rows"`
}

// SharedOptions configure OpenShared.
type SharedOptions struct {
	// Pool is the control database ([catalog].url). Required.
	Pool *pgxpool.Pool
	// Dir is the state directory: the last catalog seen is cached there
	// (catalog-cache.json), for a start while the control database is down. Required.
	Dir string
	// Config, File, Apply and Logger as in Options.
	Config *config.Config
	File   []byte
	Apply  func([]config.Project) error
	Logger *slog.Logger
	// OpTimeout bounds each exchange with the control database; 0 = 5s.
	OpTimeout time.Duration
}

// Shared is the catalog kept in a control database that several instances
// share. Every instance seeds its cascata.toml projects into it with the
// rule of Catalog (a run-time change wins until the file changes that
// project), writes run-time changes to it, and follows the changes of the
// others (LISTEN/NOTIFY, re-reading changed rows; a full re-read after a
// lost connection). While the control database is down the last known
// catalog stays in force and writes fail with ErrUnavailable.
type Shared struct {
	pool    *pgxpool.Pool
	dir     string
	apply   func([]config.Project) error
	log     *slog.Logger
	timeout time.Duration

	mu     sync.Mutex
	cfg    *config.Config
	hashes map[string]string // the file's projects' hashes
	seeded bool              // the current file set is in the control database
	rows   map[string]row
	rev    int64 // highest revision seen

	contact atomic.Int64 // unix nanoseconds of the last successful exchange
	revSeen atomic.Int64 // rev, readable without mu
}

// OpenShared migrates the control database, seeds the file's projects,
// reads the catalog and puts it in force. When the control database does
// not answer, the cached catalog of the last run (or, without one, the
// file's projects) is put in force instead and Run catches up once it
// answers; an answer that refuses (e.g. a schema newer than this build) is
// an error.
func OpenShared(ctx context.Context, opts SharedOptions) (*Shared, error) {
	if opts.Pool == nil || opts.Dir == "" || opts.Config == nil || opts.Apply == nil {
		return nil, errors.New("catalog: Pool, Dir, Config and Apply are required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.OpTimeout <= 0 {
		opts.OpTimeout = 5 * time.Second
	}
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("catalog: state dir: %w", err)
	}
	hashes, err := projectHashes(opts.Config, opts.File)
	if err != nil {
		return nil, err
	}
	c := &Shared{pool: opts.Pool, dir: opts.Dir, apply: opts.Apply, log: opts.Logger, timeout: opts.OpTimeout,
		cfg: opts.Config, hashes: hashes, rows: map[string]row{}}
	c.mu.Lock()
	defer c.mu.Unlock()
	err = c.connectLocked(ctx)
	if err == nil {
		return c, nil
	}
	if !unreachable(err) {
		return nil, err
	}
	cached, cerr := c.readCache()
	switch {
	case cerr != nil:
		return nil, fmt.Errorf("catalog: control database unreachable (%v) and its cache unreadable: %w", err, cerr)
	case cached != nil:
		c.log.Warn("control database unreachable: serving the catalog cached by the last run until it answers",
			"error", err, "cache", filepath.Join(c.dir, cacheFileName), "revision", cached.Revision)
		for _, r := range cached.Rows {
			c.rows[r.Ref] = r
		}
		c.setRevLocked(cached.Revision)
	default:
		c.log.Warn("control database unreachable and no cached catalog: serving the file's projects until it answers", "error", err)
		for _, p := range opts.Config.Projects {
			c.rows[p.Ref] = row{override: override{Ref: p.Ref, Project: &p, FileHash: hashes[p.Ref]}, Source: SourceFile}
		}
	}
	if err := c.apply(c.effective(c.rows)); err != nil {
		return nil, fmt.Errorf("catalog: put projects in force: %w", err)
	}
	return c, nil
}

// connectLocked migrates, seeds (when the file set is not seeded yet) and
// reads the whole catalog, putting it in force.
func (c *Shared) connectLocked(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	if err := controldb.Migrate(ctx, c.pool, "catalog", sharedSteps); err != nil {
		return err
	}
	if !c.seeded {
		if err := c.seedLocked(ctx); err != nil {
			return err
		}
	}
	return c.syncLocked(ctx, c.pool, true)
}

func unreachable(err error) bool { return controldb.Unreachable(err) }

// SetFile seeds a reloaded cascata.toml (SIGHUP) into the control database
// and puts the result in force. While the control database is down the
// reload is kept and seeded when it answers.
func (c *Shared) SetFile(cfg *config.Config, text []byte) error {
	hashes, err := projectHashes(cfg, text)
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cfg, c.hashes, c.seeded = cfg, hashes, false
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	if err := c.seedLocked(ctx); err != nil {
		return fmt.Errorf("%w: the reload is seeded when it answers: %w", ErrUnavailable, err)
	}
	return c.syncLocked(ctx, c.pool, false)
}

// seedLocked writes the file's projects into the control database with the
// file-versus-run-time rule: a file project is written when the database
// has no row for it or its row follows (file) or overrides (runtime) a
// different version of the file; a project the file no longer has is
// removed when its row came from the file or changed a file project.
// Run-time-only projects are left alone.
func (c *Shared) seedLocked(ctx context.Context) error {
	err := c.inWriteTx(ctx, func(tx pgx.Tx) (bool, error) {
		cur, err := readRows(ctx, tx, "")
		if err != nil {
			return false, err
		}
		now := time.Now().UTC()
		var writes []row
		inFile := make(map[string]bool, len(c.cfg.Projects))
		for i := range c.cfg.Projects {
			p := c.cfg.Projects[i]
			h := c.hashes[p.Ref]
			inFile[p.Ref] = true
			r, ok := cur[p.Ref]
			if ok && r.FileHash == h && !(r.Source == SourceFile && r.Deleted) {
				continue
			}
			if ok && r.Source == SourceRuntime {
				c.log.Info("cascata.toml changed a project: its run-time change is dropped", "project", p.Ref)
			}
			writes = append(writes, row{override: override{Ref: p.Ref, Project: &p, FileHash: h, Changed: now}, Source: SourceFile})
		}
		for _, ref := range sortedRefs(cur) {
			r := cur[ref]
			if inFile[ref] || r.FileHash == "" || r.Deleted && r.Source == SourceFile {
				continue
			}
			c.log.Info("cascata.toml no longer has a project: it is removed", "project", ref)
			writes = append(writes, row{override: override{Ref: ref, Deleted: true, Reason: "file", Changed: now}, Source: SourceFile})
		}
		for _, w := range writes {
			if _, err := writeRow(ctx, tx, w); err != nil {
				return false, err
			}
		}
		return len(writes) > 0, nil
	})
	if err != nil {
		return err
	}
	c.seeded = true
	return nil
}

// inWriteTx runs fn in a transaction holding the catalog's write lock and
// notifies followers when fn reports a change.
func (c *Shared) inWriteTx(ctx context.Context, fn func(pgx.Tx) (bool, error)) error {
	return pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_catalog.pg_advisory_xact_lock($1)", writeLockKey); err != nil {
			return fmt.Errorf("catalog: lock: %w", err)
		}
		changed, err := fn(tx)
		if err != nil || !changed {
			return err
		}
		if _, err := tx.Exec(ctx, "SELECT pg_catalog.pg_notify($1, '')", sharedChannel); err != nil {
			return fmt.Errorf("catalog: notify: %w", err)
		}
		return nil
	})
}

const rowColumns = `ref, revision, deleted, source, project, file_hash, reason, changed`

type querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// readRows reads the rows of the catalog newer than since ("" = all), or one
// ref when only is set.
func readRows(ctx context.Context, q querier, only string, since ...int64) (map[string]row, error) {
	sql := `SELECT ` + rowColumns + ` FROM ` + controldb.Schema + `.projects`
	var args []any
	switch {
	case only != "":
		sql += ` WHERE ref = $1`
		args = append(args, only)
	case len(since) > 0:
		sql += ` WHERE revision > $1`
		args = append(args, since[0])
	}
	rs, err := q.Query(ctx, sql, args...)
	if err != nil {
		return nil, fmt.Errorf("catalog: read: %w", err)
	}
	out := map[string]row{}
	for rs.Next() {
		var r row
		var project []byte
		if err := rs.Scan(&r.Ref, &r.Revision, &r.Deleted, &r.Source, &project, &r.FileHash, &r.Reason, &r.Changed); err != nil {
			rs.Close()
			return nil, fmt.Errorf("catalog: read: %w", err)
		}
		if project != nil {
			r.Project = new(config.Project)
			if err := json.Unmarshal(project, r.Project); err != nil {
				rs.Close()
				return nil, fmt.Errorf("catalog: project %s in the control database is damaged: %w", r.Ref, err)
			}
		}
		out[r.Ref] = r
	}
	if err := rs.Err(); err != nil {
		return nil, fmt.Errorf("catalog: read: %w", err)
	}
	return out, nil
}

// writeRow stores r under a new revision and returns the row as stored.
func writeRow(ctx context.Context, tx pgx.Tx, r row) (row, error) {
	var project []byte
	if r.Project != nil && !r.Deleted {
		var err error
		if project, err = json.Marshal(r.Project); err != nil {
			return r, fmt.Errorf("catalog: encode project %s: %w", r.Ref, err)
		}
	} else {
		r.Project = nil
	}
	err := tx.QueryRow(ctx, `INSERT INTO `+controldb.Schema+`.projects AS p (`+rowColumns+`)
		VALUES ($1, nextval('`+controldb.Schema+`.project_revision'), $2, $3, $4, $5, $6, $7)
		ON CONFLICT (ref) DO UPDATE SET revision = excluded.revision, deleted = excluded.deleted,
			source = excluded.source, project = excluded.project, file_hash = excluded.file_hash,
			reason = excluded.reason, changed = excluded.changed
		RETURNING p.revision`,
		r.Ref, r.Deleted, r.Source, project, r.FileHash, r.Reason, r.Changed).Scan(&r.Revision)
	if err != nil {
		return r, fmt.Errorf("catalog: write project %s: %w", r.Ref, err)
	}
	return r, nil
}

// syncLocked reads the rows changed since the last sync (all when full),
// and puts the result in force when anything changed.
func (c *Shared) syncLocked(ctx context.Context, q querier, full bool) error {
	var got map[string]row
	var err error
	if full {
		got, err = readRows(ctx, q, "")
	} else {
		got, err = readRows(ctx, q, "", c.rev)
	}
	if err != nil {
		return err
	}
	c.contact.Store(time.Now().UnixNano())
	next := c.rows
	if full {
		next = got
	} else if len(got) > 0 {
		next = maps(c.rows)
		for ref, r := range got {
			next[ref] = r
		}
	}
	rev := c.rev
	if full {
		rev = 0
	}
	for _, r := range got {
		rev = max(rev, r.Revision)
	}
	if !full && len(got) == 0 {
		return nil
	}
	if full && sameRows(c.rows, next) {
		c.setRevLocked(rev)
		return nil
	}
	if err := c.apply(c.effective(next)); err != nil {
		// The others run this set; this instance keeps its last one and
		// says so loudly. The rows are taken anyway, so that the next
		// change is read from here on and a fix by the admin API reaches it.
		c.log.Error("the catalog's project set could not be put in force on this instance", "error", err, "revision", rev)
	}
	c.rows = next
	c.setRevLocked(rev)
	c.writeCacheLocked()
	return nil
}

func (c *Shared) setRevLocked(rev int64) {
	c.rev = rev
	c.revSeen.Store(rev)
}

func maps(m map[string]row) map[string]row {
	out := make(map[string]row, len(m)+1)
	for k, v := range m {
		out[k] = v
	}
	return out
}

func sameRows(a, b map[string]row) bool {
	if len(a) != len(b) {
		return false
	}
	for ref, r := range a {
		if o, ok := b[ref]; !ok || o.Revision != r.Revision {
			return false
		}
	}
	return true
}

// effective is the served set: every row not deleted, by ref.
func (c *Shared) effective(rows map[string]row) []config.Project {
	out := make([]config.Project, 0, len(rows))
	for _, ref := range sortedRefs(rows) {
		if r := rows[ref]; !r.Deleted && r.Project != nil {
			out = append(out, *r.Project)
		}
	}
	return out
}

// Run follows the control database until ctx ends: LISTEN for changes,
// re-read changed rows, re-read everything after a lost connection, and
// seed a file set a reload or a start without the database left unseeded.
// Meanwhile the last known catalog stays in force.
func (c *Shared) Run(ctx context.Context) { controldb.Follow(ctx, c.log, "catalog", c.follow) }

func (c *Shared) follow(ctx context.Context, connected func()) error {
	conn, err := controldb.Listen(ctx, c.pool, sharedChannel, c.timeout)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	c.mu.Lock()
	err = c.connectLocked(ctx)
	c.mu.Unlock()
	if err != nil {
		return err
	}
	connected()
	for {
		if err := controldb.WaitNotification(ctx, conn, time.Now().Add(pollEvery)); err != nil {
			return fmt.Errorf("catalog: listen: %w", err)
		}
		if ctx.Err() != nil {
			return nil
		}
		sctx, scancel := context.WithTimeout(ctx, c.timeout)
		c.mu.Lock()
		if !c.seeded {
			err = c.seedLocked(sctx)
		}
		if err == nil {
			err = c.syncLocked(sctx, conn, false)
		}
		c.mu.Unlock()
		scancel()
		if err != nil {
			return err
		}
	}
}

// Sync reads the changes not seen yet now (a caller that must act on the
// newest catalog, e.g. a resume after a cutover).
func (c *Shared) Sync(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.syncLocked(ctx, c.pool, false); err != nil {
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return nil
}

// Revision is the newest revision of the catalog this instance has in force.
func (c *Shared) Revision() int64 { return c.revSeen.Load() }

// LastContact is when the control database last answered a read.
func (c *Shared) LastContact() time.Time { return time.Unix(0, c.contact.Load()) }

// Projects returns every served project.
func (c *Shared) Projects() []Entry {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]Entry, 0, len(c.rows))
	for _, ref := range sortedRefs(c.rows) {
		if r := c.rows[ref]; !r.Deleted && r.Project != nil {
			out = append(out, r.entry())
		}
	}
	return out
}

// Project returns one served project.
func (c *Shared) Project(ref string) (Entry, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r, ok := c.rows[ref]
	if !ok || r.Deleted || r.Project == nil {
		return Entry{}, false
	}
	return r.entry(), true
}

func (r row) entry() Entry {
	if r.Source == SourceRuntime {
		return Entry{Project: clone(*r.Project), Source: SourceRuntime, Reason: r.Reason, Changed: r.Changed}
	}
	return Entry{Project: clone(*r.Project), Source: SourceFile}
}

// Add registers a new project at run time in the whole fleet.
func (c *Shared) Add(p config.Project, reason string) (config.Project, error) {
	return c.write(p.Ref, reason, func(cur row, ok bool) (*config.Project, error) {
		if ok && !cur.Deleted {
			return nil, fmt.Errorf("%w: %s", ErrExists, p.Ref)
		}
		np, err := Normalize(c.cfg, p)
		return &np, err
	})
}

// Change edits a project at run time in the whole fleet (see Catalog.Change).
func (c *Shared) Change(ref, reason string, fn func(*config.Project) error) (config.Project, error) {
	return c.write(ref, reason, func(cur row, ok bool) (*config.Project, error) {
		if !ok || cur.Deleted || cur.Project == nil {
			return nil, fmt.Errorf("%w: %s", ErrNotFound, ref)
		}
		next := clone(*cur.Project)
		if err := fn(&next); err != nil {
			return nil, err
		}
		if next.Ref != ref {
			return nil, fmt.Errorf("catalog: the ref of a project cannot change (%s → %s)", ref, next.Ref)
		}
		np, err := Normalize(c.cfg, next)
		return &np, err
	})
}

// Remove stops serving a project in the whole fleet.
func (c *Shared) Remove(ref, reason string) error {
	_, err := c.write(ref, reason, func(cur row, ok bool) (*config.Project, error) {
		if !ok || cur.Deleted {
			return nil, fmt.Errorf("%w: %s", ErrNotFound, ref)
		}
		return nil, nil
	})
	return err
}

// write changes one project: under the fleet's write lock it reads the
// project's current row and the changes not seen yet, lets next decide the
// new version (nil = deleted), puts the resulting set in force here (a
// refusal changes nothing anywhere), stores it and notifies the fleet. When
// the commit fails the previous set is put back in force.
func (c *Shared) write(ref, reason string, next func(cur row, ok bool) (*config.Project, error)) (config.Project, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	var stored row
	var result config.Project
	var rows map[string]row // the set after the change, once put in force
	var refused error       // the change's own fault: not the control database's
	applied := false
	err := c.inWriteTx(ctx, func(tx pgx.Tx) (bool, error) {
		newer, err := readRows(ctx, tx, "", c.rev)
		if err != nil {
			return false, err
		}
		rows = maps(c.rows)
		for k, r := range newer {
			rows[k] = r
		}
		cur, ok := rows[ref]
		p, err := next(cur, ok)
		if err != nil {
			refused = err
			return false, err
		}
		r := row{override: override{Ref: ref, Deleted: p == nil, Project: p, FileHash: cur.FileHash, Reason: reason, Changed: time.Now().UTC()}, Source: SourceRuntime}
		if stored, err = writeRow(ctx, tx, r); err != nil {
			return false, err
		}
		rows[ref] = stored
		if err := c.apply(c.effective(rows)); err != nil {
			refused = fmt.Errorf("catalog: put projects in force: %w", err)
			return false, refused
		}
		applied = true
		if p != nil {
			result = clone(*p)
		}
		return true, nil
	})
	if err != nil {
		if applied {
			if aerr := c.apply(c.effective(c.rows)); aerr != nil {
				c.log.Error("catalog: restoring the previous project set failed", "error", aerr)
			}
		}
		if refused != nil || !unreachable(err) {
			return config.Project{}, err
		}
		return config.Project{}, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	c.rows = rows
	c.setRevLocked(max(c.rev, maxRevision(rows)))
	c.writeCacheLocked()
	c.log.Info("project changed", "project", ref, "reason", reason, "deleted", stored.Deleted, "revision", stored.Revision)
	return result, nil
}

func maxRevision(rows map[string]row) int64 {
	var m int64
	for _, r := range rows {
		m = max(m, r.Revision)
	}
	return m
}

func (c *Shared) readCache() (*cacheDoc, error) {
	path := filepath.Join(c.dir, cacheFileName)
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var doc cacheDoc
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("%s is damaged: %w", path, err)
	}
	if doc.Version != cacheVersion {
		return nil, fmt.Errorf("%s has version %d, this build reads %d", path, doc.Version, cacheVersion)
	}
	return &doc, nil
}

// writeCacheLocked keeps the catalog in force on disk for a start without
// the control database. A failure is logged: the catalog itself is safe.
func (c *Shared) writeCacheLocked() {
	doc := cacheDoc{Version: cacheVersion, Revision: c.rev, Rows: make([]row, 0, len(c.rows))}
	for _, ref := range sortedRefs(c.rows) {
		doc.Rows = append(doc.Rows, c.rows[ref])
	}
	data, err := json.MarshalIndent(doc, "", "  ")
	if err == nil {
		err = WriteFileAtomic(filepath.Join(c.dir, cacheFileName), append(data, '\n'), 0o600)
	}
	if err != nil {
		c.log.Error("catalog: cannot cache the catalog in the state directory", "error", err)
	}
}
