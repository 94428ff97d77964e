package proxy_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"cascata/internal/pgtest"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

// The adversarial suite: an attacker holding an anon token and a victim
// holding an authenticated token share one backend (pool_size 1), in
// transaction mode and in session mode, over the simple and the extended
// protocol. Every attack must be refused or have no effect, and the next
// client on the backend must find it as a new connection would be.

const advProject = "p3"

// advBaseline is what a new connection shows; the victim must see it after
// every attack.
type advBaseline struct {
	timezone, searchPath string
}

func advStart(t testing.TB, session bool) (*harness, advBaseline) {
	t.Helper()
	h := startProxy(t, harnessOpts{poolSize: 1, sessionMode: session, projects: []string{advProject}})
	ctx := context.Background()
	su := pgtest.Connect(t, cluster.Primary.SuperuserURL(advProject))
	// An owner's function that leaves session state behind, out of the
	// guard's sight: settings, a custom setting, a temporary table.
	if _, err := su.Exec(ctx, `
		CREATE OR REPLACE FUNCTION public.leave_state() RETURNS int LANGUAGE plpgsql AS $$
		BEGIN
			PERFORM set_config('statement_timeout', '1', false);
			PERFORM set_config('default_transaction_read_only', 'on', false);
			PERFORM set_config('app.tenant', 'attacker', false);
			CREATE TEMP TABLE IF NOT EXISTS fn_tmp(x int);
			RETURN 1;
		END $$;
		GRANT EXECUTE ON FUNCTION public.leave_state() TO anon, authenticated;`); err != nil {
		t.Fatal(err)
	}
	fresh := pgtest.Connect(t, cluster.Primary.URL("authenticator", loginPassword, advProject))
	var b advBaseline
	if err := fresh.QueryRow(ctx, "SELECT current_setting('TimeZone'), current_setting('search_path')").Scan(&b.timezone, &b.searchPath); err != nil {
		t.Fatal(err)
	}
	return h, b
}

// assertPristine checks, on the victim's connection, that the backend
// carries the victim's identity and nothing any other client left there.
func assertPristine(t testing.TB, c *pgx.Conn, role, sub string, b advBaseline) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var user, claimSub, tz, sp, timeout, ro string
	var appTenant, myapp *string
	var temps, listens, locks int
	err := c.QueryRow(ctx, `SELECT current_user, current_setting('request.jwt.claims')::jsonb->>'sub',
		current_setting('TimeZone'), current_setting('search_path'), current_setting('statement_timeout'),
		current_setting('default_transaction_read_only'),
		nullif(current_setting('app.tenant', true), ''), nullif(current_setting('myapp.x', true), ''),
		(SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())::int,
		(SELECT count(*) FROM pg_listening_channels())::int,
		(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())::int`,
		pgx.QueryExecModeSimpleProtocol).
		Scan(&user, &claimSub, &tz, &sp, &timeout, &ro, &appTenant, &myapp, &temps, &listens, &locks)
	if err != nil {
		t.Fatalf("victim's check query: %v", err)
	}
	var bad []string
	if user != role || claimSub != sub {
		bad = append(bad, fmt.Sprintf("identity %s/%s, want %s/%s", user, claimSub, role, sub))
	}
	if tz != b.timezone || sp != b.searchPath {
		bad = append(bad, fmt.Sprintf("TimeZone %q search_path %q, want %q %q", tz, sp, b.timezone, b.searchPath))
	}
	if timeout != "0" || ro != "off" {
		bad = append(bad, fmt.Sprintf("statement_timeout %q default_transaction_read_only %q", timeout, ro))
	}
	if appTenant != nil || myapp != nil {
		bad = append(bad, fmt.Sprintf("custom settings app.tenant=%v myapp.x=%v", deref(appTenant), deref(myapp)))
	}
	if temps != 0 || listens != 0 || locks != 0 {
		bad = append(bad, fmt.Sprintf("%d temporary objects, %d LISTEN channels, %d advisory locks", temps, listens, locks))
	}
	if _, err := c.Exec(ctx, "FETCH 1 FROM loot", pgx.QueryExecModeSimpleProtocol); sqlstate(err) != "34000" {
		bad = append(bad, fmt.Sprintf("another client's cursor: FETCH gave %v", err))
	}
	if _, err := c.Exec(ctx, "SELECT lastval()", pgx.QueryExecModeSimpleProtocol); sqlstate(err) != "55000" {
		bad = append(bad, fmt.Sprintf("another client's lastval(): %v", err))
	}
	if len(bad) > 0 {
		t.Errorf("the victim's backend is not pristine: %s", strings.Join(bad, "; "))
	}
}

