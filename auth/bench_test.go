package auth

import (
	"context"
	"testing"
)

func benchVerify(b *testing.B, keys KeyConfig, key MintKey) {
	v := NewVerifier(WithClock(testNow))
	pol := basePolicy()
	pol.Issuer = "https://issuer.example/auth/v1"
	pol.Audience = "authenticated"
	if err := v.SetProject(refA, keys, pol); err != nil {
		b.Fatal(err)
	}
	tok := mint(b, key, claimsFor(refA, map[string]any{
		"iss": "https://issuer.example/auth/v1", "aud": "authenticated",
		"email": "user@example.com", "app_metadata": map[string]any{"provider": "email", "providers": []string{"email"}},
		"user_metadata": map[string]any{}, "session_id": "5f8b3a4e-6c1d-4a8e-9b7f-1e2d3c4b5a69",
	}))
	ctx := context.Background()
	if _, err := v.Verify(ctx, refA, "authenticated", tok); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if _, err := v.Verify(ctx, refA, "authenticated", tok); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkVerifyHS256(b *testing.B) {
	benchVerify(b, KeyConfig{Secrets: [][]byte{secretA}}, MintKey{Secret: secretA})
}

func BenchmarkVerifyRS256(b *testing.B) {
	k := keysOnce()
	path := writeJWKS(b, JWK{KeyID: "rsa1", Key: &k.rsa1.PublicKey})
	benchVerify(b, KeyConfig{JWKSFile: path}, MintKey{KeyID: "rsa1", PrivateKey: k.rsa1})
}

func BenchmarkVerifyES256(b *testing.B) {
	k := keysOnce()
	path := writeJWKS(b, JWK{KeyID: "ec1", Key: &k.ec256.PublicKey})
	benchVerify(b, KeyConfig{JWKSFile: path}, MintKey{KeyID: "ec1", PrivateKey: k.ec256})
}

func BenchmarkVerifyUnknownProject(b *testing.B) {
	v := NewVerifier(WithClock(testNow))
	tok := mint(b, MintKey{Secret: secretA}, claimsFor(refA, nil))
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := v.Verify(ctx, refA, "", tok); err == nil {
			b.Fatal("want error")
		}
	}
}
