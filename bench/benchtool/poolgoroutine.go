package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"cascata/internal/sockio"
)

// cmdPoolGoroutine runs the goroutine-per-client prototype of a
// transaction-pooling relay until SIGTERM or -dur.
//
// One goroutine per client connection. While the client is idle it holds
// no server and no buffer: it waits for its socket to become readable
// (sockio.WaitReadable, no buffer), takes a read buffer from a pool, takes
// a free server connection (FIFO when none is free), writes the client's
// bytes to the server and reads the reply itself, writing it on to the
// client, until the server's ReadyForQuery 'I' answers the last request:
// then the server goes back to the pool and the buffer back to its pool.
// No second goroutine, no channel carries data. While it waits for a
// reply the server connection has a read deadline that lapses every
// clientPoll; each time, the client socket is looked at without blocking,
// so a client that left during a long statement is noticed: its statement
// is cancelled (CancelRequest), the reply drained, an open transaction
// rolled back, and only then is the server pooled again (or closed and
// replaced when that fails).
//
// What it does not do: authenticate clients, parse anything beyond the
// message framing, route, forward CancelRequest, keep session state apart
// (named prepared statements land on whichever server is free, as with
// PgBouncer 1.18 in transaction mode).
func cmdPoolGoroutine(args []string) error {
	return runPrototype("pool-goroutine", args, func(ctx context.Context, cfg poolConfig) error {
		if cfg.ClientTLS != nil || cfg.ServerTLS {
			return errors.New("TLS: pool-eventloop and pool-coro only")
		}
		if cfg.WaitTimeout > 0 {
			return errors.New("-wait-timeout: pool-coro only")
		}
		ln, err := net.Listen("tcp", cfg.Listen)
		if err != nil {
			return fmt.Errorf("listen: %w", err)
		}
		return runGoroutinePool(ctx, cfg, ln)
	})
}

const (
	// clientPoll is how often a goroutine waiting for a server reply looks
	// whether its client is still there.
	clientPoll = 100 * time.Millisecond
	// relayBufSize is the read buffer a client takes while data is in flight.
	relayBufSize = 16 << 10
	// drainTimeout bounds cleaning a server connection a client left.
	drainTimeout = 10 * time.Second
)

// errClientGone ends a client's exchange: the client closed or failed.
var errClientGone = errors.New("client gone")

// gServer is a pooled server connection of the goroutine prototype.
type gServer struct {
	*serverConn
	deadline time.Time // read deadline set on conn
}

// gPool hands out server connections: a free one if any, else in arrival
// order as they come back.
type gPool struct {
	cfg     poolConfig
	mu      sync.Mutex
	free    []*gServer
	waiters []chan *gServer
	all     map[*gServer]struct{} // every open server, closed at shutdown
	closed  bool
	wg      sync.WaitGroup // replacement dials
}

func (p *gPool) acquire(ctx context.Context, ch chan *gServer) (*gServer, error) {
	p.mu.Lock()
	if n := len(p.free); n > 0 {
		s := p.free[n-1]
		p.free = p.free[:n-1]
		p.mu.Unlock()
		return s, nil
	}
	p.waiters = append(p.waiters, ch)
	p.mu.Unlock()
	select {
	case s := <-ch:
		return s, nil
	case <-ctx.Done():
		p.mu.Lock()
		for i, w := range p.waiters {
			if w == ch {
				p.waiters = append(p.waiters[:i], p.waiters[i+1:]...)
				break
			}
		}
		p.mu.Unlock()
		select {
		case s := <-ch: // handed over before the waiter was removed
			p.release(s)
		default:
		}
		return nil, fmt.Errorf("waiting for a server: %w", ctx.Err())
	}
}

func (p *gPool) release(s *gServer) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		_ = s.conn.Close()
		delete(p.all, s)
		return
	}
	if len(p.waiters) > 0 {
		ch := p.waiters[0]
		copy(p.waiters, p.waiters[1:])
		p.waiters = p.waiters[:len(p.waiters)-1]
		ch <- s
		return
	}
	p.free = append(p.free, s)
}

func (p *gPool) add(s *gServer) bool {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		_ = s.conn.Close()
		return false
	}
	p.all[s] = struct{}{}
	p.mu.Unlock()
	return true
}

// discard closes a server connection that cannot be reused and dials its
// replacement in the background (until ctx ends).
func (p *gPool) discard(ctx context.Context, s *gServer) {
	_ = s.conn.Close()
	p.mu.Lock()
	delete(p.all, s)
	p.mu.Unlock()
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for ctx.Err() == nil {
			sc, err := dialServer(ctx, p.cfg)
			if err == nil {
				n := &gServer{serverConn: sc}
				n.conn = sockio.New(n.conn)
				if p.add(n) {
					p.release(n)
				}
				return
			}
			fmt.Fprintf(os.Stderr, "pool-goroutine: replacing a server connection: %v\n", err)
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}()
}

