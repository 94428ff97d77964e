package router

import (
	"sync"
	"unsafe"
)

// lruShards is the number of independently locked shards of a cache.
const lruShards = 16

// lru is a bounded, sharded, concurrency-safe LRU map from string keys to
// immutable facts. A nil *lru caches nothing. Callers pass the key's hash
// (see Classifier.hash), which selects the shard.
type lru struct {
	shards [lruShards]lruShard
}

type lruShard struct {
	mu       sync.Mutex
	cap      int // entries
	maxBytes int // key bytes
	bytes    int
	m        map[string]*lruEntry
	root     lruEntry // sentinel of the circular recency list; root.next is the most recent
}

type lruEntry struct {
	key        string
	val        *facts
	prev, next *lruEntry
}

// newLRU returns a cache holding at most about size entries and maxBytes
// bytes of keys (both rounded up to a multiple of the shard count), or nil
// when size <= 0.
func newLRU(size, maxBytes int) *lru {
	if size <= 0 {
		return nil
	}
	c := &lru{}
	per := (size + lruShards - 1) / lruShards
	perBytes := (maxBytes + lruShards - 1) / lruShards
	for i := range c.shards {
		sh := &c.shards[i]
		sh.cap = per
		sh.maxBytes = perBytes
		sh.m = make(map[string]*lruEntry)
		sh.root.next = &sh.root
		sh.root.prev = &sh.root
	}
	return c
}

// get returns the value for key (of hash h) and marks it most recently used.
func (c *lru) get(key string, h uint64) (*facts, bool) {
	return c.getBytes(unsafe.Slice(unsafe.StringData(key), len(key)), h)
}

// getBytes is get of a key held in bytes, which it only reads: the map
// lookup converts them without a copy.
func (c *lru) getBytes(key []byte, h uint64) (*facts, bool) {
	if c == nil {
		return nil, false
	}
	sh := &c.shards[h%lruShards]
	sh.mu.Lock()
	e, ok := sh.m[string(key)]
	if !ok {
		sh.mu.Unlock()
		return nil, false
	}
	if sh.root.next != e {
		e.unlink()
		sh.pushFront(e)
	}
	v := e.val
	sh.mu.Unlock()
	return v, true
}

// add stores key (of hash h) → val, evicting the least recently used
// entries of the shard while it is full.
func (c *lru) add(key string, h uint64, val *facts) {
	if c == nil {
		return
	}
	sh := &c.shards[h%lruShards]
	if len(key) > sh.maxBytes {
		return
	}
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if e, ok := sh.m[key]; ok {
		e.val = val
		e.unlink()
		sh.pushFront(e)
		return
	}
	var e *lruEntry
	for len(sh.m) > 0 && (len(sh.m) >= sh.cap || sh.bytes+len(key) > sh.maxBytes) {
		e = sh.root.prev // evict the least recently used; reuse its entry
		e.unlink()
		delete(sh.m, e.key)
		sh.bytes -= len(e.key)
	}
	if e == nil {
		e = new(lruEntry)
	}
	e.key, e.val = key, val
	sh.m[key] = e
	sh.bytes += len(key)
	sh.pushFront(e)
}

// len returns the number of cached entries.
func (c *lru) len() int {
	if c == nil {
		return 0
	}
	n := 0
	for i := range c.shards {
		sh := &c.shards[i]
		sh.mu.Lock()
		n += len(sh.m)
		sh.mu.Unlock()
	}
	return n
}

func (e *lruEntry) unlink() {
	e.prev.next = e.next
	e.next.prev = e.prev
	e.prev, e.next = nil, nil
}

func (sh *lruShard) pushFront(e *lruEntry) {
	e.prev = &sh.root
	e.next = sh.root.next
	sh.root.next.prev = e
	sh.root.next = e
}
