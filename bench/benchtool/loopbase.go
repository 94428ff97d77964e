package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/panjf2000/gnet/v2"
	"github.com/panjf2000/gnet/v2/pkg/logging"
)

// loopBase is what the two gnet prototypes (pool-eventloop, pool-coro)
// share: one engine with one loop, like PgBouncer's one thread, its start
// and stop, and the server connections, each dialled and logged in by
// pgconn in a goroutine and then enrolled in the loop. The prototype
// embeds it and is the engine's event handler.
type loopBase struct {
	gnet.BuiltinEventEngine
	name string
	ctx  context.Context
	cfg  poolConfig
	// The prototype's state for a server connection, and for a TLS
	// client after its handshake, which its OnOpen takes up.
	newServer    func(elSock, *serverConn) any
	newTLSClient func(elSock) any
	booted       chan struct{} // the loop runs: servers may be enrolled
	ticked       bool          // OnTick ran once (the ticker's goroutine only)
	eng          gnet.Engine
	wg           sync.WaitGroup // cancel requests, replacement dials, TLS handshakes
	stopping     atomic.Bool    // the engine is being stopped: no replacements
}

func newLoopBase(name string, ctx context.Context, cfg poolConfig, newServer func(elSock, *serverConn) any, newTLSClient func(elSock) any) loopBase {
	return loopBase{name: name, ctx: ctx, cfg: cfg, newServer: newServer, newTLSClient: newTLSClient, booted: make(chan struct{}, 1)}
}

// run serves h with first and cfg.Size-1 more server connections until
// ctx ends, then stops the engine and calls afterStop (if not nil) once
// gnet.Run has returned; it waits for the goroutines it started (b.wg)
// before it returns.
func (b *loopBase) run(h gnet.EventHandler, first *serverConn, afterStop func()) error {
	defer b.wg.Wait()
	addr, tlsLn, err := b.clientTLS()
	if err != nil {
		_ = first.conn.Close()
		return err
	}
	closeTLS := func() {
		if tlsLn != nil {
			_ = tlsLn.Close() // acceptTLS ends
		}
	}
	defer closeTLS() // before the wait
	runErr := make(chan error, 1)
	go func() {
		runErr <- gnet.Run(h, "tcp://"+addr,
			gnet.WithMulticore(false),
			gnet.WithNumEventLoop(1),
			// Register from other goroutines races with accept under
			// gnet's round-robin balancer, not under this one.
			gnet.WithLoadBalancing(gnet.LeastConnections),
			gnet.WithTCPNoDelay(gnet.TCPNoDelay),
			gnet.WithTicker(true),
			gnet.WithReuseAddr(true),
			gnet.WithLogLevel(logging.WarnLevel))
	}()
	ended := func(err error) error {
		if afterStop != nil {
			afterStop()
		}
		return err
	}
	select {
	case <-b.booted:
	case err := <-runErr:
		_ = first.conn.Close()
		return ended(fmt.Errorf("gnet: %w", err))
	}
	stop := func() error {
		b.stopping.Store(true)
		closeTLS()
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := b.eng.Stop(sctx); err != nil {
			return fmt.Errorf("stop gnet: %w", err) // the loop may still run: nothing more is touched
		}
		return ended(<-runErr)
	}
	if err := b.enroll(first); err != nil {
		_ = stop()
		return err
	}
	if tlsLn != nil {
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			b.acceptTLS(tlsLn)
		}()
	}
	for i := 1; i < b.cfg.Size; i++ {
		sc, err := dialServer(b.ctx, b.cfg)
		if err == nil {
			err = b.enroll(sc)
		}
		if err != nil {
			if b.ctx.Err() != nil { // stopped while starting
				return stop()
			}
			_ = stop()
			return fmt.Errorf("server connection %d of %d: %w", i+1, b.cfg.Size, err)
		}
	}
	select {
	case <-b.ctx.Done():
		return stop()
	case err := <-runErr:
		return ended(fmt.Errorf("gnet: %w", err))
	}
}

// enroll hands a logged-in server connection to the loop, whose OnOpen
// pools it.
func (b *loopBase) enroll(sc *serverConn) error {
	k, sock := serverSock(sc)
	if err := b.register(b.newServer(k, sc), sock); err != nil {
		return fmt.Errorf("enroll server: %w", err)
	}
	return nil
}

// register enrolls sock, a plain TCP connection, in the loop with state
// x, which the prototype's OnOpen takes up. gnet keeps a duplicate of the
// socket and closes sock.
func (b *loopBase) register(x any, sock net.Conn) error {
	res, err := b.eng.Register(gnet.NewNetConnContext(gnet.NewContext(b.ctx, x), sock))
	if err != nil {
		_ = sock.Close()
		return err
	}
	select {
	case r := <-res:
		return r.Err
	case <-b.ctx.Done():
		return b.ctx.Err()
	}
}

// replace dials a server connection in the background and enrolls it.
func (b *loopBase) replace() {
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		for b.ctx.Err() == nil && !b.stopping.Load() {
			sc, err := dialServer(b.ctx, b.cfg)
			if err == nil {
				if err = b.enroll(sc); err == nil {
					return
				}
			}
			fmt.Fprintf(os.Stderr, "%s: replacing a server connection: %v\n", b.name, err)
			select {
			case <-b.ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}()
}

// cancelStatement sends sc's server a CancelRequest from a goroutine:
// dialling must not block the loop.
func (b *loopBase) cancelStatement(sc *serverConn) {
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		cctx, cancel := context.WithTimeout(b.ctx, 5*time.Second)
		defer cancel()
		if err := sendCancel(cctx, b.cfg.Target, sc); err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", b.name, err)
		}
	}()
}

// OnBoot runs before gnet has set its loop up; OnTick's first run comes
// after, and only then may Register be called.
func (b *loopBase) OnBoot(eng gnet.Engine) gnet.Action {
	b.eng = eng
	return gnet.None
}

func (b *loopBase) OnTick() (time.Duration, gnet.Action) {
	if !b.ticked {
		b.ticked = true
		b.booted <- struct{}{}
	}
	return time.Hour, gnet.None
}
