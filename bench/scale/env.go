package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"cascata/internal/pgcluster"
)

// project is one [[projects]] table of the generated configuration.
type project struct {
	ref    string
	db     string
	secret []byte
}

// world is what the run set up: the PostgreSQL cluster, the projects and
// the cascata process.
type world struct {
	dir        string
	cluster    *pgcluster.Cluster
	pgVersion  string
	load       []project // carry the clients
	probe      []project // stay without clients until probed
	proxyAddr  string
	adminURL   string
	adminToken string
	cfgPath    string
	logPath    string
	cmd        *exec.Cmd
	exited     chan struct{}
	gone       atomic.Bool // cascata exited
	nofile     string
	baseRSS    int64  // KiB, before any client
	floorURL   string // a direct SCRAM login to PostgreSQL, not as authenticator
}

// floorRole is the login of the direct logins timed beside the probes.
const floorRole = "scale_floor"

// randomText returns n random characters (base32, 5 bits each).
func randomText(n int) string {
	var b strings.Builder
	for b.Len() < n {
		b.WriteString(rand.Text())
	}
	return b.String()[:n]
}

// raiseNoFile lifts this process's RLIMIT_NOFILE to at least want.
func raiseNoFile(want uint64) error {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fmt.Errorf("getrlimit: %w", err)
	}
	if lim.Cur >= want {
		return nil
	}
	next := syscall.Rlimit{Cur: want, Max: max(lim.Max, want)}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &next); err != nil {
		return fmt.Errorf("raise RLIMIT_NOFILE from %d/%d to %d (run as root or raise the hard limit): %w", lim.Cur, lim.Max, want, err)
	}
	return nil
}

