package admin_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"cascata/admin"
	"cascata/auth"
	"cascata/internal/catalog"
	"cascata/internal/config"
	"cascata/internal/eject"
	"cascata/internal/jobs"
	"cascata/internal/pgcluster"
	"cascata/internal/pgtest"
	"cascata/internal/projects"
	"cascata/proxy"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/prometheus/client_golang/prometheus"
)

var cluster *pgcluster.Cluster

const (
	adminToken    = "admin-test-token"
	loginPassword = "authenticator-pw"
	secretPrefix  = "admin-test-secret-0123456789-abcdef-"
)

// Databases: two file projects, one registered at run time, one ejection target.
var databases = []string{"adm_a", "adm_b", "adm_new", "adm_a_target"}

func TestMain(m *testing.M) {
	os.Exit(pgtest.Main(m, pgcluster.Options{}, &cluster, setup))
}

func setup(ctx context.Context, c *pgcluster.Cluster) error {
	for _, db := range databases {
		if err := pgcluster.SetupProject(ctx, c.Primary, pgcluster.ProjectSpec{Database: db, LoginPassword: loginPassword}); err != nil {
			return err
		}
		if db == "adm_a_target" {
			continue // stays empty
		}
		conn, err := pgx.Connect(ctx, c.Primary.SuperuserURL(db))
		if err != nil {
			return err
		}
		_, err = conn.Exec(ctx, `
			CREATE TABLE items (id bigserial PRIMARY KEY, body text);
			GRANT SELECT, INSERT ON items TO authenticated;
			GRANT USAGE ON SEQUENCE items_id_seq TO authenticated;
			INSERT INTO items (body) SELECT 'seed' FROM generate_series(1, 10);`)
		conn.Close(ctx)
		if err != nil {
			return fmt.Errorf("set up %s: %w", db, err)
		}
	}
	return nil
}

// plane is a proxy with the admin plane in front, wired as cmd/cascata does.
type plane struct {
	t      *testing.T
	srv    *proxy.Server
	addr   string
	ver    *auth.Verifier
	cat    *catalog.Catalog
	runner *jobs.Runner
	ej     *eject.Ejector
	http   *httptest.Server

	mu   sync.Mutex
	hold map[string]chan struct{} // ejection phases to block on, by "ref/phase"
}

func projectTOML(ref, db string) string {
	return fmt.Sprintf("[[projects]]\nref = %q\ndatabase_url = %q\nowner_url = %q\njwt_secret = %q\npool_size = 4\n\n",
		ref, cluster.Primary.URL("authenticator", loginPassword, db), cluster.Primary.SuperuserURL(db), secretPrefix+ref)
}

