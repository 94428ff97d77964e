package jobs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"cascata/internal/controldb"
	"cascata/internal/fleet"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// SharedOptions put a Runner's jobs in the fleet's control database, where
// every instance sees them; each job still runs on the instance that
// started it (its Func is a closure and cannot move).
type SharedOptions struct {
	// Pool is the control database ([catalog].url); the Runner does not
	// close it. Required.
	Pool *pgxpool.Pool
	// InstanceID is this instance's id in cascata_control.instances. It must
	// stay the same across restarts: the next process of the instance marks
	// failed the jobs the previous one left active. Required.
	InstanceID string
	// InstanceTimeout is how old another instance's heartbeat may grow
	// before its active jobs are marked failed ([catalog].instance_timeout).
	// Required.
	InstanceTimeout time.Duration
	// SweepInterval is how often other instances' jobs are checked;
	// 0 = InstanceTimeout/4, at least a second.
	SweepInterval time.Duration
	// QueryTimeout bounds one statement: a read by Get, List, ActiveFor or
	// Start, and one attempt of the writer; 0 = 5s.
	QueryTimeout time.Duration
	// ResultTimeout bounds storing a result file in the control database
	// (one attempt) and Result's copy of it; 0 = 10m.
	ResultTimeout time.Duration
}

// Table names, qualified: the pool's search_path is not ours to set.
const (
	jobsTable    = controldb.Schema + ".jobs"
	resultsTable = controldb.Schema + ".job_results"
	// activeIndex is the unique index that makes a project's active job
	// one across the fleet; its violation is ErrBusy.
	activeIndex = "jobs_one_active_per_project"
	// resultChunk is the size of one row of a stored result file.
	resultChunk = 1 << 20
	// cacheCleanEvery is how often result files whose job left the control
	// database are removed from Dir.
	cacheCleanEvery = time.Minute
	// startTimeout bounds New's migration and leftover marking.
	startTimeout = 10 * time.Second
	// partPattern names result files being copied from the control database.
	partPattern = ".result.part-"
)

// steps are the jobs' tables in the control database. Never edit a step
// that has shipped: append a new one.
var steps = []controldb.Step{
	// 1: jobs, one active per project (across the fleet); result files as
	// ordered bytea chunks, so that they go with their job row (no large
	// objects to unlink, no ownership of them to share between instances).
	`CREATE TABLE jobs (
		id          text PRIMARY KEY,
		kind        text NOT NULL,
		project     text NOT NULL DEFAULT '',
		state       text NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed')),
		phase       text NOT NULL DEFAULT '',
		progress    double precision NOT NULL DEFAULT 0,
		error       text NOT NULL DEFAULT '',
		log         jsonb NOT NULL DEFAULT '[]',
		created     timestamptz NOT NULL,
		started     timestamptz,
		finished    timestamptz,
		-- the instance that accepted the job and runs it
		owner       text NOT NULL,
		-- last write, on this database's clock
		updated     timestamptz NOT NULL DEFAULT now(),
		result_name text NOT NULL DEFAULT '',
		-- NULL: no result file stored
		result_size bigint
	);
	CREATE UNIQUE INDEX ` + activeIndex + ` ON jobs (project)
		WHERE state IN ('queued', 'running') AND project <> '';
	CREATE INDEX jobs_active_owner ON jobs (owner) WHERE state IN ('queued', 'running');
	CREATE INDEX jobs_created ON jobs (created);
	CREATE TABLE job_results (
		job  text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
		seq  int NOT NULL,
		data bytea NOT NULL,
		PRIMARY KEY (job, seq)
	);
	-- archives are compressed and encrypted already: do not try again
	ALTER TABLE job_results ALTER COLUMN data SET STORAGE EXTERNAL;`,
}

// Migrate creates or upgrades the jobs' tables (and the fleet's, which the
// sweep reads). New calls it; it is safe to call again.
func Migrate(ctx context.Context, pool *pgxpool.Pool) error {
	if err := fleet.Migrate(ctx, pool); err != nil {
		return fmt.Errorf("jobs: %w", err)
	}
	if err := controldb.Migrate(ctx, pool, "jobs", steps); err != nil {
		return fmt.Errorf("jobs: %w", err)
	}
	return nil
}

