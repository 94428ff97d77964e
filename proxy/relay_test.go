package proxy

import (
	"bufio"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cascata/auth"

	"github.com/jackc/pgx/v5/pgproto3"
)

// The relay on its own: a session attached to a backend whose server is
// scripted by the test over an in-memory connection, and whose client is
// the test too. What the client is sent is what the test reads.

type relayRig struct {
	ss     *session
	be     *backend
	server *pgproto3.Backend  // the scripted server
	client *pgproto3.Frontend // the client's end
	units  chan *unit         // what relay returned
}

// newRelayRig attaches a backend to a transaction-mode session with one
// Sync sent (the unit's batch), and runs the relay with setup plan.
func newRelayRig(t *testing.T, plan setupPlan, prepare func(ss *session)) *relayRig {
	t.Helper()
	beConn, serverConn := net.Pipe()
	clientSide, clientConn := net.Pipe()
	srv := &Server{log: slog.New(slog.DiscardHandler)}
	t.Cleanup(func() { // runs last
		if n := srv.phaseFaults.Load(); n > 0 {
			t.Errorf("%d session phase moves out of order", n)
		}
	})
	t.Cleanup(func() {
		for _, c := range []net.Conn{beConn, serverConn, clientSide, clientConn} {
			_ = c.Close()
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for _, c := range []net.Conn{serverConn, clientConn} {
		_ = c.SetDeadline(deadline)
	}
	ss := &session{
		srv:         srv,
		conn:        clientSide,
		wr:          bufio.NewWriter(clientSide),
		clientState: newClientState(auth.Identity{Role: "authenticated", ClaimsJSON: "{}"}, "", nil, nil),
		translator:  newTranslator(10, new(atomic.Uint64)),
		txMode:      true,
		txStatus:    'I',
		projRun:     &projectRun{},
	}
	ss.cond = sync.NewCond(&ss.mu)
	be := &backend{conn: beConn, rd: newMsgReader(beConn, 1<<20), wr: bufio.NewWriter(beConn), gate: rand.NewChaCha8([32]byte{2})}
	ss.be, ss.phase = be, phaseInUnit
	ss.syncSeq, ss.syncCounted = 1, true
	ss.pending = 1
	if prepare != nil {
		prepare(ss)
	}
	ss.syncCounted = false
	r := &relayRig{ss: ss, be: be, server: pgproto3.NewBackend(serverConn, serverConn), client: pgproto3.NewFrontend(clientConn, clientConn), units: make(chan *unit, 1)}
	go func() { r.units <- ss.relay(attachment{ss: ss, be: be, setup: plan}) }()
	return r
}

// script has the server send msgs.
func (r *relayRig) script(t *testing.T, msgs ...pgproto3.BackendMessage) {
	t.Helper()
	go func() {
		for _, m := range msgs {
			r.server.Send(m)
		}
		_ = r.server.Flush() // fails once the relay closed a lost backend
	}()
}

// received reads what the client is sent up to its ReadyForQuery, one line
// per message: its type, and the code and message of errors.
func (r *relayRig) received(t *testing.T) []string {
	t.Helper()
	var got []string
	for {
		m, err := r.client.Receive()
		if err != nil {
			t.Fatalf("client side, after %q: %v", got, err)
		}
		switch m := m.(type) {
		case *pgproto3.ErrorResponse:
			got = append(got, "E "+m.Code+" "+m.Message)
		case *pgproto3.ReadyForQuery:
			return append(got, "Z "+string(m.TxStatus))
		default:
			got = append(got, fmt.Sprintf("%T", m)[len("*pgproto3."):])
		}
	}
}

func (r *relayRig) unit(t *testing.T) *unit {
	t.Helper()
	select {
	case u := <-r.units:
		return u
	case <-time.After(10 * time.Second):
		t.Fatal("the relay did not return")
		return nil
	}
}

// The replies of the proxy's own messages are turned into the client's:
// a Close that stands for the client's Parse answers as ParseComplete, the
// ParseComplete of a Parse the proxy added is dropped; at the idle
// ReadyForQuery the backend is detached for release.
func TestRelayTranslatesReplies(t *testing.T) {
	r := newRelayRig(t, setupPlan{}, func(ss *session) {
		ss.push(&ss.closeQ, queued{action: replyAsParseComplete})
		ss.push(&ss.parseQ, queued{action: replyDrop})
	})
	r.script(t, &pgproto3.CloseComplete{}, &pgproto3.ParseComplete{}, &pgproto3.BindComplete{},
		&pgproto3.DataRow{Values: [][]byte{[]byte("1")}}, &pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")},
		&pgproto3.ReadyForQuery{TxStatus: 'I'})
	expectLines(t, "the client's replies", r.received(t), "ParseComplete", "BindComplete", "DataRow", "CommandComplete", "Z I")
	if u := r.unit(t); u == nil || !u.clean {
		t.Fatalf("unit %+v, want a clean unit to release", u)
	}
	if r.ss.be != nil || r.ss.pending != 0 {
		t.Fatalf("after the unit: backend attached %v, pending %d", r.ss.be != nil, r.ss.pending)
	}
}

// The setup group's replies and the gate's never reach the client.
func TestRelaySwallowsTheSetup(t *testing.T) {
	r := newRelayRig(t, setupPlan{group: 1, gate: true}, nil)
	r.script(t,
		// the group: identity, the gate's Parse, its Sync
		&pgproto3.ParseComplete{}, &pgproto3.BindComplete{}, &pgproto3.DataRow{Values: [][]byte{[]byte("authenticated")}},
		&pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")}, &pgproto3.ParseComplete{}, &pgproto3.ReadyForQuery{TxStatus: 'I'},
		// the gate's Describe and Close in the client's batch
		&pgproto3.ParameterDescription{}, &pgproto3.NoData{}, &pgproto3.CloseComplete{},
		// the client's own query
		&pgproto3.RowDescription{}, &pgproto3.DataRow{Values: [][]byte{[]byte("42")}}, &pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")},
		&pgproto3.ReadyForQuery{TxStatus: 'I'})
	expectLines(t, "the client's replies", r.received(t), "RowDescription", "DataRow", "CommandComplete", "Z I")
	if u := r.unit(t); u == nil || !u.clean {
		t.Fatalf("unit %+v, want a clean unit to release", u)
	}
}

// A setup statement that fails (here the role does not exist): PostgreSQL
// skips the rest of the group, so the gate is missing and the client's
// messages are skipped too. The client is told what failed, in cascata's
// words, once, for its batch (not the gate's error), and the backend is
// closed, not pooled.
func TestRelaySetupFailure(t *testing.T) {
	r := newRelayRig(t, setupPlan{group: 1, gate: true}, nil)
	r.script(t,
		&pgproto3.ErrorResponse{Severity: "ERROR", Code: "22023", Message: `role "authenticated" does not exist`},
		&pgproto3.ReadyForQuery{TxStatus: 'I'},
		&pgproto3.ErrorResponse{Severity: "ERROR", Code: "26000", Message: `prepared statement "cascata_gate_x" does not exist`},
		&pgproto3.ReadyForQuery{TxStatus: 'I'})
	got := r.received(t)
	want := []string{`E 22023 cascata could not put the session in force (role authenticated): role "authenticated" does not exist`, "Z I"}
	expectLines(t, "the client's replies", got, want...)
	if u := r.unit(t); u != nil {
		t.Fatalf("unit %+v, want none (the backend is lost)", u)
	}
	if !r.be.closed.Load() || r.ss.be != nil {
		t.Fatalf("backend closed %v, still attached %v", r.be.closed.Load(), r.ss.be != nil)
	}
}

// newInlineRig runs the relay for a unit whose identity went inline.
func newInlineRig(t *testing.T) *relayRig {
	return newRelayRig(t, setupPlan{inline: 1}, func(ss *session) {
		ss.identPending = true
		ss.be.identity = ss.identKey
	})
}

// inlineIdentityReplies are the server's replies to an inline identity.
func inlineIdentityReplies() []pgproto3.BackendMessage {
	return []pgproto3.BackendMessage{&pgproto3.ParseComplete{}, &pgproto3.BindComplete{},
		&pgproto3.DataRow{Values: [][]byte{[]byte("authenticated")}}, &pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")}}
}

// An inline identity: its replies up to its CommandComplete never reach
// the client; its commit with the client's batch (ReadyForQuery 'I', no
// error) ends identPending.
func TestRelaySwallowsInlineIdentity(t *testing.T) {
	r := newInlineRig(t)
	r.script(t, append(inlineIdentityReplies(),
		&pgproto3.RowDescription{}, &pgproto3.DataRow{Values: [][]byte{[]byte("42")}}, &pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")},
		&pgproto3.ReadyForQuery{TxStatus: 'I'})...)
	expectLines(t, "the client's replies", r.received(t), "RowDescription", "DataRow", "CommandComplete", "Z I")
	if u := r.unit(t); u == nil || !u.clean {
		t.Fatalf("unit %+v, want a clean unit to release", u)
	}
	if r.ss.identPending || r.be.identity != r.ss.identKey {
		t.Fatalf("identPending %v, backend identity %q", r.ss.identPending, r.be.identity)
	}
}

// A client statement after an inline identity fails: the rollback took the
// identity with it, so the backend's identity is unknown afterwards.
func TestRelayInlineIdentityRolledBack(t *testing.T) {
	r := newInlineRig(t)
	r.script(t, append(inlineIdentityReplies(),
		&pgproto3.ErrorResponse{Severity: "ERROR", Code: "22012", Message: "division by zero"},
		&pgproto3.ReadyForQuery{TxStatus: 'I'})...)
	expectLines(t, "the client's replies", r.received(t), "E 22012 division by zero", "Z I")
	if u := r.unit(t); u == nil {
		t.Fatal("no unit: the backend is fine and goes back")
	}
	if r.ss.identPending || r.be.identity != "" {
		t.Fatalf("identPending %v, backend identity %q, want unknown", r.ss.identPending, r.be.identity)
	}
}

// The same rollback while the client goroutine is still writing the unit
// (a fast reply on a busy machine): the relay waits for that write before
// it detaches the backend, and meanwhile the client goroutine, free to
// run, must find the backend's identity still pending, so that a batch
// sent behind the failing one waits for a backend whose identity is put in
// force again instead of running under the one the rollback brought back.
func TestRelayInlineIdentityRolledBackDuringWrite(t *testing.T) {
	r := newRelayRig(t, setupPlan{inline: 1}, func(ss *session) {
		ss.identPending = true
		ss.be.identity = ss.identKey
		ss.writing = true // the client goroutine's write of this unit
	})
	r.script(t, append(inlineIdentityReplies(),
		&pgproto3.ErrorResponse{Severity: "ERROR", Code: "22012", Message: "division by zero"},
		&pgproto3.ReadyForQuery{TxStatus: 'I'})...)
	// The relay has taken the ReadyForQuery (pending 0) and waits for
	// the write, the lock released.
	var pending, attached bool
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		r.ss.mu.Lock()
		reached := r.ss.pending == 0
		pending, attached = r.ss.identPending, r.ss.be != nil
		r.ss.mu.Unlock()
		if reached {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the relay did not reach the unit's ReadyForQuery")
		}
	}
	if !pending || !attached {
		t.Fatalf("while the write is under way: identPending %v, attached %v; the next claim would reuse the backend", pending, attached)
	}
	r.ss.doneWriting()
	expectLines(t, "the client's replies", r.received(t), "E 22012 division by zero", "Z I")
	if u := r.unit(t); u == nil {
		t.Fatal("no unit: the backend is fine and goes back")
	}
	if r.ss.identPending || r.ss.be != nil || r.be.identity != "" {
		t.Fatalf("after the write: identPending %v, attached %v, backend identity %q", r.ss.identPending, r.ss.be != nil, r.be.identity)
	}
}

// The inline identity fails (the role is gone): PostgreSQL skips the
// client's messages; the client is told in cascata's words and the backend
// is closed.
func TestRelayInlineIdentityFails(t *testing.T) {
	r := newRelayRig(t, setupPlan{inline: 1}, func(ss *session) { ss.identPending = true })
	r.script(t,
		&pgproto3.ParseComplete{}, &pgproto3.BindComplete{},
		&pgproto3.ErrorResponse{Severity: "ERROR", Code: "22023", Message: `role "authenticated" does not exist`},
		&pgproto3.ReadyForQuery{TxStatus: 'I'})
	want := []string{`E 22023 cascata could not put the session in force (role authenticated): role "authenticated" does not exist`, "Z I"}
	expectLines(t, "the client's replies", r.received(t), want...)
	if u := r.unit(t); u != nil {
		t.Fatalf("unit %+v, want none (the backend is lost)", u)
	}
	if !r.be.closed.Load() || r.ss.be != nil {
		t.Fatalf("backend closed %v, still attached %v", r.be.closed.Load(), r.ss.be != nil)
	}
}
