package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
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
	"cascata/internal/pgcluster"
	"cascata/internal/pgtest"

	"github.com/jackc/pgx/v5"
)

const (
	appLoginPassword = "authenticator-pw"
	appSecret        = "app-test-secret-0123456789-abcdef-0123456789"
	appAdminToken    = "app-admin-token"
)

// runningApp is a cascata process (app) serving in the test.
type runningApp struct {
	a         *app
	proxyAddr string
	adminURL  string
	stop      func()
}

func startApp(t *testing.T, cfgPath string) *runningApp {
	t.Helper()
	cfg, err := config.Load(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	a, err := newApp(cfgPath, cfg, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan [2]string, 1)
	done := make(chan error, 1)
	go func() {
		done <- a.serve(ctx, nil, func(p, adm string) { ready <- [2]string{p, adm} })
	}()
	var addrs [2]string
	select {
	case addrs = <-ready:
	case err := <-done:
		cancel()
		t.Fatalf("serve: %v", err)
	}
	r := &runningApp{a: a, proxyAddr: addrs[0], adminURL: "http://" + addrs[1]}
	stopped := false
	r.stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
		sctx, scancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer scancel()
		if err := a.plane.close(sctx); err != nil {
			t.Errorf("close plane: %v", err)
		}
	}
	t.Cleanup(r.stop)
	return r
}

