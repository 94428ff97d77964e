package pgcluster_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"cascata/internal/pgcluster"
	"cascata/internal/pgtest"

	"github.com/jackc/pgx/v5"
)

var cluster *pgcluster.Cluster

func TestMain(m *testing.M) {
	os.Exit(pgtest.Main(m, pgcluster.Options{Replica: true}, &cluster))
}

func TestFindBinaries(t *testing.T) {
	b, err := pgcluster.FindBinaries(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{b.Initdb, b.Postgres, b.PgCtl, b.PgBasebackup} {
		if !filepath.IsAbs(p) {
			t.Errorf("binary path %q is not absolute", p)
		}
	}
	if !strings.Contains(pgcluster.ErrNoBinaries.Error(), "apt-get install -y postgresql") {
		t.Errorf("ErrNoBinaries = %q, want install hint", pgcluster.ErrNoBinaries)
	}
}

func TestURL(t *testing.T) {
	s := &pgcluster.Server{Host: "127.0.0.1", Port: 5433}
	if got, want := s.Addr(), "127.0.0.1:5433"; got != want {
		t.Errorf("Addr() = %q, want %q", got, want)
	}
	if got, want := s.SuperuserURL("app"), "postgres://postgres@127.0.0.1:5433/app?sslmode=disable"; got != want {
		t.Errorf("SuperuserURL = %q, want %q", got, want)
	}
	u := s.URL("us er", "p@ss/w:rd?", "my db")
	cfg, err := pgx.ParseConfig(u)
	if err != nil {
		t.Fatalf("parse %q: %v", u, err)
	}
	if cfg.User != "us er" || cfg.Password != "p@ss/w:rd?" || cfg.Database != "my db" || cfg.Port != 5433 {
		t.Errorf("URL %q parsed to user=%q password=%q db=%q port=%d", u, cfg.User, cfg.Password, cfg.Database, cfg.Port)
	}
}

func TestReplication(t *testing.T) {
	primary := cluster.Primary.SuperuserURL("postgres")
	replica := cluster.Replica.SuperuserURL("postgres")
	pgtest.Exec(t, primary, "DROP TABLE IF EXISTS repl_test") // left by an earlier run (-count)
	pgtest.Exec(t, primary, "CREATE TABLE repl_test (id int PRIMARY KEY, v text)")
	pgtest.Exec(t, primary, "INSERT INTO repl_test VALUES (1, $1)", "hello")
	waitCaughtUp(t)
	if got := pgtest.QueryValue(t, replica, "SELECT v FROM repl_test WHERE id = 1"); got != "hello" {
		t.Errorf("replica value = %q, want hello", got)
	}
	if got := pgtest.QueryValue(t, replica, "SELECT pg_is_in_recovery()"); got != "t" {
		t.Errorf("replica pg_is_in_recovery() = %q, want t", got)
	}
	if got := pgtest.QueryValue(t, primary, "SELECT pg_is_in_recovery()"); got != "f" {
		t.Errorf("primary pg_is_in_recovery() = %q, want f", got)
	}
	if got := pgtest.QueryValue(t, primary, "SHOW max_connections"); got != "200" {
		t.Errorf("max_connections = %q, want 200", got)
	}
}

func TestReplicaRestart(t *testing.T) {
	ctx := t.Context()
	primary := cluster.Primary.SuperuserURL("postgres")
	replica := cluster.Replica.SuperuserURL("postgres")
	port := cluster.Replica.Port
	pgtest.Exec(t, primary, "DROP TABLE IF EXISTS restart_test") // left by an earlier run (-count)
	pgtest.Exec(t, primary, "CREATE TABLE restart_test (id int)")

	if err := cluster.Replica.Stop(ctx, "immediate"); err != nil {
		t.Fatal(err)
	}
	if err := cluster.Replica.Stop(ctx, "fast"); err != nil {
		t.Fatalf("stopping a stopped server: %v", err)
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	if conn, err := pgx.Connect(cctx, replica); err == nil {
		_ = conn.Close(ctx)
		t.Error("connected to a stopped replica")
	}
	cancel()
	pgtest.Exec(t, primary, "INSERT INTO restart_test VALUES (42)")

	if err := cluster.Replica.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if cluster.Replica.Port != port {
		t.Errorf("replica port changed from %d to %d", port, cluster.Replica.Port)
	}
	waitCaughtUp(t)
	if got := pgtest.QueryValue(t, replica, "SELECT id FROM restart_test"); got != "42" {
		t.Errorf("replica value after restart = %q, want 42", got)
	}
	if got := pgtest.QueryValue(t, replica, "SELECT pg_is_in_recovery()"); got != "t" {
		t.Errorf("replica pg_is_in_recovery() after restart = %q, want t", got)
	}
}

func TestSetupProject(t *testing.T) {
	ctx := t.Context()
	spec := pgcluster.ProjectSpec{Database: "app db", LoginPassword: "s3cr'et \"pw\""}
	for i := range 2 {
		if err := pgcluster.SetupProject(ctx, cluster.Primary, spec); err != nil {
			t.Fatalf("SetupProject #%d: %v", i+1, err)
		}
	}
	su := cluster.Primary.SuperuserURL("app db")
	if got := pgtest.QueryValue(t, su, "SELECT rolbypassrls FROM pg_roles WHERE rolname = 'service_role'"); got != "t" {
		t.Errorf("service_role bypassrls = %q, want t", got)
	}
	if got := pgtest.QueryValue(t, su, "SELECT rolinherit::text || rolcanlogin::text FROM pg_roles WHERE rolname = 'authenticator'"); got != "falsetrue" {
		t.Errorf("authenticator inherit/login = %q, want falsetrue", got)
	}
	if got := pgtest.QueryValue(t, su, "SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'authenticator'"); got != "t" {
		t.Errorf("authenticator password is not a SCRAM verifier")
	}
	if got := pgtest.QueryValue(t, su, "SELECT count(*) FROM pg_extension WHERE extname = 'pgcrypto'"); got != "1" {
		t.Errorf("pgcrypto extensions = %q, want 1", got)
	}

	conn := pgtest.Connect(t, cluster.Primary.URL("authenticator", spec.LoginPassword, "app db"))
	var user string
	if err := conn.QueryRow(ctx, "SELECT current_user").Scan(&user); err != nil {
		t.Fatal(err)
	}
	if user != "authenticator" {
		t.Errorf("current_user = %q, want authenticator", user)
	}
	for _, role := range pgcluster.DefaultRoles() {
		if _, err := conn.Exec(ctx, "SET ROLE "+pgx.Identifier{role}.Sanitize()); err != nil {
			t.Fatalf("SET ROLE %s: %v", role, err)
		}
		if err := conn.QueryRow(ctx, "SELECT current_user").Scan(&user); err != nil {
			t.Fatal(err)
		}
		if user != role {
			t.Errorf("current_user after SET ROLE = %q, want %q", user, role)
		}
		if _, err := conn.Exec(ctx, "SELECT has_schema_privilege('public', 'USAGE') AND gen_random_uuid() IS NOT NULL"); err != nil {
			t.Errorf("as %s: %v", role, err)
		}
		if _, err := conn.Exec(ctx, "RESET ROLE"); err != nil {
			t.Fatal(err)
		}
	}

	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	bad, err := pgx.Connect(cctx, cluster.Primary.URL("authenticator", "wrong", "app db"))
	if err == nil {
		_ = bad.Close(ctx)
		t.Fatal("login with a wrong password succeeded")
	}
	if !strings.Contains(err.Error(), "password authentication failed") {
		t.Errorf("wrong password error = %v", err)
	}
}

// TestStartExisting checks the demo flow: a kept Dir is started again on
// its recorded ports with its data, and removed by Stop without KeepDir.
func TestStartExisting(t *testing.T) {
	ctx := t.Context()
	base, err := os.MkdirTemp("", "pgcluster-existing-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(base) })
	if err := os.Chmod(base, 0o755); err != nil { // postgres user must traverse it when root
		t.Fatal(err)
	}
	dir := filepath.Join(base, "demo")

	c1, err := pgcluster.Start(ctx, pgcluster.Options{Dir: dir, KeepDir: true, Logical: true})
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			_ = c1.Stop(context.Background())
		}
	})
	if got := pgtest.QueryValue(t, c1.Primary.SuperuserURL("postgres"), "SHOW wal_level"); got != "logical" {
		t.Errorf("wal_level = %q, want logical", got)
	}
	pgtest.Exec(t, c1.Primary.SuperuserURL("postgres"), "CREATE TABLE kept (v text); INSERT INTO kept VALUES ('still here')")
	if err := c1.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	stopped = true
	if _, err := os.Stat(filepath.Join(dir, "primary", "PG_VERSION")); err != nil {
		t.Fatalf("KeepDir did not keep the data dir: %v", err)
	}

	c2, err := pgcluster.Start(ctx, pgcluster.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c2.Stop(context.Background()) })
	if c2.Primary.Port != c1.Primary.Port {
		t.Errorf("restarted on port %d, want recorded %d", c2.Primary.Port, c1.Primary.Port)
	}
	if got := pgtest.QueryValue(t, c2.Primary.SuperuserURL("postgres"), "SELECT v FROM kept"); got != "still here" {
		t.Errorf("kept value = %q", got)
	}
	if err := c2.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Stop without KeepDir left %s: %v", dir, err)
	}
	if err := c2.Stop(ctx); err != nil {
		t.Errorf("second Stop: %v", err)
	}
}

