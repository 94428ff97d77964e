package pgcluster

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// Server is one PostgreSQL server (postmaster) of a Cluster.
type Server struct {
	// Name is "primary" or "replica".
	Name string
	// DataDir is the absolute data directory.
	DataDir string
	// Host is the TCP address the server listens on, always "127.0.0.1".
	Host string
	// Port is the TCP port the server listens on.
	Port int
	// LogFile is the server's log file (appended to on every start).
	LogFile string

	env *env
}

// Addr returns "host:port" of the server.
func (s *Server) Addr() string {
	return net.JoinHostPort(s.Host, strconv.Itoa(s.Port))
}

// URL returns a postgres:// connection URL for user and database db with
// sslmode=disable; password is omitted when empty. Parts are URL-escaped.
func (s *Server) URL(user, password, db string) string {
	u := url.URL{Scheme: "postgres", Host: s.Addr(), Path: "/" + db, RawQuery: "sslmode=disable"}
	if password != "" {
		u.User = url.UserPassword(user, password)
	} else {
		u.User = url.User(user)
	}
	return u.String()
}

// SuperuserURL returns the URL of the superuser "postgres" (trusted on
// 127.0.0.1, no password) for database db.
func (s *Server) SuperuserURL(db string) string {
	return s.URL("postgres", "", db)
}

// Stop stops the server with `pg_ctl stop -m mode` ("smart", "fast" or
// "immediate") and waits for it to exit. Stopping a stopped server is a
// no-op.
func (s *Server) Stop(ctx context.Context, mode string) error {
	switch mode {
	case "smart", "fast", "immediate":
	default:
		return fmt.Errorf("stop %s: unknown mode %q", s.Name, mode)
	}
	running, err := s.running(ctx)
	if err != nil {
		return fmt.Errorf("stop %s: %w", s.Name, err)
	}
	if !running {
		return nil
	}
	if _, err := s.env.run.run(ctx, s.env.bins.PgCtl, "stop", "-D", s.DataDir, "-m", mode, "-w", "-t", "60"); err != nil {
		return fmt.Errorf("stop %s: %w", s.Name, err)
	}
	s.env.log.Info("postgres stopped", "server", s.Name, "port", s.Port, "mode", mode)
	return nil
}

// Start starts the server again (after Stop) on the same port and waits
// until it accepts connections. Starting a running server is a no-op.
func (s *Server) Start(ctx context.Context) error {
	running, err := s.running(ctx)
	if err != nil {
		return fmt.Errorf("start %s: %w", s.Name, err)
	}
	if running {
		return nil
	}
	if _, err := s.start(ctx); err != nil {
		return err
	}
	return nil
}

// running reports whether pg_ctl sees a live postmaster for the data dir.
func (s *Server) running(ctx context.Context) (bool, error) {
	if !fileExists(filepath.Join(s.DataDir, "PG_VERSION")) {
		return false, nil // removed or never created
	}
	_, err := s.env.run.run(ctx, s.env.bins.PgCtl, "status", "-D", s.DataDir)
	switch {
	case err == nil:
		return true, nil
	case exitCode(err) == 3:
		return false, nil
	default:
		return false, err
	}
}

// start runs `pg_ctl start -w` and waits for readiness. portBusy reports a
// failure caused by the TCP port being taken.
func (s *Server) start(ctx context.Context) (portBusy bool, err error) {
	offset := fileSize(s.LogFile)
	_, err = s.env.run.run(ctx, s.env.bins.PgCtl, "start", "-D", s.DataDir, "-l", s.LogFile, "-w", "-t", "60")
	if err == nil {
		err = s.waitReady(ctx)
	}
	if err != nil {
		logs := s.logSince(offset)
		busy := strings.Contains(logs, "Address already in use") ||
			strings.Contains(logs, "could not create any TCP/IP sockets")
		// A half-started server must not linger.
		_ = s.Stop(context.WithoutCancel(ctx), "immediate")
		return busy, fmt.Errorf("start %s on port %d: %w\nserver log (%s):\n%s", s.Name, s.Port, err, s.LogFile, tailLines(logs, 20))
	}
	s.env.log.Info("postgres started", "server", s.Name, "addr", s.Addr(), "datadir", s.DataDir)
	return false, nil
}

