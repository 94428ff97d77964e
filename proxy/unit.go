package proxy

import (
	"fmt"
	"slices"

	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/jackc/puddle/v2"
)

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
	// resetTimeout puts the backend's statement_timeout back to its
	// default: the unit set one, or the backend keeps one below
	// timeoutFloor.
	resetTimeout bool
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
	if clean && !ss.sessionMode && !u.scrub {
		v, kept := ss.be.settings["statement_timeout"]
		u.resetTimeout = slices.Contains(ss.unitGUCs, "statement_timeout") || (kept && shortTimeout(v))
	}
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
	if u.readGUCs != nil || u.scrub || u.resetTimeout {
		be := u.res.Value()
		st, err := be.settle(u.readGUCs, u.scrub, u.resetTimeout)
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
		if err == nil && u.resetTimeout {
			if _, ok := be.settings["statement_timeout"]; ok {
				delete(be.settings, "statement_timeout")
				be.settingsKey = settingsKey(be.settings)
			}
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
	wait := waitCtx{timeout: ss.srv.opts.QueryWaitTimeout, shared: ss.srv.waits}
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
