package proxy

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"strconv"
	"strings"

	"cascata/router"
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
	protocol  bool // a protocol-level statement: unsure on the backend after an error
}

// translateSQLPrepared rewrites a single-statement PREPARE or EXECUTE for
// the attached backend and returns the Query body to send. Call after
// claim, without mu.
func (ss *session) translateSQLPrepared(be *backend, sp *router.SQLPrepared) []byte {
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
	if pst := ss.stmts[sp.Name]; st == nil && pst != nil {
		return ss.executeProtocolStmt(be, pst, sp, seq)
	}
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

// executeProtocolStmt rewrites a SQL EXECUTE of a statement the client
// prepared with the protocol's Parse (PostgreSQL has one namespace for
// both). On a backend that lacks the statement it is prepared in the same
// query string by a SQL PREPARE of its text with the parameter types of the
// Parse, whose CommandComplete is dropped. Call with mu held.
func (ss *session) executeProtocolStmt(be *backend, st *stmt, sp *router.SQLPrepared, seq uint64) []byte {
	ss.renames = append(ss.renames, errRename{from: st.proxyName, to: sp.Name, seq: seq})
	// If the query fails, whether the statement exists is unsure.
	ss.sqlPrepFail = append(ss.sqlPrepFail, sqlPrepareErr{seq: seq, proxyName: st.proxyName, protocol: true})
	if be.stmts == nil {
		be.stmts = map[string]*backendStmt{}
	}
	be.clock++
	if bs := be.stmts[st.proxyName]; bs != nil {
		// Prepared here (perhaps before a change of the schema, which then
		// fails as a statement prepared before it does on PostgreSQL).
		bs.lastUse = be.clock
		return appendCString(ss.out[:0], "EXECUTE "+st.proxyName+sp.Tail)
	}
	prep, err := ss.sqlPrepareText(st)
	if err != nil {
		ss.renames = append(ss.renames, errRename{from: refusedSQL, whole: refusalBody(err), seq: seq})
		return appendCString(ss.out[:0], refusedSQL)
	}
	be.stmts[st.proxyName] = &backendStmt{lastUse: be.clock, epoch: ss.projRun.schema.Load()}
	ss.dropC = append(ss.dropC, seq)
	return appendCString(ss.out[:0], prep+"\n;\nEXECUTE "+st.proxyName+sp.Tail)
}

// sqlPrepareText is the SQL PREPARE of a protocol-level statement under its
// proxy name: its text, and its Parse's parameter types by name (0, not
// specified, is unknown, which PREPARE infers the same way). Types other
// than PostgreSQL's built-in ones cannot be named without a look-up.
func (ss *session) sqlPrepareText(st *stmt) (string, error) {
	query, rest, ok := cstring(st.rest)
	if !ok || len(rest) < 2 {
		return "", fatalError(CodeProtocolViolation, "invalid Parse message")
	}
	// Parse takes one statement; in a query string more would run.
	if r := ss.srv.classifier.Classify(ss.ref, query, ss.trusted); r.Refusal != nil || r.Statements != 1 {
		return "", &Error{Code: "42601", Message: "cannot insert multiple commands into a prepared statement"}
	}
	n := int(binary.BigEndian.Uint16(rest))
	var b strings.Builder
	b.WriteString("PREPARE " + st.proxyName)
	for i := 0; i < n && len(rest) >= 2+4*(i+1); i++ {
		oid := binary.BigEndian.Uint32(rest[2+4*i:])
		if i == 0 {
			b.WriteString(" (")
		} else {
			b.WriteString(", ")
		}
		if oid == 0 {
			b.WriteString("unknown")
		} else if t, ok := ss.srv.types.TypeForOID(oid); ok {
			b.WriteString(`pg_catalog."` + t.Name + `"`)
		} else {
			return "", &Error{Code: CodeFeatureNotSupported,
				Message: "EXECUTE of a statement prepared with a parameter of a type that is not built in (OID " + strconv.FormatUint(uint64(oid), 10) + ") is not supported through cascata in transaction mode",
				Hint:    "Execute it with the protocol's Bind and Execute, or leave the parameter's type unspecified in the Parse."}
		}
		if i == n-1 {
			b.WriteByte(')')
		}
	}
	b.WriteString(" AS " + query)
	return b.String(), nil
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
		if f.protocol {
			if bs := be.stmts[f.proxyName]; bs != nil {
				bs.unsure = true
			}
			popFront(&ss.sqlPrepFail)
			continue
		}
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
