package proxy_test

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"cascata/internal/pgtest"
	"cascata/proxy"
)

// activeQueryPID waits until a proxy backend runs a statement containing
// tag and returns its pid.
func activeQueryPID(t *testing.T, tag string) int {
	t.Helper()
	var pid int
	waitFor(t, "statement "+tag+" to run on a backend", 5*time.Second, func() bool {
		err := superConn(t).QueryRow(context.Background(),
			"SELECT pid FROM pg_stat_activity WHERE usename = 'authenticator' AND state = 'active' AND query LIKE '%' || $1 || '%'", tag).Scan(&pid)
		return err == nil
	})
	return pid
}

// backendState is the pg_stat_activity state of pid, or "gone".
func backendState(t *testing.T, pid int) string {
	t.Helper()
	var state *string
	err := superConn(t).QueryRow(context.Background(), "SELECT state FROM pg_stat_activity WHERE pid = $1", pid).Scan(&state)
	if err == pgx.ErrNoRows {
		return "gone"
	}
	if err != nil {
		t.Fatal(err)
	}
	if state == nil {
		return "null"
	}
	return *state
}

// locksOf counts the locks pid holds or waits for.
func locksOf(t *testing.T, pid int) int {
	t.Helper()
	var n int
	if err := superConn(t).QueryRow(context.Background(), "SELECT count(*) FROM pg_locks WHERE pid = $1", pid).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// idleInTx counts proxy backends idle in a transaction.
func idleInTx(t *testing.T) int {
	t.Helper()
	var n int
	if err := superConn(t).QueryRow(context.Background(),
		"SELECT count(*) FROM pg_stat_activity WHERE usename = 'authenticator' AND state LIKE 'idle in transaction%'").Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// terminateRunning runs a statement containing tag (run) on a goroutine of
// its own, terminates the backend running it, and returns its error.
func terminateRunning(t *testing.T, tag string, run func() error) error {
	t.Helper()
	qerr := make(chan error, 1)
	go func() { qerr <- run() }()
	pid := activeQueryPID(t, tag)
	if _, err := superConn(t).Exec(context.Background(), "SELECT pg_terminate_backend($1)", pid); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-qerr:
		return err
	case <-time.After(3 * time.Second):
		t.Fatal("the statement of a terminated backend did not return")
		return nil
	}
}

// killClient drops the client's TCP connection without a Terminate message.
func killClient(c *pgx.Conn) { _ = c.PgConn().Conn().Close() }

// TestClientKilledHoldingLock: a client that vanishes inside a transaction
// holding a row lock leaves no open transaction and no lock behind.
func TestClientKilledHoldingLock(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 2})
	ctx := context.Background()
	b := h.connect("p2", "authenticated", "survivor")
	var id int64
	if err := b.QueryRow(ctx, "INSERT INTO items (body) VALUES ($1) RETURNING id", marker(t)).Scan(&id); err != nil {
		t.Fatal(err)
	}

	a, err := h.tryConnect("p2", "authenticated", token(t, "p2", "authenticated", "victim", nil))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close(ctx)
	tx, err := a.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	if err := tx.QueryRow(ctx, "SELECT pg_backend_pid() FROM items WHERE id = $1 FOR UPDATE", id).Scan(&pid); err != nil {
		t.Fatal(err)
	}
	if n := locksOf(t, pid); n == 0 {
		t.Fatalf("backend %d holds no lock inside the transaction", pid)
	}
	killClient(a)
	start := time.Now()
	waitFor(t, "the dead client's transaction to end", 2*time.Second, func() bool {
		st := backendState(t, pid)
		return (st == "idle" || st == "gone") && locksOf(t, pid) == 0
	})
	t.Logf("transaction of the killed client ended after %v", time.Since(start))
	if n := idleInTx(t); n != 0 {
		t.Fatalf("%d proxy backends idle in transaction", n)
	}
	// The row can be locked by another client at once.
	tx2, err := b.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx2.Exec(ctx, "SELECT 1 FROM items WHERE id = $1 FOR UPDATE NOWAIT", id); err != nil {
		t.Fatalf("locking the row after the holder died: %v", err)
	}
	if err := tx2.Commit(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestClientKilledDuringStatement: a client that vanishes while its
// statement runs gets the statement cancelled at once, not after it ends.
func TestClientKilledDuringStatement(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	ctx := context.Background()
	tag := "kill-sleep-" + marker(t)
	a, err := h.tryConnect("p3", "authenticated", token(t, "p3", "authenticated", "victim", nil))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close(ctx)
	qerr := make(chan error, 1)
	go func() {
		_, err := a.Exec(ctx, "SELECT pg_sleep(5) -- "+tag)
		qerr <- err
	}()
	pid := activeQueryPID(t, tag)
	killClient(a)
	start := time.Now()
	if err := <-qerr; err == nil {
		t.Fatal("the killed client's statement succeeded")
	}
	waitFor(t, "the dead client's statement to stop", 2*time.Second, func() bool {
		st := backendState(t, pid)
		return st == "idle" || st == "gone"
	})
	t.Logf("statement of the killed client stopped after %v (backend %s)", time.Since(start), backendState(t, pid))
	if n := idleInTx(t); n != 0 {
		t.Fatalf("%d proxy backends idle in transaction", n)
	}
	// The only backend is free again for the next client.
	b := h.connect("p3", "authenticated", "next")
	qstart := time.Now()
	var v int
	if err := b.QueryRow(ctx, "SELECT 7").Scan(&v); err != nil || v != 7 {
		t.Fatalf("next client: %d, %v", v, err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("next client served %v after the kill (query took %v): the backend waited for pg_sleep to end", d, time.Since(qstart))
	}
}

// TestBackendTerminatedIdle: a pooled backend terminated while idle is
// replaced, and the client's next transaction works without an error.
func TestBackendTerminatedIdle(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	ctx := context.Background()
	c := h.connect("p3", "anon", "idle-kill")
	var pid int
	if err := c.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	var ok bool
	if err := superConn(t).QueryRow(ctx, "SELECT pg_terminate_backend($1)", pid).Scan(&ok); err != nil || !ok {
		t.Fatalf("pg_terminate_backend(%d): %v %v", pid, ok, err)
	}
	waitFor(t, "the backend to exit", 5*time.Second, func() bool { return backendState(t, pid) == "gone" })

	for i := range 3 {
		tx, err := c.Begin(ctx)
		if err != nil {
			t.Fatalf("transaction %d: begin: %v", i, err)
		}
		var pid2 int
		var user string
		if err := tx.QueryRow(ctx, "SELECT pg_backend_pid(), current_user").Scan(&pid2, &user); err != nil {
			t.Fatalf("transaction %d after the idle backend was terminated: %v", i, err)
		}
		if err := tx.Commit(ctx); err != nil {
			t.Fatalf("transaction %d: commit: %v", i, err)
		}
		if pid2 == pid || user != "anon" {
			t.Fatalf("transaction %d ran on pid %d (terminated: %d) as %s", i, pid2, pid, user)
		}
	}
}

// TestBackendTerminatedInTransaction: a backend terminated while a client's
// transaction is open gives that client a connection-class error, and its
// next transaction on the same connection works.
func TestBackendTerminatedInTransaction(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	ctx := context.Background()
	c := h.connect("p1", "authenticated", "tx-kill")
	m := marker(t)

	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	if err := tx.QueryRow(ctx, "INSERT INTO items (body) VALUES ($1) RETURNING pg_backend_pid()", m).Scan(&pid); err != nil {
		t.Fatal(err)
	}
	if _, err := superConn(t).Exec(ctx, "SELECT pg_terminate_backend($1)", pid); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the backend to exit", 5*time.Second, func() bool { return backendState(t, pid) == "gone" })

	_, err = tx.Exec(ctx, "SELECT 1")
	checkConnLost(t, err)
	if c.IsClosed() {
		t.Fatal("client disconnected; want an error and a usable connection")
	}
	_ = tx.Rollback(ctx)
	checkNextTransaction(t, c, "p1", m, 0)

	// The same while a statement runs on the backend.
	tag := "term-sleep-" + m
	tx, err = c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	err = terminateRunning(t, tag, func() error {
		_, err := tx.Exec(ctx, "SELECT pg_sleep(5) -- "+tag)
		return err
	})
	checkConnLost(t, err)
	if c.IsClosed() {
		t.Fatal("client disconnected; want an error and a usable connection")
	}
	_ = tx.Rollback(ctx)
	checkNextTransaction(t, c, "p1", m, 0)
}

// TestBackendTerminatedInTransactionRace: the statement that follows the
// termination of a transaction's backend reaches the proxy before or after
// the proxy has noticed the loss, depending on timing. Either way it must
// not run on its own on another backend: an INSERT sent inside the
// transaction never commits, and the client hears of the loss.
func TestBackendTerminatedInTransactionRace(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 2})
	ctx := context.Background()
	c := h.connect("p1", "authenticated", "tx-race")
	owner := pgtest.Connect(t, cluster.Primary.SuperuserURL("p1"))
	m := marker(t)
	for i := range 40 {
		first, second := fmt.Sprintf("%s-%d-a", m, i), fmt.Sprintf("%s-%d-b", m, i)
		tx, err := c.Begin(ctx)
		if err != nil {
			t.Fatalf("round %d: begin: %v", i, err)
		}
		var pid int
		if err := tx.QueryRow(ctx, "INSERT INTO items (body) VALUES ($1) RETURNING pg_backend_pid()", first).Scan(&pid); err != nil {
			t.Fatalf("round %d: %v", i, err)
		}
		if _, err := owner.Exec(ctx, "SELECT pg_terminate_backend($1)", pid); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(i%5) * 300 * time.Microsecond) // land before, during and after the proxy notices
		var ierr error
		if i%2 == 0 {
			_, ierr = tx.Exec(ctx, "INSERT INTO items (body) VALUES ($1)", second)
		} else {
			_, ierr = tx.Exec(ctx, "INSERT INTO items (body) VALUES ('"+second+"')", pgx.QueryExecModeSimpleProtocol)
		}
		cerr := tx.Commit(ctx)
		if ierr == nil && cerr == nil {
			t.Fatalf("round %d: the transaction of a terminated backend committed without an error", i)
		}
		for _, e := range []error{ierr, cerr} {
			if e != nil {
				checkConnLost(t, e)
				break
			}
		}
		var n int
		if err := owner.QueryRow(ctx, "SELECT count(*) FROM items WHERE body IN ($1, $2)", first, second).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n != 0 {
			t.Fatalf("round %d: %d rows of a transaction whose backend was terminated were committed", i, n)
		}
		if c.IsClosed() {
			t.Fatalf("round %d: client disconnected; want an error and a usable connection", i)
		}
	}
	checkNextTransaction(t, c, "p1", m, 0)
}