// shared is a Runner's store in the control database. Reads go straight to
// it; the Runner's own jobs are written by one writer goroutine, so that a
// job never waits for (or fails with) the database.
type shared struct {
	r    *Runner
	opts SharedOptions
	pool *pgxpool.Pool

	// bg ends the writer; cancelled by close.
	bg       context.Context
	bgCancel context.CancelFunc

	wmu   sync.Mutex
	dirty map[string]*Job // jobs with changes the database has not taken
	wake  chan struct{}
	// draining: Close waits for the writer to empty dirty, then it exits.
	draining   atomic.Bool
	writerDone chan struct{}

	sweepCancel context.CancelFunc
	sweepDone   chan struct{}
	// ready: the tables are migrated and this instance's leftovers failed.
	ready atomic.Bool
}

func openShared(r *Runner, opts SharedOptions) (*shared, error) {
	switch {
	case opts.Pool == nil:
		return nil, errors.New("jobs: Shared.Pool is required")
	case opts.InstanceID == "":
		return nil, errors.New("jobs: Shared.InstanceID is required")
	case opts.InstanceTimeout <= 0:
		return nil, errors.New("jobs: Shared.InstanceTimeout is required")
	}
	if opts.SweepInterval <= 0 {
		opts.SweepInterval = max(opts.InstanceTimeout/4, time.Second)
	}
	if opts.QueryTimeout <= 0 {
		opts.QueryTimeout = 5 * time.Second
	}
	if opts.ResultTimeout <= 0 {
		opts.ResultTimeout = 10 * time.Minute
	}
	s := &shared{r: r, opts: opts, pool: opts.Pool, dirty: map[string]*Job{}, wake: make(chan struct{}, 1),
		writerDone: make(chan struct{}), sweepDone: make(chan struct{})}
	// No copy is under way before New returns: parts are from a crash.
	parts, err := filepath.Glob(filepath.Join(r.opts.Dir, "*"+partPattern+"*"))
	if err != nil {
		return nil, fmt.Errorf("jobs: %w", err)
	}
	for _, p := range parts {
		_ = os.Remove(p)
	}
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	if err := s.prepare(ctx); err != nil {
		if !controldb.Unreachable(err) {
			return nil, err
		}
		// A start without the control database: the data plane serves from
		// the cached catalog; the sweep prepares the table when it answers.
		r.log.Warn("jobs: control database unreachable; jobs are available once it answers", "error", err)
	}
	s.bg, s.bgCancel = context.WithCancel(context.Background())
	sweepCtx, sweepCancel := context.WithCancel(context.Background())
	s.sweepCancel = sweepCancel
	go s.writeLoop()
	go s.sweepLoop(sweepCtx)
	return s, nil
}

// prepare migrates the jobs' tables and fails this instance's jobs a
// previous process left active.
func (s *shared) prepare(ctx context.Context) error {
	if err := Migrate(ctx, s.pool); err != nil {
		return err
	}
	left, err := s.failJobs(ctx, `SELECT id, owner, kind, project, state, phase, log FROM `+jobsTable+`
		WHERE owner = $1 AND state IN ('queued', 'running') FOR UPDATE`, []any{s.opts.InstanceID},
		func(v victim) string { return interrupted(v.state, v.phase) })
	if err != nil {
		return fmt.Errorf("jobs: mark this instance's interrupted jobs: %w", err)
	}
	for _, v := range left {
		s.r.log.Warn("job interrupted by a restart", "job", v.id, "kind", v.kind, "project", v.project, "phase", v.phase)
	}
	s.ready.Store(true)
	return nil
}

