package proxy

import (
	"errors"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
)

// relay copies one backend's replies to the client until the unit ends
// (it returns the unit to settle and end) or the backend is lost (nil). It
// runs on the backend's goroutine (backend.serve).
func (ss *session) relay(a attachment) *unit {
	r := relayRun{ss: ss, be: a.be, setup: a.setup}
	defer r.unlock()
	ss.mu.Lock()
	r.hold = ss.beReplica && ss.replayOK
	ss.mu.Unlock()
	for {
		if !r.be.rd.fullMessageBuffered() && !r.hold {
			r.unlock() // the client gets what it has while the server works
		}
		typ, n, err := r.be.rd.next()
		if err != nil {
			r.lost(err)
			return nil
		}
		if !r.setup.empty() {
			if !r.swallowSetup(typ) {
				return nil
			}
			continue
		}
		if u, done := r.reply(typ, n); done {
			return u
		}
	}
}

// relayRun is what the relay of one attachment knows between two replies.
type relayRun struct {
	ss    *session
	be    *backend
	setup setupPlan // the identity and settings statements whose replies are swallowed
	// locked: the client's writer (wmu) is held. It is let go whenever the
	// backend has no whole message buffered, so the client gets what it
	// has while the server works.
	locked bool
	// hold: the replies of a read on a replica are held in the client's
	// write buffer until its ReadyForQuery (or until they outgrow it), so
	// that if the replica dies midway the read can run again on the
	// primary without the client ever seeing half an answer.
	hold     bool
	sent     bool                    // a reply of this unit reached the client
	fatal    *pgproto3.ErrorResponse // the server's FATAL: told to the client when it closes
	groupErr *pgproto3.ErrorResponse // the setup group's error, if any
}

func (r *relayRun) unlock() {
	if r.locked {
		_ = r.ss.wr.Flush()
		r.ss.wmu.Unlock()
		r.locked = false
	}
}

// lost handles a dead backend: a read on a replica that has not answered
// yet moves to the primary, whose own goroutine relays it from there.
func (r *relayRun) lost(err error) {
	ss := r.ss
	if r.hold && !r.sent && r.locked {
		ss.wr.Reset(ss.conn) // drop the held half answer
		ss.wmu.Unlock()
		r.locked = false
	}
	r.unlock()
	if !r.sent && ss.retryOnPrimary(r.be) {
		return
	}
	ss.backendLost(r.be, err, r.fatal)
}

// fail reports the backend lost after a reply it could not read or pass
// on, and ends the relay.
func (r *relayRun) fail(err error) (*unit, bool) {
	r.unlock()
	r.ss.backendLost(r.be, err, nil)
	return nil, true
}

// swallowSetup reads one reply of the identity and settings statements
// sent in front of the client's messages: the client never sees them. It
// reports false when the setup failed and the relay ends.
func (r *relayRun) swallowSetup(typ byte) bool {
	ss, be := r.ss, r.be
	if typ == msgTypeErrorResponse {
		body, _ := be.rd.body()
		var er pgproto3.ErrorResponse
		_ = er.Decode(body)
		if r.setup.group > 0 {
			// The group is rolled back; the gate decides.
			r.groupErr = &er
			be.identity, be.settings, be.settingsKey = "", nil, ""
			be.poisoned = true // its settings are unknown now: close it after this unit
			return true
		}
		// The gate is missing, or the inline identity failed: the
		// client's messages were skipped.
		if r.groupErr != nil {
			er = *r.groupErr
		}
		ss.srv.log.Warn("identity or settings could not be applied", "project", ss.ref, "role", ss.ident.Role, "sqlstate", er.Code, "message", er.Message)
		code := er.Code
		if code == "" || strings.HasPrefix(code, "28") || code == "42704" || code == "26000" {
			code = CodeInsufficientPrivs
		}
		r.unlock()
		be.close()
		ss.backendLost(be, errors.New("identity or settings statement failed"),
			&pgproto3.ErrorResponse{Code: code, Message: "cascata could not put the session in force (role " + ss.ident.Role + "): " + er.Message})
		return false
	}
	switch {
	case r.setup.group != 0:
		// Everything up to the group's own ReadyForQuery is the group's.
		if typ == msgTypeReadyForQuery {
			r.setup.group = 0
		}
	case r.setup.inline != 0:
		if typ == msgTypeCommandComplete {
			r.setup.inline-- // one inline statement done
		}
	case typ == msgTypeCloseComplete:
		r.setup.gate = false // the gate's CloseComplete: the client's replies follow
	}
	_ = be.rd.skip() // BindComplete, DataRow, ParameterStatus, notices of the setup
	return true
}

