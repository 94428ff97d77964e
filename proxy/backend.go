package proxy

import (
	"bufio"
	"context"
	crand "crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"cascata/internal/sockio"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

// identSQL puts a client's identity in force with three parameters, so role
// names and claims are never spliced into SQL.
const identSQL = "SELECT pg_catalog.set_config('role', $1, false), pg_catalog.set_config('request.jwt.claims', $2, false), pg_catalog.set_config('request.jwt.claims_mac', $3, false)"

// identStmtName names identSQL where it is prepared once per backend (see
// clientState.setupBytes): on the backends of clients whose statement
// names the proxy translates, where no client can name it. Parsed anew at
// every identity switch, the statement cost PostgreSQL about 20 µs of CPU
// (a whole SELECT 1 costs it 26). Like the cached client statements
// (cs_<hex>), it is reached only by the proxy: no client name translates
// to it.
const identStmtName = "cs_ident"

// claimsSQL puts a client's claims in force where the backend's role is
// the client's already: one set_config fewer than identSQL. Most switches
// are between users of one role (authenticated), and the role is about a
// third of a switch's cost to PostgreSQL: a SELECT 1 costs it 10–12 µs of
// CPU alone, 18 with claimsSQL in front, 21 with identSQL (benchtool
// setup-cost, modes select1, claims-bound and ident-bound).
const claimsSQL = "SELECT pg_catalog.set_config('request.jwt.claims', $1, false), pg_catalog.set_config('request.jwt.claims_mac', $2, false)"

// claimsStmtName names claimsSQL where it is prepared once per backend,
// like identStmtName.
const claimsStmtName = "cs_claims"

// setStmtName names setSQL where it is prepared once per backend, like
// identStmtName.
const setStmtName = "cs_set"

// namedStmt is what the proxy knows of one of its named statements on a
// backend.
type namedStmt uint8

const (
	stmtAbsent   namedStmt = iota // never prepared here (a new connection)
	stmtPrepared                  // prepared here from the proxy's text
	// stmtUnknown: something may have dropped or replaced it (DEALLOCATE
	// ALL, DISCARD ALL, a unit scrubbed for state it may have left): it is
	// closed before it is prepared again.
	stmtUnknown
)

// idleCheckAfter: a backend whose server has been quiet this long is
// looked at (one peek at its socket, sockio.Pending) before a client gets
// it. Its own goroutine notices a server going away, but on a busy machine
// it may not have run yet, or may have reached its pool late, after the
// server's last words (the wait it arms then misses them). Quiet is
// counted from the end of the backend's last unit (heard), not from its
// return to the pool, so a late return is looked at too. Backends handed
// on at once, as under load, are not.
const idleCheckAfter = time.Millisecond

// backend is one hijacked server connection.
type backend struct {
	conn     net.Conn
	rd       *msgReader
	wr       *bufio.Writer
	pid      uint32
	secret   []byte
	addr     string // host:port, for cancel requests
	tlsConf  *tls.Config
	params   map[string]string
	identity string // key of the identity in force; "" = unknown or none
	// identStmt, claimsStmt and setStmt are what the proxy knows of
	// identStmtName, claimsStmtName and setStmtName here, guarded by the
	// lock of the session the backend is attached to.
	identStmt, claimsStmt, setStmt namedStmt
	created                        time.Time
	// The proxy-named statements prepared here (transaction mode),
	// guarded by the lock of the session the backend is attached to.
	stmtTable
	// settings are the client settings put in force here (see settings.go),
	// settingsKey their settingsKey.
	settings    map[string]string
	settingsKey string
	// claimGUCs are the legacy request.jwt.claim.* settings in force here.
	claimGUCs map[string]string
	poisoned  bool // state unknown after a failed setup: closed when released
	// gate draws the names of the setup's gate statements (see setupPlan):
	// seeded from crypto/rand, so no client can guess the next one.
	gate *rand.ChaCha8

	// The backend's own goroutine (serve) reads it for its whole life: it
	// waits on the socket while the backend sits idle in its pool, so a
	// server that goes away is noticed without probing the socket at each
	// acquire, and it relays the replies of each unit a client attaches.
	amu  sync.Mutex
	att  attachment  // the unit whose replies come next (att.ss nil: none)
	dead atomic.Bool // serve has returned (set with amu held): nothing can be attached
	// closed: close was called; nothing more is written to conn by the
	// pool (a session may still be finishing a write that fails).
	closed atomic.Bool
	// sock is the TCP socket, beneath TLS too (see waitIdle and gone):
	// waited on and looked at, never read through.
	sock syscall.RawConn
	// woke: the server spoke while the backend sat idle (waitIdle), so it
	// is going away; set before its goroutine reads what came.
	woke atomic.Bool
	// heard is when the server last ended a unit here (its ReadyForQuery,
	// Unix nanoseconds), see idleCheckAfter.
	heard atomic.Int64
	// unit is the backend's current unit once it is detached (see
	// detachLocked), used by the backend's goroutine only.
	unit unit
	// waitIdle's state, used by the backend's goroutine only.
	idleRead  func(uintptr) bool
	idleSS    *session
	idleUnit  *unit
	idleEnded bool
}

// forgetProxyStmts records that the proxy's named statements may have been
// dropped or replaced here (DEALLOCATE ALL, DISCARD ALL, a scrubbed unit).
func (b *backend) forgetProxyStmts() {
	b.identStmt, b.claimsStmt, b.setStmt = stmtUnknown, stmtUnknown, stmtUnknown
}

// attachment is a unit of a client on a backend: serve relays the backend's
// replies to ss, after swallowing those of setup.
type attachment struct {
	ss    *session
	be    *backend
	setup setupPlan // sent first; its replies are swallowed
}

// serve is the backend's reader goroutine; it returns once the connection
// is closed or the server spoke while no client held the backend.
func (b *backend) serve() {
	for {
		_ = b.rd.wait() // a failure shows again to whoever reads next
		b.amu.Lock()
		a := b.att
		b.att = attachment{}
		if a.ss == nil {
			// Nothing was asked: the server is going away (a FATAL before
			// it closes, or the close itself), or the pool closed it.
			b.dead.Store(true)
			b.amu.Unlock()
			b.close()
			return
		}
		b.amu.Unlock()
		ss := a.ss
		u := ss.relay(a)
		if u == nil {
			ss.relays.Done()
			continue
		}
		ss.settleUnit(u)
		if !u.clean || !b.waitIdle(ss, u) {
			ss.endUnit(u)
			ss.relays.Done()
		}
	}
}

// waitIdle ends unit u of ss (the backend goes back to its pool) and waits
// until the server speaks or the connection closes. The wait is armed
// before the backend can reach another client, so no reply can slip past
// it, and it starts without the read that an idle socket would answer with
// EAGAIN. Under TLS it waits on the socket beneath, whose records the TLS
// layer reads afterwards. It reports false, without ending the unit, when
// it cannot wait this way (bytes already buffered, a closed socket) or
// the server spoke before the wait was armed (onIdleRead).
func (b *backend) waitIdle(ss *session, u *unit) bool {
	if b.sock == nil || b.rd.buffered() {
		return false
	}
	b.idleSS, b.idleUnit, b.idleEnded = ss, u, false
	_ = b.sock.Read(b.idleRead)
	ended := b.idleEnded
	b.idleSS, b.idleUnit = nil, nil
	return ended
}

// onIdleRead is waitIdle's callback, called first once the poller's
// readiness is reset (it ends the unit and parks), then when the socket is
// readable. It is made once per backend (b.idleRead), not per unit.
func (b *backend) onIdleRead(uintptr) bool {
	if !b.idleEnded {
		// A unit that ends late (its goroutine held up on a busy machine)
		// may have missed the server's last words: they came before this
		// wait was armed and will not wake it. Such a backend goes back
		// marked (woke) and its goroutine reads them.
		if b.lastWordsWaiting() {
			b.woke.Store(true)
			return true
		}
		b.idleEnded = true
		b.woke.Store(false)
		b.idleSS.endUnit(b.idleUnit)
		b.idleSS.relays.Done()
		return false
	}
	// Readable: a client's replies, or, in the pool, the server going
	// away. From here the bytes may leave the socket at any moment; woke
	// tells gone what Pending would no longer see.
	b.woke.Store(true)
	return true
}

// lastWordsWaiting reports whether bytes from the server, or its close,
// wait on the socket of a backend whose server has been quiet for
// idleCheckAfter or more (sock must be set): a server does not speak
// between units unless it is going away.
func (b *backend) lastWordsWaiting() bool {
	return time.Now().UnixNano()-b.heard.Load() >= int64(idleCheckAfter) && sockio.Pending(b.sock)
}

// attach hands the next unit's replies to serve; it must precede the write
// that asks for them. It fails when the backend is already gone.
func (b *backend) attach(a attachment) bool {
	b.amu.Lock()
	defer b.amu.Unlock()
	if b.dead.Load() {
		return false
	}
	b.att = a
	return true
}

// dialBackend connects with pgconn (TLS and SCRAM as the URL says), prepares
// the identity statement, then takes over the raw connection.
func dialBackend(ctx context.Context, cfg *pgconn.Config) (*backend, error) {
	pc, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to %s:%d: %w", cfg.Host, cfg.Port, err)
	}
	var seed [32]byte
	if _, err := crand.Read(seed[:]); err != nil {
		pc.Close(ctx)
		return nil, fmt.Errorf("seed the gate names: %w", err)
	}
	// pgconn may read in the background (after a slow write): SyncConn
	// stops that, so nothing reads the socket but the backend's goroutine.
	if err := pc.SyncConn(ctx); err != nil {
		pc.Close(ctx)
		return nil, fmt.Errorf("sync backend: %w", err)
	}
	hj, err := pc.Hijack()
	if err != nil {
		pc.Close(ctx)
		return nil, fmt.Errorf("hijack backend: %w", err)
	}
	b := &backend{
		sock:    sockio.Socket(hj.Conn),
		conn:    hj.Conn,
		rd:      newMsgReader(hj.Conn, 1<<30+1024),
		wr:      bufio.NewWriterSize(hj.Conn, ioBufSize),
		pid:     hj.PID,
		secret:  hj.SecretKey,
		addr:    net.JoinHostPort(cfg.Host, fmt.Sprint(cfg.Port)),
		tlsConf: cfg.TLSConfig,
		params:  hj.ParameterStatuses,
		created: time.Now(),
		gate:    rand.NewChaCha8(seed),
	}
	b.idleRead = b.onIdleRead
	return b, nil
}

