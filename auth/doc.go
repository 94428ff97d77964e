// Package auth verifies the JWTs that clients present as their password and
// decides which database role they get. It knows nothing of the wire
// protocol or of SQL.
//
// A [Verifier] holds, per project ref, a [KeyConfig] (HMAC secrets, a JWKS
// file, a JWKS URL) and a [Policy] (allowed roles, role claim, issuer,
// audience, exp requirement, leeway, size limit, ref claim).
// [Verifier.Verify] returns an [Identity] — the role to SET ROLE to and the
// claims JSON, byte-exact, for set_config('request.jwt.claims', ...) — or an
// [*Error] with a bounded [Reason] and the SQLSTATE to send.
//
// # Security rules
//
//   - The token's length is checked before anything else; then its structure
//     (three strict base64url segments, JSON-object header with a string alg,
//     no crit, UTF-8 JSON-object payload with no duplicate member names at any
//     depth).
//   - The algorithm is pinned by key type: HMAC secrets verify only HS*, RSA
//     keys only RS* and PS*, EC keys only ES* of their curve, Ed25519 keys only
//     EdDSA. "none" and anything else are refused. A public key is never used
//     as an HMAC secret, and a secret that looks like a PEM key is refused by
//     SetProject. A JWK's alg, use and key_ops members are honoured.
//   - kid selects among the keys; when the token has none, every key fitting
//     the algorithm is tried. kid is only compared, never used as a path or
//     URL; jku, x5u and jwk headers are ignored.
//   - exp is required unless Policy.AllowNoExp; exp, nbf and iat (refused
//     when in the future) allow Policy.Leeway of clock skew.
//   - Tenant isolation: a token whose ref claim (Policy.RefClaim) names
//     another project is refused. When two projects share key material (same
//     HMAC secret, same public key in their JWKS files, or same JWKS URL),
//     SetProject notices and both then require the ref claim, unless each has
//     a distinct Policy.Audience; see [Verifier.SharedKeys].
//   - A token for an unknown project costs about one HS256 check before it is
//     refused, so that project existence is not cheaper to probe than a bad
//     signature.
//   - Error messages never contain the token or key material.
//
// Mint and Sign create tokens (for the `cascata token` command and for
// tests); MarshalJWKS and WriteJWKSFile write JWK Sets (public keys, or oct
// secrets).
package auth
