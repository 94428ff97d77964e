package router

import (
	"hash/maphash"
	"sync"
	"sync/atomic"
)

// Default option values.
const (
	// DefaultCacheSize is the default Options.CacheSize.
	DefaultCacheSize = 10000
	// DefaultCacheBytes is the default Options.CacheBytes.
	DefaultCacheBytes = 16 << 20
	// DefaultMaxCachedQueryBytes is the default Options.MaxCachedQueryBytes.
	DefaultMaxCachedQueryBytes = 16 << 10
)

// Classifier classifies SQL texts. It is safe for concurrent use; its caches
// are bounded. Create it with NewClassifier.
type Classifier struct {
	exact  *lru // exact text → facts
	norm   *lru // normalized text → literal-independent facts
	maxLen int
	seed   maphash.Seed
	// seen is a direct-mapped set of hashes of texts recently served by the
	// normalized cache: a text served there twice is admitted into the
	// exact cache too, so that repeated texts with literals (ORMs, the
	// extended protocol) take the fastest path while one-off texts with
	// inlined literals do not evict anything from the exact cache.
	seen [seenSlots]atomic.Uint64
	// keyBufs holds buffers for normalized keys (*[]byte), at most
	// maxLen long as the texts that are cached.
	keyBufs sync.Pool
}

// seenSlots is the size of Classifier.seen.
const seenSlots = 4096

// NewClassifier returns a Classifier configured by opts.
func NewClassifier(opts Options) *Classifier {
	size := opts.CacheSize
	if size == 0 {
		size = DefaultCacheSize
	}
	maxLen := opts.MaxCachedQueryBytes
	if maxLen <= 0 {
		maxLen = DefaultMaxCachedQueryBytes
	}
	maxBytes := opts.CacheBytes
	if maxBytes <= 0 {
		maxBytes = DefaultCacheBytes
	}
	c := &Classifier{exact: newLRU(size, maxBytes), norm: newLRU(size, maxBytes), maxLen: maxLen, seed: maphash.MakeSeed()}
	c.keyBufs.New = func() any { return new([]byte) }
	return c
}

// Classify classifies sql (one simple-protocol Query text or one
// extended-protocol Parse text, possibly with $n parameters) for a client
// with policy p. See Decision for the meaning of the result.
func (c *Classifier) Classify(sql string, p Policy) Decision {
	return c.facts(sql).apply(p)
}

// facts returns the policy-independent facts of sql, from a cache when
// possible.
func (c *Classifier) facts(sql string) *facts {
	cacheable := len(sql) <= c.maxLen && c.exact != nil
	var h uint64
	if cacheable {
		h = maphash.String(c.seed, sql)
		if f, ok := c.exact.get(sql, h); ok {
			return f
		}
	}
	if f := checkText(sql); f != nil {
		return f
	}
	if !cacheable {
		return analyze(sql, nil)
	}
	// The key is built in a buffer of the pool and becomes a string only
	// when it goes into the cache.
	buf := c.keyBufs.Get().(*[]byte)
	kb, n, ok := appendNormalized((*buf)[:0], sql, nil)
	normalized := ok && n > 0
	var (
		key string
		hk  uint64
		f   *facts
		hit bool
	)
	if normalized {
		hk = maphash.Bytes(c.seed, kb)
		if f, hit = c.norm.getBytes(kb, hk); !hit {
			key = string(kb)
		}
	}
	*buf = kb[:0]
	c.keyBufs.Put(buf)
	if normalized {
		if hit {
			if slot := &c.seen[h%seenSlots]; slot.Load() == h {
				c.exact.add(sql, h, f)
			} else {
				slot.Store(h)
			}
			return f
		}
		spans := make([]int32, 0, n)
		normalizeKey(sql, &spans)
		f = analyze(sql, spans)
		if f.normalizable {
			c.norm.add(key, hk, f)
		} else {
			c.exact.add(sql, h, f)
		}
		return f
	}
	f = analyze(sql, nil)
	c.exact.add(sql, h, f)
	return f
}

// classifyUncached analyses sql without touching the caches (for tests).
func classifyUncached(sql string, p Policy) Decision {
	if f := checkText(sql); f != nil {
		return f.apply(p)
	}
	return analyze(sql, nil).apply(p)
}
