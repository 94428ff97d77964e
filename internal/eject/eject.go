// Package eject moves one project's database from where it lives to an
// external PostgreSQL while its clients keep their connection strings
// (CONTRACT section 5).
//
// Two methods:
//
//   - "logical": the schema is copied with pg_dump --schema-only |
//     pg_restore, then a publication on the source and a subscription on the
//     target copy the data and stream every later change while the project
//     keeps serving. At cutover the project is paused in the proxy (running
//     transactions finish, new ones wait), the target is waited for until it
//     has applied everything the source committed, sequences are copied,
//     row counts and sequence values are verified, the project's database_url
//     (and replica_urls) are switched in the catalog (persisted), and the
//     project resumes on the target. The pause lasts about one round trip of
//     replication plus the verification.
//   - "dump": the project is paused first, then pg_dump | pg_restore copies
//     schema and data, the copy is verified, switched and resumed. Clients
//     wait for the whole copy, so this method suits small databases or
//     sources without wal_level=logical; a copy longer than the proxy's
//     query_wait_timeout makes waiting clients fail with 57P03, so databases
//     larger than Options.MaxDumpBytes (512 MiB) are refused before pausing.
//
// Checks come first (target reachable as owner and as the login role, target
// database empty, target server version >= source's, the project's roles exist
// on the target or are created, the login role is a member of them, and for
// "logical" wal_level=logical and a replica identity on every table). Any
// failure before the switch resumes the project on its source with nothing
// changed there (publication, slot and subscription are dropped); the target
// may hold a partial copy to be emptied before another attempt. The source
// database is never modified otherwise and is left for its owner to drop.
//
// DDL run on the source during a logical ejection is not replicated: the
// verification then fails (or misses the change) — avoid schema changes
// while ejecting.
package eject

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"

	"cascata/internal/config"
	"cascata/internal/pgtools"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"golang.org/x/sync/errgroup"
)

// Method is how the data is copied.
type Method string

// The ejection methods.
const (
	Logical Method = "logical"
	Dump    Method = "dump"
)

// ErrInvalid is wrapped by Request.Validate's errors.
var ErrInvalid = errors.New("invalid ejection request")

// Request is one ejection.
type Request struct {
	// Project is the project as served now; its DatabaseURL and OwnerURL are the source.
	Project config.Project
	// TargetURL becomes the project's database_url (as the login role).
	TargetURL string
	// TargetOwnerURL has owner rights on the target database.
	TargetOwnerURL string
	// ReplicaURLs become the project's replica_urls (none if empty).
	ReplicaURLs []string
	// Method is Logical or Dump.
	Method Method
}

// Validate checks the request's form (not the servers): URLs and method.
func (r Request) Validate() error {
	if r.Method != Logical && r.Method != Dump {
		return fmt.Errorf("%w: method must be \"logical\" or \"dump\", not %q", ErrInvalid, r.Method)
	}
	for _, u := range []struct{ name, v string }{{"target_url", r.TargetURL}, {"target_owner_url", r.TargetOwnerURL}} {
		if u.v == "" {
			return fmt.Errorf("%w: %s is required", ErrInvalid, u.name)
		}
		if err := checkURL(u.v); err != nil {
			return fmt.Errorf("%w: %s: %w", ErrInvalid, u.name, err)
		}
	}
	for i, u := range r.ReplicaURLs {
		if err := checkURL(u); err != nil {
			return fmt.Errorf("%w: replica_urls[%d]: %w", ErrInvalid, i, err)
		}
	}
	if r.Project.OwnerURL == "" {
		return fmt.Errorf("%w: project %s has no owner_url (set it, or [provision].owner_url)", ErrInvalid, r.Project.Ref)
	}
	if sameDatabase(r.Project.DatabaseURL, r.TargetURL) || sameDatabase(r.Project.OwnerURL, r.TargetOwnerURL) {
		return fmt.Errorf("%w: the target is the project's current database", ErrInvalid)
	}
	return nil
}

func checkURL(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return errors.New("not a URL")
	}
	if u.Scheme != "postgres" && u.Scheme != "postgresql" {
		return errors.New("must start with postgres://")
	}
	if u.Host == "" || u.User == nil || u.User.Username() == "" {
		return errors.New("needs a host and a user name")
	}
	if _, err := pgconn.ParseConfig(s); err != nil {
		return errors.New("not a valid connection string")
	}
	return nil
}

