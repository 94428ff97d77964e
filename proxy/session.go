package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"cascata/auth"
	"cascata/internal/sockio"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/jackc/puddle/v2"
)

// session is one client connection after login. Two goroutines serve it: run
// reads the client and writes to the attached backend; the backend's own
// goroutine (backend.serve) reads it and writes to the client. A backend is
// attached from the first message that needs one until ReadyForQuery 'I'
// with nothing left in flight (transaction mode) or until the client leaves
// (session mode). A client idle with no backend attached has neither: its
// session parks (park) and a new goroutine serves it when it speaks.
type session struct {
	srv  *Server
	conn net.Conn
	rd   *msgReader // client side
	wmu  sync.Mutex // guards wr and every write to the client
	wr   *bufio.Writer
	ref  string
	// clientState is who the client is and the session settings it
	// carries from backend to backend (setup.go).
	clientState
	params      map[string]string
	sessionMode bool // the client holds its backend until it leaves
	// routedSession: a session-mode project with replicas. The session
	// starts like transaction mode (reads may go to a replica, names are
	// translated) and takes a dedicated primary backend at its first
	// statement that needs session state (a write, a temporary table, a
	// lock, LISTEN, a SET ...): from then on it is a session-mode session.
	routedSession bool
	pinPending    bool // a routed session must pin at its next primary backend
	// txMode: transaction mode (neither session mode nor a routed session).
	txMode    bool
	keyPID    uint32
	keySecret []byte
	metrics   *projectMetrics

	mu   sync.Mutex
	cond *sync.Cond // broadcast at every change of phase, and when a write or a reply lets a waiter go on
	// phase is where the unit stands (phase.go); setPhase moves it.
	phase        phase
	be           *backend
	res          *puddle.Resource[*backend]
	pl           *pool
	proj         *project
	pending      int  // Sync and Query messages forwarded and not yet answered
	dirty        bool // messages forwarded since the last Sync
	writing      bool // the client goroutine is writing to the backend
	txStatus     byte
	copyIn       bool
	identPending bool        // identity applied inline in this unit: unknown until the backend is detached
	clientGone   atomic.Bool // the client left; the backend is being cleaned (set with mu held)
	drainFailed  bool        // an error happened while cleaning
	pendingErr   error       // backend lost mid-batch: told at the next Sync or Query
	stopping     bool        // server shutdown: close when idle

	// fd is the client's socket for the parking lot (-1: the session never
	// parks: TLS, or no lot), wake starts resume when it is readable.
	fd   int
	wake func()

	// translator maps the client's statement names to the backends' and
	// says what to do with each reply (translator.go), guarded by mu.
	translator

	// Routing (transaction mode).
	trusted      bool        // the role may run DO and CREATE FUNCTION
	routePrimary bool        // SET cascata.route = 'primary'
	beReplica    bool        // the attached backend is a replica
	unitWrites   bool        // the unit on the primary may have written
	lastWriteLSN uint64      // primary WAL position after the client's last write
	unitGUCs     []string    // settings changed in the running unit
	unitState    bool        // the running unit may leave session state: scrub at release
	unitKeeps    bool        // the running unit may create state the client keeps: look at its end (pin.go)
	unitDDL      bool        // the running unit has DDL: the schema epoch moves again at its end
	projRun      *projectRun // the project's shared run-time state (schema epoch, pins)
	pinned       bool        // the client keeps its backend for its session state (pin.go)
	pinSlot      *pinCount   // the project's pin counter the client holds a slot of
	batch        []byte      // extended-protocol messages held until Sync/Flush to route the batch whole
	held         []extMsg    // the held messages, decoded (views of batch)
	// A read unit on a replica whose replica dies before any reply reached
	// the client is run again on the primary (see retryOnPrimary).
	replay    []byte      // the unit's bytes as sent (without identity/settings)
	replayQ   [2][]queued // parseQ and closeQ right after they were sent
	replayOK  bool        // the unit is one send and may be replayed
	replayRaw []byte      // the client's messages of a unit whose translation named statements (replayNamed)
	setupBuf  []byte      // identity and settings of a new unit (client goroutine)
	// lastPool is the primary pool of the last unit (client goroutine only).
	lastPool    *pool
	lastPoolURL string
	lastPoolCfg *pgconn.Config
	beTarget    *replicaTarget // the replica of the attached backend

	skipToSync bool // client side: an extended batch failed locally
	// relays counts the units attached to a backend whose relay has not
	// returned yet; the session ends after them.
	relays  sync.WaitGroup
	scratch []byte // encoding buffer for writes to the client, under wmu

	// Idle buffers (see waitForClient). seen is the server's sweep count
	// when the client goroutine last waited for its client.
	seen    atomic.Int64
	nmu     sync.Mutex
	waiting bool // blocked for the next message header (under nmu)
	nudged  bool // a read deadline in the past is set (under nmu)
}

func newSession(s *Server, c net.Conn, rd *msgReader, proj *project, ref string, id auth.Identity, params map[string]string) *session {
	rd.maxBody = s.opts.MaxMessageBytes
	ss := &session{
		srv:           s,
		conn:          c,
		rd:            rd,
		ref:           ref,
		clientState:   newClientState(id, macOf(proj.cfg.ClaimsMAC, id.ClaimsJSON), legacyClaims(proj.cfg.LegacyClaimGUCs, id.ClaimsJSON), startupSettings(params)),
		params:        params,
		sessionMode:   proj.cfg.SessionMode && len(proj.replicas) == 0,
		routedSession: proj.cfg.SessionMode && len(proj.replicas) > 0,
		txMode:        !proj.cfg.SessionMode,
		projRun:       proj.run,
		metrics:       proj.metrics,
		txStatus:      txIdle,
		translator:    newTranslator(s.opts.MaxPreparedStatements, &proj.run.schema),
		trusted:       slices.Contains(proj.cfg.TrustedRoles, id.Role),
	}
	ss.cond = sync.NewCond(&ss.mu)
	rd.releasable(c, s.readers)
	ss.fd = -1
	if rc := sockio.Raw(c); rc != nil && s.lot != nil && rd.src != nil {
		_ = rc.Control(func(fd uintptr) { ss.fd = int(fd) })
		ss.wake = func() { go ss.resume() }
	}
	return ss
}

