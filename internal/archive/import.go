package archive

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"cascata/internal/config"
	"cascata/internal/projectdb"
	"cascata/internal/storage"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// ImportOptions configures Import.
type ImportOptions struct {
	// ArchivePath is the .caf file (an upload must be saved to disk first:
	// the archive is verified in full before anything is created).
	ArchivePath string
	// Passphrase opens secrets.enc and authenticates the manifest.
	Passphrase []byte
	// Ref is the new project's ref ("?as=REF"); "" keeps the archive's.
	Ref string
	// OwnerURL reaches the target server as a role that may CREATE
	// DATABASE and CREATE ROLE ([provision].owner_url); its database is
	// used only to run those statements.
	OwnerURL string
	// Database is the new database's name; "" means the ref.
	Database string
	// LoginUser and LoginPassword go into the new project's database_url
	// ([provision].login_user, login password). The login role is created
	// (LOGIN NOINHERIT) when missing and granted the project roles.
	LoginUser     string
	LoginPassword string
	// StorageDir receives the storage files; "" means StorageRoot/<ref>.
	StorageRoot string
	StorageDir  string
	// Storage, when set, returns for the project's ref (known once the
	// archive is read) an S3 prefix that receives the storage files instead
	// of a local directory (the imported project gets it as its
	// storage_url), or nil for the local directory.
	Storage func(ref string) (*StorageTarget, error)
	// VectorsDir receives vectors/ when the archive has them; when empty
	// they are left out with a warning.
	VectorsDir string
	// SecretsDir, when set, receives <ref>.jwt_secret (and <ref>.jwks.json),
	// mode 0600, which the returned project points to; when empty the first
	// HMAC secret is returned inline in Project.JWTSecret. An archive with a
	// JWKS needs a SecretsDir.
	SecretsDir string
	// Overwrite replaces an existing project: its registration (Exists),
	// database and storage directory. Without it any of them existing is
	// ErrProjectExists.
	Overwrite bool
	// Exists reports whether a project with this ref is registered; nil
	// means none is.
	Exists func(ctx context.Context, ref string) (bool, error)
	// BinDir holds pg_restore; "" means the newest installed PostgreSQL's, or PATH.
	BinDir string
	// TempDir receives the unpacked archive while it is verified and
	// restored; "" means os.TempDir(). Put it on the storage root's file
	// system to move the storage files in by rename instead of by copy.
	TempDir string
	// Jobs is the number of pg_restore workers and checksum connections; 0 means 2.
	Jobs int
	// Extensions is the allowlist of extensions provisioning creates for
	// the restored database ([provision].extensions); empty means pgcrypto
	// and those of the archive's the target server marks trusted.
	Extensions []string

	// afterRestore, in tests, runs between pg_restore and the checksums.
	afterRestore func(ctx context.Context, databaseURL string) error
}

// ImportResult is what Import created.
type ImportResult struct {
	// Project is the project to register: same JWT keys and settings as the
	// exported one, database_url as LoginUser on the new database,
	// owner_url, storage_dir. It has no replicas.
	Project config.Project
	// Manifest is the verified manifest of the archive.
	Manifest *Manifest
	// Secrets are the decrypted JWT keys (all of them, also those that do
	// not fit in Project; see Warnings).
	Secrets Secrets
	// CreatedRoles are the roles that did not exist on the target.
	CreatedRoles []string
	// Warnings are things the caller should show the operator.
	Warnings []string
}

