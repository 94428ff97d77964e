package proxy_test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"cascata/auth"
	"cascata/proxy"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

// The escalation guard, end to end: real pgx clients attack through the
// running proxy in transaction mode, on a pool of one backend shared with a
// bystander, and after every attempt the attacker's and the bystander's
// identities are checked on their own connections.

// guardIdent is what a session's identity looks like from SQL.
type guardIdent struct {
	user, sessionUser, claims, claimSub string
}

const guardIdentSQL = `SELECT current_user::text, session_user::text,
	coalesce(current_setting('request.jwt.claims', true), ''),
	coalesce(current_setting('request.jwt.claim.sub', true), '')`

func readGuardIdent(ctx context.Context, c *pgx.Conn) (guardIdent, error) {
	var id guardIdent
	err := c.QueryRow(ctx, guardIdentSQL).Scan(&id.user, &id.sessionUser, &id.claims, &id.claimSub)
	return id, err
}

// jwtPayload returns the claims JSON a token carries, byte for byte.
func jwtPayload(t testing.TB, tok string) string {
	t.Helper()
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		t.Fatalf("not a JWS: %q", tok)
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// guardClient is one client connection whose identity must never change.
type guardClient struct {
	name  string
	h     *harness
	ref   string
	role  string
	tok   string
	mode  string // pgx default_query_exec_mode
	c     *pgx.Conn
	want  guardIdent
	ready bool
}

func newGuardClient(t *testing.T, h *harness, name, ref, role, sub, mode string) *guardClient {
	t.Helper()
	gc := &guardClient{name: name, h: h, ref: ref, role: role, mode: mode,
		tok: token(t, ref, role, sub, map[string]any{"email": sub + "@example.com", "app_metadata": map[string]any{"tier": "free"}})}
	gc.want = guardIdent{user: role, sessionUser: "authenticator", claims: jwtPayload(t, gc.tok)}
	gc.dial(t)
	id, err := readGuardIdent(context.Background(), gc.c)
	if err != nil {
		t.Fatalf("%s: baseline identity: %v", name, err)
	}
	gc.want.claimSub = id.claimSub // legacy per-claim GUCs are a project flag; whatever it is, it must not move
	if id != gc.want {
		t.Fatalf("%s: baseline identity %+v, want %+v", name, id, gc.want)
	}
	return gc
}

func (gc *guardClient) dial(t *testing.T) {
	t.Helper()
	u := strings.Replace(gc.h.url(gc.ref, gc.role, gc.tok), "default_query_exec_mode=simple_protocol", "default_query_exec_mode="+gc.mode, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, u)
	if err != nil {
		t.Fatalf("%s: connect: %v", gc.name, err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	gc.c = c
}

// check asserts that the identity is unchanged and the session usable; a
// broken connection is reported and replaced so that the suite goes on.
func (gc *guardClient) check(t *testing.T, after string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	id, err := readGuardIdent(ctx, gc.c)
	if err != nil {
		t.Errorf("after %s: %s session not usable: %v", after, gc.name, err)
		gc.c.Close(context.Background())
		gc.dial(t)
		return
	}
	if id != gc.want {
		t.Errorf("after %s: %s identity changed:\n got  %+v\n want %+v", after, gc.name, id, gc.want)
	}
	var n int
	if err := gc.c.QueryRow(ctx, "SELECT count(*) FROM items WHERE false").Scan(&n); err != nil {
		t.Errorf("after %s: %s cannot read items: %v", after, gc.name, err)
	}
}

type guardVia int

const (
	viaSimple  guardVia = iota // simple query protocol (pgx simple_protocol)
	viaCache                   // pgx cache_statement: named Parse/Describe, then Bind/Execute
	viaExec                    // pgx exec mode: unnamed Parse+Bind+Describe+Execute+Sync in one batch
	viaPrepare                 // pgconn.Prepare under a client name, then ExecPrepared of that name
	viaUnnamed                 // pgconn.ExecParams: unnamed statement without arguments
)

func (v guardVia) String() string {
	return [...]string{"simple", "cache_statement", "exec", "pgconn.Prepare", "pgconn.ExecParams"}[v]
}

type guardAttack struct {
	name string
	sql  string
	via  guardVia
	args []any
	code string // "" = 42501
}

// guardAttacks are identity escalations written as an attacker would.
var guardAttacks = []guardAttack{
	// SET / RESET of the role.
	{name: "SET ROLE", sql: `SET ROLE service_role`},
	{name: "mixed case, quoted role name", sql: `sEt RoLe "service_role"`},
	{name: "comments around SET ROLE", sql: "/* harmless */ SET/**/ROLE -- really\n service_role"},
	{name: "SET SESSION ROLE string", sql: `SET SESSION ROLE 'service_role'`},
	{name: "SET ROLE NONE", sql: `set role none`},
	{name: "generic SET of quoted upper-case ROLE", sql: `SET "ROLE" = 'service_role'`},
	{name: "SET LOCAL role", sql: `SET LOCAL role = service_role`},
	{name: "RESET ROLE", sql: `RESET ROLE`},
	{name: "RESET quoted role", sql: `reset "role"`},
	// Session authorization.
	{name: "SET SESSION AUTHORIZATION", sql: `SET SESSION AUTHORIZATION postgres`},
	{name: "SET SESSION AUTHORIZATION DEFAULT", sql: `set session authorization default`},
	{name: "RESET SESSION AUTHORIZATION", sql: `RESET SESSION AUTHORIZATION`},
	{name: "generic SET session_authorization", sql: `SET "session_authorization" TO 'postgres'`},
	{name: "set_config session_authorization", sql: `SELECT set_config('session_authorization', 'postgres', false)`},
	// Wholesale resets: emulated alone (see the controls below), refused
	// where they cannot be.
	{name: "RESET ALL twice", sql: `RESET ALL; /*x*/ reset all`, code: "0A000"},
	{name: "DISCARD ALL with another statement", sql: `SELECT 1; /*x*/ discard ALL`, code: "25001"},
	{name: "DISCARD ALL in query_to_xml", sql: `SELECT query_to_xml('DISCARD ALL', true, false, '')`},
	// set_config on the role.
	{name: "set_config role", sql: `SELECT set_config('role', 'service_role', false)`},
	{name: "PG_CATALOG.\"set_config\" upper-case name", sql: `SELECT PG_CATALOG."set_config"('ROLE', 'service_role', false)`},
	{name: "quoted schema, is_local", sql: `select "pg_catalog".set_config('Role', 'service_role', true)`},
	{name: "set_config in FROM", sql: `SELECT * FROM pg_catalog.set_config('role', 'service_role', false)`},
	{name: "set_config in VALUES", sql: `VALUES (set_config('role', 'service_role', false))`},
	{name: "set_config E'' escape", sql: `SELECT set_config(E'r\x6fle', 'service_role', false)`},
	{name: "set_config U&'' escape", sql: `SELECT set_config(U&'r\006Fle', 'service_role', false)`},
	{name: "set_config dollar-quoted name", sql: `SELECT set_config($q$role$q$, 'service_role', false)`},
	{name: "set_config named arguments reordered", sql: `SELECT set_config(new_value => 'service_role', setting_name => 'role', is_local => false)`},
	{name: "set_config non-constant: lower()", sql: `SELECT set_config(lower('ROLE'), 'service_role', false)`},
	{name: "set_config non-constant: concatenation", sql: `select set_config('ro' || 'le', 'service_role', false)`},
	{name: "set_config non-constant: column", sql: `SELECT set_config(n, 'service_role', false) FROM (VALUES ('role')) v(n)`},
	// Claims.
	{name: "SET request.jwt.claims", sql: `SET request.jwt.claims = '{"sub":"victim","role":"service_role"}'`},
	{name: "SET quoted request.jwt.claims", sql: `set "request.jwt.claims" to '{"sub":"victim"}'`},
	{name: "SET LOCAL claims in a multi-statement transaction", sql: `BEGIN; SET LOCAL request.jwt.claims TO '{"sub":"victim"}'; SELECT current_setting('request.jwt.claims'); COMMIT`},
	{name: "RESET request.jwt.claims", sql: `RESET request.jwt.claims`},
	{name: "set_config claims", sql: `SELECT set_config('request.jwt.claims', '{"sub":"victim","role":"service_role"}', false)`},
	{name: "set_config mixed-case claims", sql: `SELECT set_config('Request.JWT.Claims', '{"sub":"victim"}', true)`},
	{name: "set_config legacy claim.sub", sql: `select set_config('request.jwt.claim.sub', 'victim', false)`},
	// Hidden in bigger statements.
	{name: "multi-statement: SET ROLE between harmless", sql: `SELECT 1; SET ROLE service_role; SELECT 2`},
	{name: "multi-statement: set_config last", sql: `select 1; select pg_catalog.set_config('request.jwt.claims', '{}', false)`},
	{name: "CTE", sql: `WITH x AS (SELECT set_config('role', 'service_role', false) AS r) SELECT r FROM x`},
	{name: "CTE feeding an INSERT", sql: `WITH x AS (SELECT set_config('request.jwt.claims', '{"sub":"victim"}', false) AS v) INSERT INTO items (body) SELECT v FROM x`},
	{name: "scalar subquery in WHERE", sql: `SELECT 1 WHERE (SELECT set_config('role', 'service_role', false)) IS NOT NULL`},
	{name: "EXPLAIN ANALYZE", sql: `EXPLAIN ANALYZE SELECT set_config('role', 'service_role', false)`},
	{name: "EXPLAIN with options", sql: `explain (costs off) select set_config('role', 'service_role', false)`},
	{name: "SQL PREPARE/EXECUTE", sql: `PREPARE esc AS SELECT set_config('role', 'service_role', false); EXECUTE esc`},
	{name: "DECLARE CURSOR", sql: `BEGIN; DECLARE cur CURSOR FOR SELECT set_config('role', 'service_role', false); FETCH cur; COMMIT`},
	{name: "UPDATE pg_settings", sql: `UPDATE pg_settings SET setting = 'service_role' WHERE name = 'role'`},
	{name: "UPDATE pg_catalog.\"pg_settings\" claims", sql: `update pg_catalog."pg_settings" set setting = '{"sub":"victim"}' where name = 'request.jwt.claims'`},
	{name: "query_to_xml running set_config", sql: `SELECT query_to_xml('SELECT set_config(''role'',''service_role'',false)', true, false, '')`},
	{name: "ts_stat running set_config", sql: `SELECT * FROM ts_stat('SELECT to_tsvector(set_config(''role'',''service_role'',false))')`},
	// Routes around the guard.
	{name: "DO block with set_config", sql: `DO $$BEGIN PERFORM set_config('role', 'service_role', false); END$$`},
	{name: "DO block with dynamic SET ROLE", sql: `do language plpgsql $x$ begin execute 'SET ROLE service_role'; end $x$`},
	{name: "DO block with dynamic SQL built at run time (role not trusted)", sql: `DO $$ BEGIN EXECUTE 'SELECT ' || 1; END $$`},
	{name: "CREATE FUNCTION", sql: `CREATE FUNCTION pg_temp.esc() RETURNS text LANGUAGE sql AS $$ SELECT set_config('role', 'service_role', false) $$`},
	{name: "CREATE OR REPLACE PROCEDURE", sql: `create or replace procedure pg_temp.p() language sql as $$ select 1; set role service_role $$`},
	{name: "CREATE FUNCTION in another language", sql: `CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE plperl AS 'return 1'`},
	// plpgsql with no body string once made pg_query's plpgsql compiler
	// abort the whole proxy process.
	{name: "CREATE FUNCTION plpgsql with no body", sql: `CREATE FUNCTION d(c t)LANGUAGE plpgsql`},
	{name: "CREATE FUNCTION plpgsql with a SQL-standard body", sql: `CREATE FUNCTION pg_temp.d() RETURNS int LANGUAGE plpgsql RETURN 1`},
	{name: "DO plpgsql with no body", sql: `DO LANGUAGE plpgsql`},
	{name: "pgconn.Prepare DO with no body", via: viaPrepare, sql: `DO LANGUAGE plpgsql`},
	{name: "pgconn.ExecParams CREATE PROCEDURE plpgsql BEGIN ATOMIC", via: viaUnnamed, sql: `CREATE PROCEDURE pg_temp.p() LANGUAGE plpgsql BEGIN ATOMIC SELECT 1; END`},
	{name: "CREATE TEMP VIEW over set_config", sql: `CREATE TEMP VIEW esc AS SELECT set_config('role', 'service_role', false) AS r`},
	{name: "CREATE TEMP TABLE with set_config default", sql: `CREATE TEMP TABLE esc (r text DEFAULT set_config('role', 'service_role', false))`},
	{name: "ALTER ROLE SET role", sql: `ALTER ROLE authenticated SET role = 'service_role'`},
	{name: "ALTER USER SUPERUSER", sql: `alter user authenticated with superuser`},
	{name: "ALTER ROLE CURRENT_USER SET claims", sql: `ALTER ROLE CURRENT_USER SET request.jwt.claims = '{"sub":"victim"}'`},
	{name: "ALTER SYSTEM", sql: `ALTER SYSTEM SET shared_preload_libraries = 'evil'`},
	{name: "GRANT service_role (guard or PostgreSQL)", sql: `GRANT service_role TO authenticated`},
	{name: "COPY FROM PROGRAM", sql: `COPY items (body) FROM PROGRAM 'id'`},
	{name: "COPY TO PROGRAM", sql: `copy (select 1) to program 'cat > /tmp/cascata-guard-pwn'`},
	{name: "LOAD", sql: `LOAD '/tmp/evil.so'`},
	{name: "unparsable", sql: `SELEC set_config('role', 'service_role', false)`, code: "42601"},
	{name: "unparsable tail after SET ROLE", sql: `SET ROLE service_role; SELEC 1`, code: "42601"},
	// Extended protocol.
	{name: "cache_statement: set_config($1, $2)", via: viaCache, sql: `SELECT set_config($1, $2, false)`, args: []any{"role", "service_role"}},
	{name: "cache_statement: claims from a parameter", via: viaCache, sql: `select pg_catalog.set_config('request.jwt.claims', $1, false)`, args: []any{`{"sub":"victim"}`}},
	{name: "cache_statement: CTE", via: viaCache, sql: `WITH x AS (SELECT set_config('role', $1, false) r) SELECT r FROM x`, args: []any{"service_role"}},
	{name: "exec mode: set_config in one batch", via: viaExec, sql: `SELECT PG_CATALOG.set_config('ROLE', $1::text, false)`, args: []any{"service_role"}},
	{name: "exec mode: claims in one batch", via: viaExec, sql: `SELECT set_config('request.jwt.claims', $1::text, true)`, args: []any{`{"sub":"victim"}`}},
	{name: "pgconn.Prepare SET ROLE", via: viaPrepare, sql: `SET ROLE service_role`},
	{name: "pgconn.Prepare set_config", via: viaPrepare, sql: `SELECT pg_catalog.set_config('role', $1, false)`},
	{name: "pgconn.Prepare RESET ALL in query_to_xml", via: viaPrepare, sql: `SELECT query_to_xml('RESET ALL', true, false, '')`},
	{name: "pgconn.ExecParams SET SESSION AUTHORIZATION", via: viaUnnamed, sql: `SET SESSION AUTHORIZATION postgres`},
	{name: "pgconn.ExecParams set_config", via: viaUnnamed, sql: `SELECT set_config('role', 'service_role', false)`},
}

func TestGuardAttackSuite(t *testing.T) {
	if len(guardAttacks) < 30 {
		t.Fatalf("only %d attacks", len(guardAttacks))
	}
	// One backend: the attacker and the bystander share it.
	h := startProxy(t, harnessOpts{poolSize: 1, projects: []string{"p1"}})
	ctx := context.Background()
	simple := newGuardClient(t, h, "attacker(simple)", "p1", "authenticated", "attacker", "simple_protocol")
	cached := newGuardClient(t, h, "attacker(cache_statement)", "p1", "authenticated", "attacker", "cache_statement")
	execc := newGuardClient(t, h, "attacker(exec)", "p1", "authenticated", "attacker", "exec")
	bystander := newGuardClient(t, h, "bystander", "p1", "anon", "bystander", "simple_protocol")
	// A client of the attacker's own role: after the attacker, its setup
	// changes only the claims (cs_claims), trusting the role the backend
	// has. Whatever an attack did to the role must not reach it.
	peer := newGuardClient(t, h, "peer", "p1", "authenticated", "peer", "simple_protocol")

	seen := map[string]bool{}
	for i, a := range guardAttacks {
		if key := a.via.String() + a.sql; seen[key] {
			t.Fatalf("duplicate attack %q", a.sql)
		} else {
			seen[key] = true
		}
		want := a.code
		if want == "" {
			want = "42501"
		}
		label := fmt.Sprintf("#%d %s [%s]", i, a.name, a.via)
		gc := simple
		var err error
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		switch a.via {
		case viaSimple:
			_, err = simple.c.Exec(cctx, a.sql)
		case viaCache, viaExec:
			if a.via == viaExec {
				gc = execc
			} else {
				gc = cached
			}
			var rows pgx.Rows
			rows, err = gc.c.Query(cctx, a.sql, a.args...)
			if err == nil {
				for rows.Next() {
				}
				rows.Close()
				err = rows.Err()
			}
		case viaPrepare:
			gc = cached
			name := fmt.Sprintf("esc_%d", i)
			_, err = gc.c.PgConn().Prepare(cctx, name, a.sql, nil)
			if err != nil {
				// The refused statement must not exist under the client's name.
				res := gc.c.PgConn().ExecPrepared(cctx, name, [][]byte{[]byte("service_role")}, nil, nil).Read()
				if sqlstate(res.Err) != "26000" {
					t.Errorf("%s: ExecPrepared of the refused statement: %v, want 26000", label, res.Err)
				}
			}
		case viaUnnamed:
			gc = cached
			err = gc.c.PgConn().ExecParams(cctx, a.sql, nil, nil, nil, nil).Read().Err
		}
		cancel()
		var pe *pgconn.PgError
		switch {
		case err == nil:
			t.Errorf("%s: %q was accepted, want %s", label, a.sql, want)
		case !errors.As(err, &pe):
			t.Errorf("%s: %q: %v (no SQLSTATE), want %s", label, a.sql, err, want)
		case pe.Code != want || pe.Severity != "ERROR":
			t.Errorf("%s: %q: %s %s %q, want ERROR %s", label, a.sql, pe.Severity, pe.Code, pe.Message, want)
		}
		gc.check(t, label)
		peer.check(t, label)
		bystander.check(t, label)
	}
	// The attacker's other connections too.
	for _, gc := range []*guardClient{simple, cached, execc} {
		gc.check(t, "the whole suite")
	}

	// Controls: the guard does not refuse harmless neighbours.
	for _, q := range []string{
		`SET application_name = 'guard-test'`,
		`SELECT set_config('statement_timeout', '5s', false)`,
		`DISCARD PLANS`,
		`SELECT current_setting('role'), current_setting('request.jwt.claims')`,
		`RESET statement_timeout`,
		`RESET ALL`,
		`/*x*/ discard ALL`,
		`SELECT 1; RESET ALL`,
		`DO $$ DECLARE n int; BEGIN SELECT count(*) INTO n FROM pg_class; RAISE NOTICE '%', n; END $$`,
	} {
		if _, err := simple.c.Exec(ctx, q); err != nil {
			t.Errorf("harmless %q refused: %v", q, err)
		}
		simple.check(t, q)
		peer.check(t, q)
	}
}

// TestGuardInTransaction: a refusal inside a transaction aborts it like any
// error (25P02 until ROLLBACK), a savepoint recovers from it, and the
// identity stays the client's.
func TestGuardInTransaction(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 2, projects: []string{"p1"}})
	ctx := context.Background()
	simple := newGuardClient(t, h, "attacker(simple)", "p1", "authenticated", "tx-attacker", "simple_protocol")
	cached := newGuardClient(t, h, "attacker(cache_statement)", "p1", "authenticated", "tx-attacker", "cache_statement")
	bystander := newGuardClient(t, h, "bystander", "p1", "service_role", "tx-bystander", "simple_protocol")

	count := func(body string) int {
		t.Helper()
		var n int
		if err := superConnDB(t, "p1").QueryRow(ctx, "SELECT count(*) FROM items WHERE body = $1", body).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	attacks := []struct {
		name string
		gc   *guardClient
		run  func(tx pgx.Tx) error
	}{
		{"SET ROLE", simple, func(tx pgx.Tx) error { _, err := tx.Exec(ctx, "SET ROLE service_role"); return err }},
		{"SET LOCAL role", simple, func(tx pgx.Tx) error { _, err := tx.Exec(ctx, "set local ROLE service_role"); return err }},
		{"set_config local claims", simple, func(tx pgx.Tx) error {
			_, err := tx.Exec(ctx, `SELECT set_config('request.jwt.claims', '{"sub":"victim"}', true)`)
			return err
		}},
		{"DO block", simple, func(tx pgx.Tx) error {
			_, err := tx.Exec(ctx, `DO $$BEGIN EXECUTE 'SET LOCAL ROLE service_role'; END$$`)
			return err
		}},
		{"Parse of set_config (cache_statement)", cached, func(tx pgx.Tx) error {
			var s string
			return tx.QueryRow(ctx, "SELECT set_config($1, 'service_role', true)", "role").Scan(&s)
		}},
	}
	for i, a := range attacks {
		body := fmt.Sprintf("guard-tx-%d-%d", i, time.Now().UnixNano())
		tx, err := a.gc.c.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, "INSERT INTO items (body) VALUES ($1)", body); err != nil {
			t.Fatalf("%s: insert: %v", a.name, err)
		}
		if err := a.run(tx); sqlstate(err) != "42501" {
			t.Errorf("%s in a transaction: %v, want 42501", a.name, err)
		}
		var one int
		if err := tx.QueryRow(ctx, "SELECT 1").Scan(&one); sqlstate(err) != "25P02" {
			t.Errorf("%s: next statement in the transaction: %v, want 25P02", a.name, err)
		}
		if st := a.gc.c.PgConn().TxStatus(); st != 'E' {
			t.Errorf("%s: transaction status %q, want 'E'", a.name, st)
		}
		if err := tx.Rollback(ctx); err != nil {
			t.Errorf("%s: rollback: %v", a.name, err)
		}
		if n := count(body); n != 0 {
			t.Errorf("%s: the aborted transaction's insert is visible (%d rows)", a.name, n)
		}
		a.gc.check(t, a.name+" in a transaction")
		bystander.check(t, a.name+" in a transaction")
	}

	// A savepoint recovers from a refusal like from any error.
	body := fmt.Sprintf("guard-sp-%d", time.Now().UnixNano())
	c := simple.c
	for _, q := range []string{"BEGIN", "INSERT INTO items (body) VALUES ('" + body + "')", "SAVEPOINT s"} {
		if _, err := c.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	if _, err := c.Exec(ctx, "RESET ROLE"); sqlstate(err) != "42501" {
		t.Errorf("RESET ROLE after a savepoint: %v, want 42501", err)
	}
	if _, err := c.Exec(ctx, "SELECT 1"); sqlstate(err) != "25P02" {
		t.Errorf("after the refusal: %v, want 25P02", err)
	}
	if _, err := c.Exec(ctx, "ROLLBACK TO SAVEPOINT s"); err != nil {
		t.Fatalf("rollback to savepoint: %v", err)
	}
	var user, sub string
	if err := c.QueryRow(ctx, "SELECT current_user, current_setting('request.jwt.claims')::jsonb->>'sub'").Scan(&user, &sub); err != nil || user != "authenticated" || sub != "tx-attacker" {
		t.Errorf("inside the recovered transaction: %q %q %v", user, sub, err)
	}
	if _, err := c.Exec(ctx, "COMMIT"); err != nil {
		t.Fatalf("commit: %v", err)
	}
	if n := count(body); n != 1 {
		t.Errorf("the row inserted before the savepoint: %d rows, want 1", n)
	}
	simple.check(t, "savepoint recovery")
	bystander.check(t, "savepoint recovery")
}

// TestGuardFunctionCall: the protocol's FunctionCall message calls a
// function by OID with no SQL text for the guard to parse. set_config's OID
// (2078) with 'role' or 'request.jwt.claims' must be refused, and must not
// change the session's identity, inside a transaction or out of one.
func TestGuardFunctionCall(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1, projects: []string{"p1"}})
	bystander := newGuardClient(t, h, "bystander", "p1", "anon", "fc-bystander", "simple_protocol")
	tok := token(t, "p1", "authenticated", "fc-attacker", nil)
	r := guardRawLogin(t, h, "authenticated", "p1", tok)
	const whoSQL = "SELECT current_user || '|' || (current_setting('request.jwt.claims')::jsonb->>'sub')"
	const want = "DataRow[authenticated|fc-attacker] CommandComplete ReadyForQuery"

	const setConfigOID = 2078 // pg_catalog.set_config(text, text, boolean)
	call := func(name, value string) *pgproto3.FunctionCall {
		return &pgproto3.FunctionCall{Function: setConfigOID, ArgFormatCodes: []uint16{0},
			Arguments: [][]byte{[]byte(name), []byte(value), []byte("false")}}
	}
	for _, args := range [][2]string{
		{"role", "service_role"},
		{"request.jwt.claims", `{"sub":"victim","role":"service_role"}`},
	} {
		label := "FunctionCall set_config(" + args[0] + ")"
		// As libpq's PQfn does: the FunctionCall alone, then wait for ReadyForQuery.
		got, timedOut := r.exchange(2*time.Second, call(args[0], args[1]))
		if timedOut {
			t.Errorf("%s: no reply within 2s (got %q): a libpq PQfn client hangs; sending Sync", label, got)
			more, _ := r.exchange(2*time.Second, &pgproto3.Sync{})
			got += " | after Sync: " + more
		}
		if !fcRefused(got) {
			t.Errorf("%s: %s, want ERROR 42501 (or 0A000 for no FunctionCall at all)", label, got)
		}
		// Whatever came back, the next query must get its own answer.
		if out, _ := r.exchange(3*time.Second, &pgproto3.Query{String: whoSQL}); !strings.HasPrefix(out, want) {
			t.Errorf("after %s: the next query got %q, want %q", label, out, want)
		}
		bystander.check(t, label)

		// Inside a transaction the backend stays attached: a statement after
		// the call must still run as the client.
		label += " in a transaction"
		r.exchange(3*time.Second, &pgproto3.Query{String: "BEGIN"})
		got, timedOut = r.exchange(2*time.Second, call(args[0], args[1]), &pgproto3.Sync{})
		if timedOut || !fcRefused(got) {
			t.Errorf("%s: %s (timed out: %v), want ERROR 42501 (or 0A000)", label, got, timedOut)
		}
		r.exchange(300 * time.Millisecond) // a second ReadyForQuery, if any
		out, _ := r.exchange(3*time.Second, &pgproto3.Query{String: "ROLLBACK; " + whoSQL})
		if !strings.Contains(out, "DataRow[authenticated|fc-attacker]") {
			t.Errorf("%s: identity afterwards %q, want authenticated|fc-attacker", label, out)
		}
		bystander.check(t, label)
	}
}

