package proxy_test

import (
	"bytes"
	"context"
	"net"
	"testing"
	"time"

	"cascata/proxy"

	"github.com/jackc/pgx/v5/pgproto3"
)

// FuzzPostLogin sends arbitrary messages after login through a real proxy
// to a real PostgreSQL, on a project with one backend, and then checks that
// the project is still usable and that the next client finds a pristine
// backend. An input is a series of messages, each a type byte, a length
// byte and that many body bytes; an input that starts with 0 is sent as it
// is. The seed corpus (testdata/fuzz/FuzzPostLogin and the f.Add calls
// below) runs as a normal test.
func FuzzPostLogin(f *testing.F) {
	for _, m := range malformed {
		f.Add(framed(m.typ, m.body))
		f.Add(append(framed('Q', []byte("BEGIN\x00")), framed(m.typ, m.body)...))
	}
	f.Add(append(append(framed('P', []byte("s1\x00SELECT current_user\x00\x00\x00")), framed('B', []byte("\x00s1\x00\x00\x00\x00\x00\x00\x00"))...), framed('E', []byte("\x00\x00\x00\x00\x00"))...))
	f.Add(framed('Q', []byte("SET TimeZone = 'Asia/Tokyo'; SELECT pg_advisory_lock(7)\x00")))
	f.Add(append([]byte{0}, rawMsg('P', []byte("no-terminator"))...))
	// The proxy's statements on the shared backend (cs_ident, cs_set).
	f.Add(framed('Q', []byte("DEALLOCATE ALL\x00")))
	f.Add(framed('Q', []byte("EXECUTE cs_set('role', 'service_role')\x00")))
	f.Add(append(framed('C', []byte("Scs_ident\x00")), framed('Q', []byte("EXECUTE cs_ident('service_role', '{}', '')\x00"))...))
	f.Add(append(framed('P', []byte("cs_ident\x00SELECT $1, $2, $3\x00\x00\x00")), framed('B', []byte("\x00cs_ident\x00\x00\x00\x00\x03\x00\x00\x00\x01a\x00\x00\x00\x01b\x00\x00\x00\x01c\x00\x00"))...))
	h, base := advStart(f, false)
	f.Fuzz(func(t *testing.T, data []byte) {
		c := rawAfterLogin(t, h, "anon", "fuzzer")
		var out []byte
		if len(data) > 0 && data[0] == 0 {
			out = append(out, data[1:]...)
		} else {
			for i := 0; i+1 < len(data); {
				typ, n := data[i], int(data[i+1])
				i += 2
				if i+n > len(data) {
					n = len(data) - i
				}
				out = append(out, rawMsg(typ, data[i:i+n])...)
				i += n
			}
		}
		out = append(out, rawMsg('S', nil)...)
		out = append(out, rawMsg('Q', []byte("SELECT 'fuzz-end'\x00"))...)
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := c.Write(out); err == nil {
			drainUntilEnd(c)
		}
		_ = c.Close()
		victim, err := h.tryConnect(advProject, "authenticated", token(t, advProject, "authenticated", "victim", nil))
		if err != nil {
			t.Fatalf("the project is not usable after the input: %v", err)
		}
		defer victim.Close(context.Background())
		assertPristine(t, victim, "authenticated", "victim", base)
		if n := proxy.PhaseFaults(h.srv); n > 0 {
			t.Fatalf("%d session phase moves out of order so far (see the log)", n)
		}
	})
}

// framed encodes one message in FuzzPostLogin's input form.
func framed(typ byte, body []byte) []byte {
	return append([]byte{typ, byte(len(body))}, body...)
}

// drainUntilEnd reads replies until the end marker's ReadyForQuery, the
// close, or the deadline.
func drainUntilEnd(c net.Conn) {
	fe := pgproto3.NewFrontend(c, c)
	ended := false
	for {
		msg, err := fe.Receive()
		if err != nil {
			return
		}
		switch m := msg.(type) {
		case *pgproto3.DataRow:
			if len(m.Values) == 1 && bytes.Equal(m.Values[0], []byte("fuzz-end")) {
				ended = true
			}
		case *pgproto3.ReadyForQuery:
			if ended {
				return
			}
		}
	}
}
