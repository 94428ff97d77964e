package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
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
	// Set at login, read-only afterwards.
	srv       *Server
	conn      net.Conn
	ref       string
	params    map[string]string
	keyPID    uint32
	keySecret []byte
	metrics   *projectMetrics
	projRun   *projectRun // the project's shared run-time state (schema epoch, pins)
	trusted   bool        // the role may run DO and CREATE FUNCTION
	// routedSession: a session-mode project with replicas. The session
	// starts like transaction mode (reads may go to a replica, names are
	// translated) and takes a dedicated primary backend at its first
	// statement that needs session state (a write, a temporary table, a
	// lock, LISTEN, a SET ...): from then on it is a session-mode session.
	routedSession bool
	// txMode: transaction mode (neither session mode nor a routed session).
	txMode bool
	// fd is the client's socket for the parking lot (-1: the session never
	// parks: TLS, or no lot), wake starts resume when it is readable.
	fd   int
	wake func()

	// The client goroutine's own.
	rd           *msgReader // client side
	routePrimary bool       // SET cascata.route = 'primary'
	skipToSync   bool       // an extended batch failed locally: skip to its Sync
	batch        []byte     // extended-protocol messages held until Sync/Flush to route the batch whole
	held         []extMsg   // the held messages, decoded (views of batch)
	setupBuf     []byte     // identity and settings of a new unit
	// lastPool is the primary pool of the last unit.
	lastPool    *pool
	lastPoolURL string
	lastPoolCfg *pgconn.Config

	// Under wmu: the client's writer, shared by the client goroutine
	// (replies the proxy makes) and the relay.
	wmu     sync.Mutex
	wr      *bufio.Writer
	scratch []byte // encoding buffer for writes to the client

	// Under mu, changed by both goroutines. cond is broadcast at every
	// change of phase, and when a write or a reply lets a waiter go on.
	mu   sync.Mutex
	cond *sync.Cond

	// The unit: where it stands (phase.go; setPhase moves it), its
	// backend, and what it has done so far. All of it is cleared when the
	// backend is detached or lost.
	phase        phase
	be           *backend
	res          *puddle.Resource[*backend]
	pl           *pool
	proj         *project
	beReplica    bool           // the attached backend is a replica
	beTarget     *replicaTarget // the replica of the attached backend
	pending      int            // Sync and Query messages forwarded and not yet answered
	dirty        bool           // messages forwarded since the last Sync
	writing      bool           // the client goroutine is writing to the backend
	txStatus     byte
	copyIn       bool
	identPending bool     // identity applied inline in this unit: unknown until the backend is detached
	unitWrites   bool     // the unit on the primary may have written
	unitGUCs     []string // settings changed in the running unit
	unitState    bool     // the running unit may leave session state: scrub at release
	unitKeeps    bool     // the running unit may create state the client keeps: look at its end (pin.go)
	unitDDL      bool     // the running unit has DDL: the schema epoch moves again at its end
	// A read unit on a replica whose replica dies before any reply reached
	// the client is run again on the primary (see retryOnPrimary).
	replay    []byte      // the unit's bytes as sent (without identity/settings)
	replayQ   [2][]queued // parseQ and closeQ right after they were sent
	replayOK  bool        // the unit is one send and may be replayed
	replayRaw []byte      // the client's messages of a unit whose translation named statements (replayNamed)

	// Across units.
	// clientState is who the client is and the session settings it
	// carries from backend to backend (setup.go).
	clientState
	// translator maps the client's statement names to the backends' and
	// says what to do with each reply (translator.go).
	translator
	sessionMode  bool        // the client holds its backend until it leaves
	pinPending   bool        // a routed session must pin at its next primary backend
	pinned       bool        // the client keeps its backend for its session state (pin.go)
	pinSlot      *pinCount   // the project's pin counter the client holds a slot of
	lastWriteLSN uint64      // primary WAL position after the client's last write
	pendingErr   error       // backend lost mid-batch: told at the next Sync or Query
	clientGone   atomic.Bool // the client left; the backend is being cleaned (set with mu held)
	drainFailed  bool        // an error happened while cleaning
	stopping     bool        // server shutdown: close when idle

	// relays counts the units attached to a backend whose relay has not
	// returned yet; the session ends after them.
	relays sync.WaitGroup

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

func legacyClaims(on bool, claims string) map[string]string {
	if !on {
		return nil
	}
	return claimSettings(claims)
}
