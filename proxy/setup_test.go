package proxy

import (
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"cascata/auth"

	"github.com/jackc/pgx/v5/pgproto3"
)

// A client's identity and settings on their own: what setupBytes sends to
// a backend, and what it records there, with no server.

// msgLines decodes frontend messages into one line per message, for
// tests: "P <name>|<sql>", "B <statement>|<param>|...", "D S <name>",
// "C S <name>", and the type alone for the rest.
func msgLines(t *testing.T, buf []byte) []string {
	t.Helper()
	var lines []string
	for off := 0; off < len(buf); {
		typ, body, next := splitMsg(buf, off)
		off = next
		switch typ {
		case msgTypeParse:
			var m pgproto3.Parse
			if err := m.Decode(body); err != nil {
				t.Fatal(err)
			}
			lines = append(lines, "P "+m.Name+"|"+m.Query)
		case msgTypeBind:
			var m pgproto3.Bind
			if err := m.Decode(body); err != nil {
				t.Fatal(err)
			}
			line := "B " + m.PreparedStatement
			for _, p := range m.Parameters {
				line += "|" + string(p)
			}
			lines = append(lines, line)
		case msgTypeDescribe, msgTypeClose:
			lines = append(lines, string(typ)+" "+string(body[0])+" "+strings.TrimSuffix(string(body[1:]), "\x00"))
		default:
			lines = append(lines, string(typ))
		}
	}
	return lines
}

func testBackend() *backend {
	return &backend{gate: rand.NewChaCha8([32]byte{1})}
}

// Without translated names (session mode), every statement of the setup
// is the unnamed one.
func TestSetupBytes(t *testing.T) {
	alice := newClientState(auth.Identity{Role: "authenticated", ClaimsJSON: `{"sub":"alice"}`}, "mac-a", nil, map[string]string{"TimeZone": "UTC"})
	bob := newClientState(auth.Identity{Role: "anon", ClaimsJSON: `{"role":"anon"}`}, "mac-b", nil, map[string]string{"TimeZone": "UTC"})
	be := testBackend()

	buf, plan, err := alice.setupBytes(nil, be, false, false)
	if err != nil {
		t.Fatal(err)
	}
	lines := msgLines(t, buf)
	if plan.group != 2 || !plan.gate {
		t.Fatalf("plan %+v, want a group of 2 and a gate", plan)
	}
	gate := strings.TrimPrefix(lines[len(lines)-1], "C S ")
	if len(gate) != gateNameLen || !strings.HasPrefix(gate, gatePrefix) {
		t.Fatalf("gate name %q", gate)
	}
	// Identity and setting go as parameters of unnamed statements, the
	// group ends with the gate's Parse and its own Sync, the client's batch
	// starts with the gate's Describe and Close.
	want := []string{
		"P |" + identSQL, "B |authenticated|" + `{"sub":"alice"}` + "|mac-a", "E",
		"P |" + setSQL, "B |TimeZone|UTC", "E",
		"P " + gate + "|", "S", "D S " + gate, "C S " + gate,
	}
	if !slices.Equal(lines, want) {
		t.Fatalf("alice's setup:\n got  %q\n want %q", lines, want)
	}
	if be.identity != alice.identKey || be.settingsKey != alice.settingsKey || be.settings["TimeZone"] != "UTC" {
		t.Fatalf("recorded on the backend: identity %q settings %q", be.identity, be.settingsKey)
	}

	// The backend serves alice as she is: nothing to send.
	if buf, plan, err := alice.setupBytes(nil, be, false, false); err != nil || len(buf) != 0 || !plan.empty() {
		t.Fatalf("alice again: %q %+v %v", buf, plan, err)
	}

	// Bob has the same settings: only his identity, under a new gate.
	buf, plan, err = bob.setupBytes(nil, be, false, false)
	if err != nil || plan.group != 1 {
		t.Fatalf("bob: plan %+v, %v", plan, err)
	}
	lines = msgLines(t, buf)
	if lines[1] != "B |anon|"+`{"role":"anon"}`+"|mac-b" || len(lines) != 7 || strings.Contains(strings.Join(lines, " "), gate) {
		t.Fatalf("bob's setup: %q (alice's gate %s)", lines, gate)
	}

	// A client without the setting gets it reset by its quoted name.
	carol := newClientState(auth.Identity{Role: "anon", ClaimsJSON: `{"role":"anon"}`}, "mac-b", nil, nil)
	buf, _, err = carol.setupBytes(nil, be, false, false)
	if err != nil {
		t.Fatal(err)
	}
	lines = msgLines(t, buf)
	if lines[0] != `P |RESET "TimeZone"` || len(be.settings) != 0 || be.settingsKey != "" {
		t.Fatalf("carol's setup: %q, backend settings %v", lines, be.settings)
	}

	// A backend whose identity is unknown (a failed setup, a scrub) gets
	// the identity again.
	be.identity = ""
	buf, plan, _ = carol.setupBytes(nil, be, false, false)
	if plan.group != 1 || !strings.HasPrefix(msgLines(t, buf)[0], "P |"+identSQL) {
		t.Fatalf("after the identity was forgotten: %q", msgLines(t, buf))
	}
}

