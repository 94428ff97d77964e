package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"cascata/admin"
	"cascata/internal/archive"
	"cascata/internal/config"
	"cascata/internal/jobs"
)

// planeArchiver runs the archive jobs of the admin plane (CONTRACT section
// 6): an export writes a .caf as the job's result file, an import restores
// an uploaded .caf on [provision] and registers the project in the catalog,
// which puts it in force at once.
//
// [provision] and [state] are read when the admin handler is built: a
// SIGHUP reload does not change where imports go (restart for that).
type planeArchiver struct {
	cat      projectCatalog
	jobs     *jobs.Runner
	log      *slog.Logger
	prov     config.Provision
	stateDir string
	// secretsDir receives an import's key files (see secretsDir).
	secretsDir string
	// allowedHosts is [admin].eject_allowed_hosts: imports to other hosts are refused.
	allowedHosts []string
}

// newArchiver builds the archiver of the plane and removes the uploads and
// export scratch space a previous process left in [state].dir (their jobs
// were marked failed when the job runner opened).
func newArchiver(p *adminPlane) *planeArchiver {
	ar := &planeArchiver{cat: p.cat, jobs: p.jobs, log: p.a.log, prov: p.a.cfg.Provision, stateDir: p.a.cfg.State.Dir,
		allowedHosts: p.a.cfg.Admin.EjectAllowedHosts, secretsDir: secretsDir(p.a.cfg)}
	for _, left := range []struct{ dir, prefix string }{{ar.uploadDir(), "import-"}, {ar.scratchDir(), "caf-export-"}} {
		entries, _ := os.ReadDir(left.dir)
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), left.prefix) {
				if err := os.RemoveAll(filepath.Join(left.dir, e.Name())); err != nil {
					ar.log.Warn("cannot remove a leftover of an archive job", "path", filepath.Join(left.dir, e.Name()), "error", err)
				}
			}
		}
	}
	return ar
}

// uploadDir receives uploaded archives until their import job ends.
func (ar *planeArchiver) uploadDir() string { return filepath.Join(ar.stateDir, "uploads") }

// scratchDir receives pg_dump's output during an export.
func (ar *planeArchiver) scratchDir() string { return filepath.Join(ar.stateDir, "tmp") }

// importScratchDir receives the unpacked archive during an import: on the
// storage root's file system, so the storage files move in by rename.
func (ar *planeArchiver) importScratchDir() string {
	return filepath.Join(ar.prov.StorageRoot, ".cascata-import")
}

// loginPassword is the password of [provision].login_user
// (login_password_env wins when its variable is set).
func (ar *planeArchiver) loginPassword() string {
	if ar.prov.LoginPasswordEnv != "" {
		if v := os.Getenv(ar.prov.LoginPasswordEnv); v != "" {
			return v
		}
	}
	return ar.prov.LoginPassword
}

// StartExport starts an "archive" job writing the project's .caf. The job
// archives the project's version current when it starts.
func (ar *planeArchiver) StartExport(pr config.Project, passphrase string) (jobs.Status, error) {
	if pr.OwnerURL == "" {
		return jobs.Status{}, fmt.Errorf("%w: project %s has no owner_url and [provision].owner_url is not set: pg_dump needs owner rights on its database", admin.ErrConflict, pr.Ref)
	}
	if _, err := archive.SecretsFromProject(&pr); err != nil {
		return jobs.Status{}, fmt.Errorf("%w: cannot read the project's JWT keys: %v", admin.ErrConflict, err)
	}
	pass := []byte(passphrase)
	ref := pr.Ref
	return ar.jobs.Start("archive", ref, func(ctx context.Context, j *jobs.Job) error {
		return ar.runExport(ctx, j, ref, pass)
	})
}

func (ar *planeArchiver) runExport(ctx context.Context, j *jobs.Job, ref string, pass []byte) error {
	e, ok := ar.cat.Project(ref)
	if !ok {
		return fmt.Errorf("project %s was removed", ref)
	}
	secrets, err := archive.SecretsFromProject(&e.Project)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(ar.scratchDir(), 0o700); err != nil {
		return fmt.Errorf("scratch dir: %w", err)
	}
	result := j.ResultFile(ref + ".caf")
	partial := result + ".partial"
	f, err := os.OpenFile(partial, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("create archive file: %w", err)
	}
	defer os.Remove(partial) // fails harmlessly after the rename
	start := time.Now()
	m, err := archive.Export(ctx, archive.ExportOptions{
		Project:    e.Project,
		Secrets:    secrets,
		Passphrase: pass,
		TempDir:    ar.scratchDir(),
	}, f, exportProgress(j))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("write archive file: %w", cerr)
	}
	if err == nil {
		err = os.Rename(partial, result)
	}
	if err != nil {
		return err
	}
	var size int64
	if fi, err := os.Stat(result); err == nil {
		size = fi.Size()
	}
	var rows int64
	for _, t := range m.Tables {
		rows += t.Rows
	}
	j.Logf("wrote %s.caf: %d bytes in %v; %d tables (%d rows), %d large objects, %d storage entries; PostgreSQL %s",
		ref, size, time.Since(start).Round(time.Millisecond), len(m.Tables), rows, m.LargeObjects.Count, len(m.Files), m.Postgres.ServerVersion)
	return nil
}

