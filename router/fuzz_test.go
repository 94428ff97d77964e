package router

import (
	"hash/fnv"
	"testing"
)

// FuzzClassify checks, for arbitrary texts, that Classify never panics,
// never routes a data-modifying text to a replica, refuses identity
// escalation, refuses unparsable text, and that the cached and normalized
// fast paths agree with the uncached analysis (also for a literal variant
// of the text). The seed corpus is in testdata/fuzz/FuzzClassify.
func FuzzClassify(f *testing.F) {
	for _, tc := range classifyCases {
		f.Add(tc.sql)
	}
	f.Fuzz(func(t *testing.T, sql string) {
		h := fnv.New64a()
		h.Write([]byte(sql))
		seed := h.Sum64()
		pick := func(n int) int {
			seed = seed*6364136223846793005 + 1442695040888963407
			return int((seed >> 33) % uint64(n))
		}
		var variants []string
		if v, ok := literalVariant(sql, pick); ok {
			variants = append(variants, v)
		}
		checkInvariants(t, sql, variants)
	})
}