// park hands the idle session's socket to the server's parking lot and
// reports whether it did; the calling goroutine must then return without
// touching the session, which resume serves again on a goroutine of its
// own. Only a session with nothing under way parks: no backend attached
// (session mode and pinned clients keep theirs, which may speak at any
// time), nothing forwarded or held, not shutting down. The read buffer has
// gone back already (the sweep's nudge).
func (ss *session) park() bool {
	if ss.fd < 0 || ss.rd.r != nil {
		return false // no lot, or bytes were buffered when nudged
	}
	ss.mu.Lock()
	defer ss.mu.Unlock()
	// The lock orders this against shutdown, which sets stopping and then
	// unparks: either this sees stopping or shutdown finds the socket parked.
	if ss.phase != phaseIdle || ss.res != nil || ss.stopping || ss.pending > 0 || ss.dirty || ss.writing ||
		ss.copyIn || len(ss.batch) > 0 || ss.skipToSync {
		return false
	}
	return ss.srv.lot.Park(ss.fd, ss.wake) == nil
}

// unpark takes the session's socket back from the parking lot, if it is
// there, and serves the session again; shutdown and kill call it before
// they close the connection, which a parked session would not notice.
func (ss *session) unpark() {
	if ss.fd >= 0 && ss.srv.lot.Unpark(ss.fd) {
		go ss.resume()
	}
}

// resume serves a parked session again until it ends or parks again, and
// releases what handle would have when it ends.
func (ss *session) resume() {
	parked := false
	defer func() {
		ss.srv.logPanic(recover(), "project", ss.ref)
		if !parked {
			ss.srv.clientGone(ss.conn)
		}
	}()
	parked = ss.serve()
}

// lockOut locks the client's writer (wmu), taking a buffer for it when the
// idle session gave its own back.
func (ss *session) lockOut() {
	ss.wmu.Lock()
	if ss.wr == nil {
		ss.wr = ss.srv.writers.get()
		ss.wr.Reset(ss.conn)
	}
}

// Buffers of idle clients. A client waiting between transactions would
// hold a 32 KiB read and a 32 KiB write buffer, whose touched pages stay
// resident. The server's sweep (Server.sweepIdle) finds sessions that have
// waited for their client a whole sweep interval: it releases the writer
// (releaseOut) and wakes the client goroutine out of its blocked read with a
// read deadline in the past (nudge); the goroutine gives its read buffer
// back and waits for the next bytes without one (msgReader.acquire). The
// path of a busy client stays as it was: two uncontended locks per message.

// waitForClient marks the client goroutine as blocked for the next message
// header, the only read a nudge may interrupt: the body of the message
// before was consumed, so a timeout there loses nothing.
func (ss *session) waitForClient() {
	ss.nmu.Lock()
	ss.waiting = ss.rd.taken && ss.rd.pool != nil
	ss.nmu.Unlock()
	ss.seen.Store(ss.srv.sweeps.Load())
}

// heardClient ends waitForClient. It reports whether err is the nudge's
// timeout, in which case the read buffer has gone back when nothing was
// buffered, and the caller reads again.
func (ss *session) heardClient(err error) bool {
	ss.nmu.Lock()
	nudged := ss.nudged
	ss.waiting, ss.nudged = false, false
	if nudged {
		_ = ss.conn.SetReadDeadline(time.Time{})
	}
	ss.nmu.Unlock()
	if !nudged || !errors.Is(err, os.ErrDeadlineExceeded) {
		return false
	}
	ss.rd.release()
	return true
}

// nudge wakes a client goroutine blocked for its client's next message so
// that it gives its read buffer back (sweepIdle).
func (ss *session) nudge() {
	ss.nmu.Lock()
	if ss.waiting && !ss.nudged && ss.rd.holding.Load() {
		ss.nudged = true
		_ = ss.conn.SetReadDeadline(time.Unix(1, 0))
	}
	ss.nmu.Unlock()
}

// releaseOut gives the writer's buffer back when no backend is attached
// (an attached one, in session mode or pinned, may write at any time) and
// nothing waits in it. A writer busy right now is left alone: it is
// released at the next sweep.
func (ss *session) releaseOut() {
	ss.mu.Lock()
	attached := ss.be != nil
	ss.mu.Unlock()
	if attached || !ss.wmu.TryLock() {
		return
	}
	if ss.wr != nil && ss.wr.Buffered() == 0 {
		ss.wr.Reset(nil)
		ss.srv.writers.put(ss.wr)
		ss.wr = nil
	}
	ss.wmu.Unlock()
}