// StartImport saves the upload under [state].dir/uploads and starts an
// "import" job (of project as, or of no project until the archive names
// it). It refuses at once (409) when [provision] cannot create projects,
// and (400) an empty or oversized body.
func (ar *planeArchiver) StartImport(ctx context.Context, body io.Reader, as, passphrase string) (jobs.Status, error) {
	if ar.prov.OwnerURL == "" {
		return jobs.Status{}, fmt.Errorf("%w: archive import is not configured: set [provision].owner_url (a role that may CREATE DATABASE and CREATE ROLE on the server that will hold imported projects)", admin.ErrConflict)
	}
	loginPassword := ar.loginPassword()
	if loginPassword == "" {
		return jobs.Status{}, fmt.Errorf("%w: archive import is not configured: set [provision].login_password_env (or login_password), the password of %s in the imported project's database_url", admin.ErrConflict, ar.prov.LoginUser)
	}
	if err := targetAllowed(ar.allowedHosts, "[provision].owner_url (the import's target)", ar.prov.OwnerURL); err != nil {
		return jobs.Status{}, err
	}
	if err := os.MkdirAll(ar.uploadDir(), 0o700); err != nil {
		return jobs.Status{}, fmt.Errorf("upload dir: %w", err)
	}
	path, err := ar.saveUpload(ctx, body)
	if err != nil {
		return jobs.Status{}, err
	}
	opts := archive.ImportOptions{
		ArchivePath:   path,
		Passphrase:    []byte(passphrase),
		Ref:           as,
		OwnerURL:      ar.prov.OwnerURL,
		LoginUser:     ar.prov.LoginUser,
		LoginPassword: loginPassword,
		StorageRoot:   ar.prov.StorageRoot,
		SecretsDir:    ar.secretsDir,
		Exists: func(_ context.Context, ref string) (bool, error) {
			_, ok := ar.cat.Project(ref)
			return ok, nil
		},
		TempDir:    ar.importScratchDir(),
		Extensions: ar.prov.Extensions,
		Storage: func(ref string) (*archive.StorageTarget, error) {
			return storageTarget(&config.Config{Provision: ar.prov}, ref)
		},
	}
	st, err := ar.jobs.Start("import", as, func(ctx context.Context, j *jobs.Job) error {
		defer os.Remove(path)
		return ar.runImport(ctx, j, opts)
	})
	if err != nil {
		_ = os.Remove(path)
		return jobs.Status{}, err
	}
	return st, nil
}

// saveUpload copies the request body to a new file of the upload dir and
// returns its path; an empty body is refused.
func (ar *planeArchiver) saveUpload(ctx context.Context, body io.Reader) (_ string, err error) {
	f, err := os.CreateTemp(ar.uploadDir(), "import-*.caf")
	if err != nil {
		return "", fmt.Errorf("save upload: %w", err)
	}
	defer func() {
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("save upload: %w", cerr)
		}
		if err != nil {
			_ = os.Remove(f.Name())
		}
	}()
	n, err := io.Copy(f, ctxReader{ctx, body})
	if err != nil {
		if mbe := (*http.MaxBytesError)(nil); errors.As(err, &mbe) {
			return "", fmt.Errorf("%w: the archive is larger than the admin plane accepts (%d bytes)", admin.ErrBadRequest, mbe.Limit)
		}
		return "", fmt.Errorf("receive upload: %w", err)
	}
	if n == 0 {
		return "", fmt.Errorf("%w: empty body: send the .caf file as the request body", admin.ErrBadRequest)
	}
	return f.Name(), nil
}

// ctxReader stops a copy when ctx ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

