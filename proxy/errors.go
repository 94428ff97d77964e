package proxy

import (
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5/pgproto3"
)

// SQLSTATEs the proxy itself answers with.
const (
	CodeTooManyConnections   = "53300"
	CodeInvalidPassword      = "28P01"
	CodeInvalidAuthSpec      = "28000"
	CodeInvalidCatalog       = "3D000"
	CodeProtocolViolation    = "08P01"
	CodeConnectionFailure    = "08006"
	CodeCannotConnectNow     = "57P03"
	CodeAdminShutdown        = "57P01"
	CodeInsufficientPrivs    = "42501"
	CodeFeatureNotSupported  = "0A000"
	CodeActiveSQLTransaction = "25001"
	// CodeDuplicatePreparedStmt is duplicate_prepared_statement.
	CodeDuplicatePreparedStmt = "42P05"
)

// Error is an error with a SQLSTATE, the one shape in which the proxy reports
// problems to clients. Other packages' errors that have a SQLState method are
// honoured too.
type Error struct {
	Code    string
	Message string
	Detail  string
	Hint    string
	// Position is the 1-based character position of the error in the
	// client's query text (0 = none).
	Position int32
	Fatal    bool
	Err      error // wrapped cause, never shown to the client
	// Reason is a short bounded label for metrics (e.g. an authentication
	// failure's "expired"); "" lets the proxy derive one from the code.
	Reason string
}

func (e *Error) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("%s (%s): %v", e.Message, e.Code, e.Err)
	}
	return fmt.Sprintf("%s (%s)", e.Message, e.Code)
}

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Err }

// SQLState returns the SQLSTATE code.
func (e *Error) SQLState() string { return e.Code }

func newError(code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

func fatalError(code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...), Fatal: true}
}

// sqlStater is what the proxy asks of errors from auth/ and router/.
type sqlStater interface{ SQLState() string }

// toErrorResponse turns any error into the ErrorResponse a client sees. An
// error without a SQLSTATE becomes internal error XX000 with a generic text,
// so that internals (URLs, passwords) never leak.
func toErrorResponse(err error, fatal bool) *pgproto3.ErrorResponse {
	sev := "ERROR"
	if fatal {
		sev = "FATAL"
	}
	var pe *Error
	if errors.As(err, &pe) {
		if pe.Fatal {
			sev = "FATAL"
		}
		return &pgproto3.ErrorResponse{Severity: sev, SeverityUnlocalized: sev, Code: pe.Code, Message: pe.Message, Detail: pe.Detail, Hint: pe.Hint, Position: pe.Position}
	}
	var ss sqlStater
	if errors.As(err, &ss) {
		return &pgproto3.ErrorResponse{Severity: sev, SeverityUnlocalized: sev, Code: ss.SQLState(), Message: err.Error()}
	}
	return &pgproto3.ErrorResponse{Severity: sev, SeverityUnlocalized: sev, Code: "XX000", Message: "internal error in cascata"}
}
