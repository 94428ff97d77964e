package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/panjf2000/gnet/v2"
)

// cmdPoolEventLoop runs the event-loop prototype of a transaction-pooling
// relay until SIGTERM or -dur.
//
// One gnet event loop (one goroutine, epoll) holds every connection: the
// clients it accepts and the server connections, which are dialled and
// logged in by pgconn at start and then enrolled in the same loop
// (Engine.Register with the net.Conn). No goroutine per connection and
// no hand-off between loops: a callback for a client's bytes writes them
// to its server's socket, a callback for a server's bytes writes them to
// its client's socket, both on the loop's own read buffer. A client that
// sends while no server is free leaves its bytes in gnet's per-connection
// buffer and queues (FIFO); a server that comes back takes the first in
// the queue and writes its waiting bytes. A client that leaves while its
// server owes replies gets its statement cancelled (CancelRequest, sent
// from a short-lived goroutine: dialling must not block the loop) and the
// server closed and replaced; one that leaves inside a transaction with
// nothing running gets it rolled back before the server is pooled again; a
// server that fails is replaced by a dial in a goroutine, enrolled in the
// loop when logged in.
//
// With -tls-cert and -tls-key clients must come over TLS (PgBouncer's
// client_tls_sslmode = require), and with -server-sslmode require the
// server connections are TLS too: each handshake runs in a goroutine on
// the plain socket before the loop takes it over (looptls.go). TLS clients
// are then accepted by a net.Listener of their own and enrolled in the loop
// after their handshake, like the server connections.
//
// What it does not do: authenticate clients, parse anything beyond the
// message framing, route, forward CancelRequest, keep session state apart.
// One loop only, like PgBouncer's one thread: with more loops a client and
// its server would sit in different loops and every write would become a
// queued task.
func cmdPoolEventLoop(args []string) error {
	return runPrototype("pool-eventloop", args, func(ctx context.Context, cfg poolConfig) error {
		if cfg.WaitTimeout > 0 {
			return errors.New("-wait-timeout: pool-coro only")
		}
		return runEventLoopPool(ctx, cfg)
	})
}

// elClient is a client connection's state; touched on the loop only.
type elClient struct {
	elSock
	started bool // StartupMessage answered
	waiting bool // queued for a server, its bytes kept (pending)
	closed  bool
	srv     *elServer
	cf      frames
}

// elServer is a server connection's state; touched on the loop only.
type elServer struct {
	elSock
	sc       *serverConn
	client   *elClient // nil while pooled or draining
	sf       frames
	t        txn
	draining bool     // its client left; replies owed are read and dropped
	clean    cleaning // how far the draining has gone
	free     bool
}

// elProxy is the pool-eventloop prototype: a gnet event handler.
type elProxy struct {
	loopBase
	hello   []byte
	sslNo   []byte
	free    []*elServer
	waiters []*elClient
}

// runEventLoopPool dials the pool, serves clients on cfg.Listen until ctx
// ends, then stops the engine.
func runEventLoopPool(ctx context.Context, cfg poolConfig) error {
	first, err := dialServer(ctx, cfg)
	if err != nil {
		return fmt.Errorf("server connection 1 of %d: %w", cfg.Size, err)
	}
	p := &elProxy{hello: greeting(first.params), sslNo: []byte{'N'}}
	p.loopBase = newLoopBase("pool-eventloop", ctx, cfg,
		func(k elSock, sc *serverConn) any { return &elServer{elSock: k, sc: sc} },
		func(k elSock) any { return &elClient{elSock: k} })
	return p.run(p, first, nil)
}

func (p *elProxy) OnOpen(c gnet.Conn) ([]byte, gnet.Action) {
	switch x := c.Context().(type) {
	case *elServer:
		x.enrolled(c)
		p.release(x)
		return nil, gnet.None
	case *elClient: // a TLS client after its handshake
		x.enrolled(c)
		if err := x.pull(); err != nil {
			return nil, gnet.Close
		}
		return nil, p.clientTraffic(x)
	}
	c.SetContext(&elClient{elSock: elSock{c: c}})
	return nil, gnet.None
}

func (p *elProxy) OnTraffic(c gnet.Conn) gnet.Action {
	switch x := c.Context().(type) {
	case *elClient:
		if err := x.pull(); err != nil {
			return gnet.Close // TLS ended (close_notify) or broke
		}
		return p.clientTraffic(x)
	case *elServer:
		return p.serverTraffic(x)
	}
	return gnet.Close
}

func (p *elProxy) OnClose(c gnet.Conn, _ error) gnet.Action {
	switch x := c.Context().(type) {
	case *elClient:
		p.clientClosed(x)
	case *elServer:
		p.serverClosed(x)
	}
	return gnet.None
}

func (p *elProxy) clientTraffic(cl *elClient) gnet.Action {
	if !cl.started {
		return p.startup(cl)
	}
	if cl.waiting {
		return gnet.None // the bytes stay in c's buffer until a server is free
	}
	if cl.srv == nil {
		if b := cl.pending(); len(b) >= 5 && b[0] == 'X' && cl.cf.atBoundary() {
			return gnet.Close // Terminate while idle: no server needed
		}
		if !p.attach(cl) {
			cl.waiting = true
			p.waiters = append(p.waiters, cl)
			return gnet.None
		}
	}
	return p.forward(cl)
}

