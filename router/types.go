package router

import "strconv"

// Target is where a statement may run.
type Target uint8

const (
	// Replica means the text is read-only and fit to run on a replica (it
	// may of course run on the primary too). It is the zero value.
	Replica Target = iota
	// Primary means the text must run on the primary.
	Primary
)

// String returns "replica" or "primary".
func (t Target) String() string {
	switch t {
	case Replica:
		return "replica"
	case Primary:
		return "primary"
	}
	return "target(" + strconv.Itoa(int(t)) + ")"
}

// Reason says why a Decision has its Target. It is a small bounded enum,
// fit for use as a metrics label via String.
type Reason uint8

const (
	// ReasonEmpty: the text has no statement.
	ReasonEmpty Reason = iota
	// ReasonRead: a plain read (SELECT, VALUES, TABLE, SHOW, EXPLAIN, COPY TO STDOUT).
	ReasonRead
	// ReasonWrite: INSERT/UPDATE/DELETE/MERGE (also in CTEs), TRUNCATE, COPY FROM, COPY TO a server file.
	ReasonWrite
	// ReasonDDL: schema changes, GRANT/REVOKE, SELECT INTO, CREATE TABLE AS, REFRESH MATERIALIZED VIEW ...
	ReasonDDL
	// ReasonLockingRead: SELECT ... FOR UPDATE/NO KEY UPDATE/SHARE/KEY SHARE.
	ReasonLockingRead
	// ReasonVolatileFunction: a call to a function with side effects, or whose volatility is volatile or unknown.
	ReasonVolatileFunction
	// ReasonTxControl: BEGIN/START/COMMIT/ROLLBACK/SAVEPOINT/PREPARE TRANSACTION/SET TRANSACTION ...
	ReasonTxControl
	// ReasonHint: a route hint (leading /* cascata:primary */ comment, or SET cascata.route).
	ReasonHint
	// ReasonUnparsable: the text could not be parsed (or is not valid UTF-8); always with a Refusal.
	ReasonUnparsable
	// ReasonRefused: the escalation guard refused the text; always with a Refusal.
	ReasonRefused
	// ReasonSessionState: SET/RESET of a setting, DISCARD, SET CONSTRAINTS.
	ReasonSessionState
	// ReasonCursor: DECLARE ... WITH HOLD, FETCH, MOVE, CLOSE.
	ReasonCursor
	// ReasonPrepared: SQL-level PREPARE, EXECUTE, DEALLOCATE, EXPLAIN EXECUTE.
	ReasonPrepared
	// ReasonCall: CALL and DO.
	ReasonCall
	// ReasonListenNotify: LISTEN, UNLISTEN, NOTIFY.
	ReasonListenNotify
	// ReasonLock: LOCK TABLE.
	ReasonLock
	// ReasonMaintenance: VACUUM, ANALYZE, CLUSTER, REINDEX, CHECKPOINT.
	ReasonMaintenance

	numReasons
)

var reasonNames = [numReasons]string{
	ReasonEmpty:            "empty",
	ReasonRead:             "read",
	ReasonWrite:            "write",
	ReasonDDL:              "ddl",
	ReasonLockingRead:      "locking_read",
	ReasonVolatileFunction: "volatile_function",
	ReasonTxControl:        "tx_control",
	ReasonHint:             "hint",
	ReasonUnparsable:       "unparsable",
	ReasonRefused:          "refused",
	ReasonSessionState:     "session_state",
	ReasonCursor:           "cursor",
	ReasonPrepared:         "prepared",
	ReasonCall:             "call",
	ReasonListenNotify:     "listen_notify",
	ReasonLock:             "lock",
	ReasonMaintenance:      "maintenance",
}

// String returns the snake_case label of the reason, e.g. "locking_read".
func (r Reason) String() string {
	if r < numReasons {
		return reasonNames[r]
	}
	return "reason(" + strconv.Itoa(int(r)) + ")"
}