func deref(p *string) string {
	if p == nil {
		return "<nil>"
	}
	return *p
}

// attack is one attack: SQL sent by the attacker and the outcomes allowed
// (a SQLSTATE, or "" for success without effect).
type attack struct {
	name  string
	sql   string
	codes []string
}

// sessionOutcomes are the outcomes of some attacks in session mode, where
// the backend is the client's own and PostgreSQL answers itself.
var sessionOutcomes = map[string][]string{
	"execute after another statement":        noSuchStmt,
	"execute identity":                       noSuchStmt,
	"deallocate and re-prepare":              noSuchStmt,
	"execute the identity statement":         noSuchStmt,
	"explain analyze the identity statement": noSuchStmt,
	"deallocate the identity statement":      noSuchStmt,
	"replace the identity statement":         noSuchStmt,
	"execute the settings statement":         noSuchStmt,
	"replace the settings statement":         noSuchStmt,
	"deallocate all after another statement": {"", "42601"},
	"read prepared statements":               {""},
	"read cursors":                           {""},
}

// execModes are the protocols an attack is sent over.
var execModes = []struct {
	name string
	mode pgx.QueryExecMode
}{
	{"simple", pgx.QueryExecModeSimpleProtocol},
	{"extended", pgx.QueryExecModeExec},
	{"extended-named", pgx.QueryExecModeCacheStatement},
}

func runAttack(t *testing.T, c *pgx.Conn, a attack, mode pgx.QueryExecMode) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := c.Exec(ctx, a.sql, mode)
	got := sqlstate(err)
	if err != nil && got == "" {
		t.Fatalf("%s: %v", a.name, err)
	}
	for _, code := range a.codes {
		if got == code {
			return
		}
	}
	t.Errorf("%s: got SQLSTATE %q (%v), want one of %q", a.name, got, err, a.codes)
}

// noSuchStmt: in session mode the proxy keeps no statement of its own on
// the client's backend, so PostgreSQL finds none (or, over the extended
// protocol, refuses the text of several commands).
var noSuchStmt = []string{"26000", "42601"}

// identityAttacks try to reach the proxy's own statements (group 1) or to
// replace or drop them (group 2).
var identityAttacks = []attack{
	{"execute after another statement", `SELECT 1; EXECUTE cascata_set('role', 'service_role')`, []string{"0A000", "42601"}},
	{"execute identity", `SELECT 1; EXECUTE cascata_ident('service_role', '{"sub":"victim"}', '')`, []string{"0A000", "42601"}},
	{"explain analyze execute", `EXPLAIN ANALYZE EXECUTE cascata_set('role', 'service_role')`, []string{"0A000", "26000"}},
	{"create table as execute", `CREATE TEMP TABLE z AS EXECUTE cascata_set('role', 'service_role')`, []string{"0A000", "26000"}},
	{"lone execute", `EXECUTE cascata_set('role', 'service_role')`, []string{"0A000", "26000"}},
	{"lone execute of a gate", `EXECUTE cascata_gate_0000000000000000`, []string{"0A000", "26000"}},
	{"deallocate and re-prepare", `DEALLOCATE cascata_ident; PREPARE cascata_ident(text,text,text) AS SELECT $1`, []string{"0A000", "42601"}},
	{"deallocate all after another statement", `SELECT 1; DEALLOCATE ALL`, []string{"0A000", "42601"}},
	{"query_to_xml execute", `SELECT query_to_xml('EXECUTE cascata_set(''role'', ''service_role'')', true, false, '')`, []string{"0A000", "42501", "26000"}},
	// The identity statement the proxy prepares on shared backends
	// (cs_ident): no client name translates to it, and a client's own
	// statement of that name is the client's.
	{"execute the identity statement", `EXECUTE cs_ident('service_role', '{"sub":"victim"}', '')`, []string{"0A000", "26000"}},
	{"explain analyze the identity statement", `EXPLAIN ANALYZE EXECUTE cs_ident('service_role', '{"sub":"victim"}', '')`, []string{"0A000", "26000"}},
	{"deallocate the identity statement", `DEALLOCATE cs_ident`, []string{"0A000", "26000"}},
	{"replace the identity statement", `DEALLOCATE cs_ident; PREPARE cs_ident(text, text, text) AS SELECT $1, $2, $3`, []string{"0A000", "42601"}},
	{"prepare under the identity statement's name", `PREPARE cs_ident(text, text, text) AS SELECT $1, $2, $3`, []string{"", "0A000"}},
	{"deallocate all", `DEALLOCATE ALL`, []string{"", "0A000"}},
	{"execute the settings statement", `EXECUTE cs_set('role', 'service_role')`, []string{"0A000", "26000"}},
	{"replace the settings statement", `DEALLOCATE cs_set; PREPARE cs_set(text, text) AS SELECT $1, $2`, []string{"0A000", "42601"}},
	{"read prepared statements", `SELECT name, statement FROM pg_prepared_statements`, []string{"42501"}},
	{"read cursors", `SELECT name FROM pg_cursors`, []string{"42501"}},
	{"set role", `SET ROLE service_role`, []string{"42501"}},
	{"set_config role", `SELECT set_config('role', 'service_role', false)`, []string{"42501"}},
}