func sameDatabase(a, b string) bool {
	ca, err1 := pgconn.ParseConfig(a)
	cb, err2 := pgconn.ParseConfig(b)
	return err1 == nil && err2 == nil && ca.Host == cb.Host && ca.Port == cb.Port && ca.Database == cb.Database
}

// Pauser holds and releases a project's new transactions (the proxy).
type Pauser interface {
	// Pause holds new transactions and waits until running ones finish or ctx ends.
	Pause(ctx context.Context, ref string) error
	// Resume lets them run again.
	Resume(ref string)
}

// Catalog changes a project and puts the change in force durably
// (*catalog.Catalog satisfies it).
type Catalog interface {
	Change(ref, reason string, fn func(*config.Project) error) (config.Project, error)
}

// Reporter receives a job's phase, progress and log lines (*jobs.Job satisfies it).
type Reporter interface {
	SetPhase(phase string)
	SetProgress(f float64)
	Logf(format string, args ...any)
}

// Options configure an Ejector.
type Options struct {
	// Pauser is the proxy. Required.
	Pauser Pauser
	// Catalog receives the switch. Required.
	Catalog Catalog
	// BinDir holds pg_dump and pg_restore; "" looks them up on PATH.
	BinDir string
	// PauseTimeout bounds the wait for running transactions when pausing; 0 = 10s.
	PauseTimeout time.Duration
	// CatchUpTimeout bounds the wait for the target while paused; 0 = 10s.
	CatchUpTimeout time.Duration
	// SyncTimeout bounds the initial copy of the logical method; 0 = 6h.
	SyncTimeout time.Duration
	// MaxLagBytes is the replication lag under which the logical method pauses; 0 = 1 MiB.
	MaxLagBytes int64
	// MaxDumpBytes is the largest source database the dump method copies:
	// it pauses the project for the whole copy, and clients waiting longer
	// than the proxy's query_wait_timeout get 57P03. 0 = 512 MiB (about 16 s
	// of copy on a 2-core machine, half the default query_wait_timeout).
	MaxDumpBytes int64
	// Logger; nil discards.
	Logger *slog.Logger
	// OnPhase, if set, is called as each phase starts (tests inject failures here).
	OnPhase func(ref, phase string)
}

// Ejector runs ejections.
type Ejector struct {
	opts Options
	log  *slog.Logger
}

