package proxy

// WritersHeld counts the sessions of s holding a write buffer.
func WritersHeld(s *Server) int {
	s.mu.Lock()
	sessions := make([]*session, 0, len(s.sessions))
	for _, ss := range s.sessions {
		sessions = append(sessions, ss)
	}
	s.mu.Unlock()
	n := 0
	for _, ss := range sessions {
		ss.wmu.Lock()
		if ss.wr != nil {
			n++
		}
		ss.wmu.Unlock()
	}
	return n
}

// ReadersHeld counts the sessions of s whose reader holds a buffer.
func ReadersHeld(s *Server) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, ss := range s.sessions {
		if ss.rd.holding.Load() {
			n++
		}
	}
	return n
}

// ParkedClients counts the sessions parked without a goroutine.
func ParkedClients(s *Server) int {
	if s.lot == nil {
		return -1
	}
	return s.lot.Len()
}

// Handoffs counts the host slots handed over to waiting pools, all hosts.
func Handoffs(s *Server) int64 {
	var n int64
	for _, h := range s.pools.hostList() {
		h.mu.Lock()
		n += h.handoffs
		h.mu.Unlock()
	}
	return n
}

// PhaseFaults counts the phase moves out of order of s's sessions.
func PhaseFaults(s *Server) int64 { return s.phaseFaults.Load() }
