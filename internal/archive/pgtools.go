package archive

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"cascata/internal/pgcluster"

	"github.com/jackc/pgx/v5"
)

// findTool returns the path of a PostgreSQL client program: in binDir when
// given, else next to the server binaries pgcluster finds (the newest
// installed version), else on PATH.
func findTool(ctx context.Context, binDir, name string) (string, error) {
	if binDir != "" {
		p := filepath.Join(binDir, name)
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("find %s: %w", name, err)
		}
		return p, nil
	}
	if b, err := pgcluster.FindBinaries(ctx); err == nil && b.Dir != "" {
		p := filepath.Join(b.Dir, name)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	p, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("find %s (install the postgresql client, or set the bin dir): %w", name, err)
	}
	return p, nil
}

// libpqParams are the query parameters passed on to pg_dump/pg_restore;
// others (pgx-only settings) are dropped because libpq refuses them.
var libpqParams = map[string]bool{
	"sslmode": true, "sslrootcert": true, "sslcert": true, "sslkey": true, "sslcrl": true,
	"sslpassword": true, "sslnegotiation": true, "sslsni": true, "connect_timeout": true,
	"application_name": true, "options": true, "target_session_attrs": true,
	"channel_binding": true, "gssencmode": true, "host": true, "port": true, "hostaddr": true,
	"keepalives": true, "keepalives_idle": true, "keepalives_interval": true, "keepalives_count": true,
	"tcp_user_timeout": true, "krbsrvname": true, "require_auth": true,
}

// libpqTarget splits a postgres URL into one without password (safe on a
// command line) and the password (passed as PGPASSWORD), for database db
// ("" keeps the URL's).
func libpqTarget(rawURL, db string) (connURL, password string, err error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return "", "", errors.New("invalid postgres URL")
	}
	if u.Scheme != "postgres" && u.Scheme != "postgresql" {
		return "", "", errors.New("URL must start with postgres://")
	}
	if u.User != nil {
		password, _ = u.User.Password()
		u.User = url.User(u.User.Username())
	}
	if db != "" {
		u.Path = "/" + db
		u.RawPath = ""
	}
	q := u.Query()
	for k := range q {
		if !libpqParams[k] {
			q.Del(k)
		}
	}
	u.RawQuery = q.Encode()
	return u.String(), password, nil
}

// withDatabase returns rawURL with its database replaced.
func withDatabase(rawURL, db string) (string, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return "", errors.New("invalid postgres URL")
	}
	u.Path = "/" + db
	u.RawPath = ""
	return u.String(), nil
}

// runTool runs a PostgreSQL client program with a clean environment (no
// inherited PG* variables) plus PGPASSWORD. The error carries the tail of
// its output.
func runTool(ctx context.Context, password, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	env := []string{"LC_ALL=C", "PGCONNECT_TIMEOUT=10"}
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "PG") || strings.HasPrefix(kv, "LC_") || strings.HasPrefix(kv, "LANG=") {
			continue
		}
		env = append(env, kv)
	}
	if password != "" {
		env = append(env, "PGPASSWORD="+password)
	}
	cmd.Env = env
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("%s: %w", filepath.Base(name), ctx.Err())
		}
		return fmt.Errorf("%s: %w: %s", filepath.Base(name), err, tail(out.String(), 20))
	}
	return nil
}

// toolVersion returns the first line of `name --version`.
func toolVersion(ctx context.Context, name string) (string, error) {
	out, err := exec.CommandContext(ctx, name, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("%s --version: %w", filepath.Base(name), err)
	}
	return strings.TrimSpace(string(out)), nil
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// connect opens a pgx connection with a bounded connect timeout.
func connect(ctx context.Context, connURL string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(connURL)
	if err != nil {
		return nil, errors.New("parse postgres URL: invalid")
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 10 * time.Second
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to %s/%s as %s: %w", cfg.Host, cfg.Database, cfg.User, err)
	}
	return conn, nil
}

func ident(parts ...string) string { return pgx.Identifier(parts).Sanitize() }
