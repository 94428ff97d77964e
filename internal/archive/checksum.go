package archive

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
	"sync"

	"github.com/jackc/pgx/v5"
)

// checksumSettings fix every setting that changes the text form of a row,
// so that the same data gives the same checksum on any server.
var checksumSettings = []string{
	"SET DateStyle = 'ISO, YMD'",
	"SET IntervalStyle = 'postgres'",
	"SET TimeZone = 'UTC'",
	"SET extra_float_digits = 3",
	"SET bytea_output = 'hex'",
	"SET search_path = pg_catalog",
	"SET row_security = off",
	"SET statement_timeout = 0",
	"SET lock_timeout = 0",
	"SET idle_in_transaction_session_timeout = 0",
}

func applyChecksumSettings(ctx context.Context, conn *pgx.Conn) error {
	for _, s := range checksumSettings {
		if _, err := conn.Exec(ctx, s); err != nil {
			return fmt.Errorf("%s: %w", s, err)
		}
	}
	return nil
}

// userRelations selects the user tables (relkind r) outside system schemas
// and not owned by an extension; pg_dump dumps the data of exactly these.
const userTablesSQL = `
SELECT n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND c.relpersistence <> 't'
  AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY pg_relation_size(c.oid) DESC, 1, 2`

// tableChecksumSQL computes a multiset hash of a table's rows: the count and
// two 64-bit halves of each row's md5(row::text), summed exactly as numeric.
// It needs no sort and no memory proportional to the table, and the server
// may run it as a parallel aggregate.
const tableChecksumSQL = `
SELECT count(*),
       coalesce(sum(('x' || substr(h, 1, 16))::bit(64)::int8::numeric), 0)::text,
       coalesce(sum(('x' || substr(h, 17, 16))::bit(64)::int8::numeric), 0)::text
FROM (SELECT md5(t::text) AS h FROM ONLY %s t) s`

// largeObjectsSQL does the same over large objects: md5 of oid and content.
const largeObjectsSQL = `
SELECT count(*),
       coalesce(sum(('x' || substr(h, 1, 16))::bit(64)::int8::numeric), 0)::text,
       coalesce(sum(('x' || substr(h, 17, 16))::bit(64)::int8::numeric), 0)::text
FROM (SELECT md5(m.oid::text || ':' || md5(lo_get(m.oid))) AS h FROM pg_largeobject_metadata m) s`

// checksumOf turns the three aggregate values into the manifest's checksum.
func checksumOf(kind string, n int64, s1, s2 string) string {
	sum := sha256.Sum256([]byte(fmt.Sprintf("caf1:%s:%d:%s:%s", kind, n, s1, s2)))
	return hex.EncodeToString(sum[:])
}

type tableRef struct{ schema, name string }

// listTables returns the user tables, largest first.
func listTables(ctx context.Context, conn *pgx.Conn) ([]tableRef, error) {
	rows, err := conn.Query(ctx, userTablesSQL)
	if err != nil {
		return nil, fmt.Errorf("list tables: %w", err)
	}
	tables, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (tableRef, error) {
		var t tableRef
		err := r.Scan(&t.schema, &t.name)
		return t, err
	})
	if err != nil {
		return nil, fmt.Errorf("list tables: %w", err)
	}
	return tables, nil
}

func checksumTable(ctx context.Context, conn *pgx.Conn, t tableRef) (TableChecksum, error) {
	var (
		n      int64
		s1, s2 string
	)
	if err := conn.QueryRow(ctx, fmt.Sprintf(tableChecksumSQL, ident(t.schema, t.name))).Scan(&n, &s1, &s2); err != nil {
		return TableChecksum{}, fmt.Errorf("checksum of table %s.%s: %w", t.schema, t.name, err)
	}
	return TableChecksum{Schema: t.schema, Name: t.name, Rows: n, Checksum: checksumOf("table", n, s1, s2)}, nil
}

func checksumLargeObjects(ctx context.Context, conn *pgx.Conn) (LargeObjectChecksum, error) {
	var (
		n      int64
		s1, s2 string
	)
	if err := conn.QueryRow(ctx, largeObjectsSQL).Scan(&n, &s1, &s2); err != nil {
		return LargeObjectChecksum{}, fmt.Errorf("checksum of large objects: %w", err)
	}
	return LargeObjectChecksum{Count: n, Checksum: checksumOf("large_objects", n, s1, s2)}, nil
}