func (r *runningApp) admin(t *testing.T, method, path string, body any, want int, out any) {
	t.Helper()
	var rd *bytes.Reader
	if body != nil {
		data, _ := json.Marshal(body)
		rd = bytes.NewReader(data)
	} else {
		rd = bytes.NewReader(nil)
	}
	req, _ := http.NewRequestWithContext(t.Context(), method, r.adminURL+path, rd)
	req.Header.Set("Authorization", "Bearer "+appAdminToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var buf bytes.Buffer
	_, _ = buf.ReadFrom(resp.Body)
	if resp.StatusCode != want {
		t.Fatalf("%s %s: %d, want %d: %s", method, path, resp.StatusCode, want, buf.String())
	}
	if out != nil {
		if err := json.Unmarshal(buf.Bytes(), out); err != nil {
			t.Fatal(err)
		}
	}
}

// client connects to ref through the proxy as authenticated.
func (r *runningApp) client(t *testing.T, ref string) *pgx.Conn {
	t.Helper()
	tok, err := auth.Mint(auth.MintKey{Secret: []byte(appSecret)}, map[string]any{"role": "authenticated", "ref": ref}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	host, port, _ := net.SplitHostPort(r.proxyAddr)
	return pgtest.Connect(t, fmt.Sprintf("postgres://authenticated:%s@%s:%s/%s?sslmode=disable&default_query_exec_mode=simple_protocol", url.QueryEscape(tok), host, port, ref))
}

// database is the database a client of ref lands on through the proxy.
func (r *runningApp) database(t *testing.T, ref string) string {
	t.Helper()
	c := r.client(t, ref)
	var db string
	if err := c.QueryRow(t.Context(), "SELECT current_database() || ':' || (SELECT count(*) FROM items)").Scan(&db); err != nil {
		t.Fatal(err)
	}
	return db
}

// TestAdminPlaneSurvivesRestart drives a real app through the admin plane
// and the ops CLI, restarts it from the same state directory and checks
// that run-time changes and the ejection are still in force.
func TestAdminPlaneSurvivesRestart(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cl := startClusters(t, ctx, 1)[0]
	for _, db := range []string{"app_a", "app_b", "app_a_target"} {
		if err := pgcluster.SetupProject(ctx, cl.Primary, pgcluster.ProjectSpec{Database: db, LoginPassword: appLoginPassword}); err != nil {
			t.Fatal(err)
		}
		if db != "app_a_target" {
			pgtest.Exec(t, cl.Primary.SuperuserURL(db), `CREATE TABLE items (id bigserial PRIMARY KEY, v text);
				GRANT SELECT ON items TO authenticated; INSERT INTO items (v) VALUES ('one'), ('two');`)
		}
	}
	t.Setenv("CASCATA_TEST_ADMIN_TOKEN", appAdminToken)
	t.Setenv("CASCATA_ADMIN_TOKEN", appAdminToken)
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "cascata.toml")
	cfgText := fmt.Sprintf(`
[proxy]
listen = "127.0.0.1:0"
shutdown_timeout = "5s"

[admin]
listen = "127.0.0.1:0"
token_env = "CASCATA_TEST_ADMIN_TOKEN"

[state]
dir = %q

[[projects]]
ref = "app_a"
database_url = %q
owner_url = %q
jwt_secret = %q
`, filepath.Join(dir, "state"), cl.Primary.URL("authenticator", appLoginPassword, "app_a"), cl.Primary.SuperuserURL("app_a"), appSecret)
	if err := os.WriteFile(cfgPath, []byte(cfgText), 0o600); err != nil {
		t.Fatal(err)
	}

	r1 := startApp(t, cfgPath)
	if db := r1.database(t, "app_a"); db != "app_a:2" {
		t.Fatalf("before: %s", db)
	}
	checkPinnedCounted(t, r1)
	r1.admin(t, "POST", "/v1/projects", admin.ProjectRequest{Ref: "app_b", DatabaseURL: cl.Primary.URL("authenticator", appLoginPassword, "app_b"), JWTSecret: appSecret}, http.StatusCreated, nil)
	if db := r1.database(t, "app_b"); db != "app_b:2" {
		t.Fatalf("run-time project: %s", db)
	}

	// The ops CLI: pause, resume, eject -wait, jobs.
	var out, errOut bytes.Buffer
	if err := cmdPause([]string{"-admin", r1.adminURL, "-project", "app_a"}, &out, &errOut); err != nil || !strings.Contains(out.String(), `"paused": true`) {
		t.Fatalf("cascata pause: %v %s %s", err, out.String(), errOut.String())
	}
	if err := cmdPause([]string{"-admin", r1.adminURL, "-project", "app_a"}, &out, &errOut); err == nil || !strings.Contains(err.Error(), "409") {
		t.Fatalf("second pause: %v", err)
	}
	out.Reset()
	if err := cmdResume([]string{"-admin", r1.adminURL, "-project", "app_a"}, &out, &errOut); err != nil || !strings.Contains(out.String(), `"paused": false`) {
		t.Fatalf("cascata resume: %v %s", err, out.String())
	}
	out.Reset()
	err := cmdEject([]string{"-admin", r1.adminURL, "-project", "app_a", "-method", "dump", "-wait",
		"-target-url", cl.Primary.URL("authenticator", appLoginPassword, "app_a_target"),
		"-target-owner-url", cl.Primary.SuperuserURL("app_a_target")}, &out, &errOut)
	if err != nil {
		t.Fatalf("cascata eject: %v\n%s", err, out.String())
	}
	id := strings.Fields(out.String())[2] // "ejection job ID started"
	out.Reset()
	if err := cmdJobs([]string{"-admin", r1.adminURL, id}, &out, &errOut); err != nil || !strings.Contains(out.String(), `"state": "succeeded"`) {
		t.Fatalf("cascata jobs: %v %s", err, out.String())
	}
	if db := r1.database(t, "app_a"); db != "app_a_target:2" {
		t.Fatalf("after ejection: %s", db)
	}
	r1.stop()

	// A new process from the same file and state directory.
	r2 := startApp(t, cfgPath)
	if db := r2.database(t, "app_a"); db != "app_a_target:2" {
		t.Fatalf("after restart app_a serves from %s", db)
	}
	if db := r2.database(t, "app_b"); db != "app_b:2" {
		t.Fatalf("after restart app_b: %s", db)
	}
	var view admin.ProjectView
	r2.admin(t, "GET", "/v1/projects/app_a", nil, http.StatusOK, &view)
	if view.Source != "runtime" || view.ChangedBy != "eject" || !strings.Contains(view.DatabaseURL, "/app_a_target") {
		t.Fatalf("app_a after restart: %+v", view)
	}
	var st struct {
		State string `json:"state"`
	}
	r2.admin(t, "GET", "/v1/jobs/"+id, nil, http.StatusOK, &st)
	if st.State != "succeeded" {
		t.Fatalf("job after restart: %+v", st)
	}

	// SIGHUP reload goes through the catalog: a file edit of another key keeps
	// the ejection only if the file did not change app_a.
	if err := r2.a.plane.reloadFile(r2.a.cfg); err != nil {
		t.Fatal(err)
	}
	if db := r2.database(t, "app_a"); db != "app_a_target:2" {
		t.Fatalf("after reload: %s", db)
	}
}

// checkPinnedCounted: a client keeping a temporary table in transaction
// mode is counted in GET /v1/pools and /metrics until it leaves.
func checkPinnedCounted(t *testing.T, r *runningApp) {
	t.Helper()
	c := r.client(t, "app_a")
	if _, err := c.Exec(t.Context(), "CREATE TEMP TABLE kept (x int)"); err != nil {
		t.Fatal(err)
	}
	pinned := func() (admin.PinStat, string) {
		var pools admin.PoolList
		r.admin(t, "GET", "/v1/pools", nil, http.StatusOK, &pools)
		var ps admin.PinStat
		for _, p := range pools.Pinned {
			if p.Project == "app_a" {
				ps = p
			}
		}
		status, metrics := r.do(t, "GET", "/metrics", nil, nil)
		if status != http.StatusOK {
			t.Fatalf("/metrics: %d", status)
		}
		return ps, string(metrics)
	}
	ps, metrics := pinned()
	if ps != (admin.PinStat{Project: "app_a", Pinned: 1, MaxPinned: 5}) {
		t.Fatalf("GET /v1/pools pinned: %+v", ps)
	}
	if !strings.Contains(metrics, `cascata_pinned_clients{project="app_a"} 1`) {
		t.Fatalf("/metrics has no pinned client:\n%s", metrics)
	}
	if err := c.Close(t.Context()); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		ps, metrics = pinned()
		if ps.Pinned == 0 && strings.Contains(metrics, `cascata_pinned_clients{project="app_a"} 0`) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the client left, still pinned: %+v", ps)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
