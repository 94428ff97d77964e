package proxy

// phase is where a session's unit stands. A session is in one phase at a
// time, held under its mu; setPhase is the one place that changes it. The
// moves (canMoveTo):
//
//	idle     → in unit    claim attaches a backend
//	in unit  → idle       the unit ends (detachLocked), or its backend is lost (backendLost)
//	in unit  → settling   the unit ends with settings or a WAL position to read back
//	settling → idle       settleUnit has read them
//	in unit  ⇄ checking   pinCheck looks at the backend at the unit's end
//	in unit  ⇄ retrying   retryOnPrimary moves a replica read to the primary
type phase uint8

const (
	// phaseIdle: no backend attached, nothing of the last unit awaited.
	// The client goroutine may attach one (claim).
	phaseIdle phase = iota
	// phaseInUnit: a backend is attached. How far the unit is shows in
	// pending (Sync and Query messages not yet answered), dirty (messages
	// sent after the last one), writing (the client goroutine is writing
	// to the backend) and identPending (the identity rides in the unit's
	// own transaction).
	phaseInUnit
	// phaseChecking: the relay looks at the backend at the end of a unit
	// to decide whether the client keeps it (pinCheck). Nothing else
	// writes to the backend; the client goroutine waits.
	phaseChecking
	// phaseRetrying: the attached replica died before any reply reached
	// the client; the backend goroutine moves the unit to the primary
	// (retryOnPrimary). The client goroutine waits.
	phaseRetrying
	// phaseSettling: the unit is over and its backend detached, but the
	// settings it changed or the primary's WAL position after its writes
	// are still being read on that backend (settleUnit). The next unit
	// waits for them: its setup and its choice of replica depend on them.
	phaseSettling
)

func (p phase) String() string {
	switch p {
	case phaseIdle:
		return "idle"
	case phaseInUnit:
		return "in unit"
	case phaseChecking:
		return "checking"
	case phaseRetrying:
		return "retrying"
	case phaseSettling:
		return "settling"
	}
	return "unknown"
}

// attached reports whether a session in phase p has a backend attached.
func (p phase) attached() bool {
	return p == phaseInUnit || p == phaseChecking || p == phaseRetrying
}

// canMoveTo reports whether a session may go from phase p to phase q.
func (p phase) canMoveTo(q phase) bool {
	switch p {
	case phaseIdle:
		return q == phaseInUnit
	case phaseInUnit:
		return q == phaseIdle || q == phaseChecking || q == phaseRetrying || q == phaseSettling
	case phaseChecking, phaseRetrying:
		return q == phaseInUnit
	case phaseSettling:
		return q == phaseIdle
	}
	return false
}

// setPhase moves the session to phase to and wakes whoever waits for a
// change (cond). Call with mu held, after the attachment (be) is what the
// new phase says. A move out of order is a defect of the proxy: it is
// logged and counted (Server.phaseFaults), and the session goes on. So is
// a unit that starts with anything of another one still counted.
func (ss *session) setPhase(to phase) {
	from := ss.phase
	fresh := from != phaseIdle || to != phaseInUnit || (ss.pending == 0 && !ss.dirty && !ss.writing)
	if !from.canMoveTo(to) || to.attached() != (ss.be != nil) || !fresh {
		ss.srv.phaseFaults.Add(1)
		ss.srv.log.Error("session phase moved out of order", "project", ss.ref, "from", from, "to", to,
			"attached", ss.be != nil, "pending", ss.pending, "dirty", ss.dirty, "writing", ss.writing)
	}
	ss.phase = to
	ss.cond.Broadcast()
}
