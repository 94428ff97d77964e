package proxy

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"slices"
	"strconv"
)

// Named prepared statements in transaction mode.
//
// A client's statement names are its own: the proxy keeps them per client
// and prepares each statement on whichever backend runs the client's next
// transaction, under a proxy-owned name derived from the statement's text and
// parameter types. A statement prepared by a thousand clients is therefore
// prepared once per backend. Replies stay in order because the proxy never
// answers an extended-protocol message itself: every message it must answer
// becomes a message to the backend that yields exactly one reply of a known
// kind, and a FIFO per reply kind says what to do with it:
//
//   - a Parse of a statement the backend already has becomes Close of a
//     name that does not exist (CloseComplete, never an error), turned back
//     into ParseComplete on the way out;
//   - a Parse the proxy adds (the backend lacks a statement the client Binds)
//     has its ParseComplete dropped;
//   - an unknown or duplicate name becomes a reference to a name that fails
//     with the same SQLSTATE (26000, 42P05), and the error text gets the
//     client's name back.
//
// After an error PostgreSQL skips to Sync, so entries of a batch that never
// got their reply are dropped at its ReadyForQuery; a statement whose Parse
// or Close was skipped is marked unsure and is closed and parsed again
// before its next use.

const (
	noopStmtName    = "cascata_noop"    // never prepared: Close of it is a no-op
	missingStmtName = "cascata_missing" // never prepared: Bind/Describe of it fails with 26000
	deallocStmtName = "cascata_dealloc" // prepared and deallocated at once for a client's DEALLOCATE
)

// stmt is one of a client's prepared statements.
type stmt struct {
	proxyName string
	rest      []byte // query text and parameter types as in Parse, after the name
	primary   bool   // its text must run on the primary
	writes    bool
	pin       bool      // its text pins a routed session
	state     bool      // its text may leave session state (Route.SessionState)
	keeps     bool      // its text creates state the client keeps (Route.KeepsSessionState)
	ddl       bool      // its text changes the schema (Route.ChangesSchema)
	epoch     uint64    // the project's schema epoch when the client parsed it
	reset     ResetKind // its text was RESET ALL or DISCARD ALL, rewritten (reset.go)
	gucs      []string  // session settings it changes
}

// replyAction says what to do with one ParseComplete or CloseComplete.
type replyAction uint8

const (
	replyPass replyAction = iota
	replyDrop
	replyAsParseComplete
)

// queued is one expected reply: its action, the Sync that ends its batch,
// and the backend statement it concerns (for bookkeeping when it is skipped).
type queued struct {
	action  replyAction
	seq     uint64
	stmt    string // proxy name whose state depends on this reply, or ""
	evicted bool   // a Close that evicts stmt
	// client is the client's statement whose Parse this reply answers: if
	// the reply never comes (the Parse failed or was skipped), the name is
	// not the client's (see lostParse).
	client     string
	clientStmt *stmt
}

// lostParse is a client's Parse that PostgreSQL did not carry out.
type lostParse struct {
	name string
	st   *stmt
}

// resultFormatsMismatch is in PostgreSQL's error for a Bind that gives more
// result formats than the statement has columns.
const resultFormatsMismatch = "result formats but query has"

// planChangedBody is PostgreSQL's error for a prepared statement whose
// result type changed since it was prepared.
var planChangedBody = refusalBody(&Error{Code: CodeFeatureNotSupported, Message: "cached plan must not change result type"})

// errRename maps an error about a stand-in name back to the client's name,
// or, with whole set, replaces an error that mentions from entirely.
type errRename struct {
	from, to string
	whole    []byte
	seq      uint64
}

// backendStmt is a statement prepared on one backend.
type backendStmt struct {
	lastUse uint64
	unsure  bool   // a Parse or Close of it was skipped: close and parse again
	epoch   uint64 // the project's schema epoch when it was parsed
}

// statementName returns the proxy-owned name of a statement: same text and
// types, same name, on every backend.
func statementName(rest []byte) string {
	sum := sha256.Sum256(rest)
	return "cs_" + hex.EncodeToString(sum[:16])
}

