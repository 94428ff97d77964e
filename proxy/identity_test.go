package proxy_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"cascata/internal/pgtest"
	"cascata/proxy"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"
)

// TestIdentityInForce: current_user and request.jwt.claims are the client's.
func TestIdentityInForce(t *testing.T) {
	h := startProxy(t, harnessOpts{})
	ctx := context.Background()
	c := h.connect("p1", "authenticated", "user-1")
	var user, claims, db string
	if err := c.QueryRow(ctx, "SELECT current_user, current_setting('request.jwt.claims'), current_database()").Scan(&user, &claims, &db); err != nil {
		t.Fatal(err)
	}
	if user != "authenticated" || db != "p1" {
		t.Fatalf("current_user=%q db=%q", user, db)
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(claims), &m); err != nil || m["sub"] != "user-1" {
		t.Fatalf("claims %q (%v)", claims, err)
	}
}

// TestManyUsersShareTwoBackends: 50 users over 2 backends always see their own identity.
func TestManyUsersShareTwoBackends(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 2})
	ctx := context.Background()
	roles := []string{"anon", "authenticated", "service_role"}
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for i := range 50 {
		role := roles[i%len(roles)]
		sub := fmt.Sprintf("user-%d", i)
		tok := token(t, "p2", role, sub, nil)
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := h.tryConnect("p2", role, tok)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close(ctx)
			for range 20 {
				var user, gotSub string
				// Two statements in one transaction, and autocommit ones between.
				tx, err := c.Begin(ctx)
				if err != nil {
					errs <- err
					return
				}
				if err := tx.QueryRow(ctx, "SELECT current_user, current_setting('request.jwt.claims')::jsonb->>'sub'").Scan(&user, &gotSub); err != nil {
					errs <- err
					return
				}
				if err := tx.Commit(ctx); err != nil {
					errs <- err
					return
				}
				if user != role || gotSub != sub {
					errs <- fmt.Errorf("client %s/%s saw %s/%s", role, sub, user, gotSub)
					return
				}
				if err := c.QueryRow(ctx, "SELECT current_setting('request.jwt.claims')::jsonb->>'sub'").Scan(&gotSub); err != nil || gotSub != sub {
					errs <- fmt.Errorf("autocommit: client %s saw %s (%v)", sub, gotSub, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := proxyBackends(t, "p2"); n > 2 {
		t.Fatalf("%d backends for p2, pool_size is 2", n)
	}
}

// TestRolledBackIdentity: a transaction that rolls back after the identity
// was applied inside it must not leave the backend with a stale identity.
func TestRolledBackIdentity(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	ctx := context.Background()
	a := h.connect("p3", "anon", "a")
	b := h.connect("p3", "authenticated", "b")
	for range 5 {
		tx, err := a.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, "SELECT 1"); err != nil {
			t.Fatal(err)
		}
		_ = tx.Rollback(ctx)
		var ua, ub string
		if err := b.QueryRow(ctx, "SELECT current_user").Scan(&ub); err != nil {
			t.Fatal(err)
		}
		if err := a.QueryRow(ctx, "SELECT current_user").Scan(&ua); err != nil {
			t.Fatal(err)
		}
		if ua != "anon" || ub != "authenticated" {
			t.Fatalf("a=%s b=%s", ua, ub)
		}
	}
}

// TestLegacyClaimSettings: with the project flag, request.jwt.claim.<name>
// carries each claim, and a user without a claim never sees the previous
// user's value on a shared backend.
func TestLegacyClaimSettings(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1, legacyGUCs: true})
	ctx := context.Background()
	a, err := h.tryConnect("p1", "authenticated", token(t, "p1", "authenticated", "alice", map[string]any{"email": "alice@example.com", "org": map[string]any{"id": 7}}))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close(ctx)
	b := h.connect("p1", "authenticated", "bob")
	for range 3 {
		var sub, email, org string
		if err := a.QueryRow(ctx, "SELECT current_setting('request.jwt.claim.sub'), current_setting('request.jwt.claim.email'), current_setting('request.jwt.claim.org')").Scan(&sub, &email, &org); err != nil {
			t.Fatal(err)
		}
		if sub != "alice" || email != "alice@example.com" || org != `{"id":7}` {
			t.Fatalf("alice sees sub=%q email=%q org=%q", sub, email, org)
		}
		if err := b.QueryRow(ctx, "SELECT current_setting('request.jwt.claim.sub'), coalesce(current_setting('request.jwt.claim.email', true), '')").Scan(&sub, &email); err != nil {
			t.Fatal(err)
		}
		if sub != "bob" || email != "" {
			t.Fatalf("bob sees sub=%q email=%q", sub, email)
		}
	}
}

