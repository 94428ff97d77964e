package proxy_test

import (
	"context"
	"regexp"
	"strings"
	"testing"
	"time"

	"cascata/proxy"

	"github.com/prometheus/client_golang/prometheus"
)

// TestMetricsForgetRemovedProject: when a project is removed at reload, its
// series go; when it comes back, its series start afresh.
func TestMetricsForgetRemovedProject(t *testing.T) {
	reg := prometheus.NewRegistry()
	h := startProxy(t, harnessOpts{projects: []string{"p1", "p2"}, opts: proxy.Options{Metrics: proxy.NewMetrics(reg)}})
	ctx := context.Background()
	use := func(ref string) {
		c, err := h.tryConnect(ref, "anon", token(t, ref, "anon", "metrics", nil))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Exec(ctx, "SELECT 1"); err != nil {
			t.Fatal(err)
		}
		_ = c.Close(ctx)
	}
	use("p1")
	use("p2")
	// The client's session ends after its connection closes.
	waitFor(t, "p1's client to leave", 5*time.Second, func() bool {
		return strings.Contains(scrape(t, reg), `cascata_client_connections{project="p1"} 0`)
	})
	for _, name := range []string{"cascata_server_connections", "cascata_transactions_total", "cascata_route_decisions_total"} {
		if !regexp.MustCompile(name + `\{[^}]*project="p1"`).MatchString(scrape(t, reg)) {
			t.Fatalf("no %s series of p1 before its removal", name)
		}
	}
	if err := h.srv.SetProjects([]proxy.ProjectConfig{projectConfig("p2")}); err != nil {
		t.Fatal(err)
	}
	body := scrape(t, reg)
	if strings.Contains(body, `project="p1"`) {
		t.Fatalf("series of the removed project p1 remain:\n%s", grepLines(body, `project="p1"`))
	}
	if !strings.Contains(body, `project="p2"`) {
		t.Fatal("series of p2 went with p1")
	}
	// Back again: fresh series, no count carried over from before.
	if err := h.srv.SetProjects([]proxy.ProjectConfig{projectConfig("p1"), projectConfig("p2")}); err != nil {
		t.Fatal(err)
	}
	use("p1")
	body = scrape(t, reg)
	if !strings.Contains(body, `cascata_transactions_total{project="p1"} 1`) {
		t.Fatalf("p1's transactions after it came back:\n%s", grepLines(body, `project="p1"`))
	}
	if !strings.Contains(body, `cascata_server_connections{project="p1"} 1`) {
		t.Fatalf("p1's server connections after it came back:\n%s", grepLines(body, `project="p1"`))
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
