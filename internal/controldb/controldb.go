// Package controldb is the shared control database of a Cascata fleet
// ([catalog].url): connecting to it and migrating its schema.
//
// Everything lives in the schema cascata_control. Each component (catalog,
// instances, jobs, …) owns a numbered list of migration steps; Migrate
// applies the steps a database has not seen yet, all in one transaction under
// a transaction-level advisory lock, so two instances starting at the same
// moment on an empty database create one schema and neither fails.
package controldb

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// ErrNewer: the control database was migrated by a newer build.
var ErrNewer = errors.New("the control database is newer than this build")

// Schema is the schema that holds every control table.
const Schema = "cascata_control"

// migrateLockKey is the advisory lock key that serializes migrations
// (an arbitrary constant: "cascata" in ASCII, truncated to 63 bits).
const migrateLockKey int64 = 0x636173636174

// Open makes a small pool for the control database. It connects lazily: a
// control database that is down at start is not an error here (the catalog
// then starts from its cache).
func Open(ctx context.Context, url string, maxConns int32) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("control database: [catalog].url: %w", err)
	}
	if maxConns > 0 {
		cfg.MaxConns = maxConns
	}
	if cfg.ConnConfig.ConnectTimeout == 0 || cfg.ConnConfig.ConnectTimeout > 5*time.Second {
		cfg.ConnConfig.ConnectTimeout = 5 * time.Second
	}
	cfg.ConnConfig.RuntimeParams["application_name"] = "cascata-control"
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("control database: %w", err)
	}
	return pool, nil
}

// Step is one migration: SQL run once, in order, in the schema
// cascata_control (search_path is set to it).
type Step string

// Migrate brings component's tables to the last of steps. Steps already
// applied (by number) are skipped; a database that has more steps than this
// build knows is refused, since an older build cannot read it safely.
func Migrate(ctx context.Context, pool *pgxpool.Pool, component string, steps []Step) error {
	return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_catalog.pg_advisory_xact_lock($1)", migrateLockKey); err != nil {
			return fmt.Errorf("migrate %s: lock: %w", component, err)
		}
		if _, err := tx.Exec(ctx, `CREATE SCHEMA IF NOT EXISTS `+Schema+`;
			CREATE TABLE IF NOT EXISTS `+Schema+`.migrations (
				component text NOT NULL,
				version   int  NOT NULL,
				applied   timestamptz NOT NULL DEFAULT now(),
				PRIMARY KEY (component, version))`); err != nil {
			return fmt.Errorf("migrate %s: create schema: %w", component, err)
		}
		var have int
		if err := tx.QueryRow(ctx, `SELECT coalesce(max(version), 0) FROM `+Schema+`.migrations WHERE component = $1`, component).Scan(&have); err != nil {
			return fmt.Errorf("migrate %s: read version: %w", component, err)
		}
		if have > len(steps) {
			return fmt.Errorf("migrate %s: %w: it is at version %d, this build knows %d; upgrade this instance", component, ErrNewer, have, len(steps))
		}
		if _, err := tx.Exec(ctx, "SET LOCAL search_path = "+Schema); err != nil {
			return fmt.Errorf("migrate %s: %w", component, err)
		}
		for v := have + 1; v <= len(steps); v++ {
			if _, err := tx.Exec(ctx, string(steps[v-1])); err != nil {
				return fmt.Errorf("migrate %s to version %d: %w", component, v, err)
			}
			if _, err := tx.Exec(ctx, `INSERT INTO `+Schema+`.migrations (component, version) VALUES ($1, $2)`, component, v); err != nil {
				return fmt.Errorf("migrate %s to version %d: %w", component, v, err)
			}
		}
		return nil
	})
}

// Unreachable tells a control database that did not answer (down, network,
// shutting down, out of connections) from one that answered with a refusal
// (a query error, a schema newer than this build), which retrying does not
// mend.
func Unreachable(err error) bool {
	if err == nil || errors.Is(err, ErrNewer) {
		return false
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return true
	}
	switch pgErr.Code[:2] {
	case "08", "57", "53": // connection exception, operator intervention, insufficient resources
		return true
	}
	return false
}

// Listen opens a connection of its own (the pool's settings) that listens
// on channel. The caller closes it.
func Listen(ctx context.Context, pool *pgxpool.Pool, channel string, timeout time.Duration) (*pgx.Conn, error) {
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	conn, err := pgx.ConnectConfig(cctx, pool.Config().ConnConfig.Copy())
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", channel, err)
	}
	if _, err := conn.Exec(cctx, "LISTEN "+pgx.Identifier{channel}.Sanitize()); err != nil {
		conn.Close(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("listen on %s: %w", channel, err)
	}
	return conn, nil
}

// WaitNotification waits until a notification arrives on conn or until
// passes; both are nil. An error means the connection is lost.
func WaitNotification(ctx context.Context, conn *pgx.Conn, until time.Time) error {
	wctx, cancel := context.WithDeadline(ctx, until)
	defer cancel()
	err := conn.PgConn().WaitForNotification(wctx)
	if err == nil || ctx.Err() != nil || errors.Is(err, context.DeadlineExceeded) || pgconn.Timeout(err) {
		return nil
	}
	return err
}

// Follow runs session again and again until ctx ends: a session runs while
// its connection to the control database lasts, calling connected once it
// is up; after it fails Follow waits (100 ms, doubling up to 2 s, reset by
// connected) and logs the loss once per outage.
func Follow(ctx context.Context, log *slog.Logger, what string, session func(ctx context.Context, connected func()) error) {
	backoff := 100 * time.Millisecond
	down := false
	for ctx.Err() == nil {
		err := session(ctx, func() {
			if down {
				log.Info(what+": control database answers again", "component", what)
				down = false
			}
			backoff = 100 * time.Millisecond
		})
		if ctx.Err() != nil {
			return
		}
		if !down {
			log.Warn(what+": lost the control database", "error", err)
			down = true
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
		case <-t.C:
		}
		t.Stop()
		backoff = min(2*backoff, 2*time.Second)
	}
}
