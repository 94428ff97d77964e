package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"cascata/admin"
	"cascata/internal/pgcluster"
)

// getStatus is GET path on the admin plane with the token: the status, the
// answering instance, and the body decoded into out (if not nil).
func (r *runningApp) getStatus(ctx context.Context, path string, out any) (int, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.adminURL+path, nil)
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Authorization", "Bearer "+appAdminToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	if out != nil {
		if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
			return resp.StatusCode, "", fmt.Errorf("decode %s: %w", path, err)
		}
	}
	return resp.StatusCode, resp.Header.Get("X-Cascata-Instance"), nil
}

// While the proxy drains after a stop, the admin plane stays up: /readyz
// answers 503 "draining" (a load balancer takes the instance out) and
// /healthz still answers, naming the instance, so that a fleet does not
// count it gone while it holds the backends of its last clients. It closes
// once the last transaction has finished.
func TestDrainKeepsAdminPlane(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cl := startClusters(t, ctx, 1)[0]
	if err := pgcluster.SetupProject(ctx, cl.Primary, pgcluster.ProjectSpec{Database: "app_d", LoginPassword: appLoginPassword}); err != nil {
		t.Fatal(err)
	}
	t.Setenv("CASCATA_TEST_ADMIN_TOKEN", appAdminToken)
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "cascata.toml")
	// shutdown_timeout is testConfig's 5 s: the drain below takes
	// milliseconds.
	cfgText := testConfig(filepath.Join(dir, "state"), "", fmt.Sprintf(`
[catalog]
instance_id = "drain-1"

[[projects]]
ref = "app_d"
database_url = %q
jwt_secret = %q
`, cl.Primary.URL("authenticator", appLoginPassword, "app_d"), appSecret))
	if err := os.WriteFile(cfgPath, []byte(cfgText), 0o600); err != nil {
		t.Fatal(err)
	}
	r := startApp(t, cfgPath)
	var ready admin.Readiness
	if st, _, err := r.getStatus(ctx, "/readyz", &ready); err != nil || st != http.StatusOK || ready.Status != "ready" {
		t.Fatalf("readyz before the stop: %d %+v %v", st, ready, err)
	}
	c := r.client(t, "app_d")
	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}

	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		r.stop()
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ready = admin.Readiness{}
		st, _, err := r.getStatus(ctx, "/readyz", &ready)
		if err == nil && st == http.StatusServiceUnavailable && ready.Status == "draining" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("readyz while draining: %d %+v %v, want 503 draining", st, ready, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if st, id, err := r.getStatus(ctx, "/healthz", nil); err != nil || st != http.StatusOK || id != "drain-1" {
		t.Fatalf("healthz while draining: %d instance %q %v, want 200 from drain-1", st, id, err)
	}
	select {
	case <-stopped:
		t.Fatal("the process stopped while a transaction was running")
	default:
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatalf("the running transaction, finished during the drain: %v", err)
	}
	select {
	case <-stopped:
	case <-time.After(15 * time.Second):
		t.Fatal("the process did not stop after its last transaction")
	}
	if _, _, err := r.getStatus(ctx, "/healthz", nil); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("healthz after the stop: %v, want connection refused", err)
	}
}
