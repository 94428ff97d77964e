package router

import (
	"errors"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"

	pg_query "github.com/pganalyze/pg_query_go/v5"
	"github.com/pganalyze/pg_query_go/v5/parser"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// cursorOptHold is CURSOR_OPT_HOLD of PostgreSQL's parsenodes.h.
const cursorOptHold = 0x0020

// maxSQLExecDepth bounds the recursion into SQL-text arguments of
// SQL-executing built-ins whose query text itself calls such built-ins.
const maxSQLExecDepth = 4

// facts is the policy-independent result of analysing one text. Values are
// immutable once built and shared between goroutines through the caches.
type facts struct {
	statements int
	// refusal applies whatever the policy.
	refusal *Refusal
	// refusalReason is ReasonRefused or ReasonUnparsable.
	refusalReason Reason
	// untrusted applies unless Policy.TrustedRole (DO, CREATE FUNCTION).
	untrusted *Refusal
	target    Target
	reason    Reason
	tx        TxEffect
	txLast    TxEffect
	pin       bool
	// state: some statement may leave session state the proxy does not
	// track itself (Decision.SessionState).
	state bool
	// keeps: Decision.KeepsSessionState.
	keeps bool
	// ddl: Decision.ChangesSchema.
	ddl bool
	// reset: Decision.Reset; resets counts them, resetStart/End locate it.
	reset                ResetKind
	resets               int
	resetStart, resetEnd int
	// afterTxEnd: Decision.StatementsAfterTxEnd.
	afterTxEnd bool
	// copyIn: Decision.CopyFromClient.
	copyIn bool
	hint   RouteHint
	gucs   []string
	// dealloc is set when a statement is DEALLOCATE.
	dealloc *Deallocate
	// sqlPrepared names the statement of a PREPARE or EXECUTE.
	sqlPrepared *SQLPrepared
	// preparedUses counts SQL-level PREPARE, EXECUTE and DEALLOCATE
	// anywhere in the text: top level, under EXPLAIN or CREATE TABLE AS,
	// and in the constant queries of SQL-executing built-ins.
	preparedUses int
	// backendState: the text reads the backend's own prepared statements
	// or cursors (pg_prepared_statements, pg_cursors), which on a shared
	// backend belong to other clients too.
	backendState bool
	// funcs are functions unknown to the built-in tables, called by
	// statements whose Target or PinSession their volatility may change.
	funcs []QualifiedName
	// normalizable: the facts hold for every text with the same normalized
	// key (see normalizeKey), so they may be cached under it.
	normalizable bool
}

// refusedFacts builds the facts of a text refused before analysis.
func refusedFacts(reason Reason, state, msg string) *facts {
	return &facts{refusal: &Refusal{SQLState: state, Message: msg}, refusalReason: reason, target: Primary}
}

// apply applies a policy to the facts.
func (f *facts) apply(p Policy) Decision {
	if f.refusal != nil {
		return refusedDecision(f, f.refusal, f.refusalReason)
	}
	if f.untrusted != nil && !p.TrustedRole {
		return refusedDecision(f, f.untrusted, ReasonRefused)
	}
	d := Decision{
		Target:       f.target,
		Reason:       f.reason,
		Tx:           f.tx,
		TxLast:       f.txLast,
		PinSession:   f.pin,
		SessionState: f.state,
		RouteHint:    f.hint,

		KeepsSessionState: f.keeps,
		ChangesSchema:     f.ddl,
		Reset:             f.reset,
		ResetStart:        f.resetStart,
		ResetEnd:          f.resetEnd,

		StatementsAfterTxEnd: f.afterTxEnd,
		CopyFromClient:       f.copyIn,
		Statements:           f.statements,
		SessionGUCs:          f.gucs,
	}
	if f.statements == 1 && f.preparedUses == 1 {
		d.Deallocate = f.dealloc
		d.SQLPrepared = f.sqlPrepared
	}
	d.PreparedUses = f.preparedUses
	d.ReadsBackendState = f.backendState
	if len(f.funcs) > 0 {
		volatile := false
		var unknown []QualifiedName
		for _, q := range f.funcs {
			v := VolatilityUnknown
			if p.Functions != nil {
				v = p.Functions.Volatility(q.Schema, q.Name)
			}
			switch v {
			case Immutable, Stable:
			case Volatile:
				volatile = true
			default:
				volatile = true
				unknown = append(unknown, q)
			}
		}
		if volatile {
			if d.Target == Replica {
				d.Target = Primary
				d.Reason = ReasonVolatileFunction
			}
			d.PinSession = true
			d.SessionState = true
			d.UnknownFunctions = unknown
		}
	}
	if f.hint == ForcePrimaryOnce && d.Target == Replica && f.statements > 0 {
		d.Target = Primary
		d.Reason = ReasonHint
	}
	d.Writes = mayWrite(d.Target, d.Reason)
	return d
}

// mayWrite is Decision.Writes: the primary, for a reason that may change data.
func mayWrite(t Target, r Reason) bool {
	switch r {
	case ReasonTxControl, ReasonSessionState, ReasonHint, ReasonRead, ReasonEmpty, ReasonCursor:
		return false
	}
	return t == Primary
}

func refusedDecision(f *facts, r *Refusal, reason Reason) Decision {
	cp := *r
	return Decision{Target: Primary, Reason: reason, Refusal: &cp, Statements: f.statements, Writes: mayWrite(Primary, reason)}
}

// checkText refuses texts that cannot be inspected faithfully: invalid
// UTF-8 and NUL bytes (the C parser would stop at a NUL). It returns nil
// for acceptable texts.
func checkText(sql string) *facts {
	if strings.IndexByte(sql, 0) >= 0 {
		return refusedFacts(ReasonUnparsable, SQLStateCharacterNotInRepertoire, "invalid byte sequence for encoding \"UTF8\": 0x00")
	}
	if !utf8.ValidString(sql) {
		return refusedFacts(ReasonUnparsable, SQLStateCharacterNotInRepertoire, "invalid byte sequence for encoding \"UTF8\"")
	}
	return nil
}

// analyze parses and analyses sql (which passed checkText). spans are the
// literal starts found by normalizeKey when the caller wants to know
// whether the facts may be cached under the normalized key (nil otherwise).
func analyze(sql string, spans []int32) *facts {
	a := &analyzer{sql: sql, f: &facts{}, wantLocs: spans != nil}
	a.run()
	f := a.f
	if spans != nil && f.refusalReason != ReasonUnparsable && a.eligible && !a.literalDep && f.untrusted == nil {
		f.normalizable = spansMapped(sql, spans, a.constLocs)
	}
	return f
}

// analyzer holds the state of one analysis.
type analyzer struct {
	sql   string
	f     *facts
	depth int
	// eligible: every statement is of a kind whose analysis never depends
	// on literal values (SELECT/INSERT/UPDATE/DELETE/MERGE).
	eligible bool
	// stmtStart, stmtEnd: the byte offsets of the statement being analysed.
	stmtStart, stmtEnd int
	// literalDep: the analysis read the value of some constant.
	literalDep bool
	wantLocs   bool
	constLocs  []int32
	// acc accumulates what the walk finds in the current top-level statement.
	acc stmtAcc
}

// stmtAcc is what the tree walk found in one top-level statement.
type stmtAcc struct {
	write       bool // INSERT/UPDATE/DELETE/MERGE executed
	into        bool // SELECT INTO executed
	locking     bool // FOR UPDATE/SHARE ... executed
	sidePrimary bool // side-effect built-in executed
	sidePin     bool // side-effect built-in with session state executed
	funcs       []QualifiedName
}

// stmtInfo is the routing of one statement before the walk's findings.
type stmtInfo struct {
	target Target
	reason Reason
	tx     TxEffect
	pin    bool
	state  bool // may leave untracked session state (facts.state)
}

// wctx is the context of the tree walk.
type wctx struct {
	exec    bool // the node is executed: routing findings count
	ddl     bool // inside a DDL statement: no mention of dangerous functions
	viewDef bool // inside CREATE VIEW / CREATE RULE: no reference to pg_settings
}

func (a *analyzer) refuse(msg string) {
	a.refuseCode(SQLStateInsufficientPrivilege, msg)
}

func (a *analyzer) refuseCode(state, msg string) {
	if a.f.refusal == nil {
		a.f.refusal = &Refusal{SQLState: state, Message: msg}
		a.f.refusalReason = ReasonRefused
	}
}

func (a *analyzer) run() {
	tree, err := pg_query.Parse(a.sql)
	if err != nil {
		a.f.refusal = &Refusal{SQLState: SQLStateSyntaxError, Message: err.Error()}
		var pe *parser.Error
		if errors.As(err, &pe) && a.depth == 0 {
			a.f.refusal.Position = pe.Cursorpos
		}
		a.f.refusalReason = ReasonUnparsable
		a.f.target = Primary
		return
	}
	f := a.f
	a.eligible = true
	if leadingRouteHint(a.sql) {
		f.hint = ForcePrimaryOnce
	}
	primaryReason, otherReason := ReasonEmpty, ReasonEmpty
	sessionHint, txEnded := false, false
	for _, raw := range tree.GetStmts() {
		if txEnded {
			f.afterTxEnd = true
		}
		a.acc = stmtAcc{}
		a.stmtStart = int(raw.GetStmtLocation())
		a.stmtEnd = len(a.sql)
		if l := raw.GetStmtLen(); l > 0 {
			a.stmtEnd = a.stmtStart + int(l)
		}
		for a.stmtStart < a.stmtEnd && isSpace(a.sql[a.stmtStart]) {
			a.stmtStart++
		}
		for a.stmtEnd > a.stmtStart && isSpace(a.sql[a.stmtEnd-1]) {
			a.stmtEnd--
		}
		info := a.statement(raw.GetStmt())
		info = a.acc.upgrade(info)
		if a.acc.into && mentionsTemp(a.sql[a.stmtStart:a.stmtEnd]) {
			f.keeps = true // SELECT ... INTO TEMP
		}
		if info.target == Replica || !info.pin || !info.state {
			for _, q := range a.acc.funcs {
				if !slices.Contains(f.funcs, q) {
					f.funcs = append(f.funcs, q)
				}
			}
		}
		f.statements++
		if info.target == Primary {
			if f.target == Replica {
				f.target = Primary
				primaryReason = info.reason
			}
		} else if otherReason == ReasonEmpty && info.reason != ReasonTxControl {
			otherReason = info.reason
		}
		if info.pin {
			f.pin = true
		}
		if info.state {
			f.state = true
		}
		switch info.tx {
		case TxCommit, TxCommitAndChain, TxRollback, TxRollbackAndChain, TxPrepare:
			txEnded = true
		}
		if info.tx != TxNone {
			if f.tx == TxNone {
				f.tx = info.tx
			}
			f.txLast = info.tx
		}
		if info.reason == ReasonHint {
			sessionHint = true
		}
	}
	switch {
	case f.statements == 0:
		f.reason = ReasonEmpty
		f.hint = HintNone
	case f.target == Primary:
		f.reason = primaryReason
	case otherReason != ReasonEmpty:
		f.reason = otherReason
	default:
		f.reason = ReasonTxControl
	}
	if sessionHint && f.statements != 1 {
		a.refuseCode(SQLStateFeatureNotSupported, "SET cascata.route must be sent as a query of its own")
	}
	switch {
	case f.resets > 1:
		a.refuseCode(SQLStateFeatureNotSupported, "RESET ALL or DISCARD ALL may appear once in a query")
	case f.reset == DiscardAll && f.statements != 1:
		a.refuseCode(SQLStateActiveSQLTransaction, "DISCARD ALL cannot run inside a transaction block")
	}
	if f.target == Primary && f.pin && f.state {
		f.funcs = nil // their volatility can change nothing
	}
	if f.refusal != nil {
		f.target = Primary
	}
}

// upgrade applies the walk's findings to the statement's own routing.
func (acc *stmtAcc) upgrade(info stmtInfo) stmtInfo {
	up := func(r Reason, pin bool) {
		if info.target == Replica {
			info.target = Primary
			info.reason = r
		}
		info.pin = info.pin || pin
		// Plain writes leave no session state of their own.
		info.state = info.state || pin && r != ReasonWrite
	}
	if acc.write {
		up(ReasonWrite, true)
	}
	if acc.into {
		up(ReasonDDL, true)
	}
	if acc.locking {
		up(ReasonLockingRead, false)
	}
	if acc.sidePin {
		up(ReasonVolatileFunction, true)
	}
	if acc.sidePrimary {
		up(ReasonVolatileFunction, false)
	}
	return info
}

// statement classifies one statement node and walks it.
func (a *analyzer) statement(n *pg_query.Node) stmtInfo {
	if n == nil {
		return stmtInfo{target: Replica, reason: ReasonRead}
	}
	// Pinning statements may leave session state, but for plain writes
	// (none of their own) and SQL PREPARE (its statement is the proxy's,
	// under a name of its own).
	primary := func(r Reason, pin bool) stmtInfo {
		return stmtInfo{target: Primary, reason: r, pin: pin, state: pin && r != ReasonWrite}
	}
	switch n.GetNode().(type) {
	case *pg_query.Node_SelectStmt:
		a.visit(n.ProtoReflect(), wctx{exec: true})
		return stmtInfo{target: Replica, reason: ReasonRead}
	case *pg_query.Node_InsertStmt, *pg_query.Node_UpdateStmt, *pg_query.Node_DeleteStmt, *pg_query.Node_MergeStmt:
		a.visit(n.ProtoReflect(), wctx{exec: true})
		return primary(ReasonWrite, true)
	}
	a.eligible = false
	switch s := n.GetNode().(type) {
	case *pg_query.Node_ExplainStmt:
		return a.explain(s.ExplainStmt)
	case *pg_query.Node_CopyStmt:
		return a.copyStmt(s.CopyStmt)
	case *pg_query.Node_DeclareCursorStmt:
		info := a.statement(s.DeclareCursorStmt.GetQuery())
		if s.DeclareCursorStmt.GetOptions()&cursorOptHold != 0 {
			if info.target == Replica {
				info.reason = ReasonCursor
			}
			info.target, info.pin, info.state = Primary, true, true
			a.f.keeps = true
		}
		return info
	case *pg_query.Node_FetchStmt, *pg_query.Node_ClosePortalStmt:
		return stmtInfo{target: Replica, reason: ReasonCursor}
	case *pg_query.Node_TransactionStmt:
		return a.transaction(s.TransactionStmt)
	case *pg_query.Node_VariableSetStmt:
		return a.topSet(s.VariableSetStmt)
	case *pg_query.Node_VariableShowStmt:
		return stmtInfo{target: Replica, reason: ReasonRead}
	case *pg_query.Node_ConstraintsSetStmt:
		return stmtInfo{target: Replica, reason: ReasonSessionState}
	case *pg_query.Node_DiscardStmt:
		if s.DiscardStmt.GetTarget() == pg_query.DiscardMode_DISCARD_ALL {
			a.sessionReset(DiscardAll, "DISCARD ALL")
			return primary(ReasonSessionState, true)
		}
		return primary(ReasonSessionState, false)
	case *pg_query.Node_PrepareStmt:
		a.f.preparedUses++
		a.children(s.PrepareStmt.ProtoReflect(), wctx{})
		a.f.sqlPrepared = a.sqlPrepared(false, s.PrepareStmt.GetName())
		return stmtInfo{target: Primary, reason: ReasonPrepared, pin: true}
	case *pg_query.Node_ExecuteStmt:
		a.f.preparedUses++
		a.children(s.ExecuteStmt.ProtoReflect(), wctx{exec: true})
		a.f.sqlPrepared = a.sqlPrepared(true, s.ExecuteStmt.GetName())
		return primary(ReasonPrepared, true) // the statement may do anything a text can
	case *pg_query.Node_DeallocateStmt:
		a.f.preparedUses++
		name := s.DeallocateStmt.GetName()
		a.f.dealloc = &Deallocate{All: name == "", Name: name}
		return primary(ReasonPrepared, false)
	case *pg_query.Node_CallStmt:
		a.visit(n.ProtoReflect(), wctx{exec: true})
		return primary(ReasonCall, true)
	case *pg_query.Node_DoStmt:
		a.visit(n.ProtoReflect(), wctx{exec: true})
		return primary(ReasonCall, true)
	case *pg_query.Node_ListenStmt:
		a.f.keeps = true
		return primary(ReasonListenNotify, true)
	case *pg_query.Node_UnlistenStmt:
		return primary(ReasonListenNotify, true)
	case *pg_query.Node_NotifyStmt:
		return primary(ReasonListenNotify, false)
	case *pg_query.Node_LockStmt:
		a.visit(n.ProtoReflect(), wctx{exec: true})
		return primary(ReasonLock, false)
	case *pg_query.Node_VacuumStmt, *pg_query.Node_ClusterStmt, *pg_query.Node_ReindexStmt, *pg_query.Node_CheckPointStmt:
		a.visit(n.ProtoReflect(), wctx{exec: true})
		return primary(ReasonMaintenance, false)
	case *pg_query.Node_TruncateStmt:
		a.visit(n.ProtoReflect(), wctx{exec: true})
		return primary(ReasonWrite, true)
	}
	// Everything else is DDL or another utility statement that changes the
	// database: the walk applies the DDL rules and refuses what must be.
	a.visit(n.ProtoReflect(), wctx{exec: true, ddl: true})
	a.f.ddl = true
	if mentionsTemp(a.sql[a.stmtStart:a.stmtEnd]) {
		a.f.keeps = true // CREATE TEMP ..., CREATE ... pg_temp.name
	}
	return primary(ReasonDDL, true)
}

// mentionsTemp reports whether a text has the word TEMP or TEMPORARY, or
// pg_temp, in any case: DDL that may create temporary objects. A false
// positive only costs the proxy a look at the backend.
func mentionsTemp(sql string) bool {
	word := func(i int, w string) bool {
		return i >= 0 && i+len(w) <= len(sql) && strings.EqualFold(sql[i:i+len(w)], w)
	}
	for i := 0; i+4 <= len(sql); i++ {
		switch {
		case !word(i, "temp"):
		case word(i-3, "pg_") && (i == 3 || !isIdentCont(sql[i-4])):
			return true // pg_temp, pg_temp_3
		case i > 0 && isIdentCont(sql[i-1]):
		default:
			end := i + 4
			if word(end, "orary") {
				end += 5
			}
			if end == len(sql) || !isIdentCont(sql[end]) {
				return true
			}
		}
	}
	return false
}

// sqlPrepared describes the PREPARE or EXECUTE being analysed, with the
// text after its statement name, or is nil when that text cannot be found
// (then the statement is never the lone one a proxy may translate).
func (a *analyzer) sqlPrepared(execute bool, name string) *SQLPrepared {
	kw := "PREPARE"
	if execute {
		kw = "EXECUTE"
	}
	tail, ok := afterStatementName(a.sql[a.stmtStart:a.stmtEnd], kw)
	if !ok {
		return nil
	}
	return &SQLPrepared{Execute: execute, Name: name, Tail: tail}
}

// sessionReset records a top-level RESET ALL or DISCARD ALL, which a proxy
// emulates when it is the whole text (see Decision.Reset); in a query given
// to a function it is refused.
func (a *analyzer) sessionReset(k ResetKind, what string) {
	if a.depth > 0 {
		a.refuse(what + " is not allowed here: it would reset the session role")
		return
	}
	a.f.reset = k
	a.f.resets++
	a.f.resetStart, a.f.resetEnd = a.stmtStart, a.stmtEnd
}

// explain handles EXPLAIN: without ANALYZE the statement is not executed.
func (a *analyzer) explain(s *pg_query.ExplainStmt) stmtInfo {
	analyze := false
	for _, o := range s.GetOptions() {
		d := o.GetDefElem()
		if d == nil || !strings.EqualFold(d.GetDefname(), "analyze") {
			continue
		}
		a.literalDep = true
		analyze = defElemTrue(d)
	}
	if analyze {
		if q := s.GetQuery(); q.GetExecuteStmt() != nil {
			a.f.preparedUses++ // under EXPLAIN: never the lone statement
		}
		return a.statement(s.GetQuery())
	}
	q := s.GetQuery()
	a.visit(q.ProtoReflect(), wctx{})
	if q.GetExecuteStmt() != nil {
		// The prepared statement lives where PREPARE ran: the primary.
		return stmtInfo{target: Primary, reason: ReasonPrepared}
	}
	return stmtInfo{target: Replica, reason: ReasonRead}
}

// defElemTrue evaluates a boolean option the way defGetBoolean does,
// treating anything unrecognised as true (the executing interpretation).
func defElemTrue(d *pg_query.DefElem) bool {
	arg := d.GetArg()
	if arg == nil {
		return true
	}
	if i := arg.GetInteger(); i != nil {
		return i.GetIval() != 0
	}
	if str := arg.GetString_(); str != nil {
		return !isOffValue(str.GetSval())
	}
	if b := arg.GetBoolean(); b != nil {
		return b.GetBoolval()
	}
	return true
}

// copyStmt handles COPY.
func (a *analyzer) copyStmt(s *pg_query.CopyStmt) stmtInfo {
	if s.GetIsProgram() {
		a.refuse("COPY ... PROGRAM is not allowed")
	}
	if w := s.GetWhereClause(); w != nil {
		a.visit(w.ProtoReflect(), wctx{exec: true})
	}
	if rel := s.GetRelation(); rel != nil {
		a.visit(rel.ProtoReflect(), wctx{exec: true})
	}
	info := stmtInfo{target: Replica, reason: ReasonRead}
	if q := s.GetQuery(); q != nil {
		info = a.statement(q)
	}
	switch {
	case s.GetIsFrom():
		if s.GetFilename() == "" {
			a.f.copyIn = true // FROM STDIN
		}
		return stmtInfo{target: Primary, reason: ReasonWrite, pin: true}
	case s.GetFilename() != "" && info.target == Replica:
		// COPY TO a server file: a side effect on the server.
		return stmtInfo{target: Primary, reason: ReasonWrite}
	}
	return info
}

// transaction handles BEGIN/COMMIT/... .
func (a *analyzer) transaction(s *pg_query.TransactionStmt) stmtInfo {
	info := stmtInfo{target: Replica, reason: ReasonTxControl}
	switch s.GetKind() {
	case pg_query.TransactionStmtKind_TRANS_STMT_BEGIN, pg_query.TransactionStmtKind_TRANS_STMT_START:
		a.literalDep = true
		if txOptionsReadOnly(s.GetOptions()) == TxSetTransactionReadOnly {
			info.tx = TxBeginReadOnly
		} else {
			info.tx = TxBegin
			info.target = Primary
		}
	case pg_query.TransactionStmtKind_TRANS_STMT_COMMIT:
		info.tx = TxCommit
		if s.GetChain() {
			info.tx = TxCommitAndChain
		}
	case pg_query.TransactionStmtKind_TRANS_STMT_ROLLBACK:
		info.tx = TxRollback
		if s.GetChain() {
			info.tx = TxRollbackAndChain
		}
	case pg_query.TransactionStmtKind_TRANS_STMT_SAVEPOINT:
		info.tx = TxSavepoint
	case pg_query.TransactionStmtKind_TRANS_STMT_RELEASE:
		info.tx = TxReleaseSavepoint
	case pg_query.TransactionStmtKind_TRANS_STMT_ROLLBACK_TO:
		info.tx = TxRollbackToSavepoint
	case pg_query.TransactionStmtKind_TRANS_STMT_PREPARE:
		info.tx, info.target = TxPrepare, Primary
	case pg_query.TransactionStmtKind_TRANS_STMT_COMMIT_PREPARED:
		info.tx, info.target = TxCommitPrepared, Primary
	case pg_query.TransactionStmtKind_TRANS_STMT_ROLLBACK_PREPARED:
		info.tx, info.target = TxRollbackPrepared, Primary
	default:
		info.target = Primary
	}
	return info
}

// txOptionsReadOnly evaluates transaction_mode DefElems (BEGIN, SET
// TRANSACTION): TxSetTransactionReadOnly when they make the transaction
// read-only and not serializable, TxSetTransactionReadWrite when they
// require the primary (READ WRITE or SERIALIZABLE), TxNone otherwise.
func txOptionsReadOnly(opts []*pg_query.Node) TxEffect {
	readOnly, readWrite, serializable := false, false, false
	for _, o := range opts {
		d := o.GetDefElem()
		if d == nil {
			continue
		}
		switch d.GetDefname() {
		case "transaction_read_only":
			if constTrue(d.GetArg()) {
				readOnly = true
			} else {
				readWrite = true
			}
		case "transaction_isolation":
			v, ok := constString(d.GetArg())
			if !ok || strings.EqualFold(v, "serializable") {
				serializable = true
			}
		}
	}
	switch {
	case readWrite || serializable:
		return TxSetTransactionReadWrite
	case readOnly:
		return TxSetTransactionReadOnly
	}
	return TxNone
}

// constTrue reports whether n is a constant that PostgreSQL reads as true.
func constTrue(n *pg_query.Node) bool {
	c := n.GetAConst()
	if c == nil {
		return false
	}
	switch {
	case c.GetIval() != nil:
		return c.GetIval().GetIval() != 0
	case c.GetBoolval() != nil:
		return c.GetBoolval().GetBoolval()
	case c.GetSval() != nil:
		return isOnValue(c.GetSval().GetSval())
	}
	return false
}

// constString returns the value of a string constant, also through a cast
// to text, varchar, bpchar or name. Integer constants are returned in
// decimal.
func constString(n *pg_query.Node) (string, bool) {
	if tc := n.GetTypeCast(); tc != nil {
		names := tc.GetTypeName().GetNames()
		if len(names) == 0 || tc.GetTypeName().GetArrayBounds() != nil {
			return "", false
		}
		switch names[len(names)-1].GetString_().GetSval() {
		case "text", "varchar", "bpchar", "name":
		default:
			return "", false
		}
		n = tc.GetArg()
	}
	c := n.GetAConst()
	if c == nil || c.GetIsnull() {
		return "", false
	}
	if s := c.GetSval(); s != nil {
		return s.GetSval(), true
	}
	if i := c.GetIval(); i != nil {
		return strconv.Itoa(int(i.GetIval())), true
	}
	return "", false
}

// topSet handles a top-level SET/RESET.
func (a *analyzer) topSet(s *pg_query.VariableSetStmt) stmtInfo {
	a.literalDep = true
	session := stmtInfo{target: Primary, reason: ReasonSessionState}
	switch s.GetKind() {
	case pg_query.VariableSetKind_VAR_RESET_ALL:
		a.sessionReset(ResetAll, "RESET ALL")
		session.pin = true
		return session
	case pg_query.VariableSetKind_VAR_SET_MULTI:
		switch s.GetName() {
		case "TRANSACTION":
			tx := txOptionsReadOnly(s.GetArgs())
			info := stmtInfo{target: Replica, reason: ReasonTxControl, tx: tx}
			if tx == TxSetTransactionReadWrite {
				info.target = Primary
			}
			return info
		case "SESSION CHARACTERISTICS":
			for _, o := range s.GetArgs() {
				if d := o.GetDefElem(); d != nil {
					a.addGUC(sessionCharacteristicsGUC(d.GetDefname()))
				}
			}
			session.pin = true
			return session
		case "TRANSACTION SNAPSHOT":
			return stmtInfo{target: Primary, reason: ReasonTxControl}
		}
		a.refuse("unsupported SET form")
		return session
	}
	name := normGUC(s.GetName())
	if classifyGUC(name) == gucRoute {
		return a.routeHint(s)
	}
	a.guardSet(s, name)
	switch name {
	case "transaction_read_only", "transaction_isolation", "transaction_deferrable":
		// Transaction-scoped even without LOCAL.
		info := stmtInfo{target: Replica, reason: ReasonTxControl}
		if s.GetKind() == pg_query.VariableSetKind_VAR_SET_VALUE && len(s.GetArgs()) == 1 {
			arg := s.GetArgs()[0]
			switch name {
			case "transaction_read_only":
				if constTrue(arg) {
					info.tx = TxSetTransactionReadOnly
				} else {
					info.tx = TxSetTransactionReadWrite
				}
			case "transaction_isolation":
				if v, ok := constString(arg); !ok || strings.EqualFold(v, "serializable") {
					info.tx = TxSetTransactionReadWrite
				}
			}
		}
		if info.tx == TxSetTransactionReadWrite {
			info.target = Primary
		}
		return info
	}
	if s.GetIsLocal() {
		return stmtInfo{target: Replica, reason: ReasonSessionState}
	}
	a.addGUC(name)
	session.pin = !trivialGUCs[name]
	return session
}

func (a *analyzer) addGUC(name string) {
	if !slices.Contains(a.f.gucs, name) {
		a.f.gucs = append(a.f.gucs, name)
	}
}

// guardSet applies the guard to a SET/RESET (top-level or nested in ALTER
// FUNCTION ... SET) of the normalized name.
func (a *analyzer) guardSet(s *pg_query.VariableSetStmt, name string) {
	switch classifyGUC(name) {
	case gucIdentity, gucRoute:
		a.refuse("changing \"" + name + "\" is not allowed")
	case gucMustBeOn:
		if s.GetKind() == pg_query.VariableSetKind_VAR_SET_VALUE {
			v, ok := singleSetValue(s)
			if !ok || !isOnValue(v) {
				a.refuse("standard_conforming_strings can only be set to on")
			}
		}
	case gucMustBeUTF8:
		if s.GetKind() == pg_query.VariableSetKind_VAR_SET_VALUE {
			v, ok := singleSetValue(s)
			if !ok || !isUTF8Name(v) {
				a.refuse("client_encoding can only be set to UTF8")
			}
		}
	}
	if k := s.GetKind(); k != pg_query.VariableSetKind_VAR_SET_VALUE && k != pg_query.VariableSetKind_VAR_SET_DEFAULT &&
		k != pg_query.VariableSetKind_VAR_RESET && k != pg_query.VariableSetKind_VAR_SET_CURRENT {
		a.refuse("unsupported SET form")
	}
}

// constText returns the value of a string constant (not of a number),
// also through a cast to text, varchar, bpchar or name.
func constText(n *pg_query.Node) (string, bool) {
	if n == nil {
		return "", false
	}
	c := n.GetAConst()
	if tc := n.GetTypeCast(); tc != nil {
		c = tc.GetArg().GetAConst()
	}
	if c == nil || c.GetSval() == nil {
		return "", false
	}
	return constString(n)
}

// singleSetValue returns the value of SET name = value with one constant.
func singleSetValue(s *pg_query.VariableSetStmt) (string, bool) {
	if len(s.GetArgs()) != 1 {
		return "", false
	}
	return constString(s.GetArgs()[0])
}

// routeHint handles SET/RESET cascata.route.
func (a *analyzer) routeHint(s *pg_query.VariableSetStmt) stmtInfo {
	info := stmtInfo{target: Replica, reason: ReasonHint}
	if s.GetIsLocal() {
		a.refuseCode(SQLStateFeatureNotSupported, "SET LOCAL cascata.route is not supported; use SET cascata.route")
		return info
	}
	switch s.GetKind() {
	case pg_query.VariableSetKind_VAR_SET_DEFAULT, pg_query.VariableSetKind_VAR_RESET:
		a.f.hint = SessionAuto
		return info
	case pg_query.VariableSetKind_VAR_SET_VALUE:
		v, ok := singleSetValue(s)
		switch {
		case ok && strings.EqualFold(v, "primary"):
			a.f.hint = SessionPrimary
			return info
		case ok && strings.EqualFold(v, "auto"):
			a.f.hint = SessionAuto
			return info
		}
	}
	a.refuseCode(SQLStateInvalidParameterValue, "invalid value for cascata.route: use 'primary' or 'auto'")
	return info
}

// visit walks one node of the tree and everything below it.
func (a *analyzer) visit(m protoreflect.Message, c wctx) {
	switch n := m.Interface().(type) {
	case *pg_query.Node:
		// A oneof wrapper: descend into the set member.
	case *pg_query.A_Const:
		if a.wantLocs {
			a.constLocs = append(a.constLocs, n.GetLocation())
		}
		return
	case *pg_query.String:
		if c.ddl && isDangerousFunctionName(n.GetSval()) {
			a.refuse("DDL referring to " + n.GetSval() + " is not allowed")
		}
		return
	case *pg_query.FuncCall:
		a.funcCall(n, c)
	case *pg_query.VariableSetStmt:
		// Nested: ALTER FUNCTION/PROCEDURE/ROUTINE ... SET/RESET, or
		// CREATE FUNCTION ... SET.
		a.literalDep = true
		if n.GetKind() != pg_query.VariableSetKind_VAR_RESET_ALL {
			a.guardSet(n, normGUC(n.GetName()))
		}
	case *pg_query.InsertStmt:
		a.dml(n.GetRelation(), c)
	case *pg_query.UpdateStmt:
		a.dml(n.GetRelation(), c)
	case *pg_query.DeleteStmt:
		a.dml(n.GetRelation(), c)
	case *pg_query.MergeStmt:
		a.dml(n.GetRelation(), c)
	case *pg_query.SelectStmt:
		if n.GetIntoClause() != nil && c.exec {
			a.acc.into = true
		}
	case *pg_query.LockingClause:
		if c.exec {
			a.acc.locking = true
		}
	case *pg_query.RangeVar:
		if c.viewDef && strings.EqualFold(n.GetRelname(), "pg_settings") {
			a.refuse("views and rules over pg_settings are not allowed")
		}
		if isBackendStateView(n.GetRelname()) {
			a.f.backendState = true
		}
	case *pg_query.PrepareStmt, *pg_query.ExecuteStmt, *pg_query.DeallocateStmt:
		// Below another statement (EXPLAIN, CREATE TABLE AS): never the
		// lone statement a proxy can translate.
		a.f.preparedUses += 2
	case *pg_query.ViewStmt, *pg_query.RuleStmt:
		c.viewDef = true
	case *pg_query.DoStmt:
		lang, body := doBody(n)
		if r := a.bodyReason(lang, body, false, a.sql[a.stmtStart:a.stmtEnd]); r != "" && a.f.untrusted == nil {
			a.f.untrusted = &Refusal{SQLState: SQLStateInsufficientPrivilege, Message: "DO is only allowed for trusted roles here: " + r}
		}
	case *pg_query.CreateFunctionStmt:
		lang, body, atomic := functionBody(n)
		if r := a.bodyReason(lang, body, atomic, a.sql[a.stmtStart:a.stmtEnd]); r != "" && a.f.untrusted == nil {
			a.f.untrusted = &Refusal{SQLState: SQLStateInsufficientPrivilege, Message: "CREATE FUNCTION/PROCEDURE is only allowed for trusted roles here: " + r}
		}
	case *pg_query.CreateRoleStmt, *pg_query.AlterRoleStmt, *pg_query.DropRoleStmt, *pg_query.AlterRoleSetStmt:
		a.refuse("role management is not allowed")
	case *pg_query.GrantRoleStmt:
		a.refuse("granting or revoking role membership is not allowed")
	case *pg_query.ReassignOwnedStmt:
		a.refuse("REASSIGN OWNED is not allowed")
	case *pg_query.AlterDatabaseSetStmt:
		a.refuse("ALTER DATABASE ... SET is not allowed")
	case *pg_query.AlterSystemStmt:
		a.refuse("ALTER SYSTEM is not allowed")
	case *pg_query.LoadStmt:
		a.refuse("LOAD is not allowed")
	case *pg_query.CopyStmt:
		if n.GetIsProgram() {
			a.refuse("COPY ... PROGRAM is not allowed")
		}
	case *pg_query.DiscardStmt:
		if n.GetTarget() == pg_query.DiscardMode_DISCARD_ALL {
			a.refuse("DISCARD ALL is not allowed: it would reset the session role")
		}
	case *pg_query.RenameStmt:
		if n.GetRenameType() == pg_query.ObjectType_OBJECT_ROLE {
			a.refuse("role management is not allowed")
		}
	}
	a.children(m, c)
}

// children visits the message-typed fields of m.
func (a *analyzer) children(m protoreflect.Message, c wctx) {
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if fd.Kind() != protoreflect.MessageKind {
			return true
		}
		if fd.IsList() {
			l := v.List()
			for i := 0; i < l.Len(); i++ {
				a.visit(l.Get(i).Message(), c)
			}
			return true
		}
		a.visit(v.Message(), c)
		return true
	})
}