// greet finishes the startup: AuthenticationOk, the server's parameters,
// the synthetic BackendKeyData and ReadyForQuery.
func (ss *session) greet(ctx context.Context) error {
	if enc := startupEncoding(ss.params); enc != "" && !isUTF8(enc) {
		return &Error{Code: "22023", Fatal: true, Message: "client_encoding " + enc + " is not supported; cascata speaks UTF8"}
	}
	// Startup settings are put in force with set_config, so they pass the
	// same guard as a SET statement would: options=-c role=... is refused.
	for name, v := range ss.settings {
		stmt := `SET "` + strings.ReplaceAll(name, `"`, `""`) + `" TO '` + strings.ReplaceAll(v, "'", "''") + `'`
		if r := ss.classify(stmt, false); r.refused != nil {
			msg := r.refused.Error()
			var pe *Error
			if errors.As(r.refused, &pe) {
				msg = pe.Message // its SQLSTATE is the error's own
			}
			return &Error{Code: CodeInsufficientPrivs, Fatal: true, Message: "startup parameter " + name + " refused: " + msg}
		}
	}
	params, err := ss.serverParams(ctx)
	if err != nil {
		return err
	}
	for name, v := range ss.settings {
		for k := range params {
			if strings.EqualFold(k, name) {
				params[k] = v // the client's own value, as PostgreSQL would report it
			}
		}
	}
	params["application_name"] = ss.params["application_name"]
	params["client_encoding"] = "UTF8"
	params["session_authorization"] = ss.ident.Role
	params["is_superuser"] = "off"
	ss.lockOut() // a shutdown may write to this client concurrently
	defer ss.wmu.Unlock()
	w := ss.wr
	var buf []byte
	if buf, err = encodeTo(w, &pgproto3.AuthenticationOk{}, buf); err != nil {
		return err
	}
	for k, v := range params {
		if buf, err = encodeTo(w, &pgproto3.ParameterStatus{Name: k, Value: v}, buf); err != nil {
			return err
		}
	}
	if _, err = encodeTo(w, &pgproto3.BackendKeyData{ProcessID: ss.keyPID, SecretKey: ss.keySecret}, buf); err != nil {
		return err
	}
	if _, err := w.Write(rfq(txIdle)); err != nil {
		return err
	}
	return w.Flush()
}

// serverParams returns the ParameterStatus set of the project's primary,
// dialing a backend the first time.
func (ss *session) serverParams(ctx context.Context) (map[string]string, error) {
	proj := ss.srv.project(ss.ref)
	if proj == nil {
		return nil, fatalError(CodeInvalidCatalog, "project %q does not exist", ss.ref)
	}
	pl, err := ss.srv.pools.get(proj, proj.cfg.DatabaseURL, proj.primary)
	if err != nil {
		return nil, err
	}
	if p := pl.params.Load(); p != nil {
		return copyParams(*p), nil
	}
	res, err := pl.acquireBackend(&waitCtx{ctx: ctx})
	if err != nil {
		return nil, &Error{Code: CodeConnectionFailure, Fatal: true, Message: "could not connect to the project's database", Err: err}
	}
	params := copyParams(res.Value().params)
	pl.release(res)
	return params, nil
}

func copyParams(p map[string]string) map[string]string {
	out := make(map[string]string, len(p)+4)
	for k, v := range p {
		out[k] = v
	}
	return out
}

func isUTF8(enc string) bool {
	e := strings.ToLower(strings.NewReplacer("-", "", "_", "", "'", "").Replace(enc))
	return e == "utf8" || e == "unicode"
}

// run is the client goroutine. It serves the client until it leaves, or
// reports true when the session has parked: an idle client then has no
// goroutine (and no stack) until it speaks, when resume serves it on a new
// one; the session owns what handle held (the connection, the client count,
// the server's wait group entry) and releases it when it ends.
func (ss *session) run() bool {
	ss.metrics.clients.Inc()
	return ss.serve()
}

// serve reads the client's messages on the calling goroutine until the
// client leaves (the session ends here) or the session parks.
func (ss *session) serve() (parked bool) {
	defer func() {
		if !parked {
			ss.projRun.clients.Add(-1) // counted at login; before finish releases the backend (shouldYield)
			ss.finish()
			ss.metrics.clients.Dec()
			ss.srv.unregister(ss)
		}
	}()
	for {
		// A message already buffered (a Bind behind its Parse) needs no
		// read that a nudge may interrupt, so none of its bookkeeping.
		buffered := ss.rd.nextBuffered()
		if !buffered {
			ss.waitForClient()
		}
		typ, n, err := ss.rd.next()
		if !buffered && ss.heardClient(err) {
			// Nudged: the read buffer went back; the goroutine too, if
			// the session can park.
			if ss.park() {
				return true
			}
			continue
		}
		if err != nil {
			var tooLarge *errMessageTooLarge
			if errors.As(err, &tooLarge) {
				ss.protocolViolation(tooLarge)
			}
			return false
		}
		if ss.skipToSync && typ != msgTypeSync {
			continue // the body is skipped by the next call to next
		}
		if (typ == msgTypeSync || typ == msgTypeFlush) && n != 0 {
			ss.protocolViolation(errors.New("invalid " + string(typ) + " message: unexpected body"))
			return false
		}
		switch typ {
		case msgTypeTerminate:
			return false
		case msgTypeSync:
			if err := ss.onSync(); err != nil {
				return false
			}
		case msgTypeFlush:
			if err := ss.onFlush(); err != nil {
				return false
			}
		case msgTypeQuery:
			if err := ss.onQuery(); err != nil {
				return false
			}
		case msgTypeParse, msgTypeBind, msgTypeDescribe, msgTypeClose, msgTypeExecute:
			if err := ss.onExtended(typ); err != nil {
				return false
			}
		case msgTypeFunctionCall:
			if err := ss.onFunctionCall(); err != nil {
				return false
			}
		case msgTypeCopyData, msgTypeCopyDone, msgTypeCopyFail:
			if err := ss.forwardCopy(typ); err != nil {
				return false
			}
		default:
			ss.protocolViolation(fmt.Errorf("invalid frontend message type %q", typ))
			return false
		}
	}
}

// onSync ends an extended-protocol batch.
func (ss *session) onSync() error {
	_ = ss.rd.skip()
	if len(ss.batch) > 0 {
		return ss.flushBatch(msgTypeSync)
	}
	if ss.skipToSync {
		ss.skipToSync = false
		ss.writeLocal(nil, ss.currentStatus())
		return nil
	}
	ss.mu.Lock()
	if perr := ss.pendingErr; perr != nil && ss.be == nil {
		ss.pendingErr = nil
		ss.mu.Unlock()
		ss.writeLocal(toErrorResponse(perr, false), txIdle)
		return nil
	}
	be := ss.be
	if be == nil {
		ss.mu.Unlock()
		ss.writeLocal(nil, txIdle)
		return nil
	}
	ss.mark(true)
	ss.mu.Unlock()
	defer ss.doneWriting()
	if _, err := be.wr.Write(msgSync); err != nil {
		return ss.backendWriteFailed(be, err)
	}
	return ss.maybeFlushBackend(be, true)
}

