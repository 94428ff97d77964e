package auth

import "fmt"

// Reason classifies why a token was refused. The set of values is bounded so
// that it can be used as a metrics label.
type Reason uint8

// Reasons returned in [Error].Reason.
const (
	// ReasonMalformed: the token is not a well-formed compact JWS with a JSON
	// header and a JSON-object payload, or a registered claim has a wrong type.
	ReasonMalformed Reason = iota + 1
	// ReasonBadSignature: no candidate key verified the signature.
	ReasonBadSignature
	// ReasonExpired: exp is in the past (beyond the leeway).
	ReasonExpired
	// ReasonNotYetValid: nbf is in the future (beyond the leeway).
	ReasonNotYetValid
	// ReasonIssuedInFuture: iat is in the future (beyond the leeway).
	ReasonIssuedInFuture
	// ReasonWrongIssuer: iss does not equal Policy.Issuer.
	ReasonWrongIssuer
	// ReasonWrongAudience: aud does not contain Policy.Audience.
	ReasonWrongAudience
	// ReasonWrongProject: the ref claim names another project, or is missing
	// while the project requires it.
	ReasonWrongProject
	// ReasonUnknownKID: the header's kid names no key of the project.
	ReasonUnknownKID
	// ReasonAlgNotAllowed: the header's alg is unsupported ("none" included)
	// or no key of the project may verify it.
	ReasonAlgNotAllowed
	// ReasonTooLarge: the token is longer than Policy.MaxTokenBytes.
	ReasonTooLarge
	// ReasonNoRole: the role claim is missing (and no AnonRole), empty or not
	// a string.
	ReasonNoRole
	// ReasonRoleNotAllowed: the claimed role is not in Policy.Roles.
	ReasonRoleNotAllowed
	// ReasonRoleMismatch: the role given in the user name differs from the
	// claimed role.
	ReasonRoleMismatch
	// ReasonUnknownProject: no project is registered under the ref.
	ReasonUnknownProject
	// ReasonKeysUnavailable: the project's JWKS URL has never been fetched
	// successfully, so no key can verify the token (transient, server side).
	ReasonKeysUnavailable
	// ReasonMissingExp: the token has no exp claim and the policy does not
	// allow that.
	ReasonMissingExp
)

// String returns the reason's snake_case name, e.g. "bad_signature".
func (r Reason) String() string {
	switch r {
	case ReasonMalformed:
		return "malformed"
	case ReasonBadSignature:
		return "bad_signature"
	case ReasonExpired:
		return "expired"
	case ReasonNotYetValid:
		return "not_yet_valid"
	case ReasonIssuedInFuture:
		return "issued_in_future"
	case ReasonWrongIssuer:
		return "wrong_issuer"
	case ReasonWrongAudience:
		return "wrong_audience"
	case ReasonWrongProject:
		return "wrong_project"
	case ReasonUnknownKID:
		return "unknown_kid"
	case ReasonAlgNotAllowed:
		return "alg_not_allowed"
	case ReasonTooLarge:
		return "too_large"
	case ReasonNoRole:
		return "no_role"
	case ReasonRoleNotAllowed:
		return "role_not_allowed"
	case ReasonRoleMismatch:
		return "role_mismatch"
	case ReasonUnknownProject:
		return "unknown_project"
	case ReasonKeysUnavailable:
		return "keys_unavailable"
	case ReasonMissingExp:
		return "missing_exp"
	}
	return fmt.Sprintf("reason(%d)", uint8(r))
}

// SQLSTATE codes used by [Error].
const (
	// SQLStateInvalidPassword (28P01) is used for every token problem.
	SQLStateInvalidPassword = "28P01"
	// SQLStateInvalidAuthorization (28000) is used when the role is not
	// allowed or differs from the role in the user name.
	SQLStateInvalidAuthorization = "28000"
	// SQLStateInvalidCatalogName (3D000) is used for an unknown project.
	SQLStateInvalidCatalogName = "3D000"
	// SQLStateCannotConnectNow (57P03) is used when the keys are unavailable.
	SQLStateCannotConnectNow = "57P03"
)

// SQLState returns the PostgreSQL SQLSTATE the proxy should send for r.
func (r Reason) SQLState() string {
	switch r {
	case ReasonRoleNotAllowed, ReasonRoleMismatch:
		return SQLStateInvalidAuthorization
	case ReasonUnknownProject:
		return SQLStateInvalidCatalogName
	case ReasonKeysUnavailable:
		return SQLStateCannotConnectNow
	default:
		return SQLStateInvalidPassword
	}
}

// Error is the only error type returned by [Verifier.Verify]. Message is safe
// to send to the client: it never contains the token, a key or a secret.
// Error() appends the cause and is meant for server logs.
type Error struct {
	// Reason classifies the refusal (bounded, for metrics and logs).
	Reason Reason
	// SQLState is Reason.SQLState(), the code for the ErrorResponse.
	SQLState string
	// Message is the client-safe text for the ErrorResponse.
	Message string
	// Err is the underlying cause, or nil; it may quote parts of the
	// decoded token (e.g. a duplicate member name), so log it, don't send it.
	Err error
}

// Error returns Message, followed by the cause when there is one.
func (e *Error) Error() string {
	if e.Err != nil {
		return e.Message + ": " + e.Err.Error()
	}
	return e.Message
}

// Unwrap returns the underlying cause, if any.
func (e *Error) Unwrap() error { return e.Err }

func newErr(r Reason, msg string, cause error) *Error {
	return &Error{Reason: r, SQLState: r.SQLState(), Message: msg, Err: cause}
}

func errf(r Reason, format string, args ...any) *Error {
	return newErr(r, fmt.Sprintf(format, args...), nil)
}
