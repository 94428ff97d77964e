package proxy_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"sync"
	"testing"
	"time"

	"cascata/auth"
	"cascata/internal/pgcluster"
	"cascata/internal/pgtest"
	"cascata/internal/projectdb"
	"cascata/internal/volatility"
	"cascata/proxy"
	"cascata/router"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

var cluster *pgcluster.Cluster

const (
	loginPassword = "authenticator-pw"
	testSecret    = "test-secret-test-secret-test-secret-0123456789"
)

// testProjects are created once in the shared cluster.
var testProjects = []string{"p1", "p2", "p3"}

// claimKeys are the projects' cascata.keys, for signed claims.
var claimKeys = map[string][]byte{}

func TestMain(m *testing.M) {
	os.Exit(pgtest.Main(m, pgcluster.Options{Replica: true}, &cluster, setupProjects))
}

func setupProjects(ctx context.Context, c *pgcluster.Cluster) error {
	for _, ref := range testProjects {
		if err := pgcluster.SetupProject(ctx, c.Primary, pgcluster.ProjectSpec{Database: ref, LoginPassword: loginPassword}); err != nil {
			return err
		}
		conn, err := pgx.Connect(ctx, c.Primary.SuperuserURL(ref))
		if err != nil {
			return err
		}
		_, err = conn.Exec(ctx, `
			CREATE TABLE IF NOT EXISTS items (id bigserial PRIMARY KEY, owner text NOT NULL DEFAULT current_setting('request.jwt.claims', true)::jsonb->>'sub', body text);
			GRANT SELECT, INSERT, UPDATE, DELETE ON items TO anon, authenticated, service_role;
			GRANT USAGE ON SEQUENCE items_id_seq TO anon, authenticated, service_role;
			CREATE TABLE IF NOT EXISTS big (v text);
			GRANT ALL ON big TO authenticated;`)
		conn.Close(ctx)
		if err != nil {
			return fmt.Errorf("set up %s: %w", ref, err)
		}
		key, err := projectdb.Install(ctx, c.Primary.SuperuserURL(ref))
		if err != nil {
			return err
		}
		claimKeys[ref] = key
	}
	return nil
}

// harness is a running proxy in front of the shared cluster.
type harness struct {
	t    testing.TB
	srv  *proxy.Server
	addr string
	ver  *auth.Verifier
}

type harnessOpts struct {
	opts        proxy.Options
	legacyGUCs  bool   // request.jwt.claim.* settings
	replicas    bool   // give projects the streaming replica
	consistency string // proxy.Consistency*
	poolSize    int
	maxPinned   int
	sessionMode bool
	projects    []string
	// urls gives projects a database_url of their own instead of their
	// own database's (several projects sharing one, startup options).
	urls map[string]string
}

func startProxy(t testing.TB, ho harnessOpts) *harness {
	t.Helper()
	ver := auth.NewVerifier()
	ho.opts.Auth = ver
	if ho.opts.Classifier == nil {
		cls := router.NewProjects()
		for _, ref := range testProjects {
			cls.SetFunctions(ref, volatility.New(cluster.Primary.URL("authenticator", loginPassword, ref), nil, nil, slog.Default()))
		}
		t.Cleanup(cls.Close)
		ho.opts.Classifier = cls
	}
	if ho.opts.Logger == nil {
		ho.opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	if ho.projects == nil {
		ho.projects = testProjects
	}
	if ho.poolSize == 0 {
		ho.poolSize = 5
	}
	srv, err := proxy.NewServer(ho.opts)
	if err != nil {
		t.Fatal(err)
	}
	var cfgs []proxy.ProjectConfig
	for _, ref := range ho.projects {
		if err := ver.SetProject(ref, auth.KeyConfig{Secrets: [][]byte{[]byte(testSecret + ref)}},
			auth.Policy{Roles: []string{"anon", "authenticated", "service_role"}}); err != nil {
			t.Fatal(err)
		}
		pc := proxy.ProjectConfig{
			Ref:             ref,
			DatabaseURL:     cluster.Primary.URL("authenticator", loginPassword, ref),
			PoolSize:        ho.poolSize,
			MaxPinned:       ho.maxPinned,
			SessionMode:     ho.sessionMode,
			Consistency:     ho.consistency,
			LegacyClaimGUCs: ho.legacyGUCs,
			ClaimsMAC:       func(claims string) string { return projectdb.ClaimsMAC(claimKeys[ref], claims) },
		}
		if u, ok := ho.urls[ref]; ok {
			pc.DatabaseURL = u
		}
		if ho.replicas {
			pc.ReplicaURLs = []string{cluster.Replica.URL("authenticator", loginPassword, ref)}
		}
		cfgs = append(cfgs, pc)
	}
	if err := srv.SetProjects(cfgs); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	h := &harness{t: t, srv: srv, addr: ln.Addr().String(), ver: ver}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
		if n := proxy.PhaseFaults(srv); n > 0 {
			t.Errorf("%d session phase moves out of order (see the log)", n)
		}
	})
	return h
}

