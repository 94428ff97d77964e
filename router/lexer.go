package router

import "slices"

// Markers that replace literals in a normalized key. A text containing
// either byte (or any other control character but whitespace) is never
// normalized, so a marker in a key always stands for a replaced literal.
const (
	markInteger = '\x01' // unsigned integer of at most maxInlineDigits digits (always ICONST)
	markString  = '\x02' // standard string
	markDecimal = '\x03' // number with a fraction or an exponent (always FCONST)
)

// maxInlineDigits is the longest unsigned integer literal that is replaced
// by a marker: up to 9 digits the PostgreSQL lexer always yields ICONST,
// longer ones may be ICONST or FCONST depending on the value, which changes
// what the grammar accepts (e.g. FETCH 99999999999), so they stay verbatim.
const maxInlineDigits = 9

// normalizeKey returns sql with its plain literals replaced by markers:
// unsigned integers of at most maxInlineDigits digits (markInteger), other
// unsigned decimal numbers (markDecimal) and standard '...' strings without
// backslashes or prefixes (markString). Everything else (keywords,
// identifiers, operators, parameters, whitespace and comments) is kept
// verbatim, so two texts with the same key differ only in the contents of
// literals of the same kind at the same places.
//
// ok is false when the text cannot be normalized soundly: escape strings,
// bit/hex/national/Unicode literals, dollar quoting, control characters,
// unterminated tokens, numbers followed by identifier characters ... Such
// texts simply take the slow path. n is the number of replaced literals;
// when n is 0, key is sql. When spans is non-nil the byte offsets at which
// replaced literals start are appended to it.
func normalizeKey(sql string, spans *[]int32) (key string, n int, ok bool) {
	b, n, ok := appendNormalized(nil, sql, spans)
	switch {
	case !ok:
		return "", 0, false
	case n == 0:
		return sql, 0, true
	}
	return string(b), n, true
}

// appendNormalized appends normalizeKey's key of sql to dst when it
// replaces literals (n > 0) and returns dst unchanged otherwise, so that a
// cache lookup needs no new string.
func appendNormalized(dst []byte, sql string, spans *[]int32) (key []byte, n int, ok bool) {
	b := dst
	last := 0 // start of the verbatim run not yet copied into b
	replace := func(start, end int, mark byte) {
		if n == 0 {
			b = slices.Grow(b, len(sql))
		}
		b = append(b, sql[last:start]...)
		b = append(b, mark)
		last = end
		n++
		if spans != nil {
			*spans = append(*spans, int32(start))
		}
	}
	s := sql
	i := 0
	for i < len(s) {
		c := s[i]
		switch {
		case c < 0x20 || c == 0x7f:
			if !isSpace(c) {
				return dst, 0, false
			}
			i++
		case c == '-' && i+1 < len(s) && s[i+1] == '-':
			j := i + 2
			for j < len(s) && s[j] != '\n' && s[j] != '\r' {
				if isBadControl(s[j]) {
					return dst, 0, false
				}
				j++
			}
			i = j
		case c == '/' && i+1 < len(s) && s[i+1] == '*':
			depth := 1
			j := i + 2
			for depth > 0 {
				if j >= len(s) {
					return dst, 0, false
				}
				switch {
				case s[j] == '/' && j+1 < len(s) && s[j+1] == '*':
					depth++
					j += 2
				case s[j] == '*' && j+1 < len(s) && s[j+1] == '/':
					depth--
					j += 2
				case isBadControl(s[j]):
					return dst, 0, false
				default:
					j++
				}
			}
			i = j
		case c == '\'':
			if i > 0 && isPrefixChar(s[i-1]) {
				// E'', B'', X'', N'', U&'' or an identifier glued to a
				// string: not a plain literal.
				return dst, 0, false
			}
			j := i + 1
			for {
				if j >= len(s) || s[j] == '\\' || isBadControl(s[j]) {
					return dst, 0, false
				}
				if s[j] == '\'' {
					if j+1 < len(s) && s[j+1] == '\'' {
						j += 2
						continue
					}
					break
				}
				j++
			}
			replace(i, j+1, markString)
			i = j + 1
		case c == '"':
			if i > 0 && s[i-1] == '&' {
				return dst, 0, false // U&"..." (may be followed by UESCAPE '...')
			}
			j := i + 1
			for {
				if j >= len(s) || isBadControl(s[j]) {
					return dst, 0, false
				}
				if s[j] == '"' {
					if j+1 < len(s) && s[j+1] == '"' {
						j += 2
						continue
					}
					break
				}
				j++
			}
			i = j + 1
		case c == '$':
			if i+1 < len(s) && isDigit(s[i+1]) {
				j := i + 1
				for j < len(s) && isDigit(s[j]) {
					j++
				}
				if j < len(s) && (isIdentCont(s[j]) || s[j] == '.') {
					return dst, 0, false
				}
				i = j
				continue
			}
			return dst, 0, false // dollar quoting
		case isDigit(c):
			j := i
			for j < len(s) && isDigit(s[j]) {
				j++
			}
			plainInt := true
			if j < len(s) && s[j] == '.' {
				plainInt = false
				j++
				for j < len(s) && isDigit(s[j]) {
					j++
				}
			}
			if j < len(s) && (s[j] == 'e' || s[j] == 'E') {
				k := j + 1
				if k < len(s) && (s[k] == '+' || s[k] == '-') {
					k++
				}
				if k >= len(s) || !isDigit(s[k]) {
					return dst, 0, false
				}
				plainInt = false
				j = k
				for j < len(s) && isDigit(s[j]) {
					j++
				}
			}
			if j < len(s) && (isIdentCont(s[j]) || s[j] == '.') {
				// 0x1F, 1_000, 1abc (trailing junk), 1..2 ...
				return dst, 0, false
			}
			if plainInt && j-i > maxInlineDigits {
				i = j // stays verbatim
				continue
			}
			if plainInt {
				replace(i, j, markInteger)
			} else {
				replace(i, j, markDecimal)
			}
			i = j
		case isIdentStart(c):
			j := i + 1
			for j < len(s) && isIdentCont(s[j]) {
				j++
			}
			i = j
		default:
			i++
		}
	}
	if n == 0 {
		return dst, 0, true
	}
	return append(b, sql[last:]...), n, true
}

func isSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'
}

// isBadControl reports control characters other than whitespace (which
// include the key markers).
func isBadControl(c byte) bool { return (c < 0x20 && !isSpace(c)) || c == 0x7f }

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func isIdentStart(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '_' || c >= 0x80
}

func isIdentCont(c byte) bool { return isIdentStart(c) || isDigit(c) || c == '$' }

// isPrefixChar reports a byte that, right before a quote, makes the quote
// something else than the start of a plain string literal.
func isPrefixChar(c byte) bool { return isIdentCont(c) || c == '&' || c == '\'' }
