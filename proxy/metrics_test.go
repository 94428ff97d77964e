package proxy_test

import (
	"context"
	"net"
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

// TestMetricsServerDials: a backend login under way shows in
// cascata_server_dials_in_progress of its server, and every login, failed
// or not, in cascata_server_dial_seconds once it is over.
func TestMetricsServerDials(t *testing.T) {
	// A server that accepts connections and never answers: the proxy's
	// login to it stays under way until the test lets it fail.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	held := make(chan net.Conn, 4)
	defer func() {
		for {
			select {
			case c := <-held:
				c.Close()
			default:
				return
			}
		}
	}()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			select {
			case held <- c:
			default:
				c.Close()
			}
		}
	}()
	silent := ln.Addr().String()
	reg := prometheus.NewRegistry()
	h := startProxy(t, harnessOpts{projects: []string{"p1", "p2"}, opts: proxy.Options{Metrics: proxy.NewMetrics(reg)},
		urls: map[string]string{"p2": "postgres://authenticator:x@" + silent + "/p2?sslmode=disable"}})
	ctx := context.Background()

	c := h.connect("p1", "anon", "dials")
	if _, err := c.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	primary := cluster.Primary.Addr()
	body := scrape(t, reg)
	for _, want := range []string{
		`cascata_server_dials_in_progress{server="` + primary + `"} 0`,
		`cascata_server_dial_seconds_count{server="` + primary + `"} 1`,
	} {
		if !strings.Contains(body, want) {
			t.Fatalf("after one login to the primary, no %s in:\n%s", want, grepLines(body, "cascata_server_dial"))
		}
	}

	failed := make(chan error, 1)
	tok := token(t, "p2", "anon", "dials", nil)
	go func() {
		_, err := h.tryConnect("p2", "anon", tok)
		failed <- err
	}()
	var server net.Conn
	select {
	case server = <-held:
	case <-time.After(10 * time.Second):
		t.Fatal("the proxy never dialled the silent server")
	}
	waitFor(t, "the login to the silent server to show as under way", 5*time.Second, func() bool {
		return strings.Contains(scrape(t, reg), `cascata_server_dials_in_progress{server="`+silent+`"} 1`)
	})
	server.Close() // the login fails
	select {
	case err := <-failed:
		if err == nil {
			t.Fatal("a client of a project whose server hung up logged in")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the client's login did not end after the server hung up")
	}
	waitFor(t, "the failed login to be counted", 5*time.Second, func() bool {
		b := scrape(t, reg)
		return strings.Contains(b, `cascata_server_dials_in_progress{server="`+silent+`"} 0`) &&
			strings.Contains(b, `cascata_server_dial_seconds_count{server="`+silent+`"} 1`)
	})
}