// Import verifies the archive and restores it as a new project: it checks
// every member against the manifest while unpacking into TempDir (nothing
// else is touched before the whole archive verified), creates the missing
// roles, restores the database with pg_restore under a temporary name,
// recomputes every table checksum and compares it with the manifest, then
// renames the database into place and moves the storage files in. Any error
// drops what the import created. The caller registers ImportResult.Project.
func Import(ctx context.Context, opts ImportOptions, progress ProgressFunc) (_ *ImportResult, err error) {
	progress = serialProgress(progress)
	if len(opts.Passphrase) == 0 {
		return nil, fmt.Errorf("import: %w", ErrNoPassphrase)
	}
	if opts.ArchivePath == "" {
		return nil, errors.New("import: no archive path")
	}
	if opts.OwnerURL == "" {
		return nil, errors.New("import: no target owner URL ([provision].owner_url)")
	}
	if opts.LoginUser == "" {
		opts.LoginUser = "authenticator"
	}
	if opts.LoginPassword == "" {
		return nil, errors.New("import: no login password for the new project's database_url ([provision].login_password_env)")
	}
	if opts.StorageDir == "" && opts.StorageRoot == "" && opts.Storage == nil {
		return nil, errors.New("import: no storage root ([provision].storage_root)")
	}
	if opts.Ref != "" && !refPattern.MatchString(opts.Ref) {
		return nil, fmt.Errorf("import: ref %q must match [a-z0-9_]{1,63}", opts.Ref)
	}
	if opts.Jobs <= 0 {
		opts.Jobs = 2
	}
	im := &importer{opts: opts, progress: progress}
	defer func() {
		if err != nil {
			if uerr := im.undo.run(context.WithoutCancel(ctx)); uerr != nil {
				err = fmt.Errorf("%w (and cleaning up failed: %v)", err, uerr)
			}
		}
		if im.admin != nil {
			_ = im.admin.Close(context.WithoutCancel(ctx))
		}
		if im.scratch != "" {
			_ = removeTree(im.scratch)
		}
	}()
	res, err := im.run(ctx)
	if err != nil {
		return nil, fmt.Errorf("import %s: %w", filepath.Base(opts.ArchivePath), err)
	}
	return res, nil
}

// importer holds the state of one Import.
type importer struct {
	opts     ImportOptions
	progress ProgressFunc
	undo     undoStack
	scratch  string
	warnings []string
	// admin is the connection to the target server; undo steps reconnect
	// when it was lost (a cancelled query closes a pgx connection).
	admin *pgx.Conn
	// target and store are ImportOptions.Storage's prefix, nil for a local directory.
	target *StorageTarget
	store  *storage.S3
}

// exec runs a statement for an undo step on a live admin connection.
func (im *importer) exec(ctx context.Context, sql string, args ...any) error {
	c, err := im.liveAdmin(ctx)
	if err != nil {
		return err
	}
	_, err = c.Exec(ctx, sql, args...)
	return err
}

func (im *importer) liveAdmin(ctx context.Context) (*pgx.Conn, error) {
	if im.admin == nil || im.admin.IsClosed() {
		c, err := connect(ctx, im.opts.OwnerURL)
		if err != nil {
			return nil, err
		}
		im.admin = c
	}
	return im.admin, nil
}

func (im *importer) warn(format string, args ...any) {
	im.warnings = append(im.warnings, fmt.Sprintf(format, args...))
}