// Legacy claim settings follow the client: set where they differ, emptied
// where the next client has none.
func TestSetupBytesLegacyClaims(t *testing.T) {
	a := newClientState(auth.Identity{Role: "authenticated", ClaimsJSON: `{"sub":"a"}`}, "", map[string]string{"request.jwt.claim.sub": "a"}, nil)
	b := newClientState(auth.Identity{Role: "authenticated", ClaimsJSON: `{}`}, "", nil, nil)
	be := testBackend()
	buf, _, err := a.setupBytes(nil, be, false, false)
	if err != nil {
		t.Fatal(err)
	}
	if lines := msgLines(t, buf); !slices.Contains(lines, "B |request.jwt.claim.sub|a") {
		t.Fatalf("a's setup: %q", lines)
	}
	buf, _, err = b.setupBytes(nil, be, false, false)
	if err != nil {
		t.Fatal(err)
	}
	if lines := msgLines(t, buf); !slices.Contains(lines, "B |request.jwt.claim.sub|") {
		t.Fatalf("b's setup does not empty a's claim: %q", lines)
	}
}

// With shareTx, an identity change alone goes inline: the identity's
// statement and nothing else (no Sync, no gate). Settings that differ, or
// legacy claim settings, take the group and its gate as before.
func TestSetupBytesInline(t *testing.T) {
	alice := newClientState(auth.Identity{Role: "authenticated", ClaimsJSON: `{"sub":"alice"}`}, "mac-a", nil, nil)
	bob := newClientState(auth.Identity{Role: "anon", ClaimsJSON: `{"role":"anon"}`}, "", nil, nil)
	be := testBackend()
	buf, plan, err := alice.setupBytes(nil, be, true, true)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"P " + identStmtName + "|" + identSQL, "B " + identStmtName + "|authenticated|" + `{"sub":"alice"}` + "|mac-a", "E"}
	if lines := msgLines(t, buf); !slices.Equal(lines, want) || plan != (setupPlan{inline: 1}) {
		t.Fatalf("alice inline: %q %+v", lines, plan)
	}
	if be.identity != alice.identKey {
		t.Fatalf("identity recorded %q", be.identity)
	}
	if buf, plan, err := alice.setupBytes(nil, be, true, true); err != nil || len(buf) != 0 || !plan.empty() {
		t.Fatalf("alice again: %q %+v %v", buf, plan, err)
	}

	// Bob's settings differ from the backend's: the committed group.
	bob.settings, bob.settingsKey = map[string]string{"TimeZone": "UTC"}, settingsKey(map[string]string{"TimeZone": "UTC"})
	if _, plan, err := bob.setupBytes(nil, be, true, true); err != nil || plan.inline != 0 || plan.group != 2 || !plan.gate {
		t.Fatalf("bob with a setting: %+v %v", plan, err)
	}
	legacy := newClientState(auth.Identity{Role: "anon", ClaimsJSON: `{"sub":"l"}`}, "", map[string]string{"request.jwt.claim.sub": "l"}, nil)
	if _, plan, err := legacy.setupBytes(nil, testBackend(), true, true); err != nil || plan.inline != 0 || !plan.gate {
		t.Fatalf("legacy claim settings: %+v %v", plan, err)
	}
}

