package proxy_test

import (
	"context"
	"net"
	"testing"
	"time"

	"cascata/auth"
	"cascata/proxy"
	"cascata/router"
)

// TestRoleLogins: a role with its own login is served by backends that log
// in as that role (no SET ROLE into it, member of nothing), in pools of its
// own, while other roles of the project keep the authenticator.
func TestRoleLogins(t *testing.T) {
	ctx := context.Background()
	owner := connectURL(t, cluster.Primary.SuperuserURL("p2"))
	for _, q := range []string{
		`DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'auditor') THEN CREATE ROLE auditor LOGIN NOINHERIT PASSWORD 'auditor-pw'; END IF; END $$`,
		`GRANT SELECT ON items TO auditor`,
	} {
		if _, err := owner.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	ver := auth.NewVerifier()
	if err := ver.SetProject("p2", auth.KeyConfig{Secrets: [][]byte{[]byte(testSecret + "p2")}},
		auth.Policy{Roles: []string{"anon", "authenticated", "auditor"}}); err != nil {
		t.Fatal(err)
	}
	srv, err := proxy.NewServer(proxy.Options{Auth: ver, Classifier: router.NewProjects()})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.SetProjects([]proxy.ProjectConfig{{
		Ref: "p2", DatabaseURL: cluster.Primary.URL("authenticator", loginPassword, "p2"), PoolSize: 2,
		RoleURLs: map[string]string{"auditor": cluster.Primary.URL("auditor", "auditor-pw", "p2")},
	}}); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	defer func() {
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(sctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-served; err != nil {
			t.Errorf("serve: %v", err)
		}
	}()
	h := &harness{t: t, srv: srv, addr: ln.Addr().String(), ver: ver}

	aud := h.connect("p2", "auditor", "a1")
	var sessUser, curUser string
	if err := aud.QueryRow(ctx, "SELECT session_user, current_user").Scan(&sessUser, &curUser); err != nil {
		t.Fatal(err)
	}
	if sessUser != "auditor" || curUser != "auditor" {
		t.Fatalf("auditor's backend: session_user=%s current_user=%s, want auditor/auditor", sessUser, curUser)
	}
	var n int
	if err := aud.QueryRow(ctx, "SELECT count(*) FROM items").Scan(&n); err != nil {
		t.Fatalf("auditor reads items: %v", err)
	}
	if _, err := aud.Exec(ctx, "INSERT INTO items (body) VALUES ('no')"); sqlstate(err) != "42501" {
		t.Fatalf("auditor insert: %v, want 42501", err)
	}
	// Other roles still come through the authenticator.
	other := h.connect("p2", "authenticated", "u1")
	if err := other.QueryRow(ctx, "SELECT session_user, current_user").Scan(&sessUser, &curUser); err != nil {
		t.Fatal(err)
	}
	if sessUser != "authenticator" || curUser != "authenticated" {
		t.Fatalf("authenticated's backend: %s/%s", sessUser, curUser)
	}
	if got := len(srv.PoolStats()); got != 2 {
		t.Fatalf("%d pools, want 2 (one per login)", got)
	}
}