// doneWriting ends a write to the attached backend; a release waiting for it may go on.
func (ss *session) doneWriting() {
	ss.mu.Lock()
	ss.writing = false
	ss.cond.Broadcast()
	ss.mu.Unlock()
}

// onFlush asks the backend to send what it has.
func (ss *session) onFlush() error {
	_ = ss.rd.skip()
	if len(ss.batch) > 0 {
		return ss.flushBatch(msgTypeFlush)
	}
	ss.mu.Lock()
	be := ss.be
	if !ss.dirty {
		be = nil // nothing unanswered to push out; Sync or ReadyForQuery already flushes
	} else {
		ss.writing = true
	}
	ss.mu.Unlock()
	if be == nil {
		return nil
	}
	defer ss.doneWriting()
	if err := writeMsg(be.wr, msgTypeFlush, nil); err != nil {
		return ss.backendWriteFailed(be, err)
	}
	return ss.maybeFlushBackend(be, true)
}

// mark records one forwarded message: a boundary (Query) waits for its
// ReadyForQuery, anything else leaves the batch open. Call with mu held.
func (ss *session) mark(boundary bool) {
	ss.writing = true
	ss.syncCounted = boundary // replies queued from now on belong to this batch (batchSeq)
	if boundary {
		ss.syncSeq++
		ss.pending++
		ss.dirty = false
	} else {
		ss.dirty = true
	}
}

// forwardCopy relays CopyData, CopyDone and CopyFail during COPY FROM STDIN.
func (ss *session) forwardCopy(typ byte) error {
	ss.mu.Lock()
	be := ss.be
	if typ != msgTypeCopyData {
		ss.copyIn = false
	}
	if be != nil {
		ss.writing = true
	}
	ss.mu.Unlock()
	if be == nil {
		return nil // PostgreSQL ignores copy messages outside COPY, so does the proxy
	}
	defer ss.doneWriting()
	if err := ss.rd.forward(be.wr); err != nil {
		if isNetWriteErr(err) {
			return ss.backendWriteFailed(be, err)
		}
		if isPartial(err) {
			be.close() // half a message went out: the backend stream is lost
		}
		return err
	}
	return ss.maybeFlushBackend(be, typ != msgTypeCopyData)
}

func (ss *session) maybeFlushBackend(be *backend, boundary bool) error {
	if !boundary && ss.rd.fullMessageBuffered() {
		return nil
	}
	if ss.rd.fullMessageBuffered() && be.wr.Available() > 512 {
		return nil // more pipelined messages are here: send them together
	}
	if err := be.wr.Flush(); err != nil {
		return ss.backendWriteFailed(be, err)
	}
	return nil
}

// isNetWriteErr tells a failed write (to the backend, in the client
// goroutine) from a failed read of the client.
func isNetWriteErr(err error) bool {
	var ne *net.OpError
	return errors.As(err, &ne) && ne.Op == "write"
}

// backendWriteFailed handles a dead backend found while writing: the reader
// side reports it to the client; the client goroutine carries on.
func (ss *session) backendWriteFailed(be *backend, err error) error {
	ss.srv.log.Warn("backend write failed", "project", ss.ref, "error", err)
	be.close() // the backend goroutine sees the read error and reports it
	return nil
}

// want is what the next unit needs of a backend.
type want struct {
	pin     bool // needs session state: a routed session takes a dedicated backend
	state   bool // may leave session state: the backend is scrubbed at release
	keeps   bool // may create state the client keeps: transaction mode pins (pin.go)
	ddl     bool // changes the schema: statements prepared before are prepared again
	primary bool // must run on the primary
	writes  bool // may write: read-your-writes bookkeeping
	reason  string
	gucs    []string // session settings the message changes
	// shareTx: every statement is a plain read or write (no transaction
	// control, no utility statement, no session state): the identity may
	// ride in the client's own implicit transaction (setupPlan.inline).
	shareTx bool
}

