package main

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"runtime/pprof"
	"sort"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// This file holds what the transaction-pooling prototypes (pool-goroutine,
// pool-eventloop, pool-coro) share: their flags, the server connections
// dialled at start, the greeting every client gets, and the little framing
// they read. They are I/O-model prototypes, not proxies: they authenticate no client,
// parse nothing beyond message framing and route nowhere.

// Protocol codes of the untyped first message of a connection.
const (
	codeProtocol3  = 196608   // StartupMessage, protocol 3.0
	codeSSLRequest = 80877103 // answered 'N'
	codeGSSENC     = 80877104 // answered 'N'
	codeCancel     = 80877102 // CancelRequest: not forwarded by the prototypes
	maxStartupLen  = 10000
)

// poolConfig is what every prototype is started with.
type poolConfig struct {
	Listen   string // host:port clients connect to
	Target   string // host:port of PostgreSQL
	DB       string
	User     string
	Password string
	Role     string // SET ROLE on every server connection after login
	Size     int    // server connections
	// ClientTLS, when set, is the TLS configuration clients must connect
	// with (pool-eventloop and pool-coro).
	ClientTLS *tls.Config
	// ServerTLS makes the server connections TLS (sslmode=require;
	// pool-eventloop and pool-coro).
	ServerTLS bool
	// WaitTimeout, when set, is how long a client may wait for a server
	// before it is told so and closed, like PgBouncer's
	// query_wait_timeout (pool-coro only).
	WaitTimeout time.Duration
}

// runPrototype parses a prototype's flags and runs it until SIGTERM or
// -dur, under a CPU profile when -cpuprofile is given.
func runPrototype(name string, args []string, run func(context.Context, poolConfig) error) error {
	cfg, dur, profile, err := poolFlags(name, args)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, dur)
	defer cancel()
	stopProfile, err := startProfile(profile)
	if err != nil {
		return err
	}
	defer stopProfile()
	return run(ctx, cfg)
}

// poolFlags parses the flags common to the prototypes; the returned
// duration is how long the prototype runs, the string a CPU profile file.
func poolFlags(name string, args []string) (poolConfig, time.Duration, string, error) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	var c poolConfig
	fs.StringVar(&c.Listen, "listen", "", "host:port to listen on")
	fs.StringVar(&c.Target, "target", "", "host:port of PostgreSQL")
	fs.StringVar(&c.DB, "db", "bench", "database of the server connections")
	fs.StringVar(&c.User, "user", "authenticator", "login role of the server connections")
	passwordEnv := fs.String("password-env", "", "env var holding the login role's password")
	fs.StringVar(&c.Role, "role", "authenticated", "role set on every server connection (SET ROLE)")
	fs.IntVar(&c.Size, "pool", 20, "server connections")
	fs.DurationVar(&c.WaitTimeout, "wait-timeout", 0, "close a client that waits longer for a server (pool-coro; 0: no limit)")
	dur := fs.Duration("dur", time.Hour, "stop after this long")
	profile := fs.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	certFile := fs.String("tls-cert", "", "PEM certificate: clients must connect over TLS (with -tls-key)")
	keyFile := fs.String("tls-key", "", "PEM key of -tls-cert")
	serverSSL := fs.String("server-sslmode", "disable", "disable or require: TLS to PostgreSQL")
	if err := fs.Parse(args); err != nil {
		return c, 0, "", err
	}
	if (*certFile == "") != (*keyFile == "") {
		return c, 0, "", errors.New("-tls-cert and -tls-key go together")
	}
	if *certFile != "" {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			return c, 0, "", fmt.Errorf("client TLS: %w", err)
		}
		c.ClientTLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	switch *serverSSL {
	case "disable":
	case "require":
		c.ServerTLS = true
	default:
		return c, 0, "", fmt.Errorf("-server-sslmode %q: disable or require", *serverSSL)
	}
	if *passwordEnv != "" {
		c.Password = os.Getenv(*passwordEnv)
	}
	if c.Listen == "" || c.Target == "" || c.Size < 1 {
		return c, 0, "", errors.New("-listen and -target are required, -pool at least 1")
	}
	return c, *dur, *profile, nil
}

// serverConn is one pooled server connection after login and SET ROLE.
type serverConn struct {
	conn   net.Conn  // a *tls.Conn over under when the config asks for TLS
	under  *loopConn // beneath the TLS layer, for the event loop; nil without TLS
	pid    uint32
	secret []byte
	params map[string]string
}

