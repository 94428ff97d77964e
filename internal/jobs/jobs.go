// Package jobs runs Cascata's long operations (ejection, archive export and
// import) beside the data plane: bounded concurrency, a state, a phase, a
// progress, log lines, a final error and an optional result file per job.
//
// Every job is persisted in its directory (one JSON file per job, replaced
// atomically), so a job that was queued or running when the process stopped
// is reported as failed by the next process.
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
}

// Runner runs jobs. Close stops it.
type Runner struct {
	opts Options
	log  *slog.Logger
	sem  chan struct{}

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
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
}

// New opens the job directory: jobs a previous process left queued or
// running are marked failed.
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
			j.st.Error = fmt.Sprintf("interrupted: cascata stopped while the job was %s (phase %q)", st.State, st.Phase)
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

// Start queues a job of kind for project ("" for none) and returns its
// status. A project has at most one active job: another is ErrBusy.
func (r *Runner) Start(kind, project string, fn Func) (Status, error) {
	id, err := newID()
	if err != nil {
		return Status{}, err
	}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return Status{}, ErrClosed
	}
	if project != "" {
		for _, j := range r.jobs {
			if st := j.Status(); st.Project == project && st.Active() {
				r.mu.Unlock()
				return Status{}, fmt.Errorf("%w: project %s already has %s job %s (%s)", ErrBusy, project, st.Kind, st.ID, st.State)
			}
		}
	}
	if r.queued >= r.opts.MaxQueued {
		r.mu.Unlock()
		return Status{}, fmt.Errorf("%w: %d jobs are queued", ErrBusy, r.queued)
	}
	j := &Job{r: r, st: Status{ID: id, Kind: kind, Project: project, State: Queued, Phase: "queued", Created: time.Now().UTC()}}
	j.mu.Lock()
	err = j.saveLocked()
	st := j.snapshotLocked()
	j.mu.Unlock()
	if err != nil {
		r.mu.Unlock()
		return Status{}, err
	}
	r.jobs[id] = j
	r.queued++
	r.wg.Add(1)
	r.mu.Unlock()
	r.prune()
	go r.run(j, fn)
	return st, nil
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

// Get returns a job's status.
func (r *Runner) Get(id string) (Status, error) {
	r.mu.Lock()
	j, ok := r.jobs[id]
	r.mu.Unlock()
	if !ok {
		return Status{}, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	return j.Status(), nil
}

// List returns every known job, newest first.
func (r *Runner) List() []Status {
	r.mu.Lock()
	out := make([]Status, 0, len(r.jobs))
	for _, j := range r.jobs {
		out = append(out, j.Status())
	}
	r.mu.Unlock()
	slices.SortFunc(out, func(a, b Status) int { return b.Created.Compare(a.Created) })
	return out
}

// ActiveFor returns the queued or running job of a project, if any.
func (r *Runner) ActiveFor(project string) (Status, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, j := range r.jobs {
		if st := j.Status(); st.Project == project && st.Active() {
			return st, true
		}
	}
	return Status{}, false
}

// Result returns the path of a succeeded job's result file and its name.
func (r *Runner) Result(id string) (path, name string, err error) {
	st, err := r.Get(id)
	if err != nil {
		return "", "", err
	}
	if st.State != Succeeded || !st.HasResult {
		return "", "", fmt.Errorf("%w: job %s is %s", ErrNoResult, id, st.State)
	}
	return r.resultPath(id), st.ResultName, nil
}

// Wait blocks until the job is no longer active or ctx ends.
func (r *Runner) Wait(ctx context.Context, id string) (Status, error) {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		st, err := r.Get(id)
		if err != nil || !st.Active() {
			return st, err
		}
		select {
		case <-ctx.Done():
			return st, fmt.Errorf("wait for job %s: %w", id, ctx.Err())
		case <-t.C:
		}
	}
}

// Close cancels running and queued jobs and waits for them until ctx ends.
func (r *Runner) Close(ctx context.Context) error {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	r.cancel()
	done := make(chan struct{})
	go func() { r.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("jobs: close: jobs still running: %w", ctx.Err())
	}
}

// prune removes the oldest finished jobs beyond Keep.
func (r *Runner) prune() {
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
	j.st.Log = append(j.st.Log, LogLine{Time: time.Now().UTC(), Message: strings.TrimSpace(msg)})
	if n := len(j.st.Log) - j.r.opts.MaxLogLines; n > 0 {
		j.st.Log = slices.Delete(j.st.Log, 0, n)
	}
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
func (j *Job) saveAndLog() {
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