// fcRefused says whether a FunctionCall's replies are a refusal: 42501 like
// any identity change, or 0A000 when the proxy does not offer FunctionCall.
func fcRefused(replies string) bool {
	return strings.Contains(replies, "ErrorResponse[ERROR 42501") || strings.Contains(replies, "ErrorResponse[ERROR 0A000")
}

// guardRaw is a hand-driven protocol client.
type guardRaw struct {
	t  *testing.T
	c  net.Conn
	fe *pgproto3.Frontend
}

func guardRawLogin(t *testing.T, h *harness, user, db, tok string) *guardRaw {
	t.Helper()
	c, err := net.DialTimeout("tcp", h.addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	r := &guardRaw{t: t, c: c, fe: pgproto3.NewFrontend(c, c)}
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	r.fe.Send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersionNumber, Parameters: map[string]string{"user": user, "database": db}})
	if err := r.fe.Flush(); err != nil {
		t.Fatal(err)
	}
	if m, err := r.fe.Receive(); err != nil {
		t.Fatal(err)
	} else if _, ok := m.(*pgproto3.AuthenticationCleartextPassword); !ok {
		t.Fatalf("want a password request, got %T", m)
	}
	r.fe.Send(&pgproto3.PasswordMessage{Password: tok})
	if err := r.fe.Flush(); err != nil {
		t.Fatal(err)
	}
	for {
		m, err := r.fe.Receive()
		if err != nil {
			t.Fatal(err)
		}
		if e, ok := m.(*pgproto3.ErrorResponse); ok {
			t.Fatalf("login: %s %s", e.Code, e.Message)
		}
		if _, ok := m.(*pgproto3.ReadyForQuery); ok {
			return r
		}
	}
}