// startup answers SSLRequest/GSSENCRequest with 'N' and a StartupMessage
// with the greeting.
func (p *elProxy) startup(cl *elClient) gnet.Action {
	for {
		b := cl.pending()
		size := startupLen(b)
		if size < 0 {
			return gnet.Close
		}
		if size == 0 || len(b) < size {
			return gnet.None
		}
		kind := startupKind(b[:size])
		extra := len(b) > size
		cl.discard(size)
		switch kind {
		case codeSSLRequest, codeGSSENC:
			if err := cl.write(p.sslNo); err != nil {
				return gnet.None // the write closed the connection
			}
		case codeProtocol3:
			if extra {
				return gnet.Close // nothing follows a StartupMessage before the greeting
			}
			cl.started = true
			_ = cl.write(p.hello)
			return gnet.None
		default:
			_ = cl.write(errorResponse("08P01", "pool prototype: unsupported startup request"))
			return gnet.Close
		}
	}
}

// attach gives cl a free server, if any.
func (p *elProxy) attach(cl *elClient) bool {
	n := len(p.free)
	if n == 0 {
		return false
	}
	s := p.free[n-1]
	p.free = p.free[:n-1]
	s.free = false
	s.client, cl.srv = cl, s
	s.t = txn{}
	return true
}

// forward writes cl's buffered bytes to its server.
func (p *elProxy) forward(cl *elClient) gnet.Action {
	s := cl.srv
	data := cl.take()
	fwd, term := cl.cf.fromClient(data, &s.t)
	if fwd > 0 {
		if err := s.write(data[:fwd]); err != nil {
			return gnet.Close // the write closed the server; OnClose replaces it
		}
	}
	if term {
		return gnet.Close
	}
	return gnet.None
}

func (p *elProxy) serverTraffic(s *elServer) gnet.Action {
	if err := s.pull(); err != nil {
		return gnet.Close
	}
	data := s.take()
	s.sf.fromServer(data, &s.t)
	if s.sf.broken {
		return gnet.Close
	}
	if cl := s.client; cl != nil {
		_ = cl.write(data) // a failed write closes cl: OnClose detaches s
		if s.client == nil {
			return p.drain(s)
		}
		if s.t.done(&s.sf) {
			s.client, cl.srv = nil, nil
			p.release(s)
		}
		return gnet.None
	}
	if s.draining {
		return p.drain(s)
	}
	return gnet.None // an asynchronous message to a pooled server: dropped
}

// release pools s, or hands it to the first client waiting.
func (p *elProxy) release(s *elServer) {
	for len(p.waiters) > 0 {
		cl := p.waiters[0]
		copy(p.waiters, p.waiters[1:])
		p.waiters[len(p.waiters)-1] = nil
		p.waiters = p.waiters[:len(p.waiters)-1]
		if cl.closed {
			continue
		}
		cl.waiting = false
		s.client, cl.srv = cl, s
		s.t = txn{}
		if p.forward(cl) == gnet.Close {
			_ = cl.c.EventLoop().Close(cl.c)
		}
		return
	}
	s.free = true
	p.free = append(p.free, s)
}

// clientClosed detaches a departing client; its server, if it owes
// replies or is inside a transaction, is drained before it is pooled.
func (p *elProxy) clientClosed(cl *elClient) {
	cl.closed = true
	s := cl.srv
	if s == nil {
		return
	}
	cl.srv, s.client = nil, nil
	if !cl.cf.atBoundary() {
		// Half a message went to the server: nothing can finish it.
		_ = s.c.EventLoop().Close(s.c)
		return
	}
	if s.t.done(&s.sf) {
		p.release(s)
		return
	}
	if s.t.pending > 0 {
		// A statement runs: cancel it (the server process stops sleeping
		// or working) and close the connection instead of pooling it, as
		// PgBouncer does; a cancel that lands late then hits no other
		// client's statement. serverClosed dials a replacement.
		p.cancelStatement(s.sc)
		_ = s.c.EventLoop().Close(s.c)
		return
	}
	s.draining, s.clean = true, cleaning{}
	if p.drain(s) == gnet.Close {
		_ = s.c.EventLoop().Close(s.c)
	}
}

// drain moves a server whose client left towards the pool: once every
// reply is in, Sync for an unfinished extended-protocol batch, ROLLBACK
// for an open transaction, then release.
func (p *elProxy) drain(s *elServer) gnet.Action {
	if s.t.pending > 0 || !s.sf.atBoundary() {
		return gnet.None
	}
	msg, done, err := s.clean.next(&s.t)
	if err != nil {
		return gnet.Close
	}
	if done {
		s.draining = false
		p.release(s)
		return gnet.None
	}
	if err := s.write(msg); err != nil {
		return gnet.None // the write closed the server; OnClose replaces it
	}
	return gnet.None
}

// serverClosed drops a server that failed or was closed, closes its
// client and dials a replacement.
func (p *elProxy) serverClosed(s *elServer) {
	if s.free {
		for i, f := range p.free {
			if f == s {
				p.free = append(p.free[:i], p.free[i+1:]...)
				break
			}
		}
		s.free = false
	}
	if cl := s.client; cl != nil {
		s.client, cl.srv = nil, nil
		if !cl.closed {
			_ = cl.c.EventLoop().Close(cl.c)
		}
	}
	s.draining = false
	if p.ctx.Err() == nil && !p.stopping.Load() {
		p.replace()
	}
}
