package proxy

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
)

// SQL-level PREPARE / EXECUTE / DEALLOCATE in transaction mode.
//
// Like protocol-level statements, a client's SQL statement names are its
// own: PREPARE name AS ... runs on the backend under a proxy-owned name
// derived from its text, EXECUTE name(...) is rewritten to that name and,
// on a backend that lacks it, preceded by the PREPARE in the same query
// string; the extra CommandComplete that adds is dropped on the way back, so
// the client sees exactly PostgreSQL's replies.

// sqlStmt is a client's SQL-prepared statement.
type sqlStmt struct {
	proxyName string
	tail      string // the PREPARE text after the name: "(types) AS query"
}

// sqlPrepareErr undoes the bookkeeping of a PREPARE that failed.
type sqlPrepareErr struct {
	seq       uint64
	name      string
	proxyName string
}

// translateSQLPrepared rewrites a single-statement PREPARE or EXECUTE for
// the attached backend and returns the Query body to send. Call after
// claim, without mu.
func (ss *session) translateSQLPrepared(be *backend, sp *SQLPrepared) []byte {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	ss.replayOK = false
	seq := ss.syncSeq
	if be.sqlStmts == nil {
		be.sqlStmts = map[string]bool{}
	}
	if !sp.Execute {
		if ss.sqlStmts[sp.Name] != nil || ss.stmts[sp.Name] != nil {
			// A text that fails to parse, its error replaced by 42P05.
			ss.renames = append(ss.renames, errRename{from: refusedSQL, whole: refusalBody(duplicateStmt(sp.Name)), seq: seq})
			return appendCString(ss.out[:0], refusedSQL)
		}
		sum := sha256.Sum256([]byte(sp.Tail))
		st := &sqlStmt{proxyName: "cs_q_" + hex.EncodeToString(sum[:16]), tail: sp.Tail}
		ss.sqlStmts[sp.Name] = st
		ss.sqlPrepFail = append(ss.sqlPrepFail, sqlPrepareErr{seq: seq, name: sp.Name, proxyName: st.proxyName})
		if be.sqlStmts[st.proxyName] {
			// The backend has it already (another client's): prepare it anew
			// so the client gets PREPARE's own reply; the DEALLOCATE's is dropped.
			ss.dropC = append(ss.dropC, seq)
			return appendCString(ss.out[:0], "DEALLOCATE "+st.proxyName+";\nPREPARE "+st.proxyName+st.tail+"\n")
		}
		be.sqlStmts[st.proxyName] = true
		return appendCString(ss.out[:0], "PREPARE "+st.proxyName+st.tail)
	}
	st := ss.sqlStmts[sp.Name]
	if st == nil {
		ss.renames = append(ss.renames, errRename{from: missingStmtName, to: sp.Name, seq: seq})
		return appendCString(ss.out[:0], "EXECUTE "+missingStmtName+sp.Tail)
	}
	if !be.sqlStmts[st.proxyName] {
		be.sqlStmts[st.proxyName] = true
		ss.dropC = append(ss.dropC, seq)
		return appendCString(ss.out[:0], "PREPARE "+st.proxyName+st.tail+"\n;\nEXECUTE "+st.proxyName+sp.Tail)
	}
	return appendCString(ss.out[:0], "EXECUTE "+st.proxyName+sp.Tail)
}

// dropCommandComplete reports whether a CommandComplete of the query now
// being answered is the proxy's own, to be dropped. Call with mu held.
func (ss *session) dropCommandComplete() bool {
	if len(ss.dropC) > 0 && ss.dropC[0] == ss.rfqSeq+1 {
		popFront(&ss.dropC)
		return true
	}
	return false
}

// sqlPrepareFailed forgets a PREPARE that the error of the query now being
// answered undid. Call with mu held.
func (ss *session) sqlPrepareFailed(be *backend) {
	for len(ss.sqlPrepFail) > 0 && ss.sqlPrepFail[0].seq == ss.rfqSeq+1 {
		f := ss.sqlPrepFail[0]
		if st := ss.sqlStmts[f.name]; st != nil && st.proxyName == f.proxyName {
			delete(ss.sqlStmts, f.name)
		}
		delete(be.sqlStmts, f.proxyName)
		popFront(&ss.sqlPrepFail)
	}
}

// forgetMissingSQLStmt heals the backend's record when PostgreSQL says one
// of the proxy's SQL statements does not exist there (its PREPARE failed in
// a query that also failed otherwise): the next EXECUTE prepares it again.
func forgetMissingSQLStmt(be *backend, errBody []byte) {
	i := bytes.Index(errBody, []byte(`"cs_q_`))
	if i < 0 || be.sqlStmts == nil {
		return
	}
	rest := errBody[i+1:]
	if j := bytes.IndexByte(rest, '"'); j > 0 {
		delete(be.sqlStmts, string(rest[:j]))
	}
}
