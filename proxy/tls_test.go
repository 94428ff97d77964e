package proxy_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"cascata/internal/pgcluster"
	"cascata/internal/pgtest"
	"cascata/proxy"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

// tlsPsql finds psql next to the server binaries or on PATH.
func tlsPsql(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if b, err := pgcluster.FindBinaries(ctx); err == nil && b.Dir != "" {
		if p := filepath.Join(b.Dir, "psql"); func() bool { st, err := os.Stat(p); return err == nil && !st.IsDir() }() {
			return p
		}
	}
	p, err := exec.LookPath("psql")
	if err != nil {
		t.Fatalf("psql not found (Debian package postgresql-client): %v", err)
	}
	return p
}

// TestTLSClientLogin: with TLS configured and cleartext refused everywhere,
// psql and pgx log in with sslmode=verify-full against the test CA, and a
// connection without TLS is refused (28000, saying to use TLS) before the
// JWT is asked for.
func TestTLSClientLogin(t *testing.T) {
	dir := t.TempDir()
	cert, caPath := pgtest.TestCA(t, dir)
	h := startProxy(t, harnessOpts{poolSize: 2, projects: []string{"p1"}, opts: proxy.Options{
		TLS:       &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
		Cleartext: "never",
	}})
	_, port, _ := net.SplitHostPort(h.addr)
	tok := token(t, "p1", "anon", "tls-user", nil)
	ctx := context.Background()

	// psql, the real binary, sslmode=verify-full, for the IP and the DNS name.
	psql := tlsPsql(t)
	runPsql := func(conninfo string) (string, error) {
		cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		cmd := exec.CommandContext(cctx, psql, conninfo, "-X", "-At", "-v", "ON_ERROR_STOP=1",
			"-c", "select current_user, current_setting('request.jwt.claims')::jsonb->>'sub'")
		for _, kv := range os.Environ() {
			if !strings.HasPrefix(kv, "PG") {
				cmd.Env = append(cmd.Env, kv)
			}
		}
		cmd.Env = append(cmd.Env, "PGPASSWORD="+tok, "PSQLRC=/dev/null")
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	for _, hostname := range []string{"127.0.0.1", "localhost"} {
		out, err := runPsql(fmt.Sprintf("host=%s port=%s sslmode=verify-full sslrootcert=%s dbname=p1 user=anon connect_timeout=10", hostname, port, caPath))
		if err != nil || out != "anon|tls-user\n" {
			t.Errorf("psql verify-full to %s: %v\n%s", hostname, err, out)
		}
	}
	out, err := runPsql(fmt.Sprintf("host=127.0.0.1 port=%s sslmode=disable dbname=p1 user=anon connect_timeout=10", port))
	if err == nil || !strings.Contains(out, "TLS") {
		t.Errorf("psql sslmode=disable: %v, want a refusal that mentions TLS:\n%s", err, out)
	}

	// pgx, verify-full and require.
	pgxURL := func(hostname, mode string) string {
		return fmt.Sprintf("postgres://anon:%s@%s/p1?sslmode=%s&sslrootcert=%s&connect_timeout=10",
			url.QueryEscape(tok), net.JoinHostPort(hostname, port), mode, url.QueryEscape(caPath))
	}
	for _, c := range []struct{ host, mode string }{{"127.0.0.1", "verify-full"}, {"localhost", "verify-full"}, {"127.0.0.1", "require"}} {
		conn, err := pgx.Connect(ctx, pgxURL(c.host, c.mode))
		if err != nil {
			t.Errorf("pgx sslmode=%s to %s: %v", c.mode, c.host, err)
			continue
		}
		tc, ok := conn.PgConn().Conn().(*tls.Conn)
		if !ok {
			t.Errorf("pgx sslmode=%s to %s: connection is %T, not TLS", c.mode, c.host, conn.PgConn().Conn())
		} else if v := tc.ConnectionState().Version; v < tls.VersionTLS12 {
			t.Errorf("pgx sslmode=%s: TLS version %x", c.mode, v)
		}
		var user, sub string
		if err := conn.QueryRow(ctx, "SELECT current_user, current_setting('request.jwt.claims')::jsonb->>'sub'").Scan(&user, &sub); err != nil || user != "anon" || sub != "tls-user" {
			t.Errorf("pgx sslmode=%s: %q %q %v", c.mode, user, sub, err)
		}
		conn.Close(ctx)
	}

	// verify-full against a CA that did not sign the certificate fails in the client.
	otherDir := t.TempDir()
	_, otherCA := pgtest.TestCA(t, otherDir)
	if conn, err := pgx.Connect(ctx, strings.Replace(pgxURL("127.0.0.1", "verify-full"), url.QueryEscape(caPath), url.QueryEscape(otherCA), 1)); err == nil {
		conn.Close(ctx)
		t.Errorf("pgx verify-full with the wrong CA connected")
	}

	// Without TLS: refused with 28000 and a message that says to use TLS.
	_, err = pgx.Connect(ctx, pgxURL("127.0.0.1", "disable"))
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "28000" || pe.Severity != "FATAL" {
		t.Fatalf("pgx sslmode=disable: %v, want FATAL 28000", err)
	}
	if !strings.Contains(pe.Message, "TLS") {
		t.Errorf("pgx sslmode=disable: message %q (hint %q) does not say to use TLS", pe.Message, pe.Hint)
	}

	// The JWT never travels in clear: the refusal comes before the password request.
	nc, err := net.DialTimeout("tcp", h.addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	_ = nc.SetDeadline(time.Now().Add(5 * time.Second))
	fe := pgproto3.NewFrontend(nc, nc)
	fe.Send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersionNumber, Parameters: map[string]string{"user": "anon", "database": "p1"}})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	m, err := fe.Receive()
	if err != nil {
		t.Fatal(err)
	}
	if e, ok := m.(*pgproto3.ErrorResponse); !ok || e.Code != "28000" {
		t.Errorf("plaintext startup: first reply %T %+v, want ErrorResponse 28000 before any password request", m, m)
	}
}