// TestClaimsByteForByte: claims with quotes, backslashes, $$, newlines,
// unicode and SQL fragments arrive exactly in request.jwt.claims and do
// nothing else.
func TestClaimsByteForByte(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	ctx := context.Background()
	weird := map[string]any{
		"q":    `it's "quoted" \ back\\slash $$ dollar $tag$ ' OR 1=1; DROP TABLE items; --`,
		"nl":   "line1\nline2\r\n\ttab",
		"uni":  "zaŝ 日本語 🚀 \u00e9\u0301",
		"nest": map[string]any{"a": []any{1, "x", nil, true}},
	}
	tok := token(t, "p1", "authenticated", "weird", weird)
	// The payload exactly as signed: the token's middle part.
	parts := strings.Split(tok, ".")
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	c, err := h.tryConnect("p1", "authenticated", tok)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	var got string
	if err := c.QueryRow(ctx, "SELECT current_setting('request.jwt.claims')").Scan(&got); err != nil {
		t.Fatal(err)
	}
	if got != string(payload) {
		t.Fatalf("claims differ:\n got %q\nwant %q", got, payload)
	}
	var n int
	if err := c.QueryRow(ctx, "SELECT count(*) FROM items").Scan(&n); err != nil {
		t.Fatalf("items still there: %v", err)
	}
}

// TestRoleNotInForce: a project whose server login may not SET ROLE to the
// token's role. The client's statements never run under the login's own
// role: each gets 42501 in cascata's words and the session goes on; the
// backends it spoiled are closed, not kept; a role the login may take
// works through the same project.
func TestRoleNotInForce(t *testing.T) {
	ctx := context.Background()
	login := fmt.Sprintf("cascata_limited_%d", time.Now().UnixNano())
	su := superConnDB(t, "p1")
	probe := login + "_probe"
	for _, sql := range []string{
		`CREATE ROLE ` + login + ` LOGIN PASSWORD 'limited-pw' IN ROLE anon`,
		`GRANT CONNECT ON DATABASE p1 TO ` + login,
		// A table anyone may write: an INSERT that ran under the login's
		// own role would leave a row.
		`CREATE TABLE public.` + probe + ` (x int)`,
		`GRANT INSERT ON public.` + probe + ` TO PUBLIC`,
	} {
		if _, err := su.Exec(ctx, sql); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { // before su's own cleanup closes it
		_, _ = su.Exec(context.Background(), `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '`+login+`'`)
		_, _ = su.Exec(context.Background(), `DROP TABLE public.`+probe)
		_, _ = su.Exec(context.Background(), `DROP OWNED BY `+login)
		_, _ = su.Exec(context.Background(), `DROP ROLE `+login)
	})
	h := startProxy(t, harnessOpts{poolSize: 2, projects: []string{"limited"},
		urls: map[string]string{"limited": cluster.Primary.URL(login, "limited-pw", "p1")}})

	c := h.connect("limited", "authenticated", "no-role")
	for round := range 4 {
		var user string
		err := c.QueryRow(ctx, "SELECT current_user").Scan(&user)
		if sqlstate(err) != "42501" || !strings.Contains(err.Error(), "cascata could not put the session in force (role authenticated)") {
			t.Fatalf("round %d: SELECT current_user as a role the login may not take: %q, %v", round, user, err)
		}
		if _, err := c.Exec(ctx, `INSERT INTO public.`+probe+` VALUES (1)`); sqlstate(err) != "42501" {
			t.Fatalf("round %d: INSERT as a role the login may not take: %v", round, err)
		}
	}
	var rows int
	if err := su.QueryRow(ctx, `SELECT count(*) FROM public.`+probe).Scan(&rows); err != nil || rows != 0 {
		t.Fatalf("%d rows inserted (%v): a statement ran without the client's role", rows, err)
	}
	a := h.connect("limited", "anon", "anon-user")
	var user string
	if err := a.QueryRow(ctx, "SELECT current_user").Scan(&user); err != nil || user != "anon" {
		t.Fatalf("anon through the same project: %q, %v", user, err)
	}
	// The closed backends' server processes leave within moments.
	waitFor(t, "at most the pool's 2 backends of the project's login", 3*time.Second, func() bool {
		var n int
		if err := superConn(t).QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", login).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n <= 2
	})
}

