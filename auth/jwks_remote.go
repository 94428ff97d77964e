package auth

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync/atomic"
	"time"
)

// Defaults for JWKS URLs; see the With* options.
const (
	// DefaultJWKSTimeout bounds one JWKS fetch.
	DefaultJWKSTimeout = 5 * time.Second
	// DefaultJWKSMinRefresh is the minimum interval between two fetches of
	// one JWKS URL.
	DefaultJWKSMinRefresh = 30 * time.Second
	// DefaultJWKSMaxAge is the age after which a cached JWKS is refetched.
	DefaultJWKSMaxAge = 10 * time.Minute
)

// errRateLimited is returned when a refresh was wanted but the last attempt
// was too recent.
var errRateLimited = errors.New("JWKS refresh rate-limited")

// remoteJWKS caches the keys served at one JWKS URL. The key snapshot is read
// lock-free; fetches are serialized by sem, which also guards lastAttempt.
type remoteJWKS struct {
	url      string
	redacted string // url without a password, for logs
	snap     atomic.Pointer[jwksSnapshot]
	sem      chan struct{} // capacity 1: held while fetching

	lastAttempt time.Time // guarded by sem
	lastErr     error     // guarded by sem
}

type jwksSnapshot struct {
	keys    []verifyKey
	fetched time.Time
}

func newRemoteJWKS(rawURL string) (*remoteJWKS, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("JWKS URL: %w", err)
	}
	if (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return nil, fmt.Errorf("JWKS URL %q must be an absolute http or https URL", rawURL)
	}
	return &remoteJWKS{url: rawURL, redacted: u.Redacted(), sem: make(chan struct{}, 1)}, nil
}

// refresh fetches the JWKS unless the cache changed while waiting or the last
// attempt is more recent than the minimum refresh interval. With wait, the
// caller queues behind a fetch in progress (bounded by ctx); without it, the
// caller gives up at once if another fetch is in progress, and fetches only if
// the snapshot is older than the maximum age.
func (v *Verifier) refresh(ctx context.Context, r *remoteJWKS, wait bool) error {
	seen := r.snap.Load()
	if wait {
		select {
		case r.sem <- struct{}{}:
		case <-ctx.Done():
			return fmt.Errorf("waiting for JWKS fetch: %w", ctx.Err())
		}
	} else {
		select {
		case r.sem <- struct{}{}:
		default:
			return nil
		}
	}
	defer func() { <-r.sem }()

	cur := r.snap.Load()
	if cur != seen {
		return nil // refreshed by someone else meanwhile
	}
	now := v.now()
	if !wait && cur != nil && now.Sub(cur.fetched) < v.jwksMaxAge {
		return nil
	}
	if !r.lastAttempt.IsZero() && now.Sub(r.lastAttempt) < v.jwksMinRefresh {
		if r.lastErr != nil {
			return fmt.Errorf("%w (last fetch failed: %w)", errRateLimited, r.lastErr)
		}
		return errRateLimited
	}
	r.lastAttempt = now
	keys, err := v.fetchJWKS(ctx, r.url)
	if err != nil {
		r.lastErr = err
		v.log.WarnContext(ctx, "JWKS fetch failed; keeping the last good key set",
			"url", r.redacted, "have_keys", cur != nil, "err", err)
		return err
	}
	r.lastErr = nil
	r.snap.Store(&jwksSnapshot{keys: keys, fetched: now})
	v.log.DebugContext(ctx, "JWKS fetched", "url", r.redacted, "keys", len(keys))
	return nil
}

func (v *Verifier) fetchJWKS(ctx context.Context, rawURL string) ([]verifyKey, error) {
	ctx, cancel := context.WithTimeout(ctx, v.jwksTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
	if err != nil {
		return nil, fmt.Errorf("JWKS request: %w", err)
	}
	req.Header.Set("Accept", "application/json, application/jwk-set+json")
	resp, err := v.httpClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("JWKS fetch: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
		return nil, fmt.Errorf("JWKS fetch: HTTP status %d", resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxJWKSBytes+1))
	if err != nil {
		return nil, fmt.Errorf("JWKS read: %w", err)
	}
	keys, err := parseJWKS(body)
	if err != nil {
		return nil, fmt.Errorf("JWKS from URL: %w", err)
	}
	return keys, nil
}
