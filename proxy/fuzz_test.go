package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"cascata/auth"
)

// startupBytes builds a startup packet for the seed corpus.
func startupBytes(version uint32, kv ...string) []byte {
	body := binary.BigEndian.AppendUint32(nil, version)
	for _, s := range kv {
		body = append(body, s...)
		body = append(body, 0)
	}
	body = append(body, 0)
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(body)+4)), body...)
}

// FuzzReadStartup feeds arbitrary bytes to the startup reader: it must return
// a startup, nothing (cancel) or an error, never panic or hang.
func FuzzReadStartup(f *testing.F) {
	f.Add(startupBytes(196608, "user", "anon", "database", "demo"))
	f.Add(startupBytes(196610, "user", "anon.demo", "_pq_.x", "1"))
	f.Add(append([]byte{0, 0, 0, 8, 4, 210, 22, 47}, startupBytes(196608, "user", "u")...))
	f.Add([]byte{0, 0, 0, 16, 4, 210, 22, 46, 0, 0, 0, 1, 1, 2, 3, 4})
	f.Add([]byte{0, 0, 0, 8, 4, 210, 22, 48})
	f.Add(startupBytes(131072, "user", "old"))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0, 3, 0, 0})
	f.Add(startupBytes(196608, "user", "x", "replication", "database"))
	srv, err := NewServer(Options{Auth: nopAuth{}})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { // stops the server's reaper and replica monitor goroutines
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			f.Error(err)
		}
	})
	f.Fuzz(func(t *testing.T, data []byte) {
		_, st, err := srv.readStartup(&bytesConn{r: bytes.NewReader(data)}, nil)
		if err == nil && st != nil && st.user == "" {
			t.Fatalf("startup accepted without a user: %+v", st)
		}
	})
}

// FuzzMsgReader frames arbitrary bytes as protocol messages.
func FuzzMsgReader(f *testing.F) {
	f.Add([]byte{'Q', 0, 0, 0, 13, 'S', 'E', 'L', 'E', 'C', 'T', ' ', '1', 0})
	f.Add([]byte{'S', 0, 0, 0, 4, 'X', 0, 0, 0, 4})
	f.Add([]byte{'P', 0, 0, 0, 3})
	f.Add([]byte{'d', 0x7f, 0xff, 0xff, 0xff})
	f.Add([]byte{'P', 0, 0, 0, 12, 's', 0, 'S', 'E', 'L', 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		m := newMsgReader(bytes.NewReader(data), 1<<16)
		w := bufio.NewWriter(io.Discard)
		for i := 0; ; i++ {
			typ, n, err := m.next()
			if err != nil {
				return
			}
			if n < 0 || n > 1<<16 {
				t.Fatalf("length %d out of bounds", n)
			}
			switch i % 3 {
			case 0:
				b, err := m.body()
				if err != nil {
					return
				}
				if len(b) != n {
					t.Fatalf("body %d bytes, header said %d", len(b), n)
				}
				switch typ {
				case 'Q':
					_, _ = queryText(b)
				}
			case 1:
				if err := m.forward(w); err != nil {
					return
				}
			case 2:
				_ = m.fullMessageBuffered()
			}
		}
	})
}

type nopAuth struct{}

func (nopAuth) Verify(_ context.Context, _, _, _ string) (auth.Identity, error) {
	return auth.Identity{}, &Error{Code: CodeInvalidPassword, Message: "no"}
}

// bytesConn is a net.Conn that reads from a byte slice and discards writes.
type bytesConn struct {
	net.Conn
	r *bytes.Reader
}

func (c *bytesConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c *bytesConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *bytesConn) Close() error                     { return nil }
func (c *bytesConn) SetDeadline(time.Time) error      { return nil }
func (c *bytesConn) SetWriteDeadline(time.Time) error { return nil }
func (c *bytesConn) RemoteAddr() net.Addr             { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }
