package auth

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/golang-jwt/jwt/v5"
)

// Policy defaults, applied where the Policy field is the zero value.
const (
	// DefaultRoleClaim is the claim holding the role.
	DefaultRoleClaim = "role"
	// DefaultRefClaim is the claim that may name the project.
	DefaultRefClaim = "ref"
	// DefaultLeeway is the clock skew tolerated for exp, nbf and iat.
	DefaultLeeway = 30 * time.Second
	// DefaultMaxTokenBytes is the longest token accepted.
	DefaultMaxTokenBytes = 8192
	// maxRoleBytes is PostgreSQL's identifier limit (NAMEDATALEN-1).
	maxRoleBytes = 63
	// maxRefBytes bounds a project ref.
	maxRefBytes = 63
)

// KeyConfig holds one project's verification keys. At least one source must
// be set; the sources may be combined (e.g. an HS256 secret and a JWKS URL).
type KeyConfig struct {
	// Secrets are HMAC secrets (raw bytes, at least MinSecretBytes each)
	// verifying HS256, HS384 and HS512. Several may be given during a
	// rotation. They have no kid: a token naming a kid that no JWKS key has
	// is tried against them.
	Secrets [][]byte
	// JWKSFile is the path of a JWK Set (RFC 7517) holding public RSA, EC
	// (P-256/384/521), Ed25519 or oct keys. It is read by SetProject only:
	// call SetProject again to reload it.
	JWKSFile string
	// JWKSURL is an http(s) URL serving a JWK Set. It is fetched on first
	// need (or by RefreshJWKS), cached, refreshed when older than the
	// maximum age or when a token names an unknown kid (at most once per
	// minimum refresh interval), and the last good set is kept when a
	// fetch fails.
	JWKSURL string
}

// Policy holds one project's rules for the claims of a verified token.
type Policy struct {
	// Roles lists the database roles a token may claim (exact, case
	// sensitive). It must not be empty.
	Roles []string
	// RoleClaim is the claim holding the role: a name or a dotted path into
	// nested objects ("app_metadata.role"; quote a name that contains dots:
	// `"https://example.com/claims".role`). Default "role". The value must
	// be a non-empty string.
	RoleClaim string
	// AnonRole is used when the role claim is absent; "" refuses such
	// tokens. It must be in Roles.
	AnonRole string
	// Issuer, when non-empty, must equal the iss claim.
	Issuer string
	// Audience, when non-empty, must be the aud claim or one of its
	// elements.
	Audience string
	// AllowNoExp accepts tokens without an exp claim. By default (false) exp
	// is required.
	AllowNoExp bool
	// Leeway is the clock skew tolerated for exp, nbf and iat. Zero means
	// DefaultLeeway (30s); a negative value means no leeway.
	Leeway time.Duration
	// MaxTokenBytes is the longest token accepted, checked before any
	// parsing. Zero means DefaultMaxTokenBytes (8192).
	MaxTokenBytes int
	// RefClaim is the claim (same path syntax as RoleClaim) that may name
	// the project. When the token has it, it must equal the project ref.
	// Default "ref".
	RefClaim string
	// RequireRefClaim refuses tokens without RefClaim. It is turned on
	// automatically while the project shares key material with another one
	// (see Verifier.SharedKeys), unless Audience isolates them.
	RequireRefClaim bool
}

// Identity is the result of a successful verification.
type Identity struct {
	// Role is the database role to SET ROLE to: the role claim, or
	// Policy.AnonRole. It is always one of Policy.Roles.
	Role string
	// Subject is the sub claim ("" when absent).
	Subject string
	// ClaimsJSON is the verified payload, byte for byte as the token carries
	// it (valid UTF-8, one JSON object, no duplicate member names), ready
	// for set_config('request.jwt.claims', ClaimsJSON, ...).
	ClaimsJSON string
	// ExpiresAt is the exp claim; zero when the token has none.
	ExpiresAt time.Time
	// Anonymous is true when Role is Policy.AnonRole because the token had
	// no role claim.
	Anonymous bool
}

// Option configures a Verifier.
type Option func(*Verifier)

