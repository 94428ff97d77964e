package proxy_test

import (
	"context"
	"testing"
	"time"

	"cascata/internal/pgtest"
	"cascata/proxy"
)

// TestBackendTLS: with sslmode=verify-full in database_url the proxy's
// backend connections are TLS (pgconn dials them), checked in pg_stat_ssl.
func TestBackendTLS(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	cert, caPath := pgtest.TestCA(t, dir)
	certPEM, keyPEM := pgtest.CertPEM(t, cert)
	if err := cluster.Primary.EnableTLS(ctx, certPEM, keyPEM); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := cluster.Primary.DisableTLS(context.Background()); err != nil {
			t.Error(err)
		}
	})
	super := superConn(t)

	h := startProxy(t, harnessOpts{poolSize: 1, projects: []string{"p1"}})
	u := cluster.Primary.URL("authenticator", loginPassword, "p1")
	u = u[:len(u)-len("sslmode=disable")] + "sslmode=verify-full&sslrootcert=" + caPath
	if err := h.srv.SetProjects([]proxy.ProjectConfig{{Ref: "p1", DatabaseURL: u, PoolSize: 1}}); err != nil {
		t.Fatal(err)
	}
	c := h.connect("p1", "authenticated", "tls-backend")
	var pid int
	var user string
	if err := c.QueryRow(ctx, "SELECT pg_backend_pid(), current_user").Scan(&pid, &user); err != nil {
		t.Fatal(err)
	}
	var ssl bool
	if err := super.QueryRow(ctx, "SELECT ssl FROM pg_stat_ssl WHERE pid = $1", pid).Scan(&ssl); err != nil {
		t.Fatal(err)
	}
	if !ssl || user != "authenticated" {
		t.Fatalf("backend ssl=%v user=%s, want a TLS backend running as authenticated", ssl, user)
	}
	// A TLS backend the server ends while it sits idle in the pool never
	// reaches a client: the next transactions run on a new one.
	var ok bool
	if err := super.QueryRow(ctx, "SELECT pg_terminate_backend($1)", pid).Scan(&ok); err != nil || !ok {
		t.Fatalf("pg_terminate_backend(%d): %v %v", pid, ok, err)
	}
	waitFor(t, "the backend to exit", 5*time.Second, func() bool { return backendState(t, pid) == "gone" })
	for i := range 3 {
		var pid2 int
		if err := c.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid2); err != nil {
			t.Fatalf("statement %d after the idle TLS backend was terminated: %v", i, err)
		}
		if pid2 == pid {
			t.Fatalf("statement %d ran on the terminated backend %d", i, pid)
		}
	}
}
