package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"cascata/internal/config"
	"cascata/internal/pgcluster"

	"github.com/BurntSushi/toml"
	"github.com/jackc/pgx/v5"
)

// Names of the demo: the project, its database, the files kept in the demo
// directory and the users the printed tokens are minted for.
const (
	demoRef           = "demo"
	demoDefaultDir    = ".cascata/demo"
	demoSecretEnv     = "DEMO_JWT_SECRET"
	demoAdminTokenEnv = "CASCATA_ADMIN_TOKEN"
	demoJWTSecretFile = "jwt_secret"
	demoPasswordFile  = "login_password"
	demoAdminFile     = "admin_token"
	demoConfigFile    = "cascata.toml" // the effective config, generated on every start
	demoClusterDir    = "pg"
	demoTokenTTL      = 24 * time.Hour
	demoUserAlice     = "11111111-1111-4111-8111-111111111111"
	demoUserBob       = "22222222-2222-4222-8222-222222222222"
	demoStopTimeout   = time.Minute
)

// demoOptions configures runDemo.
type demoOptions struct {
	configPath string // the user's cascata.toml
	// builtinIfMissing uses the built-in default config when configPath
	// does not exist (the -config flag was not given).
	builtinIfMissing bool
	dir              string // where the cluster and the generated secrets live
	listen           string // overrides [proxy].listen when not empty
	adminListen      string // overrides [admin].listen when not empty
	self             string // how the user invokes cascata, for printed commands
	log              *slog.Logger
	// ready, when not nil, is called once the proxy accepts connections.
	ready func(demoReady)
}

// demoReady describes the running demo (for tests).
type demoReady struct {
	ProxyAddr  string
	AdminAddr  string
	Cluster    *pgcluster.Cluster
	Project    *config.Project
	AdminToken string
}

// cmdDemo runs the embedded default: a local primary and streaming replica,
// the demo project, and the proxy in front of them, until SIGINT/SIGTERM.
func cmdDemo(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	o := demoOptions{self: os.Args[0]}
	fs.StringVar(&o.configPath, "config", "cascata.toml", "config file; the demo overrides the URLs and secrets of project \"demo\"")
	fs.StringVar(&o.dir, "dir", demoDefaultDir, "directory of the demo cluster and its secrets (kept between runs)")
	fs.StringVar(&o.listen, "listen", "", "proxy listen address (default: [proxy].listen of the config)")
	fs.StringVar(&o.adminListen, "admin-listen", "", "admin listen address (default: [admin].listen of the config)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	o.builtinIfMissing = true
	fs.Visit(func(f *flag.Flag) {
		if f.Name == "config" {
			o.builtinIfMissing = false
		}
	})
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	o.log = newLogger(stderr)
	// SIGHUP too: a closed terminal stops the demo cleanly.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	err := runDemo(ctx, o, stdout)
	if err != nil && ctx.Err() != nil {
		// Interrupted: whatever failed on the way out was cut short on purpose.
		first, _, _ := strings.Cut(err.Error(), "\n")
		o.log.Warn("demo interrupted", "error", first)
		return nil
	}
	return err
}

// runDemo starts (or restarts) the demo cluster, sets up the demo project,
// serves the proxy until ctx ends, then stops the cluster. The cluster's
// data stays in o.dir for the next run.
func runDemo(ctx context.Context, o demoOptions, stdout io.Writer) (err error) {
	if o.log == nil {
		o.log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(o.dir, 0o755); err != nil {
		return fmt.Errorf("create demo dir: %w", err)
	}

	data, cfgName, err := readDemoConfig(o)
	if err != nil {
		return err
	}
	// The config names the env vars of the JWT secret and the admin token;
	// they must hold values before the config validates.
	secretEnv, tokenEnv := demoEnvNames(data)
	secretFromFile, err := ensureEnvSecret(secretEnv, filepath.Join(o.dir, demoJWTSecretFile), 32)
	if err != nil {
		return err
	}
	if _, err := ensureEnvSecret(tokenEnv, filepath.Join(o.dir, demoAdminFile), 24); err != nil {
		return err
	}
	password, err := readOrCreateSecret(filepath.Join(o.dir, demoPasswordFile), 24)
	if err != nil {
		return err
	}
	cfg, err := config.Parse(data)
	if err != nil {
		return fmt.Errorf("%s:\n%w", cfgName, err)
	}

	o.log.Info("starting the demo postgres cluster (primary + streaming replica)", "dir", filepath.Join(o.dir, demoClusterDir))
	cluster, err := pgcluster.Start(ctx, pgcluster.Options{
		Dir:     filepath.Join(o.dir, demoClusterDir),
		Replica: true,
		KeepDir: true,
		Logger:  o.log,
	})
	if err != nil {
		return err
	}
	defer func() {
		o.log.Info("stopping the demo postgres cluster (its data stays for next time)", "dir", cluster.Dir)
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), demoStopTimeout)
		defer cancel()
		if serr := cluster.Stop(sctx); serr != nil {
			err = errors.Join(err, serr)
		}
	}()

	if err := setupDemoDatabase(ctx, cluster, cfg, password); err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err = cluster.WaitReplicaCaughtUp(wctx)
	cancel()
	if err != nil {
		return err
	}

	effPath, err := writeDemoConfig(cfg, cfgName, o, cluster, password, secretEnv)
	if err != nil {
		return err
	}
	eff, err := config.Load(effPath)
	if err != nil {
		return fmt.Errorf("generated config %s:\n%w", effPath, err)
	}
	a, err := newApp(effPath, eff, o.log)
	if err != nil {
		return err
	}
	p := eff.ProjectByRef(demoRef)
	tokenConfig := o.configPath
	if _, err := os.Stat(o.configPath); err != nil {
		tokenConfig = effPath
	}
	var printErr error
	ready := func(proxyAddr, adminAddr string) {
		printErr = printDemo(stdout, o, demoPrint{
			proxyAddr: proxyAddr, adminAddr: adminAddr, cluster: cluster, project: p,
			adminToken: eff.Admin.AdminToken(), secretEnv: secretEnv, tokenEnv: tokenEnv, secretFromFile: secretFromFile, tokenConfig: tokenConfig,
		})
		if o.ready != nil {
			o.ready(demoReady{ProxyAddr: proxyAddr, AdminAddr: adminAddr, Cluster: cluster, Project: p, AdminToken: eff.Admin.AdminToken()})
		}
	}
	// A nil hup channel: the demo's config is generated, not reloaded.
	if err := a.serve(ctx, nil, ready); err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return fmt.Errorf("%w (pick other addresses with -listen and -admin-listen)", err)
		}
		return err
	}
	return printErr
}