// claim returns the attached backend, or attaches one, and records the
// message about to be forwarded in the same critical section, so the backend
// cannot be released in between. Attaching waits at the project's gate
// (pause), picks the primary or a fit replica, takes a backend from its pool
// within query_wait_timeout and puts the client's identity in force,
// pipelined in front of the first message.
func (ss *session) claim(boundary bool, w want) (*backend, error) {
	ss.mu.Lock()
	if w.pin && ss.routedSession && !ss.sessionMode {
		ss.pinPending = true
	}
	if ss.pinPending {
		w.primary = true
	}
	if w.ddl {
		// Parses from now on, this client's own included, get statements
		// prepared after the change; the end of the unit moves it again.
		ss.projRun.schema.Add(1)
		ss.unitDDL = true
	}
	// An identity put in force inline (setupPlan) is known only at the
	// end of its unit: nothing more goes to the backend before then. What
	// was forwarded and still waits in the buffer for this message goes
	// out first, or that end never comes.
	if ss.identPending && ss.be != nil {
		ss.mu.Unlock()
		ss.flushForwarded()
		ss.mu.Lock()
	}
	for ss.phase == phaseRetrying || ss.phase == phaseChecking || (ss.identPending && ss.be != nil) {
		ss.cond.Wait()
	}
	// A read unit still running on a replica (pipelined autocommit reads)
	// must end before a statement for the primary starts its own unit.
	// Only when that unit will end by itself: replies pending and nothing
	// forwarded after its last Sync.
	for ss.be != nil && ss.beReplica && w.primary && ss.txStatus == txIdle && ss.pending > 0 && !ss.dirty && !ss.clientGone.Load() {
		ss.cond.Wait()
	}
	if be := ss.be; be != nil {
		if ss.pinPending && !ss.beReplica {
			// This primary backend stays the client's from now on.
			ss.sessionMode, ss.pinPending = true, false
		}
		ss.replayOK = false // more than one send: not replayable
		ss.mark(boundary)
		ss.unitWrites = ss.unitWrites || w.writes
		for _, g := range w.gucs {
			if !slices.Contains(ss.unitGUCs, g) { // a pinned client's units add up
				ss.unitGUCs = append(ss.unitGUCs, g)
			}
		}
		ss.unitState = ss.unitState || w.state
		ss.unitKeeps = ss.unitKeeps || w.keeps
		ss.mu.Unlock()
		return be, nil
	}
	if perr := ss.pendingErr; perr != nil {
		// The backend of the client's transaction was lost (perhaps while
		// this message was on its way): the message fails with that error
		// instead of starting a new transaction the client does not expect.
		ss.pendingErr = nil
		ss.mu.Unlock()
		return nil, perr
	}
	for ss.phase == phaseSettling {
		ss.cond.Wait() // the last unit's WAL position or settings are on their way
	}
	needLSN := ss.lastWriteLSN
	// The identity may ride in the client's transaction only where the
	// backend goes back to the pool at the end of it, and only in front of
	// a whole batch (a Query, or messages up to their Sync): the end of
	// the transaction must come without another message of the client.
	shareTx := boundary && w.shareTx && ss.txMode && !ss.pinned && !ss.pinPending
	ss.mu.Unlock()
	proj := ss.srv.project(ss.ref)
	if proj == nil {
		return nil, fatalError(CodeInvalidCatalog, "project %q no longer exists", ss.ref)
	}
	wait := waitCtx{timeout: ss.srv.opts.QueryWaitTimeout}
	defer wait.stop()
	start := time.Now()
	if !proj.gate.tryEnter() {
		if err := proj.gate.enter(wait.get()); err != nil {
			return nil, newError(CodeCannotConnectNow, "project %q is paused", ss.ref)
		}
	}
	if cur := ss.srv.project(ss.ref); cur != nil && cur.gate == proj.gate {
		proj = cur // re-pointed (ejection) while this client waited at the gate
	}
	for range 3 {
		res, pl, replica, target, err := ss.acquire(&wait, proj, w, needLSN)
		if err != nil {
			observeWait(proj.metrics.poolWait, start)
			proj.gate.leave()
			if errors.Is(err, context.DeadlineExceeded) {
				proj.metrics.waitTimeouts.Inc()
				return nil, &Error{Code: CodeTooManyConnections, Message: "no server connection available within query_wait_timeout", Err: err}
			}
			return nil, &Error{Code: CodeConnectionFailure, Message: "could not connect to the project's database", Err: err}
		}
		be := res.Value()
		// The identity and the client's settings go first, in one write
		// with the client's message: no extra round trip.
		buf, plan, serr := ss.setupBytes(ss.setupBuf[:0], be, shareTx, ss.translatesNames())
		ss.setupBuf = buf
		ss.mu.Lock()
		if !be.attach(attachment{ss: ss, be: be, setup: plan}) {
			// The server went away since the pool checked it.
			ss.mu.Unlock()
			res.Destroy()
			continue
		}
		observeWait(proj.metrics.poolWait, start)
		ss.relays.Add(1)
		ss.discardStale()
		ss.be, ss.res, ss.pl, ss.proj = be, res, pl, proj
		ss.setPhase(phaseInUnit)
		ss.beReplica = replica
		ss.beTarget = target
		if ss.pinPending && !replica {
			ss.sessionMode, ss.pinPending = true, false
		}
		ss.replayOK = replica
		ss.replay = ss.replay[:0]
		ss.unitWrites = w.writes && !replica
		ss.identPending = plan.inline > 0 // else it commits on its own (setupPlan)
		ss.txStatus = txIdle
		ss.mark(boundary)
		ss.unnamedOnBackend = false
		ss.unitGUCs = append(ss.unitGUCs[:0], w.gucs...)
		ss.unitState = w.state
		ss.unitKeeps = w.keeps
		ss.mu.Unlock()
		if serr != nil {
			be.close()
		} else if _, err := be.wr.Write(buf); err != nil {
			be.close()
		}
		return be, nil
	}
	proj.gate.leave()
	return nil, &Error{Code: CodeConnectionFailure, Message: "could not connect to the project's database: its connections keep closing"}
}

// acquire takes a backend for the next unit: from a fit replica when the
// unit may read there, else from the primary (or the role's own pool).
func (ss *session) acquire(wait *waitCtx, proj *project, w want, needLSN uint64) (res *puddle.Resource[*backend], pl *pool, replica bool, target *replicaTarget, err error) {
	if !w.primary && !ss.routePrimary && !ss.sessionMode && proj.rolePrim[ss.ident.Role] == nil {
		if rt := ss.srv.replicas.pick(proj, needLSN); rt != nil {
			pl, err = ss.srv.pools.get(proj, rt.url, rt.cfg)
			if err == nil {
				res, err = pl.acquireBackend(wait)
			}
			if err == nil {
				proj.route("replica", w.reason, ss.srv.metrics)
				return res, pl, true, rt, nil
			}
			// Nothing reached the client yet: the primary serves the read.
			ss.srv.log.Debug("replica unavailable, reading from the primary", "project", ss.ref, "error", err)
			ss.srv.replicas.markDown(rt)
		}
	}
	proj.route("primary", w.reason, ss.srv.metrics)
	url, cfg := proj.cfg.DatabaseURL, proj.primary
	if rc := proj.rolePrim[ss.ident.Role]; rc != nil {
		url, cfg = proj.cfg.RoleURLs[ss.ident.Role], rc
	}
	for range 3 {
		// The last pool this client used saves the registry's lock.
		if pl = ss.lastPool; pl == nil || ss.lastPoolURL != url || ss.lastPoolCfg != cfg {
			if pl, err = ss.srv.pools.get(proj, url, cfg); err != nil {
				return nil, nil, false, nil, err
			}
			ss.lastPool, ss.lastPoolURL, ss.lastPoolCfg = pl, url, cfg
		}
		res, err = pl.acquireBackend(wait)
		if !isPoolClosed(err) {
			break
		}
		ss.lastPool = nil
	}
	return res, pl, false, nil, err
}