func (im *importer) run(ctx context.Context) (*ImportResult, error) {
	o := &im.opts
	pgRestore, err := findTool(ctx, o.BinDir, "pg_restore")
	if err != nil {
		return nil, err
	}

	// A ref given by the caller can be checked before the long unpack.
	if o.Ref != "" {
		if err := im.resolveStorage(ctx, o.Ref); err != nil {
			return nil, err
		}
		if err := im.checkFree(ctx, o.Ref, im.storageDir(o.Ref), false); err != nil {
			return nil, err
		}
	}

	// 1. Unpack into private scratch space while verifying.
	if im.scratch, err = os.MkdirTemp(o.TempDir, "caf-import-"); err != nil {
		return nil, fmt.Errorf("scratch dir: %w", err)
	}
	dbDir := filepath.Join(im.scratch, "db")
	if err := os.Mkdir(dbDir, 0o700); err != nil {
		return nil, fmt.Errorf("scratch dir: %w", err)
	}
	staged, err := newStager(filepath.Join(im.scratch, "storage"))
	if err != nil {
		return nil, err
	}
	defer staged.close()
	vectors, err := newStager(filepath.Join(im.scratch, "vectors"))
	if err != nil {
		return nil, err
	}
	defer vectors.close()
	m, secrets, err := im.unpack(ctx, dbDir, staged, vectors)
	if err != nil {
		return nil, err
	}

	// 2. Decide names and check that nothing is in the way.
	im.progress("prepare", 0, 0)
	ref := o.Ref
	if ref == "" {
		ref = m.Project.Ref
	}
	database := o.Database
	if database == "" {
		database = ref
	}
	storageDir := im.storageDir(ref)
	if err := im.resolveStorage(ctx, ref); err != nil {
		return nil, err
	}
	p, err := im.project(ref, database, storageDir, m)
	if err != nil {
		return nil, err
	}
	if len(secrets.JWKS) > 0 && o.SecretsDir == "" {
		return nil, errors.New("the archive holds a JWKS: set a secrets dir to write it to")
	}
	if len(m.Vectors) > 0 && o.VectorsDir == "" {
		im.warn("the archive holds a vector snapshot (%d entries) that was not restored: no vectors dir given", len(m.Vectors))
	}
	if err := im.checkFree(ctx, ref, storageDir, len(m.Vectors) > 0); err != nil {
		return nil, err
	}
	admin, err := connect(ctx, o.OwnerURL)
	if err != nil {
		return nil, fmt.Errorf("target server: %w", err)
	}
	im.admin = admin
	dbExists, err := databaseExists(ctx, admin, database)
	if err != nil {
		return nil, err
	}
	if dbExists && !o.Overwrite {
		return nil, fmt.Errorf("%w: database %q exists on the target server", ErrProjectExists, database)
	}
	if err := im.preflight(ctx, admin, m); err != nil {
		return nil, err
	}
	// The archive is untrusted: its roles and extensions must pass the
	// policy before anything is created (restore.go).
	if err := im.checkRoles(ctx, admin, m, &p); err != nil {
		return nil, err
	}
	toc, err := listTOC(ctx, pgRestore, dbDir)
	if err != nil {
		return nil, err
	}
	exts, err := im.extensionPolicy(ctx, admin, m, toc)
	if err != nil {
		return nil, err
	}

	// 3. Roles, the project's own owner role, then the database under a
	// temporary name, owned by that role and restored logged in as it.
	created, err := im.ensureRoles(ctx, admin, m)
	if err != nil {
		return nil, err
	}
	owner, ownerPassword, err := im.createOwner(ctx, admin, ref)
	if err != nil {
		return nil, err
	}
	created = append(created, owner)
	tmpDB := tempName(database, "caf")
	if err := im.createDatabase(ctx, admin, tmpDB, owner, m); err != nil {
		return nil, err
	}
	adminTmpURL, err := withDatabase(o.OwnerURL, tmpDB)
	if err != nil {
		return nil, err
	}
	ownerTmpURL := loginURL(o.OwnerURL, owner, ownerPassword, tmpDB)
	im.progress("restore", 0, 0)
	if err := im.restoreAsOwner(ctx, pgRestore, dbDir, ownerTmpURL, toc, exts, adminTmpURL); err != nil {
		return nil, err
	}
	if err := projectdb.GrantDefaults(ctx, ownerTmpURL, p.Roles); err != nil {
		return nil, fmt.Errorf("restore: %w", err)
	}
	if o.afterRestore != nil {
		if err := o.afterRestore(ctx, adminTmpURL); err != nil {
			return nil, err
		}
	}

	// 4. The restored data must match the checksums taken at export; they
	// are computed as the owner role too, never with more rights than the
	// dump's own functions and casts deserve.
	if err := im.verifyData(ctx, ownerTmpURL, m, exts); err != nil {
		return nil, err
	}
	p.OwnerURL = loginURL(o.OwnerURL, owner, ownerPassword, database)

	// 5. Commit: move everything into place.
	im.progress("commit", 0, 0)
	if err := im.checkFree(ctx, ref, storageDir, len(m.Vectors) > 0); err != nil {
		return nil, err
	}
	if im.store != nil {
		existing, err := checkObjectsFree(ctx, im.store, o.Overwrite)
		if err != nil {
			return nil, err
		}
		if err := im.placeObjects(ctx, staged, im.store, m.Files, existing); err != nil {
			return nil, err
		}
	} else if err := im.placeTree(ctx, staged, storageDir); err != nil {
		return nil, err
	}
	if len(m.Vectors) > 0 && o.VectorsDir != "" {
		if err := im.placeTree(ctx, vectors, o.VectorsDir); err != nil {
			return nil, err
		}
	}
	if err := im.placeSecrets(ref, secrets, &p); err != nil {
		return nil, err
	}
	if err := im.renameDatabase(ctx, admin, tmpDB, database, dbExists); err != nil {
		return nil, err
	}
	im.undo.commit()
	return &ImportResult{Project: p, Manifest: m, Secrets: secrets, CreatedRoles: created, Warnings: im.warnings}, nil
}

