package auth

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math/big"
	"os"
	"path/filepath"
	"time"
)

// MintKey is a signing key for Mint and Sign: an HMAC Secret or a
// PrivateKey (*rsa.PrivateKey, *ecdsa.PrivateKey or ed25519.PrivateKey).
type MintKey struct {
	// Alg is the JWS algorithm. When empty it is HS256 for a Secret, RS256
	// for RSA, ES256/ES384/ES512 by curve for ECDSA and EdDSA for Ed25519.
	Alg string
	// KeyID, when set, goes into the header as kid.
	KeyID string
	// Secret is the HMAC secret for HS256/384/512.
	Secret []byte
	// PrivateKey signs the RS*, PS*, ES* and EdDSA algorithms.
	PrivateKey crypto.Signer
}

// Mint returns a token carrying claims plus, unless claims already have
// them, iat (now) and, when ttl > 0, exp (now + ttl). ttl == 0 mints a token
// without exp (refused unless the policy has AllowNoExp).
func Mint(key MintKey, claims map[string]any, ttl time.Duration) (string, error) {
	if ttl < 0 {
		return "", fmt.Errorf("mint: negative ttl %v", ttl)
	}
	c := maps.Clone(claims)
	if c == nil {
		c = make(map[string]any)
	}
	now := time.Now()
	if _, ok := c["iat"]; !ok {
		c["iat"] = now.Unix()
	}
	if _, ok := c["exp"]; !ok && ttl > 0 {
		c["exp"] = now.Add(ttl).Unix()
	}
	payload, err := json.Marshal(c)
	if err != nil {
		return "", fmt.Errorf("mint: encode claims: %w", err)
	}
	return Sign(key, payload)
}

// Sign returns a token whose payload is exactly payload, which must be a
// JSON object (UTF-8, no duplicate member names). Use it to control the
// claims byte for byte.
func Sign(key MintKey, payload []byte) (string, error) {
	if _, err := parseJSONObject(payload); err != nil {
		return "", fmt.Errorf("sign: payload: %w", err)
	}
	alg, signKey, err := key.resolve()
	if err != nil {
		return "", err
	}
	hdr := struct {
		Alg string `json:"alg"`
		Typ string `json:"typ"`
		Kid string `json:"kid,omitempty"`
	}{alg, "JWT", key.KeyID}
	h, err := json.Marshal(hdr)
	if err != nil {
		return "", fmt.Errorf("sign: header: %w", err)
	}
	input := base64.RawURLEncoding.EncodeToString(h) + "." + base64.RawURLEncoding.EncodeToString(payload)
	sig, err := signingMethod(alg).Sign(input, signKey)
	if err != nil {
		return "", fmt.Errorf("sign: %w", err)
	}
	return input + "." + base64.RawURLEncoding.EncodeToString(sig), nil
}

// resolve checks that the algorithm fits the key and returns the key in the
// form golang-jwt's signing methods expect.
func (k MintKey) resolve() (string, any, error) {
	if (len(k.Secret) > 0) == (k.PrivateKey != nil) {
		return "", nil, errors.New("sign: set exactly one of Secret and PrivateKey")
	}
	var (
		kind keyKind
		crv  string
		key  any
		def  string
	)
	switch pk := k.PrivateKey.(type) {
	case nil:
		kind, key, def = kindHMAC, k.Secret, "HS256"
	case *rsa.PrivateKey:
		kind, key, def = kindRSA, pk, "RS256"
	case *ecdsa.PrivateKey:
		kind, key = kindEC, pk
		switch pk.Curve.Params().Name {
		case "P-256":
			crv, def = "P-256", "ES256"
		case "P-384":
			crv, def = "P-384", "ES384"
		case "P-521":
			crv, def = "P-521", "ES512"
		default:
			return "", nil, fmt.Errorf("sign: unsupported curve %s", pk.Curve.Params().Name)
		}
	case ed25519.PrivateKey:
		kind, key, def = kindEd25519, pk, "EdDSA"
	default:
		return "", nil, fmt.Errorf("sign: unsupported private key type %T", k.PrivateKey)
	}
	alg := cmpOr(k.Alg, def)
	if signingMethod(alg) == nil || !algFitsKey(alg, kind, crv) {
		return "", nil, fmt.Errorf("sign: algorithm %q does not fit a %s key", alg, kind)
	}
	return alg, key, nil
}

// JWK describes one key for MarshalJWKS and WriteJWKSFile.
type JWK struct {
	// KeyID is the kid ("" omits it).
	KeyID string
	// Algorithm is the alg member ("" omits it: any algorithm of the type).
	Algorithm string
	// Use is the use member ("" omits it; "sig" for signature keys).
	Use string
	// Key is *rsa.PublicKey, *ecdsa.PublicKey, ed25519.PublicKey, a
	// private key of those types (only its public part is written), or
	// []byte for an oct (HMAC) key.
	Key any
}

// MarshalJWKS encodes keys as a JWK Set ({"keys":[...]}).
func MarshalJWKS(keys ...JWK) ([]byte, error) {
	out := struct {
		Keys []jwkJSON `json:"keys"`
	}{Keys: []jwkJSON{}}
	for i, k := range keys {
		j := jwkJSON{Kid: k.KeyID, Alg: k.Algorithm, Use: k.Use}
		key := k.Key
		if s, ok := key.(crypto.Signer); ok {
			key = s.Public()
		}
		enc := base64.RawURLEncoding.EncodeToString
		switch pub := key.(type) {
		case []byte:
			j.Kty, j.K = "oct", enc(pub)
		case *rsa.PublicKey:
			j.Kty, j.N, j.E = "RSA", enc(pub.N.Bytes()), enc(big.NewInt(int64(pub.E)).Bytes())
		case *ecdsa.PublicKey:
			b, err := pub.Bytes()
			if err != nil {
				return nil, fmt.Errorf("JWK %d: %w", i, err)
			}
			size := (len(b) - 1) / 2
			j.Kty, j.Crv, j.X, j.Y = "EC", pub.Curve.Params().Name, enc(b[1:1+size]), enc(b[1+size:])
		case ed25519.PublicKey:
			j.Kty, j.Crv, j.X = "OKP", "Ed25519", enc(pub)
		default:
			return nil, fmt.Errorf("JWK %d: unsupported key type %T", i, k.Key)
		}
		out.Keys = append(out.Keys, j)
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetIndent("", "  ")
	if err := enc.Encode(out); err != nil {
		return nil, fmt.Errorf("encode JWKS: %w", err)
	}
	return buf.Bytes(), nil
}

// WriteJWKSFile writes keys as a JWK Set to path atomically (temporary file
// and rename), mode 0600 when an oct key is included, else 0644.
func WriteJWKSFile(path string, keys ...JWK) error {
	data, err := MarshalJWKS(keys...)
	if err != nil {
		return err
	}
	mode := os.FileMode(0o644)
	for _, k := range keys {
		if _, ok := k.Key.([]byte); ok {
			mode = 0o600
		}
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".jwks-*")
	if err != nil {
		return fmt.Errorf("write JWKS: %w", err)
	}
	defer os.Remove(tmp.Name()) // after a successful rename this fails harmlessly
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("write JWKS: %w", err)
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return fmt.Errorf("write JWKS: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write JWKS: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write JWKS: %w", err)
	}
	return nil
}
