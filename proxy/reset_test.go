package proxy_test

import (
	"context"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
)

// RESET ALL and DISCARD ALL reset the client's own session and keep its
// identity, in both pool modes and over both protocols, so that pools that
// reset connections on release work unmodified.

func resetConn(t *testing.T, h *harness, sub string) *pgx.Conn {
	t.Helper()
	cfg, err := pgx.ParseConfig(h.url("p2", "authenticated", token(t, "p2", "authenticated", sub, nil)))
	if err != nil {
		t.Fatal(err)
	}
	cfg.RuntimeParams["application_name"] = "startup-app"
	cfg.RuntimeParams["search_path"] = "public"
	c, err := pgx.ConnectConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

type sessionView struct {
	user, sub, app, searchPath, timezone string
	temps, channels, locks, cursors      int
}

func viewSession(t *testing.T, c *pgx.Conn) sessionView {
	t.Helper()
	var v sessionView
	err := c.QueryRow(context.Background(), `SELECT current_user, current_setting('request.jwt.claims')::jsonb->>'sub',
		current_setting('application_name'), current_setting('search_path'), current_setting('TimeZone'),
		(SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())::int,
		(SELECT count(*) FROM pg_listening_channels())::int,
		(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())::int,
		0`, pgx.QueryExecModeSimpleProtocol).
		Scan(&v.user, &v.sub, &v.app, &v.searchPath, &v.timezone, &v.temps, &v.channels, &v.locks, &v.cursors)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestResetAllAndDiscardAll(t *testing.T) {
	for _, session := range []bool{false, true} {
		for _, m := range execModes {
			name := map[bool]string{false: "transaction", true: "session"}[session] + "/" + m.name
			t.Run(name, func(t *testing.T) {
				h := startProxy(t, harnessOpts{poolSize: 2, sessionMode: session, projects: []string{"p2"}})
				ctx := context.Background()
				c := resetConn(t, h, "resetter")
				before := viewSession(t, c)
				exec := func(sql string) string {
					t.Helper()
					tag, err := c.Exec(ctx, sql, m.mode)
					if err != nil {
						t.Fatalf("%s: %v", sql, err)
					}
					return tag.String()
				}
				exec("SET search_path = pg_catalog")
				exec("SET TimeZone = 'Asia/Tokyo'")
				exec("SET application_name = 'changed'")
				// resets runs sql, which must answer tag and leave the
				// session as it was at startup.
				resets := func(sql, tag string) {
					t.Helper()
					if got := exec(sql); got != tag {
						t.Fatalf("%s answered %q", sql, got)
					}
					if after := viewSession(t, c); after != before {
						t.Fatalf("after %s: %+v, want %+v", sql, after, before)
					}
				}
				resets("RESET ALL", "RESET")

				// DISCARD ALL: state and statement names go, identity stays.
				exec("SET TimeZone = 'Asia/Tokyo'")
				if _, err := c.Exec(ctx, "PREPARE sqlp AS SELECT 1", pgx.QueryExecModeSimpleProtocol); err != nil {
					t.Fatal(err)
				}
				if _, err := c.Prepare(ctx, "protop", "SELECT 2"); err != nil {
					t.Fatal(err)
				}
				exec("CREATE TEMP TABLE scratch (x int)")
				exec("LISTEN reset_chan")
				exec("SELECT pg_advisory_lock(99)")
				resets("DISCARD ALL", "DISCARD ALL")
				if _, err := c.Exec(ctx, "EXECUTE sqlp", pgx.QueryExecModeSimpleProtocol); sqlstate(err) != "26000" {
					t.Fatalf("a SQL-prepared statement after DISCARD ALL: %v", err)
				}
				if _, err := c.Exec(ctx, "EXECUTE protop", pgx.QueryExecModeSimpleProtocol); sqlstate(err) != "26000" {
					t.Fatalf("a protocol-prepared statement after DISCARD ALL: %v", err)
				}
				if !session {
					if got := pinnedCount(t, h, "p2"); got != 0 {
						t.Fatalf("%d pinned after DISCARD ALL", got)
					}
				}

				// Inside a transaction block DISCARD ALL fails as on PostgreSQL.
				tx, err := c.Begin(ctx)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := tx.Exec(ctx, "DISCARD ALL", m.mode); sqlstate(err) != "25001" {
					t.Fatalf("DISCARD ALL in a transaction: %v", err)
				}
				_ = tx.Rollback(ctx)

				// RESET ALL in a transaction that rolls back changes nothing.
				exec("SET TimeZone = 'Asia/Tokyo'")
				tx, err = c.Begin(ctx)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := tx.Exec(ctx, "RESET ALL", m.mode); err != nil {
					t.Fatal(err)
				}
				_ = tx.Rollback(ctx)
				if v := viewSession(t, c); v.timezone != "Asia/Tokyo" || v.user != "authenticated" || v.sub != "resetter" {
					t.Fatalf("after a rolled back RESET ALL: %+v", v)
				}
				// DISCARD ALL with other statements runs in one transaction.
				if _, err := c.Exec(ctx, "SELECT 1; DISCARD ALL", pgx.QueryExecModeSimpleProtocol); sqlstate(err) != "25001" {
					t.Fatalf("DISCARD ALL after another statement: %v", err)
				}
				if _, err := c.Exec(ctx, "SELECT query_to_xml('DISCARD ALL', true, false, '')", m.mode); sqlstate(err) != "42501" {
					t.Fatalf("DISCARD ALL in query_to_xml: %v", err)
				}
				if v := viewSession(t, c); v.user != "authenticated" || !strings.Contains(v.sub, "resetter") {
					t.Fatalf("identity after all: %+v", v)
				}
			})
		}
	}
}

// asyncpg's Pool resets a connection on release with one query whose last
// statement is RESET ALL; it runs with the RESET ALL emulated in place.
func TestResetAllAmongStatements(t *testing.T) {
	for _, session := range []bool{false, true} {
		t.Run(map[bool]string{false: "transaction", true: "session"}[session], func(t *testing.T) {
			h := startProxy(t, harnessOpts{poolSize: 2, sessionMode: session, projects: []string{"p2"}})
			ctx := context.Background()
			c := resetConn(t, h, "asyncpg")
			before := viewSession(t, c)
			if _, err := c.Exec(ctx, "SET search_path = pg_catalog; SET TimeZone = 'Asia/Tokyo'", pgx.QueryExecModeSimpleProtocol); err != nil {
				t.Fatal(err)
			}
			if _, err := c.Exec(ctx, "LISTEN pool_chan", pgx.QueryExecModeSimpleProtocol); err != nil {
				t.Fatal(err)
			}
			mrr := c.PgConn().Exec(ctx, "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;")
			results, err := mrr.ReadAll()
			if err != nil {
				t.Fatal(err)
			}
			var tags []string
			for _, r := range results {
				tags = append(tags, r.CommandTag.String())
			}
			if strings.Join(tags, ",") != "SELECT 1,CLOSE CURSOR ALL,UNLISTEN,RESET" {
				t.Fatalf("tags %v", tags)
			}
			if after := viewSession(t, c); after != before {
				t.Fatalf("after the reset query: %+v, want %+v", after, before)
			}
			if !session {
				if got := pinnedCount(t, h, "p2"); got != 0 {
					t.Fatalf("%d pinned after UNLISTEN and RESET ALL", got)
				}
			}
			// Over the extended protocol a Parse of several statements is
			// refused as PostgreSQL refuses it.
			if _, err := c.PgConn().Prepare(ctx, "", "SELECT 1; RESET ALL", nil); sqlstate(err) != "42601" {
				t.Fatalf("a Parse of several statements with RESET ALL: %v", err)
			}
		})
	}
}