// failLocal answers a message the proxy could not run: an error, then
// ReadyForQuery for a simple query or a skip to the next Sync for an
// extended-protocol batch (as PostgreSQL does after an error).
func (ss *session) failLocal(typ byte, err error) {
	ss.flushForwarded()
	var pe *Error
	if errors.As(err, &pe) && pe.Fatal {
		ss.writeLocal(toErrorResponse(err, true), 0)
		_ = ss.conn.Close()
		return
	}
	if typ == msgTypeQuery {
		ss.writeLocal(toErrorResponse(err, false), ss.currentStatus())
		return
	}
	ss.writeLocal(toErrorResponse(err, false), 0)
	ss.skipToSync = true
}

func (ss *session) currentStatus() byte {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.be == nil {
		return txIdle
	}
	return ss.txStatus
}

// writeLocal writes a proxy-made reply: an optional error and, if status is
// non-zero, ReadyForQuery. It waits until the backend has answered everything
// in flight, so replies stay in order.
func (ss *session) writeLocal(e *pgproto3.ErrorResponse, status byte) {
	ss.mu.Lock()
	for ss.be != nil && ss.pending > 0 && !ss.clientGone.Load() {
		ss.cond.Wait()
	}
	ss.mu.Unlock()
	ss.lockOut()
	defer ss.wmu.Unlock()
	if e != nil {
		ss.scratch, _ = encodeTo(ss.wr, e, ss.scratch)
	}
	if status != 0 {
		_, _ = ss.wr.Write(rfq(status))
	}
	_ = ss.wr.Flush()
}

// unit is a finished attachment: the backend to give back or close.
type unit struct {
	res      *puddle.Resource[*backend]
	pl       *pool
	proj     *project
	clean    bool
	stopping bool
	fetchLSN bool     // ask the primary for its WAL position before release
	readGUCs []string // read back the settings the unit changed before release
	scrub    bool     // the unit may have left session state: scrub the backend (see scrubSQL)
}

// detachLocked clears the attachment; call with mu held, then settleUnit
// and endUnit without it.
func (ss *session) detachLocked(clean bool) *unit {
	// The unit lives in its backend, which has one at a time: relay,
	// settleUnit and endUnit all run on the backend's own goroutine, so
	// the next unit of this backend is made after this one has ended.
	u := &ss.be.unit
	*u = unit{res: ss.res, pl: ss.pl, proj: ss.proj, clean: clean, stopping: ss.stopping}
	if clean && ss.unitWrites && !ss.clientGone.Load() && len(ss.proj.replicas) > 0 {
		u.fetchLSN = true
	}
	if clean && len(ss.unitGUCs) > 0 && !ss.clientGone.Load() && !ss.sessionMode {
		u.readGUCs = slices.Clone(ss.unitGUCs)
	}
	// A backend that serves other clients next goes back as clean as a new
	// one. The client's own settings were read back above; in session mode
	// the backend is the client's and DISCARD ALL cleans it at the end.
	u.scrub = clean && ss.unitState && !ss.sessionMode
	if ss.unitDDL {
		ss.projRun.schema.Add(1) // the change is committed (or rolled back) now
	}
	ss.unitWrites, ss.unitState, ss.unitKeeps, ss.unitDDL = false, false, false, false
	ss.unitGUCs = ss.unitGUCs[:0]
	ss.be, ss.res, ss.pl, ss.proj = nil, nil, nil, nil
	ss.pending, ss.dirty, ss.copyIn, ss.txStatus = 0, false, false, txIdle
	ss.identPending = false
	ss.forgetReplies()
	if u.awaited() {
		ss.setPhase(phaseSettling)
	} else {
		ss.setPhase(phaseIdle)
	}
	return u
}

// awaited reports whether the client's next unit waits for this one's
// settling (phaseSettling): its settings read back, or the primary's WAL
// position after its writes. A unit that only scrubs its backend is not
// waited for.
func (u *unit) awaited() bool {
	return u.fetchLSN || u.readGUCs != nil
}

// settleUnit runs what must happen on a finished unit's backend before it
// goes back to its pool: the proxy's statements prepared again, the
// settings the unit changed read back, the WAL position after a write.
func (ss *session) settleUnit(u *unit) {
	if u.res.Value().poisoned {
		u.clean = false
	}
	if u.readGUCs != nil || u.scrub {
		be := u.res.Value()
		st, err := be.settle(u.readGUCs, u.scrub)
		if err == nil && u.scrub && (st.role != ss.ident.Role || st.claims != ss.ident.ClaimsJSON) {
			err = fmt.Errorf("the identity changed during a unit: role %q", st.role)
			ss.srv.log.Error("identity changed on a backend; closing it", "project", ss.ref, "role", ss.ident.Role, "found", st.role)
		}
		if err == nil && st.foreignStmts > 0 {
			err = fmt.Errorf("%d prepared statements the proxy did not make", st.foreignStmts)
		}
		ss.mu.Lock()
		if err == nil && u.readGUCs != nil {
			if be.settings == nil {
				be.settings = map[string]string{}
			}
			for _, name := range u.readGUCs {
				if v, ok := st.settings[name]; ok {
					ss.settings[name] = v
					be.settings[name] = v
				} else {
					delete(ss.settings, name)
					delete(be.settings, name)
				}
			}
			ss.settingsKey = settingsKey(ss.settings)
			be.settingsKey = ss.settingsKey
		}
		if err == nil && u.scrub {
			// RESET ALL left the role and nothing else of the client's.
			be.identity = ""
			be.settings, be.settingsKey, be.claimGUCs = nil, "", nil
			// A trusted role's DO block may have run DEALLOCATE or PREPARE.
			be.forgetProxyStmts()
		}
		ss.mu.Unlock()
		if err != nil {
			ss.srv.log.Warn("could not settle a backend; closing it", "project", ss.ref, "error", err)
			u.clean = false
		}
	}
	var lsn uint64
	var lsnErr error
	if u.fetchLSN {
		lsn, lsnErr = u.res.Value().currentLSN()
		if lsnErr != nil {
			ss.srv.log.Warn("could not read the primary's WAL position; reads go to the primary", "project", ss.ref, "error", lsnErr)
			lsn = ^uint64(0) >> 1 // no replica qualifies until a later write succeeds
			u.clean = false
		}
	}
	if !u.awaited() {
		// A scrub-only unit: the session may be in its next unit by now,
		// or settling that one.
		return
	}
	ss.mu.Lock()
	if u.fetchLSN && (lsnErr != nil || lsn > ss.lastWriteLSN) {
		ss.lastWriteLSN = lsn
	}
	ss.setPhase(phaseIdle)
	ss.mu.Unlock()
}