// Reasons returns every Reason, e.g. to pre-register metric label values.
func Reasons() []Reason {
	rs := make([]Reason, numReasons)
	for i := range rs {
		rs[i] = Reason(i)
	}
	return rs
}

// TxEffect is the effect of a statement on the explicit-transaction state of
// the session. Only the statement's own effect is described; whether it
// succeeds is told by the server's ReadyForQuery status, which remains the
// source of truth for the proxy.
type TxEffect uint8

const (
	// TxNone: no effect on the transaction state.
	TxNone TxEffect = iota
	// TxBegin: BEGIN/START TRANSACTION of a read-write transaction (the
	// default, READ WRITE, or ISOLATION LEVEL SERIALIZABLE, which a hot
	// standby refuses).
	TxBegin
	// TxBeginReadOnly: BEGIN/START TRANSACTION READ ONLY (not SERIALIZABLE).
	TxBeginReadOnly
	// TxSetTransactionReadOnly: SET TRANSACTION READ ONLY, or
	// SET transaction_read_only = on, inside a transaction.
	TxSetTransactionReadOnly
	// TxSetTransactionReadWrite: SET TRANSACTION READ WRITE or ISOLATION
	// LEVEL SERIALIZABLE (or the equivalent SET transaction_* forms): the
	// transaction needs the primary from then on.
	TxSetTransactionReadWrite
	// TxCommit: COMMIT or END.
	TxCommit
	// TxCommitAndChain: COMMIT AND CHAIN: commits and immediately opens a
	// new transaction with the same characteristics (but without what SET
	// LOCAL set in the old one: the proxy must re-apply role and claims).
	TxCommitAndChain
	// TxRollback: ROLLBACK/ABORT.
	TxRollback
	// TxRollbackAndChain: ROLLBACK AND CHAIN (see TxCommitAndChain).
	TxRollbackAndChain
	// TxSavepoint: SAVEPOINT name.
	TxSavepoint
	// TxReleaseSavepoint: RELEASE [SAVEPOINT] name.
	TxReleaseSavepoint
	// TxRollbackToSavepoint: ROLLBACK TO [SAVEPOINT] name.
	TxRollbackToSavepoint
	// TxPrepare: PREPARE TRANSACTION 'gid' (ends the session's transaction).
	TxPrepare
	// TxCommitPrepared: COMMIT PREPARED 'gid' (not allowed in a transaction block).
	TxCommitPrepared
	// TxRollbackPrepared: ROLLBACK PREPARED 'gid' (not allowed in a transaction block).
	TxRollbackPrepared

	numTxEffects
)

var txNames = [numTxEffects]string{
	TxNone:                    "none",
	TxBegin:                   "begin",
	TxBeginReadOnly:           "begin_read_only",
	TxSetTransactionReadOnly:  "set_transaction_read_only",
	TxSetTransactionReadWrite: "set_transaction_read_write",
	TxCommit:                  "commit",
	TxCommitAndChain:          "commit_and_chain",
	TxRollback:                "rollback",
	TxRollbackAndChain:        "rollback_and_chain",
	TxSavepoint:               "savepoint",
	TxReleaseSavepoint:        "release_savepoint",
	TxRollbackToSavepoint:     "rollback_to_savepoint",
	TxPrepare:                 "prepare_transaction",
	TxCommitPrepared:          "commit_prepared",
	TxRollbackPrepared:        "rollback_prepared",
}

// String returns the snake_case name of the effect.
func (e TxEffect) String() string {
	if e < numTxEffects {
		return txNames[e]
	}
	return "tx(" + strconv.Itoa(int(e)) + ")"
}

// RouteHint is a routing instruction given by the client in the text.
type RouteHint uint8

