package admin_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"cascata/admin"
	"cascata/internal/jobs"

	"github.com/jackc/pgx/v5/pgconn"
)

func TestNewRefusesUnsafeOptions(t *testing.T) {
	if _, err := admin.New(admin.Options{}); err == nil {
		t.Error("no token accepted")
	}
	if _, err := admin.New(admin.Options{Token: "x", CORSOrigins: []string{"*"}}); err == nil {
		t.Error("wildcard origin accepted")
	}
}

func TestAuthCORSHealthMetrics(t *testing.T) {
	p := newPlane(t)
	if st, _ := p.do("GET", "/healthz", "", nil); st != http.StatusOK {
		t.Errorf("healthz without token: %d", st)
	}
	for _, path := range []string{"/v1/projects", "/v1/pools", "/readyz", "/metrics", "/v1/jobs/x", "/v1/nope"} {
		for _, tok := range []string{"", "wrong", adminToken + "x"} {
			if st, body := p.do("GET", path, tok, nil); st != http.StatusUnauthorized || !strings.Contains(string(body), `"error"`) {
				t.Errorf("GET %s with token %q: %d %s", path, tok, st, body)
			}
		}
	}
	for _, m := range []string{"POST", "PATCH", "DELETE"} {
		if st, _ := p.do(m, "/v1/projects/adm_a", "", `{}`); st != http.StatusUnauthorized {
			t.Errorf("%s without token: %d", m, st)
		}
	}
	p.call("GET", "/v1/nope", nil, http.StatusNotFound, nil)
	if st, _ := p.do("DELETE", "/v1/instances/x", "", nil); st != http.StatusUnauthorized {
		t.Errorf("DELETE /v1/instances/x without token: %d", st)
	}
	if b := string(p.call("DELETE", "/v1/instances/x", nil, http.StatusNotFound, nil)); !strings.Contains(b, "no fleet") {
		t.Errorf("DELETE /v1/instances/x of an instance alone: %s", b)
	}
	body := string(p.call("GET", "/metrics", nil, http.StatusOK, nil))
	if !strings.Contains(body, "cascata_") {
		t.Errorf("metrics without cascata_ names:\n%.300s", body)
	}

	// CORS: exact origins only.
	req, _ := http.NewRequest("OPTIONS", p.http.URL+"/v1/projects", nil)
	req.Header.Set("Origin", "https://console.example.com")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent || resp.Header.Get("Access-Control-Allow-Origin") != "https://console.example.com" {
		t.Errorf("preflight: %d %v", resp.StatusCode, resp.Header)
	}
	req, _ = http.NewRequest("GET", p.http.URL+"/v1/projects", nil)
	req.Header.Set("Origin", "https://evil.example.com")
	req.Header.Set("Authorization", "Bearer "+adminToken)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden || resp.Header.Get("Access-Control-Allow-Origin") != "" {
		t.Errorf("foreign origin: %d %v", resp.StatusCode, resp.Header)
	}
}

