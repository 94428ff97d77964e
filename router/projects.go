package router

import "sync"

// FunctionTable is a project's table of its own functions: it answers
// Policy.Functions, is taught the functions a decision found unknown, and
// is closed when the project goes (internal/volatility.Learner).
type FunctionTable interface {
	FunctionClassifier
	Learn(names []QualifiedName)
	Close()
}

// Projects classifies texts of many projects with one Classifier and each
// project's own function table. It is safe for concurrent use.
type Projects struct {
	c     *Classifier
	funcs sync.Map // project ref -> FunctionTable (read on every Classify)
}

// NewProjects returns a Projects with a Classifier of the default options
// and no function table.
func NewProjects() *Projects {
	return &Projects{c: NewClassifier(Options{})}
}

// SetFunctions installs a project's function table, or with nil removes
// it; a table it replaces is closed.
func (p *Projects) SetFunctions(ref string, t FunctionTable) {
	var old any
	if t == nil {
		old, _ = p.funcs.LoadAndDelete(ref)
	} else {
		old, _ = p.funcs.Swap(ref, t)
	}
	if old != nil && old.(FunctionTable) != t {
		old.(FunctionTable).Close()
	}
}

// Close closes every function table.
func (p *Projects) Close() {
	p.funcs.Range(func(ref, t any) bool {
		if p.funcs.CompareAndDelete(ref, t) {
			t.(FunctionTable).Close()
		}
		return true
	})
}

// Classify classifies sql for a client of project ref (trusted: its role is
// in the project's trusted_roles) and teaches the project's table the
// functions the decision found unknown.
func (p *Projects) Classify(ref, sql string, trusted bool) Decision {
	pol := Policy{TrustedRole: trusted}
	var t FunctionTable
	if v, ok := p.funcs.Load(ref); ok {
		t = v.(FunctionTable)
		pol.Functions = t
	}
	d := p.c.Classify(sql, pol)
	if t != nil && len(d.UnknownFunctions) > 0 {
		t.Learn(d.UnknownFunctions)
	}
	return d
}
