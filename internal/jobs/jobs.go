// Package jobs runs Cascata's long operations (ejection, archive export and
// import) beside the data plane: bounded concurrency, a state, a phase, a
// progress, log lines, a final error and an optional result file per job.
//
// Every job is persisted in its directory (one JSON file per job, replaced
// atomically), so a job that was queued or running when the process stopped
// is reported as failed by the next process. With Options.Shared the jobs of
// a whole fleet live in its control database instead (see shared.go).
package jobs

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"cascata/internal/catalog"
)

// State is where a job is in its life.
type State string

// The states of a job.
const (
	Queued    State = "queued"
	Running   State = "running"
	Succeeded State = "succeeded"
	Failed    State = "failed"
)

// Errors callers can test with errors.Is.
var (
	// ErrBusy: the project already has a queued or running job, or the queue is full.
	ErrBusy = errors.New("busy")
	// ErrNotFound: no job with that id.
	ErrNotFound = errors.New("job not found")
	// ErrNoResult: the job has not (yet) produced a result file.
	ErrNoResult = errors.New("job has no result")
	// ErrClosed: the runner is closed.
	ErrClosed = errors.New("job runner closed")
)

// Func is a job's work. It runs in its own goroutine with a context that
// ends when the runner closes; its error becomes the job's error.
type Func func(ctx context.Context, j *Job) error

// LogLine is one line of a job's log.
type LogLine struct {
	Time    time.Time `json:"time"`
	Message string    `json:"message"`
}

// Status is a snapshot of a job, as persisted and shown by the admin plane.
type Status struct {
	ID         string    `json:"id"`
	Kind       string    `json:"kind"`
	Project    string    `json:"project"`
	State      State     `json:"state"`
	Phase      string    `json:"phase"`
	Progress   float64   `json:"progress"`
	Error      string    `json:"error,omitempty"`
	Log        []LogLine `json:"log,omitempty"`
	Created    time.Time `json:"created"`
	Started    time.Time `json:"started,omitzero"`
	Finished   time.Time `json:"finished,omitzero"`
	HasResult  bool      `json:"has_result"`
	ResultName string    `json:"result_name,omitempty"`
}

// Active reports whether the job is queued or running.
func (s Status) Active() bool { return s.State == Queued || s.State == Running }

// Options configure a Runner.
type Options struct {
	// Dir holds the job files and result files; created if missing. Required.
	Dir string
	// Concurrency is how many jobs run at once; 0 = 2.
	Concurrency int
	// MaxQueued is how many jobs may wait; 0 = 64.
	MaxQueued int
	// MaxLogLines is how many log lines a job keeps (the newest); 0 = 500.
	MaxLogLines int
	// Keep is how many finished jobs are kept on disk; 0 = 200.
	Keep int
	// Logger; nil discards.
	Logger *slog.Logger
	// Shared, when set, keeps the jobs in the fleet's control database
	// instead of Dir, which then holds only result files (this instance's
	// own, and copies of other instances' results it served).
	Shared *SharedOptions
}

// Runner runs jobs. Close stops it.
type Runner struct {
	opts Options
	log  *slog.Logger
	sem  chan struct{}

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// shared is the control database store; nil in file mode.
	shared *shared

	mu sync.Mutex
	// jobs are every job in file mode; in shared mode only this instance's
	// own jobs whose final state is not in the control database yet.
	jobs   map[string]*Job
	queued int
	closed bool
}

// Job is a running job, handed to its Func to report phase, progress, log
// lines and a result file.
type Job struct {
	r  *Runner
	mu sync.Mutex
	st Status
	// lastSave throttles persisting progress-only updates.
	lastSave time.Time
	// written: the final state is in the control database (shared mode);
	// later changes are not saved again.
	written bool
	// gone: the row no longer accepts progress (another instance marked
	// it failed); read and set by the shared writer only.
	gone bool
}