func TestAdversarialIdentity(t *testing.T) {
	runAttacks(t, identityAttacks, func(t *testing.T, atk *pgx.Conn, _ bool) {
		var user string
		if err := atk.QueryRow(context.Background(), "SELECT current_user", pgx.QueryExecModeSimpleProtocol).Scan(&user); err != nil || user != "anon" {
			t.Fatalf("the attacker runs as %q (%v), want anon", user, err)
		}
	})
}

// runAttacks runs each attack in transaction and session mode, over every
// protocol (texts of several statements that must succeed over the simple
// one only), each
// by a new attacker; after checks the attacker's session, then a victim
// must find a pristine backend. In session mode, and when the attack pins
// the attacker's backend, the attacker leaves first, so that the victim
// gets its backend.
//
// ownTimeout, passed to after, says that the attacker's own session keeps
// the 1 ms statement_timeout the attack set (session mode: the backend is
// its own), so its own next statement may be cancelled, as on PostgreSQL.
func runAttacks(t *testing.T, attacks []attack, after func(t *testing.T, atk *pgx.Conn, ownTimeout bool)) {
	for _, session := range []bool{false, true} {
		t.Run(map[bool]string{false: "transaction", true: "session"}[session], func(t *testing.T) {
			h, base := advStart(t, session)
			for _, m := range execModes {
				for _, a := range attacks {
					if m.mode != pgx.QueryExecModeSimpleProtocol && strings.Contains(a.sql, "; ") && a.codes[0] == "" {
						continue // a text of several statements that must succeed: simple protocol only
					}
					t.Run(m.name+"/"+a.name, func(t *testing.T) {
						atk := h.connect(advProject, "anon", "attacker")
						if codes, ok := sessionOutcomes[a.name]; ok && session {
							a.codes = codes
						}
						runAttack(t, atk, a, m.mode)
						after(t, atk, session && ownTimeoutAttacks[a.name])
						if session || pinningAttacks[a.name] {
							// The attacker keeps its backend (session mode,
							// or pinned by its state): it leaves first.
							atk.Close(context.Background())
						}
						victim := h.connect(advProject, "authenticated", "victim")
						assertPristine(t, victim, "authenticated", "victim", base)
						if session {
							victim.Close(context.Background())
						}
					})
				}
			}
		})
	}
}

