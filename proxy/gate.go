package proxy

import (
	"context"
	"sync"
)

// gate holds new transactions of a paused project (PgBouncer PAUSE): while
// closed, acquiring a backend waits; running transactions are not touched.
type gate struct {
	mu     sync.Mutex
	open   chan struct{} // closed channel = open gate
	paused bool
	active int // units holding a backend
	idle   *sync.Cond
}

func newGate() *gate {
	g := &gate{open: make(chan struct{})}
	close(g.open)
	g.idle = sync.NewCond(&g.mu)
	return g
}

// enter waits until the gate is open, then counts one running unit.
func (g *gate) enter(ctx context.Context) error {
	for {
		g.mu.Lock()
		ch := g.open
		if !g.paused {
			g.active++
			g.mu.Unlock()
			return nil
		}
		g.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// tryEnter enters an open gate without waiting.
func (g *gate) tryEnter() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.paused {
		return false
	}
	g.active++
	return true
}

// leave ends one running unit.
func (g *gate) leave() {
	g.mu.Lock()
	g.active--
	if g.active == 0 {
		g.idle.Broadcast()
	}
	g.mu.Unlock()
}

// pause closes the gate; it returns at once. waitIdle waits for running units.
func (g *gate) pause() {
	g.mu.Lock()
	if !g.paused {
		g.paused = true
		g.open = make(chan struct{})
	}
	g.mu.Unlock()
}

func (g *gate) resume() {
	g.mu.Lock()
	if g.paused {
		g.paused = false
		close(g.open)
	}
	g.mu.Unlock()
}

// waitIdle blocks until no unit runs or ctx ends.
func (g *gate) waitIdle(ctx context.Context) error {
	done := make(chan struct{})
	go func() {
		g.mu.Lock()
		for g.active > 0 && ctx.Err() == nil {
			g.idle.Wait()
		}
		g.mu.Unlock()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		g.mu.Lock()
		g.idle.Broadcast()
		g.mu.Unlock()
		<-done
		return ctx.Err()
	}
}
