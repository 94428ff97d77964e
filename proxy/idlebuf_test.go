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
	const clients, rounds = 24, 6
	conns := make([]*pgx.Conn, clients)
	for i := range conns {
		conns[i] = h.connect("p1", "anon", fmt.Sprintf("idle-%d", i))
	}
	waitFor(t, "idle clients give their write buffers back", 5*time.Second, func() bool { return proxy.WritersHeld(h.srv) == 0 })

	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			for r := range rounds {
				// Texts larger than a page and unlike every other client's.
				want := strings.Repeat(fmt.Sprintf("<client %02d round %d>", i, r), 1200)
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
	waitFor(t, "the clients idle again without write buffers", 5*time.Second, func() bool { return proxy.WritersHeld(h.srv) == 0 })
}
