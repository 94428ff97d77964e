package proxy

import (
	"errors"
	"strconv"
	"strings"
)

// Classifier decides for one SQL text whether it is refused and where it
// may run. The proxy asks it for every simple query and every Parse; it
// knows nothing of SQL itself. cmd/cascata adapts router.Classifier to it.
type Classifier interface {
	Classify(project, sql string, trustedRole bool) Route
}

// Route is a Classifier's answer.
type Route struct {
	// Primary: the text must run on the primary; otherwise it only reads.
	Primary bool
	// PinSession: the text leaves session state behind (a write, a
	// temporary table, a lock, LISTEN, a SET, ...). A session-mode session
	// that routes reads takes a dedicated primary backend from then on.
	PinSession bool
	// SessionState: the text may leave session state (temporary objects,
	// held cursors, LISTEN, advisory locks, effects of calls the guard
	// cannot see) that must be scrubbed before another client gets the
	// backend.
	SessionState bool
	// KeepsSessionState: the text creates session state a client means to
	// keep across transactions (temporary objects, LISTEN, WITH HOLD
	// cursors, session advisory locks). In transaction mode the client
	// keeps its backend while the state lasts (pin.go).
	KeepsSessionState bool
	// ChangesSchema: the text has DDL. Statements the proxy prepared
	// before it are prepared again for the Parses that follow.
	ChangesSchema bool
	// Reset: the text has a RESET ALL (at bytes ResetStart to ResetEnd) or
	// is exactly DISCARD ALL, which the proxy emulates (reset.go).
	Reset                ResetKind
	ResetStart, ResetEnd int
	// Statements is the number of statements in the text.
	Statements int
	// Writes: the text may change data, so a later read of the same client
	// must see its effect (read-your-writes).
	Writes bool
	// Refusal, when set, is answered instead of running the text; it should
	// have a SQLState method (42501 for the escalation guard).
	Refusal error
	// BeginReadOnly: the text starts a read-only transaction, which may run
	// on a replica.
	BeginReadOnly bool
	// Hint is a routing instruction consumed by the proxy.
	Hint Hint
	// Reason is a short bounded label for metrics.
	Reason string
	// SessionGUCs names the settings the text changes at session level;
	// in transaction mode the proxy carries them to the client's later
	// transactions.
	SessionGUCs []string
	// Deallocate is set when the text is exactly one DEALLOCATE: in
	// transaction mode the proxy translates it to its own statement names.
	Deallocate *Deallocate
	// SQLPrepared is set when the text is exactly one PREPARE or EXECUTE.
	SQLPrepared *SQLPrepared
	// UntranslatedPrepared: the text uses SQL-level PREPARE, EXECUTE or
	// DEALLOCATE in a form the proxy cannot translate (with other
	// statements, under EXPLAIN or CREATE TABLE AS, in a query given to a
	// function). On a shared backend it is refused: the names would reach
	// statements of other clients.
	UntranslatedPrepared bool
	// ReadsBackendState: the text reads pg_prepared_statements or
	// pg_cursors, which on a shared backend list other clients' state.
	ReadsBackendState bool
}

// SQLPrepared is a SQL-level PREPARE or EXECUTE of Name; Tail is the text
// after the name, so the proxy can put its own name in front of it.
type SQLPrepared struct {
	Execute bool
	Name    string
	Tail    string
}

// Deallocate is a DEALLOCATE of one statement (Name) or of ALL.
type Deallocate struct {
	All  bool
	Name string
}

// Hint is a client's routing instruction.
type Hint uint8

// Hints.
const (
	HintNone Hint = iota
	// HintPrimaryOnce: /* cascata:primary */ in front of the statement.
	HintPrimaryOnce
	// HintSessionPrimary: SET cascata.route = 'primary'.
	HintSessionPrimary
	// HintSessionAuto: SET cascata.route = 'auto' (or RESET).
	HintSessionAuto
)

// allPrimary is the Classifier used when none is configured: no guard, no
// replica reads.
type allPrimary struct{}

func (allPrimary) Classify(string, string, bool) Route {
	return Route{Primary: true, Writes: true, Reason: "no_router"}
}

// refusedSQL is sent in place of a refused statement inside a transaction:
// it fails to parse, so PostgreSQL aborts the transaction (or skips to Sync)
// exactly as for any error, and the proxy replaces the syntax error with
// the refusal. The marker appears verbatim in PostgreSQL's message.
const refusedSQL = "cascata_refused_statement"

// refusalBody encodes a refusal as an ErrorResponse body.
func refusalBody(err error) []byte {
	msg, _ := toErrorResponse(err, false).Encode(nil)
	return msg[5:]
}

// parseLSN parses a pg_lsn text such as "0/16B3748".
func parseLSN(s string) (uint64, error) {
	hi, lo, ok := strings.Cut(strings.TrimSpace(s), "/")
	if !ok {
		return 0, errors.New("invalid LSN " + strconv.Quote(s))
	}
	h, err := strconv.ParseUint(hi, 16, 32)
	if err != nil {
		return 0, err
	}
	l, err := strconv.ParseUint(lo, 16, 32)
	if err != nil {
		return 0, err
	}
	return h<<32 | l, nil
}