// TestFailedFirstStatementKeepsIdentity: a client whose first statement on
// a backend fails, with its next statements already on their way (one
// write, simple and extended protocol, the error raised by the statement
// or by its Bind), never sees the identity of the client the backend
// served before. Pool size 1: every unit of the attacker lands on the
// backend the victim used last.
func TestFailedFirstStatementKeepsIdentity(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1, projects: []string{advProject}})
	ctx := context.Background()
	victim := h.connect(advProject, "service_role", "victim")
	atk := rawAfterLogin(t, h, "anon", "attacker")
	fe := pgproto3.NewFrontend(atk, atk)
	const probe = "SELECT current_user || ' ' || current_setting('request.jwt.claims')"
	extended := func(sql string, params ...[]byte) []pgproto3.FrontendMessage {
		return []pgproto3.FrontendMessage{&pgproto3.Parse{Query: sql}, &pgproto3.Bind{Parameters: params}, &pgproto3.Execute{}, &pgproto3.Sync{}}
	}
	variants := []struct {
		name string
		msgs []pgproto3.FrontendMessage
	}{
		{"simple", []pgproto3.FrontendMessage{&pgproto3.Query{String: "SELECT 1/0"}, &pgproto3.Query{String: probe}}},
		{"extended", append(extended("SELECT 1/0"), extended(probe)...)},
		{"extended, error in Bind", append(extended("SELECT $1::int", []byte("x")), extended(probe)...)},
		{"simple after extended", append(extended("SELECT 1/0"), &pgproto3.Query{String: probe})},
	}
	for range 10 {
		for _, v := range variants {
			var who string
			if err := victim.QueryRow(ctx, "SELECT current_user").Scan(&who); err != nil || who != "service_role" {
				t.Fatalf("victim: %q, %v", who, err)
			}
			codes, rows := exchangeRaw(t, atk, fe, v.msgs, 2)
			if len(codes) != 1 || (codes[0] != "22012" && codes[0] != "22P02") {
				t.Fatalf("%s: errors %v, want the first statement's", v.name, codes)
			}
			if len(rows) != 1 || !strings.HasPrefix(rows[0], "anon ") || !strings.Contains(rows[0], `"attacker"`) {
				t.Fatalf("%s: the follow-up saw %q, want anon and the attacker's claims", v.name, rows)
			}
		}
	}
}

// The identity statements a shared backend keeps (cs_ident, and
// cs_claims for a switch within one role) are only ever the proxy's. A
// trusted role's DO block can drop or replace them; the unit is scrubbed
// at release, and the next identity closes whatever is under those names
// and prepares them again, so the next client runs as itself with its own
// claims.
func TestIdentityStatementAfterTrustedDO(t *testing.T) {
	h := trustedProxy(t, "p2", "service_role")
	ctx := context.Background()
	trusted := h.connect("p2", "service_role", "ops")
	peer := h.connect("p2", "service_role", "peer")
	anon := h.connect("p2", "anon", "visitor")
	claimsOf := func(c *pgx.Conn, sub string) {
		t.Helper()
		var got string
		if err := c.QueryRow(ctx, "SELECT current_setting('request.jwt.claims')::jsonb->>'sub'").Scan(&got); err != nil || got != sub {
			t.Fatalf("the client of %s sees the claims of %q (%v)", sub, got, err)
		}
	}
	for _, do := range []string{
		`DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$`,
		`DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; EXECUTE 'PREPARE cs_ident(text, text, text) AS SELECT pg_catalog.set_config(''role'', ''service_role'', false), $2, $3'; END $$`,
		`DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; EXECUTE 'PREPARE cs_claims(text, text) AS SELECT pg_catalog.set_config(''request.jwt.claims'', ''{"sub":"ops"}'', false), $2'; END $$`,
	} {
		for range 2 { // the statements are prepared again, then only bound
			runsAs(t, anon, "anon")
			runsAs(t, trusted, "service_role")
			claimsOf(peer, "peer") // within the role: cs_claims
			claimsOf(trusted, "ops")
		}
		if _, err := trusted.Exec(ctx, do); err != nil {
			t.Fatalf("%s: %v", do, err)
		}
		claimsOf(peer, "peer")
		runsAs(t, anon, "anon")
		claimsOf(trusted, "ops")
		claimsOf(peer, "peer")
	}
}