// WithClock sets the clock used for exp/nbf/iat checks and JWKS cache ages
// (default time.Now).
func WithClock(now func() time.Time) Option {
	return func(v *Verifier) {
		if now != nil {
			v.now = now
		}
	}
}

// WithHTTPClient sets the client used to fetch JWKS URLs (default: a client
// with no timeout of its own; each fetch is bounded by the JWKS timeout and
// the caller's context).
func WithHTTPClient(c *http.Client) Option {
	return func(v *Verifier) {
		if c != nil {
			v.httpClient = c
		}
	}
}

// WithJWKSTimeout bounds each JWKS fetch (default DefaultJWKSTimeout, 5s).
func WithJWKSTimeout(d time.Duration) Option {
	return func(v *Verifier) {
		if d > 0 {
			v.jwksTimeout = d
		}
	}
}

// WithJWKSMinRefresh sets the minimum interval between two fetches of one
// JWKS URL, successful or not (default DefaultJWKSMinRefresh, 30s). It
// bounds the fetches that tokens with made-up kids can cause.
func WithJWKSMinRefresh(d time.Duration) Option {
	return func(v *Verifier) {
		if d > 0 {
			v.jwksMinRefresh = d
		}
	}
}

// WithJWKSMaxAge sets the age after which a cached JWKS is refetched on next
// use (default DefaultJWKSMaxAge, 10m). Keys removed by the provider stay
// accepted until then.
func WithJWKSMaxAge(d time.Duration) Option {
	return func(v *Verifier) {
		if d > 0 {
			v.jwksMaxAge = d
		}
	}
}

// WithLogger sets the logger for JWKS fetch failures (default: discard).
func WithLogger(l *slog.Logger) Option {
	return func(v *Verifier) {
		if l != nil {
			v.log = l
		}
	}
}

// Verifier verifies JWTs for a set of projects. It is safe for concurrent
// use; SetProject and RemoveProject may run while Verify does.
type Verifier struct {
	now            func() time.Time
	httpClient     *http.Client
	jwksTimeout    time.Duration
	jwksMinRefresh time.Duration
	jwksMaxAge     time.Duration
	log            *slog.Logger
	dummyKey       []byte // HMAC key for the decoy check on unknown projects

	mu       sync.RWMutex
	projects map[string]*project
	fpIndex  map[string]map[string]struct{} // key fingerprint -> project refs
}

type project struct {
	ref    string
	pol    policy
	static []verifyKey
	remote *remoteJWKS
	fps    []string // fingerprints of the key material, for sharing detection

	sharedWith []string    // guarded by Verifier.mu
	requireRef atomic.Bool // RequireRefClaim, or forced by sharing
}

type policy struct {
	roles           []string
	roleClaim       claimPath
	anonRole        string
	issuer          string
	audience        string
	allowNoExp      bool
	leeway          time.Duration
	maxBytes        int
	refClaim        claimPath
	requireRefClaim bool
}

// NewVerifier returns a Verifier with no projects.
func NewVerifier(opts ...Option) *Verifier {
	v := &Verifier{
		now:            time.Now,
		httpClient:     &http.Client{},
		jwksTimeout:    DefaultJWKSTimeout,
		jwksMinRefresh: DefaultJWKSMinRefresh,
		jwksMaxAge:     DefaultJWKSMaxAge,
		log:            slog.New(slog.DiscardHandler),
		dummyKey:       make([]byte, 32),
		projects:       make(map[string]*project),
		fpIndex:        make(map[string]map[string]struct{}),
	}
	_, _ = rand.Read(v.dummyKey) // never fails (crypto/rand since Go 1.24)
	for _, o := range opts {
		o(v)
	}
	return v
}