const (
	// HintNone: no hint.
	HintNone RouteHint = iota
	// ForcePrimaryOnce: the text starts (before any token, possibly after
	// other comments) with the comment /* cascata:primary */ (any case,
	// any inner whitespace). Target is Primary for this text only.
	ForcePrimaryOnce
	// SessionPrimary: the text is exactly one statement
	// SET [SESSION] cascata.route = 'primary' (any case or quoting, TO or
	// =). The proxy consumes it and never forwards it.
	SessionPrimary
	// SessionAuto: the text is exactly one statement
	// SET [SESSION] cascata.route = 'auto' (or TO DEFAULT, or
	// RESET cascata.route). The proxy consumes it and never forwards it.
	SessionAuto
)

// String returns "none", "force_primary_once", "session_primary" or "session_auto".
func (h RouteHint) String() string {
	switch h {
	case HintNone:
		return "none"
	case ForcePrimaryOnce:
		return "force_primary_once"
	case SessionPrimary:
		return "session_primary"
	case SessionAuto:
		return "session_auto"
	}
	return "hint(" + strconv.Itoa(int(h)) + ")"
}

// SQLSTATE codes used in refusals: insufficient_privilege (the guard),
// syntax_error (unparsable text), character_not_in_repertoire (invalid
// UTF-8 or NUL), invalid_parameter_value (bad cascata.route value),
// feature_not_supported (misused cascata.route).
const (
	// SQLStateInsufficientPrivilege is insufficient_privilege.
	SQLStateInsufficientPrivilege = "42501"
	// SQLStateSyntaxError is syntax_error.
	SQLStateSyntaxError = "42601"
	// SQLStateCharacterNotInRepertoire is character_not_in_repertoire.
	SQLStateCharacterNotInRepertoire = "22021"
	// SQLStateInvalidParameterValue is invalid_parameter_value.
	SQLStateInvalidParameterValue = "22023"
	// SQLStateFeatureNotSupported is feature_not_supported.
	SQLStateFeatureNotSupported = "0A000"
	// SQLStateActiveSQLTransaction is active_sql_transaction.
	SQLStateActiveSQLTransaction = "25001"
)

// Refusal is the error the proxy answers with instead of forwarding a text.
type Refusal struct {
	// SQLState is the five-character SQLSTATE code for the ErrorResponse.
	SQLState string
	// Message is the human-readable error message.
	Message string
	// Position is where in the text the error is, as PostgreSQL reports
	// it (the 1-based character position; 0 = none): set for syntax
	// errors, so that psql can show its LINE 1: caret.
	Position int
}

// Error returns the message prefixed with the SQLSTATE.
func (r *Refusal) Error() string { return r.SQLState + ": " + r.Message }

// QualifiedName is a possibly schema-qualified function name as written in
// the text (identifiers folded to lower case unless quoted). Schema is ""
// when the name was not qualified.
type QualifiedName struct {
	Schema string
	Name   string
}

// String returns "schema.name" or "name".
func (q QualifiedName) String() string {
	if q.Schema == "" {
		return q.Name
	}
	return q.Schema + "." + q.Name
}

// Volatility is the volatility class of a function (pg_proc.provolatile).
type Volatility uint8

const (
	// VolatilityUnknown: not known (yet).
	VolatilityUnknown Volatility = iota
	// Immutable: provolatile 'i'.
	Immutable
	// Stable: provolatile 's'.
	Stable
	// Volatile: provolatile 'v'.
	Volatile
)

// String returns "unknown", "immutable", "stable" or "volatile".
func (v Volatility) String() string {
	switch v {
	case VolatilityUnknown:
		return "unknown"
	case Immutable:
		return "immutable"
	case Stable:
		return "stable"
	case Volatile:
		return "volatile"
	}
	return "volatility(" + strconv.Itoa(int(v)) + ")"
}

// FunctionClassifier tells the volatility of functions that are not in the
// router's built-in tables (per project: user functions and extensions).
// schema is "" for an unqualified call; an implementation resolving it
// through the project's search_path is welcome but not required. It must be
// safe for concurrent use and fast (it is called on every Classify of a
// text that calls such functions).
type FunctionClassifier interface {
	Volatility(schema, name string) Volatility
}