// New checks the options.
func New(opts Options) (*Ejector, error) {
	if opts.Pauser == nil || opts.Catalog == nil {
		return nil, errors.New("eject: Pauser and Catalog are required")
	}
	if opts.PauseTimeout <= 0 {
		opts.PauseTimeout = 10 * time.Second
	}
	if opts.CatchUpTimeout <= 0 {
		opts.CatchUpTimeout = 10 * time.Second
	}
	if opts.SyncTimeout <= 0 {
		opts.SyncTimeout = 6 * time.Hour
	}
	if opts.MaxLagBytes <= 0 {
		opts.MaxLagBytes = 1 << 20
	}
	if opts.MaxDumpBytes <= 0 {
		opts.MaxDumpBytes = 512 << 20
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Ejector{opts: opts, log: opts.Logger}, nil
}

// run is the state of one ejection.
type run struct {
	e   *Ejector
	req Request
	rep Reporter
	ref string

	src, tgt *pgx.Conn // owner connections
	login    string    // the target's login role

	name       string // publication, subscription and slot name
	pubMade    bool
	subMade    bool
	paused     bool
	pausedAt   time.Time
	switched   bool
	targetUsed bool // something was written to the target
}

// Run ejects req.Project and returns nil once it serves from the target.
// On error the project serves from its source.
func (e *Ejector) Run(ctx context.Context, req Request, rep Reporter) (err error) {
	if err := req.Validate(); err != nil {
		return err
	}
	x := &run{e: e, req: req, rep: rep, ref: req.Project.Ref, name: "cascata_eject_" + randomHex(6)}
	defer func() { x.finish(err) }()
	x.phase("checks")
	if err := x.checks(ctx); err != nil {
		return fmt.Errorf("checks: %w", err)
	}
	switch req.Method {
	case Logical:
		return x.logical(ctx)
	default:
		return x.dump(ctx)
	}
}

func (x *run) phase(p string) {
	x.rep.SetPhase(p)
	if x.e.opts.OnPhase != nil {
		x.e.opts.OnPhase(x.ref, p)
	}
}

// finish resumes the project and cleans up after a failure, closes connections.
func (x *run) finish(err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if x.paused {
		x.e.opts.Pauser.Resume(x.ref)
		x.paused = false
		x.rep.Logf("resumed on the source after %s paused", time.Since(x.pausedAt).Round(time.Millisecond))
	}
	if err != nil && !x.switched {
		x.rep.Logf("ejection failed, the project serves from its source: %v", err)
		x.dropReplication(ctx)
		if x.targetUsed {
			x.rep.Logf("the target database may hold a partial copy: empty it before another attempt")
		}
	}
	for _, c := range []*pgx.Conn{x.src, x.tgt} {
		if c != nil {
			_ = c.Close(ctx)
		}
	}
}

func connect(ctx context.Context, connURL, what string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(connURL)
	if err != nil {
		return nil, fmt.Errorf("%s: parse url: %w", what, err)
	}
	cfg.ConnectTimeout = 10 * time.Second
	cfg.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return c, nil
}

// checks verifies source and target before anything is changed, and creates
// missing project roles on the target.
func (x *run) checks(ctx context.Context) error {
	var err error
	if x.src, err = connect(ctx, x.req.Project.OwnerURL, "source (owner_url)"); err != nil {
		return err
	}
	if x.req.Method == Logical {
		var wal string
		if err := x.src.QueryRow(ctx, "SHOW wal_level").Scan(&wal); err != nil {
			return fmt.Errorf("source wal_level: %w", err)
		}
		if wal != "logical" {
			return fmt.Errorf("the source has wal_level=%s; the logical method needs wal_level=logical (set it and restart the source, or use method \"dump\")", wal)
		}
	}
	if x.tgt, err = connect(ctx, x.req.TargetOwnerURL, "target (target_owner_url)"); err != nil {
		return err
	}
	lc, err := connect(ctx, x.req.TargetURL, "target (target_url)")
	if err != nil {
		return err
	}
	err = lc.QueryRow(ctx, "SELECT current_user").Scan(&x.login)
	_ = lc.Close(ctx)
	if err != nil {
		return fmt.Errorf("target (target_url): %w", err)
	}
	var sv, tv int
	if err := x.src.QueryRow(ctx, "SELECT current_setting('server_version_num')::int").Scan(&sv); err != nil {
		return fmt.Errorf("source version: %w", err)
	}
	if err := x.tgt.QueryRow(ctx, "SELECT current_setting('server_version_num')::int").Scan(&tv); err != nil {
		return fmt.Errorf("target version: %w", err)
	}
	if tv < sv {
		return fmt.Errorf("the target server (%d) is older than the source (%d)", tv, sv)
	}
	var objs []string
	if err := pgtools.QueryStrings(ctx, x.tgt, &objs, userRelationsSQL+" LIMIT 5"); err != nil {
		return fmt.Errorf("target: list relations: %w", err)
	}
	if len(objs) > 0 {
		return fmt.Errorf("the target database is not empty (it holds %s)", strings.Join(objs, ", "))
	}
	for _, bin := range []string{"pg_dump", "pg_restore"} {
		if _, err := x.bin(bin); err != nil {
			return err
		}
	}
	if x.req.Method == Logical {
		var bad []string
		if err := pgtools.QueryStrings(ctx, x.src, &bad, noReplicaIdentitySQL); err != nil {
			return fmt.Errorf("source: replica identities: %w", err)
		}
		if len(bad) > 0 {
			return fmt.Errorf("tables without a primary key or replica identity cannot be replicated logically: %s (add a primary key, set REPLICA IDENTITY FULL, or use method \"dump\")", strings.Join(bad, ", "))
		}
		for _, side := range []struct {
			name string
			c    *pgx.Conn
		}{{"source owner", x.src}, {"target owner", x.tgt}} {
			var super bool
			if err := side.c.QueryRow(ctx, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user").Scan(&super); err != nil {
				return fmt.Errorf("%s: %w", side.name, err)
			}
			if !super {
				return fmt.Errorf("the logical method needs a superuser as %s (publication for all tables, subscription)", side.name)
			}
		}
	}
	// Last, as it is the only check that changes something (on the target).
	if err := x.ensureRoles(ctx); err != nil {
		return err
	}
	x.rep.Logf("checks passed: source %d, target %d, login role %s, method %s", sv, tv, x.login, x.req.Method)
	return nil
}

// ensureRoles creates the project's roles missing on the target (NOLOGIN,
// BYPASSRLS as on the source) and makes the login role a member of each.
func (x *run) ensureRoles(ctx context.Context) error {
	for _, role := range x.req.Project.Roles {
		var exists bool
		if err := x.tgt.QueryRow(ctx, "SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)", role).Scan(&exists); err != nil {
			return fmt.Errorf("target: role %s: %w", role, err)
		}
		if !exists {
			var bypass bool
			err := x.src.QueryRow(ctx, "SELECT rolbypassrls FROM pg_roles WHERE rolname = $1", role).Scan(&bypass)
			if err != nil && !errors.Is(err, pgx.ErrNoRows) {
				return fmt.Errorf("source: role %s: %w", role, err)
			}
			attrs := "NOLOGIN"
			if bypass {
				attrs += " BYPASSRLS"
			}
			if _, err := x.tgt.Exec(ctx, "CREATE ROLE "+ident(role)+" "+attrs); err != nil {
				return fmt.Errorf("target: create role %s: %w", role, err)
			}
			x.rep.Logf("created role %s (%s) on the target", role, attrs)
		}
		var member bool
		if err := x.tgt.QueryRow(ctx, "SELECT pg_has_role($1, $2, 'MEMBER')", x.login, role).Scan(&member); err != nil {
			return fmt.Errorf("target: membership of %s in %s: %w", x.login, role, err)
		}
		if !member {
			if _, err := x.tgt.Exec(ctx, "GRANT "+ident(role)+" TO "+ident(x.login)); err != nil {
				return fmt.Errorf("target: grant %s to %s: %w", role, x.login, err)
			}
			x.rep.Logf("granted %s to %s on the target", role, x.login)
		}
	}
	return nil
}

// logical runs the logical-replication method after the checks.
func (x *run) logical(ctx context.Context) error {
	x.phase("copy_schema")
	x.targetUsed = true
	if err := x.dumpRestore(ctx, true); err != nil {
		return fmt.Errorf("copy schema: %w", err)
	}
	x.phase("replicate")
	if _, err := x.src.Exec(ctx, "CREATE PUBLICATION "+ident(x.name)+" FOR ALL TABLES"); err != nil {
		return fmt.Errorf("source: create publication: %w", err)
	}
	x.pubMade = true
	var create string
	if err := x.tgt.QueryRow(ctx, "SELECT format('CREATE SUBSCRIPTION %I CONNECTION %L PUBLICATION %I WITH (copy_data = true)', $1::text, $2::text, $1::text)",
		x.name, libpqURL(x.req.Project.OwnerURL, true)).Scan(&create); err != nil {
		return fmt.Errorf("target: %w", err)
	}
	if _, err := x.tgt.Exec(ctx, create); err != nil {
		return fmt.Errorf("target: create subscription: %w", redact(err, x.req.Project.OwnerURL))
	}
	x.subMade = true
	x.rep.Logf("publication and subscription %s created", x.name)

	x.phase("initial_sync")
	if err := x.waitSync(ctx); err != nil {
		return fmt.Errorf("initial sync: %w", err)
	}
	x.phase("catch_up")
	if err := x.waitLag(ctx); err != nil {
		return fmt.Errorf("catch up: %w", err)
	}

	x.phase("pause")
	if err := x.pause(ctx); err != nil {
		return err
	}
	x.phase("cutover")
	if err := x.waitApplied(ctx); err != nil {
		return fmt.Errorf("cutover: %w", err)
	}
	if err := x.copySequences(ctx); err != nil {
		return fmt.Errorf("cutover: sequences: %w", err)
	}
	if err := x.verifyAndSwitch(ctx); err != nil {
		return err
	}
	x.phase("cleanup")
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	x.dropReplication(cctx)
	x.phase("done")
	return nil
}

// dump runs the dump method after the checks: pause, copy, verify, switch.
func (x *run) dump(ctx context.Context) error {
	var size int64
	if err := x.src.QueryRow(ctx, "SELECT pg_database_size(current_database())").Scan(&size); err != nil {
		return fmt.Errorf("source size: %w", err)
	}
	if size > x.e.opts.MaxDumpBytes {
		return fmt.Errorf("the source database is %d MiB, more than the dump method copies (%d MiB): it pauses the project for the whole copy and waiting clients would fail with 57P03; use the logical method",
			size>>20, x.e.opts.MaxDumpBytes>>20)
	}
	x.rep.Logf("source database size %d MiB: the project stays paused for the whole copy", size>>20)
	x.phase("pause")
	if err := x.pause(ctx); err != nil {
		return err
	}
	x.phase("copy")
	x.targetUsed = true
	if err := x.dumpRestore(ctx, false); err != nil {
		return fmt.Errorf("copy: %w", err)
	}
	if err := x.verifyAndSwitch(ctx); err != nil {
		return err
	}
	x.phase("done")
	return nil
}

// pause closes the project's gate and waits for its running transactions.
func (x *run) pause(ctx context.Context) error {
	pctx, cancel := context.WithTimeout(ctx, x.e.opts.PauseTimeout)
	defer cancel()
	x.paused = true
	x.pausedAt = time.Now()
	if err := x.e.opts.Pauser.Pause(pctx, x.ref); err != nil {
		return fmt.Errorf("pause: %w", err)
	}
	x.rep.Logf("paused; running transactions finished in %s", time.Since(x.pausedAt).Round(time.Millisecond))
	return nil
}

// verifyAndSwitch compares the copy, switches the catalog and resumes.
func (x *run) verifyAndSwitch(ctx context.Context) error {
	x.phase("verify")
	if err := x.verify(ctx); err != nil {
		return fmt.Errorf("verify: %w", err)
	}
	x.phase("switch")
	from := x.req.Project.DatabaseURL
	_, err := x.e.opts.Catalog.Change(x.ref, "eject", func(p *config.Project) error {
		if p.DatabaseURL != from {
			return errors.New("the project's database_url changed during the ejection")
		}
		p.DatabaseURL = x.req.TargetURL
		p.OwnerURL = x.req.TargetOwnerURL
		p.ReplicaURLs = slices.Clone(x.req.ReplicaURLs)
		return nil
	})
	if err != nil {
		return fmt.Errorf("switch: %w", err)
	}
	x.switched = true
	x.e.opts.Pauser.Resume(x.ref)
	x.paused = false
	x.rep.Logf("switched to the target and resumed; paused for %s", time.Since(x.pausedAt).Round(time.Millisecond))
	return nil
}

// waitSync waits until every table of the subscription is synchronized.
func (x *run) waitSync(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, x.e.opts.SyncTimeout)
	defer cancel()
	var total int
	if err := x.src.QueryRow(ctx, "SELECT count(*) FROM pg_publication_tables WHERE pubname = $1", x.name).Scan(&total); err != nil {
		return fmt.Errorf("source: %w", err)
	}
	last := -1
	for {
		var known, ready, errs int
		err := x.tgt.QueryRow(ctx, `
			SELECT count(*), count(*) FILTER (WHERE r.srsubstate IN ('r', 's')),
			       coalesce((SELECT apply_error_count + sync_error_count FROM pg_stat_subscription_stats st WHERE st.subid = s.oid), 0)
			FROM pg_subscription s LEFT JOIN pg_subscription_rel r ON r.srsubid = s.oid
			WHERE s.subname = $1 GROUP BY s.oid`, x.name).Scan(&known, &ready, &errs)
		if err != nil {
			return fmt.Errorf("target stopped answering: %w", err)
		}
		if errs > 0 {
			return fmt.Errorf("the subscription on the target reports %d errors (see the target server's log)", errs)
		}
		if total > 0 {
			x.rep.SetProgress(0.8 * float64(ready) / float64(total))
		}
		if ready != last {
			x.rep.Logf("initial sync: %d of %d tables ready", ready, total)
			last = ready
		}
		if ready >= total && known >= total {
			return nil
		}
		if err := sleep(ctx, 100*time.Millisecond); err != nil {
			return err
		}
	}
}

