package proxy_test

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"cascata/proxy"

	"github.com/jackc/pgx/v5/pgconn"
)

// TestBackendTLS: with sslmode=verify-full in database_url the proxy's
// backend connections are TLS (pgconn dials them), checked in pg_stat_ssl.
func TestBackendTLS(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	cert, caPath := tlsTestCA(t, dir)
	keyDER, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	// The server's key must belong to the server's OS user, mode 0600.
	data := cluster.Primary.DataDir
	certFile, keyFile := filepath.Join(data, "cascata_test.crt"), filepath.Join(data, "cascata_test.key")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Fatal(err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		for _, f := range []string{certFile, keyFile} {
			if err := os.Chown(f, uid, gid); err != nil {
				t.Fatal(err)
			}
		}
	}
	super := superConn(t)
	for _, q := range []string{
		"ALTER SYSTEM SET ssl_cert_file = 'cascata_test.crt'",
		"ALTER SYSTEM SET ssl_key_file = 'cascata_test.key'",
		"ALTER SYSTEM SET ssl = on",
		"SELECT pg_reload_conf()",
	} {
		if _, err := super.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, q := range []string{"ALTER SYSTEM RESET ssl", "ALTER SYSTEM RESET ssl_cert_file", "ALTER SYSTEM RESET ssl_key_file", "SELECT pg_reload_conf()"} {
			_, _ = super.Exec(context.Background(), q)
		}
	})
	// The reload is asynchronous: wait until the server takes TLS.
	waitFor(t, "the primary to accept TLS connections", 10*time.Second, func() bool {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		u := cluster.Primary.SuperuserURL("postgres")
		c, err := pgconn.Connect(cctx, u[:len(u)-len("sslmode=disable")]+"sslmode=require")
		if err != nil {
			return false
		}
		_ = c.Close(cctx)
		return true
	})

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