// exchange sends msgs and describes what comes back until ReadyForQuery or
// until d passes.
func (r *guardRaw) exchange(d time.Duration, msgs ...pgproto3.FrontendMessage) (string, bool) {
	for _, m := range msgs {
		r.fe.Send(m)
	}
	if err := r.fe.Flush(); err != nil {
		return "write: " + err.Error(), false
	}
	_ = r.c.SetReadDeadline(time.Now().Add(d))
	var got []string
	for {
		m, err := r.fe.Receive()
		if err != nil {
			var ne net.Error
			return strings.Join(got, " "), errors.As(err, &ne) && ne.Timeout()
		}
		switch m := m.(type) {
		case *pgproto3.ErrorResponse:
			got = append(got, fmt.Sprintf("ErrorResponse[%s %s %s]", m.Severity, m.Code, m.Message))
		case *pgproto3.DataRow:
			got = append(got, fmt.Sprintf("DataRow[%s]", m.Values[0]))
		case *pgproto3.RowDescription:
		case *pgproto3.FunctionCallResponse:
			got = append(got, fmt.Sprintf("FunctionCallResponse[%s]", m.Result))
		case *pgproto3.ReadyForQuery:
			got = append(got, "ReadyForQuery")
			return strings.Join(got, " "), false
		case *pgproto3.CommandComplete:
			got = append(got, "CommandComplete")
		default:
			got = append(got, fmt.Sprintf("%T", m))
		}
	}
}