// New opens the job directory: jobs a previous process left queued or
// running are marked failed. With opts.Shared it migrates the control
// database and marks this instance's leftover active jobs failed instead.
func New(opts Options) (*Runner, error) {
	if opts.Dir == "" {
		return nil, errors.New("jobs: Dir is required")
	}
	if opts.Concurrency <= 0 {
		opts.Concurrency = 2
	}
	if opts.MaxQueued <= 0 {
		opts.MaxQueued = 64
	}
	if opts.MaxLogLines <= 0 {
		opts.MaxLogLines = 500
	}
	if opts.Keep <= 0 {
		opts.Keep = 200
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("jobs: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &Runner{opts: opts, log: opts.Logger, sem: make(chan struct{}, opts.Concurrency), ctx: ctx, cancel: cancel, jobs: map[string]*Job{}}
	if opts.Shared != nil {
		s, err := openShared(r, *opts.Shared)
		if err != nil {
			cancel()
			return nil, err
		}
		r.shared = s
		return r, nil
	}
	if err := r.load(); err != nil {
		cancel()
		return nil, err
	}
	return r, nil
}

func (r *Runner) load() error {
	names, err := filepath.Glob(filepath.Join(r.opts.Dir, "*.json"))
	if err != nil {
		return fmt.Errorf("jobs: %w", err)
	}
	for _, name := range names {
		data, err := os.ReadFile(name)
		if err != nil {
			return fmt.Errorf("jobs: %w", err)
		}
		var st Status
		if err := json.Unmarshal(data, &st); err != nil || st.ID == "" {
			r.log.Warn("jobs: skipping unreadable job file", "file", name, "error", err)
			continue
		}
		j := &Job{r: r, st: st}
		if st.Active() {
			j.st.State = Failed
			j.st.Error = interrupted(st.State, st.Phase)
			j.st.Finished = time.Now().UTC()
			j.appendLogLocked(j.st.Error)
			if err := j.saveLocked(); err != nil {
				return err
			}
			r.log.Warn("job interrupted by a restart", "job", st.ID, "kind", st.Kind, "project", st.Project, "phase", st.Phase)
		}
		r.jobs[st.ID] = j
	}
	return nil
}

// interrupted is the error of a job its own instance left active when it
// stopped, as the next process of that instance reports it.
func interrupted(state State, phase string) string {
	return fmt.Sprintf("interrupted: cascata stopped while the job was %s (phase %q)", state, phase)
}

// Start queues a job of kind for project ("" for none) and returns its
// status. A project has at most one active job: another is ErrBusy. In
// shared mode that holds across the fleet, and this instance runs the job.
func (r *Runner) Start(kind, project string, fn Func) (Status, error) {
	id, err := newID()
	if err != nil {
		return Status{}, err
	}
	j := &Job{r: r, st: Status{ID: id, Kind: kind, Project: project, State: Queued, Phase: "queued", Created: time.Now().UTC()}}
	st := j.Status()
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return Status{}, ErrClosed
	}
	if project != "" {
		for _, o := range r.jobs {
			if ost := o.Status(); ost.Project == project && ost.Active() {
				r.mu.Unlock()
				return Status{}, busyError(ost)
			}
		}
	}
	if r.queued >= r.opts.MaxQueued {
		r.mu.Unlock()
		return Status{}, fmt.Errorf("%w: %d jobs are queued", ErrBusy, r.queued)
	}
	if r.shared == nil {
		// The file is written under r.mu, so the project check above and
		// this claim are one step.
		j.mu.Lock()
		err = j.saveLocked()
		j.mu.Unlock()
		if err != nil {
			r.mu.Unlock()
			return Status{}, err
		}
		r.jobs[id] = j
	}
	// Counted before the lock is let go, so that Close (which waits for
	// r.wg once closed is set) never races with this Add.
	r.queued++
	r.wg.Add(1)
	r.mu.Unlock()
	if r.shared != nil {
		// The control database's unique index on active jobs decides
		// between instances (and between concurrent Starts here).
		if err := r.shared.claim(st); err != nil {
			r.mu.Lock()
			r.queued--
			r.mu.Unlock()
			r.wg.Done()
			return Status{}, err
		}
		r.mu.Lock()
		r.jobs[id] = j
		r.mu.Unlock()
	}
	r.prune()
	go r.run(j, fn)
	return st, nil
}

func busyError(st Status) error {
	return fmt.Errorf("%w: project %s already has %s job %s (%s)", ErrBusy, st.Project, st.Kind, st.ID, st.State)
}

func (r *Runner) run(j *Job, fn Func) {
	defer r.wg.Done()
	select {
	case r.sem <- struct{}{}:
	case <-r.ctx.Done():
		r.mu.Lock()
		r.queued--
		r.mu.Unlock()
		j.finish(fmt.Errorf("cancelled before it started: %w", r.ctx.Err()))
		return
	}
	defer func() { <-r.sem }()
	r.mu.Lock()
	r.queued--
	r.mu.Unlock()
	j.mu.Lock()
	j.st.State = Running
	j.st.Started = time.Now().UTC()
	j.st.Phase = "starting"
	j.saveAndLog()
	j.mu.Unlock()
	r.log.Info("job started", "job", j.st.ID, "kind", j.st.Kind, "project", j.st.Project)
	err := func() (err error) {
		defer func() {
			if p := recover(); p != nil {
				err = fmt.Errorf("job panicked: %v", p)
			}
		}()
		return fn(r.ctx, j)
	}()
	j.finish(err)
}

// Get returns a job's status. In shared mode it reads the control database
// (bounded by SharedOptions.QueryTimeout), except for this instance's own
// jobs whose final state is not written yet: their memory is newer.
func (r *Runner) Get(id string) (Status, error) {
	ctx, cancel := r.queryContext(context.Background())
	defer cancel()
	return r.get(ctx, id)
}

func (r *Runner) get(ctx context.Context, id string) (Status, error) {
	r.mu.Lock()
	j, ok := r.jobs[id]
	r.mu.Unlock()
	if ok {
		return j.Status(), nil
	}
	if r.shared != nil {
		return r.shared.get(ctx, id)
	}
	return Status{}, fmt.Errorf("%w: %s", ErrNotFound, id)
}

// queryContext bounds one read of the control database; in file mode
// nothing blocks, and ctx is returned as is.
func (r *Runner) queryContext(ctx context.Context) (context.Context, context.CancelFunc) {
	if r.shared == nil {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, r.shared.opts.QueryTimeout)
}

// local returns the statuses of the jobs held in memory.
func (r *Runner) local() []Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]Status, 0, len(r.jobs))
	for _, j := range r.jobs {
		out = append(out, j.Status())
	}
	return out
}