func (ar *planeArchiver) runImport(ctx context.Context, j *jobs.Job, opts archive.ImportOptions) error {
	if err := os.MkdirAll(opts.TempDir, 0o700); err != nil {
		return fmt.Errorf("import scratch dir: %w", err)
	}
	start := time.Now()
	res, err := archive.Import(ctx, opts, importProgress(j))
	if err != nil {
		return importError(err, opts.ArchivePath)
	}
	p := res.Project
	for _, w := range res.Warnings {
		j.Logf("warning: %s", w)
	}
	if len(res.CreatedRoles) > 0 {
		j.Logf("created roles: %s", strings.Join(res.CreatedRoles, ", "))
	}
	if _, err := ar.cat.Add(p, "import"); err != nil {
		return fmt.Errorf("project %s was restored (database %s, storage %s) but could not be registered: %w",
			p.Ref, config.RedactURL(p.DatabaseURL), p.StorageDir, err)
	}
	var rows int64
	for _, t := range res.Manifest.Tables {
		rows += t.Rows
	}
	j.Logf("imported project %s in %v: %d tables (%d rows), %d storage entries; database %s, storage %s; serving now",
		p.Ref, time.Since(start).Round(time.Millisecond), len(res.Manifest.Tables), rows, len(res.Manifest.Files),
		config.RedactURL(p.DatabaseURL), p.StorageDir)
	return nil
}

// importError turns an archive.Import error into the job's error: what
// went wrong first, then the details (without the upload's temporary
// name). The sentinel stays in the chain.
func importError(err error, archivePath string) error {
	detail := strings.TrimPrefix(err.Error(), "import "+filepath.Base(archivePath)+": ")
	var what string
	switch {
	case errors.Is(err, archive.ErrWrongPassphrase):
		// The detail adds nothing: say it once.
		return &jobError{msg: "wrong passphrase: the X-Cascata-Passphrase given does not open this archive's secrets; nothing was created", err: err}
	case errors.Is(err, archive.ErrUnsupportedVersion):
		what = fmt.Sprintf("unsupported archive: this cascata reads format version %d only; nothing was created", archive.FormatVersion)
	case errors.Is(err, archive.ErrUnsafeMember):
		what = "unsafe archive refused (a member escapes its folder or is a link or special file); nothing was created"
	case errors.Is(err, archive.ErrCorrupt):
		what = "corrupt or truncated archive refused; nothing was created"
	case errors.Is(err, archive.ErrProjectExists):
		// The admin plane has no overwrite: only the rename applies.
		detail = strings.Replace(detail, " (import with overwrite, or under another ref)", "", 1)
		what = "the project already exists on this instance (import it under another ref with ?as=REF); nothing was created"
	case errors.Is(err, archive.ErrRefused):
		what = "archive refused: it asks for roles or extensions beyond an ordinary project; nothing was created"
	case errors.Is(err, archive.ErrDataMismatch):
		what = "the restored data does not match the archive's checksums; the import was rolled back"
	default:
		what = "import failed; what it created was rolled back"
	}
	return &jobError{msg: what + ": " + detail, err: err}
}

// jobError is a job error with its own text and the original chain.
type jobError struct {
	msg string
	err error
}

func (e *jobError) Error() string { return e.msg }
func (e *jobError) Unwrap() error { return e.err }

// phaseWeight is a phase's share of a job's progress; phases of a higher
// group start only when every phase of lower groups is done (phases of one
// group run together).
type phaseWeight struct {
	group  int
	weight float64
}

var exportPhases = map[string]phaseWeight{
	"prepare":   {0, 2},
	"storage":   {1, 20},
	"dump":      {1, 25},
	"checksums": {1, 10},
	"pack-db":   {2, 40},
	"manifest":  {3, 3},
}

var importPhases = map[string]phaseWeight{
	"unpack":    {0, 40},
	"prepare":   {1, 2},
	"restore":   {2, 40},
	"checksums": {3, 15},
	"commit":    {4, 3},
	"storage":   {5, 10},
}

func exportProgress(j *jobs.Job) archive.ProgressFunc { return phaseProgress(j, exportPhases) }
func importProgress(j *jobs.Job) archive.ProgressFunc { return phaseProgress(j, importPhases) }

// phaseProgress reports archive progress on a job: each phase is named
// once, when it first starts, and the progress is the weighted share of
// the phases done (never going back). Calls never overlap (archive
// serializes them).
func phaseProgress(j *jobs.Job, phases map[string]phaseWeight) archive.ProgressFunc {
	var total float64
	for _, w := range phases {
		total += w.weight
	}
	frac := map[string]float64{}
	seen := map[string]bool{}
	best := 0.0
	return func(phase string, done, n int64) {
		if !seen[phase] {
			seen[phase] = true
			j.SetPhase(phase)
		}
		w, known := phases[phase]
		if !known {
			return
		}
		for name, o := range phases {
			if o.group < w.group {
				frac[name] = 1
			}
		}
		if n > 0 {
			frac[phase] = max(frac[phase], min(float64(done)/float64(n), 1))
		}
		var sum float64
		for name, o := range phases {
			sum += o.weight * frac[name]
		}
		if p := sum / total; p > best {
			best = p
			j.SetProgress(p)
		}
	}
}
