package fleet

import (
	"context"

	"cascata/internal/controldb"

	"github.com/jackc/pgx/v5/pgxpool"
)

// steps are the fleet's tables in the control database. Never edit a step
// that has shipped: append a new one.
var steps = []controldb.Step{
	// 1: instances and their heartbeats; pauses and their acknowledgements.
	`CREATE TABLE instances (
		id        text PRIMARY KEY,
		admin_url text NOT NULL DEFAULT '',
		proxy_url text NOT NULL DEFAULT '',
		version   text NOT NULL DEFAULT '',
		started   timestamptz NOT NULL DEFAULT now(),
		heartbeat timestamptz NOT NULL DEFAULT now(),
		-- backend connections per host this instance may hold (its share of
		-- max_server_conn_per_host) and holds at most right now
		share     int NOT NULL DEFAULT 0,
		stopped   boolean NOT NULL DEFAULT false
	);
	CREATE TABLE pauses (
		ref    text PRIMARY KEY,
		epoch  bigint NOT NULL,
		paused boolean NOT NULL,
		-- a resume takes effect on an instance once its catalog has this
		-- revision: the switch of a cutover is in force before writes flow
		min_revision bigint NOT NULL DEFAULT 0,
		reason text NOT NULL DEFAULT '',
		changed timestamptz NOT NULL DEFAULT now()
	);
	CREATE TABLE pause_acks (
		ref      text NOT NULL,
		epoch    bigint NOT NULL,
		instance text NOT NULL,
		acked    timestamptz NOT NULL DEFAULT now(),
		PRIMARY KEY (ref, instance)
	);`,
	// 2: the instance that started a pause: when it stops, the pause ends.
	`ALTER TABLE pauses ADD COLUMN owner text NOT NULL DEFAULT ''`,
	// 3: where an instance runs (boot and network namespace): only an
	// instance of the same place can tell that a silent one is gone.
	`ALTER TABLE instances ADD COLUMN place text NOT NULL DEFAULT ''`,
}

// Migrate creates or upgrades the fleet's tables.
func Migrate(ctx context.Context, pool *pgxpool.Pool) error {
	return controldb.Migrate(ctx, pool, "fleet", steps)
}

// LiveSQL is the condition, on a row of instances, of an instance counted as
// live: a heartbeat younger than $1 (an interval, [catalog].instance_timeout)
// on the control database's clock, and not stopped.
const LiveSQL = `(NOT stopped AND heartbeat > now() - $1::interval)`
