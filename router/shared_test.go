package router

import "testing"

// A proxy that renames prepared statements per client translates a
// PREPARE, EXECUTE or DEALLOCATE only when it is the whole text; every
// other use must be visible to it, so it can refuse it.
func TestPreparedUses(t *testing.T) {
	c := NewClassifier(Options{})
	cases := []struct {
		sql        string
		uses       int
		translated bool
	}{
		{`PREPARE p AS SELECT 1`, 1, true},
		{`EXECUTE p`, 1, true},
		{`DEALLOCATE p`, 1, true},
		{`DEALLOCATE ALL`, 1, true},
		{`SELECT 1; EXECUTE cascata_set('role', 'service_role')`, 1, false},
		{`SELECT 1; DEALLOCATE ALL`, 1, false},
		{`DEALLOCATE cascata_ident; PREPARE cascata_ident(text) AS SELECT $1`, 2, false},
		{`EXPLAIN EXECUTE p`, 2, false},
		{`EXPLAIN ANALYZE EXECUTE cascata_set('role', 'service_role')`, 2, false},
		{`CREATE TEMP TABLE z AS EXECUTE cascata_set('role', 'service_role')`, 2, false},
		{`SELECT query_to_xml('EXECUTE p', true, false, '')`, 2, false},
		{`SELECT 1`, 0, false},
	}
	for _, tc := range cases {
		d := c.Classify(tc.sql, Policy{})
		if d.Refusal != nil {
			t.Errorf("%q refused: %s", tc.sql, d.Refusal.Message)
			continue
		}
		if d.PreparedUses < tc.uses || (tc.uses == 0) != (d.PreparedUses == 0) {
			t.Errorf("%q: PreparedUses %d, want %d", tc.sql, d.PreparedUses, tc.uses)
		}
		translated := d.SQLPrepared != nil || d.Deallocate != nil
		if translated != tc.translated {
			t.Errorf("%q: translatable %v, want %v", tc.sql, translated, tc.translated)
		}
	}
}

func TestReadsBackendState(t *testing.T) {
	c := NewClassifier(Options{})
	for sql, want := range map[string]bool{
		`SELECT name, statement FROM pg_prepared_statements`:               true,
		`SELECT * FROM pg_catalog.pg_cursors`:                              true,
		`SELECT * FROM pg_catalog.pg_prepared_statement()`:                 true,
		`SELECT (SELECT count(*) FROM pg_cursor()) AS n`:                   true,
		`SELECT query_to_xml('SELECT * FROM pg_cursors', true, false, '')`: true,
		`SELECT * FROM items`:                                              false,
	} {
		if d := c.Classify(sql, Policy{}); d.ReadsBackendState != want {
			t.Errorf("%q: ReadsBackendState %v, want %v", sql, d.ReadsBackendState, want)
		}
	}
}

// SessionState marks what a proxy must scrub before another client gets
// the backend, and nothing else: plain reads and writes, SQL PREPARE and
// SET (whose settings the proxy tracks) are not.
func TestSessionState(t *testing.T) {
	c := NewClassifier(Options{})
	for sql, want := range map[string]bool{
		`SELECT * FROM items WHERE id = 1`:         false,
		`INSERT INTO items (body) VALUES ('x')`:    false,
		`UPDATE items SET body = 'y' WHERE id = 1`: false,
		`DELETE FROM items`:                        false,
		`COPY items FROM STDIN`:                    false,
		`SET search_path = public`:                 false,
		`PREPARE p AS SELECT 1`:                    false,
		`SELECT pg_sleep(0.1)`:                     false,
		`CREATE TEMP TABLE t (x int)`:              true,
		`SELECT * INTO TEMP t2 FROM items`:         true,
		`DECLARE c CURSOR WITH HOLD FOR SELECT 1`:  true,
		`LISTEN ch`:                  true,
		`SELECT pg_advisory_lock(1)`: true,
		`SELECT nextval('s')`:        true,
		`EXECUTE p`:                  true,
		`CALL proc()`:                true,
		`SELECT my_func()`:           true,
		`INSERT INTO items (body) VALUES (my_func())`:        true,
		`SELECT query_to_xml('SELECT 1', true, false, '')`:   true,
		`SELECT set_config('statement_timeout', '1', false)`: true,
	} {
		if d := c.Classify(sql, Policy{}); d.SessionState != want {
			t.Errorf("%q: SessionState %v, want %v", sql, d.SessionState, want)
		}
	}
}

