package router

import (
	"hash/maphash"
	"strconv"
	"strings"
	"testing"
)

func TestNormalizeKey(t *testing.T) {
	I, S, D := string(rune(markInteger)), string(rune(markString)), string(rune(markDecimal))
	for _, tc := range []struct {
		sql, key string
		n        int
	}{
		{"SELECT abalance FROM pgbench_accounts WHERE aid = 4711", "SELECT abalance FROM pgbench_accounts WHERE aid = " + I, 1},
		{"SELECT 'a''b', 1.5, 1e3, 2.5E-3, 7.", "SELECT " + S + ", " + D + ", " + D + ", " + D + ", " + D, 5},
		{"SELECT 1234567890", "SELECT 1234567890", 0},
		{"SELECT 123456789", "SELECT " + I, 1},
		{"SELECT -1, x-2", "SELECT -" + I + ", x-" + I, 2},
		{"-- 'x' 1\nSELECT 1", "-- 'x' 1\nSELECT " + I, 1},
		{"/* 'x' /* nested 2 */ 'y' */ SELECT 'z'", "/* 'x' /* nested 2 */ 'y' */ SELECT " + S, 1},
		{`SELECT "it's 1" FROM t2`, `SELECT "it's 1" FROM t2`, 0},
		{`SELECT $1, $2 FROM t WHERE a = $3`, `SELECT $1, $2 FROM t WHERE a = $3`, 0},
		{"SELECT 'a'\n'b'", "SELECT " + S + "\n" + S, 2},
		{"SELECT t1.c2 FROM t1", "SELECT t1.c2 FROM t1", 0},
		{"SELECT 'ü', \"é\"", "SELECT " + S + ", \"é\"", 1},
	} {
		key, n, ok := normalizeKey(tc.sql, nil)
		if !ok || key != tc.key || n != tc.n {
			t.Errorf("%q: got (%q, %d, %v), want (%q, %d)", tc.sql, key, n, ok, tc.key, tc.n)
		}
		var spans []int32
		if _, n2, _ := normalizeKey(tc.sql, &spans); n2 != n || len(spans) != n {
			t.Errorf("%q: spans %v for %d literals", tc.sql, spans, n)
		}
	}
	for _, sql := range []string{
		`SELECT E'a\'b'`, `SELECT e'x'`, `SELECT B'101'`, `SELECT X'1F'`, `SELECT N'x'`, `SELECT U&'d\0061t'`,
		`SELECT U&"d\0061t" UESCAPE '!'`, `SELECT $$x$$`, `SELECT $tag$x$tag$`, `SELECT 0x1F`, `SELECT 1_000`,
		`SELECT 1abc`, `SELECT 1..2`, `SELECT 1e`, `SELECT 'a\b'`, `SELECT 'unterminated`, `SELECT "unterminated`,
		"SELECT 1 /* unterminated", "SELECT '\x01'", "SELECT 1\x02", "SELECT 1\x00", `SELECT int4'1'`, `SELECT $1abc`,
	} {
		if key, n, ok := normalizeKey(sql, nil); ok && n > 0 {
			t.Errorf("%q: normalized to %q", sql, key)
		}
	}
}

func TestSpansMapped(t *testing.T) {
	for _, tc := range []struct {
		sql  string
		want bool
	}{
		{"SELECT * FROM t WHERE a = 1 AND b = 'x'", true},
		{"SELECT -1, - 2.5", true},
		{"SELECT now()::timestamp(3)", true},
		{"SELECT 'a'\n'b'", false},              // concatenated: one A_Const for two literals
		{"SELECT * FROM t LIMIT 1", true},       // expression
		{"SELECT interval '1' second(3)", true}, // typmods are A_Const too
	} {
		var spans []int32
		if _, _, ok := normalizeKey(tc.sql, &spans); !ok {
			t.Fatalf("%q not normalizable", tc.sql)
		}
		f := analyze(tc.sql, spans)
		if f.normalizable != tc.want {
			t.Errorf("%q: normalizable %v, want %v", tc.sql, f.normalizable, tc.want)
		}
	}
	// Statements whose analysis depends on literals are never normalizable.
	for _, sql := range []string{
		"SELECT set_config('search_path', 'a', false)",
		"SELECT query_to_xml('SELECT 1', true, false, '')",
		"SET statement_timeout = 5",
		"EXPLAIN (ANALYZE 0) DELETE FROM t",
		"FETCH 5 FROM c",
		"BEGIN READ ONLY; SELECT 1",
		"COPY t TO '/tmp/x'",
	} {
		var spans []int32
		normalizeKey(sql, &spans)
		if f := analyze(sql, spans); f.normalizable {
			t.Errorf("%q: normalizable", sql)
		}
	}
}

func TestLeadingRouteHint(t *testing.T) {
	for sql, want := range map[string]bool{
		"/* cascata:primary */ SELECT 1":          true,
		"  /*CASCATA:PRIMARY*/SELECT 1":           true,
		"/* cascata : primary */ SELECT 1":        true,
		"--cascata:primary\nSELECT 1":             true,
		"/* a */ -- b\n/* cascata:primary */ x":   true,
		"SELECT 1 /* cascata:primary */":          false,
		"/* cascata:primaryx */ SELECT 1":         false,
		"/* cascata:replica */ SELECT 1":          false,
		"/* /* cascata:primary */ */ SELECT 1":    false,
		"/* cascata:primary":                      false,
		strings.Repeat("/* x */", 100) + "SELECT": false,
	} {
		if got := leadingRouteHint(sql); got != want {
			t.Errorf("%q: %v, want %v", sql, got, want)
		}
	}
}