// dialServer logs in with pgconn (SCRAM as configured on the server), runs
// SET ROLE and takes the socket over.
func dialServer(ctx context.Context, c poolConfig) (*serverConn, error) {
	cfg, err := connConfig(c.Target, c.DB, c.User, c.Password)
	if err != nil {
		return nil, fmt.Errorf("server config: %w", err)
	}
	var under *loopConn
	if c.ServerTLS {
		// pgconn runs the TLS handshake over a loopConn, which passes
		// through to the socket until the event loop takes it over.
		cfg.TLSConfig = &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12} // sslmode=require verifies nothing either
		cfg.Fallbacks = nil
		dial := cfg.DialFunc
		cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
			tcp, err := dial(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			under = newLoopConn(tcp)
			return under, nil
		}
	}
	pc, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("server login: %w", err)
	}
	if c.Role != "" {
		sql := "SET ROLE " + quoteIdent(c.Role)
		if _, err := pc.Exec(ctx, sql).ReadAll(); err != nil {
			_ = pc.Close(ctx)
			return nil, fmt.Errorf("server %s: %w", sql, err)
		}
	}
	h, err := pc.Hijack()
	if err != nil {
		_ = pc.Close(ctx)
		return nil, fmt.Errorf("server hijack: %w", err)
	}
	if err := h.Conn.SetDeadline(time.Time{}); err != nil {
		_ = h.Conn.Close()
		return nil, fmt.Errorf("server deadline: %w", err)
	}
	if c.ServerTLS {
		if _, ok := h.Conn.(*tls.Conn); !ok || under == nil {
			_ = h.Conn.Close()
			return nil, errors.New("server connection: TLS asked for and not in use")
		}
	}
	return &serverConn{conn: h.Conn, under: under, pid: h.PID, secret: h.SecretKey, params: h.ParameterStatuses}, nil
}

// quoteIdent quotes a role name for SQL.
func quoteIdent(s string) string {
	out := []byte{'"'}
	for i := 0; i < len(s); i++ {
		if s[i] == '"' {
			out = append(out, '"')
		}
		out = append(out, s[i])
	}
	return string(append(out, '"'))
}

// sendCancel asks PostgreSQL to cancel what the server connection runs
// (a CancelRequest on a new connection).
func sendCancel(ctx context.Context, target string, s *serverConn) error {
	d := net.Dialer{Timeout: 5 * time.Second}
	c, err := d.DialContext(ctx, "tcp", target)
	if err != nil {
		return fmt.Errorf("cancel: dial: %w", err)
	}
	defer c.Close()
	msg := make([]byte, 12, 12+len(s.secret))
	binary.BigEndian.PutUint32(msg[0:], uint32(12+len(s.secret)))
	binary.BigEndian.PutUint32(msg[4:], codeCancel)
	binary.BigEndian.PutUint32(msg[8:], s.pid)
	msg = append(msg, s.secret...)
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(msg); err != nil {
		return fmt.Errorf("cancel: write: %w", err)
	}
	// The server closes the connection once it has taken the request.
	var b [1]byte
	_, _ = c.Read(b[:])
	return nil
}

// greeting is what every client gets after its StartupMessage:
// AuthenticationOk, the server's ParameterStatus messages, a BackendKeyData
// (not usable for cancelling: the prototypes forward no CancelRequest) and
// ReadyForQuery 'I'.
func greeting(params map[string]string) []byte {
	msg := func(b []byte, typ byte, body []byte) []byte {
		b = append(b, typ, 0, 0, 0, 0)
		binary.BigEndian.PutUint32(b[len(b)-4:], uint32(len(body)+4))
		return append(b, body...)
	}
	b := msg(nil, 'R', []byte{0, 0, 0, 0})
	keys := make([]string, 0, len(params))
	for k := range params {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		body := append(append(append([]byte(k), 0), params[k]...), 0)
		b = msg(b, 'S', body)
	}
	b = msg(b, 'K', []byte{0, 0, 0, 1, 0, 0, 0, 1})
	return msg(b, 'Z', []byte{'I'})
}

// errorResponse is a FATAL ErrorResponse with SQLSTATE code and text.
func errorResponse(code, text string) []byte {
	body := []byte{'S'}
	body = append(body, "FATAL\x00"...)
	body = append(body, 'C')
	body = append(body, code...)
	body = append(append(body, 0, 'M'), text...)
	body = append(body, 0, 0)
	b := []byte{'E', 0, 0, 0, 0}
	binary.BigEndian.PutUint32(b[1:], uint32(len(body)+4))
	return append(b, body...)
}

// startupKind tells what an untyped first message p (complete, length
// included) asks for.
func startupKind(p []byte) uint32 {
	if len(p) < 8 {
		return 0
	}
	return binary.BigEndian.Uint32(p[4:8])
}

// startupLen is the length of the untyped message at the start of p, or 0
// while fewer than 4 bytes are in; -1 for a length out of range.
func startupLen(p []byte) int {
	if len(p) < 4 {
		return 0
	}
	n := int(binary.BigEndian.Uint32(p))
	if n < 8 || n > maxStartupLen {
		return -1
	}
	return n
}

// rollbackQuery ends a transaction a departed client left open.
var rollbackQuery = []byte{'Q', 0, 0, 0, 13, 'R', 'O', 'L', 'L', 'B', 'A', 'C', 'K', 0}