// appendCString appends s and a NUL.
func appendCString(b []byte, s string) []byte {
	b = append(b, s...)
	return append(b, 0)
}

// closeMsgBody is the body of Close of a statement.
func closeMsgBody(name string) []byte {
	return appendCString([]byte{kindStatement}, name)
}

// renameInError replaces a stand-in statement name in an ErrorResponse body
// with the client's name, if the message mentions it.
func renameInError(body []byte, from, to string) ([]byte, bool) {
	quoted := []byte(strconv.Quote(from))
	if !bytes.Contains(body, quoted) {
		return body, false
	}
	return bytes.ReplaceAll(body, quoted, []byte(strconv.Quote(to))), true
}

// batchSeq is the number of the Sync (or Query) that ends the batch whose
// messages are being translated: the next one, unless that Sync was
// counted already (a held batch is translated after its Sync claimed the
// backend).
func (ss *session) batchSeq() uint64 {
	if ss.syncCounted {
		return ss.syncSeq
	}
	return ss.syncSeq + 1
}

// renameError applies to an error of the batch now being answered the
// first of its rename rules that matches, and drops that rule. Call with
// mu held.
func (ss *session) renameError(body []byte) []byte {
	for i, rn := range ss.renames {
		if rn.seq > ss.rfqSeq+1 {
			break
		}
		if rn.whole != nil {
			if !bytes.Contains(body, []byte(rn.from)) {
				continue
			}
			body = rn.whole
		} else if nb, ok := renameInError(body, rn.from, rn.to); ok {
			body = nb
		} else {
			continue
		}
		ss.renames = slices.Delete(ss.renames, i, i+1)
		return body
	}
	return body
}

// push queues an expected reply for the batch now being sent. Call with mu held.
func (ss *session) push(q *[]queued, e queued) {
	e.seq = ss.batchSeq()
	*q = append(*q, e)
}

func (ss *session) pushRename(from, to string) {
	ss.renames = append(ss.renames, errRename{from: from, to: to, seq: ss.batchSeq()})
}

// pushReplace says: the next error that mentions marker is replaced by body.
func (ss *session) pushReplace(marker string, body []byte) {
	ss.renames = append(ss.renames, errRename{from: marker, whole: body, seq: ss.batchSeq()})
}

// dropUnanswered forgets the expected replies of batches that have ended
// (their messages were skipped after an error) and marks the statements they
// concerned unsure on the backend. Call with mu held, at ReadyForQuery.
func (ss *session) dropUnanswered(be *backend) {
	for len(ss.parseQ) > 0 && ss.parseQ[0].seq <= ss.rfqSeq {
		if e := ss.parseQ[0]; e.client != "" {
			ss.lostParses = append(ss.lostParses, lostParse{e.client, e.clientStmt})
			ss.parsesLost.Store(true)
		}
		if name := ss.parseQ[0].stmt; name != "" && be.stmts != nil {
			if bs := be.stmts[name]; bs != nil {
				bs.unsure = true
			}
		}
		popFront(&ss.parseQ)
	}
	for len(ss.closeQ) > 0 && ss.closeQ[0].seq <= ss.rfqSeq {
		if e := ss.closeQ[0]; e.client != "" {
			ss.lostParses = append(ss.lostParses, lostParse{e.client, e.clientStmt})
			ss.parsesLost.Store(true)
		}
		if e := ss.closeQ[0]; e.stmt != "" && be.stmts != nil {
			if bs := be.stmts[e.stmt]; bs != nil {
				bs.unsure = true
			} else if e.evicted {
				be.stmts[e.stmt] = &backendStmt{unsure: true}
			}
		}
		popFront(&ss.closeQ)
	}
	for len(ss.renames) > 0 && ss.renames[0].seq <= ss.rfqSeq {
		popFront(&ss.renames)
	}
	for len(ss.dropC) > 0 && ss.dropC[0] <= ss.rfqSeq {
		popFront(&ss.dropC)
	}
	for len(ss.retags) > 0 && ss.retags[0].seq <= ss.rfqSeq {
		popFront(&ss.retags)
	}
	for len(ss.sqlPrepFail) > 0 && ss.sqlPrepFail[0].seq <= ss.rfqSeq {
		popFront(&ss.sqlPrepFail)
	}
}

