package archive

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"cascata/internal/pgtest"

	"github.com/jackc/pgx/v5"
)

// Hostile archives are made the way an attacker would: export a real
// project, edit the manifest or the dump, and sign the manifest again with
// the passphrase the attacker chose (the operator is given it with the
// archive). Each import must refuse clearly or complete with nothing
// taking effect beyond the new database.

const hostileSQL = `
CREATE TABLE public.notes (id int PRIMARY KEY, body text NOT NULL);
INSERT INTO public.notes SELECT g, 'note ' || g FROM generate_series(1, 50) g;
COMMENT ON TABLE public.notes IS 'MARKER';
GRANT SELECT ON public.notes TO authenticated;
CREATE FUNCTION public.escalate() RETURNS text LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
  IF current_database() = 'hostile' THEN
    RETURN 'source';
  END IF;
  EXECUTE 'ALTER ROLE authenticator SUPERUSER';
  RETURN 'escalated';
END $$;
GRANT EXECUTE ON FUNCTION public.escalate() TO authenticated;
`

// markerDefn is the TOC definition of the COMMENT the tests replace with
// SQL of their choosing.
const markerDefn = "COMMENT ON TABLE public.notes IS 'MARKER';\n"

// resign rewrites a plain (uncompressed) archive: edit changes member
// contents by name (nil: unchanged), editManifest the manifest; member
// sizes and SHA-256s are recomputed and the manifest signed again with
// testPassphrase, as its author can.
func resign(t *testing.T, archive []byte, edit func(name string, data []byte) []byte, editManifest func(*Manifest)) []byte {
	t.Helper()
	return rewrite(t, archive, func(ms []member) []member {
		var m Manifest
		mi := -1
		for i := range ms {
			if ms[i].hdr.Name == memberManifest {
				mi = i
				if err := json.Unmarshal(ms[i].data, &m); err != nil {
					t.Fatal(err)
				}
			}
		}
		for i := range ms {
			if edit == nil || i == mi || ms[i].hdr.Name == memberSig {
				continue
			}
			if data := edit(ms[i].hdr.Name, ms[i].data); data != nil {
				ms[i].data = data
				sum := sha256.Sum256(data)
				for j := range m.Members {
					if m.Members[j].Name == ms[i].hdr.Name {
						m.Members[j].Size = int64(len(data))
						m.Members[j].SHA256 = hex.EncodeToString(sum[:])
					}
				}
			}
		}
		if editManifest != nil {
			editManifest(&m)
		}
		raw, err := json.Marshal(&m)
		if err != nil {
			t.Fatal(err)
		}
		k, err := deriveKeys([]byte(testPassphrase), m.Secrets)
		if err != nil {
			t.Fatal(err)
		}
		sig, err := signManifest(k, raw)
		if err != nil {
			t.Fatal(err)
		}
		ms[mi].data = raw
		for i := range ms {
			if ms[i].hdr.Name == memberSig {
				ms[i].data = sig
			}
		}
		return ms
	})
}

// patchTOC replaces the marker's definition in db/toc.dat with sql: a
// pg_dump string is a sign byte and a little-endian 4-byte length, then
// the bytes.
func patchTOC(t *testing.T, sql string) func(string, []byte) []byte {
	return func(name string, data []byte) []byte {
		if name != prefixDB+"toc.dat" {
			return nil
		}
		var old bytes.Buffer
		old.WriteByte(0)
		_ = binary.Write(&old, binary.LittleEndian, uint32(len(markerDefn)))
		old.WriteString(markerDefn)
		if bytes.Count(data, old.Bytes()) != 1 {
			t.Fatalf("toc.dat: marker definition found %d times", bytes.Count(data, old.Bytes()))
		}
		var repl bytes.Buffer
		repl.WriteByte(0)
		_ = binary.Write(&repl, binary.LittleEndian, uint32(len(sql)))
		repl.WriteString(sql)
		return bytes.Replace(data, old.Bytes(), repl.Bytes(), 1)
	}
}

// hostileArchive exports the hostile project (once per test) uncompressed.
func hostileArchive(t *testing.T) []byte {
	t.Helper()
	p := testProject(t, "hostile", hostileSQL)
	path, _ := exportTo(t, p, CompressionNone)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// importBytes writes archive to a file and imports it into tg under ref.
func importBytes(t *testing.T, tg target, archive []byte, ref string) (*ImportResult, error) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "hostile.caf")
	if err := os.WriteFile(path, archive, 0o600); err != nil {
		t.Fatal(err)
	}
	opts := tg.options(path)
	opts.Ref = ref
	return Import(t.Context(), opts, nil)
}

