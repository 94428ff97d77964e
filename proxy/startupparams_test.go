package proxy_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// TestStartupParameters: startup parameters are refused at login exactly
// when PostgreSQL refuses them for a non-superuser, with its SQLSTATE
// (42704 for a name that is no setting, 42602 for an invalid custom
// name, 55P02 and 42501 for settings no client may set at connection
// start), and the accepted ones are in force.
func TestStartupParameters(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 2, projects: []string{"p1"}})
	host, port, _ := net.SplitHostPort(h.addr)
	tok := token(t, "p1", "authenticated", "params", nil)
	viaProxy := fmt.Sprintf("postgres://authenticated:%s@%s:%s/p1?sslmode=disable", url.QueryEscape(tok), host, port)
	direct := cluster.Primary.URL("authenticator", loginPassword, "p1")

	connect := func(u string, params map[string]string) (*pgconn.PgConn, error) {
		cfg, err := pgconn.ParseConfig(u)
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range params {
			cfg.RuntimeParams[k] = v
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		return pgconn.ConnectConfig(ctx, cfg)
	}
	cases := []struct {
		name   string
		params map[string]string
		want   string // SQLSTATE, "" = accepted
	}{
		{"unknown", map[string]string{"doesnotexist": "foo"}, "42704"},
		{"unknown mixed case", map[string]string{"DoesNotExist": "foo"}, "42704"},
		{"unknown in options", map[string]string{"options": "-c doesnotexist=1"}, "42704"},
		{"unknown in options long form", map[string]string{"options": "--does-not-exist=1"}, "42704"},
		{"custom", map[string]string{"myapp.tenant": "t1"}, ""},
		{"custom in options", map[string]string{"options": "-c myapp.flag=on"}, ""},
		{"custom starting with a digit", map[string]string{"1app.x": "1"}, "42602"},
		{"custom empty part", map[string]string{"myapp..x": "1"}, "42602"},
		{"custom trailing dot", map[string]string{"myapp.": "1"}, "42602"},
		{"known", map[string]string{"DateStyle": "ISO, DMY", "TimeZone": "UTC", "application_name": "params-test", "search_path": "public"}, ""},
		{"known in options", map[string]string{"options": "-c statement_timeout=5s -c geqo=off"}, ""},
		{"old name", map[string]string{"sort_mem": "2048"}, ""},
		{"postmaster", map[string]string{"shared_buffers": "1MB"}, "55P02"},
		{"sighup", map[string]string{"checkpoint_timeout": "60s"}, "55P02"},
		{"internal", map[string]string{"server_version": "1"}, "55P02"},
		{"superuser-backend", map[string]string{"log_connections": "on"}, "42501"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			pgc, err := connect(direct, tc.params)
			if got := sqlstate(err); got != tc.want || (err != nil && tc.want == "") {
				t.Fatalf("PostgreSQL itself: %v (SQLSTATE %q), the test expects %q", err, got, tc.want)
			}
			if pgc != nil {
				_ = pgc.Close(context.Background())
			}
			c, err := connect(viaProxy, tc.params)
			if got := sqlstate(err); got != tc.want || (err != nil && tc.want == "") {
				t.Fatalf("through cascata: %v (SQLSTATE %q), want %q", err, got, tc.want)
			}
			if err != nil {
				var pe *pgconn.PgError
				if errors.As(err, &pe) && pe.Severity != "FATAL" {
					t.Errorf("severity %s, want FATAL", pe.Severity)
				}
				return
			}
			defer c.Close(context.Background())
			// Accepted settings are in force on every statement.
			for name, v := range tc.params {
				if name == "options" {
					continue
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				res := c.ExecParams(ctx, "SELECT current_setting($1)", [][]byte{[]byte(name)}, nil, nil, nil).Read()
				cancel()
				if res.Err != nil {
					t.Fatalf("current_setting(%s): %v", name, res.Err)
				}
				if got := string(res.Rows[0][0]); name != "sort_mem" && name != "DateStyle" && got != v {
					t.Errorf("%s = %q, want %q", name, got, v)
				}
			}
		})
	}
	// A refused login leaves no backend broken: the pool still serves.
	c := h.connect("p1", "authenticated", "after")
	if _, err := c.Exec(context.Background(), "SELECT 1"); err != nil {
		t.Fatal(err)
	}
}

// As in PostgreSQL, a startup parameter overrides the same setting in
// options (lib/pq sends client_encoding=UTF8 beside the user's options).
func TestStartupParameterOverridesOptions(t *testing.T) {
	h := startProxy(t, harnessOpts{projects: []string{"p1"}})
	ctx := context.Background()
	u := h.url("p1", "authenticated", token(t, "p1", "authenticated", "opts", nil))
	cfg, err := pgx.ParseConfig(u)
	if err != nil {
		t.Fatal(err)
	}
	cfg.RuntimeParams["options"] = "-c client_encoding=SQL_ASCII -c search_path=pg_catalog"
	cfg.RuntimeParams["client_encoding"] = "UTF8"
	cfg.RuntimeParams["search_path"] = "public"
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer c.Close(ctx)
	var enc, sp string
	if err := c.QueryRow(ctx, "SELECT current_setting('client_encoding'), current_setting('search_path')").Scan(&enc, &sp); err != nil {
		t.Fatal(err)
	}
	if enc != "UTF8" || sp != "public" {
		t.Fatalf("client_encoding %q, search_path %q; want UTF8, public", enc, sp)
	}
	// Without a parameter of its own, options' encoding is the client's.
	delete(cfg.RuntimeParams, "client_encoding")
	if _, err := pgx.ConnectConfig(ctx, cfg); sqlstate(err) != "22023" {
		t.Fatalf("options' client_encoding=SQL_ASCII: %v, want 22023", err)
	}
}