// superConnDB is a superuser connection to one database, closed with the test.
func superConnDB(t testing.TB, db string) *pgx.Conn {
	return connectURL(t, cluster.Primary.SuperuserURL(db))
}

// guardLogin connects as user to db with password tok and extra startup
// parameters; on success it returns the session's identity and closes.
func guardLogin(h *harness, user, db, tok string, params map[string]string) (string, error) {
	host, port, _ := net.SplitHostPort(h.addr)
	cfg, err := pgx.ParseConfig(fmt.Sprintf("postgres://%s@%s:%s/%s?sslmode=disable&connect_timeout=10",
		url.PathEscape(user), host, port, url.PathEscape(db)))
	if err != nil {
		return "", err
	}
	cfg.Password = tok
	for k, v := range params {
		cfg.RuntimeParams[k] = v
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return "", err
	}
	defer c.Close(ctx)
	var who string
	err = c.QueryRow(ctx, "SELECT current_user || ' ' || current_setting('request.jwt.claims')").Scan(&who)
	return who, err
}

// rawJWT assembles a token from a header, a payload and a signature.
func rawJWT(header, payload string, sig []byte) string {
	e := base64.RawURLEncoding.EncodeToString
	return e([]byte(header)) + "." + e([]byte(payload)) + "." + e(sig)
}