func TestProjectRoutes(t *testing.T) {
	p := newPlane(t)
	var list admin.ProjectList
	data := p.call("GET", "/v1/projects", nil, http.StatusOK, &list)
	if len(list.Projects) != 2 || list.Projects[0].Ref != "adm_a" || list.Projects[0].Source != "file" {
		t.Fatalf("list: %s", data)
	}
	if strings.Contains(string(data), loginPassword) || strings.Contains(string(data), secretPrefix) {
		t.Fatalf("secrets shown: %s", data)
	}
	var one admin.ProjectView
	p.call("GET", "/v1/projects/adm_b", nil, http.StatusOK, &one)
	if one.Ref != "adm_b" || one.PoolSize != 4 || len(one.JWTKeys) != 1 || one.JWTKeys[0] != "jwt_secret" {
		t.Fatalf("project: %+v", one)
	}
	p.call("GET", "/v1/projects/nope", nil, http.StatusNotFound, nil)

	// POST: register a project at run time, then use it through the proxy.
	newURL := cluster.Primary.URL("authenticator", loginPassword, "adm_new")
	req := admin.ProjectRequest{Ref: "adm_new", DatabaseURL: newURL, JWTSecret: secretPrefix + "adm_new", PoolSize: 3}
	var created admin.ProjectView
	data = p.call("POST", "/v1/projects", req, http.StatusCreated, &created)
	if created.Source != "runtime" || created.PoolSize != 3 || created.RoleClaim != "role" || strings.Contains(string(data), loginPassword) {
		t.Fatalf("created: %s", data)
	}
	c := p.connect("adm_new")
	var n int
	if err := c.QueryRow(t.Context(), "SELECT count(*) FROM items").Scan(&n); err != nil || n != 10 {
		t.Fatalf("query new project: %d %v", n, err)
	}
	p.call("POST", "/v1/projects", req, http.StatusConflict, nil)
	p.call("POST", "/v1/projects", `{"ref": "x"`, http.StatusBadRequest, nil)
	p.call("POST", "/v1/projects", `{"ref": "x", "database_url": "postgres://a@h/x", "jwt_secret": "s", "colour": "red"}`, http.StatusBadRequest, nil)
	p.call("POST", "/v1/projects", `{"ref": "x"} {"ref": "y"}`, http.StatusBadRequest, nil)
	p.call("POST", "/v1/projects", admin.ProjectRequest{Ref: "Bad Ref", DatabaseURL: "mysql://x", JWTSecret: "s"}, http.StatusBadRequest, nil)
	p.call("POST", "/v1/projects", admin.ProjectRequest{Ref: "nodb", JWTSecret: "s"}, http.StatusBadRequest, nil)
	if st, _ := p.do("POST", "/v1/projects", adminToken, `{"ref":"`+strings.Repeat("a", 2<<20)+`"}`); st != http.StatusRequestEntityTooLarge {
		t.Errorf("huge body: %d", st)
	}

	// PATCH.
	size := 2
	var patched admin.ProjectView
	p.call("PATCH", "/v1/projects/adm_new", admin.ProjectPatch{PoolSize: &size}, http.StatusOK, &patched)
	if patched.PoolSize != 2 || patched.DatabaseURL == "" {
		t.Fatalf("patched: %+v", patched)
	}
	p.call("PATCH", "/v1/projects/adm_new", `{"pool_size": "many"}`, http.StatusBadRequest, nil)
	p.call("PATCH", "/v1/projects/adm_new", `{"ref": "other"}`, http.StatusBadRequest, nil)
	p.call("PATCH", "/v1/projects/adm_new", `{"pool_mode": "statement"}`, http.StatusBadRequest, nil)
	p.call("PATCH", "/v1/projects/nope", admin.ProjectPatch{PoolSize: &size}, http.StatusNotFound, nil)
	// A file project changed at run time shows so.
	p.call("PATCH", "/v1/projects/adm_b", admin.ProjectPatch{PoolSize: &size}, http.StatusOK, &patched)
	if patched.Source != "runtime" || patched.ChangedBy != "api" {
		t.Fatalf("patched file project: %+v", patched)
	}

	// DELETE: the project stops serving.
	p.call("DELETE", "/v1/projects/adm_new", nil, http.StatusNoContent, nil)
	p.call("DELETE", "/v1/projects/adm_new", nil, http.StatusNotFound, nil)
	p.call("GET", "/v1/projects/adm_new", nil, http.StatusNotFound, nil)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	_, err := pgconn.Connect(ctx, p.clientURL("adm_new"))
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "3D000" {
		t.Fatalf("connect to a deleted project: %v", err)
	}
}