// reply passes one reply of n body bytes to the client. It reports done
// when the relay ends, with the unit to settle and end (or nil: the
// backend was lost or moved).
func (r *relayRun) reply(typ byte, n int) (*unit, bool) {
	ss := r.ss
	if !r.locked {
		ss.lockOut()
		r.locked = true
	}
	if r.hold && (n+5 > ss.wr.Available() || typ == msgTypeReadyForQuery) {
		// It would not fit, or the answer is complete: it flows now.
		r.hold = false
		r.sent = true
	}
	wasSent := r.sent
	if !r.hold && typ != msgTypeNoticeResponse && typ != msgTypeParameterStatus && typ != msgTypeNotification {
		// Notices (a dying server's warning among them), parameter
		// status and notifications do not answer the client's query:
		// the query may still run again elsewhere.
		r.sent = true
	}
	switch typ {
	case msgTypeReadyForQuery:
		return r.readyForQuery()
	case msgTypeErrorResponse:
		return r.errorResponse(wasSent)
	case msgTypeCommandComplete:
		return r.commandComplete()
	case msgTypeParseComplete, msgTypeCloseComplete:
		return r.parseOrCloseComplete(typ)
	case msgTypeCopyInResponse:
		return r.copyInResponse()
	}
	return r.pass()
}

// copyInResponse passes on the start of a COPY FROM STDIN: the client's
// CopyData goes to this backend until CopyDone or CopyFail.
func (r *relayRun) copyInResponse() (*unit, bool) {
	ss, be := r.ss, r.be
	ss.mu.Lock()
	ss.copyIn = true
	gone := ss.clientGone.Load()
	ss.mu.Unlock()
	if gone {
		_ = be.rd.skip()
	} else if err := be.rd.forward(ss.wr); err != nil {
		return r.fail(err)
	}
	return nil, false
}

// readyForQuery ends a batch: the session counts the answer, and at the
// unit's end detaches the backend (after a look at it, for a unit that
// may have made state the client keeps).
func (r *relayRun) readyForQuery() (*unit, bool) {
	ss, be := r.ss, r.be
	// Stamped before the client can see the unit end (gone).
	be.heard.Store(time.Now().UnixNano())
	body, err := be.rd.body()
	if err != nil || len(body) != 1 {
		return r.fail(errors.New("invalid ReadyForQuery"))
	}
	status := body[0]
	ss.mu.Lock()
	ss.answered(&be.stmtTable)
	ss.pending--
	ss.txStatus = status
	if ss.pending == 0 {
		ss.cond.Broadcast() // a proxy-made reply (writeLocal) may go out now
	}
	// An identity that rode in the unit's implicit transaction is
	// committed now, or rolled back with it after an error (then
	// be.identity is ""). identPending stays set until the backend is
	// detached below: the wait for the client goroutine's write lets that
	// goroutine run, and it must not find this backend attached with the
	// identity unknown and send its next batch with none in front.
	gone := ss.clientGone.Load()
	releasable := func() bool {
		return ss.pending <= 0 && !ss.dirty && (ss.clientGone.Load() || (status == txIdle && !ss.sessionMode && !ss.pinned))
	}
	// A unit that may have created state the client keeps, and every unit
	// of a pinned client, ends with a look at the backend.
	checkDue := func() bool {
		return ss.pending <= 0 && !ss.dirty && !ss.clientGone.Load() && status == txIdle && ss.txMode && (ss.unitKeeps || ss.pinned)
	}
	for (releasable() || checkDue()) && ss.writing {
		// The client goroutine is finishing the write this reply answers;
		// the backend is not ours to give until it is done.
		ss.cond.Wait()
	}
	if checkDue() {
		if err := ss.pinCheck(be); err != nil {
			ss.mu.Unlock()
			_, _ = ss.wr.Write(rfq(status))
			return r.fail(err)
		}
	}
	var u *unit
	identLost := false
	if releasable() {
		// Decide and detach in one critical section: once the lock is
		// released, the client goroutine must not find this backend.
		u = ss.detachLocked(status == txIdle && !ss.drainFailed)
	} else if status == txIdle && ss.identPending {
		// The unit ended without the backend going back (nothing that
		// rides the identity along keeps it; kept anyway): a committed
		// identity stays in force, a rolled-back one is never left under
		// the client's next statements.
		ss.identPending = false
		ss.cond.Broadcast()
		identLost = be.identity == ""
	}
	ss.mu.Unlock()
	if identLost {
		_, _ = ss.wr.Write(rfq(status))
		return r.fail(errors.New("identity rolled back on a backend the client keeps"))
	}
	if !gone {
		_, _ = ss.wr.Write(rfq(status))
	}
	if u != nil {
		r.unlock()
		return u, true
	}
	return nil, false
}