// privileges lists what gives power on the target server: superusers and
// roles with CREATEROLE, CREATEDB, REPLICATION or BYPASSRLS, and every
// membership.
func privileges(t *testing.T) string {
	t.Helper()
	admin := dst.Primary.SuperuserURL("postgres")
	roles := pgtest.QueryValue(t, admin, `SELECT coalesce(string_agg(rolname || ':' || rolsuper || rolcreaterole || rolcreatedb || rolreplication, ',' ORDER BY rolname), '')
FROM pg_roles WHERE rolsuper OR rolcreaterole OR rolcreatedb OR rolreplication`)
	members := pgtest.QueryValue(t, admin, `SELECT coalesce(string_agg(r.rolname || '>' || m.rolname, ',' ORDER BY 1), '')
FROM pg_auth_members a JOIN pg_roles r ON r.oid = a.roleid JOIN pg_roles m ON m.oid = a.member
WHERE m.rolname !~ '_owner_[0-9a-f]{8}$'
  AND NOT (m.rolname = 'authenticator' AND r.rolname IN ('anon', 'authenticated', 'service_role'))`)
	return roles + " | " + members
}

// refusedUnchanged imports archive as hostile_in, checks that it fails
// mentioning hint and that neither the instance's databases, roles and
// files nor any role's attributes or memberships changed.
func refusedUnchanged(t *testing.T, tg target, archive []byte, hint string) error {
	t.Helper()
	before, privBefore := stateOf(t, tg), privileges(t)
	_, err := importBytes(t, tg, archive, "hostile_in")
	if err == nil || !strings.Contains(err.Error(), hint) {
		t.Fatalf("import error = %v\nwant one mentioning %q", err, hint)
	}
	t.Logf("refused: %v", err)
	if after := stateOf(t, tg); !before.equal(after) {
		t.Errorf("a refused import changed the instance:\nbefore %+v\nafter  %+v", before, after)
	}
	if privAfter := privileges(t); privAfter != privBefore {
		t.Errorf("privileges changed:\nbefore %s\nafter  %s", privBefore, privAfter)
	}
	return err
}

func TestHostileManifestRoles(t *testing.T) {
	plain := hostileArchive(t)
	tg := newTarget(t, "hostile_in")
	admin := dst.Primary.SuperuserURL("postgres")
	pgtest.Exec(t, admin, `DROP ROLE IF EXISTS evil_super; CREATE ROLE evil_super NOLOGIN SUPERUSER;
DROP ROLE IF EXISTS evil_member; CREATE ROLE evil_member NOLOGIN; GRANT pg_read_server_files TO evil_member;
DROP ROLE IF EXISTS evil_login; CREATE ROLE evil_login LOGIN;`)
	t.Cleanup(func() {
		conn, err := pgx.Connect(context.Background(), admin)
		if err == nil {
			_, err = conn.Exec(context.Background(), "DROP ROLE IF EXISTS evil_super, evil_member, evil_login")
			conn.Close(context.Background())
		}
		if err != nil {
			t.Errorf("drop the test roles: %v", err)
		}
	})

	addRole := func(r Role) func(*Manifest) { return func(m *Manifest) { m.Roles = append(m.Roles, r) } }
	setRoles := func(roles ...string) func(*Manifest) {
		return func(m *Manifest) {
			raw, _ := json.Marshal(roles)
			m.Project.Settings["roles"] = raw
		}
	}
	cases := []struct {
		name, hint string
		edit       func(*Manifest)
	}{
		{"postgres in roles", `role "postgres": it is the bootstrap superuser`, addRole(Role{Name: "postgres"})},
		{"postgres as a project role", `role "postgres"`, setRoles("anon", "authenticated", "postgres")},
		{"login role", `role "authenticator": it is the login role`, addRole(Role{Name: "authenticator", Login: true})},
		{"new role member of postgres", `role "postgres"`, addRole(Role{Name: "newbie", MemberOf: []string{"postgres"}})},
		{"pg_ role", `role "pg_execute_server_program"`, addRole(Role{Name: "pg_execute_server_program"})},
		{"existing superuser", `role "evil_super", which exists on the target server with SUPERUSER`, addRole(Role{Name: "evil_super"})},
		{"existing superuser as a project role", `role "evil_super"`, setRoles("anon", "evil_super")},
		{"existing login role", `role "evil_login", which exists on the target server with LOGIN`, addRole(Role{Name: "evil_login"})},
		{"existing role with a membership", `member of "pg_read_server_files"`, addRole(Role{Name: "evil_member"})},
		{"provisioning owner", `role "postgres"`, addRole(Role{Name: "postgres", BypassRLS: true})},
		{"the owner it was dumped as", `role "src_owner": it is the owner the archive was dumped as`, func(m *Manifest) {
			m.Postgres.Owner = "src_owner"
			m.Roles = append(m.Roles, Role{Name: "src_owner"})
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := refusedUnchanged(t, tg, resign(t, plain, nil, c.edit), c.hint)
			if !errors.Is(err, ErrRefused) {
				t.Errorf("import error = %v, want ErrRefused", err)
			}
		})
	}
}