// Policy is what Classify needs to know about the connected client. It is
// not part of any cache key: cached facts are policy-independent and the
// policy is applied on every call.
type Policy struct {
	// TrustedRole is true when the connected JWT role is in the project's
	// trusted_roles: DO and CREATE FUNCTION/PROCEDURE are then allowed.
	TrustedRole bool
	// Functions classifies functions unknown to the built-in tables. It may
	// be nil: every such function is then VolatilityUnknown.
	Functions FunctionClassifier
}

// Decision is the result of Classify. Slices in it may be shared with the
// classifier's cache and must not be modified.
type Decision struct {
	// Target is where the text may run. A multi-statement text is Primary if
	// any of its statements is. With a Refusal it is Primary (meaningless).
	Target Target
	// Reason says why; for a multi-statement text it is the reason of the
	// first statement that made it Primary, else that of the first
	// statement that is not transaction control.
	Reason Reason
	// Tx is the effect of the FIRST statement of the text that affects the
	// transaction state (TxNone if none does).
	Tx TxEffect
	// TxLast is the effect of the LAST such statement; for a single
	// statement it equals Tx. E.g. "BEGIN; UPDATE ...; COMMIT" has Tx
	// TxBegin and TxLast TxCommit.
	TxLast TxEffect
	// Refusal, when non-nil, is the error the proxy must answer with
	// instead of forwarding any part of the text.
	Refusal *Refusal
	// PinSession is true when, in session mode, the session must stay on the
	// primary after this text: any write or DDL (read-your-writes; temporary
	// objects), session advisory locks, nextval/setval, large-object
	// descriptors, LISTEN/UNLISTEN, SQL-level PREPARE, DECLARE ... WITH HOLD,
	// CALL/DO, calls of volatile or unknown functions, and session-level SET
	// or RESET of settings that change query results (see SessionGUCs).
	PinSession bool
	// SessionState is true when the text may leave session state that a
	// proxy sharing backends must clean before another client gets the
	// backend: temporary objects, WITH HOLD cursors, LISTEN, session
	// advisory locks, sequence state, and anything a call may do out of
	// sight (CALL, DO, EXECUTE, SQL-executing built-ins, volatile or
	// unknown functions). Plain writes, SQL PREPARE and SET (see
	// SessionGUCs) leave none of their own.
	SessionState bool
	// KeepsSessionState is true when the text creates session state that a
	// client means to keep across transactions: temporary objects (any
	// DDL that mentions temp, TEMPORARY or pg_temp), LISTEN, DECLARE ...
	// WITH HOLD and session-level advisory locks. A proxy sharing backends
	// may keep the backend for the client while the state lasts instead of
	// scrubbing it. Every such text also has SessionState.
	KeepsSessionState bool
	// ChangesSchema is true when the text has DDL (CREATE, ALTER, DROP,
	// COMMENT, GRANT, ... outside of plain reads and writes): statements
	// prepared before it may describe tables and types that changed. A
	// proxy that shares prepared statements between clients must prepare
	// them again for the Parses that follow.
	ChangesSchema bool
	// Reset is set when the text has a RESET ALL (anywhere, once) or is
	// exactly one DISCARD ALL. Run as they are they would reset the role a
	// proxy put in force; a proxy emulates them on the client's own
	// session instead. ResetStart and ResetEnd are the byte offsets of the
	// RESET ALL statement in the text (without its semicolon), for a proxy
	// that replaces it. Two of them in one text, or one in a query given
	// to a function, are refused; a DISCARD ALL with other statements is
	// refused with 25001, as PostgreSQL runs a multi-statement text in one
	// transaction.
	Reset      ResetKind
	ResetStart int
	ResetEnd   int
	// StatementsAfterTxEnd is true when a COMMIT, ROLLBACK (also AND
	// CHAIN) or PREPARE TRANSACTION of the text is followed by another
	// statement of the same text. Those statements run outside the
	// transaction the proxy opened: a proxy that applies the JWT role and
	// claims per transaction (SET LOCAL, set_config(..., true)) must refuse
	// or split such texts, or they would run without the role.
	StatementsAfterTxEnd bool
	// CopyFromClient is true when the text has a COPY ... FROM STDIN: the
	// statement waits for data the client sends in messages of their own
	// after it.
	CopyFromClient bool
	// RouteHint is the client's routing hint (see RouteHint). The proxy
	// consumes SessionPrimary/SessionAuto texts and never forwards them.
	RouteHint RouteHint
	// Writes is true when the text may change data: a later read of the
	// same client must see its effect (read-your-writes). It is the
	// primary target for any reason but transaction control, session
	// state, routing hints, reads, cursors and empty texts.
	Writes bool
	// Statements is the number of statements in the text. 0 means an empty
	// text (only whitespace, comments or semicolons): not refused, Target
	// Replica, Reason ReasonEmpty; the proxy answers EmptyQueryResponse
	// itself or forwards it anywhere.
	Statements int
	// SessionGUCs lists (lower-cased) names of settings that the text
	// changes at session level (SET/RESET without LOCAL, and set_config
	// with a constant name), for a proxy that replays session state on
	// replicas. Names of "SET SESSION CHARACTERISTICS" are reported as the
	// default_transaction_* settings they change.
	SessionGUCs []string
	// SQLPrepared is set when the text is exactly one PREPARE or EXECUTE:
	// a proxy that renames prepared statements must translate it.
	SQLPrepared *SQLPrepared
	// Deallocate is set when the text is exactly one DEALLOCATE statement:
	// a proxy that renames prepared statements must translate it.
	Deallocate *Deallocate
	// PreparedUses counts SQL-level PREPARE, EXECUTE and DEALLOCATE in the
	// text, wherever they are (a statement under EXPLAIN or CREATE TABLE AS
	// counts twice). SQLPrepared or Deallocate is set only when it is 1 and
	// the text is that one statement: a proxy that renames prepared
	// statements must refuse every other text that uses them, since their
	// names would reach the backend untranslated.
	PreparedUses int
	// ReadsBackendState: the text reads pg_prepared_statements or
	// pg_cursors (or their functions). On a backend shared by many clients
	// those list other clients' statements and cursors.
	ReadsBackendState bool
	// UnknownFunctions lists functions whose volatility decided Target or
	// PinSession but is unknown both to the built-in tables and to
	// Policy.Functions. The text was treated as calling volatile functions
	// (Primary, pinned). The proxy should look them up (pg_proc.provolatile)
	// and teach its FunctionClassifier, so later texts route precisely.
	UnknownFunctions []QualifiedName
}

// Options configures a Classifier.
type Options struct {
	// CacheSize bounds each of the two caches (exact text, and normalized
	// text) in entries. 0 means 10000; a negative value disables caching.
	CacheSize int
	// CacheBytes bounds the total length of the texts (keys) held by each
	// of the two caches. 0 means 16 MiB.
	CacheBytes int
	// MaxCachedQueryBytes is the longest text that is cached; longer texts
	// are always analysed afresh. 0 means 16384.
	MaxCachedQueryBytes int
}

// ResetKind names a statement that resets the whole session.
type ResetKind uint8

const (
	ResetNone  ResetKind = iota
	ResetAll             // RESET ALL: every setting back to its session default
	DiscardAll           // DISCARD ALL: settings, prepared statements, cursors, temporary tables, LISTEN, advisory locks, sequences, plans
)

// Deallocate is a DEALLOCATE statement: of one prepared statement, or ALL.
type Deallocate struct {
	All  bool
	Name string
}

// SQLPrepared is a SQL-level PREPARE (Execute false) or EXECUTE of Name.
// Tail is the statement's text after the name: "(types) AS query" or
// "(arguments)", for a proxy that rewrites the name.
type SQLPrepared struct {
	Execute bool
	Name    string
	Tail    string
}
