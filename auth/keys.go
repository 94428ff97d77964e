package auth

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"slices"
	"strings"

	"github.com/golang-jwt/jwt/v5"
)

// Limits applied to key material.
const (
	// MinSecretBytes is the minimum length of an HMAC secret (RFC 7518
	// §3.2: at least the size of the HS256 hash output).
	MinSecretBytes = 32
	// MinRSABits is the minimum modulus size of an RSA verification key.
	MinRSABits = 2048
	// maxJWKSBytes bounds a JWKS file or HTTP response.
	maxJWKSBytes = 1 << 20
)

type keyKind uint8

const (
	kindHMAC keyKind = iota + 1
	kindRSA
	kindEC
	kindEd25519
)

func (k keyKind) String() string {
	switch k {
	case kindHMAC:
		return "oct"
	case kindRSA:
		return "RSA"
	case kindEC:
		return "EC"
	case kindEd25519:
		return "OKP/Ed25519"
	}
	return "unknown"
}

// verifyKey is one verification key of a project. The algorithms it may
// verify are pinned by its type (and curve), and further by alg when the JWK
// named one.
type verifyKey struct {
	kid  string
	kind keyKind
	alg  string // "" = any algorithm of the key's type
	crv  string // EC curve name, "P-256", "P-384" or "P-521"
	key  any    // []byte, *rsa.PublicKey, *ecdsa.PublicKey or ed25519.PublicKey
}

// allows reports whether the key may verify a token whose header says alg.
func (k *verifyKey) allows(alg string) bool {
	if k.alg != "" && k.alg != alg {
		return false
	}
	return algFitsKey(alg, k.kind, k.crv)
}

// algFitsKey pins each algorithm to one key type (and curve).
func algFitsKey(alg string, kind keyKind, crv string) bool {
	switch alg {
	case "HS256", "HS384", "HS512":
		return kind == kindHMAC
	case "RS256", "RS384", "RS512", "PS256", "PS384", "PS512":
		return kind == kindRSA
	case "ES256":
		return kind == kindEC && crv == "P-256"
	case "ES384":
		return kind == kindEC && crv == "P-384"
	case "ES512":
		return kind == kindEC && crv == "P-521"
	case "EdDSA":
		return kind == kindEd25519
	}
	return false
}

// signingMethod maps the supported algorithms to golang-jwt's
// implementations; nil for anything else ("none" included).
func signingMethod(alg string) jwt.SigningMethod {
	switch alg {
	case "HS256":
		return jwt.SigningMethodHS256
	case "HS384":
		return jwt.SigningMethodHS384
	case "HS512":
		return jwt.SigningMethodHS512
	case "RS256":
		return jwt.SigningMethodRS256
	case "RS384":
		return jwt.SigningMethodRS384
	case "RS512":
		return jwt.SigningMethodRS512
	case "PS256":
		return jwt.SigningMethodPS256
	case "PS384":
		return jwt.SigningMethodPS384
	case "PS512":
		return jwt.SigningMethodPS512
	case "ES256":
		return jwt.SigningMethodES256
	case "ES384":
		return jwt.SigningMethodES384
	case "ES512":
		return jwt.SigningMethodES512
	case "EdDSA":
		return jwt.SigningMethodEdDSA
	}
	return nil
}

// fingerprint identifies key material for shared-key detection. It is a
// hash, so that the index holds no copy of a secret.
func (k *verifyKey) fingerprint() (string, error) {
	var material string
	switch key := k.key.(type) {
	case []byte:
		material = "oct:" + string(key)
	case *rsa.PublicKey:
		material = fmt.Sprintf("rsa:%x:%d", key.N.Bytes(), key.E)
	case *ecdsa.PublicKey:
		b, err := key.Bytes()
		if err != nil {
			return "", fmt.Errorf("encode EC key: %w", err)
		}
		material = "ec:" + k.crv + ":" + string(b)
	case ed25519.PublicKey:
		material = "ed25519:" + string(key)
	default:
		return "", errors.New("unknown key type")
	}
	sum := sha256.Sum256([]byte(material))
	return "key:" + hex.EncodeToString(sum[:]), nil
}

func hmacKey(secret []byte) (verifyKey, error) {
	if len(secret) < MinSecretBytes {
		return verifyKey{}, fmt.Errorf("HMAC secret is %d bytes, need at least %d", len(secret), MinSecretBytes)
	}
	if bytes.HasPrefix(bytes.TrimSpace(secret), []byte("-----BEGIN")) {
		// A PEM block as an HMAC secret is the classic algorithm-confusion
		// setup (a public key used as a shared secret): refuse it.
		return verifyKey{}, errors.New("HMAC secret looks like a PEM key; public keys belong in a JWKS")
	}
	return verifyKey{kind: kindHMAC, key: bytes.Clone(secret)}, nil
}

// jwkJSON is one JSON Web Key (RFC 7517/7518/8037) as found in a JWKS.
type jwkJSON struct {
	Kty    string   `json:"kty"`
	Kid    string   `json:"kid,omitempty"`
	Use    string   `json:"use,omitempty"`
	Alg    string   `json:"alg,omitempty"`
	KeyOps []string `json:"key_ops,omitempty"`
	Crv    string   `json:"crv,omitempty"`
	N      string   `json:"n,omitempty"`
	E      string   `json:"e,omitempty"`
	X      string   `json:"x,omitempty"`
	Y      string   `json:"y,omitempty"`
	K      string   `json:"k,omitempty"`
	D      string   `json:"d,omitempty"`
}

type jwksJSON struct {
	Keys []json.RawMessage `json:"keys"`
}