// claim inserts a new job owned by this instance; the unique index on a
// project's active job makes the check and the claim one statement.
func (s *shared) claim(st Status) error {
	ctx, cancel := context.WithTimeout(context.Background(), s.opts.QueryTimeout)
	defer cancel()
	_, err := s.pool.Exec(ctx, `INSERT INTO `+jobsTable+` (id, kind, project, state, phase, created, owner)
		VALUES ($1, $2, $3, $4, $5, $6, $7)`, st.ID, st.Kind, st.Project, string(st.State), st.Phase, st.Created, s.opts.InstanceID)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "23505" && pgErr.ConstraintName == activeIndex {
		if other, ok := s.activeFor(ctx, st.Project); ok {
			return busyError(other)
		}
		return fmt.Errorf("%w: project %s already has an active job", ErrBusy, st.Project)
	}
	if err != nil {
		return fmt.Errorf("jobs: record job %s in the control database: %w", st.ID, err)
	}
	return nil
}

const statusColumns = `id, kind, project, state, phase, progress, error, log, created, started, finished, result_name, result_size`

func scanStatus(row pgx.Row) (Status, error) {
	var (
		st                Status
		state             string
		logJSON           []byte
		started, finished *time.Time
		size              *int64
	)
	if err := row.Scan(&st.ID, &st.Kind, &st.Project, &state, &st.Phase, &st.Progress, &st.Error, &logJSON,
		&st.Created, &started, &finished, &st.ResultName, &size); err != nil {
		return Status{}, err
	}
	if err := json.Unmarshal(logJSON, &st.Log); err != nil {
		return Status{}, fmt.Errorf("job %s: log: %w", st.ID, err)
	}
	st.State = State(state)
	st.Created = st.Created.UTC()
	if started != nil {
		st.Started = started.UTC()
	}
	if finished != nil {
		st.Finished = finished.UTC()
	}
	st.HasResult = size != nil && st.State == Succeeded
	return st, nil
}

func (s *shared) get(ctx context.Context, id string) (Status, error) {
	st, err := scanStatus(s.pool.QueryRow(ctx, `SELECT `+statusColumns+` FROM `+jobsTable+` WHERE id = $1`, id))
	if errors.Is(err, pgx.ErrNoRows) {
		return Status{}, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	if err != nil {
		return Status{}, fmt.Errorf("jobs: read job %s: %w", id, err)
	}
	return st, nil
}

// list merges the fleet's jobs with local, this instance's unwritten ones
// (newer than their rows).
func (s *shared) list(ctx context.Context, local []Status) []Status {
	rows, err := s.pool.Query(ctx, `SELECT `+statusColumns+` FROM `+jobsTable)
	var all []Status
	if err == nil {
		all, err = pgx.CollectRows(rows, func(row pgx.CollectableRow) (Status, error) { return scanStatus(row) })
	}
	if err != nil {
		s.r.log.Warn("jobs: cannot list the fleet's jobs; showing this instance's", "error", err)
		return local
	}
	mine := make(map[string]Status, len(local))
	for _, st := range local {
		mine[st.ID] = st
	}
	for i, st := range all {
		if m, ok := mine[st.ID]; ok {
			all[i] = m
			delete(mine, st.ID)
		}
	}
	for _, st := range mine {
		all = append(all, st)
	}
	return all
}

func (s *shared) activeFor(ctx context.Context, project string) (Status, bool) {
	st, err := scanStatus(s.pool.QueryRow(ctx, `SELECT `+statusColumns+` FROM `+jobsTable+`
		WHERE project = $1 AND state IN ('queued', 'running') LIMIT 1`, project))
	if errors.Is(err, pgx.ErrNoRows) {
		return Status{}, false
	}
	if err != nil {
		s.r.log.Warn("jobs: cannot read the fleet's active job of a project; answering for this instance", "project", project, "error", err)
		return Status{}, false
	}
	s.r.mu.Lock()
	j, ok := s.r.jobs[st.ID]
	s.r.mu.Unlock()
	if ok {
		// This instance's own job, finished here but not yet written.
		st = j.Status()
	}
	return st, st.Active()
}

// prune deletes the oldest finished jobs of the fleet beyond Keep (their
// result chunks go with them).
func (s *shared) prune() {
	ctx, cancel := context.WithTimeout(context.Background(), s.opts.QueryTimeout)
	defer cancel()
	if _, err := s.pool.Exec(ctx, `DELETE FROM `+jobsTable+` WHERE state IN ('succeeded', 'failed') AND id NOT IN (
		SELECT id FROM `+jobsTable+` WHERE state IN ('succeeded', 'failed') ORDER BY created DESC LIMIT $1)`, s.r.opts.Keep); err != nil {
		s.r.log.Warn("jobs: prune old jobs", "error", err)
	}
}

// victim is an active job being marked failed by failJobs.
type victim struct {
	id, owner, kind, project, phase string
	state                           State
	log                             []LogLine
}

// failJobs marks failed, in one transaction, the jobs query selects (FOR
// UPDATE; columns id, owner, kind, project, state, phase, log), each with
// the error reason gives it, and returns them.
func (s *shared) failJobs(ctx context.Context, query string, args []any, reason func(victim) string) ([]victim, error) {
	var out []victim
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		out = nil
		rows, err := tx.Query(ctx, query, args...)
		if err != nil {
			return err
		}
		vs, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (victim, error) {
			var v victim
			var state string
			var logJSON []byte
			if err := row.Scan(&v.id, &v.owner, &v.kind, &v.project, &state, &v.phase, &logJSON); err != nil {
				return v, err
			}
			v.state = State(state)
			return v, json.Unmarshal(logJSON, &v.log)
		})
		if err != nil {
			return err
		}
		for _, v := range vs {
			msg := reason(v)
			logJSON, err := json.Marshal(appendLog(v.log, msg, s.r.opts.MaxLogLines))
			if err != nil {
				return fmt.Errorf("job %s: log: %w", v.id, err)
			}
			if _, err := tx.Exec(ctx, `UPDATE `+jobsTable+` SET state = 'failed', error = $2, log = $3, finished = now(), updated = now()
				WHERE id = $1`, v.id, msg, logJSON); err != nil {
				return fmt.Errorf("job %s: %w", v.id, err)
			}
		}
		out = vs
		return nil
	})
	return out, err
}

