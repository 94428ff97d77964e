package archive

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"cascata/internal/config"
	"cascata/internal/pgtools"
	"cascata/internal/projectdb"

	"github.com/jackc/pgx/v5"
)

// An archive is untrusted input: its passphrase proves that nobody changed
// it on the way, not that whoever made it means well. So an import
//
//   - creates or uses only ordinary project roles: never postgres, a pg_*
//     role, the login role, the provisioning owner, or an existing role that
//     has attributes (SUPERUSER, CREATEROLE, CREATEDB, REPLICATION, LOGIN) or
//     memberships beyond the project's roles (checkRoles);
//   - creates the extensions itself, from an allowlist, in the still empty
//     database, and refuses a dump that created any other
//     (createExtensions, checkExtensions);
//   - restores the dump as a fresh role that owns the new database and
//     nothing else (created by provisioning, no superuser, member of
//     nothing), logged in as that role: whatever SQL the dump holds runs with
//     that role's rights (restoreAsOwner), and so do the checksums computed
//     afterwards and every later use of the project's owner_url.

// ErrRefused is wrapped by the errors of an archive whose content an import
// will not restore: a role or extension the policy above refuses.
var ErrRefused = errors.New("archive refused")

// reservedRole says why name may never be a role an archive brings along,
// or "" when it may.
func (im *importer) reservedRole(name, provisionOwner, dumpedAs string) string {
	switch {
	case name == "postgres":
		return "it is the bootstrap superuser"
	case strings.HasPrefix(name, "pg_"):
		return "names starting with pg_ are PostgreSQL's own roles"
	case name == "public" || name == "none" || name == "current_user" || name == "session_user" || name == "current_role":
		return "it is a reserved role name"
	case name == im.opts.LoginUser:
		return "it is the login role ([provision].login_user), which the proxy logs in as"
	case name == provisionOwner:
		return "it is the provisioning owner ([provision].owner_url)"
	case name == dumpedAs:
		return "it is the owner the archive was dumped as (the import gives every object to the project's own new owner role)"
	}
	return ""
}

// archiveRoleNames returns every role name the archive asks for: its roles,
// their memberships and the project's role settings.
func archiveRoleNames(m *Manifest, p *config.Project) []string {
	var names []string
	for _, r := range m.Roles {
		names = append(names, r.Name)
		names = append(names, r.MemberOf...)
	}
	names = append(names, p.Roles...)
	names = append(names, p.TrustedRoles...)
	if p.AnonRole != "" {
		names = append(names, p.AnonRole)
	}
	slices.Sort(names)
	return slices.Compact(names)
}

// checkRoles refuses the archive when one of its roles is reserved, or
// exists on the target server with attributes or memberships beyond the
// project's roles.
func (im *importer) checkRoles(ctx context.Context, admin *pgx.Conn, m *Manifest, p *config.Project) error {
	var provisionOwner string
	if err := admin.QueryRow(ctx, "SELECT current_user").Scan(&provisionOwner); err != nil {
		return fmt.Errorf("look up the provisioning owner: %w", err)
	}
	names := archiveRoleNames(m, p)
	inProject := map[string]bool{}
	for _, n := range names {
		inProject[n] = true
	}
	for _, name := range names {
		if why := im.reservedRole(name, provisionOwner, m.Postgres.Owner); why != "" {
			return fmt.Errorf("%w: the archive names role %q: %s; an archive may only bring ordinary project roles", ErrRefused, name, why)
		}
		var super, createRole, createDB, replication, login bool
		err := admin.QueryRow(ctx, `SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolcanlogin
FROM pg_roles WHERE rolname = $1`, name).Scan(&super, &createRole, &createDB, &replication, &login)
		if errors.Is(err, pgx.ErrNoRows) {
			continue // created NOLOGIN by the import
		}
		if err != nil {
			return fmt.Errorf("look up role %s: %w", name, err)
		}
		var attrs []string
		for _, a := range []struct {
			on   bool
			name string
		}{{super, "SUPERUSER"}, {createRole, "CREATEROLE"}, {createDB, "CREATEDB"}, {replication, "REPLICATION"}, {login, "LOGIN"}} {
			if a.on {
				attrs = append(attrs, a.name)
			}
		}
		if len(attrs) > 0 {
			return fmt.Errorf("%w: the archive names role %q, which exists on the target server with %s: only roles without such attributes can be project roles",
				ErrRefused, name, strings.Join(attrs, ", "))
		}
		var groups []string
		if err := pgtools.QueryStrings(ctx, admin, &groups, `SELECT g.rolname FROM pg_auth_members a
JOIN pg_roles g ON g.oid = a.roleid JOIN pg_roles r ON r.oid = a.member WHERE r.rolname = $1 ORDER BY 1`, name); err != nil {
			return fmt.Errorf("look up the memberships of role %s: %w", name, err)
		}
		for _, g := range groups {
			if !inProject[g] {
				return fmt.Errorf("%w: the archive names role %q, which exists on the target server as a member of %q, a role outside the project", ErrRefused, name, g)
			}
		}
	}
	return nil
}

