package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"cascata/internal/pgcluster"

	"github.com/jackc/pgx/v5"
)

// loginUser is the proxy's NOINHERIT login role in each suite's database.
const loginUser = "authenticator"

// suite is one driver's test suite.
type suite struct {
	key     string // short name: pgx, pq
	title   string // for the table
	module  string
	version string
	db      string // the suite's database, also the project ref
	// roles are the suite's own login roles: the project's roles, each
	// given a JWT.
	roles []string
	// hba is the suite's pg_hba.conf (its CI's), without the lines the
	// harness adds for the postgres superuser and the proxy's login role.
	hba []string
	// setup prepares the database after the cluster started (the suite's
	// own set-up SQL).
	setup func(ctx context.Context, h *harness, s *suite) error
	// env returns the suite's environment for a mode.
	env func(h *harness, s *suite, mode, proxyAddr string) []string
	// sslConf returns postgresql.conf lines for the server's TLS.
	sslConf func(h *harness, s *suite) ([]string, error)
	// hosts are /etc/hosts lines the suite's CI adds; the suite's tests
	// see them in a mount namespace of their own when that is possible.
	hosts []string
	// hostsFile is /etc/hosts plus hosts, bind-mounted over /etc/hosts
	// for the suite's go test; "" when the machine cannot do that.
	hostsFile string

	src    string            // the suite's module copied into the work dir
	tokens map[string]string // role -> JWT, shared by the suite's copies
	// A copy of the suite per mode carries the mode's own cluster, so the
	// modes can run at the same time without seeing each other.
	mode    string
	cluster *pgcluster.Cluster
}

func allSuites() []*suite {
	return []*suite{
		{
			key: "pgx", title: "pgx", module: "github.com/jackc/pgx/v5", version: "v5.13.0", db: "pgx_test",
			roles: []string{"pgx_md5", "pgx_pw", "pgx_scram", "pgx_ssl", "pgx_sslcert", "pgx_oauth"},
			// testsetup/pg_hba.conf
			hba: []string{
				"local all postgres trust",
				"local all all trust",
				"host all pgx_md5 127.0.0.1/32 md5",
				"host all pgx_scram 127.0.0.1/32 scram-sha-256",
				"host all pgx_pw 127.0.0.1/32 password",
				"hostssl all pgx_ssl 127.0.0.1/32 scram-sha-256",
				"hostssl all pgx_sslcert 127.0.0.1/32 cert",
			},
			setup:   setupPgx,
			env:     envPgx,
			sslConf: sslPgx,
		},
		{
			key: "pq", title: "lib/pq", module: "github.com/lib/pq", version: "v1.12.3", db: "pqgo",
			roles: []string{"pqgo", "pqgossl", "pqgosslcert", "pqgopassword", "pqgoscram", "pqgomd5"},
			// testdata/postgres/docker-entrypoint-initdb.d/10-hba.sh
			hba: []string{
				"local all all trust",
				"host all pqgomd5 all md5",
				"host all pqgopassword all password",
				"host all pqgoscram all scram-sha-256",
				"host all postgres all trust",
				"hostnossl all pqgossl all reject",
				"hostnossl all pqgosslcert all reject",
				"hostssl all pqgossl all trust",
				"hostssl all pqgosslcert all cert",
				"host all all all trust",
			},
			setup:   setupPq,
			env:     envPq,
			sslConf: sslPq,
			// .github/workflows/test.yml
			hosts: []string{"127.0.0.1 postgres postgres-invalid"},
		},
	}
}

type harness struct {
	o        *options
	work     string
	log      *slog.Logger
	password string // the login role's password
	config   map[string]string
	// targets are the suites' copies per mode, each with its cluster.
	targets map[string][]*suite
	mu      sync.Mutex
	started []*suite
}

// prepare fetches the suite and the files its servers need.
func (h *harness) prepare(ctx context.Context, s *suite) error {
	if h.password == "" {
		h.password = randomHex(16)
	}
	s.tokens = map[string]string{}
	if err := h.fetch(ctx, s); err != nil {
		return err
	}
	if len(s.hosts) > 0 {
		h.privateHosts(ctx, s)
	}
	return os.MkdirAll(filepath.Join(h.work, s.key+"-server"), 0o755)
}

