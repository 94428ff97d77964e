package router

import "testing"

// The text after a PREPARE's or EXECUTE's statement name, as a proxy that
// rewrites the name needs it: through comments, quoted names, any case.
func TestSQLPreparedTail(t *testing.T) {
	c := NewClassifier(Options{})
	for sql, want := range map[string]SQLPrepared{
		`PREPARE p (int) AS SELECT $1`:               {Name: "p", Tail: ` (int) AS SELECT $1`},
		`/* c */ prepare  "Odd ""name"""AS SELECT 1`: {Name: `Odd "name"`, Tail: `AS SELECT 1`},
		"-- line\nEXECUTE p(1, 'a')":                 {Execute: true, Name: "p", Tail: `(1, 'a')`},
		`execute /* nested /* comment */ */ p2`:      {Execute: true, Name: "p2", Tail: ``},
		`EXECUTE émoi(2)`:                            {Execute: true, Name: "émoi", Tail: `(2)`},
		`EXECUTE p(3);`:                              {Execute: true, Name: "p", Tail: `(3)`},
	} {
		d := c.Classify(sql, Policy{})
		if d.SQLPrepared == nil || *d.SQLPrepared != want {
			t.Errorf("%q: %+v, want %+v", sql, d.SQLPrepared, want)
		}
	}
	// Literal arguments differ between texts: each gets its own tail.
	for _, arg := range []string{"1", "22", "'x'"} {
		d := c.Classify("EXECUTE p("+arg+")", Policy{})
		if d.SQLPrepared == nil || d.SQLPrepared.Tail != "("+arg+")" {
			t.Fatalf("EXECUTE p(%s): %+v", arg, d.SQLPrepared)
		}
	}
}

// Writes: the primary, for a reason that may change data.
func TestWrites(t *testing.T) {
	c := NewClassifier(Options{})
	for sql, want := range map[string]bool{
		`SELECT 1`:                       false,
		`INSERT INTO t VALUES (1)`:       true,
		`CREATE TABLE x (y int)`:         true,
		`SELECT nextval('s')`:            true,
		`BEGIN`:                          false,
		`SET search_path = public`:       false,
		`/* cascata:primary */ SELECT 1`: false,
		`SELECT * FROM t FOR UPDATE`:     true,
		`FETCH 1 FROM c`:                 false,
		``:                               false,
		`SELEC 1`:                        true,
	} {
		if d := c.Classify(sql, Policy{}); d.Writes != want {
			t.Errorf("%q: Writes %v, want %v (%s %s)", sql, d.Writes, want, d.Target, d.Reason)
		}
	}
}