func newPlane(t *testing.T) *plane {
	t.Helper()
	cfg, err := config.Parse([]byte(projectTOML("adm_a", "adm_a") + projectTOML("adm_b", "adm_b")))
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	p := &plane{t: t, ver: auth.NewVerifier(), hold: map[string]chan struct{}{}}
	p.srv, err = proxy.NewServer(proxy.Options{
		Auth: p.ver, Metrics: proxy.NewMetrics(reg), QueryWaitTimeout: 10 * time.Second,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})),
	})
	if err != nil {
		t.Fatal(err)
	}
	stateDir := t.TempDir()
	if p.cat, err = catalog.Open(catalog.Options{Dir: stateDir, Config: cfg, Apply: p.apply}); err != nil {
		t.Fatal(err)
	}
	if p.runner, err = jobs.New(jobs.Options{Dir: stateDir + "/jobs"}); err != nil {
		t.Fatal(err)
	}
	bins, err := pgcluster.FindBinaries(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if p.ej, err = eject.New(eject.Options{Pauser: p.srv, Catalog: p.cat, BinDir: bins.Dir, OnPhase: p.onPhase}); err != nil {
		t.Fatal(err)
	}
	h, err := admin.New(admin.Options{
		Token: adminToken, CORSOrigins: []string{"https://console.example.com"}, Gatherer: reg,
		Projects: p.cat, Pools: poolReader{p.srv}, Pauser: p.srv, Jobs: p.runner, Ejector: p, Pinger: pinger{},
		PauseWait: 5 * time.Second, Draining: func() bool { return !p.srv.Accepting() },
	})
	if err != nil {
		t.Fatal(err)
	}
	p.http = httptest.NewServer(h)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p.addr = ln.Addr().String()
	done := make(chan error, 1)
	go func() { done <- p.srv.Serve(ln) }()
	t.Cleanup(func() {
		p.http.Close()
		p.mu.Lock()
		for k, ch := range p.hold {
			close(ch)
			delete(p.hold, k)
		}
		p.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if err := p.runner.Close(ctx); err != nil {
			t.Errorf("close jobs: %v", err)
		}
		if err := p.srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return p
}

func (p *plane) apply(ps []config.Project) error {
	return projects.Apply(p.ver, p.srv, ps, nil)
}

// holdPhase makes an ejection of ref block when it reaches phase, until the returned func runs.
func (p *plane) holdPhase(ref, phase string) func() {
	ch := make(chan struct{})
	p.mu.Lock()
	p.hold[ref+"/"+phase] = ch
	p.mu.Unlock()
	return func() {
		p.mu.Lock()
		defer p.mu.Unlock()
		if c, ok := p.hold[ref+"/"+phase]; ok {
			close(c)
			delete(p.hold, ref+"/"+phase)
		}
	}
}

func (p *plane) onPhase(ref, phase string) {
	p.mu.Lock()
	ch := p.hold[ref+"/"+phase]
	p.mu.Unlock()
	if ch != nil {
		<-ch
	}
}

// StartEject is the wiring of cmd/cascata.
func (p *plane) StartEject(pr config.Project, req admin.EjectRequest) (jobs.Status, error) {
	er := eject.Request{Project: pr, TargetURL: req.TargetURL, TargetOwnerURL: req.TargetOwnerURL, ReplicaURLs: req.ReplicaURLs, Method: eject.Method(req.Method)}
	if err := er.Validate(); err != nil {
		return jobs.Status{}, err
	}
	return p.runner.Start("eject", pr.Ref, func(ctx context.Context, j *jobs.Job) error { return p.ej.Run(ctx, er, j) })
}

type poolReader struct{ srv *proxy.Server }

func (r poolReader) Pools() []admin.PoolStat { return r.srv.PoolStats() }

type pinger struct{}

func (pinger) Ping(ctx context.Context, databaseURL string) error {
	c, err := pgconn.Connect(ctx, databaseURL)
	if err != nil {
		return err
	}
	return c.Close(ctx)
}

// do sends a request with the token (tok "" = none) and returns status and body.
func (p *plane) do(method, path, tok string, body any) (int, []byte) {
	p.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	default:
		data, err := json.Marshal(b)
		if err != nil {
			p.t.Fatal(err)
		}
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(p.t.Context(), method, p.http.URL+path, rd)
	if err != nil {
		p.t.Fatal(err)
	}
	if tok != "" {
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		p.t.Fatal(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		p.t.Fatal(err)
	}
	return resp.StatusCode, data
}

// call is do with the right token; it fails the test unless the status is want,
// and decodes the JSON answer into out when not nil.
func (p *plane) call(method, path string, body any, want int, out any) []byte {
	p.t.Helper()
	status, data := p.do(method, path, adminToken, body)
	if status != want {
		p.t.Fatalf("%s %s: status %d, want %d: %s", method, path, status, want, data)
	}
	if want >= 400 {
		var eb admin.ErrorBody
		if err := json.Unmarshal(data, &eb); err != nil || eb.Error == "" {
			p.t.Fatalf("%s %s: error body %q is not {\"error\": ...}", method, path, data)
		}
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			p.t.Fatalf("%s %s: decode %q: %v", method, path, data, err)
		}
	}
	return data
}

func (p *plane) clientURL(ref string) string {
	tok, err := auth.Mint(auth.MintKey{Secret: []byte(secretPrefix + ref)}, map[string]any{"role": "authenticated", "ref": ref}, time.Hour)
	if err != nil {
		p.t.Fatal(err)
	}
	host, port, _ := net.SplitHostPort(p.addr)
	return fmt.Sprintf("postgres://authenticated:%s@%s:%s/%s?sslmode=disable&default_query_exec_mode=simple_protocol", url.QueryEscape(tok), host, port, ref)
}

func (p *plane) connect(ref string) *pgx.Conn {
	p.t.Helper()
	return pgtest.Connect(p.t, p.clientURL(ref))
}
