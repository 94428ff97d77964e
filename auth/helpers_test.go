package auth

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// testKeys holds key pairs generated once per test binary (RSA generation is
// slow under -race).
type testKeys struct {
	rsa1, rsa2 *rsa.PrivateKey
	ec256      *ecdsa.PrivateKey
	ec384      *ecdsa.PrivateKey
	ec521      *ecdsa.PrivateKey
	ed         ed25519.PrivateKey
}

var keysOnce = sync.OnceValue(func() *testKeys {
	must := func(err error) {
		if err != nil {
			panic(err)
		}
	}
	var k testKeys
	var err error
	k.rsa1, err = rsa.GenerateKey(rand.Reader, 2048)
	must(err)
	k.rsa2, err = rsa.GenerateKey(rand.Reader, 2048)
	must(err)
	k.ec256, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(err)
	k.ec384, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	must(err)
	k.ec521, err = ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	must(err)
	_, k.ed, err = ed25519.GenerateKey(rand.Reader)
	must(err)
	return &k
})

const (
	refA = "projaaaaaaaaaaaaaaaa"
	refB = "projbbbbbbbbbbbbbbbb"
)

var (
	secretA  = []byte("secret-a-0123456789-0123456789-0123456789")
	secretA2 = []byte("secret-a2-rotated-0123456789-0123456789-xx")
	secretB  = []byte("secret-b-0123456789-0123456789-0123456789")
)

// testNow is the verifier's clock in tests; whole seconds so NumericDates
// round-trip.
func testNow() time.Time { return time.Unix(1_750_000_000, 0) }

// clock is an adjustable clock for a Verifier.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: testNow()} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func basePolicy() Policy {
	return Policy{Roles: []string{"anon", "authenticated", "service_role"}}
}

// claimsFor returns valid claims for ref at testNow, with overrides applied
// (a nil value deletes the claim).
func claimsFor(ref string, over map[string]any) map[string]any {
	now := testNow().Unix()
	c := map[string]any{
		"sub":  "user-1",
		"role": "authenticated",
		"ref":  ref,
		"iat":  now,
		"exp":  now + 3600,
	}
	for k, v := range over {
		if v == nil {
			delete(c, k)
		} else {
			c[k] = v
		}
	}
	return c
}

func mint(t testing.TB, key MintKey, claims map[string]any) string {
	t.Helper()
	tok, err := Mint(key, claims, 0)
	if err != nil {
		t.Fatalf("Mint: %v", err)
	}
	return tok
}

// rawToken builds a token from literal header and payload JSON, signed with
// alg and key (nil key: empty signature). It bypasses every check of Sign.
func rawToken(t testing.TB, header, payload, alg string, key any) string {
	t.Helper()
	enc := base64.RawURLEncoding.EncodeToString
	input := enc([]byte(header)) + "." + enc([]byte(payload))
	if key == nil {
		return input + "."
	}
	sig, err := signingMethod(alg).Sign(input, key)
	if err != nil {
		t.Fatalf("sign %s: %v", alg, err)
	}
	return input + "." + enc(sig)
}

// writeJWKS writes a JWKS file in a temporary directory.
func writeJWKS(t testing.TB, keys ...JWK) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "jwks.json")
	if err := WriteJWKSFile(path, keys...); err != nil {
		t.Fatalf("WriteJWKSFile: %v", err)
	}
	return path
}

// wantReason checks that err is an *Error with reason want (0: no error).
func wantReason(t testing.TB, err error, want Reason, token string) {
	t.Helper()
	if want == 0 {
		if err != nil {
			t.Fatalf("unexpected error: %v", err)
		}
		return
	}
	var ae *Error
	if !errors.As(err, &ae) {
		t.Fatalf("error %v (%T) is not an *Error, want %s", err, err, want)
	}
	if ae.Reason != want {
		t.Fatalf("reason %s (%v), want %s", ae.Reason, err, want)
	}
	if ae.SQLState != want.SQLState() {
		t.Fatalf("SQLState %s, want %s", ae.SQLState, want.SQLState())
	}
	if token != "" {
		for _, part := range append([]string{token}, strings.Split(token, ".")...) {
			if len(part) >= 8 && (strings.Contains(ae.Message, part) || strings.Contains(err.Error(), part)) {
				t.Fatalf("error message contains the token: %q", err.Error())
			}
		}
	}
}

func newTestVerifier(t testing.TB, c *clock, opts ...Option) *Verifier {
	t.Helper()
	return NewVerifier(append([]Option{WithClock(c.Now)}, opts...)...)
}

func verify(v *Verifier, ref, userRole, token string) (Identity, error) {
	return v.Verify(context.Background(), ref, userRole, token)
}
