package proxy

import (
	"errors"
	"os"
	"time"
)

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
