package jobs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"time"

	"cascata/internal/controldb"

	"github.com/jackc/pgx/v5"
)

// Backoff of the writer while the control database does not answer.
const (
	minBackoff = 100 * time.Millisecond
	maxBackoff = 5 * time.Second
)

// markDirty hands j to the writer; called with j.mu held (lock order:
// j.mu, then wmu; the writer never holds wmu while it takes j.mu).
func (s *shared) markDirty(j *Job) {
	s.wmu.Lock()
	s.dirty[j.st.ID] = j
	s.wmu.Unlock()
	s.poke()
}

func (s *shared) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// take empties dirty.
func (s *shared) take() []*Job {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	out := make([]*Job, 0, len(s.dirty))
	for id, j := range s.dirty {
		out = append(out, j)
		delete(s.dirty, id)
	}
	return out
}

func (s *shared) requeue(j *Job) {
	s.wmu.Lock()
	s.dirty[j.st.ID] = j
	s.wmu.Unlock()
}

// pending returns the ids of the jobs whose changes are not written.
func (s *shared) pending() []string {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	ids := make([]string, 0, len(s.dirty))
	for id := range s.dirty {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// writeLoop writes the latest state of each changed job. A job's changes
// between two writes collapse into one; while the database fails, the
// states wait in memory and are retried with a growing backoff (not on
// every change, which would hammer a database that is coming back).
func (s *shared) writeLoop() {
	defer close(s.writerDone)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	var backoff time.Duration
	for {
		if err := s.writeAll(); err != nil {
			if backoff == 0 {
				s.r.log.Warn("jobs: the control database does not take job states; they are kept here and written when it answers", "error", err)
			}
			backoff = min(max(2*backoff, minBackoff), maxBackoff)
		} else if backoff > 0 {
			s.r.log.Info("jobs: the control database takes job states again")
			backoff = 0
		}
		if s.draining.Load() && len(s.pending()) == 0 {
			return
		}
		if backoff > 0 {
			timer.Reset(backoff)
			select {
			case <-s.bg.Done():
				return
			case <-timer.C:
			}
			continue
		}
		select {
		case <-s.bg.Done():
			return
		case <-s.wake:
		}
	}
}

// writeAll writes every dirty job once; the failed ones go back to dirty.
// It returns the first failure.
func (s *shared) writeAll() error {
	var first error
	for _, j := range s.take() {
		err := s.bg.Err()
		if err == nil {
			err = s.write(j)
		}
		if err != nil {
			s.requeue(j)
			if first == nil {
				first = err
			}
		}
	}
	return first
}

// write puts j's current state in its row. Once the final state is in, the
// job leaves memory: its row says all there is.
func (s *shared) write(j *Job) error {
	j.mu.Lock()
	st, written := j.snapshotLocked(), j.written
	j.mu.Unlock()
	if written {
		return nil
	}
	if st.Log == nil {
		st.Log = []LogLine{}
	}
	logJSON, err := json.Marshal(st.Log)
	if err != nil {
		return fmt.Errorf("jobs: encode log of %s: %w", st.ID, err)
	}
	if st.Active() {
		return s.writeProgress(j, st, logJSON)
	}
	if err := s.writeFinal(st, logJSON); err != nil {
		return err
	}
	j.mu.Lock()
	j.written = true
	j.mu.Unlock()
	s.r.mu.Lock()
	delete(s.r.jobs, st.ID)
	s.r.mu.Unlock()
	return nil
}

// writeProgress updates an active job's row while it is still active and
// ours: a row another instance marked failed (this instance's heartbeat was
// late) takes no more progress, only the final state.
func (s *shared) writeProgress(j *Job, st Status, logJSON []byte) error {
	ctx, cancel := context.WithTimeout(s.bg, s.opts.QueryTimeout)
	defer cancel()
	tag, err := s.pool.Exec(ctx, `UPDATE `+jobsTable+` SET state = $3, phase = $4, progress = $5, log = $6, started = $7, result_name = $8, updated = now()
		WHERE id = $1 AND owner = $2 AND state IN ('queued', 'running')`,
		st.ID, s.opts.InstanceID, string(st.State), st.Phase, st.Progress, logJSON, nullTime(st.Started), st.ResultName)
	if err != nil {
		return fmt.Errorf("jobs: save job %s: %w", st.ID, err)
	}
	if tag.RowsAffected() == 0 && !j.gone {
		j.gone = true
		s.r.log.Warn("jobs: another instance marked this instance's job failed; it goes on here, and its final state will replace that", "job", st.ID, "project", st.Project)
	}
	return nil
}

// writeFinal writes a finished job's state and, in the same transaction,
// its result file: the row never says succeeded without its result. It
// overwrites a failure another instance recorded meanwhile, since this
// instance knows how the job really ended.
func (s *shared) writeFinal(st Status, logJSON []byte) error {
	timeout := s.opts.QueryTimeout
	if st.HasResult {
		timeout = s.opts.ResultTimeout
	}
	ctx, cancel := context.WithTimeout(s.bg, timeout)
	defer cancel()
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var state, rowErr string
		if err := tx.QueryRow(ctx, `SELECT state, error FROM `+jobsTable+` WHERE id = $1 AND owner = $2 FOR UPDATE`,
			st.ID, s.opts.InstanceID).Scan(&state, &rowErr); err != nil {
			return err
		}
		logOut := logJSON
		if State(state) != Queued && State(state) != Running {
			l := appendLog(st.Log, fmt.Sprintf("finished on instance %s after it had been marked failed: %s", s.opts.InstanceID, rowErr), s.r.opts.MaxLogLines)
			var err error
			if logOut, err = json.Marshal(l); err != nil {
				return err
			}
		}
		var size *int64
		if st.HasResult {
			var err error
			if size, err = s.storeResult(ctx, tx, st.ID); err != nil {
				return fmt.Errorf("store result: %w", err)
			}
		}
		_, err := tx.Exec(ctx, `UPDATE `+jobsTable+` SET state = $2, phase = $3, progress = $4, error = $5, log = $6,
			started = $7, finished = $8, result_name = $9, result_size = $10, updated = now() WHERE id = $1`,
			st.ID, string(st.State), st.Phase, st.Progress, st.Error, logOut, nullTime(st.Started), nullTime(st.Finished), st.ResultName, size)
		return err
	})
	if errors.Is(err, pgx.ErrNoRows) {
		s.r.log.Warn("jobs: a finished job's row was deleted (pruned) before its final state was written", "job", st.ID, "state", st.State)
		return nil
	}
	if err != nil {
		return fmt.Errorf("jobs: save final state of job %s: %w", st.ID, err)
	}
	return nil
}

