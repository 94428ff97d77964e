package proxy

import (
	"log/slog"
	"sync"
	"testing"
)

func TestPhaseMoves(t *testing.T) {
	all := []phase{phaseIdle, phaseInUnit, phaseChecking, phaseRetrying, phaseSettling}
	legal := map[[2]phase]bool{
		{phaseIdle, phaseInUnit}:     true, // claim attaches a backend
		{phaseInUnit, phaseIdle}:     true, // the unit ends, or its backend is lost
		{phaseInUnit, phaseSettling}: true, // the unit ends with settings or a WAL position to read
		{phaseInUnit, phaseChecking}: true, // pinCheck
		{phaseChecking, phaseInUnit}: true,
		{phaseInUnit, phaseRetrying}: true, // retryOnPrimary
		{phaseRetrying, phaseInUnit}: true,
		{phaseSettling, phaseIdle}:   true, // settleUnit
	}
	for _, from := range all {
		for _, to := range all {
			if got := from.canMoveTo(to); got != legal[[2]phase{from, to}] {
				t.Errorf("%s -> %s: canMoveTo = %v", from, to, got)
			}
		}
	}
	for _, p := range all {
		if p.String() == "unknown" {
			t.Errorf("phase %d has no name", p)
		}
	}
}

// A move out of order is counted and the session goes on in the phase it
// was moved to; a move that leaves the attachment disagreeing with the
// phase counts too.
func TestSetPhaseCountsFaults(t *testing.T) {
	srv := &Server{log: slog.New(slog.DiscardHandler)}
	ss := &session{srv: srv}
	ss.cond = sync.NewCond(&ss.mu)
	ss.mu.Lock()
	defer ss.mu.Unlock()

	ss.be = &backend{}
	ss.setPhase(phaseInUnit)
	ss.setPhase(phaseChecking)
	ss.setPhase(phaseInUnit)
	ss.be = nil
	ss.setPhase(phaseSettling)
	ss.setPhase(phaseIdle)
	if n := srv.phaseFaults.Load(); n != 0 {
		t.Fatalf("legal moves counted %d faults", n)
	}

	ss.setPhase(phaseSettling) // idle -> settling skips the unit
	if n := srv.phaseFaults.Load(); n != 1 || ss.phase != phaseSettling {
		t.Fatalf("faults %d, phase %s; want 1, settling", n, ss.phase)
	}
	ss.setPhase(phaseIdle)
	ss.setPhase(phaseInUnit) // no backend attached
	if n := srv.phaseFaults.Load(); n != 2 {
		t.Fatalf("faults %d; want 2", n)
	}

	ss.be = nil
	ss.setPhase(phaseIdle)
	ss.pending = 1 // a reply of the last unit still counted
	ss.be = &backend{}
	ss.setPhase(phaseInUnit)
	if n := srv.phaseFaults.Load(); n != 3 {
		t.Fatalf("faults %d; want 3", n)
	}
}