// endUnit gives the backend back (clean) or closes it, and ends the unit.
func (ss *session) endUnit(u *unit) {
	// u lives in the backend: nothing of it is read once the backend is
	// back in its pool.
	proj, stopping := u.proj, u.stopping
	if u.clean {
		u.pl.release(u.res)
	} else {
		u.res.Destroy()
	}
	proj.gate.leave()
	proj.metrics.transactions.Inc()
	if stopping {
		ss.sayShutdown()
	}
}

// backendLost handles a backend that died or broke the protocol: it is
// destroyed, and the client gets an error for what was in flight (transaction
// mode) or is disconnected (session mode: its session state is gone).
func (ss *session) backendLost(be *backend, cause error, fatal *pgproto3.ErrorResponse) {
	be.close()
	ss.mu.Lock()
	res, proj := ss.res, ss.proj
	pend, dirty, status := ss.pending, ss.dirty, ss.txStatus
	gone := ss.clientGone.Load()
	ss.be, ss.res, ss.pl, ss.proj = nil, nil, nil, nil
	ss.pending, ss.dirty, ss.copyIn, ss.txStatus = 0, false, false, txIdle
	ss.setPhase(phaseIdle)
	ss.lost(&be.stmtTable)
	e := &pgproto3.ErrorResponse{Severity: "ERROR", SeverityUnlocalized: "ERROR", Code: CodeConnectionFailure,
		Message: "server connection lost", Detail: "The transaction was rolled back; the connection to cascata goes on."}
	if fatal != nil {
		// The server's own fields as they are; cascata's part in the detail.
		e.Code, e.Message, e.Detail, e.Hint = fatal.Code, fatal.Message, fatal.Detail, fatal.Hint
		if fatal.Code != CodeInsufficientPrivs && e.Detail == "" {
			e.Detail = "The server closed its connection; the transaction was rolled back."
		}
	}
	sessionMode := ss.sessionMode || ss.pinned // a pinned client's state is gone too
	ss.pinned = false
	ss.releasePinLocked()
	if !gone && !sessionMode && pend == 0 && (dirty || status != txIdle) {
		ss.pendingErr = &Error{Code: e.Code, Message: e.Message, Detail: e.Detail, Hint: e.Hint}
	}
	ss.cond.Broadcast()
	ss.mu.Unlock()
	if res != nil {
		res.Destroy()
	}
	if proj != nil {
		proj.gate.leave()
	}
	ss.srv.log.Warn("backend lost", "project", ss.ref, "error", cause)
	if gone {
		return
	}
	if sessionMode {
		e.Severity, e.SeverityUnlocalized = "FATAL", "FATAL"
		ss.writeLocal(e, 0)
		_ = ss.conn.Close()
		return
	}
	if pend > 0 {
		ss.lockOut()
		ss.scratch, _ = encodeTo(ss.wr, e, ss.scratch)
		for range pend {
			_, _ = ss.wr.Write(rfq(txIdle))
		}
		_ = ss.wr.Flush()
		ss.wmu.Unlock()
	}
}

// finish runs when the client has left: a backend still attached is rolled
// back (and, in session mode, reset with DISCARD ALL) before it goes back to
// the pool; a running statement is cancelled first.
func (ss *session) finish() {
	_ = ss.conn.Close() // unblocks a backend goroutine stuck writing to a dead client
	defer func() {
		ss.mu.Lock()
		ss.releasePinLocked()
		ss.mu.Unlock()
	}()
	ss.mu.Lock()
	for ss.phase == phaseChecking {
		ss.cond.Wait() // the relay is talking to the backend
	}
	ss.clientGone.Store(true)
	be := ss.be
	if be == nil {
		ss.mu.Unlock()
		ss.relays.Wait()
		return
	}
	running := ss.pending > 0
	var out []byte
	if ss.copyIn {
		out = append(out, msgCopyFailEOF...)
	}
	if ss.dirty {
		out = append(out, msgSync...)
		ss.pending++
		ss.dirty = false
	}
	out = append(out, queryMsg("ROLLBACK")...)
	ss.pending++
	if ss.sessionMode || ss.pinned {
		// A statement_timeout the client left fires during a slow DISCARD
		// ALL and cancels whatever runs next on the backend: the next
		// client's identity (PostgreSQL services the interrupt at the next
		// statement). With the timeout off first, DISCARD ALL arms none; a
		// cancel still pending fails this SET, and the backend is closed.
		out = append(out, queryMsg("SET statement_timeout = 0")...)
		out = append(out, queryMsg("DISCARD ALL")...)
		ss.pending += 2
		ss.unitState = false // DISCARD ALL is the scrub
		be.identity = ""
		be.stmts = nil // DISCARD ALL deallocates them
		be.sqlStmts = nil
		be.forgetProxyStmts()
		be.settings, be.settingsKey = nil, ""
		be.claimGUCs = nil
	}
	ss.writing = true
	ss.mu.Unlock()
	if running {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = be.cancel(ctx)
		cancel()
	}
	if _, err := be.wr.Write(out); err == nil {
		_ = be.wr.Flush()
	}
	ss.doneWriting()
	// Wait for the backend goroutine to release or destroy the backend.
	timer := time.AfterFunc(5*time.Second, func() { be.close() })
	ss.mu.Lock()
	for ss.be == be {
		ss.cond.Wait()
	}
	ss.mu.Unlock()
	timer.Stop()
	ss.relays.Wait()
}

