// Package projectdb installs what Cascata needs inside a project's database:
// the cascata schema, a key only the owner can read, and cascata.claims(),
// which returns request.jwt.claims only when the proxy set them.
//
// The escalation guard cannot see inside functions: a SECURITY DEFINER
// function written by the owner might pass client input to set_config. So
// next to the claims the proxy sets an HMAC of them under the project's key,
// and cascata.claims() raises unless the MAC verifies. RLS policies written
// with cascata.claims() cannot be fooled by forged claims.
package projectdb

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// installLockKey serializes Install in one database ("cascata.keys").
const installLockKey int64 = 0x636b657973

// Install creates (or upgrades) the cascata schema in the database at
// ownerURL and returns the project's claims key. It is idempotent.
func Install(ctx context.Context, ownerURL string) ([]byte, error) {
	conn, err := pgx.Connect(ctx, ownerURL)
	if err != nil {
		return nil, fmt.Errorf("connect as owner: %w", err)
	}
	defer conn.Close(ctx)
	// Instances of a fleet install at the same moment when they start
	// together; IF NOT EXISTS does not stop two sessions from creating the
	// same schema or function at once (23505, "tuple concurrently
	// updated"). The lock ends with the connection.
	if _, err := conn.Exec(ctx, "SELECT pg_catalog.pg_advisory_lock($1)", installLockKey); err != nil {
		return nil, fmt.Errorf("lock the cascata schema: %w", err)
	}
	if _, err := conn.Exec(ctx, "CREATE EXTENSION IF NOT EXISTS pgcrypto"); err != nil {
		return nil, fmt.Errorf("create extension pgcrypto (package postgresql-contrib): %w", err)
	}
	var cryptoSchema string
	if err := conn.QueryRow(ctx, "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'pgcrypto'").Scan(&cryptoSchema); err != nil {
		return nil, fmt.Errorf("find pgcrypto: %w", err)
	}
	tx, err := conn.Begin(ctx)
	if err != nil {
		return nil, fmt.Errorf("begin: %w", err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	stmts := []string{
		"CREATE SCHEMA IF NOT EXISTS cascata",
		"REVOKE ALL ON SCHEMA cascata FROM PUBLIC",
		"GRANT USAGE ON SCHEMA cascata TO PUBLIC",
		`CREATE TABLE IF NOT EXISTS cascata.keys (
			id int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
			claims_key bytea NOT NULL DEFAULT ` + cryptoSchema + `.gen_random_bytes(32))`,
		"REVOKE ALL ON cascata.keys FROM PUBLIC",
		"INSERT INTO cascata.keys DEFAULT VALUES ON CONFLICT (id) DO NOTHING",
		`CREATE OR REPLACE FUNCTION cascata.claims() RETURNS jsonb
			LANGUAGE plpgsql STABLE SECURITY DEFINER
			SET search_path = pg_catalog, pg_temp
		AS $fn$
		DECLARE
			c text := current_setting('request.jwt.claims', true);
			m text := current_setting('request.jwt.claims_mac', true);
			k bytea;
		BEGIN
			IF c IS NULL OR c = '' THEN
				RETURN NULL;
			END IF;
			SELECT claims_key INTO k FROM cascata.keys WHERE id = 1;
			IF m IS NULL OR m <> encode(` + cryptoSchema + `.hmac(convert_to(c, 'UTF8'), k, 'sha256'::text), 'hex') THEN
				RAISE EXCEPTION 'request.jwt.claims were not set by cascata' USING ERRCODE = '42501';
			END IF;
			RETURN c::jsonb;
		END
		$fn$`,
		"REVOKE ALL ON FUNCTION cascata.claims() FROM PUBLIC",
		"GRANT EXECUTE ON FUNCTION cascata.claims() TO PUBLIC",
	}
	for _, s := range stmts {
		if _, err := tx.Exec(ctx, s); err != nil {
			return nil, fmt.Errorf("install cascata schema: %w", err)
		}
	}
	var key []byte
	if err := tx.QueryRow(ctx, "SELECT claims_key FROM cascata.keys WHERE id = 1").Scan(&key); err != nil {
		return nil, fmt.Errorf("read claims key: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return nil, fmt.Errorf("commit: %w", err)
	}
	if len(key) < 16 {
		return nil, errors.New("claims key too short")
	}
	return key, nil
}

// ClaimsMAC is the MAC cascata.claims() expects for claims under key.
func ClaimsMAC(key []byte, claims string) string {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(claims))
	return hex.EncodeToString(m.Sum(nil))
}