// stateAttacks leave session state behind (group 4) or make PostgreSQL
// refuse a setting (group 5).
var stateAttacks = []attack{
	{"temporary table shadowing a real one", `CREATE TEMP TABLE items (id int, owner text, body text)`, []string{""}},
	{"held cursor", `BEGIN; DECLARE loot CURSOR WITH HOLD FOR SELECT * FROM items; COMMIT`, []string{""}},
	{"settings", `SET TimeZone = 'Asia/Tokyo'; SET myapp.x = 'evil'; SET search_path = pg_temp, public`, []string{""}},
	{"set_config inside query_to_xml", `SELECT query_to_xml('SELECT set_config(''statement_timeout'', ''1'', false), set_config(''default_transaction_read_only'', ''on'', false)', true, false, '')`, []string{""}},
	{"state inside a function", `SELECT leave_state()`, []string{""}},
	{"listen", `LISTEN loot`, []string{""}},
	{"session advisory lock", `SELECT pg_advisory_lock(4242)`, []string{""}},
	{"lastval", `SELECT nextval('items_id_seq')`, []string{""}},
	// A DO block any role may run (its body is guarded), leaving state
	// out of the pinning statements' sight: scrubbed, never pinned.
	{"state inside a DO block", `DO $$ BEGIN CREATE TEMP TABLE items (id int, owner text, body text); PERFORM pg_advisory_lock(4243); EXECUTE 'LISTEN loot2'; PERFORM set_config('app.tenant', 'attacker', false); END $$`, []string{""}},
	{"refused setting", `SET log_statement = 'all'`, []string{"42501"}},
}

// ownTimeoutAttacks set a statement_timeout of 1 ms on the attacker's session.
var ownTimeoutAttacks = map[string]bool{
	"set_config inside query_to_xml": true,
	"state inside a function":        true,
}

// pinningAttacks create state a client keeps: in transaction mode the
// attacker keeps its backend for it (pin.go) until it leaves.
var pinningAttacks = map[string]bool{
	"temporary table shadowing a real one": true,
	"held cursor":                          true,
	"listen":                               true,
	"session advisory lock":                true,
}

func TestAdversarialState(t *testing.T) {
	runAttacks(t, stateAttacks, func(t *testing.T, atk *pgx.Conn, ownTimeout bool) {
		// The attacker's session goes on working (under its own 1 ms
		// statement_timeout a statement on a busy machine may be cancelled).
		_, err := atk.Exec(context.Background(), "SELECT 1", pgx.QueryExecModeSimpleProtocol)
		if ownTimeout && sqlstate(err) == "57014" {
			err = nil
		}
		if err != nil {
			t.Fatalf("the attacker's next query: %v", err)
		}
	})
}

// A refused SET is not recorded: the client's later queries work, nothing
// reaches the next client and no backend is thrown away.
func TestRefusedSetBreaksNothing(t *testing.T) {
	h, base := advStart(t, false)
	atk := h.connect(advProject, "anon", "attacker")
	victim := h.connect(advProject, "authenticated", "victim")
	ctx := context.Background()
	var pid1, pid2 int
	if err := victim.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid1); err != nil {
		t.Fatal(err)
	}
	if _, err := atk.Exec(ctx, "SET log_statement = 'all'"); sqlstate(err) != "42501" {
		t.Fatalf("SET log_statement: %v", err)
	}
	for i := 0; i < 3; i++ {
		if _, err := atk.Exec(ctx, "SELECT 1"); err != nil {
			t.Fatalf("the attacker's query %d after the refused SET: %v", i, err)
		}
		if _, err := victim.Exec(ctx, "SELECT 1"); err != nil {
			t.Fatalf("the victim's query %d: %v", i, err)
		}
	}
	if err := victim.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid2); err != nil {
		t.Fatal(err)
	}
	if pid1 != pid2 {
		t.Errorf("the backend was replaced (%d, then %d)", pid1, pid2)
	}
	assertPristine(t, victim, "authenticated", "victim", base)
}