// parseJWKS parses a JWK Set and returns its signature-verification keys.
// Keys meant for encryption (use != "sig", key_ops without "verify", an
// encryption alg) and key types or curves this package does not support are
// skipped; a malformed key of a supported type, a key whose alg contradicts
// its type, or private key material makes the whole set invalid.
func parseJWKS(data []byte) ([]verifyKey, error) {
	if len(data) > maxJWKSBytes {
		return nil, fmt.Errorf("JWKS is larger than %d bytes", maxJWKSBytes)
	}
	var set jwksJSON
	if err := json.Unmarshal(data, &set); err != nil {
		return nil, fmt.Errorf("JWKS is not valid JSON: %w", err)
	}
	if set.Keys == nil {
		return nil, errors.New(`JWKS has no "keys" array`)
	}
	var keys []verifyKey
	for i, raw := range set.Keys {
		var j jwkJSON
		if err := json.Unmarshal(raw, &j); err != nil {
			return nil, fmt.Errorf("JWKS key %d: %w", i, err)
		}
		k, ok, err := parseJWK(&j)
		if err != nil {
			return nil, fmt.Errorf("JWKS key %d (kid %q): %w", i, j.Kid, err)
		}
		if ok {
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 {
		return nil, errors.New("JWKS holds no usable signature key")
	}
	return keys, nil
}

func parseJWK(j *jwkJSON) (verifyKey, bool, error) {
	if j.Use != "" && j.Use != "sig" {
		return verifyKey{}, false, nil
	}
	if j.KeyOps != nil && !slices.Contains(j.KeyOps, "verify") {
		return verifyKey{}, false, nil
	}
	if j.Alg != "" && signingMethod(j.Alg) == nil {
		return verifyKey{}, false, nil // e.g. RSA-OAEP: not a signature key
	}
	k := verifyKey{kid: j.Kid, alg: j.Alg}
	switch j.Kty {
	case "oct":
		secret, err := b64(j.K, "k")
		if err != nil {
			return k, false, err
		}
		hk, err := hmacKey(secret)
		if err != nil {
			return k, false, err
		}
		k.kind, k.key = kindHMAC, hk.key
	case "RSA":
		if j.D != "" {
			return k, false, errors.New("JWKS must hold public keys only (found d)")
		}
		pub, err := rsaKey(j.N, j.E)
		if err != nil {
			return k, false, err
		}
		k.kind, k.key = kindRSA, pub
	case "EC":
		if j.D != "" {
			return k, false, errors.New("JWKS must hold public keys only (found d)")
		}
		var curve elliptic.Curve
		switch j.Crv {
		case "P-256":
			curve = elliptic.P256()
		case "P-384":
			curve = elliptic.P384()
		case "P-521":
			curve = elliptic.P521()
		default:
			return k, false, nil // e.g. secp256k1
		}
		pub, err := ecKey(curve, j.X, j.Y)
		if err != nil {
			return k, false, err
		}
		k.kind, k.crv, k.key = kindEC, j.Crv, pub
	case "OKP":
		if j.Crv != "Ed25519" {
			return k, false, nil // X25519, Ed448, ...
		}
		if j.D != "" {
			return k, false, errors.New("JWKS must hold public keys only (found d)")
		}
		x, err := b64(j.X, "x")
		if err != nil {
			return k, false, err
		}
		if len(x) != ed25519.PublicKeySize {
			return k, false, fmt.Errorf("Ed25519 key is %d bytes, want %d", len(x), ed25519.PublicKeySize)
		}
		k.kind, k.key = kindEd25519, ed25519.PublicKey(x)
	default:
		return k, false, nil
	}
	if k.alg != "" && !algFitsKey(k.alg, k.kind, k.crv) {
		return k, false, fmt.Errorf("alg %q does not fit a %s key", k.alg, k.kind)
	}
	return k, true, nil
}

func b64(s, field string) ([]byte, error) {
	if s == "" {
		return nil, fmt.Errorf("member %q is missing", field)
	}
	b, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(s, "="))
	if err != nil {
		return nil, fmt.Errorf("member %q is not base64url: %w", field, err)
	}
	return b, nil
}

func rsaKey(n64, e64 string) (*rsa.PublicKey, error) {
	nb, err := b64(n64, "n")
	if err != nil {
		return nil, err
	}
	eb, err := b64(e64, "e")
	if err != nil {
		return nil, err
	}
	n := new(big.Int).SetBytes(nb)
	if n.BitLen() < MinRSABits {
		return nil, fmt.Errorf("RSA modulus is %d bits, need at least %d", n.BitLen(), MinRSABits)
	}
	if len(eb) > 4 {
		return nil, errors.New("RSA exponent too large")
	}
	e := new(big.Int).SetBytes(eb)
	if e.Int64() < 3 || e.Int64() > 1<<31-1 || e.Bit(0) == 0 {
		return nil, errors.New("RSA exponent must be odd, at least 3 and below 2^31")
	}
	return &rsa.PublicKey{N: n, E: int(e.Int64())}, nil
}

func ecKey(curve elliptic.Curve, x64, y64 string) (*ecdsa.PublicKey, error) {
	x, err := b64(x64, "x")
	if err != nil {
		return nil, err
	}
	y, err := b64(y64, "y")
	if err != nil {
		return nil, err
	}
	size := (curve.Params().BitSize + 7) / 8
	if len(x) != size || len(y) != size {
		return nil, fmt.Errorf("EC coordinates must be %d bytes each", size)
	}
	point := make([]byte, 0, 1+2*size)
	point = append(point, 4)
	point = append(point, x...)
	point = append(point, y...)
	pub, err := ecdsa.ParseUncompressedPublicKey(curve, point)
	if err != nil {
		return nil, fmt.Errorf("EC key: %w", err)
	}
	return pub, nil
}