// storeResult replaces job id's stored result with its result file and
// returns its size; nil when the file is gone (logged: the job then has no
// result rather than a state that can never be written).
func (s *shared) storeResult(ctx context.Context, tx pgx.Tx, id string) (*int64, error) {
	f, err := os.Open(s.r.resultPath(id))
	if errors.Is(err, os.ErrNotExist) {
		s.r.log.Error("jobs: a succeeded job's result file is gone; it is recorded without a result", "job", id)
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if _, err := tx.Exec(ctx, `DELETE FROM `+resultsTable+` WHERE job = $1`, id); err != nil {
		return nil, err
	}
	src := &chunkSource{job: id, r: f}
	if _, err := tx.CopyFrom(ctx, pgx.Identifier{controldb.Schema, "job_results"}, []string{"job", "seq", "data"}, src); err != nil {
		return nil, err
	}
	return &src.total, nil
}

// chunkSource feeds a result file to COPY as rows of resultChunk bytes.
type chunkSource struct {
	job   string
	r     io.Reader
	seq   int
	buf   []byte
	total int64
	err   error
}

func (c *chunkSource) Next() bool {
	buf := make([]byte, resultChunk)
	n, err := io.ReadFull(c.r, buf)
	if n > 0 {
		c.seq++
		c.buf = buf[:n]
		c.total += int64(n)
	}
	switch {
	case err == nil:
		return true
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return n > 0
	default:
		c.err = err
		return false
	}
}

func (c *chunkSource) Values() ([]any, error) { return []any{c.job, c.seq, c.buf}, nil }

func (c *chunkSource) Err() error { return c.err }

// nullTime is NULL for a zero time.
func nullTime(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	return &t
}