// dml records a data-modifying statement and guards its target.
func (a *analyzer) dml(rel *pg_query.RangeVar, c wctx) {
	if c.exec {
		a.acc.write = true
	}
	if rel != nil && strings.EqualFold(rel.GetRelname(), "pg_settings") {
		a.refuse("modifying pg_settings is not allowed")
	}
}

// funcName splits a FuncCall name into schema and name.
func funcName(parts []*pg_query.Node) (schema, name string) {
	if len(parts) == 0 {
		return "", ""
	}
	name = parts[len(parts)-1].GetString_().GetSval()
	if len(parts) >= 2 {
		schema = parts[len(parts)-2].GetString_().GetSval()
	}
	return schema, name
}

// funcCall guards and classifies a function call (its children are walked
// by the caller).
func (a *analyzer) funcCall(n *pg_query.FuncCall, c wctx) {
	schema, name := funcName(n.GetFuncname())
	if (schema == "" || strings.EqualFold(schema, "pg_catalog")) && isBackendStateFunction(name) {
		a.f.backendState = true
	}
	switch lookupFunction(schema, name) {
	case fnSafe:
	case fnSetConfig:
		a.literalDep = true
		a.setConfig(n)
		if c.exec {
			a.acc.sidePin = true
		}
	case fnSQLExec:
		idx, _ := sqlExecArgIndex(name)
		if strings.EqualFold(name, "ts_rewrite") && len(n.GetArgs()) != 2 {
			return // ts_rewrite(tsquery, tsquery, tsquery) executes nothing
		}
		a.literalDep = true
		a.sqlExec(n, name, idx)
		if c.exec {
			a.acc.sidePin = true // the query may leave session state
		}
	case fnPrimary:
		if c.exec {
			a.acc.sidePrimary = true
		}
	case fnPin:
		if c.exec {
			a.acc.sidePin = true
			if isSessionAdvisoryLock(name) {
				a.f.keeps = true
			}
		}
	default:
		if c.exec {
			q := QualifiedName{Schema: schema, Name: name}
			if !slices.Contains(a.acc.funcs, q) {
				a.acc.funcs = append(a.acc.funcs, q)
			}
		}
	}
}

