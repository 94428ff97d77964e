// Package pgtools runs the PostgreSQL client programs (pg_dump, pg_restore,
// psql) for the archive and the ejection.
//
// A child program gets an explicit environment, never Cascata's own: PATH,
// a fixed locale and the PG* variables of the one connection it makes (the
// password travels in PGPASSWORD, never on the command line). Cascata's
// environment holds the admin token, the login password and every
// project's JWT secret; none of it reaches a child, where any process of
// the same user could read it in /proc/<pid>/environ.
package pgtools

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
	"sync"
	"time"
)

// Find returns the path of a PostgreSQL client program: in binDir when
// given, else next to the server binaries (serverBinDir, when not empty),
// else on PATH.
func Find(binDir, serverBinDir, name string) (string, error) {
	if binDir != "" {
		p := filepath.Join(binDir, name)
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("find %s: %w", name, err)
		}
		return p, nil
	}
	if serverBinDir != "" {
		p := filepath.Join(serverBinDir, name)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	p, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("find %s (install the PostgreSQL client programs, or set the bin dir): %w", name, err)
	}
	return p, nil
}

// libpqParams are the URL query parameters passed on to a child; others
// (pgx-only settings) are dropped because libpq refuses them.
var libpqParams = map[string]bool{
	"sslmode": true, "sslrootcert": true, "sslcert": true, "sslkey": true, "sslcrl": true,
	"sslpassword": true, "sslnegotiation": true, "sslsni": true, "connect_timeout": true,
	"application_name": true, "options": true, "target_session_attrs": true,
	"channel_binding": true, "gssencmode": true, "host": true, "port": true, "hostaddr": true,
	"keepalives": true, "keepalives_idle": true, "keepalives_interval": true, "keepalives_count": true,
	"tcp_user_timeout": true, "krbsrvname": true, "require_auth": true,
}

// Target is one connection of a child program: a URL without password
// (safe on a command line) and the password, which goes into PGPASSWORD.
type Target struct {
	URL      string
	password string
}

// ParseTarget splits a postgres URL into a Target, for database db ("" keeps
// the URL's). Query parameters libpq does not know are dropped.
func ParseTarget(rawURL, db string) (Target, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return Target{}, errors.New("invalid postgres URL")
	}
	if u.Scheme != "postgres" && u.Scheme != "postgresql" {
		return Target{}, errors.New("URL must start with postgres://")
	}
	var t Target
	if u.User != nil {
		t.password, _ = u.User.Password()
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
	if q.Get("sslpassword") != "" {
		// A key passphrase is a secret too: not on the command line.
		q.Del("sslpassword")
	}
	u.RawQuery = q.Encode()
	t.URL = u.String()
	return t, nil
}

// allowedParentEnv are the variables a child inherits from Cascata.
var allowedParentEnv = []string{"PATH"}

// Env is the whole environment of a child connecting to t: PATH, the C
// locale (stable messages, which errors quote), a connect timeout and the
// password of this connection. A zero Target (a program that connects to
// nothing, like pg_restore --list) gets no PG* variable at all.
func Env(t Target) []string {
	env := make([]string, 0, 5)
	for _, k := range allowedParentEnv {
		if v, ok := os.LookupEnv(k); ok {
			env = append(env, k+"="+v)
		}
	}
	env = append(env, "LC_ALL=C", "LANG=C")
	if t.URL != "" {
		env = append(env, "PGCONNECT_TIMEOUT=10")
		if t.password != "" {
			env = append(env, "PGPASSWORD="+t.password)
		}
	}
	return env
}

// Command returns the command running program bin with args; when t has a
// URL, --dbname=<URL without password> comes first and the password is in
// the environment. The command is killed when ctx ends (after a grace of
// WaitDelay for its pipes).
func Command(ctx context.Context, t Target, bin string, args ...string) *exec.Cmd {
	if t.URL != "" {
		args = append([]string{"--dbname=" + t.URL}, args...)
	}
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = Env(t)
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// Run runs the command built by Command and returns an error carrying the
// tail of its output when it fails.
func Run(ctx context.Context, t Target, bin string, args ...string) error {
	_, err := Output(ctx, t, bin, args...)
	return err
}

// Output is Run returning the program's standard output.
func Output(ctx context.Context, t Target, bin string, args ...string) ([]byte, error) {
	cmd := Command(ctx, t, bin, args...)
	var out bytes.Buffer
	errs := &TailBuffer{}
	cmd.Stdout = &out
	cmd.Stderr = errs
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%s: %w", filepath.Base(bin), ctx.Err())
		}
		return nil, fmt.Errorf("%s: %w: %s", filepath.Base(bin), err, errs.String())
	}
	return out.Bytes(), nil
}

// Version returns the first line of `bin --version`.
func Version(ctx context.Context, bin string) (string, error) {
	out, err := Output(ctx, Target{}, bin, "--version")
	if err != nil {
		return "", err
	}
	first, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return first, nil
}

// TailBuffer keeps the last 4 KiB written to it (a child's stderr).
type TailBuffer struct {
	mu  sync.Mutex
	buf []byte
}

func (b *TailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	if n := len(b.buf) - 4096; n > 0 {
		b.buf = b.buf[n:]
	}
	return len(p), nil
}

// String returns what was kept, without surrounding white space.
func (b *TailBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.TrimSpace(string(b.buf))
}
