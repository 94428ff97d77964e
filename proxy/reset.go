package proxy

import (
	"encoding/hex"
	"maps"
	"slices"
	"strings"

	"cascata/router"
)

// RESET ALL and DISCARD ALL, emulated.
//
// Run as they are, both would reset the role and the claims the proxy put
// in force (RESET ALL resets custom settings too), so they never reach a
// backend. Connection pools send them on release to get a clean session
// (asyncpg, psycopg, pgjdbc), so the proxy does what they mean for the
// client's own session and keeps its identity:
//
//   - RESET ALL puts every setting back to the client's value at startup
//     (what PostgreSQL calls the session default), and SET cascata.route
//     back to automatic;
//   - DISCARD ALL does that too and drops the client's prepared statements,
//     and, on a backend the client holds (session mode, a pinned client),
//     its cursors, LISTEN channels, session advisory locks, temporary
//     objects, sequence state and cached plans. Like PostgreSQL it fails
//     with 25001 inside a transaction block.
//
// A client that holds no backend has nothing on any backend: the proxy
// answers itself. On a backend it holds, one statement does the work
// (resetSQL), over the simple or the extended protocol, and the client sees
// the CommandComplete PostgreSQL would send.

// retag is the CommandComplete of a rewritten reset, to be given its tag.
type retag struct {
	seq uint64
	tag string
}

// onReset handles a query that has a RESET ALL or is DISCARD ALL. A lone
// reset from a client that holds no backend is answered by the proxy;
// otherwise the reset statement is replaced, in place, by resetSQL (so
// asyncpg's Pool reset "SELECT pg_advisory_unlock_all(); CLOSE ALL;
// UNLISTEN *; RESET ALL;" runs as it is).
func (ss *session) onReset(sql string, r verdict) error {
	if isWholeReset(sql, r) {
		ss.mu.Lock()
		for ss.phase == phaseSettling {
			ss.cond.Wait() // the last unit's settings are being read back
		}
		attached, status := ss.be != nil, ss.txStatus
		if !attached {
			ss.resetClient(nil, r.Reset)
		}
		ss.mu.Unlock()
		if !attached {
			ss.writeLocalComplete(resetTag(r.Reset))
			return nil
		}
		if r.Reset == router.DiscardAll && status != txIdle {
			return ss.refuse(discardInTransaction())
		}
	}
	w := r.want()
	w.primary = true
	be, err := ss.claim(true, w)
	if err != nil {
		ss.failLocal(msgTypeQuery, err)
		return nil
	}
	defer ss.doneWriting()
	ss.mu.Lock()
	ss.resetClient(be, r.Reset)
	ss.retags = append(ss.retags, retag{seq: ss.syncSeq, tag: resetTag(r.Reset)})
	ss.replayOK = false
	ss.mu.Unlock()
	q := sql[:r.ResetStart] + ss.resetSQL(r.Reset) + sql[r.ResetEnd:]
	if err := writeMsg(be.wr, msgTypeQuery, appendCString(nil, q)); err != nil {
		return ss.backendWriteFailed(be, err)
	}
	return ss.maybeFlushBackend(be, true)
}

// isWholeReset reports whether the reset statement is the whole text.
func isWholeReset(sql string, r verdict) bool {
	if r.ResetStart < 0 || r.ResetEnd > len(sql) || r.ResetStart > r.ResetEnd {
		return false
	}
	return strings.TrimSpace(strings.TrimRight(strings.TrimSpace(sql), "; \t\r\n")) == sql[r.ResetStart:r.ResetEnd]
}

// resetTag is the CommandComplete tag of a reset.
func resetTag(k router.ResetKind) string {
	if k == router.DiscardAll {
		return "DISCARD ALL"
	}
	return "RESET"
}

func discardInTransaction() error {
	return &Error{Code: CodeActiveSQLTransaction, Message: "DISCARD ALL cannot run inside a transaction block"}
}

