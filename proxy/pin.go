package proxy

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"

	"cascata/internal/stats"

	"github.com/jackc/pgx/v5/pgproto3"
)

// Pinning: session state a client keeps in transaction mode.
//
// A client that creates state meant to outlive its transaction (a
// temporary table, LISTEN, a WITH HOLD cursor, a session advisory lock)
// keeps its backend while that state exists, as in session mode: the
// backend serves no other client, notifications reach the client as they
// come, and at each idle ReadyForQuery the proxy looks at the backend
// (sessionStateSQL) to learn whether the state is gone, which gives the
// backend back to the pool. At most max_pinned clients of a project are
// pinned at once; the slot is taken when the statement is classified,
// waiting up to query_wait_timeout for one to be given back, so a client
// past the bound gets an error before anything runs.

// pinCount counts a project's pinned clients (kept across reloads).
type pinCount struct {
	mu      sync.Mutex
	n       int
	waiting int           // clients waiting for a slot
	freed   chan struct{} // closed when a slot is given back, nil if no one waits
}

// take takes a slot, waiting until ctx ends for one while max are taken.
func (pc *pinCount) take(ctx context.Context, max int) bool {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	for pc.n >= max {
		if pc.freed == nil {
			pc.freed = make(chan struct{})
		}
		ch := pc.freed
		pc.waiting++
		pc.mu.Unlock()
		var done bool
		select {
		case <-ch:
		case <-ctx.Done():
			done = true
		}
		pc.mu.Lock()
		pc.waiting--
		if done {
			return false
		}
	}
	pc.n++
	return true
}

// tryTake takes a slot if fewer than max are taken.
func (pc *pinCount) tryTake(max int) bool {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if pc.n >= max {
		return false
	}
	pc.n++
	return true
}

func (pc *pinCount) give() {
	pc.mu.Lock()
	pc.n--
	if pc.freed != nil {
		close(pc.freed)
		pc.freed = nil
	}
	pc.mu.Unlock()
}

// counts returns the slots taken and the clients waiting for one.
func (pc *pinCount) counts() (taken, waiting int) {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	return pc.n, pc.waiting
}

// tooManyPinned is the error of a statement that would pin one client more
// than max_pinned.
func tooManyPinned(ref string, max int) error {
	return &Error{Code: CodeTooManyConnections,
		Message: fmt.Sprintf("project %q has max_pinned = %d clients keeping a server connection for session state, and none gave one back within query_wait_timeout", ref, max),
		Detail:  "Temporary tables, LISTEN, WITH HOLD cursors and session advisory locks keep a server connection for their client in transaction mode.",
		Hint:    "Drop the state when done (DROP TABLE, UNLISTEN, CLOSE, pg_advisory_unlock), end idle clients that hold it, or raise the project's max_pinned (at most its pool_size)."}
}

// sessionStateSQL counts, on the backend, the session state a pinned
// client may keep: temporary relations, types and functions, WITH HOLD
// cursors, LISTEN channels and session advisory locks. Everything is
// qualified, and compared with pg_catalog's operators, so nothing the
// client defined changes its meaning.
const sessionStateSQL = "SET LOCAL statement_timeout = 0; SELECT " +
	"(SELECT pg_catalog.count(*) FROM pg_catalog.pg_class c WHERE c.relnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema())" +
	" OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_catalog.pg_type t WHERE t.typnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema())" +
	" OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_catalog.pg_proc p WHERE p.pronamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema())" +
	" OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_catalog.pg_cursors WHERE is_holdable)" +
	" OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_catalog.pg_listening_channels())" +
	" OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_catalog.pg_locks l WHERE l.locktype OPERATOR(pg_catalog.=) 'advisory' AND l.pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid())"

// keepsSessionState reports whether the backend holds session state a
// client may keep (see sessionStateSQL). It runs on the relay's goroutine,
// between the client's units, with the client's writer locked: a
// notification that arrives meanwhile goes to the client as it would have.
func (ss *session) keepsSessionState(be *backend) (bool, error) {
	notify := ss.wr
	if ss.clientGone.Load() {
		notify = nil
	}
	rows, err := be.simpleQueryTo(notify, sessionStateSQL)
	if err != nil {
		return false, fmt.Errorf("session state check: %w", err)
	}
	if len(rows) != 1 || len(rows[0]) != 1 || rows[0][0] == nil {
		return false, errors.New("session state check: unexpected answer")
	}
	return *rows[0][0] != "0", nil
}

