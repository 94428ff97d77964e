// Package volatility learns the volatility of a project's own functions
// from pg_proc, for the router to tell reads that may go to a replica from
// calls that must run on the primary.
package volatility

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"time"

	"cascata/router"

	"github.com/jackc/pgx/v5"
)

// Learner learns the volatility of a project's own functions (user
// functions, extensions) from pg_proc on its primary, once per name, so
// that reads calling STABLE or IMMUTABLE functions can go to a replica.
// Until a name is learnt, calls to it are treated as volatile (primary).
// Names listed in the project's read_only_functions / write_functions
// override what pg_proc says. It implements router.FunctionClassifier.
type Learner struct {
	url       string
	log       *slog.Logger
	overrides map[string]router.Volatility

	mu       sync.Mutex
	known    map[string]router.Volatility
	inflight map[string]bool
	wg       sync.WaitGroup
	ctx      context.Context
	cancel   context.CancelFunc
}

// New returns the learner of one project. databaseURL is used to read
// pg_proc; readOnly and write are the configured overrides ("name" or
// "schema.name").
func New(databaseURL string, readOnly, write []string, log *slog.Logger) *Learner {
	ctx, cancel := context.WithCancel(context.Background())
	f := &Learner{url: databaseURL, log: log, overrides: map[string]router.Volatility{},
		known: map[string]router.Volatility{}, inflight: map[string]bool{}, ctx: ctx, cancel: cancel}
	for _, n := range readOnly {
		f.overrides[strings.ToLower(n)] = router.Stable
	}
	for _, n := range write {
		f.overrides[strings.ToLower(n)] = router.Volatile
	}
	return f
}

// Close stops lookups in flight and waits for them.
func (f *Learner) Close() {
	f.cancel()
	f.wg.Wait()
}

func key(schema, name string) string {
	if schema == "" {
		return name
	}
	return schema + "." + name
}

// Volatility implements router.FunctionClassifier.
func (f *Learner) Volatility(schema, name string) router.Volatility {
	k := key(schema, name)
	if v, ok := f.overrides[k]; ok {
		return v
	}
	if v, ok := f.overrides[name]; ok && schema == "" {
		return v
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.known[k]
}

// Learn looks up unknown names in the background; later texts use the
// answer. Names already known or being looked up are skipped.
func (f *Learner) Learn(names []router.QualifiedName) {
	f.mu.Lock()
	var missing []router.QualifiedName
	for _, n := range names {
		k := key(n.Schema, n.Name)
		if _, ok := f.known[k]; ok || f.inflight[k] {
			continue
		}
		f.inflight[k] = true
		missing = append(missing, n)
	}
	f.mu.Unlock()
	if len(missing) == 0 || f.ctx.Err() != nil {
		return
	}
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		res := f.lookup(missing)
		f.mu.Lock()
		for _, n := range missing {
			k := key(n.Schema, n.Name)
			delete(f.inflight, k)
			if v, ok := res[k]; ok {
				f.known[k] = v
			}
		}
		f.mu.Unlock()
	}()
}

// lookup asks pg_proc. A name with several overloads takes the most
// volatile of them; a name that does not exist is volatile (the call will
// fail anyway, on the primary).
func (f *Learner) lookup(names []router.QualifiedName) map[string]router.Volatility {
	ctx, cancel := context.WithTimeout(f.ctx, 5*time.Second)
	defer cancel()
	out := map[string]router.Volatility{}
	conn, err := pgx.Connect(ctx, f.url)
	if err != nil {
		f.log.Warn("function volatility lookup failed", "error", err)
		return out
	}
	defer conn.Close(ctx)
	for _, n := range names {
		q := `SELECT coalesce(max(CASE p.provolatile WHEN 'v' THEN 3 WHEN 's' THEN 2 ELSE 1 END), 3)
		      FROM pg_catalog.pg_proc p WHERE p.proname = $1 AND `
		args := []any{n.Name}
		if n.Schema == "" {
			q += "p.pronamespace IN (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = ANY (pg_catalog.current_schemas(true)))"
		} else {
			q += "p.pronamespace = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = $2)"
			args = append(args, n.Schema)
		}
		var v int
		if err := conn.QueryRow(ctx, q, args...).Scan(&v); err != nil {
			v = 3
		}
		out[key(n.Schema, n.Name)] = []router.Volatility{router.Immutable, router.Immutable, router.Stable, router.Volatile}[v]
	}
	return out
}
