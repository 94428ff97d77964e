package archive

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"cascata/auth"
	"cascata/internal/pgtest"

	"github.com/jackc/pgx/v5"
)

const roundTripSQL = `
CREATE SCHEMA app;
CREATE SCHEMA billing;
DROP ROLE IF EXISTS auditor;
CREATE ROLE auditor NOLOGIN;
CREATE TABLE app.todos (
  id bigserial PRIMARY KEY,
  owner text NOT NULL,
  title text NOT NULL,
  done boolean NOT NULL DEFAULT false,
  attachment oid
);
COMMENT ON TABLE app.todos IS 'things to do, one owner each';
COMMENT ON COLUMN app.todos.owner IS 'the sub claim of the owner';
ALTER TABLE app.todos ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON app.todos TO authenticated
  USING (owner = current_setting('request.jwt.claims', true)::json->>'sub')
  WITH CHECK (owner = current_setting('request.jwt.claims', true)::json->>'sub');
GRANT USAGE ON SCHEMA app TO authenticated, anon;
GRANT SELECT, INSERT, UPDATE ON app.todos TO authenticated;
GRANT USAGE ON SEQUENCE app.todos_id_seq TO authenticated;
GRANT SELECT ON app.todos TO auditor;
INSERT INTO app.todos (owner, title) VALUES
  ('alice', 'buy milk'), ('alice', 'write spec'), ('alice', 'ship it'),
  ('bob', 'fix bike'), ('bob', 'call mom');
UPDATE app.todos SET attachment = lo_from_bytea(0, convert_to('large object: ' || repeat('ünïcödé ', 5000), 'UTF8')) WHERE id = 1;

CREATE SEQUENCE billing.invoice_no START 1000;
SELECT nextval('billing.invoice_no') FROM generate_series(1, 41);
CREATE TABLE billing.blobs (id int PRIMARY KEY, data bytea, note text, tags text[], meta jsonb,
                            at timestamptz, f float8, span interval, amount numeric(20,6));
INSERT INTO billing.blobs VALUES
  (1, (SELECT string_agg(set_byte('\x00'::bytea, 0, g), ''::bytea) FROM generate_series(0, 255) g),
      'こんにちは世界 🌍 ñandú — "quotes" and \backslash', '{a,"b c",NULL}', '{"k": [1, 2.5, "ü"]}',
      '2024-02-29 23:59:59.123456+05:30', 0.1, '1 day 02:03:04.5', 12345678901234.123456),
  (2, '', '', '{}', 'null', '1970-01-01 00:00:00+00', 'NaN', '-3 months', 0),
  (3, NULL, NULL, NULL, NULL, NULL, '-Infinity', NULL, NULL),
  (4, '\x00ff00ff'::bytea, E'tab\there\nnewline', '{"{}"}', '{"nested": {"deep": true}}', 'infinity', 1e308, '0', -1);
COMMENT ON SEQUENCE billing.invoice_no IS 'invoice numbers';

CREATE TABLE public.big (id int PRIMARY KEY, v text NOT NULL, n numeric NOT NULL);
INSERT INTO public.big SELECT g, md5(g::text), g * 1.5 FROM generate_series(1, 1000000) g;
CREATE VIEW app.my_todos AS SELECT id, title FROM app.todos;
CREATE FUNCTION app.count_todos() RETURNS bigint LANGUAGE sql STABLE AS 'SELECT count(*) FROM app.todos';
ANALYZE;
`