// extensionPolicy returns the extensions provisioning will create: each of
// the archive's, which must be allowed. The allowlist is
// ImportOptions.Extensions ([provision].extensions); without one it is
// pgcrypto and the archive's extensions that the target server marks
// trusted (those a database owner could create anyway).
func (im *importer) extensionPolicy(ctx context.Context, admin *pgx.Conn, m *Manifest, toc []tocEntry) ([]Extension, error) {
	allowed := map[string]bool{"plpgsql": true}
	if len(im.opts.Extensions) > 0 {
		for _, e := range im.opts.Extensions {
			allowed[e] = true
		}
	} else {
		allowed["pgcrypto"] = true
		var trusted []string
		if err := pgtools.QueryStrings(ctx, admin, &trusted, `SELECT DISTINCT name FROM pg_available_extension_versions WHERE trusted`); err != nil {
			return nil, fmt.Errorf("list trusted extensions: %w", err)
		}
		for _, t := range trusted {
			allowed[t] = true
		}
	}
	listed := map[string]Extension{}
	var out []Extension
	for _, e := range m.Extensions {
		if !allowed[e.Name] {
			return nil, fmt.Errorf("%w: the archive's database uses extension %q, which is not allowed on this server (add it to [provision].extensions)", ErrRefused, e.Name)
		}
		if e.Schema == "" || e.Schema == "information_schema" || (strings.HasPrefix(e.Schema, "pg_") && e.Name != "plpgsql") {
			return nil, fmt.Errorf("%w: extension %q in schema %q: extensions go into an ordinary schema", ErrRefused, e.Name, e.Schema)
		}
		listed[e.Name] = e
		if e.Name != "plpgsql" {
			out = append(out, e)
		}
	}
	for _, t := range toc {
		if t.desc == "EXTENSION" {
			if _, ok := listed[t.tag]; !ok {
				return nil, fmt.Errorf("%w: the dump creates extension %q, which the manifest does not list", ErrRefused, t.tag)
			}
		}
	}
	return out, nil
}

// tocEntry is one line of `pg_restore --list`.
type tocEntry struct {
	line string // as listed
	desc string // "TABLE", "SCHEMA", "EXTENSION", "DEFAULT ACL", "COMMENT", …
	tag  string // for EXTENSION the extension's name; for COMMENT e.g. "EXTENSION pgcrypto"
}

// tocLine is "<dump id>; <table oid> <oid> <desc> <namespace> <tag> <owner>".
var tocLine = regexp.MustCompile(`^(\d+); (\d+) (\d+) (.*)$`)

// tocDescs are the entry kinds a dump holds, longest first so that
// "TABLE DATA" wins over "TABLE".
var tocDescs = func() []string {
	d := []string{"DEFAULT ACL", "TABLE DATA", "SEQUENCE SET", "SEQUENCE OWNED BY", "FK CONSTRAINT", "CHECK CONSTRAINT",
		"LARGE OBJECT", "BLOB", "BLOBS", "BLOB METADATA", "MATERIALIZED VIEW DATA", "MATERIALIZED VIEW", "EVENT TRIGGER",
		"FOREIGN TABLE", "FOREIGN DATA WRAPPER", "FOREIGN SERVER", "USER MAPPING", "PUBLICATION TABLE",
		"PUBLICATION TABLES IN SCHEMA", "DATABASE PROPERTIES", "TEXT SEARCH CONFIGURATION", "TEXT SEARCH DICTIONARY",
		"TEXT SEARCH PARSER", "TEXT SEARCH TEMPLATE", "OPERATOR CLASS", "OPERATOR FAMILY", "ROW SECURITY", "SHELL TYPE",
		"PROCEDURAL LANGUAGE", "ACCESS METHOD", "EXTENSION", "SCHEMA", "COMMENT", "SECURITY LABEL", "ACL", "DATABASE",
		"PUBLICATION", "SUBSCRIPTION", "ENCODING", "STDSTRINGS", "SEARCHPATH"}
	slices.SortFunc(d, func(a, b string) int { return len(b) - len(a) })
	return d
}()

// listTOC runs pg_restore --list on the dump directory (no connection).
func listTOC(ctx context.Context, pgRestore, dbDir string) ([]tocEntry, error) {
	out, err := pgtools.Output(ctx, pgtools.Target{}, pgRestore, "--list", "--format=directory", dbDir)
	if err != nil {
		return nil, fmt.Errorf("%w: read the dump's table of contents: %v", ErrCorrupt, err)
	}
	var toc []tocEntry
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, ";") {
			continue
		}
		mm := tocLine.FindStringSubmatch(line)
		if mm == nil {
			return nil, fmt.Errorf("%w: unexpected table-of-contents line %q", ErrCorrupt, line)
		}
		e := tocEntry{line: line}
		rest := mm[4]
		for _, d := range tocDescs {
			if strings.HasPrefix(rest, d+" ") {
				e.desc = d
				rest = strings.TrimPrefix(rest, d+" ")
				break
			}
		}
		// rest is "<namespace> <tag> <owner>"; an extension's tag is one word.
		fields := strings.Fields(rest)
		switch {
		case (e.desc == "EXTENSION" || e.desc == "SCHEMA") && len(fields) >= 2:
			e.tag = fields[1]
		case e.desc == "COMMENT" && len(fields) >= 3:
			e.tag = fields[1] + " " + fields[2]
		}
		toc = append(toc, e)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read the dump's table of contents: %w", err)
	}
	return toc, nil
}