// setConfig guards a set_config call.
func (a *analyzer) setConfig(n *pg_query.FuncCall) {
	nameArg, valueArg, localArg := callArgs3(n.GetArgs(), "setting_name", "new_value", "is_local")
	name, ok := constText(nameArg)
	if !ok {
		a.refuse("set_config with a setting name that is not a string constant is not allowed")
		return
	}
	name = normGUC(name)
	switch classifyGUC(name) {
	case gucIdentity, gucRoute:
		a.refuse("changing \"" + name + "\" is not allowed")
		return
	case gucMustBeOn:
		if v, ok := constText(valueArg); !ok || !isOnValue(v) {
			a.refuse("standard_conforming_strings can only be set to on")
			return
		}
	case gucMustBeUTF8:
		if v, ok := constText(valueArg); !ok || !isUTF8Name(v) {
			a.refuse("client_encoding can only be set to UTF8")
			return
		}
	}
	if localArg == nil || !constTrue(localArg) {
		a.addGUC(name)
	}
}

// callArgs3 returns the first three arguments of a call, by position or by
// name (PostgreSQL allows positional arguments followed by named ones). A
// missing or ambiguous argument is nil.
func callArgs3(args []*pg_query.Node, n0, n1, n2 string) (x0, x1, x2 *pg_query.Node) {
	names := [3]string{n0, n1, n2}
	var out [3]*pg_query.Node
	var seen [3]int
	for i, arg := range args {
		na := arg.GetNamedArgExpr()
		if na == nil {
			if i < 3 {
				out[i] = arg
				seen[i]++
			}
			continue
		}
		for k, nm := range names {
			if strings.EqualFold(na.GetName(), nm) {
				out[k] = na.GetArg()
				seen[k]++
			}
		}
	}
	for k := range out {
		if seen[k] != 1 {
			out[k] = nil
		}
	}
	return out[0], out[1], out[2]
}

