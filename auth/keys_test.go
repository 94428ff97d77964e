package auth

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestRotationJWKSFile(t *testing.T) {
	k := keysOnce()
	v := newTestVerifier(t, newClock())
	path := writeJWKS(t, JWK{KeyID: "old", Key: &k.rsa1.PublicKey})
	if err := v.SetProject(refA, KeyConfig{JWKSFile: path}, basePolicy()); err != nil {
		t.Fatal(err)
	}
	oldTok := mint(t, MintKey{KeyID: "old", PrivateKey: k.rsa1}, claimsFor(refA, nil))
	newTok := mint(t, MintKey{KeyID: "new", PrivateKey: k.rsa2}, claimsFor(refA, nil))
	_, err := verify(v, refA, "", oldTok)
	wantReason(t, err, 0, "")
	_, err = verify(v, refA, "", newTok)
	wantReason(t, err, ReasonUnknownKID, newTok)

	// Rotation in progress: both keys published.
	if err := WriteJWKSFile(path, JWK{KeyID: "old", Key: &k.rsa1.PublicKey}, JWK{KeyID: "new", Key: &k.rsa2.PublicKey}); err != nil {
		t.Fatal(err)
	}
	if err := v.SetProject(refA, KeyConfig{JWKSFile: path}, basePolicy()); err != nil {
		t.Fatal(err)
	}
	for _, tok := range []string{oldTok, newTok} {
		_, err := verify(v, refA, "", tok)
		wantReason(t, err, 0, "")
	}

	// Old key removed.
	if err := WriteJWKSFile(path, JWK{KeyID: "new", Key: &k.rsa2.PublicKey}); err != nil {
		t.Fatal(err)
	}
	if err := v.SetProject(refA, KeyConfig{JWKSFile: path}, basePolicy()); err != nil {
		t.Fatal(err)
	}
	_, err = verify(v, refA, "", oldTok)
	wantReason(t, err, ReasonUnknownKID, oldTok)
	_, err = verify(v, refA, "", newTok)
	wantReason(t, err, 0, "")

	// A token without kid signed by the removed key is refused as well.
	noKid := mint(t, MintKey{PrivateKey: k.rsa1}, claimsFor(refA, nil))
	_, err = verify(v, refA, "", noKid)
	wantReason(t, err, ReasonBadSignature, noKid)
}

func TestRotationSecrets(t *testing.T) {
	v := newTestVerifier(t, newClock())
	set := func(secrets ...[]byte) {
		t.Helper()
		if err := v.SetProject(refA, KeyConfig{Secrets: secrets}, basePolicy()); err != nil {
			t.Fatal(err)
		}
	}
	oldTok := mint(t, MintKey{Secret: secretA}, claimsFor(refA, nil))
	newTok := mint(t, MintKey{Secret: secretA2}, claimsFor(refA, nil))
	set(secretA, secretA2)
	for _, tok := range []string{oldTok, newTok} {
		_, err := verify(v, refA, "", tok)
		wantReason(t, err, 0, "")
	}
	set(secretA2)
	_, err := verify(v, refA, "", oldTok)
	wantReason(t, err, ReasonBadSignature, oldTok)
	_, err = verify(v, refA, "", newTok)
	wantReason(t, err, 0, "")
}