// resetSQL is one statement that resets the client's session on a backend:
// for DISCARD ALL its cursors, LISTEN channels, advisory locks, temporary
// objects, sequence state, cached plans (and in session mode its prepared
// statements); then RESET ALL, and in the same statement the client's
// identity and its startup settings put back, so there is no moment without
// them. Names and values travel as hex: nothing the client chose is SQL
// text. The same client gets the same text every time (a prepared reset
// keeps its statement).
func (ss *session) resetSQL(kind router.ResetKind) string {
	var b strings.Builder
	b.WriteString("DO $cascata$BEGIN ")
	if kind == router.DiscardAll {
		b.WriteString("EXECUTE 'CLOSE ALL'; EXECUTE 'UNLISTEN *'; PERFORM pg_catalog.pg_advisory_unlock_all(); " +
			"EXECUTE 'DISCARD TEMP'; EXECUTE 'DISCARD SEQUENCES'; EXECUTE 'DISCARD PLANS'; ")
		if !ss.translatesNames() {
			b.WriteString("EXECUTE 'DEALLOCATE ALL'; ") // the client's own names
		}
	}
	b.WriteString("EXECUTE 'RESET ALL'; ")
	set := func(name, value string) {
		b.WriteString("PERFORM pg_catalog.set_config(pg_catalog.convert_from(pg_catalog.decode('")
		b.WriteString(hex.EncodeToString([]byte(name)))
		b.WriteString("', 'hex'), 'UTF8'), pg_catalog.convert_from(pg_catalog.decode('")
		b.WriteString(hex.EncodeToString([]byte(value)))
		b.WriteString("', 'hex'), 'UTF8'), false); ")
	}
	set("role", ss.ident.Role)
	set("request.jwt.claims", ss.ident.ClaimsJSON)
	set("request.jwt.claims_mac", ss.claimsMAC)
	for _, n := range slices.Sorted(maps.Keys(ss.claimGUCs)) {
		set(n, ss.claimGUCs[n])
	}
	startup := startupSettings(ss.params)
	for _, n := range slices.Sorted(maps.Keys(startup)) {
		set(n, startup[n])
	}
	b.WriteString("END$cascata$")
	return b.String()
}

// resetClient records a reset of the client's session: its settings are
// its startup values, SET cascata.route is automatic again and, for
// DISCARD ALL, its statement names are gone. With be (the backend the reset
// runs on) the backend's record follows, and every setting name involved is
// read back after the unit, so a reset rolled back with its transaction is
// rolled back for the client too. Call with mu held.
func (ss *session) resetClient(be *backend, kind router.ResetKind) {
	ss.routePrimary = false
	if kind == router.DiscardAll && ss.translatesNames() {
		clear(ss.stmts)
		clear(ss.sqlStmts)
		ss.unnamed = nil
	}
	startup := startupSettings(ss.params)
	if be != nil {
		for _, m := range []map[string]string{startup, ss.settings, be.settings} {
			for n := range m {
				if !slices.Contains(ss.unitGUCs, n) {
					ss.unitGUCs = append(ss.unitGUCs, n)
				}
			}
		}
		be.settings = maps.Clone(startup)
		be.settingsKey = settingsKey(startup)
	}
	ss.settings = startup
	ss.settingsKey = settingsKey(startup)
}

// resetParse is the Parse that replaces a client's Parse whose text is
// RESET ALL or DISCARD ALL: the same name, the reset statement, no
// parameter types.
func (ss *session) resetParse(name string, kind router.ResetKind) extMsg {
	sql := ss.resetSQL(kind)
	body := appendCString(nil, name)
	body = appendCString(body, sql)
	body = append(body, 0, 0)
	return extMsg{typ: msgTypeParse, body: body, name: name, query: sql, rest: body[len(name)+1:]}
}

// retagCommandComplete returns the tag that replaces the CommandComplete
// now being relayed, if it is the one of a reset the proxy rewrote (its
// statement's own tag is DO). Call with mu held.
func (ss *session) retagCommandComplete(body []byte) []byte {
	if len(ss.retags) > 0 && ss.retags[0].seq == ss.rfqSeq+1 && string(body) == "DO\x00" {
		t := ss.retags[0].tag
		popFront(&ss.retags)
		return appendCString(nil, t)
	}
	return nil
}