// sqlExec guards a call of a SQL-executing built-in: its SQL argument must
// be a constant, which is parsed and guarded recursively.
func (a *analyzer) sqlExec(n *pg_query.FuncCall, name string, idx int) {
	args := n.GetArgs()
	for _, arg := range args {
		if arg.GetNamedArgExpr() != nil {
			a.refuse(name + " with named arguments is not allowed")
			return
		}
	}
	if idx >= len(args) {
		a.refuse(name + " with a missing query argument is not allowed")
		return
	}
	q, ok := constText(args[idx])
	if !ok {
		a.refuse(name + " with a query that is not a string constant is not allowed")
		return
	}
	if a.depth >= maxSQLExecDepth {
		a.refuse(name + " nested too deeply")
		return
	}
	if checkText(q) != nil {
		a.refuse(name + " with an invalid query is not allowed")
		return
	}
	sub := &analyzer{sql: q, f: &facts{}, depth: a.depth + 1}
	sub.run()
	switch {
	case sub.f.refusal != nil && sub.f.refusalReason == ReasonUnparsable:
		a.refuse(name + " with an unparsable query is not allowed")
	case sub.f.refusal != nil:
		a.refuse(sub.f.refusal.Message + " (in the query of " + name + ")")
	case sub.f.hint == SessionPrimary || sub.f.hint == SessionAuto:
		a.refuse("changing \"cascata.route\" is not allowed (in the query of " + name + ")")
	case sub.f.untrusted != nil && a.f.untrusted == nil:
		a.f.untrusted = sub.f.untrusted
	}
	if sub.f.preparedUses > 0 {
		a.f.preparedUses += 2 // never translatable
	}
	a.f.backendState = a.f.backendState || sub.f.backendState
}