// restorePlan lists the entries of the table of contents to restore. Left
// out: extensions and their comments (provisioning creates them), the
// schemas provisioning created for them, default privileges (they name the
// old owner; the new owner's are set afresh), database-level entries and
// subscriptions.
func restorePlan(toc []tocEntry, extSchemas map[string]bool) (lines []string, defaultACLs int) {
	for _, e := range toc {
		switch {
		case e.desc == "SCHEMA" && extSchemas[e.tag]:
		case e.desc == "EXTENSION", e.desc == "COMMENT" && strings.HasPrefix(e.tag, "EXTENSION "),
			e.desc == "DATABASE", e.desc == "DATABASE PROPERTIES", e.desc == "SUBSCRIPTION":
		case e.desc == "DEFAULT ACL":
			defaultACLs++
		default:
			lines = append(lines, e.line)
		}
	}
	return lines, defaultACLs
}

// restoreAsOwner has provisioning create the extensions in the still empty
// database (so no object of the dump is there when an extension script
// runs with the provisioning owner's rights), then restores the dump logged
// in as the project's owner role (ownerURL). --no-owner gives every object
// to that role.
func (im *importer) restoreAsOwner(ctx context.Context, pgRestore, dbDir, ownerURL string, toc []tocEntry, exts []Extension, adminDBURL string) error {
	extSchemas, err := createExtensions(ctx, adminDBURL, urlUser(ownerURL), exts)
	if err != nil {
		return err
	}
	lines, defaultACLs := restorePlan(toc, extSchemas)
	target, err := pgtools.ParseTarget(ownerURL, "")
	if err != nil {
		return err
	}
	list := filepath.Join(im.scratch, "restore.list")
	if err := os.WriteFile(list, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		return fmt.Errorf("restore list: %w", err)
	}
	if err := pgtools.Run(ctx, target, pgRestore, "--format=directory", "--exit-on-error", "--no-owner",
		"--no-subscriptions", "--no-password", "--jobs="+strconv.Itoa(im.opts.Jobs), "--use-list="+list, dbDir); err != nil {
		return fmt.Errorf("restore (as the project's own owner role, which may act only inside its database): %w", err)
	}
	if defaultACLs > 0 {
		im.warn("%d default privilege entries of the archive name the old owner and were not restored; the new owner role has provisioning's defaults", defaultACLs)
	}
	return nil
}

// createExtensions creates the allowed extensions as the provisioning owner
// in their schemas, creating those (owned by owner) but public, and returns
// the schemas it created.
func createExtensions(ctx context.Context, adminDBURL, owner string, exts []Extension) (map[string]bool, error) {
	made := map[string]bool{}
	if len(exts) == 0 {
		return made, nil
	}
	c, err := connect(ctx, adminDBURL)
	if err != nil {
		return nil, fmt.Errorf("create extensions: %w", err)
	}
	defer c.Close(context.WithoutCancel(ctx))
	for _, e := range exts {
		if e.Schema != "public" && !made[e.Schema] {
			if _, err := c.Exec(ctx, "CREATE SCHEMA "+ident(e.Schema)+" AUTHORIZATION "+ident(owner)); err != nil {
				return nil, fmt.Errorf("create schema %s for extension %s: %w", e.Schema, e.Name, err)
			}
			made[e.Schema] = true
		}
		if _, err := c.Exec(ctx, "CREATE EXTENSION "+ident(e.Name)+" WITH SCHEMA "+ident(e.Schema)); err != nil {
			return nil, fmt.Errorf("create extension %s (is it installed on the target server?): %w", e.Name, err)
		}
	}
	return made, nil
}

// checkExtensions refuses a restored database holding an extension that
// provisioning did not create (the dump's SQL created it).
func checkExtensions(ctx context.Context, conn *pgx.Conn, exts []Extension) error {
	var have []string
	if err := pgtools.QueryStrings(ctx, conn, &have, "SELECT extname FROM pg_extension ORDER BY 1"); err != nil {
		return fmt.Errorf("list extensions: %w", err)
	}
	for _, h := range have {
		if h == "plpgsql" || slices.ContainsFunc(exts, func(e Extension) bool { return e.Name == h }) {
			continue
		}
		return fmt.Errorf("%w: the dump created extension %q itself; extensions are created by provisioning from [provision].extensions", ErrRefused, h)
	}
	return nil
}

// createOwner creates the imported project's owner role through
// provisioning and drops it again on failure.
func (im *importer) createOwner(ctx context.Context, admin *pgx.Conn, ref string) (string, string, error) {
	name, password, err := projectdb.CreateOwnerRole(ctx, admin, ref)
	if err != nil {
		return "", "", err
	}
	im.undo.push("drop role "+name, func(ctx context.Context) error {
		return im.exec(ctx, "DROP ROLE IF EXISTS "+ident(name))
	})
	return name, password, nil
}