// startCluster starts the suite's cluster for one mode and prepares its
// database; it returns the suite's copy for that mode.
func (h *harness) startCluster(ctx context.Context, base *suite, mode string) (*suite, error) {
	t := *base
	t.mode = mode
	s := &t
	confDir := filepath.Join(h.work, s.key+"-server")
	ssl, err := s.sslConf(h, s)
	if err != nil {
		return nil, err
	}
	// The harness's own lines go first: the superuser pgcluster uses, and
	// the proxy's login role with a SCRAM password.
	hba := append([]string{
		"# " + s.title + "'s pg_hba.conf, after the lines of the compat-suites harness",
		"host all postgres 127.0.0.1/32 trust",
		"host all " + loginUser + " 127.0.0.1/32 scram-sha-256",
	}, s.hba...)
	hbaPath := filepath.Join(confDir, "pg_hba.conf")
	if err := writeServerFile(hbaPath, []byte(strings.Join(hba, "\n")+"\n"), 0o644); err != nil {
		return nil, err
	}
	extra := append([]string{"hba_file = " + confString(hbaPath)}, ssl...)
	c, err := pgcluster.Start(ctx, pgcluster.Options{
		Dir:       filepath.Join(h.work, s.key+"-"+mode),
		ExtraConf: extra,
		Logger:    h.log,
	})
	if err != nil {
		return nil, err
	}
	s.cluster = c
	h.mu.Lock()
	h.started = append(h.started, s)
	h.mu.Unlock()
	if err := s.setup(ctx, h, s); err != nil {
		return nil, err
	}
	// The proxy's login role: LOGIN NOINHERIT, a member of the suite's
	// roles, nothing else.
	stmts := []string{
		fmt.Sprintf("CREATE ROLE %s LOGIN NOINHERIT PASSWORD %s", ident(loginUser), literal(h.password)),
	}
	for _, r := range s.roles {
		stmts = append(stmts, fmt.Sprintf("GRANT %s TO %s", ident(r), ident(loginUser)))
	}
	return s, h.exec(ctx, s, "postgres", stmts...)
}

// fetch downloads the suite's module from the module proxy and copies it
// (with its _test.go files and testdata) into the work dir.
func (h *harness) fetch(ctx context.Context, s *suite) error {
	cmd := exec.CommandContext(ctx, "go", "mod", "download", "-json", s.module+"@"+s.version)
	cmd.Dir = h.work // outside any module
	cmd.Env = append(goEnv(), "GOFLAGS=-mod=mod")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("go mod download %s@%s: %w: %s", s.module, s.version, err, stderr.String())
	}
	var info struct{ Dir, Error string }
	if err := json.Unmarshal(out, &info); err != nil {
		return fmt.Errorf("go mod download: %w", err)
	}
	if info.Error != "" || info.Dir == "" {
		return fmt.Errorf("go mod download %s@%s: %s", s.module, s.version, info.Error)
	}
	// A stable directory keeps go's build cache warm between runs.
	s.src = filepath.Join(h.o.srcDir, s.key+"@"+s.version)
	if err := copyTree(info.Dir, s.src); err != nil {
		return err
	}
	// Build every test binary now (-exec true runs none), so that no
	// compilation competes with the timing-sensitive tests later.
	build := exec.CommandContext(ctx, "go", "test", "-count=1", "-exec", "true", "./...")
	build.Dir = s.src
	build.Env = goEnv()
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("build the tests of %s: %w: %s", s.module, err, tail(string(out), 20))
	}
	return nil
}

// copyTree copies a read-only module directory into a writable one.
func copyTree(from, to string) error {
	return filepath.WalkDir(from, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(from, p)
		if err != nil {
			return err
		}
		dst := filepath.Join(to, rel)
		if d.IsDir() {
			return os.MkdirAll(dst, 0o755)
		}
		if !d.Type().IsRegular() {
			return nil
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(dst, data, 0o644)
	})
}