func waitCaughtUp(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := cluster.WaitReplicaCaughtUp(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestStopWhenGone kills the owner of a cluster (a stand-in process, as a
// test binary killed from outside) and waits for the watchdog to stop the
// server and remove the cluster's temporary directory.
func TestStopWhenGone(t *testing.T) {
	ctx := t.Context()
	c, err := pgcluster.Start(ctx, pgcluster.Options{})
	if err != nil {
		t.Fatal(err)
	}
	// Stopping a cluster the watchdog stopped already does no harm.
	t.Cleanup(func() { _ = c.Stop(context.Background()) })
	owner := exec.Command("sleep", "60")
	if err := owner.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = owner.Process.Kill(); _ = owner.Wait() })
	unwatch, err := c.StopWhenGone(owner.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	defer unwatch()
	url := c.Primary.SuperuserURL("postgres")
	if got := pgtest.QueryValue(t, url, "SELECT 1"); got != "1" {
		t.Fatalf("the cluster did not serve while its owner lived: %q", got)
	}

	_ = owner.Process.Kill()
	_ = owner.Wait() // reaped: its /proc entry is gone
	pgtest.WaitFor(t, 15*time.Second, "the watchdog to stop the server and remove "+c.Dir, func() bool {
		_, statErr := os.Stat(c.Dir)
		conn, err := pgx.Connect(ctx, url)
		if err == nil {
			_ = conn.Close(ctx)
		}
		return err != nil && errors.Is(statErr, os.ErrNotExist)
	})
}

// TestEnableTLS: EnableTLS makes the server take TLS logins (pg_stat_ssl
// says so) beside plain ones, with a key PostgreSQL accepts (its owner's,
// mode 0600); DisableTLS puts it back to plain logins only.
func TestEnableTLS(t *testing.T) {
	ctx := t.Context()
	cert, _ := pgtest.TestCA(t, t.TempDir())
	certPEM, keyPEM := pgtest.CertPEM(t, cert)
	if err := cluster.Primary.EnableTLS(ctx, certPEM, keyPEM); err != nil {
		t.Fatal(err)
	}
	disabled := false
	t.Cleanup(func() {
		if !disabled {
			_ = cluster.Primary.DisableTLS(context.Background())
		}
	})
	plain := cluster.Primary.SuperuserURL("postgres")
	tlsURL := strings.Replace(plain, "sslmode=disable", "sslmode=require", 1)
	sslOf := "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
	if got := pgtest.QueryValue(t, tlsURL, sslOf); got != "t" {
		t.Fatalf("a login with sslmode=require: ssl = %q", got)
	}
	if got := pgtest.QueryValue(t, plain, sslOf); got != "f" {
		t.Fatalf("a plain login: ssl = %q", got)
	}

	if err := cluster.Primary.DisableTLS(ctx); err != nil {
		t.Fatal(err)
	}
	disabled = true
	// The reload is asynchronous: wait until TLS logins are refused.
	pgtest.WaitFor(t, 10*time.Second, "TLS logins to be refused", func() bool {
		c, err := pgx.Connect(ctx, tlsURL)
		if err == nil {
			_ = c.Close(ctx)
			return false
		}
		return true
	})
	if got := pgtest.QueryValue(t, plain, "SELECT 1"); got != "1" {
		t.Fatalf("a plain login after DisableTLS: %q", got)
	}
}
