package proxy

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"

	"cascata/internal/sockio"

	"github.com/jackc/pgx/v5/pgproto3"
)

// ioBufSize is the read and write buffer of each side of a relay. Messages up
// to this size are relayed straight out of the read buffer without a copy.
const ioBufSize = 32 * 1024

// msgReader frames PostgreSQL protocol messages (type byte, int32 length,
// body) from a buffered stream. It decodes nothing: callers look at the type
// and either take the body (small messages they act on) or stream it on.
type msgReader struct {
	r       *bufio.Reader // nil while released (see release)
	maxBody int
	typ     byte
	n       int // body length of the current message
	taken   bool
	scratch []byte

	// src is what r reads; with a pool, r goes back to it while the
	// connection is idle and nothing is buffered, and the wait for the next
	// bytes needs no buffer (sockio.WaitReadable).
	src  net.Conn
	pool *bufStack[*bufio.Reader]
	// holding: r is set; read by the server's sweep, which nudges only
	// readers that hold a buffer.
	holding atomic.Bool
}

func newMsgReader(r io.Reader, maxBody int) *msgReader {
	return &msgReader{r: bufio.NewReaderSize(r, ioBufSize), maxBody: maxBody, taken: true}
}

// releasable lets m give its buffer back to pool while idle, when c can be
// waited on without one.
func (m *msgReader) releasable(c net.Conn, pool *bufStack[*bufio.Reader]) {
	if sockio.CanWait(c) {
		m.src, m.pool = c, pool
		m.holding.Store(m.r != nil)
	}
}

// release gives the buffer back when nothing is buffered and the current
// message is consumed. The caller holds no slice of a body read before.
func (m *msgReader) release() {
	if m.pool == nil || m.r == nil || !m.taken || m.r.Buffered() > 0 {
		return
	}
	m.r.Reset(nil)
	m.pool.put(m.r)
	m.r = nil
	m.holding.Store(false)
}

// acquire waits for bytes without a buffer, then takes one.
func (m *msgReader) acquire() error {
	if err := sockio.WaitReadable(m.src); err != nil {
		return err
	}
	m.r = m.pool.get()
	m.r.Reset(m.src)
	m.holding.Store(true)
	return nil
}

// errMessageTooLarge is returned for a message over the configured maximum.
type errMessageTooLarge struct {
	typ    byte
	n, max int
}

func (e *errMessageTooLarge) Error() string {
	return fmt.Sprintf("message %q of %d bytes exceeds the maximum of %d", e.typ, e.n, e.max)
}

// next reads the header of the next message. The previous message's body must
// have been consumed with body, forward or skip.
func (m *msgReader) next() (byte, int, error) {
	if m.r == nil {
		if err := m.acquire(); err != nil {
			return 0, 0, err
		}
	}
	if !m.taken {
		if err := m.skip(); err != nil {
			return 0, 0, err
		}
	}
	hdr, err := m.r.Peek(5)
	if err != nil {
		if len(hdr) > 0 && err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return 0, 0, err
	}
	typ := hdr[0]
	l := int(int32(binary.BigEndian.Uint32(hdr[1:5])))
	if l < 4 {
		return 0, 0, fmt.Errorf("invalid message length %d for message %q", l, typ)
	}
	if l-4 > m.maxBody {
		return 0, 0, &errMessageTooLarge{typ: typ, n: l - 4, max: m.maxBody}
	}
	if _, err := m.r.Discard(5); err != nil {
		return 0, 0, err
	}
	m.typ, m.n, m.taken = typ, l-4, false
	return typ, l - 4, nil
}

// body returns the whole body of the current message. The slice is valid
// until the next call on m.
func (m *msgReader) body() ([]byte, error) {
	m.taken = true
	if m.n <= m.r.Size() {
		b, err := m.r.Peek(m.n)
		if err != nil {
			return nil, unexpectedEOF(err)
		}
		// The bytes stay in the buffer until the next read; discarding now is
		// safe because bufio does not overwrite them before the next fill.
		_, _ = m.r.Discard(m.n)
		return b, nil
	}
	if cap(m.scratch) < m.n {
		m.scratch = make([]byte, m.n)
	}
	b := m.scratch[:m.n]
	if _, err := io.ReadFull(m.r, b); err != nil {
		return nil, unexpectedEOF(err)
	}
	return b, nil
}