// waitLag waits until the target applies within MaxLagBytes of the source.
func (x *run) waitLag(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, x.e.opts.SyncTimeout)
	defer cancel()
	for {
		var lag *int64
		err := x.src.QueryRow(ctx, `SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint FROM pg_stat_replication WHERE application_name = $1`, x.name).Scan(&lag)
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("source: %w", err)
		}
		if lag != nil && *lag <= x.e.opts.MaxLagBytes {
			x.rep.Logf("replication lag %d bytes", *lag)
			x.rep.SetProgress(0.85)
			return nil
		}
		// The target must still answer, or the wait is pointless.
		if err := x.tgt.Ping(ctx); err != nil {
			return fmt.Errorf("target: %w", err)
		}
		if err := sleep(ctx, 50*time.Millisecond); err != nil {
			return err
		}
	}
}

// waitApplied makes sure the target has applied every transaction the
// source committed before the pause: it writes a transactional logical
// message on the source (after every such commit in the WAL) and waits until
// the subscription's apply worker has received WAL past it. The worker
// applies messages one after the other, so by then every earlier commit is
// applied. A transaction on the target then flushes its WAL (the apply
// worker commits asynchronously).
func (x *run) waitApplied(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, x.e.opts.CatchUpTimeout)
	defer cancel()
	var mark string
	if err := x.src.QueryRow(ctx, "SELECT pg_logical_emit_message(true, 'cascata', 'cutover')::text").Scan(&mark); err != nil {
		return fmt.Errorf("source: mark: %w", err)
	}
	start := time.Now()
	for {
		var past bool
		err := x.tgt.QueryRow(ctx, "SELECT coalesce(bool_or(received_lsn > $2::pg_lsn), false) FROM pg_stat_subscription WHERE subname = $1 AND relid IS NULL", x.name, mark).Scan(&past)
		if err != nil {
			return fmt.Errorf("target: %w", err)
		}
		if past {
			break
		}
		if err := sleep(ctx, 2*time.Millisecond); err != nil {
			return fmt.Errorf("the target did not catch up with the source within %s: %w", x.e.opts.CatchUpTimeout, err)
		}
	}
	if _, err := x.tgt.Exec(ctx, "SELECT txid_current()"); err != nil {
		return fmt.Errorf("target: flush: %w", err)
	}
	x.rep.Logf("target applied the source's WAL up to %s in %s", mark, time.Since(start).Round(time.Millisecond))
	x.rep.SetProgress(0.9)
	return nil
}

