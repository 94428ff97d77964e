// Package glue adapts auth/ and router/ to the interfaces the proxy declares.
// The proxy knows nothing of JWTs or SQL; this is the one place that turns
// their answers into what the wire layer needs, field for field: the
// decisions themselves (what writes, where a PREPARE's tail starts) are the
// router's, and the function volatility table is internal/volatility.
package glue

import (
	"context"
	"errors"
	"sync"

	"cascata/auth"
	"cascata/internal/volatility"
	"cascata/proxy"
	"cascata/router"
)

// Authenticator verifies JWT passwords with an auth.Verifier.
type Authenticator struct{ V *auth.Verifier }

// Authenticate implements proxy.Authenticator.
func (a Authenticator) Authenticate(ctx context.Context, ref, userRole, token string) (proxy.Identity, error) {
	id, err := a.V.Verify(ctx, ref, userRole, token)
	var ae *auth.Error
	if errors.As(err, &ae) {
		return proxy.Identity{}, &proxy.Error{Code: ae.SQLState, Message: ae.Message, Fatal: true, Err: err, Reason: ae.Reason.String()}
	}
	if err != nil {
		return proxy.Identity{}, err
	}
	return proxy.Identity{Role: id.Role, Claims: id.ClaimsJSON}, nil
}

// Classifier guards and routes statements with a router.Classifier, with a
// table of each project's own functions.
type Classifier struct {
	C     *router.Classifier
	funcs sync.Map // project ref -> *volatility.Learner
}

// NewClassifier returns a Classifier with the router's default caches.
func NewClassifier() *Classifier {
	return &Classifier{C: router.NewClassifier(router.Options{})}
}

// SetFunctions installs (or, with nil, removes) a project's function table.
func (rc *Classifier) SetFunctions(ref string, f *volatility.Learner) {
	if old, ok := rc.funcs.Load(ref); ok && old.(*volatility.Learner) != f {
		old.(*volatility.Learner).Close()
	}
	if f == nil {
		rc.funcs.Delete(ref)
		return
	}
	rc.funcs.Store(ref, f)
}

// Close stops every function lookup.
func (rc *Classifier) Close() {
	rc.funcs.Range(func(_, v any) bool {
		v.(*volatility.Learner).Close()
		return true
	})
}

// Classify implements proxy.Classifier.
func (rc *Classifier) Classify(project string, sql string, trusted bool) proxy.Route {
	pol := router.Policy{TrustedRole: trusted}
	var fns *volatility.Learner
	if v, ok := rc.funcs.Load(project); ok {
		fns = v.(*volatility.Learner)
		pol.Functions = fns
	}
	d := rc.C.Classify(sql, pol)
	if fns != nil && len(d.UnknownFunctions) > 0 {
		fns.Learn(d.UnknownFunctions)
	}
	r := proxy.Route{
		Primary:           d.Target == router.Primary,
		Writes:            d.Writes,
		PinSession:        d.PinSession,
		SessionState:      d.SessionState,
		KeepsSessionState: d.KeepsSessionState,
		ChangesSchema:     d.ChangesSchema,
		Statements:        d.Statements,
		Reset:             resetKind(d.Reset),
		ResetStart:        d.ResetStart,
		ResetEnd:          d.ResetEnd,
		Reason:            d.Reason.String(),
		BeginReadOnly:     d.Tx == router.TxBeginReadOnly,
		SessionGUCs:       d.SessionGUCs,
	}
	if sp := d.SQLPrepared; sp != nil {
		r.SQLPrepared = &proxy.SQLPrepared{Execute: sp.Execute, Name: sp.Name, Tail: sp.Tail}
	}
	if d.Deallocate != nil {
		r.Deallocate = &proxy.Deallocate{All: d.Deallocate.All, Name: d.Deallocate.Name}
	}
	r.UntranslatedPrepared = d.PreparedUses > 0 && r.SQLPrepared == nil && r.Deallocate == nil
	r.ReadsBackendState = d.ReadsBackendState
	if d.Refusal != nil {
		r.Refusal = &proxy.Error{Code: d.Refusal.SQLState, Message: d.Refusal.Message, Position: int32(d.Refusal.Position)}
	}
	switch d.RouteHint {
	case router.ForcePrimaryOnce:
		r.Hint = proxy.HintPrimaryOnce
	case router.SessionPrimary:
		r.Hint = proxy.HintSessionPrimary
	case router.SessionAuto:
		r.Hint = proxy.HintSessionAuto
	}
	return r
}

// resetKind maps the router's whole-session reset to the proxy's.
func resetKind(k router.ResetKind) proxy.ResetKind {
	switch k {
	case router.ResetAll:
		return proxy.ResetAll
	case router.DiscardAll:
		return proxy.DiscardAll
	}
	return proxy.ResetNone
}
