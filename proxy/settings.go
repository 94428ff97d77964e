package proxy

import (
	"encoding/hex"
	"encoding/json"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Session settings in transaction mode.
//
// A client's settings are its startup parameters plus what its own SET and
// RESET statements left behind. They are kept per client; when a backend
// that carries other values serves the client, the differences are put in
// force first, pipelined with the identity in front of the client's first
// message. After a transaction that changed settings (the Classifier names
// them), the proxy reads their values back on the released backend — so a
// SET rolled back with its transaction leaves nothing — before that client
// can start another transaction.

// setSQL puts one setting in force (prepared as setStmtName where the
// client's statement names are translated, else the unnamed statement).
const setSQL = "SELECT pg_catalog.set_config($1, $2, false)"

// startupSettings are the parameters a client may give at startup that are
// settings to keep in force (everything but the connection's own keys and
// client_encoding, see startupEncoding). As in PostgreSQL, a parameter of
// its own overrides the same setting given in options.
func startupSettings(params map[string]string) map[string]string {
	out := parseOptions(params["options"])
	for k, v := range params {
		switch k {
		case "user", "database", "replication", "options":
			continue
		}
		out[strings.ToLower(k)] = v
	}
	delete(out, "client_encoding")
	return out
}

// startupEncoding is the client_encoding a client asked for at startup
// (its parameter, else -c client_encoding in options), "" if none.
func startupEncoding(params map[string]string) string {
	if enc, ok := params["client_encoding"]; ok {
		return enc
	}
	return parseOptions(params["options"])["client_encoding"]
}

// parseOptions reads "-c name=value" and "--name=value" pairs of the
// options startup parameter (backslash escapes a space).
func parseOptions(s string) map[string]string {
	var words []string
	var cur strings.Builder
	esc := false
	for _, r := range s {
		switch {
		case esc:
			cur.WriteRune(r)
			esc = false
		case r == '\\':
			esc = true
		case r == ' ' || r == '\t':
			if cur.Len() > 0 {
				words = append(words, cur.String())
				cur.Reset()
			}
		default:
			cur.WriteRune(r)
		}
	}
	if cur.Len() > 0 {
		words = append(words, cur.String())
	}
	out := map[string]string{}
	for i := 0; i < len(words); i++ {
		w := words[i]
		var kv string
		switch {
		case w == "-c" && i+1 < len(words):
			i++
			kv = words[i]
		case strings.HasPrefix(w, "-c"):
			kv = w[2:]
		case strings.HasPrefix(w, "--"):
			kv = w[2:]
		default:
			continue
		}
		if name, val, ok := strings.Cut(kv, "="); ok {
			out[strings.ToLower(strings.ReplaceAll(name, "-", "_"))] = val
		}
	}
	return out
}

// settingsKey is one string for a set of settings: equal keys, equal sets,
// so a backend that already carries a client's settings (most clients of
// one application share them) is not compared map against map.
func settingsKey(m map[string]string) string {
	if len(m) == 0 {
		return ""
	}
	names := make([]string, 0, len(m))
	for k := range m {
		names = append(names, k)
	}
	slices.Sort(names)
	var b strings.Builder
	for _, k := range names {
		b.WriteString(k)
		b.WriteByte(0) // names and values never hold NUL
		b.WriteString(m[k])
		b.WriteByte(0)
	}
	return b.String()
}

// timeoutFirst adds, first in a setup group, the change of the
// statement_timeout the backend's last client left. PostgreSQL times each
// message of the group with the timeout in force when it arrives, so
// every message before this change would run under the other client's
// timeout, however short it set it: a server slower than that for a
// moment would fail this client's setup. Any role may set it, so it
// grants nothing that it runs before the identity, under the last
// client's role. It records the change on be, so settingsSetup, later in
// the group, finds nothing more to do for it.
func timeoutFirst(g *setupGroup, be *backend, want map[string]string) {
	const name = "statement_timeout"
	cur, had := be.settings[name]
	v, ok := want[name]
	if had == ok && cur == v {
		return
	}
	changeSetting(g, be, name, v, ok)
	if !ok {
		delete(be.settings, name)
		return
	}
	if be.settings == nil {
		be.settings = map[string]string{}
	}
	be.settings[name] = v
}

// changeSetting adds to g the statement that puts setting name in force
// with value v, or, without one (!ok), RESETs it by its quoted name.
func changeSetting(g *setupGroup, be *backend, name, v string, ok bool) {
	if !ok {
		g.exec(`RESET "` + strings.ReplaceAll(name, `"`, `""`) + `"`)
		return
	}
	g.execProxy(setStmtName, setSQL, &be.setStmt, name, v)
}

// settingsSetup adds to g what turns the backend's settings into the
// client's and updates the backend's record. A setting the client no
// longer has is RESET by its quoted name, which PostgreSQL looks up
// case-insensitively like any setting name (TimeZone, DateStyle and custom
// x.y settings included).
func settingsSetup(g *setupGroup, be *backend, want map[string]string) {
	n := g.n
	for name := range be.settings {
		if _, ok := want[name]; !ok {
			changeSetting(g, be, name, "", false)
		}
	}
	for name, v := range want {
		if cur, ok := be.settings[name]; ok && cur == v {
			continue
		}
		changeSetting(g, be, name, v, true)
	}
	if g.n > n {
		be.settings = make(map[string]string, len(want))
		for k, v := range want {
			be.settings[k] = v
		}
	}
}

// settled is what settle found on a backend after a unit.
type settled struct {
	// settings are the values of the names asked for that the unit really
	// left in force: PostgreSQL says their source is the session (a SET it
	// refused, or one rolled back, is not there), or, for custom x.y
	// settings that pg_settings does not list, they have a value.
	settings     map[string]string
	role, claims string
	foreignStmts int // prepared statements not named by the proxy
}

// scrubSQL cleans, after a unit that may have left session state, what a
// new connection would not have: every setting, custom ones included (the
// role stays: RESET ALL never touches it, and the next client's setup puts
// role and claims in force again), held cursors, LISTEN, session advisory
// locks, temporary objects and sequence state (lastval). It first lifts a
// statement_timeout and a default_transaction_read_only the unit may have
// left, which would stop it. The proxy's cached statements (cs_*) stay:
// they serve the next clients.
const scrubSQL = "SET LOCAL statement_timeout = 0; RESET ALL; SET LOCAL transaction_read_only = off; CLOSE ALL; UNLISTEN *; SELECT pg_catalog.pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES"

// timeoutFloor is the shortest statement_timeout a backend keeps for the
// next client. PostgreSQL times each message with the timeout in force
// when it arrives, so the first statement of the next client's setup (the
// one that changes the timeout, timeoutFirst) runs under the last
// client's: a shorter one is put back to the default at the end of the
// unit that leaves it, on its own client's time.
const timeoutFloor = time.Second

// shortTimeout reports whether a statement_timeout value (as a client gave
// it, or as current_setting shows it) is below timeoutFloor and not 0 (no
// timeout). A value that does not read as a duration counts as short.
func shortTimeout(v string) bool {
	d, ok := parseTimeout(v)
	return !ok || (d > 0 && d < timeoutFloor)
}

// parseTimeout reads a time setting as PostgreSQL does: a number, with a
// unit of us, ms, s, min, h or d, or none for milliseconds.
func parseTimeout(v string) (time.Duration, bool) {
	v = strings.TrimSpace(v)
	i := strings.IndexFunc(v, func(r rune) bool {
		return !(r >= '0' && r <= '9' || r == '.' || r == '-' || r == '+' || r == 'e' || r == 'E')
	})
	num, unit := v, ""
	if i >= 0 {
		num, unit = v[:i], strings.TrimSpace(v[i:])
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || f < 0 {
		return 0, false
	}
	var per time.Duration
	switch unit {
	case "us":
		per = time.Microsecond
	case "", "ms":
		per = time.Millisecond
	case "s":
		per = time.Second
	case "min":
		per = time.Minute
	case "h":
		per = time.Hour
	case "d":
		per = 24 * time.Hour
	default:
		return 0, false
	}
	if f*float64(per) >= math.MaxInt64 {
		return math.MaxInt64, true
	}
	return time.Duration(f * float64(per)), true
}

// settle reads back, on an idle backend that no client holds, the settings
// names a unit changed, and with scrub checks the identity, counts
// prepared statements the proxy did not make, and runs scrubSQL, in one
// round trip. With resetTimeout it then puts statement_timeout back to
// its default (timeoutFloor), after the values were read.
func (b *backend) settle(names []string, scrub, resetTimeout bool) (settled, error) {
	var q strings.Builder
	if !slices.Contains(names, "statement_timeout") {
		// A statement_timeout the unit left must not stop the read-back
		// (when the unit set it, its value is what is read back).
		q.WriteString("SET LOCAL statement_timeout = 0; ")
	}
	q.WriteString("SELECT 'g', n, pg_catalog.current_setting(n, true), (SELECT s.source FROM pg_catalog.pg_settings s WHERE pg_catalog.lower(s.name) = n LIMIT 1) FROM pg_catalog.unnest(ARRAY[")
	for i, n := range names {
		if i > 0 {
			q.WriteByte(',')
		}
		// Hex, so the text reads the same whatever the unit left in
		// force (standard_conforming_strings = off by a function the
		// guard cannot see would make backslashes escape quotes).
		q.WriteString("pg_catalog.convert_from(pg_catalog.decode('" + hex.EncodeToString([]byte(n)) + "', 'hex'), 'UTF8')")
	}
	q.WriteString("]::text[]) n")
	if resetTimeout && !scrub { // scrubSQL resets every setting
		// In the same implicit transaction: after the SET LOCAL above,
		// if any, the reset runs under no timeout.
		q.WriteString("; RESET statement_timeout")
	}
	queries := []string{""}
	if scrub {
		q.WriteString(" UNION ALL SELECT 'i', pg_catalog.current_setting('role'), pg_catalog.current_setting('request.jwt.claims', true), (SELECT pg_catalog.count(*)::text FROM pg_catalog.pg_prepared_statements p WHERE p.name !~ '^cs_')")
		queries = append(queries, scrubSQL)
	}
	queries[0] = q.String()
	rows, err := b.simpleQuery(queries...)
	if err != nil {
		return settled{}, err
	}
	st := settled{settings: make(map[string]string, len(names))}
	for _, r := range rows {
		if len(r) != 4 || r[0] == nil || r[1] == nil {
			continue
		}
		switch *r[0] {
		case "g":
			val, source := r[2], r[3]
			if val != nil && ((source != nil && *source == "session") || (source == nil && *val != "")) {
				st.settings[*r[1]] = *val
			}
		case "i":
			st.role = *r[1]
			if r[2] != nil {
				st.claims = *r[2]
			}
			if r[3] != nil {
				st.foreignStmts, _ = strconv.Atoi(*r[3])
			}
		}
	}
	return st, nil
}

// claimSettings returns the legacy request.jwt.claim.<name> settings of a
// claims JSON object: strings as they are, other values as JSON. Names that
// are not valid setting names are left out.
func claimSettings(claims string) map[string]string {
	var m map[string]json.RawMessage
	if err := json.Unmarshal([]byte(claims), &m); err != nil {
		return nil
	}
	out := make(map[string]string, len(m))
	for k, raw := range m {
		if !validSettingPart(k) {
			continue
		}
		var s string
		if err := json.Unmarshal(raw, &s); err == nil {
			out["request.jwt.claim."+k] = s
		} else {
			out["request.jwt.claim."+k] = string(raw)
		}
	}
	return out
}

func validSettingPart(k string) bool {
	if k == "" || len(k) > 40 {
		return false
	}
	for _, r := range k {
		if !(r == '_' || r == '$' || (r >= 'a' && r <= 'z') || (r >= 'A' && r <= 'Z') || (r >= '0' && r <= '9')) {
			return false
		}
	}
	return true
}

// claimSetup adds to g what turns the backend's legacy claim settings into
// want (unset ones are set to empty).
func claimSetup(g *setupGroup, be *backend, want map[string]string) {
	for name, v := range want {
		if cur, ok := be.claimGUCs[name]; !ok || cur != v {
			g.execProxy(setStmtName, setSQL, &be.setStmt, name, v)
		}
	}
	for name := range be.claimGUCs {
		if _, ok := want[name]; !ok {
			g.execProxy(setStmtName, setSQL, &be.setStmt, name, "")
		}
	}
	be.claimGUCs = want
}
