package auth

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
)

// TestSharedSecretIsolation: two projects configured with the same secret by
// mistake must not accept each other's tokens.
func TestSharedSecretIsolation(t *testing.T) {
	v := newTestVerifier(t, newClock())
	shared := KeyConfig{Secrets: [][]byte{secretA}}
	if err := v.SetProject(refA, shared, basePolicy()); err != nil {
		t.Fatal(err)
	}
	noRef := mint(t, MintKey{Secret: secretA}, claimsFor(refA, map[string]any{"ref": nil}))
	forA := mint(t, MintKey{Secret: secretA}, claimsFor(refA, nil))
	forB := mint(t, MintKey{Secret: secretA}, claimsFor(refB, nil))

	// Alone, A accepts tokens without the ref claim.
	_, err := verify(v, refA, "", noRef)
	wantReason(t, err, 0, "")
	if got := v.SharedKeys(refA); got != nil {
		t.Fatalf("SharedKeys = %v", got)
	}

	if err := v.SetProject(refB, KeyConfig{Secrets: [][]byte{secretB, secretA}}, basePolicy()); err != nil {
		t.Fatal(err)
	}
	if got := v.SharedKeys(refA); !slices.Equal(got, []string{refB}) {
		t.Fatalf("SharedKeys(A) = %v", got)
	}
	if got := v.SharedKeys(refB); !slices.Equal(got, []string{refA}) {
		t.Fatalf("SharedKeys(B) = %v", got)
	}
	for _, c := range []struct {
		ref, tok string
		want     Reason
	}{
		{refA, forA, 0},
		{refB, forB, 0},
		{refB, forA, ReasonWrongProject},
		{refA, forB, ReasonWrongProject},
		{refA, noRef, ReasonWrongProject}, // now ambiguous: refused on both
		{refB, noRef, ReasonWrongProject},
	} {
		_, err := verify(v, c.ref, "", c.tok)
		wantReason(t, err, c.want, c.tok)
	}

	// B rotates away from the shared secret: A no longer needs the ref claim.
	if err := v.SetProject(refB, KeyConfig{Secrets: [][]byte{secretB}}, basePolicy()); err != nil {
		t.Fatal(err)
	}
	if got := v.SharedKeys(refA); got != nil {
		t.Fatalf("SharedKeys(A) after B's rotation = %v", got)
	}
	_, err = verify(v, refA, "", noRef)
	wantReason(t, err, 0, "")
	_, err = verify(v, refB, "", forB)
	wantReason(t, err, ReasonBadSignature, forB)

	// Shared again, then B removed.
	if err := v.SetProject(refB, shared, basePolicy()); err != nil {
		t.Fatal(err)
	}
	_, err = verify(v, refA, "", noRef)
	wantReason(t, err, ReasonWrongProject, noRef)
	v.RemoveProject(refB)
	_, err = verify(v, refA, "", noRef)
	wantReason(t, err, 0, "")
}

// TestSharedKeyAudienceIsolation: distinct audiences isolate projects that
// share a key, so the ref claim is then not required; equal audiences do not.
func TestSharedKeyAudienceIsolation(t *testing.T) {
	k := keysOnce()
	jwks := writeJWKS(t, JWK{KeyID: "k1", Key: &k.ec256.PublicKey})
	polA, polB := basePolicy(), basePolicy()
	polA.Audience, polB.Audience = "aud-a", "aud-b"
	v := newTestVerifier(t, newClock())
	if err := v.SetProject(refA, KeyConfig{JWKSFile: jwks}, polA); err != nil {
		t.Fatal(err)
	}
	if err := v.SetProject(refB, KeyConfig{JWKSFile: jwks}, polB); err != nil {
		t.Fatal(err)
	}
	if got := v.SharedKeys(refA); !slices.Equal(got, []string{refB}) {
		t.Fatalf("SharedKeys(A) = %v", got)
	}
	key := MintKey{KeyID: "k1", PrivateKey: k.ec256}
	audA := mint(t, key, claimsFor(refA, map[string]any{"ref": nil, "aud": "aud-a"}))
	_, err := verify(v, refA, "", audA)
	wantReason(t, err, 0, "")
	_, err = verify(v, refB, "", audA)
	wantReason(t, err, ReasonWrongAudience, audA)

	// Same audience on both: aud no longer tells them apart.
	polB.Audience = "aud-a"
	if err := v.SetProject(refB, KeyConfig{JWKSFile: jwks}, polB); err != nil {
		t.Fatal(err)
	}
	_, err = verify(v, refA, "", audA)
	wantReason(t, err, ReasonWrongProject, audA)
	_, err = verify(v, refB, "", audA)
	wantReason(t, err, ReasonWrongProject, audA)
	withRef := mint(t, key, claimsFor(refA, map[string]any{"aud": "aud-a"}))
	_, err = verify(v, refA, "", withRef)
	wantReason(t, err, 0, "")
	_, err = verify(v, refB, "", withRef)
	wantReason(t, err, ReasonWrongProject, withRef)
}

// TestConcurrentReload runs Verify while projects are replaced and removed.
func TestConcurrentReload(t *testing.T) {
	v := newTestVerifier(t, newClock())
	pol := basePolicy()
	if err := v.SetProject(refA, KeyConfig{Secrets: [][]byte{secretA}}, pol); err != nil {
		t.Fatal(err)
	}
	tok := mint(t, MintKey{Secret: secretA}, claimsFor(refA, nil))
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 200 {
				_, err := v.Verify(context.Background(), refA, "", tok)
				if err != nil {
					if ae := err.(*Error); ae.Reason != ReasonUnknownProject && ae.Reason != ReasonWrongProject {
						t.Errorf("goroutine %d iteration %d: %v", g, i, err)
						return
					}
				}
			}
		})
	}
	wg.Go(func() {
		for i := range 100 {
			ref := fmt.Sprintf("other%d", i%5)
			if err := v.SetProject(ref, KeyConfig{Secrets: [][]byte{secretA}}, pol); err != nil {
				t.Error(err)
				return
			}
			_ = v.SharedKeys(refA)
			if i%3 == 0 {
				v.RemoveProject(ref)
			}
			if i%10 == 0 {
				_ = v.SetProject(refA, KeyConfig{Secrets: [][]byte{secretA}}, pol)
			}
		}
	})
	wg.Wait()
}