// spansMapped reports whether every literal replaced by normalizeKey (at
// the byte offsets spans) is an A_Const of the parse tree (at locs), so that
// replacing its contents cannot change anything but A_Const values. The
// unary minus folded into a numeric constant moves its location to the '-'.
func spansMapped(sql string, spans, locs []int32) bool {
	slices.Sort(locs)
	for _, s := range spans {
		if _, ok := slices.BinarySearch(locs, s); ok {
			continue
		}
		j := int(s) - 1
		for j >= 0 && isSpace(sql[j]) {
			j--
		}
		if j >= 0 && sql[j] == '-' {
			if _, ok := slices.BinarySearch(locs, int32(j)); ok {
				continue
			}
		}
		return false
	}
	return true
}

// leadingRouteHint reports whether the text starts, before any token, with
// a comment reading cascata:primary (any case, whitespace ignored).
func leadingRouteHint(sql string) bool {
	i := 0
	for {
		for i < len(sql) && isSpace(sql[i]) {
			i++
		}
		var body string
		switch {
		case strings.HasPrefix(sql[i:], "/*"):
			end := strings.Index(sql[i+2:], "*/")
			if end < 0 {
				return false
			}
			body = sql[i+2 : i+2+end]
			i += 2 + end + 2
		case strings.HasPrefix(sql[i:], "--"):
			end := strings.IndexAny(sql[i:], "\r\n")
			if end < 0 {
				end = len(sql) - i
			}
			body = sql[i+2 : i+end]
			i += end
		default:
			return false
		}
		if isRouteHintBody(body) {
			return true
		}
	}
}

func isRouteHintBody(body string) bool {
	const want = "cascata:primary"
	k := 0
	for i := 0; i < len(body); i++ {
		c := body[i]
		if isSpace(c) {
			continue
		}
		if c >= 'A' && c <= 'Z' {
			c += 'a' - 'A'
		}
		if k >= len(want) || c != want[k] {
			return false
		}
		k++
	}
	return k == len(want)
}

// isBackendStateView reports the views that list a backend's own prepared
// statements and cursors.
func isBackendStateView(name string) bool {
	return strings.EqualFold(name, "pg_prepared_statements") || strings.EqualFold(name, "pg_cursors")
}

// isBackendStateFunction reports the functions behind those views.
func isBackendStateFunction(name string) bool {
	return strings.EqualFold(name, "pg_prepared_statement") || strings.EqualFold(name, "pg_cursor")
}
