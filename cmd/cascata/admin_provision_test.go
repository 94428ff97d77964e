package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"cascata/admin"
	"cascata/auth"
	"cascata/internal/config"
	"cascata/internal/pgtest"

	"github.com/jackc/pgx/v5"
)

// TestProvisionThroughAdminPlane creates a project with POST /v1/projects
// and no database_url on a real cluster: the answer carries a generated
// JWT secret once, a token signed with it connects through the proxy to
// the new database as the claimed role, and cascata.claims() is installed.
// A second POST, a bad ref and an app without [provision] are refused.
func TestProvisionThroughAdminPlane(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cl := startClusters(t, ctx, 1)[0]
	super := cl.Primary.SuperuserURL("postgres")

	t.Setenv("CASCATA_TEST_ADMIN_TOKEN", appAdminToken)
	t.Setenv("CASCATA_TEST_LOGIN_PW", appLoginPassword)
	dir := t.TempDir()
	storageRoot := filepath.Join(dir, "storage")
	write := func(name, provision string) string {
		p := filepath.Join(dir, name+".toml")
		text := testConfig(filepath.Join(dir, name+"-state"), "", provision)
		if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	app := startApp(t, write("prov", provisionTable(super, storageRoot)))

	// Provision "fresh".
	code, body := app.do(t, "POST", "/v1/projects", nil, []byte(`{"ref": "fresh"}`))
	if code != http.StatusCreated {
		t.Fatalf("POST fresh: %d %s", code, body)
	}
	var created admin.CreatedProject
	if err := json.Unmarshal(body, &created); err != nil {
		t.Fatal(err)
	}
	dbURL, _ := url.Parse(created.DatabaseURL)
	ownerURL, _ := url.Parse(created.OwnerURL)
	if len(created.JWTSecret) < 40 || created.Ref != "fresh" || created.Source != "runtime" ||
		dbURL == nil || dbURL.User.Username() != "authenticator" || dbURL.Path != "/fresh" ||
		strings.Contains(string(body), appLoginPassword) || ownerURL == nil || ownerURL.User.Username() != "postgres" || ownerURL.Path != "/fresh" ||
		created.StorageDir != filepath.Join(storageRoot, "fresh") || fmt.Sprint(created.JWTKeys) != "[jwt_secret]" {
		t.Fatalf("created: %s", body)
	}
	if fi, err := os.Stat(created.StorageDir); err != nil || !fi.IsDir() {
		t.Fatalf("storage dir: %v", err)
	}
	// The secret is shown once.
	if code, body := app.do(t, "GET", "/v1/projects/fresh", nil, nil); code != http.StatusOK || strings.Contains(string(body), created.JWTSecret) {
		t.Fatalf("GET fresh: %d %s", code, body)
	}

	tok, err := auth.Mint(auth.MintKey{Secret: []byte(created.JWTSecret)}, map[string]any{"role": "authenticated", "ref": "fresh"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	host, port, _ := net.SplitHostPort(app.proxyAddr)
	c, err := pgx.Connect(ctx, fmt.Sprintf("postgres://authenticated:%s@%s:%s/fresh?sslmode=disable&default_query_exec_mode=simple_protocol",
		url.QueryEscape(tok), host, port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	var user, db, ref string
	if err := c.QueryRow(ctx, "SELECT current_user, current_database(), cascata.claims()->>'ref'").Scan(&user, &db, &ref); err != nil {
		t.Fatal(err)
	}
	if user != "authenticated" || db != "fresh" || ref != "fresh" {
		t.Fatalf("through the proxy: user %s, database %s, claims ref %s", user, db, ref)
	}
	// The roles and grants on the server.
	if got := pgtest.QueryValue(t, super, `SELECT string_agg(rolname || ':' || rolcanlogin || ':' || rolinherit, ',' ORDER BY rolname) FROM pg_roles
		WHERE rolname IN ('authenticator', 'anon', 'authenticated', 'service_role')`); got != "anon:false:true,authenticated:false:true,authenticator:true:false,service_role:false:true" {
		t.Fatalf("roles: %s", got)
	}
	if got := pgtest.QueryValue(t, cl.Primary.SuperuserURL("fresh"), `SELECT has_schema_privilege('anon', 'public', 'USAGE') AND NOT has_schema_privilege('anon', 'public', 'CREATE')`); got != "t" {
		t.Fatalf("schema public privileges: %s", got)
	}

	// Refused: the same ref (in the catalog), a ref whose database exists,
	// a bad ref, owner_url without database_url. Nothing is created.
	if code, body := app.do(t, "POST", "/v1/projects", nil, []byte(`{"ref": "fresh"}`)); code != http.StatusConflict {
		t.Fatalf("POST fresh again: %d %s", code, body)
	}
	pgtest.Exec(t, super, `CREATE DATABASE taken`)
	if code, body := app.do(t, "POST", "/v1/projects", nil, []byte(`{"ref": "taken"}`)); code != http.StatusConflict || !strings.Contains(string(body), "already") {
		t.Fatalf("POST taken: %d %s", code, body)
	}
	if _, err := os.Stat(filepath.Join(storageRoot, "taken")); !os.IsNotExist(err) {
		t.Fatalf("storage dir of the refused project: %v", err)
	}
	for _, bad := range []string{`{"ref": "Bad-Ref"}`, `{"ref": ""}`, `{"ref": "x", "owner_url": "postgres://a@h/x"}`, `{"ref": "x", "pool_mode": "nope"}`} {
		if code, body := app.do(t, "POST", "/v1/projects", nil, []byte(bad)); code != http.StatusBadRequest {
			t.Fatalf("POST %s: %d %s", bad, code, body)
		}
	}
	if n := pgtest.QueryValue(t, super, `SELECT count(*) FROM pg_database WHERE datname NOT IN ('postgres', 'template0', 'template1', 'fresh', 'taken')`); n != "0" {
		t.Fatalf("%s stray databases", n)
	}

	// With a JWT secret and roles of its own: no secret in the answer.
	code, body = app.do(t, "POST", "/v1/projects", nil, []byte(`{"ref": "custom", "jwt_secret": "`+appSecret+`", "roles": ["web_anon", "web_user"]}`))
	if code != http.StatusCreated || strings.Contains(string(body), `"jwt_secret":`) {
		t.Fatalf("POST custom: %d %s", code, body)
	}
	if got := pgtest.QueryValue(t, super, `SELECT count(*) FROM pg_auth_members a JOIN pg_roles r ON r.oid = a.roleid JOIN pg_roles m ON m.oid = a.member
		WHERE r.rolname IN ('web_anon', 'web_user') AND m.rolname = 'authenticator'`); got != "2" {
		t.Fatalf("memberships of the custom roles: %s", got)
	}

	// The rollback: Drop removes what Provision created.
	pv := newProvisioner(app.a.plane)
	p, err := pv.Provision(ctx, config.Project{Ref: "rolled", JWTSecret: appSecret})
	if err != nil {
		t.Fatal(err)
	}
	if err := pv.Drop(ctx, p); err != nil {
		t.Fatal(err)
	}
	if n := pgtest.QueryValue(t, super, `SELECT count(*) FROM pg_database WHERE datname = 'rolled'`); n != "0" {
		t.Fatal("the dropped database is still there")
	}
	if _, err := os.Stat(p.StorageDir); !os.IsNotExist(err) {
		t.Fatalf("storage dir after Drop: %v", err)
	}

	// [provision].login_per_project: a login role of each project's own,
	// which alone may connect to its database and sees no other project's
	// sessions (what a client escaping its JWT role would reach).
	lpv := newProvisioner(app.a.plane)
	lpv.prov.LoginPerProject = true
	pa, err := lpv.Provision(ctx, config.Project{Ref: "lone_a", JWTSecret: appSecret})
	if err != nil {
		t.Fatal(err)
	}
	pb, err := lpv.Provision(ctx, config.Project{Ref: "lone_b", JWTSecret: appSecret})
	if err != nil {
		t.Fatal(err)
	}
	ua, _ := url.Parse(pa.DatabaseURL)
	pwA, _ := ua.User.Password()
	if ua.User.Username() != "authenticator_lone_a" || len(pwA) < 32 || pwA == appLoginPassword {
		t.Fatalf("per-project login URL: user %s, password of %d bytes", ua.User.Username(), len(pwA))
	}
	connA := pgtest.Connect(t, pa.DatabaseURL)
	for name, u := range map[string]string{
		"lone_b's login role":   strings.Replace(pb.DatabaseURL, "/lone_b", "/lone_a", 1),
		"the shared login role": cl.Primary.URL("authenticator", appLoginPassword, "lone_a"),
	} {
		if c, err := pgx.Connect(ctx, u); err == nil {
			c.Close(ctx)
			t.Fatalf("%s connected to lone_a", name)
		} else if !strings.Contains(err.Error(), "42501") {
			t.Fatalf("%s connecting to lone_a: %v", name, err)
		}
	}
	connB := pgtest.Connect(t, pb.DatabaseURL)
	sleeping := make(chan error, 1)
	go func() {
		_, err := connB.Exec(ctx, "SELECT pg_sleep(3) /* secret of lone_b */")
		sleeping <- err
	}()
	deadline := time.Now().Add(3 * time.Second)
	for pgtest.QueryValue(t, super, `SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%secret of lone_b%' AND pid <> pg_backend_pid()`) != "1" {
		if time.Now().After(deadline) {
			t.Fatal("lone_b's query never showed in pg_stat_activity")
		}
		time.Sleep(20 * time.Millisecond)
	}
	var seen int
	if err := connA.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%secret of lone_b%' AND pid <> pg_backend_pid()`).Scan(&seen); err != nil || seen != 0 {
		t.Fatalf("lone_a's login role sees lone_b's query: %d %v", seen, err)
	}
	if err := <-sleeping; err != nil {
		t.Fatal(err)
	}
	for _, p := range []config.Project{pa, pb} {
		if err := lpv.Drop(ctx, p); err != nil {
			t.Fatal(err)
		}
	}

	// With [provision].storage_url the project's files go to <that>/<ref>.
	t.Setenv("CASCATA_TEST_S3_KEY", "k")
	t.Setenv("CASCATA_TEST_S3_SECRET", "s")
	s3pv := newProvisioner(app.a.plane)
	s3pv.prov.StorageURL, s3pv.prov.S3Endpoint = "s3://files/projects", "http://127.0.0.1:9"
	s3pv.prov.S3AccessKeyEnv, s3pv.prov.S3SecretKeyEnv = "CASCATA_TEST_S3_KEY", "CASCATA_TEST_S3_SECRET"
	p, err = s3pv.Provision(ctx, config.Project{Ref: "in_s3", JWTSecret: appSecret})
	if err != nil {
		t.Fatal(err)
	}
	if p.StorageURL != "s3://files/projects/in_s3" || p.StorageDir != "" || p.S3Endpoint != "http://127.0.0.1:9" || p.S3SecretKeyEnv != "CASCATA_TEST_S3_SECRET" {
		t.Fatalf("provisioned with [provision].storage_url: %+v", p)
	}
	if _, err := os.Stat(filepath.Join(storageRoot, "in_s3")); !os.IsNotExist(err) {
		t.Fatalf("a local storage dir was created: %v", err)
	}
	if err := s3pv.Drop(ctx, p); err != nil {
		t.Fatal(err)
	}

	// An app without [provision]: 409 naming [provision].
	bare := startApp(t, write("bare", ""))
	if code, body := bare.do(t, "POST", "/v1/projects", nil, []byte(`{"ref": "fresh"}`)); code != http.StatusConflict || !strings.Contains(string(body), "[provision].owner_url") {
		t.Fatalf("POST without [provision]: %d %s", code, body)
	}
}
