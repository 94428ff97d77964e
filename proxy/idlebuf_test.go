package proxy_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"cascata/proxy"

	"github.com/jackc/pgx/v5"
)

// Idle clients give their buffers back, and a client that comes back gets
// its own bytes only: buffers pass between sessions, so each of many
// clients sends a large text of its own, idles, and must read back exactly
// that text, on both protocols.
func TestIdleClientsShareNoBytes(t *testing.T) {
	h := startProxy(t, harnessOpts{})
	const clients = 24
	conns := make([]*pgx.Conn, clients)
	for i := range conns {
		conns[i] = h.connect("p1", "anon", fmt.Sprintf("idle-%d", i))
	}
	waitFor(t, "idle clients give their write buffers back", 5*time.Second, func() bool { return proxy.WritersHeld(h.srv) == 0 })

	// Round 1 runs right away; before round 2 every client has idled long
	// enough for its read buffer to go back too, so that round reads
	// through buffers other sessions used.
	for round := range 2 {
		if round == 1 {
			waitFor(t, "idle clients give their read buffers back", 10*time.Second, func() bool { return proxy.ReadersHeld(h.srv) == 0 })
		}
		talk(t, conns, round)
	}
	waitFor(t, "the clients idle again without write buffers", 5*time.Second, func() bool { return proxy.WritersHeld(h.srv) == 0 })
}

// talk has each client read back texts of its own, unlike every other's.
func talk(t *testing.T, conns []*pgx.Conn, round int) {
	t.Helper()
	const rounds = 6
	var wg sync.WaitGroup
	errs := make(chan error, len(conns))
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			for r := range rounds {
				// Texts larger than a page and unlike every other client's.
				want := strings.Repeat(fmt.Sprintf("<client %02d round %d.%d>", i, round, r), 1200)
				var got string
				var err error
				if r%2 == 0 {
					err = c.QueryRow(ctx, "SELECT $1::text", want).Scan(&got)
				} else {
					err = c.QueryRow(ctx, "SELECT '"+want+"'::text", pgx.QueryExecModeSimpleProtocol).Scan(&got)
				}
				if err != nil {
					errs <- fmt.Errorf("client %d round %d: %w", i, r, err)
					return
				}
				if got != want {
					errs <- fmt.Errorf("client %d round %d read %d bytes that are not its own (starting %.40q)", i, r, len(got), got)
					return
				}
				time.Sleep(time.Duration(i%4) * time.Millisecond) // idle in between, unevenly
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