// makeStorage fills dir with 500 files: one empty, one of 50 MB, the rest
// small, in nested folders with several modes and unicode names.
func makeStorage(t *testing.T, dir string) {
	t.Helper()
	rng := rand.NewChaCha8([32]byte{7})
	writeFile(t, filepath.Join(dir, "empty.txt"), 0, 0o644, rng)
	writeFile(t, filepath.Join(dir, "media", "video", "big.bin"), 50<<20, 0o640, rng)
	modes := []os.FileMode{0o644, 0o600, 0o640, 0o755, 0o444}
	for i := range 498 {
		name := fmt.Sprintf("f%03d.dat", i)
		if i%50 == 0 {
			name = fmt.Sprintf("résumé ✓ %03d.txt", i)
		}
		p := filepath.Join(dir, fmt.Sprintf("d%d", i%7), fmt.Sprintf("s%d", i%3), name)
		if i%5 == 0 {
			p = filepath.Join(dir, fmt.Sprintf("top%03d.bin", i))
		}
		writeFile(t, p, int(rng.Uint64()%20000), modes[i%len(modes)], rng)
	}
	if err := os.MkdirAll(filepath.Join(dir, "empty dir", "nested"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(dir, "d3"), 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(dir, "d4", "s1"), 0o555); err != nil {
		t.Fatal(err)
	}
}

func TestRoundTrip(t *testing.T) {
	ctx := t.Context()
	start := time.Now()
	p := testProject(t, "proj", roundTripSQL)
	makeStorage(t, p.StorageDir)
	t.Logf("fixture: %v", time.Since(start))

	// A token minted by the first instance before the export.
	secret, err := p.JWTSecrets()
	if err != nil {
		t.Fatal(err)
	}
	token, err := auth.Mint(auth.MintKey{Secret: secret[0]}, map[string]any{"role": "authenticated", "sub": "alice", "ref": "proj"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}

	start = time.Now()
	// zstd is pure Go: under the race detector compressing ~110 MB takes
	// long and checks nothing of this package, so race builds write the
	// big archive uncompressed (smaller tests cover zstd under race).
	comp := CompressionZstd
	if raceEnabled {
		comp = CompressionNone
	}
	path, m1 := exportToN(t, p, comp, 0)
	fi, _ := os.Stat(path)
	t.Logf("export: %v, %d bytes", time.Since(start), fi.Size())
	if m1.Version != FormatVersion || m1.Project.Ref != "proj" || m1.Postgres.ServerVersion == "" {
		t.Errorf("manifest header: %+v %+v", m1.Project, m1.Postgres)
	}
	if db := string(m1.Project.Settings["database_url"]); !strings.Contains(db, "authenticator:xxxxx@") {
		t.Errorf("manifest database_url = %s, want the password replaced", db)
	}
	for _, k := range []string{"jwt_secret", "storage_dir"} {
		if _, ok := m1.Project.Settings[k]; ok {
			t.Errorf("manifest settings carry %s", k)
		}
	}
	files := 0
	for _, f := range m1.Files {
		if f.Type == typeFile {
			files++
		}
	}
	if files != 500 {
		t.Errorf("manifest lists %d storage files, want 500", files)
	}
	var bigRows int64
	for _, tc := range m1.Tables {
		if tc.Schema == "public" && tc.Name == "big" {
			bigRows = tc.Rows
		}
	}
	if bigRows != 1_000_000 {
		t.Errorf("manifest: public.big has %d rows, want 1000000", bigRows)
	}
	if m1.LargeObjects.Count != 1 {
		t.Errorf("manifest: %d large objects, want 1", m1.LargeObjects.Count)
	}

	start = time.Now()
	if _, err := Verify(ctx, path, []byte(testPassphrase)); err != nil {
		t.Fatalf("verify: %v", err)
	}
	t.Logf("verify: %v", time.Since(start))

	tg := newTarget(t, "proj")
	pgtest.Exec(t, dst.Primary.SuperuserURL("postgres"), "DROP ROLE IF EXISTS auditor")
	start = time.Now()
	var phases []string
	opts := tg.options(path)
	opts.Exists = func(context.Context, string) (bool, error) { return false, nil }
	res, err := Import(ctx, opts, func(phase string, done, total int64) {
		if len(phases) == 0 || phases[len(phases)-1] != phase {
			phases = append(phases, phase)
		}
	})
	if err != nil {
		t.Fatalf("import: %v", err)
	}
	t.Logf("import: %v, phases %v, created roles %v, warnings %v", time.Since(start), phases, res.CreatedRoles, res.Warnings)
	if !slices.Contains(res.CreatedRoles, "auditor") {
		t.Errorf("created roles %v, want auditor among them", res.CreatedRoles)
	}
	np := res.Project
	if np.Ref != "proj" || np.PoolSize != p.PoolSize || np.RoleClaim != p.RoleClaim || np.PoolMode != p.PoolMode ||
		!slices.Equal(np.Roles, p.Roles) || np.JWTSecret != "" || np.JWTSecretFile == "" {
		t.Errorf("imported project settings: %+v", np)
	}

	// Storage: byte for byte, modes included.
	want, got := treeSums(t, p.StorageDir), treeSums(t, np.StorageDir)
	if len(want) != len(got) {
		t.Errorf("storage: %d entries restored, want %d", len(got), len(want))
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("storage %s: got %q, want %q", k, got[k], v)
		}
	}

	srcURL, dstURL := p.OwnerURL, np.OwnerURL
	same := func(sql string) {
		t.Helper()
		a, b := pgtest.QueryValue(t, srcURL, sql), pgtest.QueryValue(t, dstURL, sql)
		if a != b {
			t.Errorf("%s: source %q, imported %q", sql, short(a), short(b))
		}
	}
	same("SELECT md5(string_agg(t::text, E'\\n' ORDER BY id)) FROM billing.blobs t")
	same("SELECT md5(string_agg(t::text, E'\\n' ORDER BY id)) FROM app.todos t")
	same("SELECT count(*) || ':' || sum(n) FROM public.big")
	same("SELECT md5(lo_get(attachment)) FROM app.todos WHERE id = 1")
	same("SELECT obj_description('app.todos'::regclass, 'pg_class') || col_description('app.todos'::regclass, 2)")
	same("SELECT string_agg(polname || ':' || pg_get_expr(polqual, polrelid), ',') FROM pg_policy")
	same("SELECT relrowsecurity FROM pg_class WHERE oid = 'app.todos'::regclass")
	same("SELECT has_table_privilege('auditor', 'app.todos', 'SELECT')")
	same("SELECT extversion FROM pg_extension WHERE extname = 'pgcrypto'")
	same("SELECT app.count_todos()")
	same("SELECT nextval('billing.invoice_no')")
	same("SELECT nextval('app.todos_id_seq')")

	// RLS through the login role, with the token minted before the export.
	v := auth.NewVerifier()
	secrets, err := np.JWTSecrets()
	if err != nil {
		t.Fatal(err)
	}
	if err := v.SetProject(np.Ref, auth.KeyConfig{Secrets: secrets}, auth.Policy{Roles: np.Roles, RoleClaim: np.RoleClaim}); err != nil {
		t.Fatal(err)
	}
	id, err := v.Verify(ctx, np.Ref, "authenticated", token)
	if err != nil {
		t.Fatalf("token minted before the export does not verify after the import: %v", err)
	}
	conn := pgtest.Connect(t, np.DatabaseURL)
	rlsCount := func(c *pgx.Conn) string {
		t.Helper()
		var titles string
		tx, err := c.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback(ctx)
		if _, err := tx.Exec(ctx, "SET LOCAL ROLE "+ident(id.Role)); err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, "SELECT set_config('request.jwt.claims', $1, true)", id.ClaimsJSON); err != nil {
			t.Fatal(err)
		}
		if err := tx.QueryRow(ctx, "SELECT string_agg(title, ',' ORDER BY id) FROM app.todos").Scan(&titles); err != nil {
			t.Fatal(err)
		}
		return titles
	}
	if got, want := rlsCount(conn), rlsCount(pgtest.Connect(t, p.DatabaseURL)); got != want || got != "buy milk,write spec,ship it" {
		t.Errorf("RLS as alice: imported sees %q, source sees %q", got, want)
	}
	if _, err := conn.Exec(ctx, "SET ROLE anon; SELECT count(*) FROM app.todos"); err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Errorf("anon reading app.todos: %v, want permission denied", err)
	}

	// Export the import: every data and file checksum is the same.
	start = time.Now()
	_, m2 := exportTo(t, np, CompressionNone)
	t.Logf("re-export: %v", time.Since(start))
	if err := CompareData(m1, m2); err != nil {
		t.Errorf("export of the import differs: %v", err)
	}
}