func TestSetProjectValidation(t *testing.T) {
	k := keysOnce()
	dir := t.TempDir()
	file := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	der, _ := x509.MarshalPKIXPublicKey(&k.rsa1.PublicKey)
	pemKey := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
	small, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	smallJWKS, _ := MarshalJWKS(JWK{Key: &small.PublicKey})
	ecJWKS, _ := MarshalJWKS(JWK{KeyID: "e", Key: &k.ec256.PublicKey})
	badCurve := strings.Replace(string(ecJWKS), `"P-256"`, `"P-384"`, 1)
	wrongAlg, _ := MarshalJWKS(JWK{Algorithm: "ES256", Key: &k.rsa1.PublicKey})
	good := basePolicy()
	goodKeys := KeyConfig{Secrets: [][]byte{secretA}}

	cases := []struct {
		name string
		ref  string
		keys KeyConfig
		pol  Policy
	}{
		{"empty ref", "", goodKeys, good},
		{"long ref", strings.Repeat("r", 64), goodKeys, good},
		{"ref with control char", "a\nb", goodKeys, good},
		{"no keys", refA, KeyConfig{}, good},
		{"short secret", refA, KeyConfig{Secrets: [][]byte{[]byte("short")}}, good},
		{"PEM as secret", refA, KeyConfig{Secrets: [][]byte{pemKey}}, good},
		{"missing JWKS file", refA, KeyConfig{JWKSFile: filepath.Join(dir, "nope.json")}, good},
		{"JWKS not JSON", refA, KeyConfig{JWKSFile: file("a.json", "{")}, good},
		{"JWKS without keys", refA, KeyConfig{JWKSFile: file("b.json", `{"foo":[]}`)}, good},
		{"JWKS with only enc keys", refA, KeyConfig{JWKSFile: file("c.json", `{"keys":[{"kty":"RSA","use":"enc","n":"AQAB","e":"AQAB"}]}`)}, good},
		{"RSA key too small", refA, KeyConfig{JWKSFile: file("d.json", string(smallJWKS))}, good},
		{"EC point not on curve", refA, KeyConfig{JWKSFile: file("e.json", badCurve)}, good},
		{"JWK alg contradicts type", refA, KeyConfig{JWKSFile: file("f.json", string(wrongAlg))}, good},
		{"private key in JWKS", refA, KeyConfig{JWKSFile: file("g.json", `{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","d":"nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"}]}`)}, good},
		{"short oct key", refA, KeyConfig{JWKSFile: file("h.json", `{"keys":[{"kty":"oct","k":"c2hvcnQ"}]}`)}, good},
		{"bad JWKS URL", refA, KeyConfig{JWKSURL: "file:///etc/passwd"}, good},
		{"relative JWKS URL", refA, KeyConfig{JWKSURL: "/jwks.json"}, good},
		{"no roles", refA, goodKeys, Policy{}},
		{"empty role", refA, goodKeys, Policy{Roles: []string{""}}},
		{"long role", refA, goodKeys, Policy{Roles: []string{strings.Repeat("r", 64)}}},
		{"role with NUL", refA, goodKeys, Policy{Roles: []string{"a\x00b"}}},
		{"AnonRole not in Roles", refA, goodKeys, Policy{Roles: []string{"authenticated"}, AnonRole: "anon"}},
		{"bad RoleClaim", refA, goodKeys, Policy{Roles: []string{"anon"}, RoleClaim: "a..b"}},
		{"unterminated quote in RoleClaim", refA, goodKeys, Policy{Roles: []string{"anon"}, RoleClaim: `"a.b`}},
		{"bad RefClaim", refA, goodKeys, Policy{Roles: []string{"anon"}, RefClaim: "a."}},
		{"negative MaxTokenBytes", refA, goodKeys, Policy{Roles: []string{"anon"}, MaxTokenBytes: -1}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			v := NewVerifier()
			if err := v.SetProject(tc.ref, tc.keys, tc.pol); err == nil {
				t.Fatal("SetProject succeeded, want an error")
			} else if strings.Contains(err.Error(), string(secretA)) {
				t.Fatalf("error leaks the secret: %v", err)
			}
		})
	}

	// A failed reload keeps the previous configuration.
	v := newTestVerifier(t, newClock())
	if err := v.SetProject(refA, goodKeys, good); err != nil {
		t.Fatal(err)
	}
	if err := v.SetProject(refA, KeyConfig{Secrets: [][]byte{[]byte("short")}}, good); err == nil {
		t.Fatal("want error")
	}
	tok := mint(t, MintKey{Secret: secretA}, claimsFor(refA, nil))
	_, err = verify(v, refA, "", tok)
	wantReason(t, err, 0, "")
}