// resolveStorage asks ImportOptions.Storage where ref's files go and,
// for an S3 prefix, checks that it holds nothing (unless Overwrite).
func (im *importer) resolveStorage(ctx context.Context, ref string) error {
	if im.opts.Storage == nil {
		return nil
	}
	t, err := im.opts.Storage(ref)
	if err != nil {
		return err
	}
	im.target, im.store = t, nil
	if t == nil {
		return nil
	}
	if im.store, err = storage.Open(t.S3); err != nil {
		return err
	}
	_, err = checkObjectsFree(ctx, im.store, im.opts.Overwrite)
	return err
}

// storageDir is where the project's storage files go.
func (im *importer) storageDir(ref string) string {
	if im.opts.StorageDir != "" {
		return im.opts.StorageDir
	}
	return filepath.Join(im.opts.StorageRoot, ref)
}

// unpack verifies the archive while writing db files and trees to scratch.
func (im *importer) unpack(ctx context.Context, dbDir string, storage, vectors *stager) (*Manifest, Secrets, error) {
	f, err := os.Open(im.opts.ArchivePath)
	if err != nil {
		return nil, Secrets{}, err
	}
	defer f.Close()
	var size int64
	if fi, err := f.Stat(); err == nil {
		size = fi.Size()
	}
	buf := make([]byte, 1<<20)
	sink := func(ctx context.Context, kind memberKind, e treeEntry, r io.Reader) error {
		var st *stager
		switch kind {
		case kindDB:
			out, err := os.OpenFile(filepath.Join(dbDir, e.rel), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
			if err != nil {
				return err
			}
			_, err = io.CopyBuffer(out, ctxReader{ctx, r}, buf)
			if cerr := out.Close(); err == nil {
				err = cerr
			}
			return err
		case kindStorage:
			st = storage
		case kindVectors:
			st = vectors
		default:
			return nil
		}
		if e.dir {
			return st.mkdir(e)
		}
		return st.file(ctx, e, r, buf)
	}
	m, secrets, err := verifyStream(ctx, f, im.opts.Passphrase, sink, func(n int64) { im.progress("unpack", n, size) })
	if err != nil {
		return nil, Secrets{}, err
	}
	if err := storage.finish(); err != nil {
		return nil, Secrets{}, err
	}
	if err := vectors.finish(); err != nil {
		return nil, Secrets{}, err
	}
	return m, secrets, nil
}

// checkFree fails with ErrProjectExists when the ref is registered, or the
// storage dir (or, with vectors, the vectors dir) holds something, or a key
// file of the ref exists, unless Overwrite.
func (im *importer) checkFree(ctx context.Context, ref, storageDir string, vectors bool) error {
	if im.opts.Overwrite {
		return nil
	}
	if im.opts.Exists != nil {
		exists, err := im.opts.Exists(ctx, ref)
		if err != nil {
			return fmt.Errorf("look up project %s: %w", ref, err)
		}
		if exists {
			return fmt.Errorf("%w: project %q is registered (import with overwrite, or under another ref)", ErrProjectExists, ref)
		}
	}
	var dirs []string
	if im.target == nil {
		dirs = append(dirs, storageDir)
	}
	if vectors && im.opts.VectorsDir != "" {
		dirs = append(dirs, im.opts.VectorsDir)
	}
	for _, dir := range dirs {
		entries, err := os.ReadDir(dir)
		if err == nil && len(entries) > 0 {
			return fmt.Errorf("%w: %s is not empty", ErrProjectExists, dir)
		}
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("%s: %w", dir, err)
		}
	}
	if im.opts.SecretsDir != "" {
		for _, name := range []string{ref + ".jwt_secret", ref + ".jwks.json"} {
			if _, err := os.Lstat(filepath.Join(im.opts.SecretsDir, name)); err == nil {
				return fmt.Errorf("%w: %s exists in the secrets dir", ErrProjectExists, name)
			}
		}
	}
	return nil
}