// translate appends to ss.out what the backend gets for one client message
// and queues what to do with the replies; r is the Route of a Parse (zero
// for other messages). m was checked when it arrived, so nothing here can
// find it malformed. Call with mu held.
func (ss *session) translate(be *backend, m *extMsg, r *Route) {
	if m.typ == msgTypeParse && r.Refusal != nil {
		ss.failParse(r.Refusal)
		return
	}
	if m.typ == msgTypeParse && r.Reset != ResetNone {
		if !isWholeReset(m.query, *r) {
			// What PostgreSQL answers before it runs anything.
			ss.failParse(&Error{Code: "42601", Message: "cannot insert multiple commands into a prepared statement"})
			return
		}
		if r.Reset == DiscardAll && ss.be != nil && ss.txStatus != 'I' {
			ss.failParse(discardInTransaction())
			return
		}
		rewritten := ss.resetParse(m.name, r.Reset)
		m = &rewritten
		if !ss.translatesNames() {
			// Names pass through: the reset is taken to run in this batch.
			ss.resetClient(be, r.Reset)
			ss.retags = append(ss.retags, retag{seq: ss.batchSeq(), tag: r.Reset.tag()})
		}
	}
	if ss.sessionMode && !ss.routedSession {
		ss.appendMsg(m.typ, m.body) // the backend is the client's own: names pass through
		return
	}
	w := want{primary: r.Primary, writes: r.Writes, gucs: r.SessionGUCs, pin: r.PinSession, state: r.SessionState, keeps: r.KeepsSessionState, ddl: r.ChangesSchema}
	switch m.typ {
	case msgTypeParse:
		if m.name == "" {
			ss.unnamed = &stmt{rest: bytes.Clone(m.rest), primary: w.primary, writes: w.writes, gucs: w.gucs, pin: w.pin, state: w.state, keeps: w.keeps, ddl: w.ddl, reset: r.Reset}
			ss.unnamedOnBackend = true
			ss.push(&ss.parseQ, queued{action: replyPass})
			ss.appendMsg(msgTypeParse, m.body)
			return
		}
		if _, dup := ss.stmts[m.name]; dup || ss.sqlStmts[m.name] != nil {
			ss.failParse(duplicateStmt(m.name))
			return
		}
		st := &stmt{proxyName: statementName(m.rest), rest: bytes.Clone(m.rest), primary: w.primary, writes: w.writes, gucs: w.gucs, pin: w.pin, state: w.state, keeps: w.keeps, ddl: w.ddl,
			epoch: ss.projRun.schema.Load(), reset: r.Reset}
		ss.stmts[m.name] = st
		ss.replayNamed = true // its translation depends on this backend
		ss.prepareOn(be, st, m.name)
	case msgTypeBind:
		var st *stmt
		if m.name == "" {
			st = ss.unnamed
			ss.ensureUnnamed()
			ss.appendMsg(msgTypeBind, m.body)
		} else {
			st = ss.stmts[m.name]
			ss.appendBind(m, ss.stmtTargetOf(be, m.name, st))
			if st != nil && st.epoch < ss.projRun.schema.Load() {
				// DDL since the client prepared it, and perhaps prepared
				// anew here: if its result no longer has the columns the
				// client's Bind asks formats for, PostgreSQL's own error
				// for a statement whose result type changed.
				ss.pushReplace(resultFormatsMismatch, planChangedBody)
			}
		}
		if st != nil && st.reset != ResetNone {
			// Its Execute resets the client's session (after this Bind,
			// which still needed the client's names).
			ss.resetClient(be, st.reset)
			ss.retags = append(ss.retags, retag{seq: ss.batchSeq(), tag: st.reset.tag()})
		}
	case msgTypeDescribe:
		if m.kind != kindStatement {
			ss.appendMsg(msgTypeDescribe, m.body)
			return
		}
		if m.name == "" {
			ss.ensureUnnamed()
			ss.appendMsg(msgTypeDescribe, m.body)
			return
		}
		ss.appendDescribe(ss.stmtTarget(be, m.name))
	case msgTypeClose:
		ss.push(&ss.closeQ, queued{action: replyPass})
		if m.kind == kindStatement && m.name != "" {
			ss.replayNamed = true
			// The backend's statement may serve other clients: keep it.
			delete(ss.stmts, m.name)
			ss.appendMsg(msgTypeClose, closeMsgBody(noopStmtName))
			return
		}
		if m.kind == kindStatement {
			ss.unnamed = nil
		}
		ss.appendMsg(msgTypeClose, m.body)
	default:
		ss.appendMsg(m.typ, m.body)
	}
}