func TestGuardLoginTokens(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	now := time.Now()
	roles := []string{"anon", "authenticated", "service_role"}

	// p2 is verified with an RSA key from a JWKS; p3 checks iss and aud.
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	attackerKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	jwks := filepath.Join(t.TempDir(), "p2.jwks.json")
	if err := auth.WriteJWKSFile(jwks, auth.JWK{KeyID: "rsa-1", Algorithm: "RS256", Use: "sig", Key: rsaKey}); err != nil {
		t.Fatal(err)
	}
	if err := h.ver.SetProject("p2", auth.KeyConfig{JWKSFile: jwks}, auth.Policy{Roles: roles}); err != nil {
		t.Fatal(err)
	}
	const iss, aud = "https://auth.cascata.test/p3", "cascata-p3"
	if err := h.ver.SetProject("p3", auth.KeyConfig{Secrets: [][]byte{[]byte(testSecret + "p3")}},
		auth.Policy{Roles: roles, Issuer: iss, Audience: aud}); err != nil {
		t.Fatal(err)
	}

	mint := func(key auth.MintKey, claims map[string]any, ttl time.Duration) string {
		t.Helper()
		tok, err := auth.Mint(key, claims, ttl)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	p1 := auth.MintKey{Secret: []byte(testSecret + "p1")}
	p3 := auth.MintKey{Secret: []byte(testSecret + "p3")}
	rs := auth.MintKey{PrivateKey: rsaKey, KeyID: "rsa-1"}
	claims := func(role string, kv ...any) map[string]any {
		m := map[string]any{"role": role, "sub": "login-attacker"}
		for i := 0; i+1 < len(kv); i += 2 {
			m[kv[i].(string)] = kv[i+1]
		}
		return m
	}
	valid := mint(p1, claims("anon"), time.Hour)

	// Tampered payload: the anon token's signature over a service_role payload.
	parts := strings.Split(valid, ".")
	tampered := parts[0] + "." + base64.RawURLEncoding.EncodeToString([]byte(`{"role":"service_role","sub":"login-attacker","exp":`+fmt.Sprint(now.Add(time.Hour).Unix())+`}`)) + "." + parts[2]
	noneClaims := fmt.Sprintf(`{"role":"service_role","sub":"x","exp":%d}`, now.Add(time.Hour).Unix())

	pubDER, err := x509.MarshalPKIXPublicKey(&rsaKey.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER})
	pkcs1 := x509.MarshalPKCS1PublicKey(&rsaKey.PublicKey)
	jwksBytes, err := auth.MarshalJWKS(auth.JWK{KeyID: "rsa-1", Algorithm: "RS256", Use: "sig", Key: rsaKey})
	if err != nil {
		t.Fatal(err)
	}
	big := mint(p1, claims("anon", "pad", strings.Repeat("A", 6500)), time.Hour)
	if len(big) <= 8192 || len(big) > 15000 {
		t.Fatalf("oversized token is %d bytes", len(big))
	}

	type login struct {
		name     string
		user, db string
		tok      string
		params   map[string]string
		code     string // "" = must succeed
	}
	cases := []login{
		// Sanity: what the attacks are variations of.
		{name: "valid HS256 token", user: "anon", db: "p1", tok: valid},
		{name: "valid RS256 token (JWKS)", user: "anon", db: "p2", tok: mint(rs, claims("anon"), time.Hour)},
		{name: "valid iss and aud", user: "anon", db: "p3", tok: mint(p3, claims("anon", "iss", iss, "aud", []string{"other", aud}), time.Hour)},
		{name: "role.ref user name", user: "anon.p1", db: "postgres", tok: valid},

		{name: "forged signature (attacker's secret)", user: "service_role", db: "p1", tok: mint(auth.MintKey{Secret: []byte("attacker-secret-attacker-secret-0123456789")}, claims("service_role"), time.Hour), code: "28P01"},
		{name: "tampered payload, original signature", user: "service_role", db: "p1", tok: tampered, code: "28P01"},
		{name: "signature stripped", user: "anon", db: "p1", tok: parts[0] + "." + parts[1] + ".", code: "28P01"},
		{name: "expired", user: "anon", db: "p1", tok: mint(p1, claims("anon", "exp", now.Add(-time.Hour).Unix()), time.Hour), code: "28P01"},
		{name: "nbf in the future", user: "anon", db: "p1", tok: mint(p1, claims("anon", "nbf", now.Add(time.Hour).Unix()), time.Hour), code: "28P01"},
		{name: "iat in the future", user: "anon", db: "p1", tok: mint(p1, claims("anon", "iat", now.Add(time.Hour).Unix()), 2*time.Hour), code: "28P01"},
		{name: "no exp", user: "anon", db: "p1", tok: mint(p1, claims("anon"), 0), code: "28P01"},
		{name: "wrong issuer", user: "anon", db: "p3", tok: mint(p3, claims("anon", "iss", "https://evil.example", "aud", aud), time.Hour), code: "28P01"},
		{name: "missing issuer", user: "anon", db: "p3", tok: mint(p3, claims("anon", "aud", aud), time.Hour), code: "28P01"},
		{name: "wrong audience", user: "anon", db: "p3", tok: mint(p3, claims("anon", "iss", iss, "aud", []string{"cascata-p1", "other"}), time.Hour), code: "28P01"},
		{name: "alg none", user: "service_role", db: "p1", tok: rawJWT(`{"alg":"none","typ":"JWT"}`, noneClaims, nil), code: "28P01"},
		{name: "alg nOnE", user: "service_role", db: "p1", tok: rawJWT(`{"alg":"nOnE","typ":"JWT"}`, noneClaims, nil), code: "28P01"},
		{name: "alg none against a JWKS project", user: "service_role", db: "p2", tok: rawJWT(`{"alg":"none","kid":"rsa-1"}`, noneClaims, []byte("x")), code: "28P01"},
		{name: "HS256 keyed with the RSA public key PEM, kid", user: "service_role", db: "p2", tok: mint(auth.MintKey{Secret: pubPEM, KeyID: "rsa-1"}, claims("service_role"), time.Hour), code: "28P01"},
		{name: "HS256 keyed with the RSA public key PEM, no kid", user: "service_role", db: "p2", tok: mint(auth.MintKey{Secret: pubPEM}, claims("service_role"), time.Hour), code: "28P01"},
		{name: "HS256 keyed with the PKCS#1 DER public key", user: "service_role", db: "p2", tok: mint(auth.MintKey{Secret: pkcs1, KeyID: "rsa-1"}, claims("service_role"), time.Hour), code: "28P01"},
		{name: "HS256 keyed with the JWKS document", user: "service_role", db: "p2", tok: mint(auth.MintKey{Secret: jwksBytes}, claims("service_role"), time.Hour), code: "28P01"},
		{name: "RS256 by the attacker's key under the real kid", user: "service_role", db: "p2", tok: mint(auth.MintKey{PrivateKey: attackerKey, KeyID: "rsa-1"}, claims("service_role"), time.Hour), code: "28P01"},
		{name: "unknown kid", user: "anon", db: "p2", tok: mint(auth.MintKey{PrivateKey: rsaKey, KeyID: "rsa-2"}, claims("anon"), time.Hour), code: "28P01"},
		{name: "kid as a path", user: "anon", db: "p2", tok: mint(auth.MintKey{PrivateKey: attackerKey, KeyID: "../../../../" + jwks}, claims("anon"), time.Hour), code: "28P01"},
		{name: "kid as a URL", user: "anon", db: "p2", tok: mint(auth.MintKey{PrivateKey: attackerKey, KeyID: "http://127.0.0.1:1/jwks.json"}, claims("anon"), time.Hour), code: "28P01"},
		{name: "oversized token (> 8 KiB)", user: "anon", db: "p1", tok: big, code: "28P01"},
		{name: "another project's token (p3 secret on p1)", user: "anon", db: "p1", tok: mint(p3, claims("anon", "iss", iss, "aud", aud), time.Hour), code: "28P01"},
		{name: "own key, ref claim names another project", user: "anon", db: "p1", tok: mint(p1, claims("anon", "ref", "p2"), time.Hour), code: "28P01"},
		{name: "empty password", user: "anon", db: "p1", tok: "", code: "28P01"},
		{name: "not a JWT", user: "anon", db: "p1", tok: "service_role", code: "28P01"},
		{name: "role not in roles: postgres", user: "postgres", db: "p1", tok: mint(p1, claims("postgres"), time.Hour), code: "28000"},
		{name: "role not in roles: authenticator", user: "authenticator", db: "p1", tok: mint(p1, claims("authenticator"), time.Hour), code: "28000"},
		{name: "role not in roles: SERVICE_ROLE", user: "SERVICE_ROLE", db: "p1", tok: mint(p1, claims("SERVICE_ROLE"), time.Hour), code: "28000"},
		{name: "user name not the token's role", user: "service_role", db: "p1", tok: valid, code: "28000"},
		{name: "role.ref user name with another role", user: "service_role.p1", db: "p1", tok: valid, code: "28000"},
		{name: "role.ref naming p1, database p2", user: "anon.p1", db: "p2", tok: valid, code: "28000"},
		{name: "role.ref naming p2 with p1's token", user: "anon.p2", db: "postgres", tok: valid, code: "28P01"},
		{name: "unknown project", user: "anon", db: "nope", tok: valid, code: "3D000"},
		{name: "options -c role=service_role", user: "anon", db: "p1", tok: valid, params: map[string]string{"options": "-c role=service_role"}, code: "42501"},
		{name: "options -crole", user: "anon", db: "p1", tok: valid, params: map[string]string{"options": "-crole=service_role"}, code: "42501"},
		{name: "options --role", user: "anon", db: "p1", tok: valid, params: map[string]string{"options": "--role=service_role"}, code: "42501"},
		{name: "options --session-authorization", user: "anon", db: "p1", tok: valid, params: map[string]string{"options": "-c statement_timeout=0 --session-authorization=postgres"}, code: "42501"},
		{name: "options claims", user: "anon", db: "p1", tok: valid, params: map[string]string{"options": `-c request.jwt.claims={"sub":"victim"}`}, code: "42501"},
		{name: "startup parameter role", user: "anon", db: "p1", tok: valid, params: map[string]string{"role": "service_role"}, code: "42501"},
		{name: "startup parameter Role", user: "anon", db: "p1", tok: valid, params: map[string]string{"Role": "service_role"}, code: "42501"},
		{name: "startup parameter request.jwt.claim.sub", user: "anon", db: "p1", tok: valid, params: map[string]string{"request.jwt.claim.sub": "victim"}, code: "42501"},
	}
	for _, c := range cases {
		who, err := guardLogin(h, c.user, c.db, c.tok, c.params)
		switch {
		case c.code == "" && err != nil:
			t.Errorf("%s: %v, want success", c.name, err)
		case c.code == "" && !strings.HasPrefix(who, strings.Split(c.user, ".")[0]+" "):
			t.Errorf("%s: identity %q, want role %s", c.name, who, c.user)
		case c.code != "" && err == nil:
			t.Errorf("%s: logged in as %q, want %s", c.name, who, c.code)
		case c.code != "" && sqlstate(err) != c.code:
			t.Errorf("%s: %v, want %s", c.name, err, c.code)
		}
	}
	if _, err := guardLogin(h, "anon", "p1", valid, nil); err != nil {
		t.Fatalf("valid login after the attacks: %v", err)
	}
}