func TestLRU(t *testing.T) {
	c := newLRU(32, 1<<20) // 2 per shard
	for i := 0; i < 1000; i++ {
		c.add(strings.Repeat("k", i%50)+string(rune('a'+i%26)), uint64(i), &facts{statements: i})
	}
	if n := c.len(); n > 32 {
		t.Fatalf("cache holds %d entries, bound 32", n)
	}
	c.add("x", 1, &facts{statements: 1})
	c.add("x", 1, &facts{statements: 2})
	if f, ok := c.get("x", 1); !ok || f.statements != 2 {
		t.Fatalf("get after overwrite: %v %v", f, ok)
	}
	// Recency: in a one-entry-per-shard cache, re-adding evicts the old entry.
	d := newLRU(1, 1<<20)
	d.add("a", 0, &facts{})
	d.add("a", 0, &facts{})
	if d.len() != 1 {
		t.Fatalf("len %d", d.len())
	}
	// The byte budget evicts too: 16 shards of 64 bytes.
	e := newLRU(1000, 1024)
	for i := 0; i < 1000; i++ {
		e.add(strconv.Itoa(i)+strings.Repeat("x", 30), uint64(i), &facts{})
	}
	if n := e.len(); n > 16*2 {
		t.Fatalf("byte budget not enforced: %d entries", n)
	}
	e.add(strings.Repeat("y", 100), 5, &facts{})
	if _, ok := e.get(strings.Repeat("y", 100), 5); ok {
		t.Fatal("key larger than a shard's budget cached")
	}
	var nilCache *lru
	nilCache.add("a", 0, &facts{})
	if _, ok := nilCache.get("a", 0); ok || nilCache.len() != 0 {
		t.Fatal("nil cache stored something")
	}
}

func TestCacheDisabledAndLongQueries(t *testing.T) {
	c := NewClassifier(Options{CacheSize: -1})
	if d := c.Classify("SELECT 1", Policy{}); d.Target != Replica {
		t.Fatal(d)
	}
	c = NewClassifier(Options{MaxCachedQueryBytes: 16})
	long := "SELECT 1 FROM t WHERE a = 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'"
	c.Classify(long, Policy{})
	if c.exact.len()+c.norm.len() != 0 {
		t.Fatal("long query cached")
	}
}

func TestNormalizedCacheAdmission(t *testing.T) {
	c := NewClassifier(Options{})
	c.Classify("SELECT * FROM t WHERE id = 1", Policy{})
	if c.norm.len() != 1 || c.exact.len() != 0 {
		t.Fatalf("after first analysis: norm %d exact %d", c.norm.len(), c.exact.len())
	}
	// One-off texts with other literals are served by the normalized cache
	// and stay out of the exact cache.
	for i := 2; i < 50; i++ {
		if d := c.Classify("SELECT * FROM t WHERE id = "+strconv.Itoa(i), Policy{}); d.Target != Replica {
			t.Fatal(d)
		}
	}
	if c.norm.len() != 1 || c.exact.len() != 0 {
		t.Fatalf("after one-off texts: norm %d exact %d", c.norm.len(), c.exact.len())
	}
	// A text seen twice on the normalized path is admitted to the exact cache.
	for i := 0; i < 3; i++ {
		c.Classify("SELECT * FROM t WHERE id = 4711", Policy{})
	}
	if c.exact.len() != 1 {
		t.Fatalf("repeated text not admitted: exact %d", c.exact.len())
	}
}

// TestNormalizedKeysOutliveTheirBuffer: normalized keys are built in a
// pooled buffer that the next text overwrites; the key the cache keeps
// must be its own copy, or a later text would find (or hide) another
// text's analysis under it.
func TestNormalizedKeysOutliveTheirBuffer(t *testing.T) {
	c := NewClassifier(Options{})
	read := "SELECT * FROM t WHERE id = 1"
	write := "DELETE FROM u WHERE idx = 'a'"
	if d := c.Classify(read, Policy{}); d.Target != Replica {
		t.Fatalf("%s: %+v", read, d)
	}
	if d := c.Classify(write, Policy{}); d.Target != Primary {
		t.Fatalf("%s: %+v", write, d)
	}
	for _, sql := range []string{read, write} {
		key, n, ok := normalizeKey(sql, nil)
		if !ok || n == 0 {
			t.Fatalf("%q not normalized", sql)
		}
		if _, hit := c.norm.get(key, maphash.String(c.seed, key)); !hit {
			t.Errorf("normalized key of %q not in the cache", sql)
		}
	}
	// Other literals: each text still gets its own analysis.
	if d := c.Classify("SELECT * FROM t WHERE id = 2", Policy{}); d.Target != Replica {
		t.Fatalf("read after the write: %+v", d)
	}
	if d := c.Classify("DELETE FROM u WHERE idx = 'b'", Policy{}); d.Target != Primary {
		t.Fatalf("write after the read: %+v", d)
	}
	if c.norm.len() != 2 {
		t.Fatalf("normalized cache holds %d keys, want 2", c.norm.len())
	}
}