// privateHosts prepares the suite's /etc/hosts lines without touching
// the machine's /etc/hosts: its go test runs in a mount namespace of its
// own (unshare -m, as root) with a copy of /etc/hosts bind-mounted over
// it. Without that, the tests that need the lines fail (reasons.txt).
func (h *harness) privateHosts(ctx context.Context, s *suite) {
	base, err := os.ReadFile("/etc/hosts")
	if err != nil {
		say("%s: /etc/hosts: %v", s.key, err)
		return
	}
	file := filepath.Join(h.work, s.key+"-hosts")
	content := strings.TrimRight(string(base), "\n") + "\n# " + s.title + "'s CI\n" + strings.Join(s.hosts, "\n") + "\n"
	if err := os.WriteFile(file, []byte(content), 0o644); err != nil {
		say("%s: %v", s.key, err)
		return
	}
	name := strings.Fields(s.hosts[0])[1]
	out, err := exec.CommandContext(ctx, "unshare", "-m", "sh", "-c", `mount --bind "$0" /etc/hosts && getent hosts "$1"`, file, name).CombinedOutput()
	if err != nil {
		say("%s: no private /etc/hosts (unshare -m needs root): %v %s", s.key, err, strings.TrimSpace(string(out)))
		return
	}
	s.hostsFile = file
}

// postgresOwner returns the uid/gid the server files must belong to: the
// postgres OS user when running as root (pgcluster runs the servers as
// that user), else -1.
func postgresOwner() (int, int) {
	if os.Geteuid() != 0 {
		return -1, -1
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return -1, -1
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return uid, gid
}

// writeServerFile writes a file the server reads (owned by the server's
// OS user, as PostgreSQL requires of its private key).
func writeServerFile(p string, data []byte, mode os.FileMode) error {
	if err := os.WriteFile(p, data, mode); err != nil {
		return err
	}
	if err := os.Chmod(p, mode); err != nil {
		return err
	}
	if uid, gid := postgresOwner(); uid >= 0 {
		return os.Chown(p, uid, gid)
	}
	return nil
}

func confString(v string) string { return "'" + strings.ReplaceAll(v, "'", "''") + "'" }
func ident(v string) string      { return pgx.Identifier{v}.Sanitize() }
func literal(v string) string    { return "'" + strings.ReplaceAll(v, "'", "''") + "'" }

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

// exec runs statements as the superuser in database db of the suite's cluster.
func (h *harness) exec(ctx context.Context, s *suite, db string, stmts ...string) error {
	conn, err := pgx.Connect(ctx, s.cluster.Primary.SuperuserURL(db))
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	for _, q := range stmts {
		if _, err := conn.Exec(ctx, q); err != nil {
			return fmt.Errorf("%s: %w", firstLine(q), err)
		}
	}
	return nil
}

// psql runs a psql script (the suites' set-up files use psql's
// meta-commands) as the superuser in database db.
func (h *harness) psql(ctx context.Context, s *suite, db string, script []byte) error {
	p := s.cluster.Primary
	cmd := exec.CommandContext(ctx, "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
		"-h", p.Host, "-p", strconv.Itoa(p.Port), "-U", "postgres", "-d", db, "-f", "-")
	cmd.Env = cleanEnv(os.Environ())
	cmd.Stdin = bytes.NewReader(script)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("psql: %w: %s", err, out)
	}
	return nil
}