// cancelRunning forwards a cancel request to the backend running the
// client's statement. The session lock is held until the server has taken
// the request, so the backend cannot pass to another client meanwhile.
func (ss *session) cancelRunning() {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.be == nil || ss.pending == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := ss.be.cancel(ctx); err != nil {
		ss.srv.log.Warn("cancel request failed", "project", ss.ref, "error", err)
	}
}

// shutdown asks the session to end at its next idle moment.
func (ss *session) shutdown() {
	ss.mu.Lock()
	ss.stopping = true
	idle := ss.be == nil
	ss.mu.Unlock()
	ss.unpark()
	if idle {
		ss.sayShutdown()
	}
}

func (ss *session) sayShutdown() {
	ss.lockOut()
	ss.scratch, _ = encodeTo(ss.wr, toErrorResponse(fatalError(CodeAdminShutdown, "terminating connection: cascata is shutting down"), true), ss.scratch)
	_ = ss.wr.Flush()
	ss.wmu.Unlock()
	_ = ss.conn.Close()
}

// kill closes the client and its backend at once (shutdown deadline).
func (ss *session) kill() {
	ss.mu.Lock()
	ss.stopping = true
	be := ss.be
	ss.mu.Unlock()
	ss.unpark()
	if be != nil {
		be.close()
	}
	_ = ss.conn.Close()
}

func macOf(f func(string) string, claims string) string {
	if f == nil {
		return ""
	}
	return f(claims)
}

// keepReplay records the bytes of a read unit just sent to a replica, so
// that it can run again on the primary. Call with mu held.
func (ss *session) keepReplay(sent []byte) {
	if !ss.replayOK || !ss.beReplica {
		return
	}
	ss.replay = append(ss.replay[:0], sent...)
	ss.replayQ[0] = append(ss.replayQ[0][:0], ss.parseQ...)
	ss.replayQ[1] = append(ss.replayQ[1][:0], ss.closeQ...)
}

// retryOnPrimary runs a read unit again on the primary after its replica
// died, when no reply had reached the client: the client sees no error.
// It reports whether the unit moved; the primary backend relays the rest.
func (ss *session) retryOnPrimary(old *backend) bool {
	ss.mu.Lock()
	if ss.writing {
		// The replica died between the claim and the end of the client
		// goroutine's write of the unit (its replay bytes are recorded just
		// before that write): wait for the write, which fails or lands in
		// a closed socket, and decide with the unit known. The connection
		// is closed first, so that write cannot block on it.
		old.close()
		for ss.writing {
			ss.cond.Wait()
		}
	}
	ok := !ss.clientGone.Load() && ss.be == old && ss.beReplica && ss.replayOK && len(ss.replay) > 0 && ss.pending > 0 && !ss.dirty
	if !ok {
		ss.mu.Unlock()
		return false
	}
	ss.setPhase(phaseRetrying)
	rt, proj, oldRes := ss.beTarget, ss.proj, ss.res
	ss.mu.Unlock()
	ss.srv.replicas.markDown(rt)
	wait := waitCtx{timeout: ss.srv.opts.QueryWaitTimeout}
	defer wait.stop()
	pl, err := ss.srv.pools.get(proj, proj.cfg.DatabaseURL, proj.primary)
	var res *puddle.Resource[*backend]
	if err == nil {
		res, err = pl.acquireBackend(&wait)
	}
	if err != nil {
		ss.mu.Lock()
		ss.setPhase(phaseInUnit)
		ss.mu.Unlock()
		return false
	}
	be := res.Value()
	ss.mu.Lock()
	buf, n, err := ss.setupBytes(nil, be, false, ss.translatesNames()) // rare: its own buffer
	if !be.attach(attachment{ss: ss, be: be, setup: n}) {
		ss.setPhase(phaseInUnit)
		ss.mu.Unlock()
		res.Destroy()
		return false
	}
	ss.relays.Add(1)
	if ss.replayNamed {
		// Translate the client's messages again for this backend.
		ss.parseQ, ss.closeQ, ss.renames = ss.parseQ[:0], ss.closeQ[:0], ss.renames[:0]
		ss.unnamedOnBackend = false
		ss.out = ss.out[:0]
		ss.syncCounted = true
		for off := 0; off < len(ss.replayRaw); {
			typ, body, next := splitMsg(ss.replayRaw, off)
			m, _ := decodeExtMsg(typ, body) // checked when it first arrived: cannot fail
			ss.retranslate(&be.stmtTable, &m)
			off = next
		}
		ss.syncCounted = false
		ss.appendMsg(msgTypeSync)
		buf = append(buf, ss.out...)
	} else {
		buf = append(buf, ss.replay...)
		ss.parseQ = append(ss.parseQ[:0], ss.replayQ[0]...)
		ss.closeQ = append(ss.closeQ[:0], ss.replayQ[1]...)
	}
	ss.be, ss.res, ss.pl = be, res, pl
	ss.beReplica, ss.beTarget, ss.replayOK = false, nil, false
	ss.identPending = false
	ss.writing = true
	ss.setPhase(phaseInUnit)
	ss.mu.Unlock()
	oldRes.Destroy()
	ss.srv.log.Warn("replica lost mid-read; the read runs again on the primary", "project", ss.ref)
	if err != nil {
		be.close() // its relay sees it fail and reports the loss
	} else if _, err := be.wr.Write(buf); err == nil {
		_ = be.wr.Flush()
	}
	ss.doneWriting() // the unit may end (and be released) only after this write
	return true
}

func legacyClaims(on bool, claims string) map[string]string {
	if !on {
		return nil
	}
	return claimSettings(claims)
}
