package proxy_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// sessionState is what one session may leave on a backend.
type sessionState struct {
	pid        int
	appName    string
	searchPath string
	tempTable  bool
	user       string
	sub        string
	timezone   string
}

func readSessionState(t *testing.T, c *pgx.Conn) sessionState {
	t.Helper()
	var s sessionState
	var claims string
	var temp *string
	if err := c.QueryRow(context.Background(), `SELECT pg_backend_pid(), current_setting('application_name'), current_setting('search_path'),
		to_regclass('pg_temp.sess_tmp')::text, current_user, current_setting('request.jwt.claims'), current_setting('TimeZone')`).
		Scan(&s.pid, &s.appName, &s.searchPath, &temp, &s.user, &claims, &s.timezone); err != nil {
		t.Fatal(err)
	}
	s.tempTable = temp != nil
	var m map[string]any
	if err := json.Unmarshal([]byte(claims), &m); err != nil {
		t.Fatalf("claims %q: %v", claims, err)
	}
	s.sub, _ = m["sub"].(string)
	return s
}

// TestSessionMode: in session mode settings and temp tables live across
// transactions, and the next client of the same backend starts clean with
// its own identity, whether the previous one said goodbye or vanished.
func TestSessionMode(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1, sessionMode: true})
	ctx := context.Background()

	var lastPID int
	for _, leave := range []string{"terminate", "killed mid-transaction", "killed during a statement"} {
		a, err := h.tryConnect("p1", "authenticated", token(t, "p1", "authenticated", "sess-a", nil))
		if err != nil {
			t.Fatal(err)
		}
		fresh := readSessionState(t, a)
		if fresh.user != "authenticated" || fresh.sub != "sess-a" || fresh.tempTable {
			t.Fatalf("%s: new session: %+v", leave, fresh)
		}
		for _, q := range []string{
			"SET application_name = 'sess-a-app'",
			"SET search_path = pg_temp, public",
			"SET TimeZone = 'Pacific/Chatham'",
			"CREATE TEMP TABLE sess_tmp (x int)",
			"INSERT INTO sess_tmp VALUES (1), (2)",
		} {
			if _, err := a.Exec(ctx, q); err != nil {
				t.Fatalf("%s: %s: %v", leave, q, err)
			}
		}
		// Across separate transactions, the session's state stays.
		for range 3 {
			tx, err := a.Begin(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := tx.Exec(ctx, "INSERT INTO sess_tmp VALUES (3)"); err != nil {
				t.Fatal(err)
			}
			if err := tx.Commit(ctx); err != nil {
				t.Fatal(err)
			}
		}
		st := readSessionState(t, a)
		if st.pid != fresh.pid || st.appName != "sess-a-app" || st.searchPath != "pg_temp, public" || !st.tempTable || st.timezone != "Pacific/Chatham" {
			t.Fatalf("%s: session state not kept across transactions: %+v (pid at start %d)", leave, st, fresh.pid)
		}
		var n int
		if err := a.QueryRow(ctx, "SELECT count(*) FROM sess_tmp").Scan(&n); err != nil || n != 5 {
			t.Fatalf("%s: temp table rows %d, %v", leave, n, err)
		}
		lastPID = st.pid

		killed := time.Now()
		switch leave {
		case "terminate":
			a.Close(ctx)
		case "killed during a statement":
			tag := "sess-sleep-" + marker(t)
			go func() { _, _ = a.Exec(ctx, "SELECT pg_sleep(5) -- "+tag) }()
			activeQueryPID(t, tag)
			killed = time.Now()
			killClient(a)
		default:
			if _, err := a.Exec(ctx, "BEGIN; INSERT INTO sess_tmp VALUES (4); SET LOCAL TimeZone = 'UTC'"); err != nil {
				t.Fatal(err)
			}
			killClient(a)
			a.Close(ctx)
		}
		waitFor(t, "the client to leave", 3*time.Second, func() bool { return h.srv.ClientCount() == 0 })

		// Next client, same (only) backend: nothing of the previous session.
		b := h.connect("p1", "anon", "sess-b")
		bs := readSessionState(t, b)
		if d := time.Since(killed); d > 2*time.Second {
			t.Errorf("%s: the next client was served %v after the previous one left", leave, d)
		}
		if bs.pid != lastPID && leave != "killed during a statement" {
			t.Errorf("%s: the next client got a new backend (pid %d, was %d): the clean backend was not reused", leave, bs.pid, lastPID)
		}
		if bs.appName == "sess-a-app" || bs.searchPath == "pg_temp, public" || bs.tempTable || bs.timezone == "Pacific/Chatham" {
			t.Fatalf("%s: the next session sees the previous one's state: %+v", leave, bs)
		}
		if bs.user != "anon" || bs.sub != "sess-b" {
			t.Fatalf("%s: the next session runs as %s/%s, want anon/sess-b", leave, bs.user, bs.sub)
		}
		if n := idleInTx(t); n != 0 {
			t.Fatalf("%s: %d backends idle in transaction", leave, n)
		}
		b.Close(ctx)
		waitFor(t, "the client to leave", 3*time.Second, func() bool { return h.srv.ClientCount() == 0 })
	}
}
