package proxy

import (
	"slices"

	"cascata/router"

	"github.com/jackc/pgx/v5/pgproto3"
)

// maxBatchHold and maxBatchMsgs are how many bytes and messages of
// extended-protocol messages the proxy holds to route a batch whole; a
// larger batch goes to the primary as it comes. The count bounds the
// decoded messages a client makes the proxy keep (a message of 10 bytes
// decodes to about a hundred).
const (
	maxBatchHold = 1 << 20
	maxBatchMsgs = 1024
)

// maxBatchKeep is the largest held-batch buffer a client keeps between
// batches (larger ones are dropped so idle clients stay small).
const maxBatchKeep = 4 << 10

// maxHeldKeep is the same for the held batch's decoded messages.
const maxHeldKeep = 32

// classify asks the configured Classifier about one SQL text, sent in a
// Query (parse false) or a Parse message, and adds the refusals that
// protect a backend shared by many clients.
func (ss *session) classify(sql string, parse bool) verdict {
	v := newVerdict(ss.srv.classifier.Classify(ss.ref, sql, ss.trusted))
	if v.refused != nil || !ss.translatesNames() {
		return v
	}
	switch {
	case parse && (v.SQLPrepared != nil || v.Deallocate != nil || v.untranslatedPrepared()):
		v.refused = &Error{Code: CodeFeatureNotSupported, Message: "SQL PREPARE, EXECUTE and DEALLOCATE cannot be sent in a Parse message through cascata in transaction mode",
			Hint: "Send them as a simple query, or use the protocol's own prepared statements."}
	case v.untranslatedPrepared():
		v.refused = &Error{Code: CodeFeatureNotSupported, Message: "SQL PREPARE, EXECUTE and DEALLOCATE must each be sent as a query of their own through cascata in transaction mode",
			Hint: "cascata gives each client its own statement names; it translates a PREPARE, EXECUTE or DEALLOCATE only when it is the whole query."}
	case slices.Contains(v.SessionGUCs, "idle_session_timeout"):
		// On a shared backend the setting would outlive the client's unit:
		// the server ends the backend once it sits idle in the pool, and a
		// client could make the pool dial again and again.
		v.refused = &Error{Code: CodeFeatureNotSupported, Message: "idle_session_timeout cannot be set through cascata where server connections are shared (transaction mode)",
			Hint: "Server connections idle in cascata's pool; close an idle client connection from the application instead."}
	case v.ReadsBackendState:
		v.refused = &Error{Code: CodeInsufficientPrivs, Message: "pg_prepared_statements and pg_cursors cannot be read through cascata in transaction mode: the server connection is shared with other clients"}
	case v.KeepsSessionState && ss.txMode:
		v.refused = ss.reservePin()
	}
	return v
}

// translatesNames reports whether the client's statement names are its own
// and translated (transaction mode, and sessions that route reads), as
// opposed to a session-mode client that owns its backend.
func (ss *session) translatesNames() bool {
	return !ss.sessionMode || ss.routedSession
}

// attached reports whether a backend is attached.
func (ss *session) attached() bool {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	return ss.be != nil
}