// Where the proxy translates the client's statement names, the identity
// statement is prepared once per backend under the proxy's name, then
// only bound; after whatever may have dropped or replaced it, it is closed
// and prepared again. A client that names statements itself gets a backend
// whose named identity statement is closed first.
func TestSetupBytesNamedIdentity(t *testing.T) {
	alice := newClientState(auth.Identity{Role: "authenticated", ClaimsJSON: `{"sub":"alice"}`}, "", nil, nil)
	bob := newClientState(auth.Identity{Role: "anon", ClaimsJSON: `{"role":"anon"}`}, "", nil, nil)
	be := testBackend()
	parse := "P " + identStmtName + "|" + identSQL
	bindAlice := "B " + identStmtName + "|authenticated|" + `{"sub":"alice"}` + "|"
	bindBob := "B " + identStmtName + "|anon|" + `{"role":"anon"}` + "|"
	closeIdent := "C S " + identStmtName

	steps := []struct {
		name       string
		cs         *clientState
		before     namedStmt // set on the backend first (0: leave it)
		forget     bool      // the identity is unknown first
		shareTx    bool
		translated bool
		want       []string // the setup's messages up to the gate's Parse
		plan       setupPlan
		after      namedStmt
	}{
		{name: "first switch prepares", cs: &alice, shareTx: true, translated: true,
			want: []string{parse, bindAlice, "E"}, plan: setupPlan{inline: 1}, after: stmtPrepared},
		{name: "next switch only binds", cs: &bob, shareTx: true, translated: true,
			want: []string{bindBob, "E"}, plan: setupPlan{inline: 1}, after: stmtPrepared},
		{name: "in a group too", cs: &alice, translated: true,
			want: []string{bindAlice, "E"}, plan: setupPlan{group: 1, gate: true}, after: stmtPrepared},
		{name: "unknown: closed, prepared again", cs: &bob, before: stmtUnknown, shareTx: true, translated: true,
			want: []string{closeIdent, parse, bindBob, "E"}, plan: setupPlan{inline: 1}, after: stmtPrepared},
		{name: "a client naming statements itself: closed, unnamed", cs: &alice, translated: false,
			want: []string{closeIdent, "P |" + identSQL, "B |authenticated|" + `{"sub":"alice"}` + "|", "E"}, plan: setupPlan{group: 2, gate: true}, after: stmtAbsent},
		{name: "closed even when the identity is in force", cs: &alice, before: stmtUnknown, translated: false,
			want: []string{closeIdent}, plan: setupPlan{group: 1, gate: true}, after: stmtAbsent},
		{name: "nothing to close", cs: &bob, translated: false,
			want: []string{"P |" + identSQL, "B |anon|" + `{"role":"anon"}` + "|", "E"}, plan: setupPlan{group: 1, gate: true}, after: stmtAbsent},
		{name: "forgotten identity, absent statement: prepared", cs: &bob, forget: true, shareTx: true, translated: true,
			want: []string{parse, bindBob, "E"}, plan: setupPlan{inline: 1}, after: stmtPrepared},
	}
	for _, st := range steps {
		if st.before != 0 {
			be.identStmt = st.before
		}
		if st.forget {
			be.identity = ""
		}
		buf, plan, err := st.cs.setupBytes(nil, be, st.shareTx, st.translated)
		if err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		lines := msgLines(t, buf)
		if plan.gate {
			lines = lines[:len(lines)-4] // the gate's Parse, Sync, Describe, Close
		}
		if !slices.Equal(lines, st.want) || plan != st.plan || be.identStmt != st.after {
			t.Fatalf("%s:\n got  %q %+v %d\n want %q %+v %d", st.name, lines, plan, be.identStmt, st.want, st.plan, st.after)
		}
	}
}