// SetProject adds the project ref, or replaces its keys and policy (config
// reload). It validates everything first and reads JWKSFile now; on error
// the previous configuration, if any, stays in force. A JWKS URL's cache is
// kept when the URL is unchanged. It recomputes key sharing: when this
// project and another hold an identical HMAC secret, public key or JWKS URL,
// both require the ref claim (see SharedKeys).
func (v *Verifier) SetProject(ref string, keys KeyConfig, pol Policy) error {
	if err := validRef(ref); err != nil {
		return err
	}
	np, err := buildProject(ref, keys, pol)
	if err != nil {
		return fmt.Errorf("project %q: %w", ref, err)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	old := v.projects[ref]
	if old != nil && old.remote != nil && np.remote != nil && old.remote.url == np.remote.url {
		np.remote = old.remote
	}
	v.projects[ref] = np
	v.reindex(ref, old, np)
	return nil
}

// RemoveProject removes the project ref; later tokens for it fail with
// ReasonUnknownProject. Removing an unknown ref does nothing.
func (v *Verifier) RemoveProject(ref string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	old, ok := v.projects[ref]
	if !ok {
		return
	}
	delete(v.projects, ref)
	v.reindex(ref, old, nil)
}

// SharedKeys returns the refs of the other projects that share key material
// (an HMAC secret, a public key from a JWKS file, or a JWKS URL) with ref,
// sorted; nil when none. While a project shares keys, tokens must carry the
// ref claim naming it, unless its Policy.Audience is set and differs from
// the Audience of every project it shares with. Keys fetched from different
// JWKS URLs are not compared.
func (v *Verifier) SharedKeys(ref string) []string {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if p := v.projects[ref]; p != nil {
		return slices.Clone(p.sharedWith)
	}
	return nil
}

// RefreshJWKS fetches the JWKS URL of project ref now (e.g. at startup, to
// fail fast and warm the cache), subject to the minimum refresh interval. It
// does nothing for a project without a JWKS URL.
func (v *Verifier) RefreshJWKS(ctx context.Context, ref string) error {
	v.mu.RLock()
	p := v.projects[ref]
	v.mu.RUnlock()
	if p == nil {
		return errf(ReasonUnknownProject, "project %q does not exist", truncate(ref, maxRefBytes))
	}
	if p.remote == nil {
		return nil
	}
	if err := v.refresh(ctx, p.remote, true); err != nil {
		return fmt.Errorf("project %q: %w", ref, err)
	}
	return nil
}

// Verify checks token for project ref and returns the identity to assume.
// userRole is the role the client put in its user name ("" when it gave
// none); when set it must equal the role the token grants. Every error is an
// *Error whose Message is safe to show the client. Checks run in this order:
// size, structure, project, algorithm and key, signature, exp, nbf, iat,
// iss, aud, sub type, ref claim, role, user name role. ctx bounds a JWKS
// fetch, if one is needed.
func (v *Verifier) Verify(ctx context.Context, ref, userRole, token string) (Identity, error) {
	v.mu.RLock()
	p := v.projects[ref]
	v.mu.RUnlock()

	maxBytes := DefaultMaxTokenBytes
	if p != nil {
		maxBytes = p.pol.maxBytes
	}
	if len(token) > maxBytes {
		return Identity{}, errf(ReasonTooLarge, "token is longer than %d bytes", maxBytes)
	}
	t, e := parseCompact(token)
	if e != nil {
		return Identity{}, e
	}
	if p == nil {
		// Spend about what an HS256 check costs, so that an unknown project
		// is not much faster to refuse than a bad signature.
		_ = jwt.SigningMethodHS256.Verify(t.signingInput, t.sig, v.dummyKey)
		return Identity{}, errf(ReasonUnknownProject, "project %q does not exist", truncate(ref, maxRefBytes))
	}
	if e := v.verifySignature(ctx, p, t); e != nil {
		return Identity{}, e
	}
	id, e := v.checkClaims(p, t, userRole)
	if e != nil {
		return Identity{}, e
	}
	return id, nil
}

func (v *Verifier) verifySignature(ctx context.Context, p *project, t *compactToken) *Error {
	alg, kid := t.header.alg, t.header.kid
	method := signingMethod(alg)
	if method == nil {
		return errf(ReasonAlgNotAllowed, "token algorithm %q is not allowed", truncate(alg, 16))
	}
	cands, e := v.candidates(ctx, p, alg, kid)
	if e != nil {
		return e
	}
	var lastErr error
	for _, k := range cands {
		err := method.Verify(t.signingInput, t.sig, k.key)
		if err == nil {
			return nil
		}
		lastErr = err
	}
	return newErr(ReasonBadSignature, "token signature is invalid", lastErr)
}

// candidates returns the keys to try: those allowing alg whose kid equals the
// token's kid (all of them when the token has no kid), else the kid-less keys
// allowing alg. When there are none and the project has a JWKS URL, the JWKS
// is refreshed (rate-limited) and the lookup retried.
func (v *Verifier) candidates(ctx context.Context, p *project, alg, kid string) ([]*verifyKey, *Error) {
	var snap *jwksSnapshot
	if p.remote != nil {
		snap = p.remote.snap.Load()
		if snap != nil && v.now().Sub(snap.fetched) >= v.jwksMaxAge {
			_ = v.refresh(ctx, p.remote, false) // failure: keep the last good set
			snap = p.remote.snap.Load()
		}
	}
	c := selectKeys(p.static, snap, alg, kid)
	if len(c) > 0 {
		return c, nil
	}
	var fetchErr error
	if p.remote != nil {
		fetchErr = v.refresh(ctx, p.remote, true)
		if now := p.remote.snap.Load(); now != snap {
			snap = now
			if c = selectKeys(p.static, snap, alg, kid); len(c) > 0 {
				return c, nil
			}
		}
		if snap == nil {
			return nil, newErr(ReasonKeysUnavailable, "verification keys are not available, try again later", fetchErr)
		}
	}
	if kid != "" && !hasKid(p.static, snap, kid) {
		return nil, newErr(ReasonUnknownKID, "token key id is unknown", fetchErr)
	}
	return nil, errf(ReasonAlgNotAllowed, "token algorithm %q is not allowed for this key", alg)
}

func forKeys(static []verifyKey, snap *jwksSnapshot, f func(*verifyKey) bool) {
	for i := range static {
		if !f(&static[i]) {
			return
		}
	}
	if snap != nil {
		for i := range snap.keys {
			if !f(&snap.keys[i]) {
				return
			}
		}
	}
}

func selectKeys(static []verifyKey, snap *jwksSnapshot, alg, kid string) []*verifyKey {
	var exact, loose []*verifyKey
	forKeys(static, snap, func(k *verifyKey) bool {
		switch {
		case !k.allows(alg):
		case kid == "" || k.kid == kid:
			exact = append(exact, k)
		case k.kid == "":
			loose = append(loose, k)
		}
		return true
	})
	if len(exact) > 0 {
		return exact
	}
	return loose
}

func hasKid(static []verifyKey, snap *jwksSnapshot, kid string) (found bool) {
	forKeys(static, snap, func(k *verifyKey) bool {
		found = k.kid == kid
		return !found
	})
	return found
}

func (v *Verifier) checkClaims(p *project, t *compactToken, userRole string) (Identity, *Error) {
	claims := t.claims
	pol := &p.pol
	now := v.now()
	id := Identity{ClaimsJSON: string(t.payload)}

	if raw, ok := claims["exp"]; ok {
		exp, err := numericDate(raw)
		if err != nil {
			return Identity{}, newErr(ReasonMalformed, "claim exp is not a valid NumericDate", err)
		}
		if !now.Before(exp.Add(pol.leeway)) {
			return Identity{}, errf(ReasonExpired, "token has expired")
		}
		id.ExpiresAt = exp
	} else if !pol.allowNoExp {
		return Identity{}, errf(ReasonMissingExp, "token has no exp claim")
	}
	if raw, ok := claims["nbf"]; ok {
		nbf, err := numericDate(raw)
		if err != nil {
			return Identity{}, newErr(ReasonMalformed, "claim nbf is not a valid NumericDate", err)
		}
		if now.Add(pol.leeway).Before(nbf) {
			return Identity{}, errf(ReasonNotYetValid, "token is not valid yet")
		}
	}
	if raw, ok := claims["iat"]; ok {
		iat, err := numericDate(raw)
		if err != nil {
			return Identity{}, newErr(ReasonMalformed, "claim iat is not a valid NumericDate", err)
		}
		if iat.After(now.Add(pol.leeway)) {
			return Identity{}, errf(ReasonIssuedInFuture, "token is issued in the future")
		}
	}
	if pol.issuer != "" {
		if iss, ok := jsonString(claims["iss"]); !ok || iss != pol.issuer {
			return Identity{}, errf(ReasonWrongIssuer, "token issuer is not accepted")
		}
	}
	if pol.audience != "" {
		raw, ok := claims["aud"]
		if !ok {
			return Identity{}, errf(ReasonWrongAudience, "token has no aud claim")
		}
		aud, err := audience(raw)
		if err != nil {
			return Identity{}, newErr(ReasonWrongAudience, "token audience is not accepted", err)
		}
		if !slices.Contains(aud, pol.audience) {
			return Identity{}, errf(ReasonWrongAudience, "token audience is not accepted")
		}
	}
	if raw, ok := claims["sub"]; ok {
		if id.Subject, ok = jsonString(raw); !ok {
			return Identity{}, errf(ReasonMalformed, "claim sub is not a string")
		}
	}

	raw, found, err := pol.refClaim.lookup(claims)
	switch {
	case err != nil:
		return Identity{}, newErr(ReasonWrongProject, "token project claim is not valid", err)
	case found:
		if r, ok := jsonString(raw); !ok || r != p.ref {
			return Identity{}, errf(ReasonWrongProject, "token is for another project")
		}
	case p.requireRef.Load():
		return Identity{}, errf(ReasonWrongProject, "token must name the project in its %s claim", pol.refClaim)
	}

	raw, found, err = pol.roleClaim.lookup(claims)
	switch {
	case err != nil:
		return Identity{}, newErr(ReasonNoRole, "token role claim is not valid", err)
	case found:
		role, ok := jsonString(raw)
		if !ok || role == "" {
			return Identity{}, errf(ReasonNoRole, "token role claim is not a non-empty string")
		}
		id.Role = role
	case pol.anonRole != "":
		id.Role, id.Anonymous = pol.anonRole, true
	default:
		return Identity{}, errf(ReasonNoRole, "token has no role claim")
	}
	if !slices.Contains(pol.roles, id.Role) {
		return Identity{}, errf(ReasonRoleNotAllowed, "role %q is not allowed for this project", truncate(id.Role, maxRoleBytes))
	}
	if userRole != "" && userRole != id.Role {
		return Identity{}, errf(ReasonRoleMismatch, "user name role %q does not match the token role %q",
			truncate(userRole, maxRoleBytes), id.Role)
	}
	return id, nil
}

// String formats the path back to the syntax parseClaimPath accepts.
func (p claimPath) String() string {
	s := ""
	for i, name := range p {
		if i > 0 {
			s += "."
		}
		if strings.Contains(name, ".") {
			s += `"` + name + `"`
		} else {
			s += name
		}
	}
	return s
}

func validRef(ref string) error {
	if ref == "" || len(ref) > maxRefBytes {
		return fmt.Errorf("project ref must be 1 to %d bytes", maxRefBytes)
	}
	if err := printable(ref); err != nil {
		return fmt.Errorf("project ref %q: %w", ref, err)
	}
	return nil
}

func printable(s string) error {
	if !utf8.ValidString(s) {
		return errors.New("not valid UTF-8")
	}
	for _, r := range s {
		if unicode.IsControl(r) {
			return errors.New("contains a control character")
		}
	}
	return nil
}

func buildProject(ref string, keys KeyConfig, pol Policy) (*project, error) {
	np := &project{ref: ref}
	if err := np.pol.set(pol); err != nil {
		return nil, err
	}
	np.requireRef.Store(np.pol.requireRefClaim)
	if len(keys.Secrets) == 0 && keys.JWKSFile == "" && keys.JWKSURL == "" {
		return nil, errors.New("no verification keys (Secrets, JWKSFile or JWKSURL)")
	}
	for i, s := range keys.Secrets {
		k, err := hmacKey(s)
		if err != nil {
			return nil, fmt.Errorf("secret %d: %w", i, err)
		}
		np.static = append(np.static, k)
	}
	if keys.JWKSFile != "" {
		data, err := readFileLimited(keys.JWKSFile, maxJWKSBytes)
		if err != nil {
			return nil, err
		}
		ks, err := parseJWKS(data)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", keys.JWKSFile, err)
		}
		np.static = append(np.static, ks...)
	}
	for _, k := range np.static {
		fp, err := k.fingerprint()
		if err != nil {
			return nil, err
		}
		np.fps = append(np.fps, fp)
	}
	if keys.JWKSURL != "" {
		r, err := newRemoteJWKS(keys.JWKSURL)
		if err != nil {
			return nil, err
		}
		np.remote = r
		np.fps = append(np.fps, "url:"+keys.JWKSURL)
	}
	slices.Sort(np.fps)
	np.fps = slices.Compact(np.fps)
	return np, nil
}

