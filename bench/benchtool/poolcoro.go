package main

import (
	"context"
	"fmt"
	"iter"
	"slices"
	"time"

	"github.com/panjf2000/gnet/v2"
)

// cmdPoolCoro runs the coroutine-on-a-loop prototype of a
// transaction-pooling relay until SIGTERM or -dur.
//
// One gnet event loop holds every connection, as in pool-eventloop, but a
// client connection's whole life is one sequential function, as in
// pool-goroutine: it reads the startup, waits for the client's next bytes,
// takes a server (in arrival order when none is free), writes, reads the
// replies, and when the client leaves it cancels or drains what it left.
// That function runs as a coroutine (iter.Pull): where it would block it
// yields, and the loop resumes it when one of its sockets has something (the
// client's, or the server's it holds) or a server is handed to it. A
// coroutine switch is a direct hand-off between two goroutines on one thread,
// with no scheduler, poller or lock in between. So each client has exactly
// one owner, its coroutine, which is the only code that touches its state
// and, while attached, its server's; the loop only reads sockets and says
// whose turn it is. The callbacks never resume a coroutine from inside
// another: they queue it (wake) and run the queue when their own work is
// done (settle), and a coroutine asks for a connection to be closed instead
// of closing it (gnet would call OnClose from inside it).
//
// With -tls-cert and -tls-key clients must come over TLS, and with
// -server-sslmode require the server connections are TLS too, as in
// pool-eventloop: each handshake runs in a goroutine before the loop
// takes the socket over, and the coroutines read the plaintext the loop
// decrypted (looptls.go).
//
// With -wait-timeout a client that waits longer for a server gets a FATAL
// 08P01 "query_wait_timeout" and is closed, as PgBouncer does: a timer
// goroutine posts the expiry to the loop (EventLoop.Execute), which wakes
// the waiting coroutine; the same path would carry any result a goroutine
// works out for the loop (a dial, a token check).
//
// What it does not do: authenticate clients, parse anything beyond the
// message framing, route, forward CancelRequest, keep session state apart.
func cmdPoolCoro(args []string) error {
	return runPrototype("pool-coro", args, runCoroPool)
}

// coClient is a client connection and the coroutine that owns it. Only the
// coroutine changes srv and reads or writes the sockets; the callbacks set
// closed and queue it.
type coClient struct {
	elSock
	closed bool      // the connection is closed or asked to be
	srv    *coServer // the server it holds, nil while idle
	next   func() (struct{}, bool)
	stop   func()
	queued bool // in the run queue
	done   bool // the coroutine has returned
	// waits counts the client's waits for a server; expired is the one
	// whose time ran out (a timer of an earlier wait may fire late).
	waits, expired int
}

// coServer is a server connection: pooled (owner nil) or held by a client's
// coroutine.
type coServer struct {
	elSock
	sc     *serverConn
	owner  *coClient
	closed bool
	free   bool
}

// coProxy is the pool-coro prototype: a gnet event handler and the run
// queue of its coroutines. Its own fields are touched on the loop only (or,
// by endCoroutines, after the loop stopped).
type coProxy struct {
	loopBase
	hello   []byte
	free    []*coServer
	waiters []*coClient
	runq    []*coClient
	running bool
	closing []gnet.Conn // connections the coroutines asked to close
	live    map[*coClient]struct{}
}

// runCoroPool dials the pool, serves clients on cfg.Listen until ctx ends,
// then stops the engine.
func runCoroPool(ctx context.Context, cfg poolConfig) error {
	first, err := dialServer(ctx, cfg)
	if err != nil {
		return fmt.Errorf("server connection 1 of %d: %w", cfg.Size, err)
	}
	p := &coProxy{hello: greeting(first.params), live: map[*coClient]struct{}{}}
	p.loopBase = newLoopBase("pool-coro", ctx, cfg,
		func(k elSock, sc *serverConn) any { return &coServer{elSock: k, sc: sc} },
		func(k elSock) any { return &coClient{elSock: k} })
	return p.run(p, first, p.endCoroutines)
}