func TestHostileDump(t *testing.T) {
	plain := hostileArchive(t)
	tg := newTarget(t, "hostile_in")
	admin := dst.Primary.SuperuserURL("postgres")
	witness := filepath.Join(t.TempDir(), "witness")
	cases := []struct {
		name, sql, hint string
	}{
		{"alter role superuser", "ALTER ROLE authenticator SUPERUSER;\n", "must be superuser to alter superuser roles"},
		{"create role", "CREATE ROLE intruder SUPERUSER LOGIN PASSWORD 'x';\n", "must be superuser to create superusers"},
		{"grant a superuser's role", "GRANT postgres TO authenticator;\n", "must be superuser to alter superusers"},
		{"copy to program", "COPY (SELECT 1) TO PROGRAM 'touch " + witness + "';\n", "pg_execute_server_program"},
		{"copy to file", "COPY (SELECT 1) TO '" + witness + "';\n", "pg_write_server_files"},
		{"reset role", "RESET ROLE; SET SESSION AUTHORIZATION postgres; ALTER ROLE authenticator SUPERUSER;\n", "permission denied to set session authorization"},
		{"trusted extension not allowed", "CREATE EXTENSION hstore SCHEMA public;\n", `the dump created extension "hstore" itself`},
		{"untrusted extension", "CREATE EXTENSION file_fdw SCHEMA public;\n", "permission denied to create extension"},
		{"cast run by the checksums", `CREATE FUNCTION public.evil(public.notes) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN EXECUTE 'COPY (SELECT 1) TO PROGRAM ''touch ` + witness + `'''; RETURN 'x'; END $f$;
CREATE CAST (public.notes AS text) WITH FUNCTION public.evil(public.notes);
`, "pg_execute_server_program"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			refusedUnchanged(t, tg, resign(t, plain, patchTOC(t, c.sql), nil), c.hint)
			if _, err := os.Stat(witness); err == nil {
				t.Errorf("the dump wrote %s on the server's disk", witness)
			}
			if super := pgtest.QueryValue(t, admin, "SELECT coalesce((SELECT rolsuper::text FROM pg_roles WHERE rolname = 'authenticator'), 'absent')"); super == "true" {
				t.Fatal("authenticator became a superuser")
			}
		})
	}

	t.Run("manifest lists an untrusted extension", func(t *testing.T) {
		archive := resign(t, plain, nil, func(m *Manifest) {
			m.Extensions = append(m.Extensions, Extension{Name: "file_fdw", Version: "1.0", Schema: "public"})
		})
		_, err := importBytes(t, tg, archive, "hostile_in")
		if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), `extension "file_fdw", which is not allowed`) {
			t.Fatalf("import error = %v, want the extension refused", err)
		}
	})

	t.Run("security definer function stays inside the database", func(t *testing.T) {
		privBefore := privileges(t)
		res, err := importBytes(t, tg, plain, "hostile_in")
		if err != nil {
			t.Fatal(err)
		}
		owner := urlUser(res.Project.OwnerURL)
		if !strings.HasPrefix(owner, "hostile_in_owner_") {
			t.Fatalf("owner_url user = %q, want the project's own owner role", owner)
		}
		got := pgtest.QueryValue(t, admin, `SELECT r.rolsuper || ',' || r.rolcreaterole || ',' || r.rolcreatedb || ',' ||
  (SELECT count(*) FROM pg_auth_members a WHERE a.member = r.oid) FROM pg_roles r WHERE r.rolname = $1`, owner)
		if got != "false,false,false,0" {
			t.Errorf("owner role %s: super,createrole,createdb,memberships = %s", owner, got)
		}
		db := dst.Primary.SuperuserURL("hostile_in")
		if o := pgtest.QueryValue(t, db, "SELECT proowner::regrole::text FROM pg_proc WHERE proname = 'escalate'"); o != owner {
			t.Errorf("escalate() is owned by %s, want %s", o, owner)
		}
		// The function runs with its owner's rights, which end at the database.
		err = execErr(t, res.Project.OwnerURL, "SELECT public.escalate()")
		if err == nil || !strings.Contains(err.Error(), "must be superuser") {
			t.Errorf("escalate() as the owner: %v, want it refused", err)
		}
		if privAfter := privileges(t); privAfter != privBefore {
			t.Errorf("privileges changed:\nbefore %s\nafter  %s", privBefore, privAfter)
		}
		// The owner role serves as the project's owner_url: the cascata schema
		// and later exports work with its rights.
		if n := pgtest.QueryValue(t, res.Project.OwnerURL, "SELECT count(*) FROM public.notes"); n != "50" {
			t.Errorf("rows as the owner = %s", n)
		}
		// Exported as that owner role, the project imports again on the same
		// server: the manifest does not name the role it was dumped as.
		again, m := exportTo(t, res.Project, CompressionNone)
		for _, r := range m.Roles {
			if r.Name == owner {
				t.Errorf("the manifest names the owner role %s", owner)
			}
		}
		opts := tg.options(again)
		opts.Ref = "hostile_again"
		pgtest.Exec(t, admin, "DROP DATABASE IF EXISTS hostile_again WITH (FORCE)")
		if _, err := Import(t.Context(), opts, nil); err != nil {
			t.Fatalf("import of the export of an import: %v", err)
		}
	})
}

// execErr runs sql on a new connection and returns its error.
func execErr(t *testing.T, url, sql string) error {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), url)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer conn.Close(context.WithoutCancel(t.Context()))
	_, err = conn.Exec(t.Context(), sql)
	return err
}
