package sockio

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	crand "crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"io"
	"math/big"
	"math/rand/v2"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			t.Error(err)
		}
		accepted <- c
	}()
	a, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b := <-accepted
	if b == nil {
		t.FailNow()
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a.(*net.TCPConn), b.(*net.TCPConn)
}

func TestUsesRawCallsOnlyOnTCP(t *testing.T) {
	a, _ := tcpPair(t)
	s, ok := New(a).(*conn)
	if !ok {
		t.Fatalf("New(TCP) = %T, want *conn", New(a))
	}
	if again := New(s); again != net.Conn(s) {
		t.Fatalf("New(New(TCP)) = %T, want the same conn", again)
	}
	if Raw(s) == nil || Raw(a) == nil {
		t.Fatal("Raw of a TCP connection is nil")
	}
	p, q := net.Pipe()
	defer p.Close()
	defer q.Close()
	if s := New(p); s != net.Conn(p) {
		t.Fatalf("New(pipe) = %T, want the pipe itself", s)
	}
	if Raw(p) != nil {
		t.Fatal("Raw of a pipe is not nil")
	}
}

// TLS over New's connections: the records go through the raw calls, both
// ways, whole.
// tlsPair is a TLS client and server over New's connections on loopback.
func tlsPair(t *testing.T) (cli, srv *tls.Conn) {
	a, b := tcpPair(t)
	key, err := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), DNSNames: []string{"sockio.test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(crand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(leaf)
	srv = tls.Server(New(b), &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}})
	cli = tls.Client(New(a), &tls.Config{ServerName: "sockio.test", RootCAs: roots})
	return cli, srv
}

func TestTLSOverRawCalls(t *testing.T) {
	cli, srv := tlsPair(t)
	data := make([]byte, 4<<20)
	for i := 0; i < len(data); i += 8 {
		binary.LittleEndian.PutUint64(data[i:], rand.Uint64())
	}
	echoed := make(chan error, 1)
	go func() { // the server sends back what it gets
		_, err := io.CopyN(srv, srv, int64(len(data)))
		echoed <- err
	}()
	sent := make(chan error, 1)
	go func() {
		_, err := cli.Write(data)
		sent <- err
	}()
	got := make([]byte, len(data))
	if _, err := io.ReadFull(cli, got); err != nil {
		t.Fatalf("read the echo: %v", err)
	}
	if err := <-sent; err != nil {
		t.Fatalf("client write: %v", err)
	}
	if err := <-echoed; err != nil {
		t.Fatalf("server echo: %v", err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("the echo differs from what was sent")
	}
	if v := cli.ConnectionState().Version; v < tls.VersionTLS12 {
		t.Fatalf("TLS version %x", v)
	}
}

// A write larger than both socket buffers must wait for the reader (EAGAIN
// mid-write) and still deliver every byte in order; reads that find nothing
// must wait for bytes rather than return empty.
func TestCarriesEveryByte(t *testing.T) {
	a, b := tcpPair(t)
	data := make([]byte, 16<<20)
	for i := 0; i < len(data); i += 8 {
		binary.LittleEndian.PutUint64(data[i:], rand.Uint64())
	}
	w, r := New(a), New(b)
	done := make(chan error, 1)
	go func() {
		// Chunks of uneven size, some written while the reader sleeps.
		rest := data
		for i := 0; len(rest) > 0; i++ {
			n := min(len(rest), 1+i*7919%(3<<20))
			m, err := w.Write(rest[:n])
			if err != nil || m != n {
				done <- errors.Join(err, errors.New("short write"))
				return
			}
			rest = rest[n:]
		}
		done <- a.CloseWrite()
	}()
	var got bytes.Buffer
	buf := make([]byte, 64<<10)
	for i := 0; ; i++ {
		if i%200 == 0 {
			time.Sleep(20 * time.Millisecond) // let the socket buffers fill
		}
		n, err := r.Read(buf)
		if n == 0 && err == nil {
			t.Fatal("Read returned 0 bytes and no error")
		}
		got.Write(buf[:n])
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("read after %d bytes: %v", got.Len(), err)
		}
	}
	if err := <-done; err != nil {
		t.Fatalf("write: %v", err)
	}
	if !bytes.Equal(got.Bytes(), data) {
		t.Fatalf("got %d bytes, want the %d written, in order", got.Len(), len(data))
	}
}