func (p *coProxy) OnOpen(c gnet.Conn) ([]byte, gnet.Action) {
	switch x := c.Context().(type) {
	case *coServer:
		x.enrolled(c)
		p.release(x)
		return nil, p.settle(c)
	case *coClient: // a TLS client after its handshake
		x.enrolled(c)
		p.start(x)
		if err := x.pull(); err != nil {
			return nil, gnet.Close
		}
		p.wake(x) // what came with the handshake's last flight
		return nil, p.settle(c)
	}
	cl := &coClient{elSock: elSock{c: c}}
	c.SetContext(cl)
	p.start(cl)
	return nil, gnet.None
}

// start makes cl's coroutine; it first runs when cl is woken.
func (p *coProxy) start(cl *coClient) {
	cl.next, cl.stop = iter.Pull(func(yield func(struct{}) bool) {
		p.serve(cl, func() bool { return yield(struct{}{}) && !p.stopping.Load() })
	})
	p.live[cl] = struct{}{}
}

func (p *coProxy) OnTraffic(c gnet.Conn) gnet.Action {
	switch x := c.Context().(type) {
	case *coClient:
		if err := x.pull(); err != nil {
			return gnet.Close // TLS ended (close_notify) or broke
		}
		p.wake(x)
	case *coServer:
		if err := x.pull(); err != nil {
			return gnet.Close
		}
		if x.owner != nil {
			p.wake(x.owner)
		} else {
			_ = x.take() // an asynchronous message to a pooled server: dropped
		}
	}
	return p.settle(c)
}

func (p *coProxy) OnClose(c gnet.Conn, _ error) gnet.Action {
	switch x := c.Context().(type) {
	case *coClient:
		x.closed = true
		p.wake(x)
	case *coServer:
		x.closed = true
		if x.free {
			p.unpool(x)
		}
		if x.owner != nil {
			p.wake(x.owner)
		}
		if p.ctx.Err() == nil && !p.stopping.Load() {
			p.replace()
		}
	}
	p.settle(nil)
	return gnet.None
}

// endCoroutines ends the coroutines still waiting once gnet.Run has
// returned: the loop has stopped and closed every connection. (gnet's
// OnShutdown runs before the loop stops, on another goroutine.) Not
// called when the engine would not stop: the loop may still run them.
func (p *coProxy) endCoroutines() {
	for cl := range p.live {
		cl.stop()
	}
	clear(p.live)
}

// wake queues cl's coroutine to run when the callback under way settles.
func (p *coProxy) wake(cl *coClient) {
	if cl.queued || cl.done {
		return
	}
	cl.queued = true
	p.runq = append(p.runq, cl)
}

// settle runs the queued coroutines, each until it yields or returns, and
// closes the connections they asked to close (whose OnClose may queue
// more). It returns gnet.Close when cur, the connection of the callback
// under way, is one of them: gnet closes that one itself on return.
func (p *coProxy) settle(cur gnet.Conn) gnet.Action {
	if p.running {
		// OnClose of a connection whose write failed inside a coroutine
		// (gnet closes it at once): the settle under way goes on.
		return gnet.None
	}
	act := gnet.None
	for {
		p.running = true
		for i := 0; i < len(p.runq); i++ {
			cl := p.runq[i]
			p.runq[i] = nil
			cl.queued = false
			if cl.done {
				continue
			}
			if _, ok := cl.next(); !ok {
				cl.done = true
				cl.stop()
				delete(p.live, cl)
			}
		}
		p.runq = p.runq[:0]
		p.running = false
		if len(p.closing) == 0 {
			return act
		}
		c := p.closing[len(p.closing)-1]
		p.closing = p.closing[:len(p.closing)-1]
		if c == cur {
			act = gnet.Close
			continue
		}
		_ = c.EventLoop().Close(c) // OnClose runs now, and queues the owner
	}
}