// errPartial wraps a failure after part of a message was written: the
// stream it was written to is out of step and must be closed.
type errPartial struct{ err error }

func (e *errPartial) Error() string { return "message cut short: " + e.err.Error() }
func (e *errPartial) Unwrap() error { return e.err }

// isPartial reports whether err left a half-written message behind.
func isPartial(err error) bool {
	var p *errPartial
	return errors.As(err, &p)
}

// forward writes the current message, header and body, to w without
// decoding it. A message that fits the read buffer is read whole before
// anything is written; a larger one is streamed, and a failure midway
// returns an errPartial.
func (m *msgReader) forward(w *bufio.Writer) error {
	m.taken = true
	hdr := header(w, m.typ, m.n)
	if m.n <= m.r.Size() {
		b, err := m.r.Peek(m.n)
		if err != nil {
			return unexpectedEOF(err)
		}
		if _, err := w.Write(hdr); err != nil {
			return err
		}
		if _, err := w.Write(b); err != nil {
			return &errPartial{err}
		}
		_, _ = m.r.Discard(m.n)
		return nil
	}
	if _, err := w.Write(hdr); err != nil {
		return err
	}
	if _, err := io.CopyN(w, m.r, int64(m.n)); err != nil {
		return &errPartial{unexpectedEOF(err)}
	}
	return nil
}

// skip drops the body of the current message.
func (m *msgReader) skip() error {
	m.taken = true
	if _, err := m.r.Discard(m.n); err != nil {
		return unexpectedEOF(err)
	}
	return nil
}

// buffered reports whether more bytes are waiting, so writers know when to flush.
func (m *msgReader) buffered() bool { return m.r != nil && m.r.Buffered() > 0 }

func unexpectedEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// header returns the 5-byte header of a message with an n-byte body, built
// in w's free buffer space, so writing it copies nothing and allocates
// nothing (a local array would escape through w's io.Writer).
func header(w *bufio.Writer, typ byte, n int) []byte {
	l := uint32(n + 4)
	return append(w.AvailableBuffer(), typ, byte(l>>24), byte(l>>16), byte(l>>8), byte(l))
}

// writeMsg appends header and body of one message to w.
func writeMsg(w *bufio.Writer, typ byte, body []byte) error {
	if _, err := w.Write(header(w, typ, len(body))); err != nil {
		return err
	}
	_, err := w.Write(body)
	return err
}

// encodeTo encodes a pgproto3 message into w.
func encodeTo(w *bufio.Writer, msg interface {
	Encode([]byte) ([]byte, error)
}, scratch []byte) ([]byte, error) {
	buf, err := msg.Encode(scratch[:0])
	if err != nil {
		return scratch, fmt.Errorf("encode message: %w", err)
	}
	_, err = w.Write(buf)
	return buf, err
}

// The one-byte answers to SSLRequest and GSSENCRequest.
const (
	encryptionYes byte = 'S' // go on with the TLS handshake
	encryptionNo  byte = 'N' // go on unencrypted
)

// msgTypePassword is the client's PasswordMessage of the login.
const msgTypePassword byte = 'p'

// Frontend message types after login (PostgreSQL protocol 3.0).
const (
	msgTypeQuery        byte = 'Q'
	msgTypeParse        byte = 'P'
	msgTypeBind         byte = 'B'
	msgTypeDescribe     byte = 'D'
	msgTypeClose        byte = 'C'
	msgTypeExecute      byte = 'E'
	msgTypeSync         byte = 'S'
	msgTypeFlush        byte = 'H'
	msgTypeTerminate    byte = 'X'
	msgTypeFunctionCall byte = 'F'
	msgTypeCopyData     byte = 'd'
	msgTypeCopyDone     byte = 'c'
	msgTypeCopyFail     byte = 'f'
)

// Backend message types the proxy looks at.
const (
	msgTypeReadyForQuery   byte = 'Z'
	msgTypeParseComplete   byte = '1'
	msgTypeCloseComplete   byte = '3'
	msgTypeCopyInResponse  byte = 'G'
	msgTypeErrorResponse   byte = 'E'
	msgTypeCommandComplete byte = 'C'
	msgTypeDataRow         byte = 'D'
	msgTypeNoticeResponse  byte = 'N'
	msgTypeNotification    byte = 'A'
	msgTypeParameterStatus byte = 'S'
)

// Transaction statuses of ReadyForQuery.
const (
	txIdle    byte = 'I' // not in a transaction block
	txInBlock byte = 'T' // in a transaction block
	txFailed  byte = 'E' // in a failed transaction block
)

// The kind byte of Describe and Close: a prepared statement or a portal.
const (
	kindStatement byte = 'S'
	kindPortal    byte = 'P'
)

// Precomputed messages the proxy sends often.
var (
	msgSync        = []byte{msgTypeSync, 0, 0, 0, 4}
	msgParseOK     = []byte{msgTypeParseComplete, 0, 0, 0, 4}
	msgCopyFailEOF = mustEncode(&pgproto3.CopyFail{Message: "client connection closed"})
)

func mustEncode(msg interface {
	Encode([]byte) ([]byte, error)
}) []byte {
	b, err := msg.Encode(nil)
	if err != nil {
		panic(err)
	}
	return b
}

// rfqMsgs are the ReadyForQuery messages of the three statuses.
var rfqMsgs = [3][]byte{{msgTypeReadyForQuery, 0, 0, 0, 5, txIdle}, {msgTypeReadyForQuery, 0, 0, 0, 5, txInBlock}, {msgTypeReadyForQuery, 0, 0, 0, 5, txFailed}}

// rfq returns a ReadyForQuery message with the given transaction status.
// The result must not be modified.
func rfq(status byte) []byte {
	switch status {
	case txIdle:
		return rfqMsgs[0]
	case txInBlock:
		return rfqMsgs[1]
	case txFailed:
		return rfqMsgs[2]
	}
	return []byte{msgTypeReadyForQuery, 0, 0, 0, 5, status}
}

// queryMsg encodes a simple Query message.
func queryMsg(sql string) []byte {
	return mustEncode(&pgproto3.Query{String: sql})
}

// cstring reads a NUL-terminated string from b.
func cstring(b []byte) (string, []byte, bool) {
	for i, c := range b {
		if c == 0 {
			return string(b[:i]), b[i+1:], true
		}
	}
	return "", nil, false
}

// queryText extracts the SQL of a Query message body without copying twice.
func queryText(body []byte) (string, bool) {
	if len(body) == 0 || body[len(body)-1] != 0 {
		return "", false
	}
	return string(body[:len(body)-1]), true
}

// nextBuffered reports whether next returns a message already buffered,
// without reading the connection.
func (m *msgReader) nextBuffered() bool {
	return m.taken && m.fullMessageBuffered()
}

// wait blocks until some bytes are buffered or the reader fails.
func (m *msgReader) wait() error {
	if !m.taken {
		if err := m.skip(); err != nil {
			return err
		}
	}
	if m.r == nil {
		return m.acquire()
	}
	_, err := m.r.Peek(1)
	return err
}

// fullMessageBuffered reports whether a whole next message already sits in
// the read buffer, so the relay may keep batching instead of flushing.
func (m *msgReader) fullMessageBuffered() bool {
	if m.r == nil {
		return false
	}
	n := m.r.Buffered()
	if n < 5 {
		return false
	}
	hdr, err := m.r.Peek(5)
	if err != nil {
		return false
	}
	return n >= 1+int(int32(binary.BigEndian.Uint32(hdr[1:5])))
}