// exchangeRaw sends msgs in one write on a raw client connection and reads
// the replies up to the rfqs-th ReadyForQuery: the SQLSTATEs of the errors
// and the first column of the rows.
func exchangeRaw(t *testing.T, c net.Conn, fe *pgproto3.Frontend, msgs []pgproto3.FrontendMessage, rfqs int) (codes, rows []string) {
	t.Helper()
	var out []byte
	for _, m := range msgs {
		var err error
		if out, err = m.Encode(out); err != nil {
			t.Fatal(err)
		}
	}
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(out); err != nil {
		t.Fatal(err)
	}
	for rfqs > 0 {
		msg, err := fe.Receive()
		if err != nil {
			t.Fatalf("%T...: %v (errors %v, rows %v)", msgs[0], err, codes, rows)
		}
		switch m := msg.(type) {
		case *pgproto3.ErrorResponse:
			codes = append(codes, m.Code)
		case *pgproto3.DataRow:
			rows = append(rows, string(m.Values[0]))
		case *pgproto3.ReadyForQuery:
			rfqs--
		}
	}
	return codes, rows
}

// runsAs fails the test unless c's current_user is role.
func runsAs(t *testing.T, c *pgx.Conn, role string) {
	t.Helper()
	var who string
	if err := c.QueryRow(context.Background(), "SELECT current_user").Scan(&who); err != nil || who != role {
		t.Fatalf("a client of role %s runs as %q (%v)", role, who, err)
	}
}

// Over the extended protocol too, the proxy's statements are out of a
// client's reach: a Bind or Describe naming them reaches the client's own
// names (none: 26000), a Close of them closes nothing on the backend, and
// the next client of the one backend runs as itself.
func TestProxyStatementsOverExtendedProtocol(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1, projects: []string{advProject}})
	victim := h.connect(advProject, "service_role", "victim")
	runsAs(t, victim, "service_role") // the backend has cs_ident now
	runsAs(t, h.connect(advProject, "service_role", "peer"), "service_role")
	runsAs(t, victim, "service_role") // and cs_claims
	atk := rawAfterLogin(t, h, "anon", "attacker")
	fe := pgproto3.NewFrontend(atk, atk)
	role := [][]byte{[]byte("service_role"), []byte(`{"role":"service_role"}`), []byte("")}
	for _, name := range []string{"cs_ident", "cs_claims", "cs_set"} {
		for _, msgs := range [][]pgproto3.FrontendMessage{
			{&pgproto3.Bind{PreparedStatement: name, Parameters: role[:2]}, &pgproto3.Execute{}, &pgproto3.Sync{}},
			{&pgproto3.Bind{PreparedStatement: name, Parameters: role}, &pgproto3.Execute{}, &pgproto3.Sync{}},
			{&pgproto3.Describe{ObjectType: 'S', Name: name}, &pgproto3.Sync{}},
			{&pgproto3.Close{ObjectType: 'S', Name: name}, &pgproto3.Sync{}},
		} {
			msgs = append(msgs, &pgproto3.Query{String: "SELECT current_user"})
			codes, rows := exchangeRaw(t, atk, fe, msgs, 2)
			_, closing := msgs[0].(*pgproto3.Close)
			if (closing && len(codes) != 0) || (!closing && (len(codes) != 1 || codes[0] != "26000")) {
				t.Fatalf("%s %T: errors %v", name, msgs[0], codes)
			}
			if len(rows) != 1 || rows[0] != "anon" {
				t.Fatalf("%s %T: the attacker then runs as %v", name, msgs[0], rows)
			}
			runsAs(t, victim, "service_role")
		}
	}
}