func TestErrors(t *testing.T) {
	t.Run("deadline", func(t *testing.T) {
		a, _ := tcpPair(t)
		_ = a.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		n, err := New(a).Read(make([]byte, 16))
		if n != 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("Read past the deadline = %d, %v; want 0, deadline exceeded", n, err)
		}
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("deadline error %v is not a net.Error timeout", err)
		}
	})
	t.Run("closed here", func(t *testing.T) {
		a, _ := tcpPair(t)
		r := New(a)
		a.Close()
		if _, err := r.Read(make([]byte, 16)); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Read on a closed conn = %v, want net.ErrClosed", err)
		}
		if _, err := New(a).Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Write on a closed conn = %v, want net.ErrClosed", err)
		}
	})
	t.Run("reset by peer", func(t *testing.T) {
		a, b := tcpPair(t)
		_ = b.SetLinger(0)
		if _, err := b.Write([]byte("unread")); err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
		if _, err := a.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		b.Close() // unread data and linger 0: RST
		time.Sleep(10 * time.Millisecond)
		r := New(a)
		buf := make([]byte, 16)
		var err error
		for range 3 { // the bytes sent before the reset may come first
			if _, err = r.Read(buf); err != nil {
				break
			}
		}
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("Read after a reset = %v, want ECONNRESET", err)
		}
		w := New(a)
		var werr error
		for range 3 {
			if _, werr = w.Write([]byte("after reset")); werr != nil {
				break
			}
		}
		if !errors.Is(werr, syscall.EPIPE) && !errors.Is(werr, syscall.ECONNRESET) {
			t.Fatalf("Write after a reset = %v, want EPIPE or ECONNRESET", werr)
		}
	})
}

// WaitReadable returns once bytes are there, leaves them to be read, and
// returns at the peer's close too; bytes that arrived before the wait
// began do not need a new readiness edge.
func TestWaitReadable(t *testing.T) {
	a, b := tcpPair(t)
	for name, c := range map[string]net.Conn{"raw": New(a), "plain": a} {
		if !CanWait(c) {
			t.Fatalf("%s: CanWait refuses a TCP connection", name)
		}
		done := make(chan error, 1)
		go func() { done <- WaitReadable(c) }()
		select {
		case err := <-done:
			t.Fatalf("%s: returned before any byte: %v", name, err)
		case <-time.After(50 * time.Millisecond):
		}
		if _, err := b.Write([]byte("xy")); err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		// The bytes are still there; a second wait returns at once.
		if err := WaitReadable(c); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 2)
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "xy" {
			t.Fatalf("%s: read %q, %v after the wait", name, buf, err)
		}
	}
	b.Close()
	if err := WaitReadable(New(a)); err != nil {
		t.Fatalf("at the peer's close: %v", err)
	}
	if n, err := New(a).Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("after the close: %d, %v", n, err)
	}
}

// Pending looks at a socket while another goroutine waits on it: false
// while nothing came, true once bytes or the peer's close are there, and
// the bytes are still there to read.
func TestPending(t *testing.T) {
	a, b := tcpPair(t)
	defer a.Close()
	c := New(b)
	defer c.Close()
	raw := Raw(c)
	waited := make(chan error, 1)
	go func() { waited <- WaitReadable(c) }() // holds the read side
	if Pending(raw) {
		t.Fatal("pending on a socket nothing was written to")
	}
	if _, err := a.Write([]byte("Z")); err != nil {
		t.Fatal(err)
	}
	waitPending(t, raw, true, "a written byte never showed as pending")
	if err := <-waited; err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != "Z" {
		t.Fatalf("read after Pending: %q %v, want the byte", buf[:n], err)
	}
	if Pending(raw) {
		t.Fatal("pending once the byte was read")
	}
	a.Close()
	waitPending(t, raw, true, "the peer's close never showed as pending")
}

// TestPendingUnderTLS: Socket finds the TCP socket beneath a TLS
// connection: nothing is pending there once the reader in the TLS layer
// took what came, and the peer's close shows as pending while nothing
// reads.
func TestPendingUnderTLS(t *testing.T) {
	cli, srv := tlsPair(t)
	defer cli.Close()
	shaken := make(chan error, 1)
	go func() { shaken <- srv.Handshake() }()
	if err := cli.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-shaken; err != nil {
		t.Fatal(err)
	}
	raw := Socket(cli)
	if raw == nil || Raw(cli) != nil {
		t.Fatalf("Socket %v, Raw %v: want the socket beneath, and no raw reads under TLS", raw, Raw(cli))
	}
	// A TLS 1.3 server may send tickets after the handshake: the client
	// reads them while it waits for the first record.
	got := make(chan string, 1)
	go func() {
		buf := make([]byte, 8)
		n, _ := cli.Read(buf)
		got <- string(buf[:n])
	}()
	waitPending(t, raw, false, "still pending: the reader never took what the handshake left")
	// The reader takes the record at once; what Pending must see is the
	// server's close that follows, while nothing reads.
	if _, err := srv.Write([]byte("Z")); err != nil {
		t.Fatal(err)
	}
	if s := <-got; s != "Z" {
		t.Fatalf("read %q, want the record", s)
	}
	if Pending(raw) {
		t.Fatal("pending once the record was read")
	}
	srv.Close()
	waitPending(t, raw, true, "the server's close never showed as pending beneath TLS")
}

// waitPending waits up to 5 s for Pending(raw) to report want.
func waitPending(t *testing.T, raw syscall.RawConn, want bool, failure string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for Pending(raw) != want {
		if time.Now().After(deadline) {
			t.Fatal(failure)
		}
		time.Sleep(time.Millisecond)
	}
}
