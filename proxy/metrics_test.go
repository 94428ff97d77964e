package proxy_test

import (
	"context"
	"fmt"
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
	// A transaction is counted when its backend goes back to the pool,
	// just after the client has its answer.
	waitFor(t, "p1's transaction to be counted after it came back", 5*time.Second, func() bool {
		body = scrape(t, reg)
		return !strings.Contains(body, `cascata_transactions_total{project="p1"} 0`)
	})
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

// TestMetricsServerDials: a backend login under way shows in
// cascata_server_dials_in_progress of its server, and every login, failed
// or not, in cascata_server_dial_seconds once it is over. The slow login is
// PostgreSQL's own, held by post_auth_delay; the failed one is to a closed
// port.
func TestMetricsServerDials(t *testing.T) {
	const closed = "127.0.0.1:1"
	reg := prometheus.NewRegistry()
	h := startProxy(t, harnessOpts{projects: []string{"p1", "p2", "p3"}, opts: proxy.Options{Metrics: proxy.NewMetrics(reg)},
		urls: map[string]string{
			"p2": cluster.Primary.URL("authenticator", loginPassword, "p2") + "&options=-c%20post_auth_delay%3D1",
			"p3": "postgres://authenticator:x@" + closed + "/p3?sslmode=disable",
		}})
	ctx := context.Background()
	primary := cluster.Primary.Addr()
	has := func(want ...string) bool {
		body := scrape(t, reg)
		for _, w := range want {
			if !strings.Contains(body, w) {
				return false
			}
		}
		return true
	}
	inProgress := func(server string, n int) string {
		return fmt.Sprintf(`cascata_server_dials_in_progress{server="%s"} %d`, server, n)
	}
	count := func(server string, n int) string {
		return fmt.Sprintf(`cascata_server_dial_seconds_count{server="%s"} %d`, server, n)
	}

	c := h.connect("p1", "anon", "dials")
	if _, err := c.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	if !has(inProgress(primary, 0), count(primary, 1)) {
		t.Fatalf("after one login to the primary:\n%s", grepLines(scrape(t, reg), "cascata_server_dial"))
	}

	slow := make(chan error, 1)
	tok := token(t, "p2", "anon", "dials", nil)
	go func() {
		_, err := h.tryConnect("p2", "anon", tok)
		slow <- err
	}()
	waitFor(t, "the held login to show as under way", 5*time.Second, func() bool { return has(inProgress(primary, 1)) })
	if err := <-slow; err != nil {
		t.Fatalf("login held by post_auth_delay: %v", err)
	}
	if !has(inProgress(primary, 0), count(primary, 2)) {
		t.Fatalf("after the held login:\n%s", grepLines(scrape(t, reg), "cascata_server_dial"))
	}

	if _, err := h.tryConnect("p3", "anon", token(t, "p3", "anon", "dials", nil)); err == nil {
		t.Fatal("a client of a project whose server refuses connections logged in")
	}
	if !has(inProgress(closed, 0), count(closed, 1)) {
		t.Fatalf("after a failed login:\n%s", grepLines(scrape(t, reg), "cascata_server_dial"))
	}
}
