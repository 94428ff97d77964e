package pgcluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

const (
	primaryName = "primary"
	replicaName = "replica"
	slotName    = "cascata_replica"
	stateFile   = "cluster.json"
	// maxSocketPath is the longest unix socket path PostgreSQL accepts
	// (sizeof(sun_path) - 1).
	maxSocketPath = 107
)

// Options configures Start.
type Options struct {
	// Dir is the cluster's base directory; "" means a new temporary
	// directory which Stop removes. A Dir holding a complete cluster
	// (cluster.json present) is started again on its recorded ports.
	Dir string
	// Replica adds a streaming replica fed through a replication slot.
	// Restarting a kept Dir without Replica leaves its replica stopped.
	Replica bool
	// ReplicaApplyDelay sets the replica's recovery_min_apply_delay when
	// non-zero.
	ReplicaApplyDelay time.Duration
	// Logical sets wal_level = logical instead of replica.
	Logical bool
	// MaxConnections sets max_connections; 0 means 200.
	MaxConnections int
	// ExtraConf holds extra postgresql.conf lines for the primary and the
	// replica, applied after cascata's own settings.
	ExtraConf []string
	// Logger receives progress messages; nil discards them.
	Logger *slog.Logger
	// KeepDir makes Cluster.Stop leave Dir in place (the demo keeps its
	// cluster between runs).
	KeepDir bool
}

// Cluster is a running primary and, optionally, its streaming replica.
type Cluster struct {
	// Dir is the absolute base directory of the cluster.
	Dir string
	// Primary is the read-write server.
	Primary *Server
	// Replica is the streaming hot standby, nil without Options.Replica.
	Replica *Server

	env     *env
	tempDir bool // Dir was created by Start with os.MkdirTemp
}

// env is what the servers of one cluster share.
type env struct {
	bins    *Binaries
	run     *runner
	log     *slog.Logger
	opts    Options
	dir     string
	sockDir string
}

// state is the content of cluster.json.
type state struct {
	PrimaryPort int `json:"primary_port"`
	ReplicaPort int `json:"replica_port,omitempty"`
}

// Start creates (or, for a Dir holding a complete cluster, restarts) a
// primary and an optional replica, and returns once both accept connections
// and the replica streams from the primary. On failure everything Start
// started is stopped and the error includes the tail of the server log.
func Start(ctx context.Context, opts Options) (_ *Cluster, err error) {
	if opts.MaxConnections <= 0 {
		opts.MaxConnections = 200
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	bins, err := FindBinaries(ctx)
	if err != nil {
		return nil, fmt.Errorf("start cluster: %w", err)
	}

	c := &Cluster{Dir: opts.Dir}
	if c.Dir == "" {
		c.Dir, err = os.MkdirTemp("", "cascata-pg-")
		if err != nil {
			return nil, fmt.Errorf("start cluster: %w", err)
		}
		c.tempDir = true
	} else if c.Dir, err = filepath.Abs(c.Dir); err != nil {
		return nil, fmt.Errorf("start cluster: %w", err)
	} else if err = os.MkdirAll(c.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("start cluster: %w", err)
	}
	run, err := newRunner(c.Dir)
	if err == nil {
		err = run.chown(c.Dir)
	}
	if err == nil {
		err = run.checkTraversable(c.Dir)
	}
	if err != nil {
		if c.tempDir {
			_ = os.RemoveAll(c.Dir)
		}
		return nil, fmt.Errorf("start cluster: %w", err)
	}
	c.env = &env{bins: bins, run: run, log: opts.Logger, opts: opts, dir: c.Dir, sockDir: filepath.Join(c.Dir, "run")}

	existing, err := readState(c.Dir)
	if err != nil {
		return nil, fmt.Errorf("start cluster: %w", err)
	}
	fresh := existing == nil
	defer func() {
		if err == nil {
			return
		}
		c.abort(context.WithoutCancel(ctx), fresh)
	}()
	if fresh {
		if _, statErr := os.Stat(filepath.Join(c.Dir, primaryName, "PG_VERSION")); statErr == nil {
			return nil, fmt.Errorf("start cluster: %s holds an incomplete cluster (no %s); remove it", c.Dir, stateFile)
		}
	}
	if len(c.env.sockDir)+len("/.s.PGSQL.65535.lock") > maxSocketPath {
		return nil, fmt.Errorf("start cluster: dir %s is too long for unix socket paths", c.Dir)
	}
	if err := run.mkdir(c.env.sockDir); err != nil {
		return nil, fmt.Errorf("start cluster: %w", err)
	}

	c.Primary = c.newServer(primaryName)
	if fresh {
		err = c.initPrimary(ctx)
	} else {
		c.Primary.Port = existing.PrimaryPort
		err = c.restart(ctx, c.Primary)
	}
	if err != nil {
		return nil, fmt.Errorf("start cluster: %w", err)
	}

	st := state{PrimaryPort: c.Primary.Port}
	if existing != nil {
		st.ReplicaPort = existing.ReplicaPort
	}
	if opts.Replica {
		c.Replica = c.newServer(replicaName)
		if existing != nil && existing.ReplicaPort != 0 && fileExists(filepath.Join(c.Replica.DataDir, "PG_VERSION")) {
			c.Replica.Port = existing.ReplicaPort
			err = c.restart(ctx, c.Replica)
		} else {
			err = c.createReplica(ctx)
		}
		if err == nil {
			err = c.waitStreaming(ctx)
		}
		if err != nil {
			return nil, fmt.Errorf("start cluster: %w", err)
		}
		st.ReplicaPort = c.Replica.Port
	}
	if err := writeState(c.env, st); err != nil {
		return nil, fmt.Errorf("start cluster: %w", err)
	}
	opts.Logger.Info("postgres cluster ready", "dir", c.Dir, "primary", c.Primary.Addr(), "replica", c.Replica != nil)
	return c, nil
}

func (c *Cluster) newServer(name string) *Server {
	return &Server{
		Name:    name,
		DataDir: filepath.Join(c.Dir, name),
		Host:    "127.0.0.1",
		LogFile: filepath.Join(c.Dir, name+".log"),
		env:     c.env,
	}
}

// initPrimary runs initdb, writes the configuration and starts the primary.
func (c *Cluster) initPrimary(ctx context.Context) error {
	s := c.Primary
	e := c.env
	if _, err := e.run.run(ctx, e.bins.Initdb, "-D", s.DataDir, "-U", "postgres",
		"--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C",
		"--no-sync", "--no-instructions"); err != nil {
		return fmt.Errorf("initdb: %w", err)
	}
	confPath := filepath.Join(s.DataDir, "postgresql.conf")
	f, err := os.OpenFile(confPath, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("open postgresql.conf: %w", err)
	}
	_, err = f.WriteString("\ninclude 'cascata.conf'\n")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write postgresql.conf: %w", err)
	}
	hba := strings.Join([]string{
		"# Managed by cascata pgcluster.",
		"local all all trust",
		"local replication all trust",
		"host all postgres 127.0.0.1/32 trust",
		"host replication all 127.0.0.1/32 trust",
		"host all all 127.0.0.1/32 scram-sha-256",
		"host all all ::1/128 scram-sha-256",
	}, "\n") + "\n"
	if err := e.run.writeFile(filepath.Join(s.DataDir, "pg_hba.conf"), []byte(hba)); err != nil {
		return err
	}
	return c.startOnFreePort(ctx, s)
}

