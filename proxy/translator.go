package proxy

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"slices"
	"strconv"
	"sync/atomic"

	"cascata/router"
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
	rest      []byte           // query text and parameter types as in Parse, after the name
	need      want             // what running its text needs of a backend
	epoch     uint64           // the project's schema epoch when the client parsed it
	reset     router.ResetKind // its text was RESET ALL or DISCARD ALL, rewritten (reset.go)
}

// maxUnnamedKeep is the longest unnamed statement text whose buffer the
// next Parse of the unnamed statement uses again.
const maxUnnamedKeep = 4 << 10

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

// translator maps a client's statement names to the backends' (see above)
// and keeps the queues that say what to do with each reply. It is part of
// one session and guarded by its lock; the parts that are the client
// goroutine's alone (the name maps, out) say so.
type translator struct {
	maxStmts int            // statements a backend keeps; the least recently used go beyond
	schema   *atomic.Uint64 // the project's schema epoch (DDL moves it)

	stmts            map[string]*stmt // the client's statements by its names
	unnamed          *stmt            // the client's unnamed statement (nil, or &unnamedStmt)
	unnamedStmt      stmt
	unnamedOnBackend bool                // ... is on the attached backend
	sqlStmts         map[string]*sqlStmt // SQL-level PREPAREd names (sqlprepared.go)
	parseQ, closeQ   []queued            // what to do with each ParseComplete, CloseComplete
	dropC            []uint64            // CommandCompletes of the proxy's own, by query
	retags           []retag             // CommandCompletes of a proxy-made reset, retagged (reset.go)
	sqlPrepFail      []sqlPrepareErr
	renames          []errRename
	lostParses       []lostParse // applied by the client goroutine (forgetLostParses)
	parsesLost       atomic.Bool // lostParses is not empty
	// syncSeq counts the Syncs and Queries sent, rfqSeq the ReadyForQuery
	// answers: the entries of a queue carry the number of their batch.
	syncSeq, rfqSeq uint64
	syncCounted     bool // the batch being translated has its Sync (or Query) in syncSeq already (mark, batchSeq)
	// replayNamed: the unit's translation used named statements, so a
	// replay translates the client's messages again.
	replayNamed bool
	out         []byte // the messages for the backend, being built
}

func newTranslator(maxStmts int, schema *atomic.Uint64) translator {
	return translator{maxStmts: maxStmts, schema: schema, stmts: map[string]*stmt{}, sqlStmts: map[string]*sqlStmt{}}
}