// sequenceValue is a sequence's state.
type sequenceValue struct {
	last   int64
	called bool
}

func readSequence(ctx context.Context, c *pgx.Conn, seq string) (sequenceValue, error) {
	var v sequenceValue
	err := c.QueryRow(ctx, "SELECT last_value, is_called FROM "+seq).Scan(&v.last, &v.called)
	return v, err
}

// copySequences sets every sequence of the target to the source's value.
func (x *run) copySequences(ctx context.Context) error {
	var seqs []string
	if err := pgtools.QueryStrings(ctx, x.src, &seqs, sequencesSQL); err != nil {
		return fmt.Errorf("source: %w", err)
	}
	for _, s := range seqs {
		v, err := readSequence(ctx, x.src, s)
		if err != nil {
			return fmt.Errorf("source: %s: %w", s, err)
		}
		if _, err := x.tgt.Exec(ctx, "SELECT setval($1::regclass, $2, $3)", s, v.last, v.called); err != nil {
			return fmt.Errorf("target: setval %s: %w", s, err)
		}
	}
	x.rep.Logf("copied %d sequences", len(seqs))
	return nil
}

// verify compares per-table row counts and sequence values.
func (x *run) verify(ctx context.Context) error {
	var tables, seqs []string
	if err := pgtools.QueryStrings(ctx, x.src, &tables, tablesSQL); err != nil {
		return fmt.Errorf("source: %w", err)
	}
	if err := pgtools.QueryStrings(ctx, x.src, &seqs, sequencesSQL); err != nil {
		return fmt.Errorf("source: %w", err)
	}
	var srcCounts, tgtCounts []int64
	var srcSeqs, tgtSeqs []sequenceValue
	read := func(c *pgx.Conn, counts *[]int64, vals *[]sequenceValue, side string) func() error {
		return func() error {
			for _, t := range tables {
				var n int64
				if err := c.QueryRow(ctx, "SELECT count(*) FROM "+t).Scan(&n); err != nil {
					return fmt.Errorf("%s: count %s: %w", side, t, err)
				}
				*counts = append(*counts, n)
			}
			for _, s := range seqs {
				v, err := readSequence(ctx, c, s)
				if err != nil {
					return fmt.Errorf("%s: sequence %s: %w", side, s, err)
				}
				*vals = append(*vals, v)
			}
			return nil
		}
	}
	var g errgroup.Group
	g.Go(read(x.src, &srcCounts, &srcSeqs, "source"))
	g.Go(read(x.tgt, &tgtCounts, &tgtSeqs, "target"))
	if err := g.Wait(); err != nil {
		return err
	}
	var diffs []string
	var rows int64
	for i, t := range tables {
		rows += srcCounts[i]
		if srcCounts[i] != tgtCounts[i] {
			diffs = append(diffs, fmt.Sprintf("%s has %d rows on the source, %d on the target", t, srcCounts[i], tgtCounts[i]))
		}
	}
	for i, s := range seqs {
		if srcSeqs[i] != tgtSeqs[i] {
			diffs = append(diffs, fmt.Sprintf("sequence %s is %d/%t on the source, %d/%t on the target", s, srcSeqs[i].last, srcSeqs[i].called, tgtSeqs[i].last, tgtSeqs[i].called))
		}
	}
	if len(diffs) > 0 {
		return errors.New(strings.Join(diffs, "; "))
	}
	x.rep.Logf("verified %d tables (%d rows) and %d sequences", len(tables), rows, len(seqs))
	x.rep.SetProgress(0.95)
	return nil
}