// closeClient asks for cl's connection to be closed.
func (p *coProxy) closeClient(cl *coClient) {
	if !cl.closed {
		cl.closed = true
		p.closing = append(p.closing, cl.c)
	}
}

// discard asks for s to be closed; OnClose dials a replacement.
func (p *coProxy) discard(s *coServer) {
	s.owner = nil
	if !s.closed {
		s.closed = true
		p.closing = append(p.closing, s.c)
	}
}

// unpool takes a closed server out of the free list.
func (p *coProxy) unpool(s *coServer) {
	if i := slices.Index(p.free, s); i >= 0 {
		p.free = slices.Delete(p.free, i, i+1)
	}
	s.free = false
}

// release hands s to the first client waiting, or pools it.
func (p *coProxy) release(s *coServer) {
	s.owner = nil
	for len(p.waiters) > 0 {
		cl := p.waiters[0]
		p.waiters[0] = nil
		p.waiters = p.waiters[1:]
		if cl.closed || cl.done {
			continue
		}
		s.owner, cl.srv = cl, s
		p.wake(cl)
		return
	}
	s.free = true
	p.free = append(p.free, s)
}

// acquire gives cl a server: a free one at once, or the first one back
// after every client that waited before it. It reports false when the
// client left or the prototype stops while it waits.
func (p *coProxy) acquire(cl *coClient, wait func() bool) bool {
	if n := len(p.free); n > 0 {
		s := p.free[n-1]
		p.free = p.free[:n-1]
		s.free = false
		s.owner, cl.srv = cl, s
		return true
	}
	p.waiters = append(p.waiters, cl)
	cl.waits++
	if d := p.cfg.WaitTimeout; d > 0 {
		n := cl.waits
		t := time.AfterFunc(d, func() { p.post(cl.c, func() { cl.expired = n; p.wake(cl) }) })
		defer t.Stop()
	}
	for cl.srv == nil {
		if cl.closed || !wait() {
			return false // release skips a closed client
		}
		if cl.expired == cl.waits && cl.srv == nil {
			_ = cl.write(errorResponse("08P01", "query_wait_timeout"))
			p.closeClient(cl)
			return false
		}
	}
	return true
}

// post runs fn on c's loop, from any goroutine, and then the coroutines it
// queued. After the engine stopped it does nothing.
func (p *coProxy) post(c gnet.Conn, fn func()) {
	_ = c.EventLoop().Execute(p.ctx, gnet.RunnableFunc(func(context.Context) error {
		fn()
		p.settle(nil)
		return nil
	}))
}

// serve is a client connection's life, run as its coroutine; wait yields
// to the loop and reports false when the prototype stops.
func (p *coProxy) serve(cl *coClient, wait func() bool) {
	if !p.startup(cl, wait) {
		p.closeClient(cl)
		return
	}
	var (
		cf, sf frames
		t      txn
	)
	for {
		// Idle, or in a transaction and thinking: wait for the client
		// (or for the server it holds to go away).
		for !cl.closed && len(cl.pending()) == 0 && (cl.srv == nil || !cl.srv.closed) {
			if !wait() {
				return
			}
		}
		if cl.closed {
			break
		}
		if cl.srv != nil && cl.srv.closed {
			cl.srv = nil
			p.closeClient(cl) // the server of its transaction is gone
			return
		}
		if cl.srv == nil {
			if b := cl.pending(); len(b) >= 5 && b[0] == 'X' && cf.atBoundary() {
				p.closeClient(cl) // Terminate while idle: no server needed
				return
			}
			if !p.acquire(cl, wait) {
				break
			}
			sf = frames{}
		}
		data := cl.take()
		fwd, term := cf.fromClient(data, &t)
		if fwd > 0 && !cl.srv.closed {
			_ = cl.srv.write(data[:fwd]) // a failed write closes the server: seen below
		}
		if term {
			p.closeClient(cl)
			break
		}
		if !p.exchange(cl, &cf, &sf, &t, wait) {
			break
		}
	}
	if cl.srv != nil {
		p.cleanUp(cl, &cf, &sf, &t, wait)
	}
}

