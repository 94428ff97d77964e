package auth

import (
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"strings"
	"testing"
	"time"
)

func TestVerify(t *testing.T) {
	k := keysOnce()
	jwks := writeJWKS(t,
		JWK{KeyID: "rsa1", Key: &k.rsa1.PublicKey},
		JWK{KeyID: "rs-only", Algorithm: "RS256", Use: "sig", Key: &k.rsa2.PublicKey},
		JWK{KeyID: "enc1", Use: "enc", Key: &k.rsa2.PublicKey},
		JWK{KeyID: "ec256", Key: &k.ec256.PublicKey},
		JWK{KeyID: "ec384", Key: &k.ec384.PublicKey},
		JWK{KeyID: "ec521", Key: &k.ec521.PublicKey},
		JWK{KeyID: "ed1", Key: k.ed.Public()},
	)
	keysA := KeyConfig{Secrets: [][]byte{secretA, secretA2}, JWKSFile: jwks}
	hs := func(alg string) MintKey { return MintKey{Alg: alg, Secret: secretA} }
	now := testNow().Unix()

	rsaDER, err := x509.MarshalPKIXPublicKey(&k.rsa1.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	rsaPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: rsaDER})
	enc := base64.RawURLEncoding.EncodeToString

	cases := []struct {
		name     string
		keys     *KeyConfig // nil: keysA
		pol      func(*Policy)
		userRole string
		token    func(t testing.TB) string
		want     Reason
		wantRole string
	}{
		{name: "HS256", token: func(t testing.TB) string { return mint(t, hs("HS256"), claimsFor(refA, nil)) }, wantRole: "authenticated"},
		{name: "HS384", token: func(t testing.TB) string { return mint(t, hs("HS384"), claimsFor(refA, nil)) }},
		{name: "HS512", token: func(t testing.TB) string { return mint(t, hs("HS512"), claimsFor(refA, nil)) }},
		{name: "HS256 second secret (rotation)", token: func(t testing.TB) string {
			return mint(t, MintKey{Secret: secretA2}, claimsFor(refA, nil))
		}},
		{name: "HS256 with a kid no JWK has falls back to the secrets", token: func(t testing.TB) string {
			return mint(t, MintKey{Secret: secretA, KeyID: "legacy"}, claimsFor(refA, nil))
		}},
		{name: "HS256 wrong secret", want: ReasonBadSignature, token: func(t testing.TB) string {
			return mint(t, MintKey{Secret: secretB}, claimsFor(refA, nil))
		}},
		{name: "RS256", token: func(t testing.TB) string {
			return mint(t, MintKey{KeyID: "rsa1", PrivateKey: k.rsa1}, claimsFor(refA, nil))
		}},
		{name: "RS512 without kid tries every RSA key", token: func(t testing.TB) string {
			return mint(t, MintKey{Alg: "RS512", PrivateKey: k.rsa1}, claimsFor(refA, nil))
		}},
		{name: "PS256", token: func(t testing.TB) string {
			return mint(t, MintKey{Alg: "PS256", KeyID: "rsa1", PrivateKey: k.rsa1}, claimsFor(refA, nil))
		}},
		{name: "ES256", token: func(t testing.TB) string {
			return mint(t, MintKey{KeyID: "ec256", PrivateKey: k.ec256}, claimsFor(refA, nil))
		}},
		{name: "ES384", token: func(t testing.TB) string {
			return mint(t, MintKey{KeyID: "ec384", PrivateKey: k.ec384}, claimsFor(refA, nil))
		}},
		{name: "ES512", token: func(t testing.TB) string {
			return mint(t, MintKey{KeyID: "ec521", PrivateKey: k.ec521}, claimsFor(refA, nil))
		}},
		{name: "EdDSA", token: func(t testing.TB) string {
			return mint(t, MintKey{KeyID: "ed1", PrivateKey: k.ed}, claimsFor(refA, nil))
		}},
		{name: "RS256 signed by another key", want: ReasonBadSignature, token: func(t testing.TB) string {
			return mint(t, MintKey{KeyID: "rsa1", PrivateKey: k.rsa2}, claimsFor(refA, nil))
		}},
		{name: "JWK alg RS256 refuses PS256", want: ReasonAlgNotAllowed, token: func(t testing.TB) string {
			return mint(t, MintKey{Alg: "PS256", KeyID: "rs-only", PrivateKey: k.rsa2}, claimsFor(refA, nil))
		}},
		{name: "JWK use enc is skipped", want: ReasonUnknownKID, token: func(t testing.TB) string {
			return mint(t, MintKey{KeyID: "enc1", PrivateKey: k.rsa2}, claimsFor(refA, nil))
		}},
		{name: "ES384 header on a P-256 key", want: ReasonAlgNotAllowed, token: func(t testing.TB) string {
			return rawToken(t, `{"alg":"ES384","kid":"ec256"}`, `{"role":"anon"}`, "ES384", k.ec384)
		}},
		{name: "ES256 header on an RSA kid", want: ReasonAlgNotAllowed, token: func(t testing.TB) string {
			return mint(t, MintKey{KeyID: "rsa1", PrivateKey: k.ec256}, claimsFor(refA, nil))
		}},
		{name: "unknown kid", want: ReasonUnknownKID, token: func(t testing.TB) string {
			return mint(t, MintKey{KeyID: "nope", PrivateKey: k.rsa1}, claimsFor(refA, nil))
		}},
		{name: "kid path traversal is just an unknown kid", want: ReasonUnknownKID, token: func(t testing.TB) string {
			return mint(t, MintKey{KeyID: "../../etc/passwd", PrivateKey: k.rsa1}, claimsFor(refA, nil))
		}},
		{name: "alg none", want: ReasonAlgNotAllowed, token: func(t testing.TB) string {
			return rawToken(t, `{"alg":"none","typ":"JWT"}`, `{"role":"service_role","exp":9999999999}`, "", nil)
		}},
		{name: "alg None", want: ReasonAlgNotAllowed, token: func(t testing.TB) string {
			return rawToken(t, `{"alg":"None"}`, `{"role":"service_role","exp":9999999999}`, "", nil)
		}},
		{name: "alg HS1", want: ReasonAlgNotAllowed, token: func(t testing.TB) string {
			return rawToken(t, `{"alg":"HS1"}`, `{"role":"service_role"}`, "", nil)
		}},
		{name: "HS256 with the RSA public key PEM as secret, JWKS-only project", keys: &KeyConfig{JWKSFile: jwks},
			want: ReasonAlgNotAllowed, token: func(t testing.TB) string {
				return rawToken(t, `{"alg":"HS256","kid":"rsa1"}`, `{"role":"service_role","exp":9999999999}`, "HS256", rsaPEM)
			}},
		{name: "HS256 with the RSA public key DER as secret, JWKS-only project", keys: &KeyConfig{JWKSFile: jwks},
			want: ReasonAlgNotAllowed, token: func(t testing.TB) string {
				return rawToken(t, `{"alg":"HS256"}`, `{"role":"service_role","exp":9999999999}`, "HS256", rsaDER)
			}},
		{name: "HS256 with the RSA public key PEM as secret, project with secrets", want: ReasonBadSignature,
			token: func(t testing.TB) string {
				return rawToken(t, `{"alg":"HS256","kid":"rsa1"}`, `{"role":"service_role","exp":9999999999}`, "HS256", rsaPEM)
			}},
		{name: "HS256 with the RSA modulus as secret", want: ReasonBadSignature, token: func(t testing.TB) string {
			return rawToken(t, `{"alg":"HS256"}`, `{"role":"service_role","exp":9999999999}`, "HS256", k.rsa1.N.Bytes())
		}},
		{name: "expired", want: ReasonExpired, token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"exp": now - 3600, "iat": now - 7200}))
		}},
		{name: "expired within leeway", token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"exp": now - 20}))
		}},
		{name: "expired just past leeway", want: ReasonExpired, token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"exp": now - 30}))
		}},
		{name: "expired 1s ago, no leeway", pol: func(p *Policy) { p.Leeway = -1 }, want: ReasonExpired, token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"exp": now - 1}))
		}},
		{name: "expired 50s ago, leeway 60s", pol: func(p *Policy) { p.Leeway = time.Minute }, token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"exp": now - 50}))
		}},
		{name: "fractional exp", token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"exp": float64(now) + 0.5}))
		}},
		{name: "nbf in future", want: ReasonNotYetValid, token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"nbf": now + 120}))
		}},
		{name: "nbf within leeway", token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"nbf": now + 20}))
		}},
		{name: "iat in future", want: ReasonIssuedInFuture, token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"iat": now + 120}))
		}},
		{name: "iat within leeway", token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"iat": now + 20}))
		}},
		{name: "exp not a number", want: ReasonMalformed, token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"exp": "9999999999"}))
		}},
		{name: "exp out of range", want: ReasonMalformed, token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"exp": 1e300}))
		}},
		{name: "missing exp", want: ReasonMissingExp, token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"exp": nil}))
		}},
		{name: "missing exp allowed", pol: func(p *Policy) { p.AllowNoExp = true }, token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"exp": nil}))
		}},
		{name: "issuer ok", pol: func(p *Policy) { p.Issuer = "https://issuer.example/auth/v1" }, token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"iss": "https://issuer.example/auth/v1"}))
		}},
		{name: "wrong issuer", pol: func(p *Policy) { p.Issuer = "https://issuer.example/auth/v1" }, want: ReasonWrongIssuer,
			token: func(t testing.TB) string {
				return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"iss": "https://evil.example"}))
			}},
		{name: "missing issuer", pol: func(p *Policy) { p.Issuer = "https://issuer.example/auth/v1" }, want: ReasonWrongIssuer,
			token: func(t testing.TB) string { return mint(t, hs("HS256"), claimsFor(refA, nil)) }},
		{name: "aud string ok", pol: func(p *Policy) { p.Audience = "authenticated" }, token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"aud": "authenticated"}))
		}},
		{name: "aud array ok", pol: func(p *Policy) { p.Audience = "authenticated" }, token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"aud": []string{"x", "authenticated"}}))
		}},
		{name: "wrong aud", pol: func(p *Policy) { p.Audience = "authenticated" }, want: ReasonWrongAudience,
			token: func(t testing.TB) string {
				return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"aud": []string{"x", "y"}}))
			}},
		{name: "missing aud", pol: func(p *Policy) { p.Audience = "authenticated" }, want: ReasonWrongAudience,
			token: func(t testing.TB) string { return mint(t, hs("HS256"), claimsFor(refA, nil)) }},
		{name: "aud of wrong type", pol: func(p *Policy) { p.Audience = "authenticated" }, want: ReasonWrongAudience,
			token: func(t testing.TB) string {
				return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"aud": 5}))
			}},
		{name: "aud ignored when not configured", token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"aud": "whatever"}))
		}},
		{name: "too large", want: ReasonTooLarge, token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"pad": strings.Repeat("x", 9000)}))
		}},
		{name: "too large for a small limit", pol: func(p *Policy) { p.MaxTokenBytes = 100 }, want: ReasonTooLarge,
			token: func(t testing.TB) string { return mint(t, hs("HS256"), claimsFor(refA, nil)) }},
		{name: "larger limit", pol: func(p *Policy) { p.MaxTokenBytes = 20000 }, token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"pad": strings.Repeat("x", 9000)}))
		}},
		{name: "malformed: two segments", want: ReasonMalformed, token: func(t testing.TB) string {
			tok := mint(t, hs("HS256"), claimsFor(refA, nil))
			return tok[:strings.LastIndexByte(tok, '.')]
		}},
		{name: "malformed: four segments", want: ReasonMalformed, token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, nil)) + ".abc"
		}},
		{name: "malformed: empty", want: ReasonMalformed, token: func(testing.TB) string { return "" }},
		{name: "malformed: bad base64 header", want: ReasonMalformed, token: func(t testing.TB) string {
			tok := mint(t, hs("HS256"), claimsFor(refA, nil))
			return "e*J" + tok[3:]
		}},
		{name: "malformed: padded base64", want: ReasonMalformed, token: func(t testing.TB) string {
			tok := mint(t, hs("HS256"), claimsFor(refA, nil))
			h, rest, _ := strings.Cut(tok, ".")
			return h + "==." + rest
		}},
		{name: "malformed: standard base64 alphabet", want: ReasonMalformed, token: func(t testing.TB) string {
			return "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoiYW5vbiJ9.ab+/"
		}},
		{name: "malformed: header not JSON", want: ReasonMalformed, token: func(t testing.TB) string {
			return rawToken(t, `{"alg":"HS256"`, `{"role":"anon"}`, "HS256", secretA)
		}},
		{name: "malformed: header without alg", want: ReasonMalformed, token: func(t testing.TB) string {
			return rawToken(t, `{"typ":"JWT"}`, `{"role":"anon"}`, "HS256", secretA)
		}},
		{name: "malformed: header ALG is not alg", want: ReasonMalformed, token: func(t testing.TB) string {
			return rawToken(t, `{"ALG":"HS256"}`, `{"role":"anon"}`, "HS256", secretA)
		}},
		{name: "malformed: crit header", want: ReasonMalformed, token: func(t testing.TB) string {
			return rawToken(t, `{"alg":"HS256","crit":["b64"],"b64":false}`, `{"role":"anon"}`, "HS256", secretA)
		}},
		{name: "malformed: payload not JSON", want: ReasonMalformed, token: func(t testing.TB) string {
			return rawToken(t, `{"alg":"HS256"}`, `{"role":"anon",}`, "HS256", secretA)
		}},
		{name: "malformed: payload an array", want: ReasonMalformed, token: func(t testing.TB) string {
			return rawToken(t, `{"alg":"HS256"}`, `[{"role":"anon"}]`, "HS256", secretA)
		}},
		{name: "malformed: trailing data after payload", want: ReasonMalformed, token: func(t testing.TB) string {
			return rawToken(t, `{"alg":"HS256"}`, `{"role":"anon"} {}`, "HS256", secretA)
		}},
		{name: "malformed: duplicate role", want: ReasonMalformed, token: func(t testing.TB) string {
			return rawToken(t, `{"alg":"HS256"}`, `{"exp":9999999999,"role":"anon","role":"service_role"}`, "HS256", secretA)
		}},
		{name: "malformed: duplicate nested key via escape", want: ReasonMalformed, token: func(t testing.TB) string {
			return rawToken(t, `{"alg":"HS256"}`, `{"exp":9999999999,"m":{"role":"anon","\u0072ole":"x"}}`, "HS256", secretA)
		}},
		{name: "malformed: invalid UTF-8", want: ReasonMalformed, token: func(t testing.TB) string {
			return rawToken(t, `{"alg":"HS256"}`, "{\"exp\":9999999999,\"role\":\"anon\",\"x\":\"\xff\"}", "HS256", secretA)
		}},
		{name: "malformed: NUL escape", want: ReasonMalformed, token: func(t testing.TB) string {
			return rawToken(t, `{"alg":"HS256"}`, `{"exp":9999999999,"role":"anon","x":"a\u0000"}`, "HS256", secretA)
		}},
		{name: "malformed: lone surrogate escape", want: ReasonMalformed, token: func(t testing.TB) string {
			return rawToken(t, `{"alg":"HS256"}`, `{"exp":9999999999,"role":"anon","x":"\ud800x"}`, "HS256", secretA)
		}},
		{name: "malformed: sub not a string", want: ReasonMalformed, token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"sub": 42}))
		}},
		{name: "malformed signature bytes", want: ReasonBadSignature, token: func(t testing.TB) string {
			tok := mint(t, hs("HS256"), claimsFor(refA, nil))
			return tok[:strings.LastIndexByte(tok, '.')+1] + enc([]byte("not a signature"))
		}},
		{name: "tampered payload", want: ReasonBadSignature, token: func(t testing.TB) string {
			tok := mint(t, hs("HS256"), claimsFor(refA, nil))
			parts := strings.Split(tok, ".")
			parts[1] = enc([]byte(`{"role":"service_role","exp":9999999999}`))
			return strings.Join(parts, ".")
		}},
		{name: "nested role claim", pol: func(p *Policy) { p.RoleClaim = "app_metadata.role" }, wantRole: "service_role",
			token: func(t testing.TB) string {
				return mint(t, hs("HS256"), claimsFor(refA, map[string]any{
					"role": "authenticated", "app_metadata": map[string]any{"role": "service_role"}}))
			}},
		{name: "nested role claim, PostgREST leading dot", pol: func(p *Policy) { p.RoleClaim = ".app_metadata.role" }, wantRole: "anon",
			token: func(t testing.TB) string {
				return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"app_metadata": map[string]any{"role": "anon"}}))
			}},
		{name: "quoted claim name with dots", pol: func(p *Policy) { p.RoleClaim = `"https://example.com/claims".role` }, wantRole: "service_role",
			token: func(t testing.TB) string {
				return mint(t, hs("HS256"), claimsFor(refA, map[string]any{
					"https://example.com/claims": map[string]any{"role": "service_role"}}))
			}},
		{name: "nested role missing uses AnonRole", pol: func(p *Policy) { p.RoleClaim = "app_metadata.role"; p.AnonRole = "anon" },
			wantRole: "anon", token: func(t testing.TB) string { return mint(t, hs("HS256"), claimsFor(refA, nil)) }},
		{name: "nested role parent not an object", pol: func(p *Policy) { p.RoleClaim = "app_metadata.role"; p.AnonRole = "anon" },
			want: ReasonNoRole, token: func(t testing.TB) string {
				return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"app_metadata": "service_role"}))
			}},
		{name: "missing role with AnonRole", pol: func(p *Policy) { p.AnonRole = "anon" }, wantRole: "anon",
			token: func(t testing.TB) string { return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"role": nil})) }},
		{name: "missing role without AnonRole", want: ReasonNoRole,
			token: func(t testing.TB) string { return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"role": nil})) }},
		{name: "role not a string", pol: func(p *Policy) { p.AnonRole = "anon" }, want: ReasonNoRole,
			token: func(t testing.TB) string {
				return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"role": []string{"service_role"}}))
			}},
		{name: "role null", pol: func(p *Policy) { p.AnonRole = "anon" }, want: ReasonNoRole, token: func(t testing.TB) string {
			return rawToken(t, `{"alg":"HS256"}`, `{"exp":9999999999,"role":null}`, "HS256", secretA)
		}},
		{name: "role empty", want: ReasonNoRole, token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"role": ""}))
		}},
		{name: "role not allowed", want: ReasonRoleNotAllowed, token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"role": "postgres"}))
		}},
		{name: "role differs only by case", want: ReasonRoleNotAllowed, token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"role": "Service_Role"}))
		}},
		{name: "user name role matches", userRole: "authenticated", wantRole: "authenticated",
			token: func(t testing.TB) string { return mint(t, hs("HS256"), claimsFor(refA, nil)) }},
		{name: "user name role mismatch", userRole: "service_role", want: ReasonRoleMismatch,
			token: func(t testing.TB) string { return mint(t, hs("HS256"), claimsFor(refA, nil)) }},
		{name: "user name role mismatch with anon fallback", userRole: "authenticated", pol: func(p *Policy) { p.AnonRole = "anon" },
			want: ReasonRoleMismatch, token: func(t testing.TB) string {
				return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"role": nil}))
			}},
		{name: "ref claim names another project", want: ReasonWrongProject, token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refB, nil))
		}},
		{name: "ref claim not a string", want: ReasonWrongProject, token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"ref": 1}))
		}},
		{name: "ref claim absent is fine when keys are not shared", token: func(t testing.TB) string {
			return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"ref": nil}))
		}},
		{name: "RequireRefClaim refuses a token without ref", pol: func(p *Policy) { p.RequireRefClaim = true },
			want: ReasonWrongProject, token: func(t testing.TB) string {
				return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"ref": nil}))
			}},
		{name: "custom RefClaim", pol: func(p *Policy) { p.RefClaim = "app_metadata.project" }, want: ReasonWrongProject,
			token: func(t testing.TB) string {
				return mint(t, hs("HS256"), claimsFor(refA, map[string]any{"app_metadata": map[string]any{"project": refB}}))
			}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			v := newTestVerifier(t, newClock())
			keys := keysA
			if tc.keys != nil {
				keys = *tc.keys
			}
			pol := basePolicy()
			if tc.pol != nil {
				tc.pol(&pol)
			}
			if err := v.SetProject(refA, keys, pol); err != nil {
				t.Fatalf("SetProject: %v", err)
			}
			tok := tc.token(t)
			id, err := verify(v, refA, tc.userRole, tok)
			wantReason(t, err, tc.want, tok)
			if tc.want == 0 && tc.wantRole != "" && id.Role != tc.wantRole {
				t.Fatalf("role %q, want %q", id.Role, tc.wantRole)
			}
			if tc.want == 0 {
				payload, _ := base64.RawURLEncoding.DecodeString(strings.Split(tok, ".")[1])
				if id.ClaimsJSON != string(payload) {
					t.Fatalf("ClaimsJSON %q, want %q", id.ClaimsJSON, payload)
				}
			}
		})
	}
}