// sweepLoop marks failed, every SweepInterval, the active jobs of other
// instances that stopped, and now and then removes copied result files of
// jobs that left the control database.
func (s *shared) sweepLoop(ctx context.Context) {
	defer close(s.sweepDone)
	t := time.NewTicker(s.opts.SweepInterval)
	defer t.Stop()
	var cleaned time.Time
	failing := false // only the first failure of a run is logged
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		var err error
		if !s.ready.Load() {
			err = s.prepare(ctx)
		}
		if err == nil {
			err = s.sweep(ctx)
		}
		switch {
		case ctx.Err() != nil:
			return
		case err != nil && !failing:
			s.r.log.Warn("jobs: cannot check other instances' jobs; retrying", "error", err)
		case err == nil && failing:
			s.r.log.Info("jobs: checking other instances' jobs again")
		}
		failing = err != nil
		if time.Since(cleaned) >= cacheCleanEvery {
			cleaned = time.Now()
			if err := s.cleanResults(ctx); err != nil && ctx.Err() == nil {
				s.r.log.Warn("jobs: cannot clean copied result files", "error", err)
			}
		}
	}
}

// sweep fails the active jobs whose owner is not live: its heartbeat is
// older than InstanceTimeout or its row says stopped, or it has no row and
// the job has not been written to for InstanceTimeout. SKIP LOCKED leaves a
// job its owner is writing right now for the next round.
func (s *shared) sweep(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.opts.QueryTimeout)
	defer cancel()
	timeout := s.opts.InstanceTimeout
	swept, err := s.failJobs(ctx, `SELECT j.id, j.owner, j.kind, j.project, j.state, j.phase, j.log
		FROM `+jobsTable+` j LEFT JOIN `+controldb.Schema+`.instances i ON i.id = j.owner
		WHERE j.state IN ('queued', 'running') AND j.owner <> $2
		  AND CASE WHEN i.id IS NULL THEN j.updated < now() - $1::interval ELSE NOT `+fleet.LiveSQL+` END
		FOR UPDATE OF j SKIP LOCKED`, []any{timeout, s.opts.InstanceID},
		func(v victim) string {
			return fmt.Sprintf("instance %s stopped while the job ran (no heartbeat for %s)", v.owner, timeout)
		})
	if err != nil {
		return fmt.Errorf("sweep: %w", err)
	}
	for _, v := range swept {
		s.r.log.Warn("job of a stopped instance marked failed", "job", v.id, "kind", v.kind, "project", v.project, "owner", v.owner, "phase", v.phase)
	}
	return nil
}

