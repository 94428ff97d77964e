package proxy

import (
	"encoding/binary"
	"strings"
	"unsafe"

	"cascata/auth"

	"github.com/jackc/pgx/v5/pgproto3"
)

// setupPlan is what precedes a client's first message on a backend whose
// identity or settings differ from the client's:
//
//   - a group of statements (identity, settings) ended by its own Sync, so
//     they commit on their own and no ROLLBACK of the client can undo them.
//     Its last message prepares a gate: an empty statement under a fresh
//     random name (backend.gateName). After an error PostgreSQL skips the
//     rest of the group, so the gate exists only if every statement of the
//     group took effect;
//   - in the client's own batch, Describe then Close of the gate. If the
//     gate is missing, the Describe fails and PostgreSQL skips the client's
//     messages up to their Sync: nothing ever runs under another client's
//     identity or settings. Neither message takes a snapshot or starts a
//     query, so the client's first statement may still be BEGIN ISOLATION
//     LEVEL ...
//
// The identity statement and the statement that sets one setting are
// prepared once per backend under names of the proxy's own (identStmtName,
// setStmtName) where the client's statement names are translated, so no
// client can reach them; for a client that names statements itself
// (session mode) they are parsed as the unnamed statement, and a backend
// that has the named ones closes them first. Every other statement of the
// group (RESET of a setting) is parsed as the unnamed statement, and a
// name no client can know is all the gate needs.
//
// When only the identity differs and the client's batch is plain reads and
// writes (want.shareTx) in transaction mode, the identity statement goes
// instead right in front of the client's messages, with no Sync and no
// gate (inline): it runs in the client's own implicit transaction, which
// those messages cannot end early. That saves PostgreSQL a transaction and
// a flush per switch. If it fails, PostgreSQL skips everything up to the
// next Sync, the client's Query included, and the backend is closed; if a
// client statement fails, the transaction rolls back and takes the
// identity with it: the backend's identity is then unknown (identPending),
// and the client's next messages wait for the end of this one before they
// are sent, so that none of them runs under the identity the rollback
// brought back.
type setupPlan struct {
	group  int  // executions and Closes in the committed group (0 = no group, no Sync)
	gate   bool // the gate's Describe and Close follow the group
	inline int  // executions in front of the client's messages, in its transaction (one CommandComplete each)
}

func (p setupPlan) empty() bool { return p.group == 0 && !p.gate && p.inline == 0 }

// setupGroup encodes the statements of a setup group.
type setupGroup struct {
	// named: the proxy's own statements are the ones prepared on the
	// backend under its names (execProxy).
	named  bool
	buf    []byte
	n      int    // executions: one CommandComplete each
	closes int    // Close messages
	parsed string // the text of the unnamed statement parsed last in the group
	params [3][]byte
	err    error
}

// exec adds one execution of sql, parsed as the unnamed statement, with
// text parameters.
func (g *setupGroup) exec(sql string, args ...string) {
	if g.err != nil {
		return
	}
	if g.parsed != sql {
		g.buf, g.err = (&pgproto3.Parse{Query: sql}).Encode(g.buf)
		g.parsed = sql
	}
	g.run("", args)
}

// execNamed adds one execution of the statement named name, which *st
// says is prepared from sql or not; it prepares it first where needed,
// closing first whatever may be under that name, and records it prepared.
func (g *setupGroup) execNamed(name, sql string, st *namedStmt, args ...string) {
	if g.err != nil {
		return
	}
	if *st == stmtUnknown {
		g.closeStatement(name) // no error when there is none
	}
	if *st != stmtPrepared {
		g.buf, g.err = (&pgproto3.Parse{Name: name, Query: sql}).Encode(g.buf)
		*st = stmtPrepared
	}
	g.run(name, args)
}

// execProxy adds one execution of one of the proxy's own statements: the
// one prepared on the backend as name (see execNamed) where g.named, else
// sql parsed as the unnamed statement.
func (g *setupGroup) execProxy(name, sql string, st *namedStmt, args ...string) {
	if g.named {
		g.execNamed(name, sql, st, args...)
	} else {
		g.exec(sql, args...)
	}
}

// closeProxy closes the proxy's statement name unless st says the
// backend never had it, and records it absent.
func (g *setupGroup) closeProxy(name string, st *namedStmt) {
	if *st != stmtAbsent {
		g.closeStatement(name)
		*st = stmtAbsent
	}
}

// run adds the Bind and Execute of one execution of statement stmt.
func (g *setupGroup) run(stmt string, args []string) {
	params := g.params[:0]
	for _, a := range args {
		params = append(params, textParam(a))
	}
	if g.err == nil {
		g.buf, g.err = (&pgproto3.Bind{PreparedStatement: stmt, Parameters: params}).Encode(g.buf)
	}
	if g.err == nil {
		g.buf, g.err = (&pgproto3.Execute{}).Encode(g.buf)
	}
	g.n++
}

// closeStatement adds the Close of statement name.
func (g *setupGroup) closeStatement(name string) {
	if g.err != nil {
		return
	}
	g.buf = appendGateMsg(g.buf, msgTypeClose, kindStatement, []byte(name))
	g.closes++
}