// Variants a fixer might miss: the <role>.<ref> user name, an attack after
// a statement_timeout cancel, and a pipelined batch over pgconn.
func TestAdversarialVariants(t *testing.T) {
	h, base := advStart(t, false)
	ctx := context.Background()

	t.Run("role.ref user name", func(t *testing.T) {
		host, port, _ := net.SplitHostPort(h.addr)
		u := fmt.Sprintf("postgres://anon.%s:%s@%s:%s/postgres?sslmode=disable", advProject, token(t, advProject, "anon", "attacker", nil), host, port)
		atk := pgtest.Connect(t, u)
		runAttack(t, atk, identityAttacks[0], pgx.QueryExecModeSimpleProtocol)
		runAttack(t, atk, identityAttacks[6], pgx.QueryExecModeSimpleProtocol)
		assertPristine(t, h.connect(advProject, "authenticated", "victim"), "authenticated", "victim", base)
	})

	t.Run("after a statement_timeout cancel", func(t *testing.T) {
		atk := h.connect(advProject, "anon", "attacker")
		if _, err := atk.Exec(ctx, "SET statement_timeout = '50ms'"); err != nil {
			t.Fatal(err)
		}
		if _, err := atk.Exec(ctx, "SELECT pg_sleep(1)"); sqlstate(err) != "57014" {
			t.Fatalf("pg_sleep under statement_timeout: %v", err)
		}
		for _, a := range identityAttacks[:8] {
			runAttack(t, atk, a, pgx.QueryExecModeSimpleProtocol)
		}
		assertPristine(t, h.connect(advProject, "authenticated", "victim"), "authenticated", "victim", base)
	})

	t.Run("pipelined batch", func(t *testing.T) {
		atk := h.connect(advProject, "anon", "attacker")
		pc := atk.PgConn()
		batch := &pgconn.Batch{}
		batch.ExecParams("SELECT 1", nil, nil, nil, nil)
		batch.ExecParams("EXECUTE cascata_set('role', 'service_role')", nil, nil, nil, nil)
		batch.ExecParams("SELECT current_user", nil, nil, nil, nil)
		res, err := pc.ExecBatch(ctx, batch).ReadAll()
		if err == nil {
			t.Fatalf("the batch succeeded: %v", res)
		}
		if code := sqlstate(err); code != "0A000" {
			t.Fatalf("the batch failed with %v, want 0A000", err)
		}
		for _, r := range res {
			for _, row := range r.Rows {
				if len(row) == 1 && string(row[0]) != "1" && string(row[0]) != "anon" {
					t.Errorf("a row of the batch ran as %q", row[0])
				}
			}
		}
		assertPristine(t, h.connect(advProject, "authenticated", "victim"), "authenticated", "victim", base)
	})

	t.Run("state from an earlier transaction of the same client", func(t *testing.T) {
		// A prepared statement that changes settings, run in a later unit.
		atk := h.connect(advProject, "anon", "attacker")
		sd, err := atk.Prepare(ctx, "evil", "SELECT set_config('statement_timeout', '1', false)")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := atk.Exec(ctx, sd.Name); err != nil {
			t.Fatal(err)
		}
		if _, err := atk.Exec(ctx, "PREPARE evil2 AS SELECT set_config('default_transaction_read_only', 'on', false)", pgx.QueryExecModeSimpleProtocol); err != nil {
			t.Fatal(err)
		}
		if _, err := atk.Exec(ctx, "EXECUTE evil2", pgx.QueryExecModeSimpleProtocol); err != nil {
			t.Fatal(err)
		}
		assertPristine(t, h.connect(advProject, "authenticated", "victim"), "authenticated", "victim", base)
	})
}

// malformed are message bodies PostgreSQL answers with 08P01.
var malformed = []struct {
	name string
	typ  byte
	body []byte
}{
	{"parse name without NUL", 'P', []byte("evil")},
	{"empty parse", 'P', nil},
	{"parse without parameter count", 'P', []byte("\x00SELECT 1\x00")},
	{"parse with a negative count", 'P', []byte("\x00SELECT 1\x00\xff\xff")},
	{"bind of NUL only", 'B', []byte{0}},
	{"bind with a huge parameter", 'B', []byte("\x00\x00\x00\x00\x00\x01\x7f\xff\xff\xff\x00\x00")},
	{"describe without name", 'D', []byte("S")},
	{"describe of a bad kind", 'D', []byte("X\x00")},
	{"empty close", 'C', nil},
	{"execute without row count", 'E', []byte("\x00")},
	{"sync with a body", 'S', []byte("x")},
	{"a message type no client sends", 'A', nil},
	{"query without NUL", 'Q', []byte("SELECT 1")},
}

// rawAfterLogin logs in through the proxy with pgconn and returns the raw
// connection.
func rawAfterLogin(t testing.TB, h *harness, role, sub string) net.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	u := strings.Replace(h.url(advProject, role, token(t, advProject, role, sub, nil)), "&default_query_exec_mode=simple_protocol", "", 1)
	pc, err := pgconn.Connect(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	hj, err := pc.Hijack()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hj.Conn.Close() })
	return hj.Conn
}