// checkConnLost wants an error of class 08 (connection) or 57 (operator intervention).
func checkConnLost(t *testing.T, err error) {
	t.Helper()
	code := sqlstate(err)
	if !strings.HasPrefix(code, "08") && !strings.HasPrefix(code, "57") {
		t.Fatalf("want SQLSTATE 57P01 or 08006 (class 08/57), got %q: %v", code, err)
	}
}

// checkNextTransaction runs a transaction on c and checks that the rows with
// body m number want (the lost transaction was rolled back).
func checkNextTransaction(t *testing.T, c *pgx.Conn, ref, m string, want int) {
	t.Helper()
	ctx := context.Background()
	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatalf("next transaction: begin: %v", err)
	}
	var n int
	if err := tx.QueryRow(ctx, "SELECT count(*) FROM items WHERE body = $1", m).Scan(&n); err != nil {
		t.Fatalf("next transaction: %v", err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatalf("next transaction: commit: %v", err)
	}
	if n != want {
		t.Fatalf("%d rows of the lost transaction in %s, want %d", n, ref, want)
	}
}

// TestClientKilledMidMessage: a client that vanishes halfway through sending
// a message, inside a transaction holding a row lock, leaves no open
// transaction or lock behind, and the half message is not run.
func TestClientKilledMidMessage(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 2})
	ctx := context.Background()
	b := h.connect("p2", "authenticated", "survivor")
	m := marker(t)
	var id int64
	if err := b.QueryRow(ctx, "INSERT INTO items (body) VALUES ($1) RETURNING id", m).Scan(&id); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		copy bool
		size int
	}{{false, 200}, {false, 100_000}, {true, 200}, {true, 100_000}} // relayed from the read buffer, and streamed
	for _, tc := range cases {
		what := fmt.Sprintf("Query of %d bytes", tc.size)
		if tc.copy {
			what = fmt.Sprintf("CopyData of %d bytes", tc.size)
		}
		r := h.rawDial(t)
		r.write(startupPacket(proto30, "user", "authenticated", "database", "p2"))
		r.login(token(t, "p2", "authenticated", "victim", nil))
		vals, perr := r.query(fmt.Sprintf("BEGIN; SELECT pg_backend_pid() FROM items WHERE id = %d FOR UPDATE", id))
		if perr != nil || len(vals) != 1 {
			t.Fatalf("lock the row: %v %v", vals, perr)
		}
		pid, _ := strconv.Atoi(vals[0])
		var msg []byte
		if tc.copy {
			r.send(&pgproto3.Query{String: "COPY items (body) FROM STDIN"})
			if _, ok := r.receive().(*pgproto3.CopyInResponse); !ok {
				t.Fatal("want CopyInResponse")
			}
			msg, _ = (&pgproto3.CopyData{Data: []byte("half-copy-" + strings.Repeat("y", tc.size) + "\n")}).Encode(nil)
		} else {
			// Half of an UPDATE, then the connection drops.
			sql := fmt.Sprintf("UPDATE items SET body = 'half-message' WHERE id = %d /*%s*/", id, strings.Repeat("x", tc.size))
			msg, _ = (&pgproto3.Query{String: sql}).Encode(nil)
		}
		r.write(msg[:len(msg)-40])
		time.Sleep(50 * time.Millisecond) // let the proxy start relaying it
		r.c.Close()
		start := time.Now()
		waitFor(t, "the transaction of a client that died in the middle of a "+what+" to end", 2*time.Second, func() bool {
			st := backendState(t, pid)
			return (st == "idle" || st == "gone") && locksOf(t, pid) == 0
		})
		t.Logf("%s: transaction ended %v after the client died", what, time.Since(start))
		tx, err := b.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var body string
		if err := tx.QueryRow(ctx, "SELECT body FROM items WHERE id = $1 FOR UPDATE NOWAIT", id).Scan(&body); err != nil {
			t.Fatalf("locking the row after the holder died: %v", err)
		}
		if err := tx.Commit(ctx); err != nil {
			t.Fatal(err)
		}
		if body != m {
			t.Fatalf("row body %q: the half message ran", body)
		}
	}
	countRows(t, b, "half-copy-%", 0)
	waitFor(t, "the dead clients to be gone", 2*time.Second, func() bool { return h.srv.ClientCount() == 1 })
}