// errorResponse passes an error on, renamed to the client's statement
// names. A FATAL is kept for when the server closes; wasSent is whether a
// reply had reached the client before this one.
func (r *relayRun) errorResponse(wasSent bool) (*unit, bool) {
	ss, be := r.ss, r.be
	body, err := be.rd.body()
	if err != nil {
		return r.fail(err)
	}
	var er pgproto3.ErrorResponse
	if derr := er.Decode(body); derr == nil && (er.Severity == "FATAL" || er.Severity == "PANIC") {
		f := er
		r.fatal = &f
		r.sent = wasSent // nothing reached the client
		return nil, false
	}
	ss.mu.Lock()
	if ss.identPending {
		be.identity = ""
	}
	if ss.clientGone.Load() {
		ss.drainFailed = true
	}
	gone := ss.clientGone.Load()
	ss.sqlPrepareFailed(be)
	forgetMissingSQLStmt(be, body)
	body = ss.renameError(body)
	ss.mu.Unlock()
	if !gone {
		_ = writeMsg(ss.wr, msgTypeErrorResponse, body)
	}
	return nil, false
}

// commandComplete passes a command tag on, retagged or dropped where the
// proxy ran the statement in another form (reset.go, sqlprepared.go).
func (r *relayRun) commandComplete() (*unit, bool) {
	ss, be := r.ss, r.be
	body, err := be.rd.body()
	if err != nil {
		return r.fail(err)
	}
	ss.mu.Lock()
	if ss.identPending && len(body) >= 8 && string(body[:8]) == "ROLLBACK" {
		be.identity = ""
	}
	gone := ss.clientGone.Load() || ss.dropCommandComplete()
	if tag := ss.retagCommandComplete(body); tag != nil {
		body = tag
	}
	ss.mu.Unlock()
	if !gone {
		_ = writeMsg(ss.wr, msgTypeCommandComplete, body)
	}
	return nil, false
}

// parseOrCloseComplete passes on, drops or stands in for the reply to a
// Parse or Close, as the translator says (translator.go).
func (r *relayRun) parseOrCloseComplete(typ byte) (*unit, bool) {
	ss, be := r.ss, r.be
	ss.mu.Lock()
	gone := ss.clientGone.Load()
	action := replyPass
	if !gone {
		action = ss.replyTo(typ)
	}
	ss.mu.Unlock()
	switch {
	case gone || action == replyDrop:
		_ = be.rd.skip()
	case action == replyAsParseComplete:
		_ = be.rd.skip()
		_, _ = ss.wr.Write(msgParseOK)
	default:
		if err := be.rd.forward(ss.wr); err != nil {
			return r.fail(err)
		}
	}
	return nil, false
}

// pass forwards any other reply as it is. A client that cannot take it
// has left: the backend is drained and the session ends as the client's
// goroutine finds it gone.
func (r *relayRun) pass() (*unit, bool) {
	ss, be := r.ss, r.be
	if ss.clientGone.Load() { // most replies: no lock
		_ = be.rd.skip()
		return nil, false
	}
	err := be.rd.forward(ss.wr)
	if err == nil {
		return nil, false
	}
	if isPartial(err) && !isNetWriteErr(err) {
		// Half a reply reached the client: it cannot be told apart from
		// the rest any more, so it is disconnected.
		_ = ss.conn.Close()
	}
	if isNetWriteErr(err) {
		// The client is gone; keep draining the backend.
		ss.mu.Lock()
		ss.clientGone.Store(true)
		ss.mu.Unlock()
		_ = ss.conn.Close()
		return nil, false
	}
	return r.fail(err)
}