// demoBuiltinConfig is the demo's config when there is no cascata.toml:
// every other setting takes its default. The URLs are placeholders that
// the demo replaces.
const demoBuiltinConfig = `[[projects]]
ref = "demo"
database_url = "postgres://authenticator@127.0.0.1:5432/demo"
jwt_secret_env = "DEMO_JWT_SECRET"
`

// readDemoConfig returns the text of the user's config and a name for it in
// messages; the built-in default when the file is missing and allowed.
func readDemoConfig(o demoOptions) ([]byte, string, error) {
	data, err := os.ReadFile(o.configPath)
	switch {
	case err == nil:
		return data, o.configPath, nil
	case errors.Is(err, fs.ErrNotExist) && o.builtinIfMissing:
		o.log.Info("no config file here: using the built-in defaults", "missing", o.configPath)
		return []byte(demoBuiltinConfig), "the built-in default config", nil
	default:
		return nil, "", fmt.Errorf("read config: %w", err)
	}
}

// demoEnvNames returns the env var names of the demo project's JWT secret
// and of the admin token, as the config names them (defaults when it does
// not parse; config.Parse reports that later).
func demoEnvNames(data []byte) (secretEnv, tokenEnv string) {
	secretEnv, tokenEnv = demoSecretEnv, demoAdminTokenEnv
	var raw config.Config
	if _, err := toml.Decode(string(data), &raw); err != nil {
		return secretEnv, tokenEnv
	}
	if raw.Admin.TokenEnv != "" {
		tokenEnv = raw.Admin.TokenEnv
	}
	for _, p := range raw.Projects {
		if p.Ref == demoRef && p.JWTSecretEnv != "" {
			secretEnv = p.JWTSecretEnv
		}
	}
	return secretEnv, tokenEnv
}

// ensureEnvSecret leaves an env var that is set alone; otherwise it sets it
// from file, which is created with a random value when missing. It reports
// whether the value came from the file.
func ensureEnvSecret(env, file string, size int) (bool, error) {
	if os.Getenv(env) != "" {
		return false, nil
	}
	v, err := readOrCreateSecret(file, size)
	if err != nil {
		return false, err
	}
	if err := os.Setenv(env, v); err != nil {
		return false, fmt.Errorf("set %s: %w", env, err)
	}
	return true, nil
}

// readOrCreateSecret returns the secret kept in file, creating the file
// (mode 0600) with size random bytes, hex-encoded, when it does not exist.
func readOrCreateSecret(file string, size int) (string, error) {
	b, err := os.ReadFile(file)
	if err == nil {
		if v := strings.TrimSpace(string(b)); v != "" {
			return v, nil
		}
		return "", fmt.Errorf("%s is empty: remove it to generate a new secret", file)
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("read secret: %w", err)
	}
	buf := make([]byte, size)
	if _, err := rand.Read(buf); err != nil {
		return "", fmt.Errorf("generate secret: %w", err)
	}
	v := hex.EncodeToString(buf)
	f, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", fmt.Errorf("create secret: %w", err)
	}
	_, err = f.WriteString(v + "\n")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", fmt.Errorf("write secret %s: %w", file, err)
	}
	return v, nil
}