func TestVerifyIdentity(t *testing.T) {
	v := newTestVerifier(t, newClock())
	pol := basePolicy()
	pol.AnonRole = "anon"
	if err := v.SetProject(refA, KeyConfig{Secrets: [][]byte{secretA}}, pol); err != nil {
		t.Fatal(err)
	}
	tok := mint(t, MintKey{Secret: secretA}, claimsFor(refA, nil))
	id, err := verify(v, refA, "", tok)
	if err != nil {
		t.Fatal(err)
	}
	if id.Role != "authenticated" || id.Subject != "user-1" || id.Anonymous ||
		!id.ExpiresAt.Equal(testNow().Add(time.Hour)) {
		t.Fatalf("identity %+v", id)
	}
	tok = mint(t, MintKey{Secret: secretA}, claimsFor(refA, map[string]any{"role": nil, "sub": nil}))
	id, err = verify(v, refA, "anon", tok)
	if err != nil {
		t.Fatal(err)
	}
	if id.Role != "anon" || !id.Anonymous || id.Subject != "" {
		t.Fatalf("identity %+v", id)
	}
}

// TestClaimsJSONByteExact checks that tricky payloads come back byte for
// byte, whitespace and escapes included.
func TestClaimsJSONByteExact(t *testing.T) {
	v := newTestVerifier(t, newClock())
	if err := v.SetProject(refA, KeyConfig{Secrets: [][]byte{secretA}}, basePolicy()); err != nil {
		t.Fatal(err)
	}
	payloads := []string{
		`{"role":"authenticated","exp":9999999999,"q":"it's \"quoted\"","b":"back\\slash","d":"$$; DROP TABLE x; $$","n":"line1\nline2"}`,
		"{ \"role\" : \"authenticated\" ,\n \"exp\" : 9999999999 , \"u\" : \"héllo wörld 日本語 🎉\", \"e\":\"\\u00e9\\ud83c\\udf89\" }",
		`{"role":"authenticated","exp":9999999999.25,"nested":{"a":[1,2.50,{"b":null}],"$$":"$tag$"},"x":"\u2028\\u0000"}`,
		`{"role":"authenticated","exp":9999999999,"sql":"'); SELECT set_config('request.jwt.claims','{}',false); --"}`,
	}
	for _, p := range payloads {
		tok, err := Sign(MintKey{Secret: secretA}, []byte(p))
		if err != nil {
			t.Fatalf("Sign(%s): %v", p, err)
		}
		id, err := verify(v, refA, "", tok)
		if err != nil {
			t.Fatalf("Verify(%s): %v", p, err)
		}
		if id.ClaimsJSON != p {
			t.Fatalf("ClaimsJSON\n got %q\nwant %q", id.ClaimsJSON, p)
		}
	}
}