// The statement that sets one setting follows the same rule as the
// identity statement: prepared once as cs_set where names are translated,
// closed for a client that names statements itself.
func TestSetupBytesNamedSettings(t *testing.T) {
	tokyo := newClientState(auth.Identity{Role: "anon", ClaimsJSON: `{}`}, "", nil, map[string]string{"timezone": "Asia/Tokyo"})
	utc := newClientState(auth.Identity{Role: "anon", ClaimsJSON: `{}`}, "", nil, map[string]string{"timezone": "UTC"})
	be := testBackend()
	be.identity = tokyo.identKey // the same identity: only settings differ
	parse := "P " + setStmtName + "|" + setSQL
	for i, st := range []struct {
		cs         *clientState
		translated bool
		want       []string // up to the gate's Parse
		after      namedStmt
	}{
		{&tokyo, true, []string{parse, "B " + setStmtName + "|timezone|Asia/Tokyo", "E"}, stmtPrepared},
		{&utc, true, []string{"B " + setStmtName + "|timezone|UTC", "E"}, stmtPrepared},
		{&tokyo, false, []string{"C S " + setStmtName, "P |" + setSQL, "B |timezone|Asia/Tokyo", "E"}, stmtAbsent},
	} {
		buf, plan, err := st.cs.setupBytes(nil, be, true, st.translated)
		if err != nil || !plan.gate {
			t.Fatalf("step %d: %+v %v", i, plan, err)
		}
		lines := msgLines(t, buf)
		lines = lines[:len(lines)-4] // the gate's Parse, Sync, Describe, Close
		if !slices.Equal(lines, st.want) || be.setStmt != st.after {
			t.Fatalf("step %d:\n got  %q %d\n want %q %d", i, lines, be.setStmt, st.want, st.after)
		}
	}
}

// A statement_timeout the backend's last client left is changed first in
// the next client's setup, before its identity: every message before that
// change would run under the other client's timeout.
func TestSetupBytesTimeoutFirst(t *testing.T) {
	mallory := newClientState(auth.Identity{Role: "anon", ClaimsJSON: `{"sub":"m"}`}, "mac-m", nil,
		map[string]string{"statement_timeout": "1", "timezone": "UTC"})
	be := testBackend()
	if _, _, err := mallory.setupBytes(nil, be, false, false); err != nil {
		t.Fatal(err)
	}

	for _, c := range []struct {
		name     string
		settings map[string]string
		first    []string
	}{
		{"no timeout of its own", map[string]string{"timezone": "UTC"}, []string{`P |RESET "statement_timeout"`, "B ", "E"}},
		{"a timeout of its own", map[string]string{"statement_timeout": "5s"}, []string{"P |" + setSQL, "B |statement_timeout|5s", "E"}},
	} {
		victim := newClientState(auth.Identity{Role: "authenticated", ClaimsJSON: `{"sub":"v"}`}, "mac-v", nil, c.settings)
		be := testBackend()
		_, _, _ = mallory.setupBytes(nil, be, false, false)
		buf, _, err := victim.setupBytes(nil, be, false, false)
		if err != nil {
			t.Fatal(err)
		}
		lines := msgLines(t, buf)
		if !slices.Equal(lines[:3], c.first) || lines[3] != "P |"+identSQL {
			t.Fatalf("%s: setup %q; want %q first, then the identity", c.name, lines, c.first)
		}
		if strings.Count(strings.Join(lines, "\n"), "statement_timeout") != 1 {
			t.Fatalf("%s: the timeout changed more than once: %q", c.name, lines)
		}
		if got, want := be.settings["statement_timeout"], c.settings["statement_timeout"]; got != want || be.settingsKey != victim.settingsKey {
			t.Fatalf("%s: backend records statement_timeout %q (key %q), want %q (key %q)", c.name, got, be.settingsKey, want, victim.settingsKey)
		}
		// Back to mallory: her timeout goes first as well.
		buf, _, _ = mallory.setupBytes(nil, be, false, false)
		if lines := msgLines(t, buf); lines[1] != "B |statement_timeout|1" {
			t.Fatalf("%s: mallory again: %q", c.name, lines)
		}
	}
}