// cleanResults removes the result files in Dir whose job is no longer a
// succeeded one with a result in the control database, except this
// instance's jobs still in memory.
func (s *shared) cleanResults(ctx context.Context) error {
	names, err := filepath.Glob(filepath.Join(s.r.opts.Dir, "*.result"))
	if err != nil || len(names) == 0 {
		return err
	}
	s.r.mu.Lock()
	ids := make([]string, 0, len(names))
	for _, n := range names {
		id := strings.TrimSuffix(filepath.Base(n), ".result")
		if _, mine := s.r.jobs[id]; !mine {
			ids = append(ids, id)
		}
	}
	s.r.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, s.opts.QueryTimeout)
	defer cancel()
	rows, err := s.pool.Query(ctx, `SELECT id FROM `+jobsTable+` WHERE id = ANY($1) AND state = 'succeeded' AND result_size IS NOT NULL`, ids)
	if err != nil {
		return err
	}
	keep, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return err
	}
	for _, id := range ids {
		if !slices.Contains(keep, id) {
			_ = os.Remove(s.r.resultPath(id))
		}
	}
	return nil
}

// localResult makes sure path holds the result file of job id: this
// instance's own file, or a copy it made before, or a new copy from the
// control database (written aside and renamed, so a reader never sees part
// of one).
func (s *shared) localResult(ctx context.Context, id, path string) (err error) {
	if fi, err := os.Stat(path); err == nil && fi.Mode().IsRegular() {
		return nil
	}
	f, err := os.CreateTemp(s.r.opts.Dir, id+partPattern+"*")
	if err != nil {
		return fmt.Errorf("jobs: copy result of %s: %w", id, err)
	}
	defer func() {
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("jobs: copy result of %s: %w", id, cerr)
		}
		if err != nil {
			_ = os.Remove(f.Name())
		}
	}()
	err = pgx.BeginTxFunc(ctx, s.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		var size *int64
		err := tx.QueryRow(ctx, `SELECT result_size FROM `+jobsTable+` WHERE id = $1 AND state = 'succeeded'`, id).Scan(&size)
		if errors.Is(err, pgx.ErrNoRows) || (err == nil && size == nil) {
			return fmt.Errorf("%w: job %s", ErrNoResult, id)
		}
		if err != nil {
			return err
		}
		rows, err := tx.Query(ctx, `SELECT data FROM `+resultsTable+` WHERE job = $1 ORDER BY seq`, id)
		if err != nil {
			return err
		}
		defer rows.Close()
		var n int64
		for rows.Next() {
			var b []byte
			if err := rows.Scan(&b); err != nil {
				return err
			}
			if _, err := f.Write(b); err != nil {
				return err
			}
			n += int64(len(b))
		}
		if err := rows.Err(); err != nil {
			return err
		}
		if n != *size {
			return fmt.Errorf("stored result is %d bytes, its job says %d", n, *size)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("jobs: copy result of %s from the control database: %w", id, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("jobs: copy result of %s: %w", id, err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("jobs: copy result of %s: %w", id, err)
	}
	return nil
}

// close stops the sweep, lets the writer write what it holds until ctx
// ends, then stops it; unwritten final states are an error. Calling it
// again returns at once.
func (s *shared) close(ctx context.Context) error {
	s.sweepCancel()
	<-s.sweepDone
	s.draining.Store(true)
	s.poke()
	select {
	case <-s.writerDone:
	case <-ctx.Done():
		s.bgCancel()
		<-s.writerDone
	}
	s.bgCancel()
	if ids := s.pending(); len(ids) > 0 {
		cause := ctx.Err()
		if cause == nil {
			cause = errors.New("changed after the writer stopped")
		}
		return fmt.Errorf("jobs: close: the state of jobs %s is not in the control database: %w", strings.Join(ids, ", "), cause)
	}
	return nil
}