// syncMsg ends an extended-protocol batch a departed client left unfinished.
var syncMsg = []byte{'S', 0, 0, 0, 4}

// cleaning is how far the cleaning of a server a client left has gone:
// once every reply it owed is read, Sync ends an unfinished
// extended-protocol batch and ROLLBACK an open transaction, each at most
// once, until the server stands outside any transaction.
type cleaning struct{ synced, rolledBack bool }

// next is the step to take once every reply owed is in (t.pending is 0,
// the server between messages): done when the server may be pooled;
// otherwise the message to send, already counted as owed in t; an error
// when Sync and ROLLBACK were both tried and the server is still not idle.
func (c *cleaning) next(t *txn) (msg []byte, done bool, err error) {
	switch {
	case t.status == 'I':
		return nil, true, nil
	case t.status == 0 && !c.synced:
		c.synced, msg = true, syncMsg
	case t.status != 0 && !c.rolledBack:
		c.rolledBack, msg = true, rollbackQuery
		t.status = 0
	default:
		return nil, false, fmt.Errorf("transaction status %q after sync and rollback", t.status)
	}
	t.pending++
	return msg, false, nil
}

// frames follows the message framing (1-byte type, 4-byte length) of one
// direction of a connection across reads of any size.
type frames struct {
	hdr    [5]byte
	nhdr   int  // header bytes of the current message seen
	rest   int  // body bytes of the current message still to come
	wantZ  bool // the next body byte is a ReadyForQuery status
	broken bool // a length out of range: the stream cannot be followed
}

// atBoundary reports whether the stream stands between two messages.
func (f *frames) atBoundary() bool { return f.nhdr == 0 && f.rest == 0 && !f.broken }

// txn is what a server connection's attachment needs to know: replies
// still owed and the last transaction status.
type txn struct {
	pending int  // Query, Sync and FunctionCall messages sent and not yet answered by ReadyForQuery
	status  byte // status of the last ReadyForQuery since the client last sent something; 0 if none
}

// done reports whether the server may go back to the pool: every request
// answered, outside a transaction, between messages.
func (t *txn) done(server *frames) bool {
	return t.pending == 0 && t.status == 'I' && server.atBoundary()
}

// replied reports whether the server owes nothing (the client may be in a
// transaction and think).
func (t *txn) replied(server *frames) bool {
	return t.pending == 0 && t.status != 0 && server.atBoundary()
}

// fromServer walks bytes the server sent, counting ReadyForQuery.
func (f *frames) fromServer(p []byte, t *txn) {
	for i := 0; i < len(p); {
		if f.rest > 0 {
			if f.wantZ {
				f.wantZ = false
				t.status = p[i]
				if t.pending > 0 {
					t.pending--
				}
			}
			n := min(f.rest, len(p)-i)
			f.rest -= n
			i += n
			continue
		}
		n := copy(f.hdr[f.nhdr:], p[i:])
		f.nhdr += n
		i += n
		if f.nhdr < 5 {
			return
		}
		f.nhdr = 0
		size := int(binary.BigEndian.Uint32(f.hdr[1:])) - 4
		if size < 0 {
			f.broken = true
			return
		}
		f.rest = size
		f.wantZ = f.hdr[0] == 'Z' && size > 0
	}
}

// fromClient walks bytes a client sent, counting the messages that ask for
// a ReadyForQuery; it returns how many of p's bytes go to the server (all
// but a Terminate and what follows it) and whether the client said
// Terminate.
func (f *frames) fromClient(p []byte, t *txn) (forward int, terminate bool) {
	if len(p) > 0 {
		t.status = 0
	}
	for i := 0; i < len(p); {
		if f.rest > 0 {
			n := min(f.rest, len(p)-i)
			f.rest -= n
			i += n
			continue
		}
		start := i - f.nhdr
		n := copy(f.hdr[f.nhdr:], p[i:])
		f.nhdr += n
		i += n
		if f.nhdr < 5 {
			return len(p), false
		}
		f.nhdr = 0
		size := int(binary.BigEndian.Uint32(f.hdr[1:])) - 4
		if size < 0 {
			f.broken = true
			return len(p), false
		}
		f.rest = size
		switch f.hdr[0] {
		case 'Q', 'S', 'F':
			t.pending++
		case 'X':
			f.rest = 0
			// A Terminate whose header began in an earlier read has
			// partly gone to the server: that stream is spoilt.
			f.broken = start < 0
			return max(start, 0), true
		}
	}
	return len(p), false
}

// startProfile starts a CPU profile written to path ("" for none); the
// returned function stops it.
func startProfile(path string) (func(), error) {
	if path == "" {
		return func() {}, nil
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	return func() {
		pprof.StopCPUProfile()
		_ = f.Close()
	}, nil
}