func rawMsg(typ byte, body []byte) []byte {
	out := []byte{typ, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(out[1:], uint32(len(body)+4))
	return append(out, body...)
}

// expectProtocolViolation reads until a FATAL 08P01 and the close.
func expectProtocolViolation(t *testing.T, c net.Conn) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	fe := pgproto3.NewFrontend(c, c)
	sawFatal := false
	for {
		msg, err := fe.Receive()
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || sawFatal && !isTimeout(err) {
				break
			}
			t.Fatalf("no answer to a malformed message: %v (FATAL seen: %v)", err, sawFatal)
		}
		if e, ok := msg.(*pgproto3.ErrorResponse); ok {
			if e.Code != "08P01" || e.Severity != "FATAL" {
				t.Fatalf("got %s %s %s, want FATAL 08P01", e.Severity, e.Code, e.Message)
			}
			sawFatal = true
		}
	}
	if !sawFatal {
		t.Fatal("the connection closed without FATAL 08P01")
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// Every malformed message after login gets FATAL 08P01 within the round
// trip, releases the backend, and never locks the project: pool_size such
// clients in a row, each with and without a transaction open, leave it
// usable.
func TestMalformedMessages(t *testing.T) {
	h, base := advStart(t, false)
	// In one write with a BEGIN before it, the bad message finds the BEGIN
	// forwarded but not yet flushed to the backend (pipelining): it must
	// still go out, or its reply never comes and the session waits for it
	// holding the project's backend.
	send := func(t *testing.T, msg []byte, inTx bool) {
		c := rawAfterLogin(t, h, "anon", "attacker")
		var out []byte
		if inTx {
			out = append(out, rawMsg('Q', []byte("BEGIN\x00"))...)
		}
		out = append(out, msg...)
		out = append(out, rawMsg('S', nil)...)
		if _, err := c.Write(out); err != nil {
			t.Fatal(err)
		}
		expectProtocolViolation(t, c)
		victim := h.connect(advProject, "authenticated", "victim")
		assertPristine(t, victim, "authenticated", "victim", base)
		victim.Close(context.Background())
	}
	for _, inTx := range []bool{false, true} {
		for _, m := range malformed {
			t.Run(fmt.Sprintf("%s/in transaction %v", m.name, inTx), func(t *testing.T) { send(t, rawMsg(m.typ, m.body), inTx) })
		}
		// A header that declares more than max_message_bytes (1 GiB).
		t.Run(fmt.Sprintf("message over max_message_bytes/in transaction %v", inTx), func(t *testing.T) {
			send(t, []byte{'Q', 0x7f, 0xff, 0xff, 0xff}, inTx)
		})
	}
	waitFor(t, "the project's backends to be idle", 5*time.Second, func() bool {
		for _, st := range h.srv.PoolStats() {
			if st.Project == advProject && (st.ServersActive > 0 || st.ServersIdle+st.ServersActive > 1) {
				return false
			}
		}
		return true
	})
}

// The setup's gate runs no query and takes no snapshot: a client's first
// statement on a backend that did not carry its identity may be BEGIN
// ISOLATION LEVEL (the identity check it replaced failed such a BEGIN with
// 25001).
func TestBeginIsolationAfterIdentitySwitch(t *testing.T) {
	for _, session := range []bool{false, true} {
		h, _ := advStart(t, session)
		for _, m := range execModes {
			for i, sub := range []string{"first", "second"} {
				c := h.connect(advProject, []string{"anon", "authenticated"}[i], sub)
				ctx := context.Background()
				if _, err := c.Exec(ctx, "BEGIN ISOLATION LEVEL SERIALIZABLE", m.mode); err != nil {
					t.Fatalf("session %v, %s, %s: BEGIN ISOLATION LEVEL: %v", session, m.name, sub, err)
				}
				var iso string
				if err := c.QueryRow(ctx, "SELECT current_setting('transaction_isolation')", m.mode).Scan(&iso); err != nil || iso != "serializable" {
					t.Fatalf("session %v, %s: isolation %q %v", session, m.name, iso, err)
				}
				if _, err := c.Exec(ctx, "COMMIT", m.mode); err != nil {
					t.Fatal(err)
				}
				c.Close(ctx)
			}
		}
	}
}
