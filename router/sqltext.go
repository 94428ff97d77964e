package router

import (
	"strings"
	"unicode"
	"unicode/utf8"
)

// afterStatementName returns the text that follows the statement name of a
// PREPARE or EXECUTE (keyword, then the name, each possibly after spaces
// and comments), or false when the text does not have that shape.
func afterStatementName(sql, keyword string) (string, bool) {
	i := skipSpaceAndComments(sql, 0)
	if len(sql)-i < len(keyword) || !strings.EqualFold(sql[i:i+len(keyword)], keyword) {
		return "", false
	}
	i += len(keyword)
	j := skipSpaceAndComments(sql, i)
	if j == i || j >= len(sql) {
		return "", false
	}
	if sql[j] == '"' {
		for k := j + 1; k < len(sql); k++ {
			if sql[k] == '"' {
				if k+1 < len(sql) && sql[k+1] == '"' {
					k++
					continue
				}
				return sql[k+1:], true
			}
		}
		return "", false
	}
	k := j
	for k < len(sql) {
		r, n := utf8.DecodeRuneInString(sql[k:])
		if !(r == '_' || r == '$' || unicode.IsLetter(r) || unicode.IsDigit(r)) {
			break
		}
		k += n
	}
	if k == j {
		return "", false
	}
	return sql[k:], true
}

// skipSpaceAndComments skips white space and comments from i.
func skipSpaceAndComments(s string, i int) int {
	for i < len(s) {
		switch {
		case s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r' || s[i] == '\f':
			i++
		case strings.HasPrefix(s[i:], "--"):
			for i < len(s) && s[i] != '\n' {
				i++
			}
		case strings.HasPrefix(s[i:], "/*"):
			depth := 0
			for i < len(s) {
				if strings.HasPrefix(s[i:], "/*") {
					depth++
					i += 2
				} else if strings.HasPrefix(s[i:], "*/") {
					depth--
					i += 2
					if depth == 0 {
						break
					}
				} else {
					i++
				}
			}
		default:
			return i
		}
	}
	return i
}