// TestNamesAfterBackendLost: a backend lost while a query runs leaves the
// client's connection usable, and the replies of its later queries are
// translated as before: an unknown name is reported under the client's own
// name, and the reply the proxy adds for a DEALLOCATE is dropped.
func TestNamesAfterBackendLost(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	ctx := context.Background()
	c := h.connect("p1", "authenticated", "lost-names")
	tag := "lost-names-" + marker(t)
	checkConnLost(t, terminateRunning(t, tag, func() error {
		_, err := c.Exec(ctx, "SELECT pg_sleep(5) -- "+tag, pgx.QueryExecModeSimpleProtocol)
		return err
	}))

	for round := range 3 {
		_, err := c.Exec(ctx, "EXECUTE nosuch", pgx.QueryExecModeSimpleProtocol)
		if want := `prepared statement "nosuch" does not exist`; err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("round %d: EXECUTE of an unknown name: %v, want %q", round, err, want)
		}
		if _, err := c.Exec(ctx, "PREPARE q1 AS SELECT 1", pgx.QueryExecModeSimpleProtocol); err != nil {
			t.Fatalf("round %d: PREPARE: %v", round, err)
		}
		res, err := c.PgConn().Exec(ctx, "DEALLOCATE q1").ReadAll()
		if err != nil {
			t.Fatalf("round %d: DEALLOCATE: %v", round, err)
		}
		var tags []string
		for _, r := range res {
			tags = append(tags, r.CommandTag.String())
		}
		if len(tags) != 1 || tags[0] != "DEALLOCATE" {
			t.Fatalf("round %d: DEALLOCATE answered %q, want one DEALLOCATE", round, tags)
		}
	}
}