// List returns every known job, newest first. In shared mode these are the
// fleet's jobs; when the control database cannot be read, only this
// instance's unwritten ones (the failure is logged).
func (r *Runner) List() []Status {
	out := r.local()
	if r.shared != nil {
		ctx, cancel := r.queryContext(context.Background())
		defer cancel()
		out = r.shared.list(ctx, out)
	}
	slices.SortFunc(out, func(a, b Status) int { return b.Created.Compare(a.Created) })
	return out
}

// ActiveFor returns the queued or running job of a project, if any. In
// shared mode it looks across the fleet; when the control database cannot
// be read it answers from this instance's jobs alone (the failure is logged).
func (r *Runner) ActiveFor(project string) (Status, bool) {
	for _, st := range r.local() {
		if st.Project == project && st.Active() {
			return st, true
		}
	}
	if r.shared == nil {
		return Status{}, false
	}
	ctx, cancel := r.queryContext(context.Background())
	defer cancel()
	return r.shared.activeFor(ctx, project)
}

// Result returns the path of a succeeded job's result file and its name.
// In shared mode a result another instance produced is first copied from
// the control database into Dir (bounded by SharedOptions.ResultTimeout);
// ResultContext takes the caller's context instead.
func (r *Runner) Result(id string) (path, name string, err error) {
	ctx := context.Background()
	if r.shared != nil {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, r.shared.opts.ResultTimeout)
		defer cancel()
	}
	return r.ResultContext(ctx, id)
}

// ResultContext is Result with a context that bounds reading the control
// database and copying another instance's result file from it.
func (r *Runner) ResultContext(ctx context.Context, id string) (path, name string, err error) {
	qctx, cancel := r.queryContext(ctx)
	st, err := r.get(qctx, id)
	cancel()
	if err != nil {
		return "", "", err
	}
	if st.State != Succeeded || !st.HasResult {
		return "", "", fmt.Errorf("%w: job %s is %s", ErrNoResult, id, st.State)
	}
	path = r.resultPath(id)
	if r.shared != nil {
		if err := r.shared.localResult(ctx, id, path); err != nil {
			return "", "", err
		}
	}
	return path, st.ResultName, nil
}

// Wait blocks until the job is no longer active or ctx ends. In shared mode
// a control database that does not answer is waited out too.
func (r *Runner) Wait(ctx context.Context, id string) (Status, error) {
	every := 20 * time.Millisecond
	if r.shared != nil {
		every = 100 * time.Millisecond
	}
	t := time.NewTicker(every)
	defer t.Stop()
	var last Status
	var lastErr error
	for {
		qctx, cancel := r.queryContext(ctx)
		st, err := r.get(qctx, id)
		cancel()
		switch {
		case err == nil && !st.Active():
			return st, nil
		case err == nil:
			last, lastErr = st, nil
		case r.shared == nil || errors.Is(err, ErrNotFound):
			return st, err
		default:
			lastErr = err
		}
		select {
		case <-ctx.Done():
			if lastErr != nil {
				return last, fmt.Errorf("wait for job %s: %w (last error: %w)", id, ctx.Err(), lastErr)
			}
			return last, fmt.Errorf("wait for job %s: %w", id, ctx.Err())
		case <-t.C:
		}
	}
}

// Close cancels running and queued jobs and waits for them until ctx ends.
// In shared mode it then writes the final states the control database has
// not taken yet, retrying until ctx ends, and stops the sweep.
func (r *Runner) Close(ctx context.Context) error {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	r.cancel()
	done := make(chan struct{})
	go func() { r.wg.Wait(); close(done) }()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = fmt.Errorf("jobs: close: jobs still running: %w", ctx.Err())
	}
	if r.shared != nil {
		err = errors.Join(err, r.shared.close(ctx))
	}
	return err
}