// preflight checks the target offers the archive's extensions.
func (im *importer) preflight(ctx context.Context, admin *pgx.Conn, m *Manifest) error {
	names := make([]string, len(m.Extensions))
	for i, e := range m.Extensions {
		names[i] = e.Name
	}
	rows, err := admin.Query(ctx, "SELECT name FROM pg_available_extensions WHERE name = ANY($1::text[])", names)
	if err != nil {
		return fmt.Errorf("list available extensions: %w", err)
	}
	avail, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("list available extensions: %w", err)
	}
	var missing []string
	for _, n := range names {
		if !slices.Contains(avail, n) {
			missing = append(missing, n)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("the target server lacks extensions %v that the archive's database uses", missing)
	}
	var num int
	if err := admin.QueryRow(ctx, "SELECT current_setting('server_version_num')::int").Scan(&num); err != nil {
		return fmt.Errorf("target server version: %w", err)
	}
	if num/10000 < m.Postgres.ServerVersionNum/10000 {
		im.warn("the target server (version %d) is older than the source (%s); the restore may fail", num/10000, m.Postgres.ServerVersion)
	}
	return nil
}

// ensureRoles creates the missing roles (never with LOGIN, SUPERUSER or a
// password, except the login role) and grants the project roles to the
// login role. It returns the names of the roles it created.
func (im *importer) ensureRoles(ctx context.Context, admin *pgx.Conn, m *Manifest) ([]string, error) {
	o := &im.opts
	var created []string
	exists := func(name string) (bool, error) {
		var ok bool
		err := admin.QueryRow(ctx, "SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)", name).Scan(&ok)
		if err != nil {
			return false, fmt.Errorf("look up role %s: %w", name, err)
		}
		return ok, nil
	}
	create := func(name, attrs string) error {
		if _, err := admin.Exec(ctx, "CREATE ROLE "+ident(name)+" "+attrs); err != nil {
			return fmt.Errorf("create role %s: %w", name, err)
		}
		created = append(created, name)
		im.undo.push("drop role "+name, func(ctx context.Context) error {
			return im.exec(ctx, "DROP ROLE IF EXISTS "+ident(name))
		})
		return nil
	}
	ok, err := exists(o.LoginUser)
	if err != nil {
		return nil, err
	}
	if !ok {
		var stmt string
		if err := admin.QueryRow(ctx, "SELECT format('LOGIN NOINHERIT PASSWORD %L', $1::text)", o.LoginPassword).Scan(&stmt); err != nil {
			return nil, fmt.Errorf("login role: %w", err)
		}
		if err := create(o.LoginUser, stmt); err != nil {
			return nil, err
		}
	}
	var newRoles []Role
	for _, r := range m.Roles {
		if r.Name == o.LoginUser {
			continue
		}
		ok, err := exists(r.Name)
		if err != nil {
			return nil, err
		}
		if ok {
			continue
		}
		attrs := "NOLOGIN NOINHERIT"
		if r.Inherit {
			attrs = "NOLOGIN INHERIT"
		}
		if r.BypassRLS {
			attrs += " BYPASSRLS"
		}
		if err := create(r.Name, attrs); err != nil {
			return nil, err
		}
		newRoles = append(newRoles, r)
	}
	// Memberships among the created roles, as they were at export.
	for _, r := range newRoles {
		for _, g := range r.MemberOf {
			if g == o.LoginUser {
				continue
			}
			if err := im.grant(ctx, admin, g, r.Name); err != nil {
				return nil, err
			}
		}
	}
	projRoles, err := projectRoles(m.Project)
	if err != nil {
		return nil, err
	}
	for _, role := range projRoles {
		if err := im.grant(ctx, admin, role, o.LoginUser); err != nil {
			return nil, err
		}
	}
	return created, nil
}