// onQuery handles a simple query: guard, route hints, routing.
func (ss *session) onQuery() error {
	ss.metrics.queries.Inc()
	body, err := ss.rd.body()
	if err != nil {
		return err
	}
	sql, ok := queryText(body)
	if !ok {
		ss.failLocal(msgTypeQuery, fatalError(CodeProtocolViolation, "invalid Query message"))
		return nil
	}
	ss.forgetLostParses() // an EXECUTE must not find a name whose Parse failed
	r := ss.classify(sql, false)
	if r.Reset != router.ResetNone && r.refused == nil {
		return ss.onReset(sql, r)
	}
	if r.RouteHint == router.SessionPrimary || r.RouteHint == router.SessionAuto {
		ss.routePrimary = r.RouteHint == router.SessionPrimary
		if !ss.attached() {
			ss.writeLocalComplete("SET")
			return nil
		}
		// Inside a transaction it also goes to PostgreSQL, which takes it as
		// a custom setting, so the replies keep their order.
	}
	if r.refused != nil {
		return ss.refuse(r.refused)
	}
	be, err := ss.claim(true, r.want())
	if err != nil {
		ss.failLocal(msgTypeQuery, err)
		return nil
	}
	defer ss.doneWriting()
	switch {
	case ss.sessionMode && !ss.routedSession:
	case r.Deallocate != nil:
		body = ss.translateDeallocate(be, r.Deallocate)
	case r.SQLPrepared != nil:
		body = ss.translateSQLPrepared(be, r.SQLPrepared)
	}
	ss.unnamedOnBackend = false // a simple query drops the unnamed statement
	ss.mu.Lock()
	if ss.be == be && ss.replayOK && len(ss.replay) == 0 {
		ss.keepReplay(append(append(ss.out[:0], msgTypeQuery, byte((len(body)+4)>>24), byte((len(body)+4)>>16), byte((len(body)+4)>>8), byte(len(body)+4)), body...))
	}
	ss.mu.Unlock()
	if err := writeMsg(be.wr, msgTypeQuery, body); err != nil {
		return ss.backendWriteFailed(be, err)
	}
	return ss.maybeFlushBackend(be, true)
}

// refuse answers a refused simple query or function call (both end with
// ReadyForQuery). Outside a transaction the proxy answers itself; inside one
// a statement that fails to parse goes to the backend in its place, so the
// transaction is aborted as by any error, and its error is replaced.
func (ss *session) refuse(refusal error) error {
	if !ss.attached() {
		ss.writeLocal(toErrorResponse(refusal, false), txIdle)
		return nil
	}
	be, err := ss.claim(true, want{primary: true, reason: "refused"})
	if err != nil {
		ss.failLocal(msgTypeQuery, err)
		return nil
	}
	defer ss.doneWriting()
	ss.mu.Lock()
	ss.pushReplace(refusedSQL, refusalBody(refusal))
	ss.mu.Unlock()
	// Not ss.scratch: that is used under the client's writer lock, which
	// the backend's goroutine may hold now (backendLost).
	if err := writeMsg(be.wr, msgTypeQuery, appendCString(nil, refusedSQL)); err != nil {
		return ss.backendWriteFailed(be, err)
	}
	return ss.maybeFlushBackend(be, true)
}

// onFunctionCall refuses the fast-path FunctionCall message: it names a
// function by OID with arguments the guard cannot see as SQL (set_config
// among them), and no driver needs it for ordinary work.
func (ss *session) onFunctionCall() error {
	if err := ss.rd.skip(); err != nil {
		return err
	}
	return ss.refuse(&Error{Code: CodeInsufficientPrivs, Message: "the fast-path function call protocol is not allowed through cascata; call the function in a query"})
}

// writeLocalComplete answers a statement the proxy consumed itself.
func (ss *session) writeLocalComplete(tag string) {
	ss.lockOut()
	defer ss.wmu.Unlock()
	ss.scratch, _ = encodeTo(ss.wr, &pgproto3.CommandComplete{CommandTag: []byte(tag)}, ss.scratch)
	_, _ = ss.wr.Write(rfq(txIdle))
	_ = ss.wr.Flush()
}

