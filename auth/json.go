package auth

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"unicode/utf16"
	"unicode/utf8"
)

// parseJSONObject validates data as exactly one JSON object (RFC 8259) and
// returns its top-level members. Beyond RFC 8259 it refuses, at any depth:
// invalid UTF-8, duplicate member names (compared after unescaping), nesting
// deeper than maxJSONDepth, \u0000 and unpaired UTF-16 surrogate escapes.
// Duplicates are refused because parsers disagree on which one wins (the
// role read here must be the one the database reads from the same JSON); the
// escapes because PostgreSQL's jsonb refuses them.
func parseJSONObject(data []byte) (map[string]json.RawMessage, error) {
	if !utf8.Valid(data) {
		return nil, errors.New("not valid UTF-8")
	}
	s := jsonScanner{data: data}
	s.skipSpace()
	if s.peek() != '{' {
		return nil, errors.New("not a JSON object")
	}
	top := make(map[string]json.RawMessage, 16)
	if err := s.object(1, top); err != nil {
		return nil, err
	}
	s.skipSpace()
	if s.pos != len(s.data) {
		return nil, s.errorf("trailing data after the object")
	}
	return top, nil
}

type jsonScanner struct {
	data []byte
	pos  int
	keys [][]byte // scratch: member names of the objects being scanned
}

func (s *jsonScanner) errorf(format string, args ...any) error {
	return fmt.Errorf("invalid JSON at offset %d: %s", s.pos, fmt.Sprintf(format, args...))
}

func (s *jsonScanner) peek() byte {
	if s.pos < len(s.data) {
		return s.data[s.pos]
	}
	return 0
}

func (s *jsonScanner) skipSpace() {
	for s.pos < len(s.data) {
		switch s.data[s.pos] {
		case ' ', '\t', '\n', '\r':
			s.pos++
		default:
			return
		}
	}
}

func (s *jsonScanner) value(depth int) error {
	s.skipSpace()
	switch c := s.peek(); {
	case c == '{':
		return s.object(depth+1, nil)
	case c == '[':
		return s.array(depth + 1)
	case c == '"':
		_, err := s.str()
		return err
	case c == '-' || (c >= '0' && c <= '9'):
		return s.number()
	case c == 't':
		return s.literal("true")
	case c == 'f':
		return s.literal("false")
	case c == 'n':
		return s.literal("null")
	case c == 0 && s.pos >= len(s.data):
		return s.errorf("unexpected end")
	default:
		return s.errorf("unexpected character %q", c)
	}
}

// object scans an object starting at '{'. When top is not nil, members are
// stored in it (raw values, byte-exact).
func (s *jsonScanner) object(depth int, top map[string]json.RawMessage) error {
	if depth > maxJSONDepth {
		return s.errorf("nested too deeply")
	}
	s.pos++ // '{'
	first := len(s.keys)
	defer func() { s.keys = s.keys[:first] }()
	s.skipSpace()
	if s.peek() == '}' {
		s.pos++
		return nil
	}
	for {
		s.skipSpace()
		if s.peek() != '"' {
			return s.errorf("expected a member name")
		}
		key, err := s.str()
		if err != nil {
			return err
		}
		for _, k := range s.keys[first:] {
			if bytes.Equal(k, key) {
				return fmt.Errorf("duplicate member %q", truncate(string(key), 64))
			}
		}
		s.keys = append(s.keys, key)
		s.skipSpace()
		if s.peek() != ':' {
			return s.errorf("expected ':'")
		}
		s.pos++
		s.skipSpace()
		start := s.pos
		if err := s.value(depth); err != nil {
			return err
		}
		if top != nil {
			top[string(key)] = s.data[start:s.pos:s.pos]
		}
		s.skipSpace()
		switch s.peek() {
		case ',':
			s.pos++
		case '}':
			s.pos++
			return nil
		default:
			return s.errorf("expected ',' or '}'")
		}
	}
}

func (s *jsonScanner) array(depth int) error {
	if depth > maxJSONDepth {
		return s.errorf("nested too deeply")
	}
	s.pos++ // '['
	s.skipSpace()
	if s.peek() == ']' {
		s.pos++
		return nil
	}
	for {
		if err := s.value(depth); err != nil {
			return err
		}
		s.skipSpace()
		switch s.peek() {
		case ',':
			s.pos++
		case ']':
			s.pos++
			return nil
		default:
			return s.errorf("expected ',' or ']'")
		}
	}
}