// dropReplication removes the subscription (target) and the publication
// and slot (source), as far as the servers answer. Failures are logged.
func (x *run) dropReplication(ctx context.Context) {
	if x.subMade {
		if err := x.dropSubscription(ctx); err != nil {
			x.rep.Logf("warning: could not drop subscription %s on the target: %v", x.name, err)
		}
	}
	if x.subMade || x.pubMade {
		if err := x.dropSlot(ctx); err != nil {
			x.rep.Logf("warning: could not drop replication slot %s on the source: %v (drop it by hand: it retains WAL)", x.name, err)
		}
	}
	if x.pubMade {
		if err := x.execFresh(ctx, x.req.Project.OwnerURL, "source", "DROP PUBLICATION IF EXISTS "+ident(x.name)); err != nil {
			x.rep.Logf("warning: could not drop publication %s on the source: %v", x.name, err)
		} else {
			x.pubMade = false
		}
	}
}

func (x *run) dropSubscription(ctx context.Context) error {
	c, err := connect(ctx, x.req.TargetOwnerURL, "target")
	if err != nil {
		return err
	}
	defer c.Close(context.WithoutCancel(ctx))
	var exists bool
	if err := c.QueryRow(ctx, "SELECT EXISTS (SELECT FROM pg_subscription WHERE subname = $1)", x.name).Scan(&exists); err != nil {
		return err
	}
	if exists {
		// Detach the slot so that dropping works whether or not the source answers;
		// dropSlot removes it on the source.
		for _, sql := range []string{"ALTER SUBSCRIPTION %s DISABLE", "ALTER SUBSCRIPTION %s SET (slot_name = NONE)", "DROP SUBSCRIPTION %s"} {
			if _, err := c.Exec(ctx, fmt.Sprintf(sql, ident(x.name))); err != nil {
				return err
			}
		}
	}
	x.subMade = false
	return nil
}