// onExtended handles Parse, Bind, Describe, Close, Execute and FunctionCall.
// With no backend attached the message is held until the batch's Sync or
// Flush, so the batch is routed as a whole; otherwise it goes to the
// attached backend at once.
func (ss *session) onExtended(typ byte) error {
	if typ == msgTypeExecute {
		ss.metrics.queries.Inc()
	}
	body, err := ss.rd.body()
	if err != nil {
		return err
	}
	ss.forgetLostParses()
	if !ss.attached() {
		// Held: the message is kept (and decoded) in the batch's buffer.
		start := len(ss.batch)
		ss.batch = append(ss.batch, typ, byte((len(body)+4)>>24), byte((len(body)+4)>>16), byte((len(body)+4)>>8), byte(len(body)+4))
		ss.batch = append(ss.batch, body...)
		m, err := decodeExtMsg(typ, ss.batch[start+5:])
		if err != nil {
			ss.batch = ss.batch[:start]
			ss.protocolViolation(err)
			return err
		}
		ss.held = append(ss.held, m)
		if len(ss.batch) > maxBatchHold || len(ss.held) >= maxBatchMsgs {
			return ss.flushBatch(0)
		}
		return nil
	}
	m, err := decodeExtMsg(typ, body)
	if err != nil {
		ss.protocolViolation(err)
		return err
	}
	var r verdict
	w := ss.wantOf(&m, &r, nil)
	be, err := ss.claim(false, w)
	if err != nil {
		ss.failLocal(typ, err)
		return nil
	}
	defer ss.doneWriting()
	ss.mu.Lock()
	ss.out = ss.out[:0]
	ss.translate(be, &m, &r)
	out := ss.out
	ss.mu.Unlock()
	if _, err := be.wr.Write(out); err != nil {
		return ss.backendWriteFailed(be, err)
	}
	return ss.maybeFlushBackend(be, false)
}

// wantOf says what one extended-protocol message needs; a Parse is
// classified and its verdict stored in *r (left as it is otherwise). parsed
// holds the statements parsed earlier in the same held batch.
func (ss *session) wantOf(m *extMsg, r *verdict, parsed map[string]want) want {
	switch {
	case m.typ == msgTypeParse:
		*r = ss.classify(m.query, true)
		w := r.want()
		if parsed != nil {
			parsed[m.name] = w
		}
		return w
	case m.hasText():
		if w, here := parsed[m.name]; here {
			return w
		}
		st := ss.stmts[m.name]
		if m.name == "" {
			st = ss.unnamed
		}
		if st == nil {
			return want{reason: "read"}
		}
		w := st.need
		w.reason = "prepared"
		return w
	}
	return want{reason: "read"}
}

// flushBatch routes and sends the held batch, ended by term ('S' Sync,
// 'H' Flush, or 0 when the batch grew too large to hold).
func (ss *session) flushBatch(term byte) error {
	batch, held := ss.batch, ss.held
	// Everything kept from the batch is copied, so its arrays can hold the
	// next one, unless a large batch made them too big to keep.
	ss.batch, ss.held = nil, nil
	if cap(batch) <= maxBatchKeep {
		ss.batch = batch[:0]
	}
	if cap(held) <= maxHeldKeep {
		ss.held = held[:0]
	}
	defer clear(held) // no view of this batch outlives it
	ss.replayNamed = false
	// Decide where the whole batch runs.
	parsed := map[string]want{}
	routes := make([]verdict, 0, 4) // on the stack for the usual batch
	// shareTx holds while every text is plain; claim takes it only for a
	// batch ended by Sync.
	w := want{reason: "read", shareTx: true}
	for i := range held {
		routes = append(routes, verdict{})
		mw := ss.wantOf(&held[i], &routes[i], parsed)
		if held[i].hasText() {
			w.shareTx = w.shareTx && mw.shareTx
		}
		if mw.primary && !w.primary {
			w.primary, w.reason = true, mw.reason
		}
		w.writes = w.writes || mw.writes
		w.pin = w.pin || mw.pin
		w.state = w.state || mw.state
		w.keeps = w.keeps || mw.keeps
		w.ddl = w.ddl || mw.ddl
		w.gucs = append(w.gucs, mw.gucs...)
	}
	if term != msgTypeSync {
		// A batch ended by Flush (or too large to hold) leaves the unit
		// open with more to come that the proxy has not seen: primary.
		w.primary = true
	}
	be, err := ss.claim(term == msgTypeSync, w)
	if err != nil {
		ss.failBatch(term, err)
		return nil
	}
	defer ss.doneWriting()
	ss.mu.Lock()
	ss.out = ss.out[:0]
	for i := range held {
		ss.translate(be, &held[i], &routes[i])
	}
	if term != 0 {
		ss.appendMsg(term)
	}
	out := ss.out
	if term == msgTypeSync && ss.replayOK && len(ss.replay) == 0 {
		ss.keepReplay(out)
		if ss.replayNamed {
			// Named statements translate per backend: keep the client's
			// own messages to translate them again on another one.
			ss.replayRaw = append(ss.replayRaw[:0], batch...)
		}
	} else {
		ss.replayOK = false
	}
	ss.mu.Unlock()
	if _, err := be.wr.Write(out); err != nil {
		return ss.backendWriteFailed(be, err)
	}
	if term == 0 {
		return nil
	}
	if err := be.wr.Flush(); err != nil {
		return ss.backendWriteFailed(be, err)
	}
	return nil
}

