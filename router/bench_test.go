package router

import (
	"strconv"
	"sync"
	"testing"
)

const (
	benchPrepared  = `SELECT abalance FROM pgbench_accounts WHERE aid = $1`
	benchPostgREST = `WITH pgrst_source AS (SELECT "public"."todos"."id", "public"."todos"."task", "public"."todos"."done" ` +
		`FROM "public"."todos" WHERE "public"."todos"."owner" = $1 ORDER BY "public"."todos"."id" LIMIT 100 OFFSET 0) ` +
		`SELECT null::bigint AS total_result_set, pg_catalog.count(_postgrest_t) AS page_total, ` +
		`coalesce(json_agg(_postgrest_t), '[]') AS body FROM (SELECT * FROM pgrst_source) _postgrest_t`
)

var benchPolicy = Policy{Functions: testFunctions}

// BenchmarkClassifyCached: the same text every time (extended protocol),
// served by the exact-text cache.
func BenchmarkClassifyCached(b *testing.B) {
	c := NewClassifier(Options{})
	c.Classify(benchPrepared, benchPolicy)
	b.ReportAllocs()
	for b.Loop() {
		if d := c.Classify(benchPrepared, benchPolicy); d.Target != Replica {
			b.Fatal(d)
		}
	}
}

// BenchmarkClassifyCachedParallel: as above from all Ps.
func BenchmarkClassifyCachedParallel(b *testing.B) {
	c := NewClassifier(Options{})
	c.Classify(benchPrepared, benchPolicy)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			c.Classify(benchPrepared, benchPolicy)
		}
	})
}

// pgbenchTexts returns n simple-protocol texts with distinct inlined literals.
var pgbenchTexts = sync.OnceValue(func() []string {
	qs := make([]string, 1<<16)
	for i := range qs {
		qs[i] = "SELECT abalance FROM pgbench_accounts WHERE aid = " + strconv.Itoa(i+1)
	}
	return qs
})

// BenchmarkClassifyNormalized: simple-protocol texts with a new literal each
// time: exact-cache miss, normalized-cache hit.
func BenchmarkClassifyNormalized(b *testing.B) {
	qs := pgbenchTexts()
	c := NewClassifier(Options{})
	c.Classify(qs[0], benchPolicy)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if d := c.Classify(qs[i&(len(qs)-1)], benchPolicy); d.Target != Replica {
			b.Fatal(d)
		}
		i++
	}
}

// BenchmarkClassifyUncached: full parse and analysis every time.
func BenchmarkClassifyUncached(b *testing.B) {
	qs := pgbenchTexts()
	c := NewClassifier(Options{CacheSize: -1})
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if d := c.Classify(qs[i&(len(qs)-1)], benchPolicy); d.Target != Replica {
			b.Fatal(d)
		}
		i++
	}
}

// BenchmarkClassifyUncachedPostgREST: full analysis of a typical
// PostgREST-style read.
func BenchmarkClassifyUncachedPostgREST(b *testing.B) {
	c := NewClassifier(Options{CacheSize: -1})
	b.ReportAllocs()
	for b.Loop() {
		if d := c.Classify(benchPostgREST, benchPolicy); d.Target != Replica {
			b.Fatal(d)
		}
	}
}

// BenchmarkClassifyCachedPostgREST: the same text from the exact cache.
func BenchmarkClassifyCachedPostgREST(b *testing.B) {
	c := NewClassifier(Options{})
	c.Classify(benchPostgREST, benchPolicy)
	b.ReportAllocs()
	for b.Loop() {
		c.Classify(benchPostgREST, benchPolicy)
	}
}