// startup answers SSLRequest/GSSENCRequest with 'N' and a StartupMessage
// with the greeting; it reports false when the client is to be closed.
func (p *coProxy) startup(cl *coClient, wait func() bool) bool {
	for {
		if cl.closed {
			return false
		}
		b := cl.pending()
		size := startupLen(b)
		if size < 0 {
			return false
		}
		if size == 0 || len(b) < size {
			if !wait() {
				return false
			}
			continue
		}
		kind := startupKind(b[:size])
		extra := len(b) > size
		cl.discard(size)
		switch kind {
		case codeSSLRequest, codeGSSENC:
			_ = cl.write([]byte{'N'})
		case codeProtocol3:
			if extra {
				return false // nothing follows a StartupMessage before the greeting
			}
			_ = cl.write(p.hello)
			return true
		default:
			_ = cl.write(errorResponse("08P01", "pool prototype: unsupported startup request"))
			return false
		}
	}
}

// exchange passes replies to the client, and whatever more the client
// sends to the server, until the server may go back to the pool (it does)
// or the client owes the next message. It reports false when the client
// left (its server, if it holds one, is cleaned up by serve) or the server
// was lost (the client is closed).
func (p *coProxy) exchange(cl *coClient, cf, sf *frames, t *txn, wait func() bool) bool {
	for {
		s := cl.srv
		if s.closed {
			cl.srv = nil
			p.closeClient(cl)
			return false
		}
		if t.done(sf) {
			cl.srv = nil
			p.release(s)
			return true
		}
		if t.replied(sf) {
			return true
		}
		if !wait() {
			return false
		}
		if s.closed {
			continue
		}
		if b := s.take(); len(b) > 0 {
			sf.fromServer(b, t)
			if sf.broken {
				cl.srv = nil
				p.discard(s)
				p.closeClient(cl)
				return false
			}
			if !cl.closed {
				_ = cl.write(b)
			}
		}
		if cl.closed {
			return false
		}
		if len(cl.pending()) > 0 {
			data := cl.take()
			fwd, term := cf.fromClient(data, t)
			if fwd > 0 && !s.closed {
				_ = s.write(data[:fwd])
			}
			if term {
				p.closeClient(cl)
				return false
			}
		}
	}
}

// cleanUp handles the server a departed client held: one running a
// statement has it cancelled and is closed and replaced; otherwise the
// replies owed are read and an open transaction ended (Sync for an
// unfinished extended-protocol batch, ROLLBACK for a transaction block)
// before it goes back to the pool.
func (p *coProxy) cleanUp(cl *coClient, cf, sf *frames, t *txn, wait func() bool) {
	s := cl.srv
	cl.srv = nil
	if s.closed {
		return
	}
	if !cf.atBoundary() || sf.broken || p.stopping.Load() {
		p.discard(s)
		return
	}
	if t.pending > 0 {
		// A statement runs: cancel it and close the connection instead of
		// pooling it, as PgBouncer does; a cancel that lands late then
		// hits no other client's statement.
		p.cancelStatement(s.sc)
		p.discard(s)
		return
	}
	var c cleaning
	for {
		if t.pending == 0 && sf.atBoundary() {
			msg, done, err := c.next(t)
			if done {
				p.release(s)
				return
			}
			if err != nil {
				p.discard(s)
				return
			}
			_ = s.write(msg)
		}
		if !wait() || s.closed {
			p.discard(s)
			return
		}
		if b := s.take(); len(b) > 0 {
			if sf.fromServer(b, t); sf.broken {
				p.discard(s)
				return
			}
		}
	}
}
