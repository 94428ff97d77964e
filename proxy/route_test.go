package proxy

import (
	"testing"

	"cascata/router"
)

// Only texts that can neither end the implicit transaction they share with
// an inline identity, nor leave state, nor wait for more of the client's
// messages may share it: every form that ends a transaction (alone, after
// or before other statements, inside a call or a DO block), every utility
// statement PostgreSQL refuses inside a pipeline, every COPY from the
// client and every form the guard refuses is not plain. The router's real
// classifier decides, as in the proxy.
func TestPlainTexts(t *testing.T) {
	c := router.NewClassifier(router.Options{})
	for sql, want := range map[string]bool{
		"SELECT 1":                       true,
		"SELECT 1; SELECT 2":             true,
		"INSERT INTO t VALUES (1)":       true,
		"UPDATE t SET a = 1 WHERE b = 2": true,
		"DELETE FROM t":                  true,
		"SELECT * FROM t FOR UPDATE":     true,
		"WITH x AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM x": true,
		"":                                     false,
		"BEGIN":                                false,
		"START TRANSACTION":                    false,
		"COMMIT":                               false,
		"ROLLBACK":                             false,
		"SELECT 1; COMMIT":                     false,
		"COMMIT; SELECT current_user":          false,
		"INSERT INTO t VALUES (1); ROLLBACK":   false,
		"SELECT 1; ROLLBACK; SELECT 2":         false,
		"SAVEPOINT a":                          false,
		"RELEASE SAVEPOINT a":                  false,
		"PREPARE TRANSACTION 'x'":              false,
		"CALL p()":                             false,
		"SELECT 1; CALL p()":                   false,
		"INSERT INTO t VALUES (1); CALL p()":   false,
		"EXPLAIN ANALYZE CALL p()":             false,
		"DO $$ BEGIN COMMIT; END $$":           false,
		"SELECT my_function()":                 false,
		"SELECT nextval('s')":                  false,
		"SELECT pg_advisory_lock(1)":           false,
		"VACUUM t":                             false,
		"ANALYZE t":                            false,
		"CREATE INDEX CONCURRENTLY i ON t (a)": false,
		"CREATE TEMP TABLE x (a int)":          false,
		"LOCK TABLE t":                         false,
		"LISTEN c":                             false,
		"SET search_path = x":                  false,
		"SELECT 1; SET search_path = x":        false,
		"RESET ALL":                            false,
		"DISCARD ALL":                          false,
		"SET ROLE service_role":                false,
		"SELECT set_config('role', 'service_role', false)": false,
		"COPY t FROM STDIN":                       false,
		"SELECT 1; COPY t FROM STDIN":             false,
		"PREPARE s AS SELECT 1":                   false,
		"EXECUTE s":                               false,
		"DECLARE c CURSOR WITH HOLD FOR SELECT 1": false,
		"/* cascata:primary */ SELECT 1":          false,
	} {
		v := newVerdict(c.Classify(sql, router.Policy{}))
		if got := v.plain(); got != want {
			t.Errorf("%q: plain %v, want %v (reason %s, tx %s)", sql, got, want, v.Reason, v.Tx)
		}
	}
}