// token mints a JWT of project ref for a role and subject.
func token(t testing.TB, ref, role, sub string, extra map[string]any) string {
	t.Helper()
	claims := map[string]any{"role": role, "sub": sub}
	for k, v := range extra {
		claims[k] = v
	}
	tok, err := auth.Mint(auth.MintKey{Secret: []byte(testSecret + ref)}, claims, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// url is a client connection string through the proxy.
func (h *harness) url(ref, role, tok string) string {
	host, port, _ := net.SplitHostPort(h.addr)
	return fmt.Sprintf("postgres://%s:%s@%s:%s/%s?sslmode=disable&default_query_exec_mode=simple_protocol", url.QueryEscape(role), url.QueryEscape(tok), host, port, ref)
}

func (h *harness) connect(ref, role, sub string) *pgx.Conn {
	h.t.Helper()
	c, err := h.tryConnect(ref, role, token(h.t, ref, role, sub, nil))
	if err != nil {
		h.t.Fatalf("connect %s as %s/%s: %v", ref, role, sub, err)
	}
	h.t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

func (h *harness) tryConnect(ref, role, tok string) (*pgx.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return pgx.Connect(ctx, h.url(ref, role, tok))
}

// sqlstate returns the SQLSTATE of err, or "" if it has none.
func sqlstate(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

// proxyBackends counts the proxy's backend connections (as authenticator) in pg_stat_activity.
func proxyBackends(t testing.TB, db string) int {
	t.Helper()
	var n int
	q := "SELECT count(*) FROM pg_stat_activity WHERE usename = 'authenticator'"
	if db != "" {
		q += " AND datname = '" + db + "'"
	}
	c := superConn(t)
	if err := c.QueryRow(context.Background(), q).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

var (
	superOnce  sync.Mutex
	superConns = map[testing.TB]*pgx.Conn{}
)

func superConn(t testing.TB) *pgx.Conn {
	superOnce.Lock()
	defer superOnce.Unlock()
	if c, ok := superConns[t]; ok {
		return c
	}
	c := pgtest.Connect(t, cluster.Primary.SuperuserURL("postgres"))
	superConns[t] = c
	t.Cleanup(func() {
		superOnce.Lock()
		delete(superConns, t)
		superOnce.Unlock()
	})
	return c
}

func waitFor(t testing.TB, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func connectURL(t testing.TB, u string) *pgx.Conn {
	return pgtest.Connect(t, u)
}

func connectRaw(ctx context.Context, u string) (*pgx.Conn, error) {
	return pgx.Connect(ctx, u)
}

// serviceSchema makes a fresh schema owned by service_role in db (a role
// that may run DDL there without being trusted).
func serviceSchema(t testing.TB, db, schema string) *pgx.Conn {
	t.Helper()
	su := pgtest.Connect(t, cluster.Primary.SuperuserURL(db))
	if _, err := su.Exec(context.Background(), "DROP SCHEMA IF EXISTS "+schema+" CASCADE; CREATE SCHEMA "+schema+" AUTHORIZATION service_role"); err != nil {
		t.Fatal(err)
	}
	return su
}
