package router

import (
	"slices"
	"sync"
	"testing"
)

// table is a FunctionTable that knows what it was told.
type table struct {
	mu      sync.Mutex
	known   map[string]Volatility
	learned []QualifiedName
	closed  int
}

func (t *table) Volatility(schema, name string) Volatility {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.known[name]
}

func (t *table) Learn(names []QualifiedName) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.learned = append(t.learned, names...)
}

func (t *table) Close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.closed++
}

func TestProjectsUseEachProjectsTable(t *testing.T) {
	p := NewProjects()
	a := &table{known: map[string]Volatility{"score": Stable}}
	b := &table{}
	p.SetFunctions("a", a)
	p.SetFunctions("b", b)

	const sql = "SELECT score(id) FROM items"
	if d := p.Classify("a", sql, false); d.Target != Replica || len(d.UnknownFunctions) != 0 {
		t.Errorf("project a (score is stable): target %v, unknown %v; want replica, none", d.Target, d.UnknownFunctions)
	}
	if len(a.learned) != 0 {
		t.Errorf("project a's table was taught %v; it knew the function", a.learned)
	}
	d := p.Classify("b", sql, false)
	if d.Target != Primary {
		t.Errorf("project b (score unknown): target %v, want primary", d.Target)
	}
	if want := []QualifiedName{{Name: "score"}}; !slices.Equal(b.learned, want) {
		t.Errorf("project b's table was taught %v, want %v", b.learned, want)
	}
	if d := p.Classify("c", sql, false); d.Target != Primary {
		t.Errorf("project c (no table): target %v, want primary", d.Target)
	}

	// A table replaced or removed is closed once; the same table set again is not.
	p.SetFunctions("a", a)
	if a.closed != 0 {
		t.Errorf("setting the same table again closed it")
	}
	a2 := &table{}
	p.SetFunctions("a", a2)
	p.SetFunctions("b", nil)
	if a.closed != 1 || b.closed != 1 {
		t.Errorf("replaced and removed tables closed %d and %d times, want 1 and 1", a.closed, b.closed)
	}
	if d := p.Classify("b", sql, false); d.Target != Primary || len(b.learned) != 1 {
		t.Errorf("a removed table is still asked: target %v, learned %v", d.Target, b.learned)
	}
	p.Close()
	if a2.closed != 1 || a.closed != 1 {
		t.Errorf("Close closed the current table %d times (want 1) and the old one %d times (want 1)", a2.closed, a.closed)
	}
}
