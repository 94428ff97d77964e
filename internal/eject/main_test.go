package eject_test

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

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
)

// source is the shared server (wal_level=logical); target is the external
// PostgreSQL projects are ejected to.
var source, target *pgcluster.Cluster

const (
	loginPassword = "authenticator-pw"
	secretPrefix  = "eject-test-secret-0123456789-abcdef-"
)

// seedRows is how many rows each source project starts with; the payload
// makes about 1 KiB per row. CASCATA_EJECT_SEED_ROWS raises it for measurements.
func seedRows() int {
	if v := os.Getenv("CASCATA_EJECT_SEED_ROWS"); v != "" {
		var n int
		if _, err := fmt.Sscan(v, &n); err == nil && n > 0 {
			return n
		}
	}
	return 5000
}

// seedRowsOf is seedRows for the projects ejected under load, 5000 for the others.
func seedRowsOf(ref string) int {
	if ref == "ej_logical" || ref == "ej_dump" {
		return seedRows()
	}
	return 5000
}

// sourceProjects are created on the source at start.
var sourceProjects = []string{"ej_logical", "ej_dump", "ej_fail_logical", "ej_fail_dump", "ej_other"}

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	var err error
	var stopTarget func(context.Context) error
	target, stopTarget, err = pgtest.Start(ctx, pgcluster.Options{Logger: log})
	cancel()
	if err != nil {
		fmt.Fprintf(os.Stderr, "start target cluster: %v\n", err)
		return 1
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := stopTarget(ctx); err != nil {
			fmt.Fprintf(os.Stderr, "stop target cluster: %v\n", err)
		}
	}()
	return pgtest.Main(m, pgcluster.Options{Logical: true, Logger: log}, &source, setupSource, setupTarget)
}

func setupSource(ctx context.Context, c *pgcluster.Cluster) error {
	for _, ref := range sourceProjects {
		if err := pgcluster.SetupProject(ctx, c.Primary, pgcluster.ProjectSpec{Database: ref, LoginPassword: loginPassword}); err != nil {
			return err
		}
		conn, err := pgx.Connect(ctx, c.Primary.SuperuserURL(ref))
		if err != nil {
			return err
		}
		_, err = conn.Exec(ctx, fmt.Sprintf(`
			CREATE TABLE items (id bigserial PRIMARY KEY, writer int NOT NULL, n int NOT NULL, payload text, UNIQUE (writer, n));
			GRANT SELECT, INSERT ON items TO authenticated;
			GRANT USAGE ON SEQUENCE items_id_seq TO authenticated;
			CREATE TABLE notes (k text PRIMARY KEY, v text);
			GRANT SELECT ON notes TO authenticated;
			CREATE SEQUENCE counter START 100;
			SELECT nextval('counter');
			INSERT INTO notes SELECT 'k' || i, repeat('v', 50) FROM generate_series(1, 100) i;
			INSERT INTO items (writer, n, payload) SELECT -1, i, repeat(md5(i::text), 30) FROM generate_series(1, %d) i;
			ALTER TABLE items ENABLE ROW LEVEL SECURITY;
			CREATE POLICY everyone ON items TO authenticated USING (true) WITH CHECK (true);`, seedRowsOf(ref)))
		conn.Close(ctx)
		if err != nil {
			return fmt.Errorf("seed %s: %w", ref, err)
		}
	}
	return nil
}

// setupTarget creates the login role and one empty database per project
// on the target; the project roles are left for the ejection to create.
func setupTarget(ctx context.Context, _ *pgcluster.Cluster) error {
	conn, err := pgx.Connect(ctx, target.Primary.SuperuserURL("postgres"))
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, fmt.Sprintf("CREATE ROLE authenticator LOGIN NOINHERIT PASSWORD '%s'", loginPassword)); err != nil {
		return err
	}
	for _, ref := range sourceProjects {
		if _, err := conn.Exec(ctx, "CREATE DATABASE "+ref); err != nil {
			return err
		}
	}
	return nil
}

// env is a proxy serving the source projects, with a catalog, a job
// runner and an ejector, as cmd/cascata wires them.
type env struct {
	t        *testing.T
	srv      *proxy.Server
	addr     string
	ver      *auth.Verifier
	cfg      *config.Config
	stateDir string
	cat      *catalog.Catalog
	runner   *jobs.Runner
	ej       *eject.Ejector
}