// appendBind appends the client's Bind m with the backend's statement
// name in place of the client's.
func (ss *session) appendBind(m *extMsg, target string) {
	ss.appendMsg(msgTypeBind, appendCString(nil, m.portal), appendCString(nil, target), m.rest)
}

// appendDescribe appends a Describe of the backend's statement target.
func (ss *session) appendDescribe(target string) {
	ss.appendMsg(msgTypeDescribe, []byte{kindStatement}, appendCString(nil, target))
}

// failParse sends, in place of a Parse, one that fails, so PostgreSQL skips
// the rest of the batch as after any error; its syntax error is replaced by
// err. It replaces the backend's unnamed statement, as a failed Parse of the
// unnamed statement does.
func (ss *session) failParse(err error) {
	ss.pushReplace(refusedSQL, refusalBody(err))
	ss.push(&ss.parseQ, queued{action: replyPass})
	ss.appendMsg(msgTypeParse, []byte{0}, appendCString(nil, refusedSQL), []byte{0, 0})
	ss.unnamedOnBackend = false
}

// duplicateStmt is PostgreSQL's error for a statement name already in use.
func duplicateStmt(name string) error {
	return &Error{Code: CodeDuplicatePreparedStmt, Message: "prepared statement \"" + name + "\" already exists"}
}

// forgetLostParses drops the client's names whose Parse PostgreSQL did not
// carry out (it failed, or was skipped after an earlier error of its
// batch), so that the client may Parse them again as it may on PostgreSQL.
// The client goroutine calls it before it looks at its names.
func (ss *session) forgetLostParses() {
	if !ss.parsesLost.Load() {
		return
	}
	ss.mu.Lock()
	ss.parsesLost.Store(false)
	for _, lp := range ss.lostParses {
		if ss.stmts[lp.name] == lp.st {
			delete(ss.stmts, lp.name)
		}
	}
	ss.lostParses = ss.lostParses[:0]
	ss.mu.Unlock()
}

// stmtTarget returns the backend name to use for a client's statement,
// preparing it there first if needed; an unknown name maps to a stand-in
// that fails with 26000.
func (ss *session) stmtTarget(be *backend, name string) string {
	return ss.stmtTargetOf(be, name, ss.stmts[name])
}

// stmtTargetOf is stmtTarget for the client's statement st (nil: none of
// that name), already looked up.
func (ss *session) stmtTargetOf(be *backend, name string, st *stmt) string {
	ss.replayNamed = true // the translation depends on this backend's statements
	if st == nil {
		ss.pushRename(missingStmtName, name)
		return missingStmtName
	}
	ss.prepareOn(be, st, "")
	return st.proxyName
}