// dropSlot drops the subscription's slot on the source, ending its walsender if needed.
func (x *run) dropSlot(ctx context.Context) error {
	c, err := connect(ctx, x.req.Project.OwnerURL, "source")
	if err != nil {
		return err
	}
	defer c.Close(context.WithoutCancel(ctx))
	for {
		var exists, active bool
		err := c.QueryRow(ctx, "SELECT true, active FROM pg_replication_slots WHERE slot_name = $1", x.name).Scan(&exists, &active)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil
		}
		if err != nil {
			return err
		}
		if active {
			_, err = c.Exec(ctx, "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active", x.name)
		} else {
			_, err = c.Exec(ctx, "SELECT pg_drop_replication_slot($1)", x.name)
		}
		if err != nil && !isCode(err, "55006", "42704") { // slot in use again / gone meanwhile
			return err
		}
		if err := sleep(ctx, 50*time.Millisecond); err != nil {
			return err
		}
	}
}

func (x *run) execFresh(ctx context.Context, connURL, what, sql string) error {
	c, err := connect(ctx, connURL, what)
	if err != nil {
		return err
	}
	defer c.Close(context.WithoutCancel(ctx))
	_, err = c.Exec(ctx, sql)
	return err
}

// dumpRestore pipes pg_dump of the source into pg_restore on the target, in
// one transaction on the target.
func (x *run) dumpRestore(ctx context.Context, schemaOnly bool) error {
	dumpBin, err := x.bin("pg_dump")
	if err != nil {
		return err
	}
	restoreBin, err := x.bin("pg_restore")
	if err != nil {
		return err
	}
	src, err := pgtools.ParseTarget(x.req.Project.OwnerURL, "")
	if err != nil {
		return fmt.Errorf("source owner URL: %w", err)
	}
	tgt, err := pgtools.ParseTarget(x.req.TargetOwnerURL, "")
	if err != nil {
		return fmt.Errorf("target owner URL: %w", err)
	}
	dumpArgs := []string{"--format=custom", "--no-publications", "--no-subscriptions", "--no-password"}
	if schemaOnly {
		dumpArgs = append(dumpArgs, "--schema-only")
	}
	dump := pgtools.Command(ctx, src, dumpBin, dumpArgs...)
	restore := pgtools.Command(ctx, tgt, restoreBin, "--no-owner", "--exit-on-error", "--single-transaction", "--no-password")
	var dumpErr, restoreErr pgtools.TailBuffer
	dump.Stderr, restore.Stderr = &dumpErr, &restoreErr
	// The parent keeps no end of the pipe: when one side dies, the other
	// sees EOF or EPIPE instead of blocking.
	pr, pw, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("pipe: %w", err)
	}
	dump.Stdout, restore.Stdin = pw, pr
	start := time.Now()
	err = dump.Start()
	if err == nil {
		if err = restore.Start(); err != nil {
			_ = dump.Process.Kill()
			_ = dump.Wait()
			err = fmt.Errorf("pg_restore: %w", err)
		}
	} else {
		err = fmt.Errorf("pg_dump: %w", err)
	}
	_ = pr.Close()
	_ = pw.Close()
	if err != nil {
		return err
	}
	derr := dump.Wait()
	rerr := restore.Wait()
	// pg_restore's failure comes first: it makes pg_dump die of a broken pipe.
	if rerr != nil {
		return fmt.Errorf("pg_restore into the target: %w: %s", rerr, restoreErr.String())
	}
	if derr != nil {
		return fmt.Errorf("pg_dump of the source: %w: %s", derr, dumpErr.String())
	}
	what := "schema and data"
	if schemaOnly {
		what = "schema"
	}
	x.rep.Logf("copied %s with pg_dump | pg_restore in %s", what, time.Since(start).Round(time.Millisecond))
	return nil
}

