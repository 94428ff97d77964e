package proxy

import (
	"errors"
	"strconv"
	"strings"

	"cascata/router"
)

// Classifier decides for one SQL text whether it is refused and where it
// may run: the router (router.Projects) for every simple query and every
// Parse; the proxy reads no SQL itself.
type Classifier interface {
	Classify(project, sql string, trustedRole bool) router.Decision
}

// verdict is the router's decision on one text with what a backend shared
// by many clients adds to it: the proxy's own refusals.
type verdict struct {
	router.Decision
	// refused, when set, is answered instead of running the text: the
	// router's refusal (42501 for the escalation guard) or the proxy's.
	refused error
}

// newVerdict takes the router's decision as it is.
func newVerdict(d router.Decision) verdict {
	v := verdict{Decision: d}
	if r := d.Refusal; r != nil {
		v.refused = &Error{Code: r.SQLState, Message: r.Message, Position: int32(r.Position)}
	}
	return v
}

// want is what running the text needs of a backend.
func (v *verdict) want() want {
	return want{
		pin: v.PinSession, state: v.SessionState, keeps: v.KeepsSessionState, ddl: v.ChangesSchema,
		primary: v.Target == router.Primary || v.refused != nil || v.RouteHint == router.ForcePrimaryOnce,
		writes:  v.Writes, reason: v.Reason.String(), gucs: v.SessionGUCs,
		shareTx: v.plain(),
	}
}

// plain: the text is one or more plain reads and writes (SELECT, INSERT,
// UPDATE, DELETE, locking reads) and nothing else: no transaction control,
// no utility or DDL statement, no call, no session state, no setting, no
// SQL-level prepared statement, no COPY that waits for the client's data.
// Such a text may run in one implicit transaction with the statement that
// puts the client's identity in force: it can neither end that
// transaction early nor refuse to run inside a pipeline, and the
// transaction ends without another message of the client.
func (v *verdict) plain() bool {
	switch v.Reason {
	case router.ReasonRead, router.ReasonWrite, router.ReasonLockingRead:
	default:
		return false
	}
	return v.refused == nil && v.Statements > 0 && v.Tx == router.TxNone && v.TxLast == router.TxNone &&
		!v.SessionState && !v.KeepsSessionState && !v.ChangesSchema &&
		v.Reset == router.ResetNone && v.PreparedUses == 0 && len(v.SessionGUCs) == 0 &&
		v.RouteHint == router.HintNone && !v.StatementsAfterTxEnd && !v.CopyFromClient
}

// untranslatedPrepared: the text uses SQL-level PREPARE, EXECUTE or
// DEALLOCATE in a form the proxy cannot translate (with other statements,
// under EXPLAIN or CREATE TABLE AS, in a query given to a function). On a
// shared backend it is refused: the names would reach statements of other
// clients.
func (v *verdict) untranslatedPrepared() bool {
	return v.PreparedUses > 0 && v.SQLPrepared == nil && v.Deallocate == nil
}

// allPrimary is the Classifier used when none is configured: no guard, no
// replica reads; every text is taken for a write.
type allPrimary struct{}

func (allPrimary) Classify(string, string, bool) router.Decision {
	return router.Decision{Target: router.Primary, Writes: true, Reason: router.ReasonWrite}
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