// dataChecksums is the result of computeChecksums.
type dataChecksums struct {
	tables []TableChecksum
	lobs   LargeObjectChecksum
}

// computeChecksums computes every table checksum and the large-object
// checksum with up to jobs connections. conn is already inside the
// transaction to use; connURL opens the extra connections, which import
// snapshot when it is not empty so that all of them see the same data (an
// empty snapshot is for a database nobody else writes to). done is called
// after each table, from several goroutines.
func computeChecksums(ctx context.Context, conn *pgx.Conn, connURL, snapshot string, jobs int, done func(n, total int)) (dataChecksums, error) {
	tables, err := listTables(ctx, conn)
	if err != nil {
		return dataChecksums{}, err
	}
	lobs, err := checksumLargeObjects(ctx, conn)
	if err != nil {
		return dataChecksums{}, err
	}
	jobs = max(1, min(jobs, len(tables)))
	if done != nil {
		done(0, len(tables))
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	work := make(chan tableRef)
	var (
		mu      sync.Mutex
		results []TableChecksum
		first   error
		wg      sync.WaitGroup
	)
	fail := func(err error) {
		mu.Lock()
		if first == nil {
			first = err
		}
		mu.Unlock()
		cancel()
	}
	worker := func(c *pgx.Conn) {
		defer wg.Done()
		for t := range work {
			tc, err := checksumTable(ctx, c, t)
			if err != nil {
				fail(err)
				continue
			}
			mu.Lock()
			results = append(results, tc)
			n := len(results)
			mu.Unlock()
			if done != nil {
				done(n, len(tables))
			}
		}
	}
	var extra []*pgx.Conn
	defer func() {
		for _, c := range extra {
			_ = c.Close(context.WithoutCancel(ctx))
		}
	}()
	for range jobs - 1 {
		c, err := openSnapshotConn(ctx, connURL, snapshot)
		if err != nil {
			return dataChecksums{}, err
		}
		extra = append(extra, c)
	}
	wg.Add(jobs)
	go worker(conn)
	for _, c := range extra {
		go worker(c)
	}
feed:
	for _, t := range tables {
		select {
		case work <- t:
		case <-ctx.Done():
			break feed
		}
	}
	close(work)
	wg.Wait()
	if first != nil {
		return dataChecksums{}, first
	}
	if err := ctx.Err(); err != nil {
		return dataChecksums{}, fmt.Errorf("checksums: %w", err)
	}
	slices.SortFunc(results, func(a, b TableChecksum) int {
		if c := strings.Compare(a.Schema, b.Schema); c != 0 {
			return c
		}
		return strings.Compare(a.Name, b.Name)
	})
	return dataChecksums{tables: results, lobs: lobs}, nil
}

// openSnapshotConn opens a connection with the checksum settings inside a
// REPEATABLE READ READ ONLY transaction that imports snapshot (when not empty).
func openSnapshotConn(ctx context.Context, connURL, snapshot string) (*pgx.Conn, error) {
	c, err := connect(ctx, connURL)
	if err != nil {
		return nil, err
	}
	err = applyChecksumSettings(ctx, c)
	if err == nil {
		_, err = c.Exec(ctx, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
	}
	if err == nil && snapshot != "" {
		_, err = c.Exec(ctx, "SET TRANSACTION SNAPSHOT "+quoteLiteral(snapshot))
	}
	if err != nil {
		_ = c.Close(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("import snapshot: %w", err)
	}
	return c, nil
}

// quoteLiteral quotes a string as an SQL literal (standard_conforming_strings on).
func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// collectSequences reads every user sequence's last value.
func collectSequences(ctx context.Context, conn *pgx.Conn) ([]SequenceValue, error) {
	rows, err := conn.Query(ctx, `
SELECT s.schemaname, s.sequencename, s.last_value
FROM pg_sequences s
JOIN pg_namespace n ON n.nspname = s.schemaname
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = s.sequencename
WHERE s.schemaname <> 'information_schema' AND s.schemaname !~ '^pg_'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1, 2`)
	if err != nil {
		return nil, fmt.Errorf("list sequences: %w", err)
	}
	seqs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (SequenceValue, error) {
		var s SequenceValue
		err := r.Scan(&s.Schema, &s.Name, &s.LastValue)
		return s, err
	})
	if err != nil {
		return nil, fmt.Errorf("list sequences: %w", err)
	}
	return seqs, nil
}

// collectRoles returns the roles the database depends on (owners,
// grantees, policy roles, recorded in pg_shdepend, plus owners of schemas,
// relations, functions and types, which pg_shdepend omits for the bootstrap
// superuser) and the project roles, without the built-in pg_* roles,
// superusers, the login role and the dumping role: an import refuses those
// (the restore gives every object to the new project's own owner role, and
// creates the login role itself).
func collectRoles(ctx context.Context, conn *pgx.Conn, projectRoles []string, loginRole string) ([]Role, error) {
	rows, err := conn.Query(ctx, `
WITH needed AS (
  SELECT refobjid AS oid FROM pg_shdepend
  WHERE refclassid = 'pg_authid'::regclass
    AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  UNION SELECT nspowner FROM pg_namespace WHERE nspname <> 'information_schema' AND nspname !~ '^pg_'
  UNION SELECT c.relowner FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
  UNION SELECT p.proowner FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
  UNION SELECT t.typowner FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
  UNION SELECT lomowner FROM pg_largeobject_metadata
  UNION SELECT oid FROM pg_roles WHERE rolname = ANY($1::text[])
)
SELECT r.rolname, r.rolinherit, r.rolbypassrls, r.rolcanlogin,
       coalesce(array(SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
                      WHERE m.member = r.oid AND g.oid IN (SELECT oid FROM needed) AND NOT g.rolsuper
                        AND g.rolname !~ '^pg_' AND g.rolname <> $2 AND g.rolname <> current_user ORDER BY 1), '{}')
FROM pg_roles r
WHERE r.oid IN (SELECT oid FROM needed) AND r.rolname !~ '^pg_' AND NOT r.rolsuper AND r.rolname <> $2 AND r.rolname <> current_user
ORDER BY 1`, projectRoles, loginRole)
	if err != nil {
		return nil, fmt.Errorf("list roles: %w", err)
	}
	roles, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Role, error) {
		var x Role
		err := r.Scan(&x.Name, &x.Inherit, &x.BypassRLS, &x.Login, &x.MemberOf)
		if len(x.MemberOf) == 0 {
			x.MemberOf = nil
		}
		return x, err
	})
	if err != nil {
		return nil, fmt.Errorf("list roles: %w", err)
	}
	return roles, nil
}

