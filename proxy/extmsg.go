package proxy

import (
	"encoding/binary"
	"fmt"
)

// extMsg is one extended-protocol message from a client (Parse, Bind,
// Describe, Close, Execute), checked and split into its fields once, when
// it arrives (decodeExtMsg): routing (wantOf), translation (translate) and
// replay (retranslate) read these fields and never parse the body again.
// Byte fields are views of the body; names are strings, as the client's
// statement table keys them.
type extMsg struct {
	typ  byte
	body []byte // as the client sent it
	// name is the statement a Parse creates or a Bind uses, or what a
	// Describe or Close names: a statement or a portal, as kind says.
	name string
	kind byte // Describe and Close: kindStatement or kindPortal
	// portal is the portal a Bind creates.
	portal string
	// query is the SQL text of a Parse.
	query string
	// rest is what follows the statement name: a Parse's text and
	// parameter types, a Bind's formats, parameters and result formats.
	rest []byte
}

// hasText: the message is about a statement's text (Parse, Bind, Describe
// of a statement), so what running it needs is the text's.
func (m *extMsg) hasText() bool {
	return m.typ == msgTypeParse || m.typ == msgTypeBind || (m.typ == msgTypeDescribe && m.kind == kindStatement)
}

// decodeExtMsg checks the layout of an extended-protocol message body the
// way PostgreSQL's own reader does (every field present, counts not
// negative, nothing left over) and splits it into its fields. A message
// that fails is a protocol violation: it is answered with FATAL 08P01
// before any backend sees it, so no backend is left waiting for the rest of
// a batch that never comes.
func decodeExtMsg(typ byte, body []byte) (extMsg, error) {
	m := extMsg{typ: typ, body: body}
	r := fieldReader{b: body}
	switch typ {
	case msgTypeParse:
		m.name = r.cstring()
		m.rest = r.b
		m.query = r.cstring()
		r.skip(4 * r.count())
	case msgTypeBind:
		m.portal = r.cstring()
		m.name = r.cstring()
		m.rest = r.b
		r.skip(2 * r.count())
		params := r.count()
		for i := 0; i < params && r.err == nil; i++ {
			if l := r.int32(); l > 0 {
				r.skip(l)
			} else if l < -1 {
				r.fail("invalid parameter length")
			}
		}
		r.skip(2 * r.count())
	case msgTypeDescribe, msgTypeClose:
		if len(body) == 0 || (body[0] != kindStatement && body[0] != kindPortal) {
			return extMsg{}, fmt.Errorf("invalid %c message subtype", typ)
		}
		m.kind = body[0]
		r.b = body[1:]
		m.name = r.cstring()
	case msgTypeExecute:
		m.portal = r.cstring()
		r.int32()
	default:
		return extMsg{}, fmt.Errorf("invalid frontend message type %q", typ)
	}
	if err := r.end(); err != nil {
		return extMsg{}, fmt.Errorf("invalid %c message: %w", typ, err)
	}
	return m, nil
}

// fieldReader reads the fields of a message body; the first failure sticks.
type fieldReader struct {
	b   []byte
	err error
}

type formatError string

func (e formatError) Error() string { return string(e) }

func (r *fieldReader) fail(msg string) {
	if r.err == nil {
		r.err = formatError(msg)
	}
	r.b = nil
}

func (r *fieldReader) cstring() string {
	for i, c := range r.b {
		if c == 0 {
			s := string(r.b[:i])
			r.b = r.b[i+1:]
			return s
		}
	}
	r.fail("string not terminated")
	return ""
}

// count reads a 16-bit count, unsigned as PostgreSQL reads it (a Bind may
// carry up to 65,535 parameters).
func (r *fieldReader) count() int {
	if len(r.b) < 2 {
		r.fail("message too short")
		return 0
	}
	v := int(binary.BigEndian.Uint16(r.b))
	r.b = r.b[2:]
	return v
}

func (r *fieldReader) int32() int {
	if len(r.b) < 4 {
		r.fail("message too short")
		return 0
	}
	v := int(int32(binary.BigEndian.Uint32(r.b)))
	r.b = r.b[4:]
	return v
}

func (r *fieldReader) skip(n int) {
	if n > len(r.b) {
		r.fail("message too short")
		return
	}
	r.b = r.b[n:]
}

func (r *fieldReader) end() error {
	if r.err == nil && len(r.b) != 0 {
		r.fail("unexpected bytes at the end")
	}
	return r.err
}