// trustedProxy is a proxy in front of project ref alone, with a pool of
// one backend and roles trusted to run DO and CREATE FUNCTION.
func trustedProxy(t *testing.T, ref string, roles ...string) *harness {
	t.Helper()
	h := startProxy(t, harnessOpts{poolSize: 1, projects: []string{ref}})
	if err := h.srv.SetProjects([]proxy.ProjectConfig{{
		Ref:          ref,
		DatabaseURL:  cluster.Primary.URL("authenticator", loginPassword, ref),
		PoolSize:     1,
		TrustedRoles: roles,
	}}); err != nil {
		t.Fatal(err)
	}
	return h
}

// TestGuardTrustedRole: DO and CREATE FUNCTION are refused by role: a role
// marked trusted in the project may run them, the others may not.
func TestGuardTrustedRole(t *testing.T) {
	h := trustedProxy(t, "p2", "service_role")
	ctx := context.Background()
	do := `DO $$ BEGIN EXECUTE 'SELECT ' || 1; END $$` // a body the guard cannot see whole
	trusted := newGuardClient(t, h, "trusted", "p2", "service_role", "ops", "simple_protocol")
	untrusted := newGuardClient(t, h, "untrusted", "p2", "authenticated", "user", "simple_protocol")
	if _, err := trusted.c.Exec(ctx, do); err != nil {
		t.Errorf("DO as a trusted role: %v", err)
	}
	trusted.check(t, "DO as trusted")
	if _, err := untrusted.c.Exec(ctx, do); sqlstate(err) != "42501" {
		t.Errorf("DO as an untrusted role: %v, want 42501", err)
	}
	untrusted.check(t, "DO as untrusted")
	// Trust does not open the identity statements themselves.
	if _, err := trusted.c.Exec(ctx, "SET ROLE authenticator"); sqlstate(err) != "42501" {
		t.Errorf("SET ROLE as a trusted role: %v, want 42501", err)
	}
	trusted.check(t, "SET ROLE as trusted")
}

