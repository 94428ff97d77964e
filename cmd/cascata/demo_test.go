package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"cascata/internal/config"

	"github.com/BurntSushi/toml"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

const shippedConfig = "../../cascata.toml"

// TestShippedConfig checks that the repository's cascata.toml is valid
// once its secrets are in the environment, and names the documented env vars.
func TestShippedConfig(t *testing.T) {
	t.Setenv("DEMO_JWT_SECRET", "0123456789abcdef0123456789abcdef")
	t.Setenv("CASCATA_ADMIN_TOKEN", "token")
	cfg, err := config.Load(shippedConfig)
	if err != nil {
		t.Fatalf("shipped config: %v", err)
	}
	p := cfg.ProjectByRef("demo")
	if p == nil {
		t.Fatal("shipped config has no project demo")
	}
	if p.JWTSecretEnv != "DEMO_JWT_SECRET" || cfg.Admin.TokenEnv != "CASCATA_ADMIN_TOKEN" {
		t.Errorf("jwt_secret_env = %q, token_env = %q", p.JWTSecretEnv, cfg.Admin.TokenEnv)
	}
	var out, errOut bytes.Buffer
	if code := run([]string{"check", "-config", shippedConfig}, &out, &errOut); code != 0 {
		t.Errorf("cascata check: exit %d: %s%s", code, out.String(), errOut.String())
	}
}

// TestShippedConfigHasEveryKey: the shipped cascata.toml documents every
// key config.Config knows, so a new key cannot go undocumented.
func TestShippedConfigHasEveryKey(t *testing.T) {
	var raw map[string]any
	md, err := toml.DecodeFile(shippedConfig, &raw)
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, k := range md.Keys() {
		have[k.String()] = true
	}
	var want []string
	var walk func(prefix string, typ reflect.Type)
	walk = func(prefix string, typ reflect.Type) {
		for i := range typ.NumField() {
			f := typ.Field(i)
			name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
			if name == "" || name == "-" {
				continue
			}
			key := prefix + name
			ft := f.Type
			if ft.Kind() == reflect.Slice && ft.Elem().Kind() == reflect.Struct {
				ft = ft.Elem()
			}
			if ft.Kind() == reflect.Struct && ft != reflect.TypeFor[config.Duration]() {
				walk(key+".", ft)
				continue
			}
			want = append(want, key)
		}
	}
	walk("", reflect.TypeFor[config.Config]())
	for _, k := range want {
		if !have[k] {
			t.Errorf("%s does not document key %s (add it with a comment saying its default)", shippedConfig, k)
		}
	}
}

// demoRun is one in-process `cascata demo`.
type demoRun struct {
	ready  demoReady
	stdout *bytes.Buffer
	cancel context.CancelFunc
	errc   chan error
}

func startDemo(t *testing.T, dir string) *demoRun {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	readyc := make(chan demoReady, 1)
	d := &demoRun{stdout: &bytes.Buffer{}, cancel: cancel, errc: make(chan error, 1)}
	o := demoOptions{
		configPath:  shippedConfig,
		dir:         dir,
		listen:      "127.0.0.1:0",
		adminListen: "127.0.0.1:0",
		self:        "cascata",
		ready:       func(r demoReady) { readyc <- r },
	}
	go func() { d.errc <- runDemo(ctx, o, d.stdout) }()
	select {
	case d.ready = <-readyc:
	case err := <-d.errc:
		cancel()
		t.Fatalf("cascata demo failed before it was ready: %v", err)
	case <-time.After(90 * time.Second):
		cancel()
		t.Fatal("cascata demo not ready after 90s")
	}
	t.Cleanup(func() { d.stop(t) })
	return d
}

// stop cancels the demo (as Ctrl-C does) and waits for it to return.
func (d *demoRun) stop(t *testing.T) {
	t.Helper()
	if d.cancel == nil {
		return
	}
	d.cancel()
	d.cancel = nil
	select {
	case err := <-d.errc:
		if err != nil {
			t.Errorf("cascata demo returned: %v", err)
		}
	case <-time.After(90 * time.Second):
		t.Error("cascata demo did not stop within 90s")
	}
}

