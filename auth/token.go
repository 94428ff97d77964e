package auth

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// maxJSONDepth bounds nesting in the header and the payload.
const maxJSONDepth = 32

// compactToken is a JWS compact serialization split and decoded, not yet
// verified.
type compactToken struct {
	signingInput string // header "." payload, as sent
	header       tokenHeader
	payload      []byte // base64url-decoded payload: the claims JSON, byte-exact
	claims       map[string]json.RawMessage
	sig          []byte
}

// tokenHeader holds the JOSE header members this package reads. Member
// names are matched exactly (encoding/json's case-insensitive struct
// matching would let "ALG" stand for "alg").
type tokenHeader struct {
	alg string
	kid string
}

var b64url = base64.RawURLEncoding.Strict()

// parseCompact splits and decodes a token without verifying anything but its
// structure: three base64url segments, a JSON-object header naming alg, and a
// UTF-8 JSON-object payload without duplicate member names.
func parseCompact(token string) (*compactToken, *Error) {
	h, rest, ok := strings.Cut(token, ".")
	p, s, ok2 := strings.Cut(rest, ".")
	if !ok || !ok2 || strings.Contains(s, ".") {
		return nil, errf(ReasonMalformed, "token is not a JWS in compact form (three dot-separated parts)")
	}
	hdr, err := b64url.DecodeString(h)
	if err != nil {
		return nil, newErr(ReasonMalformed, "token header is not base64url", err)
	}
	payload, err := b64url.DecodeString(p)
	if err != nil {
		return nil, newErr(ReasonMalformed, "token payload is not base64url", err)
	}
	sig, err := b64url.DecodeString(s)
	if err != nil {
		return nil, newErr(ReasonMalformed, "token signature is not base64url", err)
	}
	t := &compactToken{signingInput: token[:len(h)+1+len(p)], payload: payload, sig: sig}
	members, err := parseJSONObject(hdr)
	if err != nil {
		return nil, newErr(ReasonMalformed, "token header is not a valid JSON object", err)
	}
	if _, ok := members["crit"]; ok {
		// RFC 7515 §4.1.11: extensions we do not understand must be refused.
		return nil, errf(ReasonMalformed, "token header has crit extensions, none are supported")
	}
	alg, ok := jsonString(members["alg"])
	if !ok {
		return nil, errf(ReasonMalformed, "token header has no alg string")
	}
	t.header.alg = alg
	if raw, ok := members["kid"]; ok && string(raw) != "null" {
		if t.header.kid, ok = jsonString(raw); !ok {
			return nil, errf(ReasonMalformed, "token header kid is not a string")
		}
	}
	if t.claims, err = parseJSONObject(payload); err != nil {
		return nil, newErr(ReasonMalformed, "token payload is not a valid JSON object", err)
	}
	return t, nil
}

// claimPath is a parsed RoleClaim/RefClaim: member names from the top-level
// object inwards.
type claimPath []string

// parseClaimPath parses a dotted claim path: `role`, `app_metadata.role`,
// `.app_metadata.role` (leading dot allowed, as in PostgREST) or
// `"https://example.com/claims".role` (double quotes around a name that
// contains dots; the name may not contain a double quote).
func parseClaimPath(s string) (claimPath, error) {
	orig := s
	s = strings.TrimPrefix(s, ".")
	if s == "" {
		return nil, fmt.Errorf("claim path %q is empty", orig)
	}
	var path claimPath
	for {
		var seg string
		if strings.HasPrefix(s, `"`) {
			end := strings.IndexByte(s[1:], '"')
			if end < 0 {
				return nil, fmt.Errorf("claim path %q has an unterminated quote", orig)
			}
			seg, s = s[1:1+end], s[2+end:]
			if s != "" && s[0] != '.' {
				return nil, fmt.Errorf("claim path %q: expected '.' after a quoted name", orig)
			}
		} else {
			i := strings.IndexByte(s, '.')
			if i < 0 {
				i = len(s)
			}
			seg, s = s[:i], s[i:]
			if strings.Contains(seg, `"`) {
				return nil, fmt.Errorf("claim path %q: quote inside a name", orig)
			}
		}
		if seg == "" {
			return nil, fmt.Errorf("claim path %q has an empty name", orig)
		}
		path = append(path, seg)
		if s == "" {
			return path, nil
		}
		s = s[1:] // the '.'
		if s == "" {
			return nil, fmt.Errorf("claim path %q ends with '.'", orig)
		}
	}
}

// lookup follows the path. found is false when a member along the path is
// absent; errNotObject reports an intermediate value that is not an object.
func (p claimPath) lookup(top map[string]json.RawMessage) (raw json.RawMessage, found bool, err error) {
	cur := top
	for i, name := range p {
		v, ok := cur[name]
		if !ok {
			return nil, false, nil
		}
		if i == len(p)-1 {
			return v, true, nil
		}
		if firstByte(v) != '{' {
			return nil, false, errNotObject
		}
		var err error
		if cur, err = parseJSONObject(v); err != nil {
			return nil, false, fmt.Errorf("decode %q: %w", name, err)
		}
	}
	return nil, false, nil
}

var errNotObject = errors.New("a claim along the path is not an object")

func firstByte(raw json.RawMessage) byte {
	raw = bytes.TrimLeft(raw, " \t\r\n")
	if len(raw) == 0 {
		return 0
	}
	return raw[0]
}

// jsonString decodes raw as a JSON string; ok is false for any other type.
func jsonString(raw json.RawMessage) (string, bool) {
	if firstByte(raw) != '"' {
		return "", false
	}
	if n := len(raw); n >= 2 && raw[n-1] == '"' && bytes.IndexByte(raw[1:n-1], '\\') < 0 && bytes.IndexByte(raw[1:n-1], '"') < 0 {
		return string(raw[1 : n-1]), true // no escapes: the common case
	}
	var s string
	if json.Unmarshal(raw, &s) != nil {
		return "", false
	}
	return s, true
}

// maxNumericDate is 9999-12-31T23:59:59Z.
const maxNumericDate = 253402300799

// numericDate decodes a JWT NumericDate (seconds since the epoch, possibly
// fractional).
func numericDate(raw json.RawMessage) (time.Time, error) {
	b := firstByte(raw)
	if b != '-' && (b < '0' || b > '9') {
		return time.Time{}, errors.New("not a number")
	}
	f, err := strconv.ParseFloat(string(bytes.TrimSpace(raw)), 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("not a number: %w", err)
	}
	if math.IsNaN(f) || f < 0 || f > maxNumericDate {
		return time.Time{}, errors.New("out of range")
	}
	sec, frac := math.Modf(f)
	return time.Unix(int64(sec), int64(frac*1e9)).UTC(), nil
}

// audience decodes aud: a string or an array of strings.
func audience(raw json.RawMessage) ([]string, error) {
	switch firstByte(raw) {
	case '"':
		s, ok := jsonString(raw)
		if !ok {
			return nil, errors.New("invalid string")
		}
		return []string{s}, nil
	case '[':
		var list []string
		if err := json.Unmarshal(raw, &list); err != nil {
			return nil, fmt.Errorf("not an array of strings: %w", err)
		}
		return list, nil
	}
	return nil, errors.New("neither a string nor an array of strings")
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}