func (x *run) bin(name string) (string, error) {
	return pgtools.Find(x.e.opts.BinDir, "", name)
}

// pgxOnlyParams are query parameters pgx understands and libpq refuses.
var pgxOnlyParams = []string{"default_query_exec_mode", "statement_cache_capacity", "description_cache_capacity", "min_read_buffer_size"}

// libpqURL turns a connection URL into one libpq accepts: pgx-only
// parameters are removed, and so is the password unless keepPassword
// (child processes get it through PGPASSWORD instead of their arguments).
func libpqURL(s string, keepPassword bool) string {
	u, err := url.Parse(s)
	if err != nil {
		return s
	}
	q := u.Query()
	for k := range q {
		if slices.Contains(pgxOnlyParams, k) || strings.HasPrefix(k, "pool_") {
			q.Del(k)
		}
	}
	u.RawQuery = q.Encode()
	if !keepPassword && u.User != nil {
		u.User = url.User(u.User.Username())
	}
	return u.String()
}

// redact removes a URL's password from an error message.
func redact(err error, connURL string) error {
	u, perr := url.Parse(connURL)
	if perr != nil || u.User == nil {
		return err
	}
	pw, ok := u.User.Password()
	if !ok || pw == "" || !strings.Contains(err.Error(), pw) {
		return err
	}
	return errors.New(strings.ReplaceAll(err.Error(), pw, "xxxxx"))
}

const userSchemas = `n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\_toast%' AND n.nspname NOT LIKE 'pg\_temp%'
	AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')`

// userRelationsSQL lists relations that make a database non-empty.
const userRelationsSQL = `SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
	WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND ` + userSchemas + ` ORDER BY 1`

// tablesSQL lists the tables whose rows are counted.
const tablesSQL = `SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
	WHERE c.relkind = 'r' AND ` + userSchemas + ` ORDER BY 1`

// sequencesSQL lists the sequences whose values are copied and compared.
const sequencesSQL = `SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
	WHERE c.relkind = 'S' AND ` + userSchemas + ` ORDER BY 1`

// noReplicaIdentitySQL lists tables whose updates and deletes logical replication cannot carry.
const noReplicaIdentitySQL = `SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
	WHERE c.relkind = 'r' AND ` + userSchemas + `
	AND (c.relreplident = 'n' OR (c.relreplident = 'd' AND NOT EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))
	ORDER BY 1`

func ident(name string) string { return pgx.Identifier{name}.Sanitize() }

func isCode(err error, codes ...string) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && slices.Contains(codes, pe.Code)
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