// grant grants role to member unless it is already a member, and undoes
// it on failure.
func (im *importer) grant(ctx context.Context, admin *pgx.Conn, role, member string) error {
	var has bool
	err := admin.QueryRow(ctx, `
SELECT EXISTS (SELECT FROM pg_auth_members a JOIN pg_roles r ON r.oid = a.roleid JOIN pg_roles m ON m.oid = a.member
               WHERE r.rolname = $1 AND m.rolname = $2)`, role, member).Scan(&has)
	if err != nil {
		return fmt.Errorf("look up membership: %w", err)
	}
	if has {
		return nil
	}
	if _, err := admin.Exec(ctx, "GRANT "+ident(role)+" TO "+ident(member)); err != nil {
		return fmt.Errorf("grant %s to %s: %w", role, member, err)
	}
	im.undo.push("revoke "+role+" from "+member, func(ctx context.Context) error {
		return im.exec(ctx, "REVOKE "+ident(role)+" FROM "+ident(member))
	})
	return nil
}

// createDatabase creates the temporary database from template0 with the
// source's encoding and, when the target knows it, its locale.
func (im *importer) createDatabase(ctx context.Context, admin *pgx.Conn, name, owner string, m *Manifest) error {
	base := "CREATE DATABASE " + ident(name) + " OWNER " + ident(owner) + " TEMPLATE template0"
	if m.Postgres.Encoding != "" {
		base += " ENCODING " + quoteLiteral(m.Postgres.Encoding)
	}
	stmt := base
	if m.Postgres.Collate != "" && m.Postgres.Ctype != "" {
		stmt += " LC_COLLATE " + quoteLiteral(m.Postgres.Collate) + " LC_CTYPE " + quoteLiteral(m.Postgres.Ctype)
	}
	_, err := admin.Exec(ctx, stmt)
	if err != nil && stmt != base && isLocaleError(err) {
		im.warn("the target server lacks locale %s/%s; the database uses the server default", m.Postgres.Collate, m.Postgres.Ctype)
		_, err = admin.Exec(ctx, base)
	}
	if err != nil {
		return fmt.Errorf("create database: %w", err)
	}
	im.undo.push("drop database "+name, func(ctx context.Context) error {
		return im.exec(ctx, "DROP DATABASE IF EXISTS "+ident(name)+" WITH (FORCE)")
	})
	return nil
}

func isLocaleError(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && (pe.Code == "22023" || pe.Code == "42809" || pe.Code == "0A000")
}

func databaseExists(ctx context.Context, admin *pgx.Conn, name string) (bool, error) {
	var ok bool
	if err := admin.QueryRow(ctx, "SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)", name).Scan(&ok); err != nil {
		return false, fmt.Errorf("look up database %s: %w", name, err)
	}
	return ok, nil
}