func TestUnknownProject(t *testing.T) {
	v := newTestVerifier(t, newClock())
	if err := v.SetProject(refA, KeyConfig{Secrets: [][]byte{secretA}}, basePolicy()); err != nil {
		t.Fatal(err)
	}
	tok := mint(t, MintKey{Secret: secretA}, claimsFor(refA, nil))
	_, err := verify(v, "nosuchproject", "", tok)
	wantReason(t, err, ReasonUnknownProject, tok)
	if got := err.(*Error).SQLState; got != "3D000" {
		t.Fatalf("SQLState %s", got)
	}
	// Structure is still checked first, as for a known project.
	_, err = verify(v, "nosuchproject", "", "garbage")
	wantReason(t, err, ReasonMalformed, "")

	v.RemoveProject(refA)
	_, err = verify(v, refA, "", tok)
	wantReason(t, err, ReasonUnknownProject, tok)
}

func TestSQLStates(t *testing.T) {
	want := map[Reason]string{
		ReasonMalformed: "28P01", ReasonBadSignature: "28P01", ReasonExpired: "28P01", ReasonNotYetValid: "28P01",
		ReasonIssuedInFuture: "28P01", ReasonWrongIssuer: "28P01", ReasonWrongAudience: "28P01",
		ReasonWrongProject: "28P01", ReasonUnknownKID: "28P01", ReasonAlgNotAllowed: "28P01", ReasonTooLarge: "28P01",
		ReasonNoRole: "28P01", ReasonMissingExp: "28P01", ReasonRoleNotAllowed: "28000", ReasonRoleMismatch: "28000",
		ReasonUnknownProject: "3D000", ReasonKeysUnavailable: "57P03",
	}
	seen := map[string]bool{}
	for r, code := range want {
		if r.SQLState() != code {
			t.Errorf("%s: SQLState %s, want %s", r, r.SQLState(), code)
		}
		if s := r.String(); strings.HasPrefix(s, "reason(") || seen[s] {
			t.Errorf("reason %d has name %q", r, s)
		}
		seen[r.String()] = true
	}
	if Reason(200).String() != "reason(200)" {
		t.Error(Reason(200).String())
	}
}