func TestJWKSParsing(t *testing.T) {
	k := keysOnce()
	data, err := MarshalJWKS(
		JWK{KeyID: "r", Algorithm: "PS384", Use: "sig", Key: k.rsa1}, // private key: public part written
		JWK{KeyID: "e", Key: k.ec384},
		JWK{KeyID: "d", Key: k.ed},
		JWK{KeyID: "o", Algorithm: "HS512", Key: secretA},
	)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(data), `"d":`) {
		t.Fatalf("private material written: %s", data)
	}
	// Extra keys of unsupported types or uses are skipped.
	s := strings.Replace(string(data), `"keys": [`, `"keys": [{"kty":"EC","crv":"secp256k1","x":"AA","y":"AA"},{"kty":"OKP","crv":"X25519","x":"AA"},{"kty":"RSA","alg":"RSA-OAEP","n":"AQAB","e":"AQAB"},{"kty":"RSA","key_ops":["encrypt"],"n":"AQAB","e":"AQAB"},{"kty":"foo"},`, 1)
	keys, err := parseJWKS([]byte(s))
	if err != nil {
		t.Fatalf("parseJWKS: %v\n%s", err, s)
	}
	var got []string
	for _, k := range keys {
		got = append(got, k.kid+":"+k.kind.String()+":"+k.alg+":"+k.crv)
	}
	want := []string{"r:RSA:PS384:", "e:EC::P-384", "d:OKP/Ed25519::", "o:oct:HS512:"}
	if !slices.Equal(got, want) {
		t.Fatalf("keys %v, want %v", got, want)
	}
	if !keys[0].allows("PS384") || keys[0].allows("RS256") || keys[0].allows("PS256") {
		t.Fatal("JWK alg not honoured")
	}
	if !keys[1].allows("ES384") || keys[1].allows("ES256") {
		t.Fatal("EC curve not pinned")
	}
	if !keys[3].allows("HS512") || keys[3].allows("HS256") {
		t.Fatal("oct alg not honoured")
	}
}

func TestClaimPath(t *testing.T) {
	good := map[string][]string{
		"role":                     {"role"},
		".role":                    {"role"},
		"app_metadata.role":        {"app_metadata", "role"},
		`"https://x.io/c".role`:    {"https://x.io/c", "role"},
		`a."b.c"`:                  {"a", "b.c"},
		`."https://x.io/role"`:     {"https://x.io/role"},
		"a.b.c.d":                  {"a", "b", "c", "d"},
		`"weird name with spaces"`: {"weird name with spaces"},
	}
	for in, want := range good {
		p, err := parseClaimPath(in)
		if err != nil || !slices.Equal(p, want) {
			t.Errorf("parseClaimPath(%q) = %q, %v; want %q", in, p, err, want)
		}
		if p2, err := parseClaimPath(p.String()); err != nil || !slices.Equal(p2, want) {
			t.Errorf("round trip of %q via %q failed: %v", in, p.String(), err)
		}
	}
	for _, in := range []string{"", ".", "a..b", "a.", `"a`, `"a"b`, `a"b`, `""`} {
		if p, err := parseClaimPath(in); err == nil {
			t.Errorf("parseClaimPath(%q) = %q, want error", in, p)
		}
	}
}

func TestMintErrors(t *testing.T) {
	k := keysOnce()
	bad := []MintKey{
		{},
		{Secret: secretA, PrivateKey: k.rsa1},
		{Alg: "RS256", Secret: secretA},
		{Alg: "HS256", PrivateKey: k.rsa1},
		{Alg: "ES384", PrivateKey: k.ec256},
		{Alg: "none", Secret: secretA},
		{Alg: "EdDSA", PrivateKey: k.ec256},
	}
	for _, key := range bad {
		if _, err := Mint(key, map[string]any{"role": "anon"}, 0); err == nil {
			t.Errorf("Mint with %s/%T succeeded", key.Alg, key.PrivateKey)
		}
	}
	if _, err := Mint(MintKey{Secret: secretA}, nil, -1); err == nil {
		t.Error("negative ttl accepted")
	}
	for _, p := range []string{`[1]`, `{"a":1,"a":2}`, `{`, "{\"a\":\"\xff\"}"} {
		if _, err := Sign(MintKey{Secret: secretA}, []byte(p)); err == nil {
			t.Errorf("Sign(%q) succeeded", p)
		}
	}
	// ttl sets exp; iat is now.
	v := NewVerifier()
	if err := v.SetProject(refA, KeyConfig{Secrets: [][]byte{secretA}}, basePolicy()); err != nil {
		t.Fatal(err)
	}
	tok, err := Mint(MintKey{Secret: secretA}, map[string]any{"role": "anon"}, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	id, err := verify(v, refA, "anon", tok)
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Until(id.ExpiresAt); d <= 0 || d > time.Minute {
		t.Fatalf("ExpiresAt %v", id.ExpiresAt)
	}
}