// prepareOn makes sure the backend has st. A client name says the client
// sent this Parse under that name and expects a ParseComplete for it.
func (ss *session) prepareOn(be *backend, st *stmt, client string) {
	clientParse := client != ""
	if be.stmts == nil {
		be.stmts = map[string]*backendStmt{}
	}
	be.clock++
	if bs := be.stmts[st.proxyName]; bs != nil && !bs.unsure && bs.epoch >= st.epoch {
		bs.lastUse = be.clock
		if clientParse {
			ss.push(&ss.closeQ, queued{action: replyAsParseComplete, client: client, clientStmt: st})
			ss.appendMsg(msgTypeClose, closeMsgBody(noopStmtName))
		}
		return
	} else if bs != nil {
		ss.push(&ss.closeQ, queued{action: replyDrop, stmt: st.proxyName})
		ss.appendMsg(msgTypeClose, closeMsgBody(st.proxyName))
	} else if len(be.stmts) >= ss.srv.opts.MaxPreparedStatements {
		victim, oldest := "", uint64(0)
		for n, v := range be.stmts {
			if victim == "" || v.lastUse < oldest {
				victim, oldest = n, v.lastUse
			}
		}
		delete(be.stmts, victim)
		ss.push(&ss.closeQ, queued{action: replyDrop, stmt: victim, evicted: true})
		ss.appendMsg(msgTypeClose, closeMsgBody(victim))
	}
	be.stmts[st.proxyName] = &backendStmt{lastUse: be.clock, epoch: ss.projRun.schema.Load()}
	action := replyDrop
	if clientParse {
		action = replyPass
	}
	ss.push(&ss.parseQ, queued{action: action, stmt: st.proxyName, client: client, clientStmt: st})
	ss.appendMsg(msgTypeParse, appendCString(nil, st.proxyName), st.rest)
}

// ensureUnnamed re-creates the client's unnamed statement on a backend that
// has not seen it in this attachment (the client parsed it in an earlier
// transaction, on another backend).
func (ss *session) ensureUnnamed() {
	if ss.unnamedOnBackend || ss.unnamed == nil {
		return
	}
	ss.push(&ss.parseQ, queued{action: replyDrop})
	ss.appendMsg(msgTypeParse, []byte{0}, ss.unnamed.rest)
	ss.unnamedOnBackend = true
}

// appendMsg appends one message made of parts to ss.out.
func (ss *session) appendMsg(typ byte, parts ...[]byte) {
	n := 4
	for _, p := range parts {
		n += len(p)
	}
	ss.out = append(ss.out, typ)
	ss.out = binary.BigEndian.AppendUint32(ss.out, uint32(n))
	for _, p := range parts {
		ss.out = append(ss.out, p...)
	}
}

// retranslate appends to ss.out what another backend gets for a client
// message already translated once (a read moved off a dead replica). It
// only reads the client's statement names, which the first translation
// already updated. Call with mu held.
func (ss *session) retranslate(be *backend, m *extMsg) {
	switch {
	case m.typ == msgTypeParse:
		if m.name == "" {
			ss.push(&ss.parseQ, queued{action: replyPass})
			ss.appendMsg(msgTypeParse, m.body)
			ss.unnamedOnBackend = true
			return
		}
		st := ss.stmts[m.name]
		if st == nil || st.proxyName != statementName(m.rest) {
			ss.failParse(duplicateStmt(m.name)) // the first translation refused it
			return
		}
		ss.prepareOn(be, st, m.name)
	case m.typ == msgTypeBind || (m.typ == msgTypeDescribe && m.kind == kindStatement):
		if m.name == "" {
			ss.ensureUnnamed()
			ss.appendMsg(m.typ, m.body)
			return
		}
		target := ss.stmtTarget(be, m.name)
		if m.typ == msgTypeBind {
			ss.appendBind(m, target)
		} else {
			ss.appendDescribe(target)
		}
	case m.typ == msgTypeClose:
		ss.push(&ss.closeQ, queued{action: replyPass})
		if m.kind == kindStatement && m.name != "" {
			ss.appendMsg(msgTypeClose, closeMsgBody(noopStmtName))
			return
		}
		ss.appendMsg(msgTypeClose, m.body)
	default:
		ss.appendMsg(m.typ, m.body)
	}
}

// popFront drops the first entry of a reply queue. The queues are short;
// shifting keeps their arrays for the next batch, where reslicing would
// shrink them until every push allocates.
func popFront[T any](q *[]T) { *q = slices.Delete(*q, 0, 1) }