// protocolViolation answers a malformed message as PostgreSQL does (FATAL
// 08P01); the caller then ends the session. A held batch is dropped unsent,
// and an attached backend is cleaned by finish like after any departure.
func (ss *session) protocolViolation(err error) {
	ss.batch, ss.held = ss.batch[:0], ss.held[:0]
	ss.flushForwarded()
	ss.writeLocal(toErrorResponse(fatalError(CodeProtocolViolation, "%s", err.Error()), true), 0)
}

// flushForwarded sends what was forwarded to the attached backend and
// still waits in its buffer for the next message (pipelining), before the
// proxy answers something itself: writeLocal waits for the replies to what
// came before, which never come for messages never sent, and the session
// would hold its backend for good. Client goroutine only.
func (ss *session) flushForwarded() {
	ss.mu.Lock()
	be := ss.be
	if be != nil {
		ss.writing = true
	}
	ss.mu.Unlock()
	if be == nil {
		return
	}
	if err := be.wr.Flush(); err != nil {
		_ = ss.backendWriteFailed(be, err)
	}
	ss.doneWriting()
}

// failBatch answers a held batch that could not run.
func (ss *session) failBatch(term byte, err error) {
	if term == msgTypeSync {
		ss.writeLocal(toErrorResponse(err, false), txIdle)
		return
	}
	ss.failLocal(msgTypeParse, err)
}

// splitMsg returns the message at off in a held batch and the next offset.
func splitMsg(b []byte, off int) (byte, []byte, int) {
	n := int(b[off+1])<<24 | int(b[off+2])<<16 | int(b[off+3])<<8 | int(b[off+4])
	return b[off], b[off+5 : off+1+n], off + 1 + n
}

// translateDeallocate rewrites a client's DEALLOCATE for transaction mode.
// DEALLOCATE name drops the client's name and the backend's statement under
// the proxy's name (others re-prepare it when they need it); an unknown name
// fails with 26000 under the client's name. DEALLOCATE ALL drops every name
// of the client and runs as it is: the proxy's statements on the backend go
// with it and are prepared again where needed.
func (ss *session) translateDeallocate(be *backend, d *router.Deallocate) []byte {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if d.All {
		clear(ss.stmts)
		clear(ss.sqlStmts)
		be.stmts, be.sqlStmts = nil, nil
		be.forgetProxyStmts() // the proxy's own go too, unless the statement fails
		return appendCString(ss.out[:0], "DEALLOCATE ALL")
	}
	ss.replayOK = false
	_, protocol := ss.stmts[d.Name]
	_, sql := ss.sqlStmts[d.Name]
	if !protocol && !sql {
		ss.renames = append(ss.renames, errRename{from: missingStmtName, to: d.Name, seq: ss.syncSeq})
		return appendCString(ss.out[:0], "DEALLOCATE "+missingStmtName)
	}
	// The client's name goes; the backend's statement may not be on this
	// backend, and may serve other clients where it is (the least recently
	// used are closed). A throwaway statement gives the reply PostgreSQL
	// would: its PREPARE's CommandComplete is dropped.
	delete(ss.stmts, d.Name)
	delete(ss.sqlStmts, d.Name)
	ss.dropC = append(ss.dropC, ss.syncSeq)
	return appendCString(ss.out[:0], "PREPARE "+deallocStmtName+" AS SELECT 1;\nDEALLOCATE "+deallocStmtName)
}