// demoSchema creates the sample tables, idempotently. The todos of a user
// are theirs alone (RLS on the JWT's sub); announcements are public.
var demoSchema = []string{
	`CREATE TABLE IF NOT EXISTS public.todos (
		id bigserial PRIMARY KEY,
		owner text NOT NULL DEFAULT (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'),
		title text NOT NULL,
		done boolean NOT NULL DEFAULT false,
		created_at timestamptz NOT NULL DEFAULT now()
	)`,
	`ALTER TABLE public.todos ENABLE ROW LEVEL SECURITY`,
	`DROP POLICY IF EXISTS todos_own ON public.todos`,
	`CREATE POLICY todos_own ON public.todos FOR ALL TO authenticated
		USING (owner = nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
		WITH CHECK (owner = nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')`,
	`GRANT SELECT, INSERT, UPDATE, DELETE ON public.todos TO authenticated, service_role`,
	`GRANT USAGE, SELECT ON SEQUENCE public.todos_id_seq TO authenticated, service_role`,
	`CREATE TABLE IF NOT EXISTS public.announcements (
		id bigserial PRIMARY KEY,
		body text NOT NULL,
		created_at timestamptz NOT NULL DEFAULT now()
	)`,
	`GRANT SELECT ON public.announcements TO anon, authenticated`,
	`GRANT SELECT, INSERT, UPDATE, DELETE ON public.announcements TO service_role`,
	`GRANT USAGE, SELECT ON SEQUENCE public.announcements_id_seq TO service_role`,
	`INSERT INTO public.announcements (body)
		SELECT v FROM (VALUES ('Welcome to the Cascata demo.'), ('anon can read this table; todos need a signed-in user.')) AS t(v)
		WHERE NOT EXISTS (SELECT FROM public.announcements)`,
}