// collectExtensions lists installed extensions (plpgsql included).
func collectExtensions(ctx context.Context, conn *pgx.Conn) ([]Extension, error) {
	rows, err := conn.Query(ctx, `
SELECT e.extname, e.extversion, n.nspname
FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace ORDER BY 1`)
	if err != nil {
		return nil, fmt.Errorf("list extensions: %w", err)
	}
	exts, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Extension, error) {
		var e Extension
		err := r.Scan(&e.Name, &e.Version, &e.Schema)
		return e, err
	})
	if err != nil {
		return nil, fmt.Errorf("list extensions: %w", err)
	}
	return exts, nil
}

// collectServer fills the server and database facts of a manifest.
func collectServer(ctx context.Context, conn *pgx.Conn) (PostgresInfo, error) {
	var pi PostgresInfo
	err := conn.QueryRow(ctx, `
SELECT current_setting('server_version'), current_setting('server_version_num')::int,
       current_database(), current_user, pg_encoding_to_char(d.encoding), d.datcollate, d.datctype
FROM pg_database d WHERE d.datname = current_database()`).Scan(
		&pi.ServerVersion, &pi.ServerVersionNum, &pi.Database, &pi.Owner, &pi.Encoding, &pi.Collate, &pi.Ctype)
	if err != nil {
		return pi, fmt.Errorf("server facts: %w", err)
	}
	return pi, nil
}