// clientState is what a client carries from backend to backend: its
// identity and the session settings it has set (in transaction mode), put
// in force on each backend that serves it by setupBytes. It is part of one
// session, guarded by its lock.
type clientState struct {
	ident     auth.Identity
	identKey  string            // ident as one comparable string (backend.identity)
	claimsMAC string            // request.jwt.claims_mac, "" unless the project signs claims
	claimGUCs map[string]string // legacy request.jwt.claim.* settings, nil unless the project asks
	// settings are the client's session settings, settingsKey their
	// settingsKey (settings.go).
	settings    map[string]string
	settingsKey string
}

// identKeyOf is an identity as one comparable string: its role, NUL (which
// no role name holds), its claims.
func identKeyOf(id auth.Identity) string { return id.Role + "\x00" + id.ClaimsJSON }

// identKeyRole is the role of an identKeyOf key, and whether the key holds
// one ("" is no identity known).
func identKeyRole(key string) (string, bool) {
	role, _, ok := strings.Cut(key, "\x00")
	return role, ok
}

func newClientState(id auth.Identity, claimsMAC string, claimGUCs, settings map[string]string) clientState {
	return clientState{ident: id, identKey: identKeyOf(id), claimsMAC: claimsMAC, claimGUCs: claimGUCs,
		settings: settings, settingsKey: settingsKey(settings)}
}

// setupBytes appends to buf the setup (see setupPlan) that makes be serve
// this client: the identity where be has another (or an unknown one),
// legacy claim settings, and the client's session settings where they
// differ from the backend's. It records on be what the setup puts in
// force. shareTx allows the inline form; translated says the proxy
// translates the client's statement names, so the proxy's statements may
// be its named ones.
func (cs *clientState) setupBytes(buf []byte, be *backend, shareTx, translated bool) ([]byte, setupPlan, error) {
	g := setupGroup{buf: buf, named: translated}
	if !translated {
		// This client names statements itself: it must find none of the
		// proxy's (a backend keeps its statements across pool modes).
		g.closeProxy(identStmtName, &be.identStmt)
		g.closeProxy(claimsStmtName, &be.claimsStmt)
		g.closeProxy(setStmtName, &be.setStmt)
	}
	if be.settingsKey != cs.settingsKey {
		timeoutFirst(&g, be, cs.settings)
	}
	identity := be.identity != cs.identKey
	if identity {
		// Where the backend's identity is known and its role is the
		// client's, only the claims change.
		role, known := identKeyRole(be.identity)
		be.identity = cs.identKey
		if known && role == cs.ident.Role {
			g.execProxy(claimsStmtName, claimsSQL, &be.claimsStmt, cs.ident.ClaimsJSON, cs.claimsMAC)
		} else {
			g.execProxy(identStmtName, identSQL, &be.identStmt, cs.ident.Role, cs.ident.ClaimsJSON, cs.claimsMAC)
		}
	}
	if shareTx && translated && identity && cs.claimGUCs == nil && be.claimGUCs == nil && be.settingsKey == cs.settingsKey {
		if g.err != nil {
			return g.buf, setupPlan{}, g.err
		}
		return g.buf, setupPlan{inline: g.n}, nil // nothing else differs
	}
	if cs.claimGUCs != nil || be.claimGUCs != nil {
		claimSetup(&g, be, cs.claimGUCs)
	}
	if be.settingsKey != cs.settingsKey {
		settingsSetup(&g, be, cs.settings)
		be.settingsKey = cs.settingsKey
	}
	if g.err != nil || g.n+g.closes == 0 {
		return g.buf, setupPlan{}, g.err
	}
	var gate [gateNameLen]byte
	be.gateName(&gate)
	buf = appendGateMsg(g.buf, msgTypeParse, 0, gate[:], 0, 0, 0) // Parse: the empty query, no parameter types
	buf = append(buf, msgSync...)
	buf = appendGateMsg(buf, msgTypeDescribe, kindStatement, gate[:])
	buf = appendGateMsg(buf, msgTypeClose, kindStatement, gate[:])
	return buf, setupPlan{group: g.n + g.closes, gate: true}, nil
}

// appendGateMsg appends a message of type typ whose body is kind (unless
// 0), the NUL-terminated name, then tail.
func appendGateMsg(buf []byte, typ, kind byte, name []byte, tail ...byte) []byte {
	n := 4 + len(name) + 1 + len(tail)
	if kind != 0 {
		n++
	}
	buf = append(buf, typ)
	buf = binary.BigEndian.AppendUint32(buf, uint32(n))
	if kind != 0 {
		buf = append(buf, kind)
	}
	buf = append(buf, name...)
	buf = append(buf, 0)
	return append(buf, tail...)
}

// textParam is a's bytes as a Bind parameter, without a copy: Encode only
// reads them. An empty string is an empty parameter, never NULL.
func textParam(a string) []byte {
	if a == "" {
		return []byte{}
	}
	return unsafe.Slice(unsafe.StringData(a), len(a))
}