// setupDemoDatabase creates the roles, the demo database and its tables.
func setupDemoDatabase(ctx context.Context, c *pgcluster.Cluster, cfg *config.Config, password string) error {
	roles := pgcluster.DefaultRoles()
	if p := cfg.ProjectByRef(demoRef); p != nil {
		roles = p.Roles
	}
	for _, r := range []string{"anon", "authenticated", "service_role"} {
		if !slices.Contains(roles, r) {
			return fmt.Errorf("demo: project %q must allow the role %q (roles in the config: %v)", demoRef, r, roles)
		}
	}
	login := cfg.Provision.LoginUser
	if err := pgcluster.SetupProject(ctx, c.Primary, pgcluster.ProjectSpec{
		Database: demoRef, LoginUser: login, LoginPassword: password, Roles: roles,
	}); err != nil {
		return err
	}
	conn, err := pgx.Connect(ctx, c.Primary.SuperuserURL(demoRef))
	if err != nil {
		return fmt.Errorf("demo schema: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	for _, stmt := range demoSchema {
		if _, err := conn.Exec(ctx, stmt); err != nil {
			return fmt.Errorf("demo schema: %w", err)
		}
	}
	return nil
}

// writeDemoConfig writes the effective configuration of the demo: the
// user's config with project "demo" pointed at the demo cluster, and the
// demo's own state and storage directories. It returns the file's path.
func writeDemoConfig(cfg *config.Config, cfgName string, o demoOptions, c *pgcluster.Cluster, password, secretEnv string) (string, error) {
	eff := *cfg
	eff.Projects = append([]config.Project(nil), cfg.Projects...)
	if o.listen != "" {
		eff.Proxy.Listen = o.listen
	}
	if o.adminListen != "" {
		eff.Admin.Listen = o.adminListen
	}
	dir, err := filepath.Abs(o.dir)
	if err != nil {
		return "", fmt.Errorf("demo dir: %w", err)
	}
	eff.State.Dir = filepath.Join(dir, "state")
	eff.Provision.OwnerURL = c.Primary.SuperuserURL("postgres")
	eff.Provision.LoginPassword = password
	eff.Provision.LoginPasswordEnv = ""
	eff.Provision.StorageRoot = filepath.Join(dir, "storage")
	p := eff.ProjectByRef(demoRef)
	if p == nil {
		eff.Projects = append(eff.Projects, config.Project{Ref: demoRef})
		p = &eff.Projects[len(eff.Projects)-1]
	}
	login := eff.Provision.LoginUser
	p.DatabaseURL = c.Primary.URL(login, password, demoRef)
	p.OwnerURL = c.Primary.SuperuserURL(demoRef)
	p.ReplicaURLs = []string{c.Replica.URL(login, password, demoRef)}
	p.JWTSecret, p.JWTSecretFile, p.JWKSFile, p.JWKSURL = "", "", "", ""
	p.JWTSecretEnv = secretEnv
	p.StorageDir = filepath.Join(eff.Provision.StorageRoot, demoRef)

	var buf bytes.Buffer
	fmt.Fprintf(&buf, "# Generated by `cascata demo` from %s on every start: do not edit.\n", cfgName)
	fmt.Fprintf(&buf, "# Project %q points at the demo cluster in %s.\n\n", demoRef, c.Dir)
	if err := toml.NewEncoder(&buf).Encode(eff); err != nil {
		return "", fmt.Errorf("encode demo config: %w", err)
	}
	path := filepath.Join(o.dir, demoConfigFile)
	if err := os.WriteFile(path, buf.Bytes(), 0o600); err != nil {
		return "", fmt.Errorf("write demo config: %w", err)
	}
	return path, nil
}

// demoPrint is what printDemo needs.
type demoPrint struct {
	proxyAddr, adminAddr string
	cluster              *pgcluster.Cluster
	project              *config.Project
	adminToken           string
	secretEnv, tokenEnv  string
	secretFromFile       bool
	tokenConfig          string // the config file `cascata token` can use
}

// printDemo writes the ready-to-paste connection strings.
func printDemo(w io.Writer, o demoOptions, d demoPrint) error {
	anon, err := mintToken(d.project, "anon", "", "", demoTokenTTL)
	if err != nil {
		return err
	}
	alice, err := mintToken(d.project, "authenticated", demoUserAlice, `{"email":"alice@example.com"}`, demoTokenTTL)
	if err != nil {
		return err
	}
	host := clientAddr(d.proxyAddr)
	connURL := func(user, token, db string) string {
		return "postgres://" + user + ":" + token + "@" + host + "/" + db
	}
	tokenCmd := o.self + " token -config " + d.tokenConfig + " -project " + demoRef
	if d.secretFromFile {
		tokenCmd = d.secretEnv + "=$(cat " + filepath.Join(o.dir, demoJWTSecretFile) + ") " + tokenCmd
	}
	var b strings.Builder
	pf := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	admin := "off"
	if d.adminAddr != "" {
		admin = "http://" + clientAddr(d.adminAddr)
	}
	pf("\nCascata demo is ready: proxy %s, admin %s\n\n", host, admin)
	pf("  postgres   primary %s, streaming replica %s (data in %s, kept between runs)\n", d.cluster.Primary.Addr(), d.cluster.Replica.Addr(), d.cluster.Dir)
	pf("  project    %q: table todos (RLS: each user sees their own), table announcements (public read)\n", demoRef)
	pf("  tokens     below are valid for %g hours; Ctrl-C stops the proxy and the cluster\n\n", demoTokenTTL.Hours())
	pf("psql as anon (reads announcements; todos are not granted to anon):\n")
	pf("  psql '%s' -c 'select * from announcements'\n\n", connURL("anon", anon, demoRef))
	pf("psql as authenticated, sub=%s:\n", demoUserAlice)
	pf("  psql '%s'\n", connURL("authenticated", alice, demoRef))
	pf("  demo=> insert into todos (title) values ('try cascata') returning *;\n")
	pf("  demo=> select * from todos;   -- only this user's rows\n\n")
	pf("Prisma (.env; no ?pgbouncer=true or other flag needed):\n")
	pf("  DATABASE_URL=\"%s\"\n\n", connURL("authenticated", alice, demoRef))
	pf("TypeORM:\n")
	pf("  new DataSource({ type: \"postgres\", url: \"%s\" })\n\n", connURL("authenticated", alice, demoRef))
	pf("Tools that cannot choose the database name (user name role.ref):\n")
	pf("  psql '%s'\n\n", connURL("authenticated."+demoRef, alice, "postgres"))
	if d.adminAddr != "" {
		pf("Admin API (bearer token from $%s, or %s when that was unset):\n", d.tokenEnv, filepath.Join(o.dir, demoAdminFile))
		pf("  curl -H 'Authorization: Bearer %s' %s/v1/projects\n\n", d.adminToken, admin)
	}
	pf("More tokens:\n")
	pf("  %s -role authenticated -sub %s\n", tokenCmd, demoUserBob)
	pf("  %s -role service_role -ttl 10m   # bypasses RLS\n\n", tokenCmd)
	_, err = io.WriteString(w, b.String())
	if err != nil {
		return fmt.Errorf("print demo: %w", err)
	}
	return nil
}

// clientAddr turns a listen address into one a client on this machine can
// dial (an unspecified host becomes 127.0.0.1).
func clientAddr(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}
