package proxy

import (
	"encoding/binary"
	"fmt"
)

// checkFrontendMsg checks the layout of an extended-protocol message body
// the way PostgreSQL's own reader does (every field present, counts not
// negative, nothing left over), without copying it. A message that fails
// is a protocol violation: it is answered with FATAL 08P01 before any
// backend sees it, so no backend is left waiting for the rest of a batch
// that never comes.
func checkFrontendMsg(typ byte, body []byte) error {
	var err error
	switch typ {
	case msgTypeParse:
		r := fieldReader{b: body}
		r.cstring()
		r.cstring()
		n := r.count()
		r.skip(4 * n)
		err = r.end()
	case msgTypeBind:
		r := fieldReader{b: body}
		r.cstring()
		r.cstring()
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
		err = r.end()
	case msgTypeDescribe, msgTypeClose:
		if len(body) == 0 || (body[0] != kindStatement && body[0] != kindPortal) {
			return fmt.Errorf("invalid %c message subtype", typ)
		}
		r := fieldReader{b: body[1:]}
		r.cstring()
		err = r.end()
	case msgTypeExecute:
		r := fieldReader{b: body}
		r.cstring()
		r.int32()
		err = r.end()
	case msgTypeSync, msgTypeFlush:
		if len(body) != 0 {
			return fmt.Errorf("invalid %c message: unexpected body", typ)
		}
	}
	if err != nil {
		return fmt.Errorf("invalid %c message: %w", typ, err)
	}
	return nil
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

func (r *fieldReader) cstring() {
	for i, c := range r.b {
		if c == 0 {
			r.b = r.b[i+1:]
			return
		}
	}
	r.fail("string not terminated")
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
