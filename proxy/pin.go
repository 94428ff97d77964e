package proxy

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"

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
// pinned at once; the slot is taken when the statement is classified, so a
// client past the bound gets an error before anything runs.

// pinCount counts a project's pinned clients (kept across reloads).
type pinCount struct {
	n atomic.Int32
}

// take takes a slot if fewer than max are taken.
func (pc *pinCount) take(max int) bool {
	for {
		n := pc.n.Load()
		if int(n) >= max {
			return false
		}
		if pc.n.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

func (pc *pinCount) give() { pc.n.Add(-1) }

// tooManyPinned is the error of a statement that would pin one client more
// than max_pinned.
func tooManyPinned(ref string, max int) error {
	return &Error{Code: CodeTooManyConnections,
		Message: fmt.Sprintf("project %q already has max_pinned = %d clients keeping a server connection for session state", ref, max),
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
	_ = be.conn.SetDeadline(time.Now().Add(5 * time.Second))
	defer func() { _ = be.conn.SetDeadline(time.Time{}) }()
	if err := writeMsg(be.wr, 'Q', append([]byte(sessionStateSQL), 0)); err != nil {
		return false, err
	}
	if err := be.wr.Flush(); err != nil {
		return false, err
	}
	keeps, answered := false, false
	var qerr error
	for {
		typ, _, err := be.rd.next()
		if err != nil {
			return false, err
		}
		switch typ {
		case 'D':
			body, err := be.rd.body()
			if err != nil {
				return false, err
			}
			var dr pgproto3.DataRow
			if err := dr.Decode(body); err != nil || len(dr.Values) != 1 {
				return false, fmt.Errorf("session state check: unexpected row")
			}
			keeps, answered = string(dr.Values[0]) != "0", true
		case 'E':
			body, err := be.rd.body()
			if err != nil {
				return false, err
			}
			var er pgproto3.ErrorResponse
			_ = er.Decode(body)
			qerr = fmt.Errorf("session state check: server error %s: %s", er.Code, er.Message)
		case 'A':
			if ss.clientGone.Load() {
				_ = be.rd.skip()
			} else if err := be.rd.forward(ss.wr); err != nil && !isNetWriteErr(err) {
				return false, err
			}
		case 'Z':
			body, err := be.rd.body()
			if err != nil {
				return false, err
			}
			switch {
			case len(body) != 1 || body[0] != 'I':
				return false, errors.New("session state check: backend not idle after it")
			case qerr != nil:
				return false, qerr
			case !answered:
				return false, errors.New("session state check: no answer")
			}
			return keeps, nil
		default:
			if err := be.rd.skip(); err != nil {
				return false, err
			}
		}
	}
}

// reservePin takes a slot of the project's max_pinned for a statement that
// creates state the client keeps, or returns the error the statement gets
// instead. A client holds one slot at most.
func (ss *session) reservePin() error {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	return ss.reservePinLocked()
}

// reservePinLocked is reservePin with mu held.
func (ss *session) reservePinLocked() error {
	if ss.pinSlot != nil {
		return nil
	}
	proj := ss.srv.project(ss.ref)
	if proj == nil {
		return nil // gone: the statement fails when it asks for a backend
	}
	if !proj.run.pins.take(proj.cfg.MaxPinned) {
		proj.metrics.pinRefusals.Inc()
		return tooManyPinned(ss.ref, proj.cfg.MaxPinned)
	}
	ss.pinSlot = &proj.run.pins
	ss.metrics.pinned.Inc()
	return nil
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
	ss.checking = true
	ss.mu.Unlock()
	keeps, err := ss.keepsSessionState(be)
	ss.mu.Lock()
	ss.checking = false
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
	case keeps && ss.pinSlot == nil && ss.reservePinLocked() != nil:
		// No slot left (the state came from a statement that did not
		// take one, e.g. a prepared statement executed again): the
		// backend is scrubbed at release, and the client is told.
		ss.unitState = true
		ss.metrics.pinRefusals.Inc()
		ss.scratch, _ = encodeTo(ss.wr, &pgproto3.NoticeResponse{Severity: "WARNING", SeverityUnlocalized: "WARNING", Code: CodeTooManyConnections,
			Message: "the session state this transaction created was discarded: the project has max_pinned clients keeping a server connection already"}, ss.scratch)
	case keeps:
		ss.pinned = true
	default:
		ss.pinned = false
		ss.releasePinLocked()
	}
	return nil
}

// PinStat is one project's pinned clients (transaction mode).
type PinStat struct {
	Project   string `json:"project"`
	Pinned    int    `json:"pinned"`
	MaxPinned int    `json:"max_pinned"`
}

// PinStats lists every project's pinned clients, in no particular order.
// A client counts from the statement that takes its slot until its state
// is gone or it leaves.
func (s *Server) PinStats() []PinStat {
	projects := *s.projects.Load()
	out := make([]PinStat, 0, len(projects))
	for ref, p := range projects {
		out = append(out, PinStat{Project: ref, Pinned: int(p.run.pins.n.Load()), MaxPinned: p.cfg.MaxPinned})
	}
	return out
}