func (h *harness) serverVersion(ctx context.Context, s *suite) string {
	conn, err := pgx.Connect(ctx, s.cluster.Primary.SuperuserURL("postgres"))
	if err != nil {
		return "unknown"
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var v string
	if err := conn.QueryRow(ctx, "SHOW server_version").Scan(&v); err != nil {
		return "unknown"
	}
	return v
}

// --- pgx ----------------------------------------------------------------------

// pgxServerCerts are testsetup/certs/*.b64 decoded into the server's
// files (pgx's scripts/devdb.rb), pgxClientCerts the client's (devenv.rb).
var (
	pgxServerCerts = map[string]string{"server.crt": "localhost.crt.b64", "server.key": "localhost.key.b64", "root.crt": "ca.pem.b64"}
	pgxClientCerts = map[string]string{"ca.pem": "ca.pem.b64", "pgx_sslcert.crt": "pgx_sslcert.crt.b64", "pgx_sslcert.key": "pgx_sslcert.key.b64"}
)

func decodeCerts(src, dstDir string, files map[string]string, server bool) error {
	if err := os.MkdirAll(dstDir, 0o755); err != nil {
		return err
	}
	for name, b64 := range files {
		raw, err := os.ReadFile(filepath.Join(src, b64))
		if err != nil {
			return err
		}
		data, err := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(string(raw)), ""))
		if err != nil {
			return fmt.Errorf("decode %s: %w", b64, err)
		}
		p := filepath.Join(dstDir, name)
		if server {
			err = writeServerFile(p, data, 0o600)
		} else {
			err = os.WriteFile(p, data, 0o600)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// sslPgx installs the server's TLS files as pgx's scripts/devdb.rb does
// (testsetup/postgresql_ssl.conf with the certificates of testsetup/certs).
func sslPgx(h *harness, s *suite) ([]string, error) {
	certs := filepath.Join(s.src, "testsetup", "certs")
	dir := filepath.Join(h.work, s.key+"-server")
	if err := decodeCerts(certs, dir, pgxServerCerts, true); err != nil {
		return nil, err
	}
	if err := decodeCerts(certs, filepath.Join(h.work, s.key+"-client"), pgxClientCerts, false); err != nil {
		return nil, err
	}
	return []string{
		"ssl = on",
		"ssl_cert_file = " + confString(filepath.Join(dir, "server.crt")),
		"ssl_key_file = " + confString(filepath.Join(dir, "server.key")),
		"ssl_ca_file = " + confString(filepath.Join(dir, "root.crt")),
	}, nil
}

// setupPgx is pgx's ci/setup_test.bash: createdb pgx_test, then
// testsetup/postgresql_setup.sql in it.
func setupPgx(ctx context.Context, h *harness, s *suite) error {
	if err := h.exec(ctx, s, "postgres", "CREATE DATABASE "+ident(s.db)); err != nil {
		return err
	}
	script, err := os.ReadFile(filepath.Join(s.src, "testsetup", "postgresql_setup.sql"))
	if err != nil {
		return err
	}
	return h.psql(ctx, s, s.db, script)
}

// envPgx is the PGX_TEST_* environment of pgx's scripts/lib/test_targets.rb
// (its CI's values). Through the proxy every password is the role's JWT,
// and the strings that need the server itself (its unix socket, its TLS,
// SCRAM channel binding over its TLS) stay unset.
func envPgx(h *harness, s *suite, mode, proxyAddr string) []string {
	p := s.cluster.Primary
	home := "HOME=" + filepath.Join(h.work, "home-"+s.key+"-"+mode)
	if mode == modeDirect {
		port := strconv.Itoa(p.Port)
		client := filepath.Join(h.work, s.key+"-client")
		ca := conninfoValue(filepath.Join(client, "ca.pem"))
		md5 := "host=127.0.0.1 port=" + port + " user=pgx_md5 password=secret dbname=pgx_test"
		return []string{
			home,
			"PGX_TEST_DATABASE=" + md5,
			"PGX_TEST_UNIX_SOCKET_CONN_STRING=host=" + conninfoValue(filepath.Join(s.cluster.Dir, "run")) + " port=" + port + " dbname=pgx_test",
			"PGX_TEST_TCP_CONN_STRING=" + md5,
			"PGX_TEST_MD5_PASSWORD_CONN_STRING=" + md5,
			"PGX_TEST_PLAIN_PASSWORD_CONN_STRING=host=127.0.0.1 port=" + port + " user=pgx_pw password=secret dbname=pgx_test",
			"PGX_TEST_SCRAM_PASSWORD_CONN_STRING=host=127.0.0.1 port=" + port + " user=pgx_scram password=secret dbname=pgx_test channel_binding=disable",
			"PGX_TEST_SCRAM_PLUS_CONN_STRING=host=localhost port=" + port + " user=pgx_ssl password=secret sslmode=verify-full sslrootcert=" + ca + " dbname=pgx_test channel_binding=require",
			"PGX_TEST_TLS_CONN_STRING=host=localhost port=" + port + " user=pgx_ssl password=secret sslmode=verify-full sslrootcert=" + ca + " dbname=pgx_test channel_binding=disable",
			"PGX_TEST_TLS_CLIENT_CONN_STRING=host=localhost port=" + port + " user=pgx_sslcert sslmode=verify-full sslrootcert=" + ca +
				" sslcert=" + conninfoValue(filepath.Join(client, "pgx_sslcert.crt")) + " sslkey=" + conninfoValue(filepath.Join(client, "pgx_sslcert.key")) + " dbname=pgx_test",
			"PGX_SSL_PASSWORD=certpw",
		}
	}
	host, port := splitAddr(proxyAddr)
	conn := func(role string, extra string) string {
		return "host=" + host + " port=" + port + " user=" + role + " password=" + s.tokens[role] + " dbname=pgx_test" + extra
	}
	md5 := conn("pgx_md5", "")
	return []string{
		home,
		"PGX_TEST_DATABASE=" + md5,
		"PGX_TEST_TCP_CONN_STRING=" + md5,
		"PGX_TEST_MD5_PASSWORD_CONN_STRING=" + md5,
		"PGX_TEST_PLAIN_PASSWORD_CONN_STRING=" + conn("pgx_pw", ""),
		"PGX_TEST_SCRAM_PASSWORD_CONN_STRING=" + conn("pgx_scram", " channel_binding=disable"),
	}
}

// conninfoValue quotes a keyword/value connection string value.
func conninfoValue(v string) string {
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(v) + "'"
}

func splitAddr(addr string) (string, string) {
	i := strings.LastIndex(addr, ":")
	return addr[:i], addr[i+1:]
}

// --- lib/pq -------------------------------------------------------------------

// sslPq installs testdata/ssl's server files as lib/pq's
// testdata/postgres/entry.sh does (its 20-config.sql turns TLS on).
func sslPq(h *harness, s *suite) ([]string, error) {
	dir := filepath.Join(h.work, s.key+"-server")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	matches, err := filepath.Glob(filepath.Join(s.src, "testdata", "ssl", "*.key"))
	if err != nil {
		return nil, err
	}
	crts, _ := filepath.Glob(filepath.Join(s.src, "testdata", "ssl", "*.crt"))
	for _, f := range append(matches, crts...) {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		if err := writeServerFile(filepath.Join(dir, filepath.Base(f)), data, 0o600); err != nil {
			return nil, err
		}
	}
	// The client key files of the checkout must not be group-readable.
	for _, f := range matches {
		if err := os.Chmod(f, 0o600); err != nil {
			return nil, err
		}
	}
	return nil, nil
}

// setupPq is what lib/pq's compose.yaml does: the postgres image creates
// the superuser pqgo and its database pqgo, then
// docker-entrypoint-initdb.d/20-config.sql runs (its /ssl2 paths pointing
// at the copied certificates) and the server reloads.
func setupPq(ctx context.Context, h *harness, s *suite) error {
	if err := h.exec(ctx, s, "postgres",
		"CREATE ROLE pqgo LOGIN SUPERUSER PASSWORD 'unused'",
		"CREATE DATABASE pqgo OWNER pqgo",
	); err != nil {
		return err
	}
	script, err := os.ReadFile(filepath.Join(s.src, "testdata", "postgres", "docker-entrypoint-initdb.d", "20-config.sql"))
	if err != nil {
		return err
	}
	dir := filepath.Join(h.work, s.key+"-server")
	script = bytes.ReplaceAll(script, []byte("'/ssl2/"), []byte("'"+dir+"/"))
	if err := h.psql(ctx, s, s.db, script); err != nil {
		return err
	}
	if err := h.exec(ctx, s, "postgres", "SELECT pg_reload_conf()"); err != nil {
		return err
	}
	// The reload is asynchronous: wait until TLS is on.
	for i := 0; i < 100; i++ {
		conn, err := pgx.Connect(ctx, s.cluster.Primary.SuperuserURL("postgres"))
		if err == nil {
			var on string
			err = conn.QueryRow(ctx, "SHOW ssl").Scan(&on)
			conn.Close(ctx)
			if err == nil && on == "on" {
				return nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return errors.New("ssl is still off after pg_reload_conf()")
}

// envPq is lib/pq's environment: PG* variables (pqtest defaults the rest:
// host localhost, user and database pqgo, sslmode disable). Through the
// proxy pqgo's JWT is in ~/.pgpass, where a libpq user would keep it:
// PGPASSWORD would show up in the configurations the suite compares.
func envPq(h *harness, s *suite, mode, proxyAddr string) []string {
	home := filepath.Join(h.work, "home-"+s.key+"-"+mode)
	if mode == modeDirect {
		return []string{"HOME=" + home, "PGPORT=" + strconv.Itoa(s.cluster.Primary.Port)}
	}
	_, port := splitAddr(proxyAddr)
	if err := os.WriteFile(filepath.Join(home, ".pgpass"), []byte("*:"+port+":*:pqgo:"+s.tokens["pqgo"]+"\n"), 0o600); err != nil {
		say("write .pgpass: %v", err)
	}
	return []string{"HOME=" + home, "PGPORT=" + port}
}

// --- cascata --------------------------------------------------------------------

// writeConfigs writes one cascata config per proxy mode: every suite is a
// project (ref = its database) whose roles are the suite's roles; every
// other setting is cascata's default.
func (h *harness) writeConfigs() error {
	secret := filepath.Join(h.work, "jwt_secret")
	if err := os.WriteFile(secret, []byte(randomHex(32)+"\n"), 0o600); err != nil {
		return err
	}
	h.config = map[string]string{}
	for _, mode := range []string{modeSession, modeTransaction} {
		suites := h.targets[mode]
		if len(suites) == 0 {
			continue
		}
		var b strings.Builder
		fmt.Fprintf(&b, "# Generated by scripts/compat-suites.\n[proxy]\nlisten = \"127.0.0.1:0\"\npool_mode = %q\n\n", mode)
		fmt.Fprintf(&b, "[admin]\nlisten = \"\"\n\n[state]\ndir = %q\n", filepath.Join(h.work, "state-"+mode))
		for _, s := range suites {
			p := s.cluster.Primary
			roles := make([]string, len(s.roles))
			for i, r := range s.roles {
				roles[i] = strconv.Quote(r)
			}
			fmt.Fprintf(&b, "\n[[projects]]\nref = %q\ndatabase_url = %q\nowner_url = %q\njwt_secret_file = %q\nroles = [%s]\nstorage_dir = %q\n",
				s.db, p.URL(loginUser, h.password, s.db), p.SuperuserURL(s.db), secret,
				strings.Join(roles, ", "), filepath.Join(h.work, "storage", s.db))
		}
		path := filepath.Join(h.work, "cascata-"+mode+".toml")
		if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
			return err
		}
		h.config[mode] = path
	}
	for _, path := range h.config {
		out, err := exec.Command(h.o.bin, "check", "-config", path).CombinedOutput()
		if err != nil {
			return fmt.Errorf("cascata check: %w: %s", err, out)
		}
	}
	return nil
}

// mintTokens mints a JWT for each role of each suite with `cascata token`
// (every mode's config has the same projects and secret).
func (h *harness) mintTokens(ctx context.Context, suites []*suite) error {
	var config string
	for _, c := range h.config {
		config = c
	}
	if config == "" {
		return nil // no proxy mode
	}
	for _, s := range suites {
		for _, r := range s.roles {
			out, err := exec.CommandContext(ctx, h.o.bin, "token", "-config", config,
				"-project", s.db, "-role", r, "-ttl", "24h").Output()
			if err != nil {
				return fmt.Errorf("cascata token -role %s: %w", r, err)
			}
			s.tokens[r] = strings.TrimSpace(string(out))
		}
	}
	return nil
}

type proxyProc struct {
	mode    string
	cmd     *exec.Cmd
	addr    string
	logPath string
	done    chan error
}

var listeningRE = regexp.MustCompile(`msg="cascata listening" proxy=(\S+)`)

// startProxy starts `cascata serve` in a mode and waits until it listens.
func (h *harness) startProxy(ctx context.Context, mode string) (*proxyProc, error) {
	px := &proxyProc{mode: mode, logPath: filepath.Join(h.work, "logs", "cascata-"+mode+".log"), done: make(chan error, 1)}
	logf, err := os.Create(px.logPath)
	if err != nil {
		return nil, err
	}
	px.cmd = exec.Command(h.o.bin, "serve", "-config", h.config[mode])
	px.cmd.Env = cleanEnv(os.Environ())
	if h.o.logProxy {
		px.cmd.Env = append(px.cmd.Env, "CASCATA_LOG_LEVEL=debug")
	}
	px.cmd.Stdout = logf
	px.cmd.Stderr = logf
	if err := px.cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	go func() { px.done <- px.cmd.Wait(); logf.Close() }()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		data, _ := os.ReadFile(px.logPath)
		if m := listeningRE.FindSubmatch(data); m != nil {
			px.addr = string(m[1])
			return px, nil
		}
		select {
		case err := <-px.done:
			return nil, fmt.Errorf("cascata serve exited (%v): %s", err, tail(string(data), 10))
		case <-ctx.Done():
			_ = px.cmd.Process.Kill()
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	_ = px.cmd.Process.Kill()
	return nil, errors.New("cascata serve did not listen within 60s")
}

// stopProxy stops the proxy with SIGTERM and records what it left: a
// panic in its log, backends still open on the servers.
func (h *harness) stopProxy(ctx context.Context, px *proxyProc, rep *report) {
	_ = px.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-px.done:
	case <-time.After(45 * time.Second):
		rep.note(px.mode, "cascata did not stop within 45s of SIGTERM; killed")
		_ = px.cmd.Process.Kill()
		<-px.done
	}
	if n := countLines(px.logPath, "panic"); n > 0 {
		rep.note(px.mode, fmt.Sprintf("cascata's log has %d lines mentioning a panic", n))
	}
	for _, s := range h.targets[px.mode] {
		conn, err := pgx.Connect(ctx, s.cluster.Primary.SuperuserURL("postgres"))
		if err != nil {
			continue
		}
		var n int
		err = conn.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", loginUser).Scan(&n)
		conn.Close(ctx)
		if err == nil && n > 0 {
			rep.note(px.mode, fmt.Sprintf("%d backends of %s's project still open after cascata stopped", n, s.title))
		} else if err == nil {
			rep.note(px.mode, fmt.Sprintf("no backend of %s's project left open after cascata stopped", s.title))
		}
	}
}

func countLines(path, word string) int {
	f, err := os.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	n := 0
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if strings.Contains(strings.ToLower(sc.Text()), word) {
			n++
		}
	}
	return n
}

// stopAll stops every cluster started.
func (h *harness) stopAll(ctx context.Context) {
	for _, s := range h.started {
		sctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		if err := s.cluster.Stop(sctx); err != nil {
			say("stop %s %s cluster: %v", s.key, s.mode, err)
		}
		cancel()
	}
	h.started = nil
}

// --- go test ----------------------------------------------------------------------

// goEnv is the environment of the go command: the caller's, without
// anything that steers libpq, pgx's or lib/pq's tests, and without a
// workspace or toolchain switch.
// The suites run with a HOME of their own (no ~/.pgpass or
// ~/.pg_service.conf of the machine's user), so go's caches are pinned.
func goEnv() []string {
	goDirsOnce.Do(func() {
		out, err := exec.Command("go", "env", "GOCACHE", "GOMODCACHE", "GOPATH").Output()
		if v := strings.Split(strings.TrimSpace(string(out)), "\n"); err == nil && len(v) == 3 {
			goDirs = []string{"GOCACHE=" + v[0], "GOMODCACHE=" + v[1], "GOPATH=" + v[2]}
		}
	})
	return append(append(cleanEnv(os.Environ()), "GOWORK=off", "GOTOOLCHAIN=local"), goDirs...)
}

var (
	goDirsOnce sync.Once
	goDirs     []string
)

func cleanEnv(env []string) []string {
	var out []string
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "PG") || strings.HasPrefix(k, "PQ") || k == "DATABASE_URL" ||
			k == "GOWORK" || k == "GOTOOLCHAIN" || k == "GOCACHE" || k == "GOMODCACHE" || k == "GOPATH" {
			continue
		}
		out = append(out, kv)
	}
	return out
}

// maxReruns bounds how often the tests a dead test binary left behind
// run again.
const maxReruns = 10

// runSuite runs `go test -json` over the suite's packages in one mode.
// When a package's test binary dies (a panic, or a test that hangs until
// -timeout), the tests it had not finished run again without the test
// that killed it, which stays counted as failed or unfinished.
func (h *harness) runSuite(ctx context.Context, s *suite, mode string, px *proxyProc, limit time.Duration) *runResult {
	r := newRunResult(s, mode)
	start := time.Now()
	deadline := start.Add(limit)
	addr := ""
	if px != nil {
		addr = px.addr
	}
	if err := os.MkdirAll(filepath.Join(h.work, "home-"+s.key+"-"+mode), 0o755); err != nil {
		r.err = err
		return r
	}
	env := append(goEnv(), s.env(h, s, mode, addr)...)
	base := []string{"test", "-json", "-count=1", "-timeout", h.o.testTimeout.String()}
	if h.o.skip != "" {
		base = append(base, "-skip", h.o.skip)
	}
	args := append([]string(nil), base...)
	if h.o.run != "" {
		args = append(args, "-run", h.o.run)
	}
	args = append(args, strings.Fields(h.o.pkgs)...)
	name := s.key + "-" + mode
	r.err = h.goTest(ctx, s, r, env, args, limit, name)
	r.checkMain(r)

	latest := r
	tried := map[string]string{}
	for i := 1; i <= maxReruns && r.outerTimeout == 0 && ctx.Err() == nil; i++ {
		plans := r.rerunPlans(latest, func(importPath string) ([]string, error) {
			return h.listTests(ctx, s, env, importPath)
		})
		next := newRunResult(s, mode)
		ran := false
		for _, pl := range plans {
			key := strings.Join(pl.tests, "|")
			if len(pl.tests) == 0 || tried[pl.pkg.name] == key {
				continue
			}
			tried[pl.pkg.name] = key
			left := time.Until(deadline)
			if left < 30*time.Second {
				pl.pkg.reruns = append(pl.pkg.reruns, fmt.Sprintf("%d tests not run again: the run's time limit was reached", len(pl.tests)))
				continue
			}
			pl.pkg.reruns = append(pl.pkg.reruns, fmt.Sprintf("its test binary died (%s); the %d tests it had not finished ran again", pl.cause, len(pl.tests)))
			rargs := append(append([]string(nil), base...), "-run", "^("+key+")$", pl.pkg.importPath)
			if err := h.goTest(ctx, s, next, env, rargs, left, fmt.Sprintf("%s-rerun%d-%s", name, i, strings.ReplaceAll(pl.pkg.name, "/", "_"))); err != nil && r.err == nil {
				r.err = err
			}
			if next.outerTimeout > 0 {
				r.outerTimeout = next.outerTimeout
			}
			ran = true
		}
		if !ran {
			break
		}
		r.merge(next)
		r.checkMain(next)
		latest = next
	}
	r.elapsed = time.Since(start)
	r.finish()
	r.writeFailures(filepath.Join(h.work, "logs", name+"-failures.txt"))
	return r
}

// goTest runs one `go test -json` into r, with an outer limit that kills
// go test and the test binaries it started.
func (h *harness) goTest(ctx context.Context, s *suite, r *runResult, env, args []string, limit time.Duration, logName string) error {
	cmd := exec.Command("go", args...)
	if s.hostsFile != "" {
		cmd = exec.Command("unshare", append([]string{"-m", "sh", "-c", `mount --bind "$0" /etc/hosts && exec "$@"`, s.hostsFile, "go"}, args...)...)
	}
	cmd.Dir = s.src
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	jf, err := os.Create(filepath.Join(h.work, "logs", logName+".json"))
	if err != nil {
		return err
	}
	defer jf.Close()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	timer := time.AfterFunc(limit, func() {
		r.outerTimeout = limit
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	})
	stopCtx := context.AfterFunc(ctx, func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) })
	r.parse(io.TeeReader(stdout, jf))
	werr := cmd.Wait()
	timer.Stop()
	stopCtx()
	if stderr.Len() > 0 {
		_ = os.WriteFile(filepath.Join(h.work, "logs", logName+".stderr"), stderr.Bytes(), 0o644)
	}
	if werr != nil && r.outerTimeout == 0 && ctx.Err() == nil {
		var ee *exec.ExitError
		if !errors.As(werr, &ee) || len(r.pkgs) == 0 {
			return fmt.Errorf("go test: %v: %s", werr, tail(stderr.String(), 20))
		}
	}
	return nil
}

// listTests lists the top-level tests of a package (go test -list).
func (h *harness) listTests(ctx context.Context, s *suite, env []string, importPath string) ([]string, error) {
	pattern := "."
	if h.o.run != "" && !strings.Contains(h.o.run, "/") {
		pattern = h.o.run
	}
	cmd := exec.CommandContext(ctx, "go", "test", "-count=1", "-list", pattern, importPath)
	cmd.Dir = s.src
	cmd.Env = env
	// A TestMain may fail after listing (lib/pq's checks for connections
	// left open): the list is still good.
	out, err := cmd.Output()
	var tests []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "Test") || strings.HasPrefix(l, "Example") || strings.HasPrefix(l, "Fuzz") {
			tests = append(tests, strings.TrimSpace(l))
		}
	}
	if len(tests) == 0 && err != nil {
		return nil, fmt.Errorf("go test -list %s: %w", importPath, err)
	}
	return tests, nil
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	return l
}
