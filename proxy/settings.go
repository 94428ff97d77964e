package proxy

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5/pgproto3"
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

// Statements prepared on every backend for settings.
const (
	setStmtName   = "cascata_set"
	setStmtSQL    = "SELECT pg_catalog.set_config($1, $2, false)"
	resetStmtName = "cascata_reset"
	resetStmtSQL  = "SELECT pg_catalog.set_config(s.name, s.reset_val, false) FROM pg_catalog.pg_settings s WHERE s.name = $1"
)

// startupSettings are the parameters a client may give at startup that are
// settings to keep in force (everything but the connection's own keys).
func startupSettings(params map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range params {
		switch k {
		case "user", "database", "replication", "client_encoding":
			continue
		case "options":
			for name, val := range parseOptions(v) {
				out[name] = val
			}
			continue
		}
		out[strings.ToLower(k)] = v
	}
	return out
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

// settingsSetup appends to buf the Bind/Execute pairs that turn the
// backend's settings into the client's, updates the backend's record and
// returns how many statements were added.
func settingsSetup(buf []byte, be *backend, want map[string]string) ([]byte, int, error) {
	n := 0
	var err error
	for name, v := range want {
		if cur, ok := be.settings[name]; ok && cur == v {
			continue
		}
		buf, err = (&pgproto3.Bind{PreparedStatement: setStmtName, Parameters: [][]byte{[]byte(name), []byte(v)}}).Encode(buf)
		if err != nil {
			return buf, n, fmt.Errorf("encode setting: %w", err)
		}
		buf, _ = (&pgproto3.Execute{}).Encode(buf)
		n++
	}
	for name := range be.settings {
		if _, ok := want[name]; ok {
			continue
		}
		buf, err = (&pgproto3.Bind{PreparedStatement: resetStmtName, Parameters: [][]byte{[]byte(name)}}).Encode(buf)
		if err != nil {
			return buf, n, fmt.Errorf("encode reset: %w", err)
		}
		buf, _ = (&pgproto3.Execute{}).Encode(buf)
		n++
	}
	if n > 0 {
		be.settings = make(map[string]string, len(want))
		for k, v := range want {
			be.settings[k] = v
		}
	}
	return buf, n, nil
}

// readSettings asks an idle backend, which no client holds, for the current
// values of names. A nil value means the setting does not exist.
func (b *backend) readSettings(names []string) (map[string]*string, error) {
	var q strings.Builder
	q.WriteString("SELECT n, pg_catalog.current_setting(n, true) FROM pg_catalog.unnest(ARRAY[")
	for i, n := range names {
		if i > 0 {
			q.WriteByte(',')
		}
		q.WriteString("'" + strings.ReplaceAll(n, "'", "''") + "'")
	}
	q.WriteString("]::text[]) n")
	rows, err := b.simpleQuery(q.String())
	if err != nil {
		return nil, err
	}
	out := make(map[string]*string, len(rows))
	for _, r := range rows {
		if len(r) != 2 || r[0] == nil {
			continue
		}
		out[*r[0]] = r[1]
	}
	return out, nil
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

// claimSetup appends what turns the backend's legacy claim settings into
// want (unset ones are set to empty) and returns the number of statements.
func claimSetup(buf []byte, be *backend, want map[string]string) ([]byte, int, error) {
	n := 0
	var err error
	set := func(name, v string) {
		if err != nil {
			return
		}
		buf, err = (&pgproto3.Bind{PreparedStatement: setStmtName, Parameters: [][]byte{[]byte(name), []byte(v)}}).Encode(buf)
		if err == nil {
			buf, err = (&pgproto3.Execute{}).Encode(buf)
		}
		n++
	}
	for name, v := range want {
		if cur, ok := be.claimGUCs[name]; !ok || cur != v {
			set(name, v)
		}
	}
	for name := range be.claimGUCs {
		if _, ok := want[name]; !ok {
			set(name, "")
		}
	}
	be.claimGUCs = want
	return buf, n, err
}