// startOnFreePort starts a new server on a free port, picking another port
// when the chosen one was taken in the meantime.
func (c *Cluster) startOnFreePort(ctx context.Context, s *Server) error {
	var err error
	for attempt := 0; attempt < 5; attempt++ {
		if s.Port, err = FreePort(); err != nil {
			return err
		}
		if err = s.writeConf(); err != nil {
			return err
		}
		var busy bool
		if busy, err = s.start(ctx); err == nil || !busy {
			return err
		}
		c.env.log.Warn("postgres port taken, retrying", "server", s.Name, "port", s.Port)
	}
	return err
}

// restart starts an existing server on its recorded port; a server still
// running from an earlier process is stopped first so the current
// configuration applies.
func (c *Cluster) restart(ctx context.Context, s *Server) error {
	if err := s.Stop(ctx, "fast"); err != nil {
		return err
	}
	if err := portFree(s.Port); err != nil {
		return fmt.Errorf("start %s: %w", s.Name, err)
	}
	if err := s.writeConf(); err != nil {
		return err
	}
	_, err := s.start(ctx)
	return err
}

// createReplica takes a base backup of the primary through a new (or
// recreated) replication slot and starts it as a streaming standby.
func (c *Cluster) createReplica(ctx context.Context) error {
	s := c.Replica
	e := c.env
	if err := os.RemoveAll(s.DataDir); err != nil {
		return fmt.Errorf("clear replica dir: %w", err)
	}
	if err := c.dropSlot(ctx); err != nil {
		return err
	}
	if _, err := e.run.run(ctx, e.bins.PgBasebackup, "-h", c.Primary.Host, "-p", fmt.Sprint(c.Primary.Port),
		"-U", "postgres", "-D", s.DataDir, "-R", "-X", "stream", "-C", "-S", slotName,
		"--checkpoint=fast", "--no-sync", "--no-password"); err != nil {
		return fmt.Errorf("base backup: %w", err)
	}
	return c.startOnFreePort(ctx, s)
}