// reservePin takes a slot of the project's max_pinned for a statement that
// creates state the client keeps, waiting up to query_wait_timeout for one,
// or returns the error the statement gets instead. A client holds one slot
// at most. The client goroutine calls it, without mu: the relay goes on
// meanwhile.
func (ss *session) reservePin() error {
	ss.mu.Lock()
	held := ss.pinSlot != nil
	ss.mu.Unlock()
	proj := ss.srv.project(ss.ref)
	if held || proj == nil {
		return nil // a project gone fails when the statement asks for a backend
	}
	ctx, cancel := context.WithTimeout(context.Background(), ss.srv.opts.QueryWaitTimeout)
	defer cancel()
	if !proj.run.pins.take(ctx, proj.cfg.MaxPinned) {
		proj.metrics.pinRefusals.Inc()
		return tooManyPinned(ss.ref, proj.cfg.MaxPinned)
	}
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.pinSlot != nil {
		proj.run.pins.give() // the relay pinned the client meanwhile
		return nil
	}
	ss.pinSlot = &proj.run.pins
	ss.metrics.pinned.Inc()
	return nil
}

// tryPinLocked takes a slot without waiting. Call with mu held.
func (ss *session) tryPinLocked() bool {
	if ss.pinSlot != nil {
		return true
	}
	proj := ss.srv.project(ss.ref)
	if proj == nil || !proj.run.pins.tryTake(proj.cfg.MaxPinned) {
		return false
	}
	ss.pinSlot = &proj.run.pins
	ss.metrics.pinned.Inc()
	return true
}

// releasePinLocked gives the client's slot back. Call with mu held.
func (ss *session) releasePinLocked() {
	if ss.pinSlot != nil {
		ss.pinSlot.give()
		ss.pinSlot = nil
		ss.metrics.pinned.Dec()
	}
}

// pinCheck looks at the backend at the end of a unit that may have created
// state the client keeps, or of a pinned client's unit, and pins or unpins
// the client. Called by the relay at an idle ReadyForQuery with mu and the
// client's writer held; mu is released during the look, while checking
// keeps the client goroutine off the backend. An error means the backend
// is lost.
func (ss *session) pinCheck(be *backend) error {
	ss.setPhase(phaseChecking)
	ss.mu.Unlock()
	keeps, err := ss.keepsSessionState(be)
	ss.mu.Lock()
	ss.setPhase(phaseInUnit)
	// The look was a simple query, which drops the unnamed statement: the
	// client's is parsed again before its next use.
	ss.unnamedOnBackend = false
	ss.cond.Broadcast()
	if err != nil {
		return err
	}
	ss.unitKeeps = false
	switch {
	case keeps && ss.pinned:
	case keeps && !ss.tryPinLocked():
		// No slot left (the state came from a statement that did not
		// take one, e.g. a prepared statement executed again): the
		// backend is scrubbed at release, and the client is told.
		ss.unitState = true
		ss.metrics.pinRefusals.Inc()
		_, _ = encodeTo(ss.wr, &pgproto3.NoticeResponse{Severity: "WARNING", SeverityUnlocalized: "WARNING", Code: CodeTooManyConnections,
			Message: "the session state this transaction created was discarded: the project has max_pinned clients keeping a server connection already"}, nil)
	case keeps:
		ss.pinned = true
	default:
		ss.pinned = false
		ss.releasePinLocked()
	}
	return nil
}

// PinStats lists every project's pinned clients, by project. A client
// counts from the statement that takes its slot until its state is gone or
// it leaves.
func (s *Server) PinStats() []stats.Pin {
	projects := *s.projects.Load()
	out := make([]stats.Pin, 0, len(projects))
	for ref, p := range projects {
		taken, waiting := p.run.pins.counts()
		out = append(out, stats.Pin{Project: ref, Pinned: taken, Waiting: waiting, MaxPinned: p.cfg.MaxPinned})
	}
	slices.SortFunc(out, func(a, b stats.Pin) int { return strings.Compare(a.Project, b.Project) })
	return out
}
