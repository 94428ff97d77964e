package fleettest

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

const (
	// clientRunLimit bounds every client loop, whatever the test does.
	clientRunLimit = 90 * time.Second
	// clientPace is the pause between two statements of one client, so a
	// few dozen clients leave the two cores to the servers.
	clientPace = 5 * time.Millisecond
	// keptErrors is how many client errors are kept for the checks.
	keptErrors = 5000
	// errorBackoff is the pause after an error, so a client that fails
	// fast does not spin.
	errorBackoff = 50 * time.Millisecond
)

// clientError is one error a client saw.
type clientError struct {
	at time.Time
	// fresh: on a new connection (connecting or its first statement), which
	// is what a load balancer that took an instance out must spare.
	fresh bool
	msg   string
}

// clientLoad is a set of clients that query one connection string until
// stopped, each opening a new connection every few statements and after
// any error.
type clientLoad struct {
	*group
	connURL string
	query   string
	perConn int

	queries atomic.Int64
	conns   atomic.Int64

	mu     sync.Mutex
	errs   []clientError
	fresh  int
	inConn int
}

// startClients starts n clients running query on connURL, perConn
// statements per connection; they stop with finish (or the test).
func startClients(t *testing.T, connURL string, n, perConn int, query string) *clientLoad {
	t.Helper()
	l := &clientLoad{group: newGroup(t), connURL: connURL, query: query, perConn: perConn}
	for range n {
		l.goRun(l.client)
	}
	return l
}

func (l *clientLoad) client() {
	end := time.Now().Add(clientRunLimit)
	for !l.stopped() && time.Now().Before(end) {
		if l.session() {
			l.pause(clientPace)
		} else {
			l.pause(errorBackoff)
		}
	}
}

// session is one connection: perConn statements, or fewer after an error,
// which it reports by returning false.
func (l *clientLoad) session() bool {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, l.connURL)
	if err != nil {
		l.fail(true, "connect", err)
		return false
	}
	defer conn.Close(context.Background())
	l.conns.Add(1)
	for i := 0; i < l.perConn && !l.stopped(); i++ {
		if _, err := conn.Exec(ctx, l.query); err != nil {
			l.fail(i == 0, fmt.Sprintf("statement %d", i+1), err)
			return false
		}
		l.queries.Add(1)
		l.pause(clientPace)
	}
	return true
}

func (l *clientLoad) fail(fresh bool, where string, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if fresh {
		l.fresh++
	} else {
		l.inConn++
	}
	if len(l.errs) < keptErrors {
		l.errs = append(l.errs, clientError{at: time.Now(), fresh: fresh, msg: where + ": " + err.Error()})
	}
}

// waitQueries waits until the clients have run more statements than now.
func (l *clientLoad) waitQueries(t testing.TB, more int64, within time.Duration) {
	t.Helper()
	waitMore(t, &l.queries, more, within, "client statements")
}

// errors returns the kept errors and the counts of errors on new and on
// established connections.
func (l *clientLoad) errors() (kept []clientError, fresh, inConn int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]clientError(nil), l.errs...), l.fresh, l.inConn
}

// summary is a line for the test log.
func (l *clientLoad) summary() string {
	_, fresh, inConn := l.errors()
	return fmt.Sprintf("%d connections, %d statements, %d errors on new connections, %d on established ones",
		l.conns.Load(), l.queries.Load(), fresh, inConn)
}

// describe lists errors with their time relative to start: the first 20
// and the last 10.
func describe(errs []clientError, start time.Time) string {
	var b strings.Builder
	for i, e := range errs {
		if i == 20 && len(errs) > 30 {
			fmt.Fprintf(&b, "  ... %d more ...\n", len(errs)-30)
		}
		if i >= 20 && i < len(errs)-10 {
			continue
		}
		kind := "established"
		if e.fresh {
			kind = "new"
		}
		fmt.Fprintf(&b, "  +%v %s connection: %s\n", e.at.Sub(start).Round(time.Millisecond), kind, e.msg)
	}
	return b.String()
}