func (pp *policy) set(pol Policy) error {
	if len(pol.Roles) == 0 {
		return errors.New("policy has no Roles")
	}
	for _, r := range pol.Roles {
		if r == "" || len(r) > maxRoleBytes {
			return fmt.Errorf("role %q must be 1 to %d bytes", r, maxRoleBytes)
		}
		if err := printable(r); err != nil {
			return fmt.Errorf("role %q: %w", r, err)
		}
	}
	pp.roles = slices.Clone(pol.Roles)
	if pol.AnonRole != "" && !slices.Contains(pol.Roles, pol.AnonRole) {
		return fmt.Errorf("AnonRole %q is not in Roles", pol.AnonRole)
	}
	pp.anonRole = pol.AnonRole
	var err error
	if pp.roleClaim, err = parseClaimPath(cmpOr(pol.RoleClaim, DefaultRoleClaim)); err != nil {
		return fmt.Errorf("RoleClaim: %w", err)
	}
	if pp.refClaim, err = parseClaimPath(cmpOr(pol.RefClaim, DefaultRefClaim)); err != nil {
		return fmt.Errorf("RefClaim: %w", err)
	}
	pp.issuer, pp.audience = pol.Issuer, pol.Audience
	pp.allowNoExp = pol.AllowNoExp
	switch {
	case pol.Leeway == 0:
		pp.leeway = DefaultLeeway
	case pol.Leeway < 0:
		pp.leeway = 0
	default:
		pp.leeway = pol.Leeway
	}
	switch {
	case pol.MaxTokenBytes == 0:
		pp.maxBytes = DefaultMaxTokenBytes
	case pol.MaxTokenBytes < 0:
		return fmt.Errorf("MaxTokenBytes %d is negative", pol.MaxTokenBytes)
	default:
		pp.maxBytes = pol.MaxTokenBytes
	}
	pp.requireRefClaim = pol.RequireRefClaim
	return nil
}

func cmpOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

func readFileLimited(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("JWKS file: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("JWKS file: %w", err)
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("JWKS file %s is larger than %d bytes", path, limit)
	}
	return data, nil
}

// reindex updates the fingerprint index for ref going from old to np (either
// may be nil) and recomputes sharing for every project affected. Called with
// v.mu held.
func (v *Verifier) reindex(ref string, old, np *project) {
	affected := map[string]struct{}{ref: {}}
	if old != nil {
		for _, fp := range old.fps {
			refs := v.fpIndex[fp]
			delete(refs, ref)
			for r := range refs {
				affected[r] = struct{}{}
			}
			if len(refs) == 0 {
				delete(v.fpIndex, fp)
			}
		}
	}
	if np != nil {
		for _, fp := range np.fps {
			refs := v.fpIndex[fp]
			if refs == nil {
				refs = make(map[string]struct{})
				v.fpIndex[fp] = refs
			}
			refs[ref] = struct{}{}
			for r := range refs {
				affected[r] = struct{}{}
			}
		}
	}
	for r := range affected {
		p := v.projects[r]
		if p == nil {
			continue
		}
		var shared []string
		for _, fp := range p.fps {
			for other := range v.fpIndex[fp] {
				if other != p.ref && !slices.Contains(shared, other) {
					shared = append(shared, other)
				}
			}
		}
		slices.Sort(shared)
		p.sharedWith = shared
		audIsolates := p.pol.audience != ""
		for _, other := range shared {
			if op := v.projects[other]; op == nil || op.pol.audience == p.pol.audience {
				audIsolates = false
			}
		}
		p.requireRef.Store(p.pol.requireRefClaim || (len(shared) > 0 && !audIsolates))
	}
}