// stmtTable is a backend's record of the proxy-named statements prepared
// on it.
type stmtTable struct {
	stmts    map[string]*backendStmt // protocol-level, by proxy name
	clock    uint64                  // counts uses, for the least recently used
	sqlStmts map[string]bool         // SQL-level PREPAREd, by proxy name
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
func (t *translator) batchSeq() uint64 {
	if t.syncCounted {
		return t.syncSeq
	}
	return t.syncSeq + 1
}

// renameError applies to an error of the batch now being answered the
// first of its rename rules that matches, and drops that rule. Call with
// mu held.
func (t *translator) renameError(body []byte) []byte {
	for i, rn := range t.renames {
		if rn.seq > t.rfqSeq+1 {
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
		t.renames = slices.Delete(t.renames, i, i+1)
		return body
	}
	return body
}

// push queues an expected reply for the batch now being sent. Call with mu held.
func (t *translator) push(q *[]queued, e queued) {
	e.seq = t.batchSeq()
	*q = append(*q, e)
}

func (t *translator) pushRename(from, to string) {
	t.renames = append(t.renames, errRename{from: from, to: to, seq: t.batchSeq()})
}

// pushReplace says: the next error that mentions marker is replaced by body.
func (t *translator) pushReplace(marker string, body []byte) {
	t.renames = append(t.renames, errRename{from: marker, whole: body, seq: t.batchSeq()})
}

// answered records a ReadyForQuery from the backend with statement
// table bt: the batch it ends is over, and what it left unanswered is
// forgotten (dropUnanswered).
func (t *translator) answered(bt *stmtTable) {
	t.rfqSeq++
	t.dropUnanswered(bt)
}

// replyTo pops what to do with a ParseComplete or CloseComplete (typ) from
// its queue; a reply nothing was queued for passes.
func (t *translator) replyTo(typ byte) replyAction {
	q := &t.parseQ
	if typ == msgTypeCloseComplete {
		q = &t.closeQ
	}
	if len(*q) == 0 {
		return replyPass
	}
	a := (*q)[0].action
	popFront(q)
	return a
}

// lost records that the backend with statement table bt died: every
// batch sent is over (the client is told of the loss), and a Parse that
// did not run there leaves the client without that name.
func (t *translator) lost(bt *stmtTable) {
	t.rfqSeq = t.syncSeq
	t.dropUnanswered(bt)
	t.forgetReplies()
}

// discardStale drops what is queued when a unit starts on a new backend:
// nothing of the client's is in flight then, so anything queued was
// translated for a backend lost between the claim of a message and its
// translation, and will never be answered. A Parse among it never ran: its
// name is not the client's (forgetLostParses).
func (t *translator) discardStale() {
	for _, q := range [2][]queued{t.parseQ, t.closeQ} {
		for _, e := range q {
			if e.client != "" {
				t.lostParses = append(t.lostParses, lostParse{e.client, e.clientStmt})
				t.parsesLost.Store(true)
			}
		}
	}
	t.forgetReplies()
}

// forgetReplies empties the queues when a unit ends: nothing more will be
// answered on its backend.
func (t *translator) forgetReplies() {
	t.parseQ, t.closeQ, t.renames = t.parseQ[:0], t.closeQ[:0], t.renames[:0]
	t.dropC, t.sqlPrepFail, t.retags = t.dropC[:0], t.sqlPrepFail[:0], t.retags[:0]
}

// dropUnanswered forgets the expected replies of batches that have ended
// (their messages were skipped after an error) and marks the statements they
// concerned unsure on the backend. Call with mu held, at ReadyForQuery.
func (t *translator) dropUnanswered(bt *stmtTable) {
	for len(t.parseQ) > 0 && t.parseQ[0].seq <= t.rfqSeq {
		if e := t.parseQ[0]; e.client != "" {
			t.lostParses = append(t.lostParses, lostParse{e.client, e.clientStmt})
			t.parsesLost.Store(true)
		}
		if name := t.parseQ[0].stmt; name != "" && bt.stmts != nil {
			if bs := bt.stmts[name]; bs != nil {
				bs.unsure = true
			}
		}
		popFront(&t.parseQ)
	}
	for len(t.closeQ) > 0 && t.closeQ[0].seq <= t.rfqSeq {
		if e := t.closeQ[0]; e.client != "" {
			t.lostParses = append(t.lostParses, lostParse{e.client, e.clientStmt})
			t.parsesLost.Store(true)
		}
		if e := t.closeQ[0]; e.stmt != "" && bt.stmts != nil {
			if bs := bt.stmts[e.stmt]; bs != nil {
				bs.unsure = true
			} else if e.evicted {
				bt.stmts[e.stmt] = &backendStmt{unsure: true}
			}
		}
		popFront(&t.closeQ)
	}
	for len(t.renames) > 0 && t.renames[0].seq <= t.rfqSeq {
		popFront(&t.renames)
	}
	for len(t.dropC) > 0 && t.dropC[0] <= t.rfqSeq {
		popFront(&t.dropC)
	}
	for len(t.retags) > 0 && t.retags[0].seq <= t.rfqSeq {
		popFront(&t.retags)
	}
	for len(t.sqlPrepFail) > 0 && t.sqlPrepFail[0].seq <= t.rfqSeq {
		popFront(&t.sqlPrepFail)
	}
}

// translate appends to ss.out what the backend gets for one client message
// and queues what to do with the replies; r is the verdict on a Parse (zero
// for other messages). m was checked when it arrived, so nothing here can
// find it malformed. Call with mu held.
func (ss *session) translate(be *backend, m *extMsg, r *verdict) {
	if m.typ == msgTypeParse && r.refused != nil {
		ss.failParse(r.refused)
		return
	}
	if m.typ == msgTypeParse && r.Reset != router.ResetNone {
		if !isWholeReset(m.query, *r) {
			// What PostgreSQL answers before it runs anything.
			ss.failParse(&Error{Code: "42601", Message: "cannot insert multiple commands into a prepared statement"})
			return
		}
		if r.Reset == router.DiscardAll && ss.be != nil && ss.txStatus != txIdle {
			ss.failParse(discardInTransaction())
			return
		}
		rewritten := ss.resetParse(m.name, r.Reset)
		m = &rewritten
		if !ss.translatesNames() {
			// Names pass through: the reset is taken to run in this batch.
			ss.resetClient(be, r.Reset)
			ss.retags = append(ss.retags, retag{seq: ss.batchSeq(), tag: resetTag(r.Reset)})
		}
	}
	if !ss.translatesNames() {
		ss.appendMsg(m.typ, m.body) // the backend is the client's own: names pass through
		return
	}
	w := r.want()
	w.primary = r.Target == router.Primary // a hint in front of a Parse routes its own batch only
	if st := ss.translateNames(&be.stmtTable, m, w, r.Reset); st != nil && st.reset != router.ResetNone {
		// The Execute of this Bind resets the client's session (after the
		// Bind, which still needed the client's names).
		ss.resetClient(be, st.reset)
		ss.retags = append(ss.retags, retag{seq: ss.batchSeq(), tag: resetTag(st.reset)})
	}
}

// translateNames appends to out what the backend with statement table bt
// gets for the client's message m, its statement names mapped to the
// backend's, and queues what to do with the replies. w is what a Parse's
// text needs and reset what it resets. It returns the client's statement a
// Bind binds (nil: none, or another message).
func (t *translator) translateNames(bt *stmtTable, m *extMsg, w want, reset router.ResetKind) *stmt {
	switch m.typ {
	case msgTypeParse:
		if m.name == "" {
			// Its storage is the translator's, used again by every Parse
			// of the unnamed statement: nothing keeps a pointer to the
			// one before (wantOf copies what it needs).
			st := &t.unnamedStmt
			rest := st.rest[:0]
			if cap(rest) > maxUnnamedKeep {
				rest = nil // a very long text is not kept for the next
			}
			*st = stmt{rest: append(rest, m.rest...), need: w, reset: reset}
			t.unnamed = st
			t.unnamedOnBackend = true
			t.push(&t.parseQ, queued{action: replyPass})
			t.appendMsg(msgTypeParse, m.body)
			return nil
		}
		if _, dup := t.stmts[m.name]; dup || t.sqlStmts[m.name] != nil {
			t.failParse(duplicateStmt(m.name))
			return nil
		}
		st := &stmt{proxyName: statementName(m.rest), rest: bytes.Clone(m.rest), need: w, epoch: t.schema.Load(), reset: reset}
		t.stmts[m.name] = st
		t.replayNamed = true // its translation depends on this backend
		t.prepareOn(bt, st, m.name)
	case msgTypeBind:
		if m.name == "" {
			t.ensureUnnamed()
			t.appendMsg(msgTypeBind, m.body)
			return t.unnamed
		}
		st := t.stmts[m.name]
		t.appendBind(m, t.stmtTargetOf(bt, m.name, st))
		if st != nil && st.epoch < t.schema.Load() {
			// DDL since the client prepared it, and perhaps prepared anew
			// here: if its result no longer has the columns the client's
			// Bind asks formats for, PostgreSQL's own error for a statement
			// whose result type changed.
			t.pushReplace(resultFormatsMismatch, planChangedBody)
		}
		return st
	case msgTypeDescribe:
		switch {
		case m.kind != kindStatement:
			t.appendMsg(msgTypeDescribe, m.body)
		case m.name == "":
			t.ensureUnnamed()
			t.appendMsg(msgTypeDescribe, m.body)
		default:
			t.appendDescribe(t.stmtTarget(bt, m.name))
		}
	case msgTypeClose:
		t.push(&t.closeQ, queued{action: replyPass})
		if m.kind == kindStatement && m.name != "" {
			t.replayNamed = true
			// The backend's statement may serve other clients: keep it.
			delete(t.stmts, m.name)
			t.appendMsg(msgTypeClose, closeMsgBody(noopStmtName))
			return nil
		}
		if m.kind == kindStatement {
			t.unnamed = nil
		}
		t.appendMsg(msgTypeClose, m.body)
	default:
		t.appendMsg(m.typ, m.body)
	}
	return nil
}

// appendBind appends the client's Bind m with the backend's statement
// name in place of the client's.
func (t *translator) appendBind(m *extMsg, target string) {
	t.out = append(t.out, msgTypeBind)
	t.out = binary.BigEndian.AppendUint32(t.out, uint32(4+len(m.portal)+1+len(target)+1+len(m.rest)))
	t.out = appendCString(t.out, m.portal)
	t.out = appendCString(t.out, target)
	t.out = append(t.out, m.rest...)
}

// appendDescribe appends a Describe of the backend's statement target.
func (t *translator) appendDescribe(target string) {
	t.appendMsg(msgTypeDescribe, []byte{kindStatement}, appendCString(nil, target))
}

// failParse sends, in place of a Parse, one that fails, so PostgreSQL skips
// the rest of the batch as after any error; its syntax error is replaced by
// err. It replaces the backend's unnamed statement, as a failed Parse of the
// unnamed statement does.
func (t *translator) failParse(err error) {
	t.pushReplace(refusedSQL, refusalBody(err))
	t.push(&t.parseQ, queued{action: replyPass})
	t.appendMsg(msgTypeParse, []byte{0}, appendCString(nil, refusedSQL), []byte{0, 0})
	t.unnamedOnBackend = false
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
	ss.forgetLost()
	ss.mu.Unlock()
}

// forgetLost is forgetLostParses under the session's lock.
func (t *translator) forgetLost() {
	t.parsesLost.Store(false)
	for _, lp := range t.lostParses {
		if t.stmts[lp.name] == lp.st {
			delete(t.stmts, lp.name)
		}
	}
	t.lostParses = t.lostParses[:0]
}

// stmtTarget returns the backend name to use for a client's statement,
// preparing it there first if needed; an unknown name maps to a stand-in
// that fails with 26000.
func (t *translator) stmtTarget(bt *stmtTable, name string) string {
	return t.stmtTargetOf(bt, name, t.stmts[name])
}

// stmtTargetOf is stmtTarget for the client's statement st (nil: none of
// that name), already looked up.
func (t *translator) stmtTargetOf(bt *stmtTable, name string, st *stmt) string {
	t.replayNamed = true // the translation depends on this backend's statements
	if st == nil {
		t.pushRename(missingStmtName, name)
		return missingStmtName
	}
	t.prepareOn(bt, st, "")
	return st.proxyName
}

// prepareOn makes sure the backend has st. A client name says the client
// sent this Parse under that name and expects a ParseComplete for it.
func (t *translator) prepareOn(bt *stmtTable, st *stmt, client string) {
	clientParse := client != ""
	if bt.stmts == nil {
		bt.stmts = map[string]*backendStmt{}
	}
	bt.clock++
	if bs := bt.stmts[st.proxyName]; bs != nil && !bs.unsure && bs.epoch >= st.epoch {
		bs.lastUse = bt.clock
		if clientParse {
			t.push(&t.closeQ, queued{action: replyAsParseComplete, client: client, clientStmt: st})
			t.appendMsg(msgTypeClose, closeMsgBody(noopStmtName))
		}
		return
	} else if bs != nil {
		t.push(&t.closeQ, queued{action: replyDrop, stmt: st.proxyName})
		t.appendMsg(msgTypeClose, closeMsgBody(st.proxyName))
	} else if len(bt.stmts) >= t.maxStmts {
		victim, oldest := "", uint64(0)
		for n, v := range bt.stmts {
			if victim == "" || v.lastUse < oldest {
				victim, oldest = n, v.lastUse
			}
		}
		delete(bt.stmts, victim)
		t.push(&t.closeQ, queued{action: replyDrop, stmt: victim, evicted: true})
		t.appendMsg(msgTypeClose, closeMsgBody(victim))
	}
	bt.stmts[st.proxyName] = &backendStmt{lastUse: bt.clock, epoch: t.schema.Load()}
	action := replyDrop
	if clientParse {
		action = replyPass
	}
	t.push(&t.parseQ, queued{action: action, stmt: st.proxyName, client: client, clientStmt: st})
	t.appendMsg(msgTypeParse, appendCString(nil, st.proxyName), st.rest)
}

// ensureUnnamed re-creates the client's unnamed statement on a backend that
// has not seen it in this attachment (the client parsed it in an earlier
// transaction, on another backend).
func (t *translator) ensureUnnamed() {
	if t.unnamedOnBackend || t.unnamed == nil {
		return
	}
	t.push(&t.parseQ, queued{action: replyDrop})
	t.appendMsg(msgTypeParse, []byte{0}, t.unnamed.rest)
	t.unnamedOnBackend = true
}

// appendMsg appends one message made of parts to ss.out.
func (t *translator) appendMsg(typ byte, parts ...[]byte) {
	n := 4
	for _, p := range parts {
		n += len(p)
	}
	t.out = append(t.out, typ)
	t.out = binary.BigEndian.AppendUint32(t.out, uint32(n))
	for _, p := range parts {
		t.out = append(t.out, p...)
	}
}

// retranslate appends to ss.out what another backend gets for a client
// message already translated once (a read moved off a dead replica). It
// only reads the client's statement names, which the first translation
// already updated. Call with mu held.
func (t *translator) retranslate(bt *stmtTable, m *extMsg) {
	switch {
	case m.typ == msgTypeParse:
		if m.name == "" {
			t.push(&t.parseQ, queued{action: replyPass})
			t.appendMsg(msgTypeParse, m.body)
			t.unnamedOnBackend = true
			return
		}
		st := t.stmts[m.name]
		if st == nil || st.proxyName != statementName(m.rest) {
			t.failParse(duplicateStmt(m.name)) // the first translation refused it
			return
		}
		t.prepareOn(bt, st, m.name)
	case m.typ == msgTypeBind || (m.typ == msgTypeDescribe && m.kind == kindStatement):
		if m.name == "" {
			t.ensureUnnamed()
			t.appendMsg(m.typ, m.body)
			return
		}
		target := t.stmtTarget(bt, m.name)
		if m.typ == msgTypeBind {
			t.appendBind(m, target)
		} else {
			t.appendDescribe(target)
		}
	case m.typ == msgTypeClose:
		t.push(&t.closeQ, queued{action: replyPass})
		if m.kind == kindStatement && m.name != "" {
			t.appendMsg(msgTypeClose, closeMsgBody(noopStmtName))
			return
		}
		t.appendMsg(msgTypeClose, m.body)
	default:
		t.appendMsg(m.typ, m.body)
	}
}

// popFront drops the first entry of a reply queue. The queues are short;
// shifting keeps their arrays for the next batch, where reslicing would
// shrink them until every push allocates.
func popFront[T any](q *[]T) { *q = slices.Delete(*q, 0, 1) }