// prune removes the oldest finished jobs beyond Keep.
func (r *Runner) prune() {
	if r.shared != nil {
		r.shared.prune()
		return
	}
	r.mu.Lock()
	var done []Status
	for _, j := range r.jobs {
		if st := j.Status(); !st.Active() {
			done = append(done, st)
		}
	}
	if len(done) <= r.opts.Keep {
		r.mu.Unlock()
		return
	}
	slices.SortFunc(done, func(a, b Status) int { return a.Created.Compare(b.Created) })
	victims := done[:len(done)-r.opts.Keep]
	for _, st := range victims {
		delete(r.jobs, st.ID)
	}
	r.mu.Unlock()
	for _, st := range victims {
		_ = os.Remove(r.jobPath(st.ID))
		_ = os.Remove(r.resultPath(st.ID))
	}
}

func (r *Runner) jobPath(id string) string    { return filepath.Join(r.opts.Dir, id+".json") }
func (r *Runner) resultPath(id string) string { return filepath.Join(r.opts.Dir, id+".result") }

// ID is the job's id.
func (j *Job) ID() string { return j.st.ID }

// Project is the job's project ref.
func (j *Job) Project() string { return j.st.Project }

// Status returns a snapshot of the job.
func (j *Job) Status() Status {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.snapshotLocked()
}

func (j *Job) snapshotLocked() Status {
	st := j.st
	st.Log = slices.Clone(j.st.Log)
	return st
}

// SetPhase names what the job does now and logs it.
func (j *Job) SetPhase(phase string) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.st.Phase = phase
	j.appendLogLocked("phase: " + phase)
	j.saveAndLog()
}

// SetProgress sets the progress, a fraction from 0 to 1.
func (j *Job) SetProgress(f float64) {
	f = min(max(f, 0), 1)
	j.mu.Lock()
	defer j.mu.Unlock()
	j.st.Progress = f
	if time.Since(j.lastSave) >= time.Second {
		j.saveAndLog()
	}
}

// Logf adds a line to the job's log.
func (j *Job) Logf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	j.mu.Lock()
	defer j.mu.Unlock()
	j.appendLogLocked(msg)
	j.saveAndLog()
	j.r.log.Info("job: "+msg, "job", j.st.ID, "project", j.st.Project)
}

// ResultFile is the path where the job writes its result file, if it has
// one; name is what a download calls it (e.g. "demo.caf"). The file counts
// once the job succeeds.
func (j *Job) ResultFile(name string) string {
	j.mu.Lock()
	j.st.ResultName = name
	j.mu.Unlock()
	return j.r.resultPath(j.st.ID)
}

func (j *Job) appendLogLocked(msg string) {
	j.st.Log = appendLog(j.st.Log, msg, j.r.opts.MaxLogLines)
}

// appendLog adds a line and keeps the newest keep lines.
func appendLog(log []LogLine, msg string, keep int) []LogLine {
	log = append(log, LogLine{Time: time.Now().UTC(), Message: strings.TrimSpace(msg)})
	if n := len(log) - keep; n > 0 {
		log = slices.Delete(log, 0, n)
	}
	return log
}

func (j *Job) finish(err error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.st.Finished = time.Now().UTC()
	if err != nil {
		j.st.State = Failed
		j.st.Error = err.Error()
		j.appendLogLocked("failed: " + err.Error())
		j.r.log.Warn("job failed", "job", j.st.ID, "kind", j.st.Kind, "project", j.st.Project, "phase", j.st.Phase, "error", err)
	} else {
		j.st.State = Succeeded
		j.st.Progress = 1
		if fi, serr := os.Stat(j.r.resultPath(j.st.ID)); serr == nil && fi.Mode().IsRegular() {
			j.st.HasResult = true
		}
		j.appendLogLocked("succeeded")
		j.r.log.Info("job succeeded", "job", j.st.ID, "kind", j.st.Kind, "project", j.st.Project)
	}
	j.saveAndLog()
}

// saveAndLog persists the job; a failure is logged (the job goes on: its
// in-memory status stays right, and a restart reports it as interrupted).
// In shared mode the job is handed to the writer, which never blocks it.
func (j *Job) saveAndLog() {
	if s := j.r.shared; s != nil {
		j.lastSave = time.Now()
		if !j.written {
			s.markDirty(j)
		}
		return
	}
	if err := j.saveLocked(); err != nil {
		j.r.log.Error("jobs: persist failed", "job", j.st.ID, "error", err)
	}
}

func (j *Job) saveLocked() error {
	data, err := json.Marshal(j.st)
	if err != nil {
		return fmt.Errorf("jobs: encode %s: %w", j.st.ID, err)
	}
	j.lastSave = time.Now()
	return catalog.WriteFileAtomic(j.r.jobPath(j.st.ID), data, 0o600)
}

func newID() (string, error) {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("jobs: random id: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}