// verifyData recomputes the checksums in the restored database.
func (im *importer) verifyData(ctx context.Context, dbURL string, m *Manifest, exts []Extension) error {
	conn, err := openSnapshotConn(ctx, dbURL, "")
	if err != nil {
		return fmt.Errorf("checksums: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if err := checkExtensions(ctx, conn, exts); err != nil {
		return err
	}
	sums, err := computeChecksums(ctx, conn, dbURL, "", im.opts.Jobs, func(n, total int) {
		im.progress("checksums", int64(n), int64(total))
	})
	if err != nil {
		return err
	}
	want := &Manifest{Tables: m.Tables, LargeObjects: m.LargeObjects}
	got := &Manifest{Tables: sums.tables, LargeObjects: sums.lobs}
	if err := CompareData(want, got); err != nil {
		return fmt.Errorf("%w: %v", ErrDataMismatch, err)
	}
	return nil
}

// placeTree moves a staged tree to dir (renaming it when on the same file
// system, else copying), setting aside what Overwrite replaces.
func (im *importer) placeTree(ctx context.Context, st *stager, dir string) error {
	if err := st.close(); err != nil {
		return err
	}
	parent := filepath.Dir(dir)
	made, err := mkdirAllTracked(parent)
	if err != nil {
		return err
	}
	im.undo.push("remove created dirs", func(context.Context) error {
		for i := len(made) - 1; i >= 0; i-- {
			_ = os.Remove(made[i])
		}
		return nil
	})
	if _, err := os.Lstat(dir); err == nil {
		aside := tempPath(dir, "old")
		if err := os.Rename(dir, aside); err != nil {
			return fmt.Errorf("set aside %s: %w", dir, err)
		}
		im.undo.push("restore "+dir, func(context.Context) error { return os.Rename(aside, dir) })
		im.undo.onCommit(func() { _ = removeTree(aside) })
	}
	if err := os.Chmod(st.dir, 0o750); err != nil {
		return err
	}
	if err := os.Rename(st.dir, dir); err != nil {
		if !errors.Is(err, syscall.EXDEV) {
			return fmt.Errorf("move storage into %s: %w", dir, err)
		}
		// Another file system: copy.
		if err := copyTree(ctx, st.dir, dir); err != nil {
			_ = removeTree(dir)
			return fmt.Errorf("copy storage into %s: %w", dir, err)
		}
	}
	im.undo.push("remove "+dir, func(context.Context) error { return removeTree(dir) })
	return nil
}

// placeSecrets writes the key files into SecretsDir and points p at them.
func (im *importer) placeSecrets(ref string, s Secrets, p *config.Project) error {
	dir := im.opts.SecretsDir
	hmacs := s.HMACSecrets
	if dir == "" {
		if len(hmacs) > 0 {
			p.JWTSecret = string(hmacs[0])
			hmacs = hmacs[1:]
		}
	} else {
		made, err := mkdirAllTracked(dir)
		if err != nil {
			return err
		}
		im.undo.push("remove created dirs", func(context.Context) error {
			for i := len(made) - 1; i >= 0; i-- {
				_ = os.Remove(made[i])
			}
			return nil
		})
		write := func(name string, data []byte) (string, error) {
			path := filepath.Join(dir, name)
			if err := writeFileAtomic(path, data, 0o600); err != nil {
				return "", err
			}
			im.undo.push("remove "+path, func(context.Context) error { return os.Remove(path) })
			return path, nil
		}
		if len(hmacs) > 0 {
			path, err := write(ref+".jwt_secret", append(slices.Clone(hmacs[0]), '\n'))
			if err != nil {
				return err
			}
			p.JWTSecretFile = path
			hmacs = hmacs[1:]
			if len(hmacs) > 0 {
				p.JWTSecret = string(hmacs[0])
				hmacs = hmacs[1:]
			}
		}
		if len(s.JWKS) > 0 {
			path, err := write(ref+".jwks.json", s.JWKS)
			if err != nil {
				return err
			}
			p.JWKSFile = path
		}
	}
	if len(hmacs) > 0 {
		im.warn("%d more HMAC secret(s) in the archive do not fit in the project's settings; they are in ImportResult.Secrets", len(hmacs))
	}
	return nil
}

// renameDatabase gives the restored database its final name, dropping the
// one it replaces (Overwrite).
func (im *importer) renameDatabase(ctx context.Context, admin *pgx.Conn, tmp, final string, replace bool) error {
	if replace {
		aside := tempName(final, "old")
		if err := renameDB(ctx, admin, final, aside); err != nil {
			return err
		}
		im.undo.push("rename database back", func(ctx context.Context) error {
			c, err := im.liveAdmin(ctx)
			if err != nil {
				return err
			}
			return renameDB(ctx, c, aside, final)
		})
		im.undo.onCommit(func() {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
			defer cancel()
			if err := im.exec(cctx, "DROP DATABASE IF EXISTS "+ident(aside)+" WITH (FORCE)"); err != nil {
				im.warn("the replaced database was renamed %s and could not be dropped: %v", aside, err)
			}
		})
	}
	if err := renameDB(ctx, admin, tmp, final); err != nil {
		return err
	}
	// The temporary database's undo entry drops tmp, which no longer
	// exists; dropping final instead is what undoing now means.
	im.undo.push("drop database "+final, func(ctx context.Context) error {
		c, err := im.liveAdmin(ctx)
		if err != nil {
			return err
		}
		return renameDB(ctx, c, final, tmp)
	})
	return nil
}

// renameDB renames a database, disconnecting its sessions (autovacuum
// workers after a big restore, old clients of a replaced project) first.
func renameDB(ctx context.Context, admin *pgx.Conn, from, to string) error {
	var last error
	for attempt := 0; attempt < 50; attempt++ {
		if _, err := admin.Exec(ctx, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", from); err != nil {
			return fmt.Errorf("disconnect %s: %w", from, err)
		}
		_, err := admin.Exec(ctx, "ALTER DATABASE "+ident(from)+" RENAME TO "+ident(to))
		if err == nil {
			return nil
		}
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != "55006" {
			return fmt.Errorf("rename database %s to %s: %w", from, to, err)
		}
		last = err
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return fmt.Errorf("rename database %s to %s: %w", from, to, last)
}

// project builds the project to register: the archive's settings, the
// new ref, database and storage, and no replicas.
func (im *importer) project(ref, database, storageDir string, m *Manifest) (config.Project, error) {
	o := &im.opts
	var p config.Project
	unknown, err := applySettings(&p, m.Project)
	if err != nil {
		return p, err
	}
	if len(unknown) > 0 {
		im.warn("settings unknown to this cascata were not applied: %s", strings.Join(unknown, ", "))
	}
	if raw := string(m.Project.Settings["role_logins"]); raw != "" && raw != "null" && raw != "{}" {
		im.warn("the archive's role_logins were not applied (their URLs reach the old server and carry no password): configure them again")
	}
	p.Ref = ref
	p.DatabaseURL = loginURL(o.OwnerURL, o.LoginUser, o.LoginPassword, database)
	if p.OwnerURL, err = withDatabase(o.OwnerURL, database); err != nil {
		return p, err
	}
	p.ReplicaURLs = nil
	p.StorageDir = storageDir
	if t := im.target; t != nil {
		t.S3.ApplyTo(&p)
		p.S3AccessKeyEnv, p.S3SecretKeyEnv = t.AccessKeyEnv, t.SecretKeyEnv
	}
	return p, nil
}

// loginURL is ownerURL with another user, password and database.
func loginURL(ownerURL, user, password, database string) string {
	u, err := url.Parse(ownerURL)
	if err != nil {
		return ""
	}
	u.User = url.UserPassword(user, password)
	u.Path = "/" + database
	u.RawPath = ""
	return u.String()
}

// tempName returns "<name>_<tag>_<8 hex>" cut to PostgreSQL's 63 bytes.
func tempName(name, tag string) string {
	suffix := "_" + tag + "_" + randomHex(4)
	if len(name)+len(suffix) > 63 {
		name = name[:63-len(suffix)]
	}
	return name + suffix
}

// tempPath returns a hidden sibling path of p.
func tempPath(p, tag string) string {
	return filepath.Join(filepath.Dir(p), "."+filepath.Base(p)+".caf-"+tag+"-"+randomHex(4))
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// undoStack runs compensating actions in reverse order on failure, and
// onCommit actions on success.
type undoStack struct {
	steps     []undoStep
	committed []func()
}

type undoStep struct {
	what string
	fn   func(context.Context) error
}

func (u *undoStack) push(what string, fn func(context.Context) error) {
	u.steps = append(u.steps, undoStep{what, fn})
}

func (u *undoStack) onCommit(fn func()) { u.committed = append(u.committed, fn) }

// commit forgets the undo steps and runs the commit actions.
func (u *undoStack) commit() {
	u.steps = nil
	for _, fn := range u.committed {
		fn()
	}
	u.committed = nil
}

// run undoes everything, last first, and reports what could not be undone.
func (u *undoStack) run(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	var errs []error
	for i := len(u.steps) - 1; i >= 0; i-- {
		if err := u.steps[i].fn(ctx); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", u.steps[i].what, err))
		}
	}
	u.steps = nil
	return errors.Join(errs...)
}
