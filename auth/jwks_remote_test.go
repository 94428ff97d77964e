package auth

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// jwksServer serves a JWK Set that tests can change, or fail.
type jwksServer struct {
	*httptest.Server
	hits atomic.Int64
	mu   sync.Mutex
	body []byte
	fail bool
	hang bool
}

func newJWKSServer(t *testing.T, keys ...JWK) *jwksServer {
	t.Helper()
	s := &jwksServer{}
	s.set(t, keys...)
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.hits.Add(1)
		s.mu.Lock()
		body, fail, hang := s.body, s.fail, s.hang
		s.mu.Unlock()
		if hang {
			<-r.Context().Done()
			return
		}
		if fail {
			http.Error(w, "boom", http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(body)
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *jwksServer) set(t *testing.T, keys ...JWK) {
	t.Helper()
	body, err := MarshalJWKS(keys...)
	if err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.body = body
}

func (s *jwksServer) setFail(fail, hang bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fail, s.hang = fail, hang
}

func TestJWKSURL(t *testing.T) {
	k := keysOnce()
	srv := newJWKSServer(t, JWK{KeyID: "k1", Key: &k.rsa1.PublicKey})
	c := newClock()
	v := newTestVerifier(t, c, WithHTTPClient(srv.Client()))
	keys := KeyConfig{JWKSURL: srv.URL + "/.well-known/jwks.json"}
	if err := v.SetProject(refA, keys, basePolicy()); err != nil {
		t.Fatal(err)
	}
	if n := srv.hits.Load(); n != 0 {
		t.Fatalf("SetProject fetched the URL (%d hits); it should be lazy", n)
	}
	tok1 := mint(t, MintKey{KeyID: "k1", PrivateKey: k.rsa1}, claimsFor(refA, nil))
	tok2 := mint(t, MintKey{KeyID: "k2", PrivateKey: k.ec256}, claimsFor(refA, nil))
	tok3 := mint(t, MintKey{KeyID: "k3", PrivateKey: k.ed}, claimsFor(refA, nil))
	step := func(name, tok string, want Reason, wantHits int64) {
		t.Helper()
		_, err := verify(v, refA, "", tok)
		if want == 0 && err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if want != 0 {
			var ae *Error
			if !errors.As(err, &ae) || ae.Reason != want {
				t.Fatalf("%s: error %v, want %s", name, err, want)
			}
		}
		if got := srv.hits.Load(); got != wantHits {
			t.Fatalf("%s: %d fetches, want %d", name, got, wantHits)
		}
	}

	step("first use fetches", tok1, 0, 1)
	step("cached", tok1, 0, 1)

	srv.set(t, JWK{KeyID: "k1", Key: &k.rsa1.PublicKey}, JWK{KeyID: "k2", Key: &k.ec256.PublicKey})
	step("new kid within the rate limit: no fetch", tok2, ReasonUnknownKID, 1)
	c.Advance(31 * time.Second)
	step("new kid refreshes", tok2, 0, 2)
	step("old kid still cached", tok1, 0, 2)
	step("unknown kid right after a fetch: rate-limited", tok3, ReasonUnknownKID, 2)
	step("again: still rate-limited", tok3, ReasonUnknownKID, 2)
	c.Advance(31 * time.Second)
	step("unknown kid after the interval: one fetch", tok3, ReasonUnknownKID, 3)
	step("unknown kid again: rate-limited", tok3, ReasonUnknownKID, 3)

	// Reload with the same URL keeps the cache.
	if err := v.SetProject(refA, keys, basePolicy()); err != nil {
		t.Fatal(err)
	}
	step("cache kept across SetProject", tok2, 0, 3)

	// The server fails; after the max age the refetch fails and the last
	// good set stays in use.
	srv.setFail(true, false)
	c.Advance(DefaultJWKSMaxAge + time.Second)
	tok1 = mint(t, MintKey{KeyID: "k1", PrivateKey: k.rsa1}, claimsFor(refA, map[string]any{"iat": c.Now().Unix(), "exp": c.Now().Unix() + 3600}))
	tok2 = mint(t, MintKey{KeyID: "k2", PrivateKey: k.ec256}, claimsFor(refA, map[string]any{"iat": c.Now().Unix(), "exp": c.Now().Unix() + 3600}))
	step("stale cache, failing server: last good kept", tok1, 0, 4)
	step("still last good, fetch rate-limited", tok2, 0, 4)
	c.Advance(31 * time.Second)
	step("stale, failing again: last good kept", tok2, 0, 5)

	// The server recovers with k1 removed.
	srv.setFail(false, false)
	srv.set(t, JWK{KeyID: "k2", Key: &k.ec256.PublicKey})
	c.Advance(31 * time.Second)
	step("stale: refetch drops k1", tok1, ReasonUnknownKID, 6)
	step("k2 still good", tok2, 0, 6)
}

func TestJWKSURLUnavailable(t *testing.T) {
	k := keysOnce()
	srv := newJWKSServer(t, JWK{KeyID: "k1", Key: &k.rsa1.PublicKey})
	srv.setFail(true, false)
	c := newClock()
	v := newTestVerifier(t, c, WithHTTPClient(srv.Client()))
	if err := v.SetProject(refA, KeyConfig{JWKSURL: srv.URL}, basePolicy()); err != nil {
		t.Fatal(err)
	}
	tok := mint(t, MintKey{KeyID: "k1", PrivateKey: k.rsa1}, claimsFor(refA, nil))
	_, err := verify(v, refA, "", tok)
	wantReason(t, err, ReasonKeysUnavailable, tok)
	if err.(*Error).SQLState != "57P03" {
		t.Fatal(err.(*Error).SQLState)
	}
	if err := v.RefreshJWKS(context.Background(), refA); err == nil {
		t.Fatal("RefreshJWKS succeeded against a failing server")
	}
	srv.setFail(false, false)
	c.Advance(31 * time.Second)
	if err := v.RefreshJWKS(context.Background(), refA); err != nil {
		t.Fatalf("RefreshJWKS: %v", err)
	}
	if n := srv.hits.Load(); n != 2 {
		t.Fatalf("%d fetches, want 2 (second verify rate-limited)", n)
	}
	_, err = verify(v, refA, "", tok)
	wantReason(t, err, 0, "")
	if err := v.RefreshJWKS(context.Background(), "nope"); err == nil {
		t.Fatal("RefreshJWKS of an unknown project succeeded")
	}
}

func TestJWKSURLTimeoutAndCancel(t *testing.T) {
	k := keysOnce()
	srv := newJWKSServer(t, JWK{KeyID: "k1", Key: &k.rsa1.PublicKey})
	srv.setFail(false, true)
	c := newClock()
	v := newTestVerifier(t, c, WithHTTPClient(srv.Client()), WithJWKSTimeout(100*time.Millisecond))
	if err := v.SetProject(refA, KeyConfig{JWKSURL: srv.URL}, basePolicy()); err != nil {
		t.Fatal(err)
	}
	tok := mint(t, MintKey{KeyID: "k1", PrivateKey: k.rsa1}, claimsFor(refA, nil))
	start := time.Now()
	_, err := verify(v, refA, "", tok)
	wantReason(t, err, ReasonKeysUnavailable, tok)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("error %v does not wrap context.DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("fetch took %v despite the 100ms timeout", d)
	}

	// The caller's context bounds the fetch too.
	c.Advance(31 * time.Second)
	v2 := newTestVerifier(t, c, WithHTTPClient(srv.Client()))
	if err := v2.SetProject(refA, KeyConfig{JWKSURL: srv.URL}, basePolicy()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err = v2.Verify(ctx, refA, "", tok)
	wantReason(t, err, ReasonKeysUnavailable, tok)
}

// TestJWKSURLSingleFetch: concurrent first uses cause one fetch.
func TestJWKSURLSingleFetch(t *testing.T) {
	k := keysOnce()
	srv := newJWKSServer(t, JWK{KeyID: "k1", Key: &k.ec256.PublicKey})
	v := newTestVerifier(t, newClock(), WithHTTPClient(srv.Client()))
	if err := v.SetProject(refA, KeyConfig{JWKSURL: srv.URL}, basePolicy()); err != nil {
		t.Fatal(err)
	}
	tok := mint(t, MintKey{KeyID: "k1", PrivateKey: k.ec256}, claimsFor(refA, nil))
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			if _, err := verify(v, refA, "", tok); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if n := srv.hits.Load(); n != 1 {
		t.Fatalf("%d fetches, want 1", n)
	}
}

func TestJWKSURLShared(t *testing.T) {
	k := keysOnce()
	srv := newJWKSServer(t, JWK{KeyID: "k1", Key: &k.ec256.PublicKey})
	v := newTestVerifier(t, newClock(), WithHTTPClient(srv.Client()))
	for _, ref := range []string{refA, refB} {
		if err := v.SetProject(ref, KeyConfig{JWKSURL: srv.URL}, basePolicy()); err != nil {
			t.Fatal(err)
		}
	}
	if got := v.SharedKeys(refB); !slices.Equal(got, []string{refA}) {
		t.Fatalf("SharedKeys(B) = %v", got)
	}
	tok := mint(t, MintKey{KeyID: "k1", PrivateKey: k.ec256}, claimsFor(refA, map[string]any{"ref": nil}))
	_, err := verify(v, refA, "", tok)
	wantReason(t, err, ReasonWrongProject, tok)
}
