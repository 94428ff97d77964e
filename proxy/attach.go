package proxy

import (
	"context"
	"errors"
	"slices"
	"time"

	"github.com/jackc/puddle/v2"
)

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
	return ss.attachNew(boundary, w, needLSN, shareTx)
}

// attachNew attaches a backend for a new unit (claim): it waits at the
// project's gate, takes a backend from the primary or a replica that has
// replayed needLSN, and writes the client's identity and settings to it,
// in the identity's own transaction or, with shareTx, inline in the
// client's. The session is idle, and only the client goroutine attaches.
func (ss *session) attachNew(boundary bool, w want, needLSN uint64, shareTx bool) (*backend, error) {
	proj := ss.srv.project(ss.ref)
	if proj == nil {
		return nil, fatalError(CodeInvalidCatalog, "project %q no longer exists", ss.ref)
	}
	wait := waitCtx{timeout: ss.srv.opts.QueryWaitTimeout, shared: ss.srv.waits}
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