// withRawSocket returns a copy of cfg dialing sockets that make raw read
// and write calls (package sockio), under TLS too; pools dial with it.
func withRawSocket(cfg *pgconn.Config) *pgconn.Config {
	c := cfg.Copy()
	dial := c.DialFunc
	c.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return sockio.New(conn), nil
	}
	return c
}

func (b *backend) close() {
	b.closed.Store(true)
	_ = b.conn.Close()
}

// cancel asks the server to cancel what this backend runs, and waits until
// the server has taken the request (it closes the socket), so the cancel
// cannot land on a later transaction of another client.
func (b *backend) cancel(ctx context.Context) error {
	d := net.Dialer{Timeout: 5 * time.Second}
	c, err := d.DialContext(ctx, "tcp", b.addr)
	if err != nil {
		return fmt.Errorf("dial for cancel: %w", err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	} else {
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	}
	if b.tlsConf != nil {
		// The server wants TLS before any other message.
		if _, err := c.Write(mustEncode(&pgproto3.SSLRequest{})); err != nil {
			return fmt.Errorf("ssl request for cancel: %w", err)
		}
		var resp [1]byte
		if _, err := io.ReadFull(c, resp[:]); err != nil {
			return fmt.Errorf("ssl response for cancel: %w", err)
		}
		if resp[0] == encryptionYes {
			tc := tls.Client(c, b.tlsConf)
			if err := tc.HandshakeContext(ctx); err != nil {
				return fmt.Errorf("tls for cancel: %w", err)
			}
			c = tc
		}
	}
	msg := mustEncode(&pgproto3.CancelRequest{ProcessID: b.pid, SecretKey: b.secret})
	if _, err := c.Write(msg); err != nil {
		return fmt.Errorf("send cancel: %w", err)
	}
	var one [1]byte
	_, err = c.Read(one[:])
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("wait for cancel: %w", err)
	}
	return nil
}