// close closes every server connection; later releases close theirs.
func (p *gPool) close() {
	p.mu.Lock()
	p.closed = true
	for s := range p.all {
		_ = s.conn.Close()
	}
	p.free = nil
	p.mu.Unlock()
	p.wg.Wait()
}

// goroutineProxy is the pool-goroutine prototype.
type goroutineProxy struct {
	cfg   poolConfig
	pool  *gPool
	hello []byte
	bufs  sync.Pool // *[]byte of relayBufSize

	mu      sync.Mutex
	clients map[net.Conn]struct{}
}

// runGoroutinePool dials the pool, then serves clients from ln until ctx
// ends; it closes ln.
func runGoroutinePool(ctx context.Context, cfg poolConfig, ln net.Listener) error {
	defer ln.Close()
	pool := &gPool{cfg: cfg, all: map[*gServer]struct{}{}}
	defer pool.close()
	var hello []byte
	for i := 0; i < cfg.Size; i++ {
		sc, err := dialServer(ctx, cfg)
		if err != nil {
			if ctx.Err() != nil { // stopped while starting
				return nil
			}
			return fmt.Errorf("server connection %d of %d: %w", i+1, cfg.Size, err)
		}
		if hello == nil {
			hello = greeting(sc.params)
		}
		s := &gServer{serverConn: sc}
		s.conn = sockio.New(s.conn)
		pool.add(s)
		pool.release(s)
	}
	p := &goroutineProxy{cfg: cfg, pool: pool, hello: hello, clients: map[net.Conn]struct{}{}}
	p.bufs.New = func() any { b := make([]byte, relayBufSize); return &b }

	var wg sync.WaitGroup
	defer wg.Wait()
	stopped := make(chan struct{})
	defer close(stopped)
	go func() {
		select {
		case <-ctx.Done():
		case <-stopped:
		}
		_ = ln.Close()
		p.mu.Lock()
		for c := range p.clients {
			_ = c.Close()
		}
		p.mu.Unlock()
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		c = sockio.New(c)
		p.mu.Lock()
		p.clients[c] = struct{}{}
		p.mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.serve(ctx, c)
			_ = c.Close()
			p.mu.Lock()
			delete(p.clients, c)
			p.mu.Unlock()
		}()
	}
}

func (p *goroutineProxy) getBuf() *[]byte  { return p.bufs.Get().(*[]byte) }
func (p *goroutineProxy) putBuf(b *[]byte) { p.bufs.Put(b) }

// startup answers SSLRequest/GSSENCRequest with 'N' and a StartupMessage
// with the greeting; it reports false when the client is to be closed.
func (p *goroutineProxy) startup(c net.Conn) bool {
	buf := p.getBuf()
	defer p.putBuf(buf)
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	defer func() { _ = c.SetReadDeadline(time.Time{}) }()
	have := 0
	for {
		n, err := c.Read((*buf)[have:])
		have += n
		for {
			size := startupLen((*buf)[:have])
			if size < 0 {
				return false
			}
			if size == 0 || have < size {
				break
			}
			switch startupKind((*buf)[:size]) {
			case codeSSLRequest, codeGSSENC:
				if _, err := c.Write([]byte{'N'}); err != nil {
					return false
				}
				have = copy(*buf, (*buf)[size:have])
				continue
			case codeProtocol3:
				if have > size {
					return false // nothing follows a StartupMessage before the greeting
				}
				_, err := c.Write(p.hello)
				return err == nil
			default:
				_, _ = c.Write(errorResponse("08P01", "pool prototype: unsupported startup request"))
				return false
			}
		}
		if err != nil {
			return false
		}
	}
}

// serve runs one client connection.
func (p *goroutineProxy) serve(ctx context.Context, c net.Conn) {
	if !p.startup(c) {
		return
	}
	var (
		srv    *gServer
		cf, sf frames
		t      txn
		wait   chan *gServer // made on the first wait for a server
	)
	for {
		// Idle (or in a transaction, thinking): no buffer while waiting.
		if err := sockio.WaitReadable(c); err != nil {
			break
		}
		buf := p.getBuf()
		n, _ := c.Read(*buf)
		if n == 0 {
			p.putBuf(buf)
			break
		}
		fwd, term := cf.fromClient((*buf)[:n], &t)
		if srv == nil && fwd > 0 {
			if wait == nil {
				wait = make(chan *gServer, 1)
			}
			var err error
			if srv, err = p.pool.acquire(ctx, wait); err != nil {
				p.putBuf(buf)
				break
			}
			sf = frames{}
		}
		if fwd > 0 {
			if _, err := srv.conn.Write((*buf)[:fwd]); err != nil {
				p.putBuf(buf)
				p.pool.discard(ctx, srv)
				srv = nil
				break
			}
		}
		if term {
			p.putBuf(buf)
			break
		}
		var err error
		if srv != nil {
			var released bool
			released, err = p.exchange(c, srv, buf, &cf, &sf, &t)
			if released {
				srv = nil
			}
		}
		p.putBuf(buf)
		if err != nil {
			if !errors.Is(err, errClientGone) {
				p.pool.discard(ctx, srv)
				srv = nil
			}
			break
		}
	}
	if srv != nil {
		p.cleanUp(ctx, srv, &cf, &sf, &t)
	}
}