// TestGuardFunctionBodies: a role that is not trusted may run DO and create
// functions whose body the guard sees whole (LANGUAGE sql or plpgsql,
// dynamic SQL only as string constants), each statement guarded; anything
// refused inside refuses the whole.
func TestGuardFunctionBodies(t *testing.T) {
	ctx := context.Background()
	serviceSchema(t, "p1", "bodies")
	h := startProxy(t, harnessOpts{poolSize: 1, projects: []string{"p1"}})
	gc := newGuardClient(t, h, "untrusted", "p1", "service_role", "dev", "simple_protocol")
	for _, q := range []string{
		`CREATE FUNCTION bodies.add(a int, b int) RETURNS int LANGUAGE plpgsql AS $$ DECLARE c int; BEGIN c := a + b; RETURN c; END $$`,
		`CREATE PROCEDURE bodies.swap(INOUT x int, INOUT y int) LANGUAGE plpgsql AS $$ DECLARE t int; BEGIN t := x; x := y; y := t; END $$`,
		`CREATE FUNCTION bodies.twice(int) RETURNS int LANGUAGE sql AS 'SELECT $1 * 2'`,
		`DO $$ BEGIN RAISE NOTICE 'hello'; EXECUTE 'SELECT 1'; END $$`,
	} {
		if _, err := gc.c.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
		gc.check(t, q)
	}
	var sum, twice, x, y int
	if err := gc.c.QueryRow(ctx, "SELECT bodies.add(2, 3), bodies.twice(21)").Scan(&sum, &twice); err != nil || sum != 5 || twice != 42 {
		t.Fatalf("calls: %d %d %v", sum, twice, err)
	}
	if err := gc.c.QueryRow(ctx, "CALL bodies.swap(1, 2)").Scan(&x, &y); err != nil || x != 2 || y != 1 {
		t.Fatalf("CALL: %d %d %v", x, y, err)
	}
	for _, q := range []string{
		`CREATE FUNCTION bodies.esc() RETURNS void LANGUAGE plpgsql AS $$ BEGIN SET ROLE authenticator; END $$`,
		`CREATE FUNCTION bodies.esc() RETURNS text LANGUAGE sql AS $$ SELECT set_config('request.jwt.claims', '{}', false) $$`,
		`CREATE FUNCTION bodies.esc(r text) RETURNS void LANGUAGE plpgsql AS $$ BEGIN EXECUTE format('SET ROLE %I', r); END $$`,
	} {
		if _, err := gc.c.Exec(ctx, q); sqlstate(err) != "42501" {
			t.Fatalf("%s: %v, want 42501", q, err)
		}
		gc.check(t, q)
	}
}