// waitReady retries a superuser connection until it works (30s at most).
func (s *Server) waitReady(ctx context.Context) error {
	return waitConnect(ctx, s.SuperuserURL("postgres"), 30*time.Second)
}

// waitConnect retries a connection to url and a SELECT 1 on it until both
// work, for d at most.
func waitConnect(ctx context.Context, url string, d time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	for {
		conn, err := connect(ctx, url)
		if err == nil {
			_, err = conn.Exec(ctx, "SELECT 1")
			_ = conn.Close(context.WithoutCancel(ctx))
			if err == nil {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for connections: %w", err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// logSince returns the log written after offset (at most the last 64 KiB).
func (s *Server) logSince(offset int64) string {
	f, err := os.Open(s.LogFile)
	if err != nil {
		return ""
	}
	defer f.Close()
	if size := fileSize(s.LogFile); size-offset > 64<<10 {
		offset = size - 64<<10
	}
	if _, err := f.Seek(offset, io.SeekStart); err != nil {
		return ""
	}
	b, _ := io.ReadAll(f)
	return string(b)
}

// logTail returns the last lines of the server log.
func (s *Server) logTail() string {
	return tailLines(s.logSince(0), 20)
}

// writeConf (re)writes cascata.conf, the settings cascata manages, which
// postgresql.conf includes last.
func (s *Server) writeConf() error {
	o := s.env.opts
	walLevel := "replica"
	if o.Logical {
		walLevel = "logical"
	}
	lines := []string{
		"# Managed by cascata pgcluster; rewritten on every start.",
		"listen_addresses = '127.0.0.1'",
		fmt.Sprintf("port = %d", s.Port),
		"unix_socket_directories = " + confString(s.env.sockDir),
		"wal_level = " + walLevel,
		"max_wal_senders = 10",
		"max_replication_slots = 10",
		"hot_standby = on",
		"hot_standby_feedback = on",
		"fsync = off",
		fmt.Sprintf("max_connections = %d", o.MaxConnections),
		"shared_buffers = '32MB'",
		"password_encryption = 'scram-sha-256'",
		"shared_preload_libraries = ''",
		"logging_collector = off",
		"log_line_prefix = '%m [%p] %q%u@%d '",
		"lc_messages = 'C'",
	}
	if s.Name == replicaName && o.ReplicaApplyDelay > 0 {
		lines = append(lines, fmt.Sprintf("recovery_min_apply_delay = '%dms'", o.ReplicaApplyDelay.Milliseconds()))
	}
	lines = append(lines, o.ExtraConf...)
	return s.env.run.writeFile(filepath.Join(s.DataDir, "cascata.conf"), []byte(strings.Join(lines, "\n")+"\n"))
}

// confString quotes a postgresql.conf string value.
func confString(v string) string {
	return "'" + strings.ReplaceAll(v, "'", "''") + "'"
}

func fileSize(p string) int64 {
	fi, err := os.Stat(p)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// connect opens a pgx connection with a short connect timeout.
func connect(ctx context.Context, connURL string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(connURL)
	if err != nil {
		return nil, fmt.Errorf("parse url: %w", err)
	}
	cfg.ConnectTimeout = 5 * time.Second
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect %s: %w", cfg.Host, err)
	}
	return conn, nil
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago
// (found by binding port 0 and closing the listener).
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("free port: %w", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		return 0, fmt.Errorf("free port: %w", err)
	}
	return port, nil
}

// portFree reports whether port can be bound on 127.0.0.1 right now.
func portFree(port int) error {
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return fmt.Errorf("port %d is busy: %w", port, err)
	}
	return l.Close()
}