// exchange reads the server's replies and writes them to the client until
// the server may go back to the pool (released) or the client owes the
// next message. errClientGone: the client left; other errors: the server
// failed.
func (p *goroutineProxy) exchange(c net.Conn, s *gServer, buf *[]byte, cf, sf *frames, t *txn) (released bool, err error) {
	for {
		if t.done(sf) {
			p.pool.release(s)
			return true, nil
		}
		if t.replied(sf) {
			return false, nil
		}
		now := time.Now()
		if s.deadline.Sub(now) < clientPoll/2 {
			s.deadline = now.Add(clientPoll)
			if err := s.conn.SetReadDeadline(s.deadline); err != nil {
				return false, fmt.Errorf("server deadline: %w", err)
			}
		}
		n, err := s.conn.Read(*buf)
		if n > 0 {
			sf.fromServer((*buf)[:n], t)
			if sf.broken {
				return false, errors.New("server framing lost")
			}
			if _, err := c.Write((*buf)[:n]); err != nil {
				return false, errClientGone
			}
		}
		if err == nil {
			continue
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			return false, fmt.Errorf("server read: %w", err)
		}
		// A long statement, or a client with more to say: look at the
		// client without blocking.
		if !readableNow(c) {
			continue
		}
		n, _ = c.Read(*buf)
		if n == 0 {
			return false, errClientGone
		}
		fwd, term := cf.fromClient((*buf)[:n], t)
		if fwd > 0 {
			if _, err := s.conn.Write((*buf)[:fwd]); err != nil {
				return false, fmt.Errorf("server write: %w", err)
			}
		}
		if term {
			return false, errClientGone
		}
	}
}

// readableNow reports whether c has bytes, an end or an error to read,
// without waiting and without reading.
func readableNow(c net.Conn) bool {
	raw := sockio.Raw(c)
	if raw == nil {
		return true
	}
	ready := false
	_ = raw.Read(func(fd uintptr) bool {
		var b [1]byte
		_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		ready = err != syscall.EAGAIN
		return true
	})
	return ready
}

// cleanUp handles a server a client left attached: one running a
// statement has it cancelled and is closed and replaced; otherwise the
// replies owed are read and an open transaction ended before it goes back
// to the pool, and a server that cannot be cleaned is closed and replaced.
func (p *goroutineProxy) cleanUp(ctx context.Context, s *gServer, cf, sf *frames, t *txn) {
	if !cf.atBoundary() || sf.broken || ctx.Err() != nil {
		p.pool.discard(ctx, s) // at shutdown too: no drain holds it up
		return
	}
	if t.pending > 0 {
		// A statement runs: cancel it and close the connection instead of
		// pooling it, as PgBouncer does; a cancel that lands late then
		// hits no other client's statement.
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if err := sendCancel(cctx, p.cfg.Target, s.serverConn); err != nil {
			fmt.Fprintf(os.Stderr, "pool-goroutine: %v\n", err)
		}
		cancel()
		p.pool.discard(ctx, s)
		return
	}
	if err := drainServer(s.conn, sf, t); err != nil {
		fmt.Fprintf(os.Stderr, "pool-goroutine: cleaning a server a client left: %v\n", err)
		p.pool.discard(ctx, s)
		return
	}
	s.deadline = time.Time{}
	if err := s.conn.SetReadDeadline(time.Time{}); err != nil {
		p.pool.discard(ctx, s)
		return
	}
	p.pool.release(s)
}

// drainServer reads a server's owed replies and ends an open transaction
// (Sync for an unfinished extended-protocol batch, ROLLBACK for a
// transaction block), within drainTimeout.
func drainServer(c net.Conn, sf *frames, t *txn) error {
	if err := c.SetReadDeadline(time.Now().Add(drainTimeout)); err != nil {
		return fmt.Errorf("deadline: %w", err)
	}
	buf := make([]byte, 4096)
	var cl cleaning
	for {
		if t.pending == 0 && sf.atBoundary() {
			msg, done, err := cl.next(t)
			if done || err != nil {
				return err
			}
			if _, err := c.Write(msg); err != nil {
				return fmt.Errorf("write: %w", err)
			}
		}
		n, err := c.Read(buf)
		sf.fromServer(buf[:n], t)
		if sf.broken {
			return errors.New("server framing lost")
		}
		if err != nil {
			return fmt.Errorf("read: %w", err)
		}
	}
}