// TestIdleSessionTimeoutRefused: on a shared backend idle_session_timeout
// would outlive the client's unit: the server would end the backend once it
// sat idle in the pool, and an anon client could make the pool dial again
// and again. In transaction mode every way a client could set it for its
// session is refused (0A000; 42501 at login), the client goes on, and the
// pool's backend lives on. SET LOCAL, which ends with its transaction, runs;
// in session mode, where the backend is the client's own, SET runs too.
func TestIdleSessionTimeoutRefused(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	ctx := context.Background()
	a := h.connect("p3", "anon", "sets-idle-timeout")
	var pid int
	if err := a.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	refused := func(what string, err error) {
		t.Helper()
		if sqlstate(err) != proxy.CodeFeatureNotSupported {
			t.Fatalf("%s: %v, want SQLSTATE %s", what, err, proxy.CodeFeatureNotSupported)
		}
	}
	_, err := a.Exec(ctx, "SET idle_session_timeout = '20ms'")
	refused("simple SET", err)
	_, err = a.Exec(ctx, "SELECT 1; SET SESSION idle_session_timeout TO 20")
	refused("SET behind another statement", err)
	_, err = a.Exec(ctx, "SELECT set_config('idle_session_timeout', '20ms', false)")
	refused("set_config", err)
	_, err = a.Exec(ctx, "SELECT * FROM (SELECT pg_catalog.set_config('IDLE_SESSION_TIMEOUT', '20ms', false)) s")
	refused("set_config in a subquery, the name in capitals", err)
	_, err = a.Exec(ctx, "PREPARE sets_timeout AS SELECT set_config('idle_session_timeout', '20ms', false)")
	refused("SQL PREPARE", err)
	if _, err := a.Exec(ctx, "EXECUTE sets_timeout"); sqlstate(err) != "26000" {
		t.Fatalf("EXECUTE of the refused PREPARE: %v, want 26000 (no such statement)", err)
	}
	res := a.PgConn().ExecParams(ctx, "SET idle_session_timeout = 20", nil, nil, nil, nil).Read()
	refused("SET in a Parse", res.Err)
	res = a.PgConn().ExecParams(ctx, "SELECT set_config('idle_session_timeout', $1, false)", [][]byte{[]byte("20ms")}, nil, nil, nil).Read()
	refused("set_config in a Parse", res.Err)
	tx, err := a.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "SET LOCAL idle_session_timeout = '20ms'"); err != nil {
		t.Fatalf("SET LOCAL: %v", err)
	}
	_, err = tx.Exec(ctx, "SET idle_session_timeout = '20ms'")
	refused("SET in a transaction", err)
	_ = tx.Rollback(ctx)

	// Longer than the timeout any of them asked for: the backend lives.
	time.Sleep(200 * time.Millisecond)
	b := h.connect("p3", "anon", "next-client")
	var pid2 int
	var timeout string
	if err := b.QueryRow(ctx, "SELECT pg_backend_pid(), current_setting('idle_session_timeout')").Scan(&pid2, &timeout); err != nil {
		t.Fatal(err)
	}
	if pid2 != pid || timeout != "0" {
		t.Fatalf("next client: pid %d (first %d), idle_session_timeout %q", pid2, pid, timeout)
	}
	if err := a.QueryRow(ctx, "SELECT current_setting('idle_session_timeout')").Scan(&timeout); err != nil || timeout != "0" {
		t.Fatalf("the refused client: %q %v", timeout, err)
	}

	// At login, as a startup parameter.
	tok := token(t, "p3", "anon", "startup", nil)
	_, err = pgx.Connect(ctx, h.url("p3", "anon", tok)+"&options=-c%20idle_session_timeout%3D20ms")
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != proxy.CodeInsufficientPrivs || pe.Severity != "FATAL" {
		t.Fatalf("startup parameter: %v, want FATAL %s", err, proxy.CodeInsufficientPrivs)
	}

	// Session mode: the backend is the client's; the setting is in force.
	hs := startProxy(t, harnessOpts{poolSize: 1, sessionMode: true})
	s := hs.connect("p3", "anon", "session-mode")
	if _, err := s.Exec(ctx, "SET idle_session_timeout = '1h'"); err != nil {
		t.Fatalf("session mode: %v", err)
	}
	if err := s.QueryRow(ctx, "SELECT current_setting('idle_session_timeout')").Scan(&timeout); err != nil || timeout != "1h" {
		t.Fatalf("session mode: %q %v", timeout, err)
	}
}
