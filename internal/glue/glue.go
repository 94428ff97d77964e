// Package glue adapts auth/ and router/ to the interfaces the proxy declares.
// The proxy knows nothing of JWTs or SQL; this is the one place that turns
// their answers into what the wire layer needs.
package glue

import (
	"context"
	"errors"
	"sync"

	"cascata/auth"
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
	funcs sync.Map // project ref -> *Functions
}

// NewClassifier returns a Classifier with the router's default caches.
func NewClassifier() *Classifier {
	return &Classifier{C: router.NewClassifier(router.Options{})}
}

// SetFunctions installs (or, with nil, removes) a project's function table.
func (rc *Classifier) SetFunctions(ref string, f *Functions) {
	if old, ok := rc.funcs.Load(ref); ok && old.(*Functions) != f {
		old.(*Functions).Close()
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
		v.(*Functions).Close()
		return true
	})
}

// Classify implements proxy.Classifier.
func (rc *Classifier) Classify(project string, sql string, trusted bool) proxy.Route {
	pol := router.Policy{TrustedRole: trusted}
	var fns *Functions
	if v, ok := rc.funcs.Load(project); ok {
		fns = v.(*Functions)
		pol.Functions = fns
	}
	d := rc.C.Classify(sql, pol)
	if fns != nil && len(d.UnknownFunctions) > 0 {
		fns.learn(d.UnknownFunctions)
	}
	r := proxy.Route{
		Primary:           d.Target == router.Primary,
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
		kw := "PREPARE"
		if sp.Execute {
			kw = "EXECUTE"
		}
		if tail, ok := afterStatementName(sql, kw); ok {
			r.SQLPrepared = &proxy.SQLPrepared{Execute: sp.Execute, Name: sp.Name, Tail: tail}
		}
	}
	if d.Deallocate != nil {
		r.Deallocate = &proxy.Deallocate{All: d.Deallocate.All, Name: d.Deallocate.Name}
	}
	r.UntranslatedPrepared = d.PreparedUses > 0 && r.SQLPrepared == nil && r.Deallocate == nil
	r.ReadsBackendState = d.ReadsBackendState
	if d.Refusal != nil {
		r.Refusal = &proxy.Error{Code: d.Refusal.SQLState, Message: d.Refusal.Message, Position: int32(d.Refusal.Position)}
	}
	switch d.Reason {
	case router.ReasonTxControl, router.ReasonSessionState, router.ReasonHint, router.ReasonRead, router.ReasonEmpty, router.ReasonCursor:
	default:
		r.Writes = r.Primary
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