// str scans a string starting at '"' and returns its decoded value (a
// sub-slice of the input when it has no escapes).
func (s *jsonScanner) str() ([]byte, error) {
	s.pos++ // '"'
	start := s.pos
	var buf []byte // decoded value, once an escape is seen
	for s.pos < len(s.data) {
		c := s.data[s.pos]
		switch {
		case c == '"':
			v := s.data[start:s.pos]
			if buf != nil {
				v = buf
			}
			s.pos++
			return v, nil
		case c < 0x20:
			return nil, s.errorf("control character in string")
		case c == '\\':
			if buf == nil {
				buf = append([]byte(nil), s.data[start:s.pos]...)
			}
			r, err := s.escape()
			if err != nil {
				return nil, err
			}
			buf = utf8.AppendRune(buf, r)
		default:
			if buf != nil {
				buf = append(buf, c)
			}
			s.pos++
		}
	}
	return nil, s.errorf("unterminated string")
}

// escape decodes the escape sequence at s.pos ('\\') and advances past it.
func (s *jsonScanner) escape() (rune, error) {
	if s.pos+1 >= len(s.data) {
		return 0, s.errorf("unterminated escape")
	}
	c := s.data[s.pos+1]
	s.pos += 2
	switch c {
	case '"', '\\', '/':
		return rune(c), nil
	case 'b':
		return '\b', nil
	case 'f':
		return '\f', nil
	case 'n':
		return '\n', nil
	case 'r':
		return '\r', nil
	case 't':
		return '\t', nil
	case 'u':
		r, err := s.hex4()
		if err != nil {
			return 0, err
		}
		switch {
		case r == 0:
			return 0, s.errorf(`\u0000 is not allowed`)
		case utf16.IsSurrogate(r):
			if r >= 0xDC00 || !bytes.HasPrefix(s.data[s.pos:], []byte(`\u`)) {
				return 0, s.errorf("unpaired UTF-16 surrogate")
			}
			s.pos += 2
			lo, err := s.hex4()
			if err != nil {
				return 0, err
			}
			if r = utf16.DecodeRune(r, lo); r == utf8.RuneError {
				return 0, s.errorf("unpaired UTF-16 surrogate")
			}
		}
		return r, nil
	}
	return 0, s.errorf("invalid escape")
}

func (s *jsonScanner) hex4() (rune, error) {
	if s.pos+4 > len(s.data) {
		return 0, s.errorf("short \\u escape")
	}
	var r rune
	for _, c := range s.data[s.pos : s.pos+4] {
		r <<= 4
		switch {
		case c >= '0' && c <= '9':
			r |= rune(c - '0')
		case c >= 'a' && c <= 'f':
			r |= rune(c - 'a' + 10)
		case c >= 'A' && c <= 'F':
			r |= rune(c - 'A' + 10)
		default:
			return 0, s.errorf("invalid \\u escape")
		}
	}
	s.pos += 4
	return r, nil
}

// number scans -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
func (s *jsonScanner) number() error {
	if s.peek() == '-' {
		s.pos++
	}
	switch c := s.peek(); {
	case c == '0':
		s.pos++
	case c >= '1' && c <= '9':
		s.digits()
	default:
		return s.errorf("invalid number")
	}
	if s.peek() == '.' {
		s.pos++
		if !s.digits() {
			return s.errorf("invalid number")
		}
	}
	if c := s.peek(); c == 'e' || c == 'E' {
		s.pos++
		if c := s.peek(); c == '+' || c == '-' {
			s.pos++
		}
		if !s.digits() {
			return s.errorf("invalid number")
		}
	}
	return nil
}

func (s *jsonScanner) digits() bool {
	start := s.pos
	for s.pos < len(s.data) && s.data[s.pos] >= '0' && s.data[s.pos] <= '9' {
		s.pos++
	}
	return s.pos > start
}

func (s *jsonScanner) literal(lit string) error {
	if !bytes.HasPrefix(s.data[s.pos:], []byte(lit)) {
		return s.errorf("invalid literal")
	}
	s.pos += len(lit)
	return nil
}