// connectAs opens a pgx connection through the proxy with a fresh token.
func (d *demoRun) connectAs(t *testing.T, role, sub string) *pgx.Conn {
	t.Helper()
	tok, err := mintToken(d.ready.Project, role, sub, "", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return connectProxy(t, d.ready.ProxyAddr, role, tok)
}

func connectProxy(t *testing.T, addr, role, token string) *pgx.Conn {
	t.Helper()
	url := "postgres://" + role + ":" + token + "@" + addr + "/demo?sslmode=disable&default_query_exec_mode=simple_protocol"
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatalf("connect as %s through the proxy: %v", role, err)
	}
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	return conn
}

func sqlState(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

// postmasterPID reads the pid of a running server from its data directory.
func postmasterPID(t *testing.T, dataDir string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dataDir, "postmaster.pid"))
	if err != nil {
		t.Fatalf("postmaster.pid: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[0]))
	if err != nil {
		t.Fatalf("postmaster.pid: %v", err)
	}
	return pid
}

// postmasterGone waits until process pid no longer runs the postgres of
// dataDir: it is gone, a zombie, or the pid was reused by another program.
// (pg_ctl stop returns when postmaster.pid is removed, just before the
// process exits.)
func postmasterGone(pid int, dataDir string, wait time.Duration) bool {
	deadline := time.Now().Add(wait)
	for {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return syscall.Kill(pid, 0) != nil // no procfs: fall back to kill 0
		}
		// The state follows the parenthesised command name.
		state := ""
		if i := bytes.LastIndexByte(stat, ')'); i > 0 && i+2 < len(stat) {
			state = string(stat[i+2])
		}
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if state == "Z" || state == "X" || !bytes.Contains(cmdline, []byte(dataDir)) {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// demoTempDir returns a directory the postgres OS user can reach when the
// tests run as root (t.TempDir's parents are mode 0700).
func demoTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "cascata-demo-test-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

func TestDemo(t *testing.T) {
	// Empty: the demo generates both and keeps the JWT secret in its dir.
	t.Setenv("DEMO_JWT_SECRET", "")
	t.Setenv("CASCATA_ADMIN_TOKEN", "")
	dir := demoTempDir(t)
	ctx := t.Context()

	d := startDemo(t, dir)
	out := d.stdout.String()
	for _, want := range []string{
		"Cascata demo is ready: proxy " + d.ready.ProxyAddr,
		"psql 'postgres://anon:",
		"psql 'postgres://authenticated:",
		"DATABASE_URL=\"postgres://authenticated:",
		"no ?pgbouncer=true",
		`new DataSource({ type: "postgres", url: "postgres://authenticated:`,
		"postgres://authenticated.demo:",
		"Authorization: Bearer " + d.ready.AdminToken,
		"cascata token -config " + shippedConfig + " -project demo -role authenticated -sub " + demoUserBob,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("demo output lacks %q:\n%s", want, out)
		}
	}
	for _, f := range []string{demoJWTSecretFile, demoPasswordFile, demoAdminFile, demoConfigFile} {
		if fi, err := os.Stat(filepath.Join(dir, f)); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v (mode %v), want a 0600 file", f, err, fi)
		}
	}
	secret, err := os.ReadFile(filepath.Join(dir, demoJWTSecretFile))
	if err != nil || strings.TrimSpace(string(secret)) != os.Getenv("DEMO_JWT_SECRET") {
		t.Errorf("jwt_secret file (%v) does not hold DEMO_JWT_SECRET", err)
	}

	// RLS through the proxy: each user sees their own todos.
	alice := d.connectAs(t, "authenticated", demoUserAlice)
	var owner, who string
	if err := alice.QueryRow(ctx, "INSERT INTO todos (title) VALUES ('buy milk') RETURNING owner, current_user").Scan(&owner, &who); err != nil {
		t.Fatalf("alice inserts: %v", err)
	}
	if owner != demoUserAlice || who != "authenticated" {
		t.Errorf("inserted owner=%q as %q, want %q as authenticated", owner, who, demoUserAlice)
	}
	var n int
	if err := alice.QueryRow(ctx, "SELECT count(*) FROM todos WHERE title = 'buy milk'").Scan(&n); err != nil || n != 1 {
		t.Errorf("alice reads her todo: n=%d err=%v, want 1", n, err)
	}

	// bob's token comes from the printed `cascata token` command.
	var tokOut, tokErr bytes.Buffer
	if code := run([]string{"token", "-config", shippedConfig, "-project", "demo", "-role", "authenticated", "-sub", demoUserBob}, &tokOut, &tokErr); code != 0 {
		t.Fatalf("cascata token: exit %d: %s", code, tokErr.String())
	}
	bob := connectProxy(t, d.ready.ProxyAddr, "authenticated", strings.TrimSpace(tokOut.String()))
	if err := bob.QueryRow(ctx, "SELECT count(*) FROM todos").Scan(&n); err != nil || n != 0 {
		t.Errorf("bob sees %d todos (err %v), want 0", n, err)
	}
	_, err = bob.Exec(ctx, "INSERT INTO todos (owner, title) VALUES ($1, 'forged')", demoUserAlice)
	if sqlState(err) != "42501" {
		t.Errorf("bob inserts a todo for alice: err %v, want SQLSTATE 42501 (RLS)", err)
	}
	if err := bob.QueryRow(ctx, "SELECT count(*) FROM todos").Scan(&n); err != nil || n != 0 {
		t.Errorf("bob after the refused insert: n=%d err=%v, want 0 and a usable session", n, err)
	}

	anon := d.connectAs(t, "anon", "")
	if err := anon.QueryRow(ctx, "SELECT count(*) FROM announcements").Scan(&n); err != nil || n == 0 {
		t.Errorf("anon reads announcements: n=%d err=%v", n, err)
	}
	if _, err := anon.Exec(ctx, "SELECT * FROM todos"); sqlState(err) != "42501" {
		t.Errorf("anon reads todos: err %v, want SQLSTATE 42501", err)
	}

	// The admin plane answers with the generated token.
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+d.ready.AdminAddr+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+d.ready.AdminToken)
	if resp, err := http.DefaultClient.Do(req); err != nil {
		t.Errorf("admin /metrics: %v", err)
	} else {
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("admin /metrics: status %d", resp.StatusCode)
		}
	}

	// Stop as Ctrl-C does: the postgres processes must be gone.
	c := d.ready.Cluster
	pids := []int{postmasterPID(t, c.Primary.DataDir), postmasterPID(t, c.Replica.DataDir)}
	addrs := []string{c.Primary.Addr(), c.Replica.Addr(), d.ready.ProxyAddr}
	dataDirs := []string{c.Primary.DataDir, c.Replica.DataDir}
	for i, pid := range pids {
		if postmasterGone(pid, dataDirs[i], 0) {
			t.Fatalf("postmaster %d of %s not seen while the demo runs", pid, dataDirs[i])
		}
	}
	d.stop(t)
	for i, pid := range pids {
		if !postmasterGone(pid, dataDirs[i], 10*time.Second) {
			t.Errorf("postmaster %d of %s still runs after the demo stopped", pid, dataDirs[i])
		}
	}
	for _, a := range addrs {
		if conn, err := net.DialTimeout("tcp", a, time.Second); err == nil {
			_ = conn.Close()
			t.Errorf("%s still accepts connections after the demo stopped", a)
		}
	}
	if _, err := os.Stat(filepath.Join(c.Primary.DataDir, "PG_VERSION")); err != nil {
		t.Errorf("cluster data was not kept: %v", err)
	}

	// A second run restarts the kept cluster with the same secrets: alice's
	// todo is still there, for a token minted with the same secret.
	d2 := startDemo(t, dir)
	if d2.ready.Cluster.Primary.Addr() != c.Primary.Addr() {
		t.Errorf("restarted primary on %s, want %s", d2.ready.Cluster.Primary.Addr(), c.Primary.Addr())
	}
	alice2 := d2.connectAs(t, "authenticated", demoUserAlice)
	if err := alice2.QueryRow(ctx, "SELECT count(*) FROM todos WHERE title = 'buy milk'").Scan(&n); err != nil || n != 1 {
		t.Errorf("after restart alice reads her todo: n=%d err=%v, want 1", n, err)
	}
	_ = alice2.Close(ctx)
	d2.stop(t)
}