// dropSlot removes a replication slot left over from an earlier replica.
func (c *Cluster) dropSlot(ctx context.Context) error {
	conn, err := connect(ctx, c.Primary.SuperuserURL("postgres"))
	if err != nil {
		return fmt.Errorf("drop slot: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", slotName); err != nil {
		return fmt.Errorf("drop slot: %w", err)
	}
	return nil
}

// waitStreaming waits (60s at most) until the replica is in recovery and
// the primary reports a streaming WAL sender for its slot.
func (c *Cluster) waitStreaming(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	var last error
	for {
		last = c.streaming(ctx)
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for streaming replica: %w\nreplica log:\n%s", last, c.Replica.logTail())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (c *Cluster) streaming(ctx context.Context) error {
	inRecovery, err := queryBool(ctx, c.Replica.SuperuserURL("postgres"), "SELECT pg_is_in_recovery()")
	if err != nil {
		return err
	}
	if !inRecovery {
		return errors.New("replica is not in recovery")
	}
	ok, err := queryBool(ctx, c.Primary.SuperuserURL("postgres"),
		"SELECT EXISTS (SELECT FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1 AND r.state = 'streaming')", slotName)
	if err != nil {
		return err
	}
	if !ok {
		return errors.New("replica is not streaming yet")
	}
	return nil
}

func queryBool(ctx context.Context, connURL, sql string, args ...any) (bool, error) {
	conn, err := connect(ctx, connURL)
	if err != nil {
		return false, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var v bool
	if err := conn.QueryRow(ctx, sql, args...).Scan(&v); err != nil {
		return false, fmt.Errorf("query: %w", err)
	}
	return v, nil
}

// WaitReplicaCaughtUp waits until the replica has replayed all WAL the
// primary had written when it was called (pg_last_wal_replay_lsn() on the
// replica >= pg_current_wal_lsn() on the primary). With a replica apply
// delay this takes at least that delay after the last commit. It fails
// when the cluster has no replica or ctx ends first.
func (c *Cluster) WaitReplicaCaughtUp(ctx context.Context) error {
	if c.Replica == nil {
		return errors.New("wait replica caught up: cluster has no replica")
	}
	var target string
	primary, err := connect(ctx, c.Primary.SuperuserURL("postgres"))
	if err != nil {
		return fmt.Errorf("wait replica caught up: %w", err)
	}
	err = primary.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&target)
	_ = primary.Close(context.WithoutCancel(ctx))
	if err != nil {
		return fmt.Errorf("wait replica caught up: primary lsn: %w", err)
	}
	var replica *pgx.Conn
	defer func() {
		if replica != nil {
			_ = replica.Close(context.WithoutCancel(ctx))
		}
	}()
	for {
		if replica == nil {
			replica, err = connect(ctx, c.Replica.SuperuserURL("postgres"))
		}
		if err == nil {
			var done bool
			err = replica.QueryRow(ctx, "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::pg_lsn, false)", target).Scan(&done)
			if err == nil && done {
				return nil
			}
			if err != nil {
				_ = replica.Close(context.WithoutCancel(ctx))
				replica = nil
			}
		}
		select {
		case <-ctx.Done():
			if err == nil {
				err = ctx.Err()
			}
			return fmt.Errorf("wait replica caught up to %s: %w", target, err)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// Stop stops the replica, then the primary (fast shutdown, immediate when
// that fails), and removes the cluster's files unless Options.KeepDir is
// set: a temporary Dir is removed whole; a given Dir loses the entries
// pgcluster created and is removed when it is then empty.
func (c *Cluster) Stop(ctx context.Context) error {
	var errs []error
	for _, s := range []*Server{c.Replica, c.Primary} {
		if s == nil {
			continue
		}
		if err := s.Stop(ctx, "fast"); err != nil {
			errs = append(errs, err)
			if err := s.Stop(ctx, "immediate"); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if !c.env.opts.KeepDir {
		errs = append(errs, c.removeFiles())
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("stop cluster: %w", err)
	}
	return nil
}

// abort cleans up after a failed Start.
func (c *Cluster) abort(ctx context.Context, fresh bool) {
	for _, s := range []*Server{c.Replica, c.Primary} {
		if s != nil {
			_ = s.Stop(ctx, "immediate")
		}
	}
	if fresh {
		_ = c.removeFiles()
	}
}

func (c *Cluster) removeFiles() error {
	if c.tempDir {
		return os.RemoveAll(c.Dir)
	}
	var errs []error
	for _, name := range []string{primaryName, replicaName, "run", primaryName + ".log", replicaName + ".log", stateFile} {
		errs = append(errs, os.RemoveAll(filepath.Join(c.Dir, name)))
	}
	if entries, err := os.ReadDir(c.Dir); err == nil && len(entries) == 0 {
		errs = append(errs, os.Remove(c.Dir))
	}
	return errors.Join(errs...)
}

func readState(dir string) (*state, error) {
	b, err := os.ReadFile(filepath.Join(dir, stateFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", stateFile, err)
	}
	var st state
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("parse %s: %w", stateFile, err)
	}
	if st.PrimaryPort <= 0 {
		return nil, fmt.Errorf("parse %s: no primary port", stateFile)
	}
	return &st, nil
}

func writeState(e *env, st state) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", stateFile, err)
	}
	return e.run.writeFile(filepath.Join(e.dir, stateFile), append(b, '\n'))
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