// simpleQuery runs queries, pipelined, on an idle backend that no client
// holds and returns their rows as text (nil for NULL). The backend must be
// idle after them; the first error is returned.
func (b *backend) simpleQuery(sqls ...string) ([][]*string, error) {
	return b.simpleQueryTo(nil, sqls...)
}

// simpleQueryTo is simpleQuery on a backend a client holds between its
// transactions: notifications that arrive meanwhile are copied to
// notify (nil drops them).
func (b *backend) simpleQueryTo(notify *bufio.Writer, sqls ...string) ([][]*string, error) {
	_ = b.conn.SetDeadline(time.Now().Add(5 * time.Second))
	defer func() { _ = b.conn.SetDeadline(time.Time{}) }()
	for _, sql := range sqls {
		if err := writeMsg(b.wr, msgTypeQuery, append([]byte(sql), 0)); err != nil {
			return nil, err
		}
	}
	if err := b.wr.Flush(); err != nil {
		return nil, err
	}
	var rows [][]*string
	var qerr error
	left := len(sqls)
	for {
		typ, _, err := b.rd.next()
		if err != nil {
			return nil, err
		}
		switch typ {
		case msgTypeDataRow:
			body, err := b.rd.body()
			if err != nil {
				return nil, err
			}
			var dr pgproto3.DataRow
			if err := dr.Decode(body); err != nil {
				return nil, fmt.Errorf("decode row: %w", err)
			}
			row := make([]*string, len(dr.Values))
			for i, v := range dr.Values {
				if v != nil {
					s := string(v)
					row[i] = &s
				}
			}
			rows = append(rows, row)
		case msgTypeErrorResponse:
			body, err := b.rd.body()
			if err != nil {
				return nil, err
			}
			var er pgproto3.ErrorResponse
			_ = er.Decode(body)
			if qerr == nil {
				qerr = fmt.Errorf("server error %s: %s", er.Code, er.Message)
			}
		case msgTypeReadyForQuery:
			body, err := b.rd.body()
			if err != nil {
				return nil, err
			}
			if len(body) != 1 || body[0] != txIdle {
				return nil, errors.New("backend not idle after an internal query")
			}
			if left--; left > 0 {
				continue
			}
			return rows, qerr
		case msgTypeNotification:
			if notify == nil {
				if err := b.rd.skip(); err != nil {
					return nil, err
				}
			} else if err := b.rd.forward(notify); err != nil && !isNetWriteErr(err) {
				return nil, err
			}
		default:
			if err := b.rd.skip(); err != nil {
				return nil, err
			}
		}
	}
}

// gateName writes a fresh, unguessable statement name for a setup's gate.
func (b *backend) gateName(name *[gateNameLen]byte) {
	copy(name[:], gatePrefix)
	const hexdigits = "0123456789abcdef"
	for i := 0; i < 2; i++ {
		v := b.gate.Uint64()
		for j := 0; j < 16; j++ {
			name[len(gatePrefix)+16*i+j] = hexdigits[v&15]
			v >>= 4
		}
	}
}

const (
	gatePrefix  = "cascata_gate_"
	gateNameLen = len(gatePrefix) + 32
)