func TestPoolsAndReadiness(t *testing.T) {
	p := newPlane(t)
	c := p.connect("adm_a")
	if _, err := c.Exec(t.Context(), "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	var pools admin.PoolList
	p.call("GET", "/v1/pools", nil, http.StatusOK, &pools)
	found := false
	for _, ps := range pools.Pools {
		found = found || (ps.Project == "adm_a" && ps.Host == cluster.Primary.Addr() && ps.PoolSize == 4 && ps.Acquires > 0)
	}
	if !found {
		t.Fatalf("pools: %+v", pools)
	}
	var view admin.ProjectView
	p.call("GET", "/v1/projects/adm_a", nil, http.StatusOK, &view)
	if len(view.Pools) != 1 {
		t.Fatalf("project pools: %+v", view.Pools)
	}

	var ready admin.Readiness
	p.call("GET", "/readyz", nil, http.StatusOK, &ready)
	if ready.Status != "ready" || ready.Projects != 2 {
		t.Fatalf("ready: %+v", ready)
	}
	// A project whose primary does not answer makes the process unready.
	dead := admin.ProjectRequest{Ref: "adm_dead", DatabaseURL: "postgres://authenticator:pw@127.0.0.1:1/adm_dead?sslmode=disable", JWTSecret: secretPrefix}
	p.call("POST", "/v1/projects", dead, http.StatusCreated, nil)
	status, data := p.do("GET", "/readyz", adminToken, nil)
	ready = admin.Readiness{}
	if err := json.Unmarshal(data, &ready); err != nil || status != http.StatusServiceUnavailable {
		t.Fatalf("readyz: %d %s", status, data)
	}
	if ready.Status != "unready" || len(ready.Failing) != 1 || ready.Failing[0].Project != "adm_dead" {
		t.Fatalf("unready: %+v", ready)
	}
	// A shutdown under way: unready at once, whatever the primaries say.
	p.srv.StopAccepting()
	status, data = p.do("GET", "/readyz", adminToken, nil)
	ready = admin.Readiness{}
	if err := json.Unmarshal(data, &ready); err != nil || status != http.StatusServiceUnavailable || ready.Status != "draining" {
		t.Fatalf("readyz while draining: %d %s", status, data)
	}
}

func TestPauseResume(t *testing.T) {
	p := newPlane(t)
	a, b := p.connect("adm_a"), p.connect("adm_b")
	ctx := t.Context()

	// A transaction running when the pause comes finishes; the pause waits for it.
	tx := p.connect("adm_a")
	if _, err := tx.Exec(ctx, "BEGIN; INSERT INTO items (body) VALUES ('in flight')"); err != nil {
		t.Fatal(err)
	}
	type pauseAnswer struct {
		res admin.PauseResult
		err error
	}
	paused := make(chan pauseAnswer, 1)
	go func() {
		var a pauseAnswer
		a.err = p.post("/v1/projects/adm_a/pause", http.StatusOK, &a.res)
		paused <- a
	}()
	// The project shows paused at once; the pause then waits for the
	// running transaction, so it cannot have answered yet.
	deadline := time.Now().Add(10 * time.Second)
	for {
		var view admin.ProjectView
		p.call("GET", "/v1/projects/adm_a", nil, http.StatusOK, &view)
		if view.Paused {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the project did not show paused within 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case a := <-paused:
		t.Fatalf("pause returned while a transaction ran: %+v %v", a.res, a.err)
	default:
	}
	if _, err := tx.Exec(ctx, "COMMIT"); err != nil {
		t.Fatalf("running transaction could not finish: %v", err)
	}
	if a := <-paused; a.err != nil || !a.res.Paused || !a.res.Drained {
		t.Fatalf("pause: %+v %v", a.res, a.err)
	}
	p.call("POST", "/v1/projects/adm_a/pause", nil, http.StatusConflict, nil)
	p.call("POST", "/v1/projects/nope/pause", nil, http.StatusNotFound, nil)
	var view admin.ProjectView
	p.call("GET", "/v1/projects/adm_a", nil, http.StatusOK, &view)
	if !view.Paused {
		t.Fatal("project not shown paused")
	}

	// adm_a's client waits; adm_b's does not.
	waited := make(chan error, 1)
	start := time.Now()
	go func() {
		_, err := a.Exec(context.Background(), "INSERT INTO items (body) VALUES ('after pause')")
		waited <- err
	}()
	bStart := time.Now()
	for range 20 {
		if _, err := b.Exec(ctx, "INSERT INTO items (body) VALUES ('other project')"); err != nil {
			t.Fatal(err)
		}
	}
	if d := time.Since(bStart); d > 2*time.Second {
		t.Errorf("another project's 20 statements took %s while adm_a was paused", d)
	}
	// Nothing signals a statement held at the gate: watch for 300 ms that it does not run.
	time.Sleep(300 * time.Millisecond)
	select {
	case err := <-waited:
		t.Fatalf("paused project's statement ran: %v", err)
	default:
	}
	var res admin.PauseResult
	p.call("POST", "/v1/projects/adm_a/resume", nil, http.StatusOK, &res)
	if res.Paused {
		t.Fatalf("resume: %+v", res)
	}
	if err := <-waited; err != nil {
		t.Fatalf("waiting client after resume: %v", err)
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Errorf("client did not wait: %s", d)
	}
	p.call("POST", "/v1/projects/adm_a/resume", nil, http.StatusConflict, nil)
	p.call("POST", "/v1/projects/nope/resume", nil, http.StatusNotFound, nil)
}

// post sends an authorized POST and decodes the answer into out. It
// reports instead of failing the test, so any goroutine may call it.
func (p *plane) post(path string, want int, out any) error {
	ctx, cancel := context.WithTimeout(p.t.Context(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "POST", p.http.URL+path, nil)
	if err != nil {
		return fmt.Errorf("POST %s: %w", path, err)
	}
	req.Header.Set("Authorization", "Bearer "+adminToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("POST %s: %w", path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("POST %s: read the answer: %w", path, err)
	}
	if resp.StatusCode != want {
		return fmt.Errorf("POST %s: status %d, want %d: %s", path, resp.StatusCode, want, data)
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("POST %s: decode %q: %w", path, data, err)
	}
	return nil
}

func TestEjectAndJobRoutes(t *testing.T) {
	p := newPlane(t)
	target := admin.EjectRequest{
		TargetURL:      cluster.Primary.URL("authenticator", loginPassword, "adm_a_target"),
		TargetOwnerURL: cluster.Primary.SuperuserURL("adm_a_target"),
		Method:         "dump",
	}
	p.call("POST", "/v1/projects/adm_a/eject", `{"target_url": `, http.StatusBadRequest, nil)
	p.call("POST", "/v1/projects/adm_a/eject", `{"target_url": "postgres://a@h/x", "speed": "fast"}`, http.StatusBadRequest, nil)
	bad := target
	bad.Method = "rsync"
	p.call("POST", "/v1/projects/adm_a/eject", bad, http.StatusBadRequest, nil)
	bad = target
	bad.TargetOwnerURL = ""
	p.call("POST", "/v1/projects/adm_a/eject", bad, http.StatusBadRequest, nil)
	bad = target
	bad.TargetURL = cluster.Primary.URL("authenticator", loginPassword, "adm_a")
	p.call("POST", "/v1/projects/adm_a/eject", bad, http.StatusBadRequest, nil)
	p.call("POST", "/v1/projects/nope/eject", target, http.StatusNotFound, nil)

	// The ejection holds at "verify" (paused, copy done) until released.
	release := p.holdPhase("adm_a", "verify")
	var started admin.JobStarted
	p.call("POST", "/v1/projects/adm_a/eject", target, http.StatusAccepted, &started)
	if started.Job == "" {
		t.Fatal("no job id")
	}
	deadline := time.Now().Add(20 * time.Second)
	var st jobs.Status
	for {
		p.call("GET", "/v1/jobs/"+started.Job, nil, http.StatusOK, &st)
		if st.Phase == "verify" || !st.Active() || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if st.Phase != "verify" || st.State != jobs.Running || st.Kind != "eject" || st.Project != "adm_a" {
		t.Fatalf("job: %+v", st)
	}
	// Conflicting actions while the ejection runs.
	p.call("POST", "/v1/projects/adm_a/eject", target, http.StatusConflict, nil)
	p.call("POST", "/v1/projects/adm_a/resume", nil, http.StatusConflict, nil)
	p.call("POST", "/v1/projects/adm_a/pause", nil, http.StatusConflict, nil)
	p.call("DELETE", "/v1/projects/adm_a", nil, http.StatusConflict, nil)
	size := 9
	p.call("PATCH", "/v1/projects/adm_a", admin.ProjectPatch{PoolSize: &size}, http.StatusConflict, nil)
	p.call("GET", "/v1/jobs/"+started.Job+"/result", nil, http.StatusConflict, nil)
	var view admin.ProjectView
	p.call("GET", "/v1/projects/adm_a", nil, http.StatusOK, &view)
	if view.Job == nil || view.Job.ID != started.Job || !view.Paused {
		t.Fatalf("project during ejection: %+v", view)
	}
	release()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if st, err := p.runner.Wait(ctx, started.Job); err != nil || st.State != jobs.Succeeded {
		t.Fatalf("ejection: %v %+v", err, st)
	}
	p.call("GET", "/v1/jobs/"+started.Job, nil, http.StatusOK, &st)
	if st.State != jobs.Succeeded || st.Progress != 1 || len(st.Log) == 0 {
		t.Fatalf("finished job: %+v", st)
	}
	p.call("GET", "/v1/projects/adm_a", nil, http.StatusOK, &view)
	if !strings.HasSuffix(strings.SplitN(view.DatabaseURL, "?", 2)[0], "/adm_a_target") || view.Source != "runtime" || view.ChangedBy != "eject" || view.Paused {
		t.Fatalf("project after ejection: %+v", view)
	}
	var db string
	if err := p.connect("adm_a").QueryRow(t.Context(), "SELECT current_database()").Scan(&db); err != nil || db != "adm_a_target" {
		t.Fatalf("client lands on %q: %v", db, err)
	}
	p.call("GET", "/v1/jobs/"+started.Job+"/result", nil, http.StatusConflict, nil)
	p.call("GET", "/v1/jobs/nope", nil, http.StatusNotFound, nil)
	p.call("GET", "/v1/jobs/nope/result", nil, http.StatusNotFound, nil)

	// A job with a result file (as an archive export makes) is downloadable.
	rs, err := p.runner.Start("export", "adm_b", func(ctx context.Context, j *jobs.Job) error {
		return os.WriteFile(j.ResultFile("adm_b.caf"), []byte("caf bytes"), 0o600)
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.runner.Wait(ctx, rs.ID); err != nil {
		t.Fatal(err)
	}
	if body := p.call("GET", "/v1/jobs/"+rs.ID+"/result", nil, http.StatusOK, nil); string(body) != "caf bytes" {
		t.Fatalf("result: %q", body)
	}
	var list admin.JobList
	p.call("GET", "/v1/jobs", nil, http.StatusOK, &list)
	if len(list.Jobs) != 2 {
		t.Fatalf("jobs: %+v", list)
	}
	if st, _ := p.do("GET", "/v1/jobs/"+rs.ID+"/result", "", nil); st != http.StatusUnauthorized {
		t.Errorf("result without token: %d", st)
	}

	// Failed checks: the job says why and the project keeps serving.
	for _, tc := range []struct{ method, want string }{{"logical", "wal_level=replica"}, {"dump", "not empty"}} {
		req := admin.EjectRequest{
			TargetURL:      cluster.Primary.URL("authenticator", loginPassword, "adm_new"),
			TargetOwnerURL: cluster.Primary.SuperuserURL("adm_new"),
			Method:         tc.method,
		}
		p.call("POST", "/v1/projects/adm_b/eject", req, http.StatusAccepted, &started)
		st, err := p.runner.Wait(ctx, started.Job)
		if err != nil || st.State != jobs.Failed || !strings.Contains(st.Error, tc.want) {
			t.Fatalf("%s ejection to a non-empty target: %v %+v", tc.method, err, st)
		}
		if p.srv.Paused("adm_b") {
			t.Fatal("adm_b left paused")
		}
		var db string
		if err := p.connect("adm_b").QueryRow(t.Context(), "SELECT current_database()").Scan(&db); err != nil || db != "adm_b" {
			t.Fatalf("adm_b serves from %q: %v", db, err)
		}
	}

	// Archive routes answer 501 until the archive package is wired.
	p.call("POST", "/v1/projects/adm_b/archive", nil, http.StatusNotImplemented, nil)
	p.call("POST", "/v1/archives/import", "caf", http.StatusNotImplemented, nil)
}