// startPostgres starts the cluster and creates the databases, all of them
// reachable by the NOINHERIT login role authenticator.
func startPostgres(ctx context.Context, w *world, o *options) (password string, err error) {
	w.cluster, err = pgcluster.Start(ctx, pgcluster.Options{
		Dir:            filepath.Join(w.dir, "pg"),
		MaxConnections: max(200, o.hostCap+60),
		ExtraConf:      []string{"shared_buffers = '128MB'"},
		Logger:         slog.New(slog.DiscardHandler),
	})
	if err != nil {
		return "", fmt.Errorf("start postgres: %w", err)
	}
	password = randomText(32)
	for i := range o.databases {
		spec := pgcluster.ProjectSpec{Database: fmt.Sprintf("scale_%d", i), LoginPassword: password}
		if err := pgcluster.SetupProject(ctx, w.cluster.Primary, spec); err != nil {
			return "", fmt.Errorf("set up database %s: %w", spec.Database, err)
		}
	}
	conn, err := superuser(ctx, w)
	if err != nil {
		return "", err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if err := conn.QueryRow(ctx, "SHOW server_version").Scan(&w.pgVersion); err != nil {
		return "", fmt.Errorf("server version: %w", err)
	}
	// The direct logins timed beside the probes use a SCRAM login of their
	// own, to the postgres database, so that the sampler, which counts
	// authenticator's backends and the logins to the projects' databases,
	// sees cascata's alone.
	if _, err := conn.Exec(ctx, fmt.Sprintf("CREATE ROLE %s LOGIN PASSWORD '%s'", floorRole, password)); err != nil {
		return "", fmt.Errorf("create role %s: %w", floorRole, err)
	}
	w.floorURL = fmt.Sprintf("postgres://%s:%s@127.0.0.1:%d/postgres?sslmode=disable", floorRole, password, w.cluster.Primary.Port)
	return password, nil
}

// writeConfig writes cascata.toml: every project its own ref, JWT secret
// and pool; the projects share o.databases databases.
func writeConfig(w *world, o *options, password string) error {
	mk := func(prefix string, n, offset int) []project {
		out := make([]project, n)
		for i := range out {
			out[i] = project{ref: fmt.Sprintf("%s_%04d", prefix, i), db: fmt.Sprintf("scale_%d", (i+offset)%o.databases), secret: []byte(randomText(64))}
		}
		return out
	}
	w.load = mk("p", o.projects, 0)
	w.probe = mk("fresh", o.probeProjects, o.projects)
	proxyPort, err1 := pgcluster.FreePort()
	adminPort, err2 := pgcluster.FreePort()
	if err := errors.Join(err1, err2); err != nil {
		return fmt.Errorf("free ports: %w", err)
	}
	w.proxyAddr = fmt.Sprintf("127.0.0.1:%d", proxyPort)
	w.adminURL = fmt.Sprintf("http://127.0.0.1:%d", adminPort)
	w.adminToken = randomText(40)
	maxClients := o.steps[len(o.steps)-1] + o.busyProjects*o.busyPer + 1000
	var b strings.Builder
	fmt.Fprintf(&b, `[proxy]
listen = %q
pool_mode = "transaction"
max_client_conn = %d
max_server_conn_per_host = %d
server_idle_timeout = %q
query_wait_timeout = "30s"
shutdown_timeout = "5s"

[admin]
listen = "127.0.0.1:%d"
token_env = "SCALE_ADMIN_TOKEN"

[state]
dir = %q

[provision]
storage_root = %q
`, w.proxyAddr, maxClients, o.hostCap, o.idleTimeout.String(), adminPort,
		filepath.Join(w.dir, "state"), filepath.Join(w.dir, "storage"))
	port := w.cluster.Primary.Port
	for _, p := range append(append([]project{}, w.load...), w.probe...) {
		fmt.Fprintf(&b, `
[[projects]]
ref = %q
database_url = "postgres://authenticator:%s@127.0.0.1:%d/%s?sslmode=disable"
jwt_secret = %q
pool_size = %d
`, p.ref, password, port, p.db, p.secret, o.poolSize)
	}
	w.cfgPath = filepath.Join(w.dir, "cascata.toml")
	if err := os.WriteFile(w.cfgPath, []byte(b.String()), 0o600); err != nil {
		return fmt.Errorf("write config: %w", err)
	}
	return nil
}

// startCascata runs `cascata serve` from a shell that raised its open-file
// limit, and waits until the admin plane answers /healthz.
func startCascata(ctx context.Context, w *world, o *options) error {
	w.logPath = filepath.Join(w.dir, "cascata.log")
	logf, err := os.Create(w.logPath)
	if err != nil {
		return fmt.Errorf("cascata log: %w", err)
	}
	defer logf.Close()
	bin, err := filepath.Abs(o.cascataBin)
	if err != nil {
		return fmt.Errorf("cascata binary: %w", err)
	}
	// 65536, or the hard limit where it is lower and cannot be raised.
	w.cmd = exec.Command("/bin/sh", "-c", `ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"; exec "$0" serve -config "$1"`, bin, w.cfgPath)
	w.cmd.Env = append(os.Environ(), "SCALE_ADMIN_TOKEN="+w.adminToken)
	w.cmd.Stdout, w.cmd.Stderr = logf, logf
	if err := w.cmd.Start(); err != nil {
		return fmt.Errorf("start cascata: %w", err)
	}
	w.exited = make(chan struct{})
	go func() {
		_ = w.cmd.Wait()
		w.gone.Store(true)
		close(w.exited)
	}()
	deadline := time.Now().Add(3 * time.Minute)
	for time.Now().Before(deadline) {
		select {
		case <-w.exited:
			return fmt.Errorf("cascata exited during start-up: %s", tail(w.logPath, 15))
		case <-ctx.Done():
			return fmt.Errorf("waiting for cascata: %w", ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
		resp, err := http.Get(w.adminURL + "/healthz")
		if err != nil {
			continue
		}
		_ = resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			w.nofile = openFileLimit(w.cmd.Process.Pid)
			need := o.steps[len(o.steps)-1] + o.busyProjects*o.busyPer + 2*o.hostCap + 200
			if n, err := strconv.Atoi(w.nofile); err == nil && n < need {
				return fmt.Errorf("cascata's open files limit is %d, the run needs %d", n, need)
			}
			return nil
		}
	}
	return fmt.Errorf("cascata not healthy after 3 minutes: %s", tail(w.logPath, 15))
}

// alive reports whether cascata still runs.
func (w *world) alive() bool { return !w.gone.Load() }

// stopCascata sends SIGTERM and waits (then SIGKILL).
func stopCascata(w *world) {
	if w.cmd == nil || w.cmd.Process == nil || !w.alive() {
		return
	}
	_ = w.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-w.exited:
	case <-time.After(20 * time.Second):
		_ = w.cmd.Process.Kill()
		<-w.exited
	}
}

// openFileLimit is the "Max open files" soft limit of a process.
func openFileLimit(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		return "?"
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "Max open files"); ok {
			if f := strings.Fields(rest); len(f) > 0 {
				return f[0]
			}
		}
	}
	return "?"
}

// tail is the last n lines of a file, for error messages.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