func projectsTOML(refs ...string) string {
	var b strings.Builder
	for _, ref := range refs {
		fmt.Fprintf(&b, "[[projects]]\nref = %q\ndatabase_url = %q\nowner_url = %q\njwt_secret = %q\npool_size = 10\n\n",
			ref, source.Primary.URL("authenticator", loginPassword, ref), source.Primary.SuperuserURL(ref), secretPrefix+ref)
	}
	return b.String()
}

func newEnv(t *testing.T, onPhase func(ref, phase string), refs ...string) *env {
	t.Helper()
	cfg, err := config.Parse([]byte(projectsTOML(refs...)))
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, ver: auth.NewVerifier(), cfg: cfg, stateDir: t.TempDir()}
	e.srv, err = proxy.NewServer(proxy.Options{
		Auth:   e.ver,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})),
	})
	if err != nil {
		t.Fatal(err)
	}
	e.cat, err = catalog.Open(catalog.Options{Dir: e.stateDir, Config: cfg, Apply: e.apply})
	if err != nil {
		t.Fatal(err)
	}
	e.runner, err = jobs.New(jobs.Options{Dir: e.stateDir + "/jobs"})
	if err != nil {
		t.Fatal(err)
	}
	bins, err := pgcluster.FindBinaries(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	e.ej, err = eject.New(eject.Options{Pauser: e.srv, Catalog: e.cat, BinDir: bins.Dir, OnPhase: onPhase, CatchUpTimeout: 10 * time.Second,
		MaxDumpBytes: 1 << 40}) // measurements eject big databases; TestDumpRefusesLargeDatabase checks the limit
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.addr = ln.Addr().String()
	done := make(chan error, 1)
	go func() { done <- e.srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if err := e.runner.Close(ctx); err != nil {
			t.Errorf("close jobs: %v", err)
		}
		if err := e.srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return e
}

// apply puts a catalog set in force, as app.applyProjects does.
func (e *env) apply(ps []config.Project) error {
	return projects.Apply(e.ver, e.srv, ps, nil)
}

// clientURL is a client connection string through the proxy with a fresh JWT.
func (e *env) clientURL(ref string) string {
	tok, err := auth.Mint(auth.MintKey{Secret: []byte(secretPrefix + ref)}, map[string]any{"role": "authenticated", "ref": ref}, time.Hour)
	if err != nil {
		e.t.Fatal(err)
	}
	host, port, _ := net.SplitHostPort(e.addr)
	return fmt.Sprintf("postgres://authenticated:%s@%s:%s/%s?sslmode=disable&default_query_exec_mode=simple_protocol", url.QueryEscape(tok), host, port, ref)
}

// startEject starts an ejection job of ref to the target's database of the same name.
func (e *env) startEject(ref string, method eject.Method) jobs.Status {
	e.t.Helper()
	entry, ok := e.cat.Project(ref)
	if !ok {
		e.t.Fatalf("no project %s", ref)
	}
	req := eject.Request{
		Project:        entry.Project,
		TargetURL:      target.Primary.URL("authenticator", loginPassword, ref),
		TargetOwnerURL: target.Primary.SuperuserURL(ref),
		Method:         method,
	}
	st, err := e.runner.Start("eject", ref, func(ctx context.Context, j *jobs.Job) error { return e.ej.Run(ctx, req, j) })
	if err != nil {
		e.t.Fatal(err)
	}
	return st
}

func (e *env) waitJob(id string) jobs.Status {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(e.t.Context(), 5*time.Minute)
	defer cancel()
	st, err := e.runner.Wait(ctx, id)
	if err != nil {
		e.t.Fatalf("%v; job %s in phase %s:\n%s", err, st.State, st.Phase, jobLog(st))
	}
	return st
}

// serverPort is the backend port a new client of ref lands on.
func (e *env) serverPort(ref string) int {
	e.t.Helper()
	var port int
	c := pgtest.Connect(e.t, e.clientURL(ref))
	if err := c.QueryRow(e.t.Context(), "SELECT inet_server_port()").Scan(&port); err != nil {
		e.t.Fatal(err)
	}
	return port
}

func jobLog(st jobs.Status) string {
	var b strings.Builder
	for _, l := range st.Log {
		b.WriteString("  " + l.Message + "\n")
	}
	return b.String()
}