// A statement_timeout reads as PostgreSQL reads it, and one below
// timeoutFloor (or one that does not read as a duration) is short.
func TestShortTimeout(t *testing.T) {
	for _, c := range []struct {
		v     string
		short bool
	}{
		{"0", false}, {"1", true}, {"1ms", true}, {"999", true}, {"999ms", true}, {"0.5s", true},
		{"1000", false}, {"1s", false}, {" 2 s ", false}, {"1min", false}, {"1h", false}, {"1d", false},
		{"500us", true}, {"1e3", false}, {"1e2", true}, {"9223372036854775807d", false},
		{"", true}, {"soon", true}, {"5 fortnights", true}, {"-1", true}, {"NaN", true},
	} {
		if got := shortTimeout(c.v); got != c.short {
			t.Errorf("shortTimeout(%q) = %v, want %v", c.v, got, c.short)
		}
	}
}

// Between two clients of one role only the claims change: where the
// backend's identity is known and its role is the client's, the setup
// runs claimsSQL, not identSQL. A new role, or an identity the proxy no
// longer knows, gets the whole identity.
func TestSetupBytesClaimsOnly(t *testing.T) {
	alice := newClientState(auth.Identity{Role: "authenticated", ClaimsJSON: `{"sub":"alice"}`}, "mac-a", nil, nil)
	dave := newClientState(auth.Identity{Role: "authenticated", ClaimsJSON: `{"sub":"dave"}`}, "mac-d", nil, nil)
	bob := newClientState(auth.Identity{Role: "anon", ClaimsJSON: `{"role":"anon"}`}, "mac-b", nil, nil)
	be := testBackend()
	step := func(who string, cs *clientState, want ...string) {
		t.Helper()
		buf, plan, err := cs.setupBytes(nil, be, true, true)
		if err != nil {
			t.Fatal(err)
		}
		if lines := msgLines(t, buf); !slices.Equal(lines, want) {
			t.Fatalf("%s's setup:\n got  %q\n want %q", who, lines, want)
		}
		if plan.inline != 1 || be.identity != cs.identKey {
			t.Fatalf("%s: plan %+v, backend identity %q", who, plan, be.identity)
		}
	}
	step("alice on a new backend", &alice, "P "+identStmtName+"|"+identSQL, "B "+identStmtName+`|authenticated|{"sub":"alice"}|mac-a`, "E")
	step("dave, same role", &dave, "P "+claimsStmtName+"|"+claimsSQL, "B "+claimsStmtName+`|{"sub":"dave"}|mac-d`, "E")
	step("alice again", &alice, "B "+claimsStmtName+`|{"sub":"alice"}|mac-a`, "E")
	step("bob, another role", &bob, "B "+identStmtName+`|anon|{"role":"anon"}|mac-b`, "E")
	step("dave after bob", &dave, "B "+identStmtName+`|authenticated|{"sub":"dave"}|mac-d`, "E")
	be.identity = "" // rolled back with a unit, or scrubbed
	step("alice on an unknown identity", &alice, "B "+identStmtName+`|authenticated|{"sub":"alice"}|mac-a`, "E")

	// A client that names its own statements finds none of the proxy's.
	buf, _, err := dave.setupBytes(nil, be, false, false)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"C S " + identStmtName, "C S " + claimsStmtName, "P |" + claimsSQL, "B |" + `{"sub":"dave"}|mac-d`, "E"}
	if lines := msgLines(t, buf); !slices.Equal(lines[:len(want)], want) {
		t.Fatalf("dave, untranslated: %q, want %q first", lines, want)
	}
}