// KeepsSessionState marks the state a client means to keep across
// transactions, which a proxy may keep its backend for; it implies
// SessionState.
func TestKeepsSessionState(t *testing.T) {
	c := NewClassifier(Options{})
	for sql, want := range map[string]bool{
		`CREATE TEMP TABLE t (x int)`:                     true,
		`create temporary table t (x int) on commit drop`: true,
		`CREATE TABLE pg_temp.t (x int)`:                  true,
		`CREATE TYPE pg_temp.r AS RANGE (subtype = text)`: true,
		`CREATE TEMP VIEW v AS SELECT 1`:                  true,
		`CREATE TEMP SEQUENCE s`:                          true,
		`SELECT * INTO TEMP t2 FROM items`:                true,
		`DECLARE c CURSOR WITH HOLD FOR SELECT 1`:         true,
		`LISTEN ch`:                                          true,
		`SELECT pg_advisory_lock(1)`:                         true,
		`SELECT pg_try_advisory_lock_shared(1, 2)`:           true,
		`SELECT 1; LISTEN ch`:                                true,
		`CREATE TABLE t (x int)`:                             false,
		`DROP TABLE t`:                                       false,
		`UNLISTEN *`:                                         false,
		`DECLARE c CURSOR FOR SELECT 1`:                      false,
		`SELECT pg_advisory_xact_lock(1)`:                    false,
		`SELECT pg_advisory_unlock(1)`:                       false,
		`SELECT nextval('s')`:                                false,
		`INSERT INTO temperatures VALUES (1)`:                false,
		`CREATE TABLE temperatures (x int)`:                  false,
		`CREATE TABLE t2 (x int); SELECT 'temp'`:             false,
		`CREATE TABLE "pg_temp_2".x (y int)`:                 true,
		`CREATE TEMPORARY SEQUENCE s`:                        true,
		`SELECT * FROM items WHERE body = 'temporary'`:       false,
		`CALL proc()`:                                        false,
		`SELECT set_config('statement_timeout', '1', false)`: false,
	} {
		d := c.Classify(sql, Policy{})
		if d.KeepsSessionState != want {
			t.Errorf("%q: KeepsSessionState %v, want %v", sql, d.KeepsSessionState, want)
		}
		if want && !d.SessionState {
			t.Errorf("%q: KeepsSessionState without SessionState", sql)
		}
	}
}

// A lone RESET ALL or DISCARD ALL is reported for the proxy to emulate.
func TestReset(t *testing.T) {
	c := NewClassifier(Options{})
	// asyncpg's Pool resets a connection with this text.
	const asyncpg = "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;"
	d := c.Classify(asyncpg, Policy{})
	if d.Refusal != nil || d.Reset != ResetAll || asyncpg[d.ResetStart:d.ResetEnd] != "RESET ALL" {
		t.Fatalf("asyncpg's reset query: %+v, located %q", d, asyncpg[d.ResetStart:d.ResetEnd])
	}
	d = c.Classify("SELECT 1 /* ok */ ; reset all ; SELECT 2", Policy{})
	if d.Refusal != nil || d.Reset != ResetAll || d.ResetStart != 20 || d.ResetEnd != 29 {
		t.Fatalf("RESET ALL between statements: %+v", d)
	}
	for sql, want := range map[string]ResetKind{
		`RESET ALL`:          ResetAll,
		`reset all;`:         ResetAll,
		`DISCARD ALL`:        DiscardAll,
		` discard all ; `:    DiscardAll,
		`DISCARD TEMP`:       ResetNone,
		`RESET search_path`:  ResetNone,
		`SELECT 'RESET ALL'`: ResetNone,
	} {
		d := c.Classify(sql, Policy{})
		if d.Reset != want || d.Refusal != nil {
			t.Errorf("%q: Reset %v (refusal %v), want %v", sql, d.Reset, d.Refusal, want)
		}
	}
}