// A function that is not volatile cannot drop the proxy's statements
// unseen (its units are not scrubbed): PostgreSQL runs its SQL read-only
// and refuses DEALLOCATE there.
func TestStableFunctionCannotDropIdentityStatement(t *testing.T) {
	ctx := context.Background()
	su := pgtest.Connect(t, cluster.Primary.SuperuserURL("p2"))
	if _, err := su.Exec(ctx, `
		CREATE OR REPLACE FUNCTION public.stable_dealloc() RETURNS int LANGUAGE plpgsql STABLE AS $$
		BEGIN EXECUTE 'DEALLOCATE ALL'; RETURN 1; END $$;
		GRANT EXECUTE ON FUNCTION public.stable_dealloc() TO anon;`); err != nil {
		t.Fatal(err)
	}
	h := startProxy(t, harnessOpts{poolSize: 1, projects: []string{"p2"}})
	anon := h.connect("p2", "anon", "visitor")
	other := h.connect("p2", "authenticated", "user")
	if _, err := anon.Exec(ctx, "SELECT public.stable_dealloc()"); sqlstate(err) != "0A000" {
		t.Fatalf("DEALLOCATE in a stable function: %v, want 0A000", err)
	}
	runsAs(t, other, "authenticated")
	runsAs(t, anon, "anon")
}

// The same for the statement that sets one setting (cs_set), which runs
// when clients whose settings differ take turns on a backend.
func TestSettingsStatementAfterTrustedDO(t *testing.T) {
	h := trustedProxy(t, "p2", "service_role")
	ctx := context.Background()
	trusted := h.connect("p2", "service_role", "ops")
	tokyo := connectURL(t, h.url("p2", "anon", token(t, "p2", "anon", "visitor", nil))+"&timezone=Asia/Tokyo")
	check := func(when string) {
		t.Helper()
		var who, tz string
		if err := tokyo.QueryRow(ctx, "SELECT current_user, current_setting('TimeZone')").Scan(&who, &tz); err != nil || who != "anon" || tz != "Asia/Tokyo" {
			t.Fatalf("%s: the anon client runs as %q with TimeZone %q (%v)", when, who, tz, err)
		}
		if err := trusted.QueryRow(ctx, "SELECT current_user, current_setting('TimeZone')").Scan(&who, &tz); err != nil || who != "service_role" || tz == "Asia/Tokyo" {
			t.Fatalf("%s: the trusted client runs as %q with TimeZone %q (%v)", when, who, tz, err)
		}
	}
	check("before")
	check("again")
	do := `DO $$ BEGIN EXECUTE 'DEALLOCATE cs_set'; EXECUTE 'PREPARE cs_set(text, text) AS SELECT pg_catalog.set_config(''role'', ''service_role'', false), $1, $2'; END $$`
	if _, err := trusted.Exec(ctx, do); err != nil {
		t.Fatalf("%s: %v", do, err)
	}
	check("after the DO block")
}

// A backend keeps its statements whatever mode the project is in next: a
// session-mode client, which names statements itself and may read
// pg_prepared_statements, finds none of the proxy's.
func TestNoIdentityStatementInSessionMode(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1, projects: []string{"p2"}})
	ctx := context.Background()
	// A setting of its own: the backend gets cs_set as well as cs_ident.
	c := connectURL(t, h.url("p2", "authenticated", token(t, "p2", "authenticated", "tx", nil))+"&timezone=Asia/Tokyo")
	if _, err := c.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	c.Close(ctx)
	if err := h.srv.SetProjects([]proxy.ProjectConfig{{
		Ref:         "p2",
		DatabaseURL: cluster.Primary.URL("authenticator", loginPassword, "p2"),
		PoolSize:    1,
		SessionMode: true,
	}}); err != nil {
		t.Fatal(err)
	}
	s := h.connect("p2", "anon", "session")
	var n int
	var who string
	if err := s.QueryRow(ctx, "SELECT (SELECT count(*) FROM pg_prepared_statements WHERE name IN ('cs_ident', 'cs_set'))::int, current_user").Scan(&n, &who); err != nil {
		t.Fatal(err)
	}
	if n != 0 || who != "anon" {
		t.Fatalf("a session-mode client finds %d of the proxy's statements and runs as %q", n, who)
	}
}
