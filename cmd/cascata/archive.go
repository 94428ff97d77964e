package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"cascata/internal/archive"
	"cascata/internal/catalog"
	"cascata/internal/config"
	"cascata/internal/controldb"
	"cascata/internal/storage"
)

const archiveUsage = `usage:
  cascata archive export -config F -project REF -out FILE.caf [-passphrase-env NAME] [-compression zstd|gzip|none]
  cascata archive import -config F FILE.caf [-as REF] [-overwrite] [-passphrase-env NAME]
  cascata archive verify FILE.caf [-passphrase-env NAME] [-config F -project REF]

The passphrase is read from CASCATA_ARCHIVE_PASSPHRASE unless -passphrase-env names another variable.
`

// cmdArchive runs `cascata archive export|import|verify`: the archive of
// CONTRACT section 6, offline, with the same code as the admin plane's jobs.
func cmdArchive(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, archiveUsage)
		return errors.New("missing subcommand")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	switch args[0] {
	case "export":
		return archiveExport(ctx, args[1:], stdout, stderr)
	case "import":
		return archiveImport(ctx, args[1:], stdout, stderr)
	case "verify":
		return archiveVerify(ctx, args[1:], stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, archiveUsage)
		return nil
	}
	fmt.Fprint(stderr, archiveUsage)
	return fmt.Errorf("unknown subcommand %q", args[0])
}

// passphraseFrom reads the passphrase from an environment variable.
func passphraseFrom(env string) ([]byte, error) {
	v := os.Getenv(env)
	if v == "" {
		return nil, fmt.Errorf("%w: environment variable %s is empty", archive.ErrNoPassphrase, env)
	}
	return []byte(v), nil
}

// openCatalog opens the project catalog (cascata.toml at cfgPath plus the
// run-time projects of [state].dir, or the fleet's control database)
// without putting anything in force: a running `cascata serve` picks up a
// registered import when it restarts, or at once in a fleet. It
// fingerprints the file's projects as `serve` does (catalogFileText).
func openCatalog(cfg *config.Config, cfgPath string) (projectCatalog, error) {
	text, err := catalogFileText(cfgPath)
	if err != nil {
		return nil, err
	}
	none := func([]config.Project) error { return nil }
	if cfg.Catalog.URL == "" {
		return catalog.Open(catalog.Options{Dir: cfg.State.Dir, Config: cfg, File: text, Apply: none})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pool, err := controldb.Open(ctx, cfg.Catalog.URL, 2)
	if err != nil {
		return nil, err
	}
	// The pool lives as long as the command: one catalog per process.
	return catalog.OpenShared(ctx, catalog.SharedOptions{Pool: pool, Dir: cfg.State.Dir, Config: cfg, File: text, Apply: none})
}

// catalogProject loads the config at path and returns project ref as the
// catalog has it (cascata.toml or a run-time change).
func catalogProject(path, ref string) (catalog.Entry, error) {
	cfg, err := config.Load(path)
	if err != nil {
		return catalog.Entry{}, err
	}
	cat, err := openCatalog(cfg, path)
	if err != nil {
		return catalog.Entry{}, err
	}
	e, ok := cat.Project(ref)
	if !ok {
		return catalog.Entry{}, fmt.Errorf("no project %q in %s or %s", ref, path, cfg.State.Dir)
	}
	return e, nil
}

// progressPrinter prints each phase when it starts and then at most every
// two seconds, with a byte or table count.
func progressPrinter(w io.Writer) archive.ProgressFunc {
	last, lastDone, lastAt := "", int64(-1), time.Time{}
	return func(phase string, done, total int64) {
		if phase == last && (done == lastDone || (time.Since(lastAt) < 2*time.Second && done != total)) {
			return
		}
		last, lastDone, lastAt = phase, done, time.Now()
		switch {
		case total > 1<<20:
			fmt.Fprintf(w, "%s: %d/%d MiB\n", phase, done>>20, total>>20)
		case total > 0:
			fmt.Fprintf(w, "%s: %d/%d\n", phase, done, total)
		default:
			fmt.Fprintf(w, "%s\n", phase)
		}
	}
}

func archiveExport(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("archive export", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "cascata.toml", "config file")
	ref := fs.String("project", "", "project ref")
	out := fs.String("out", "", "archive file to write (.caf)")
	passEnv := fs.String("passphrase-env", "CASCATA_ARCHIVE_PASSPHRASE", "environment variable holding the passphrase")
	comp := fs.String("compression", "zstd", "zstd, gzip or none")
	jobs := fs.Int("jobs", 2, "pg_dump workers and checksum connections")
	tempDir := fs.String("temp-dir", "", "scratch space for pg_dump's output (default: the system temp dir)")
	vectors := fs.String("vectors-dir", "", "a vector-store snapshot directory to include")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *ref == "" || *out == "" {
		return errors.New("-project and -out are required")
	}
	c, err := archive.ParseCompression(*comp)
	if err != nil {
		return err
	}
	pass, err := passphraseFrom(*passEnv)
	if err != nil {
		return err
	}
	e, err := catalogProject(*path, *ref)
	if err != nil {
		return err
	}
	secrets, err := archive.SecretsFromProject(&e.Project)
	if err != nil {
		return err
	}
	partial := *out + ".partial"
	f, err := os.OpenFile(partial, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer os.Remove(partial) // fails harmlessly after the rename
	start := time.Now()
	m, err := archive.Export(ctx, archive.ExportOptions{
		Project: e.Project, Secrets: secrets, Passphrase: pass, Compression: c,
		Jobs: *jobs, TempDir: *tempDir, VectorsDir: *vectors,
	}, f, progressPrinter(stderr))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(partial, *out)
	}
	if err != nil {
		return err
	}
	fi, err := os.Stat(*out)
	if err != nil {
		return err
	}
	var rows int64
	for _, t := range m.Tables {
		rows += t.Rows
	}
	fmt.Fprintf(stdout, "wrote %s: %d bytes in %v; %d tables (%d rows), %d large objects, %d storage entries\n",
		*out, fi.Size(), time.Since(start).Round(time.Millisecond), len(m.Tables), rows, m.LargeObjects.Count, len(m.Files))
	return nil
}

// splitPositional parses flags that may come before or after one
// positional argument (`import FILE -as REF` as well as `import -as REF FILE`).
func splitPositional(fs *flag.FlagSet, args []string) (string, error) {
	if err := fs.Parse(args); err != nil {
		return "", err
	}
	rest := fs.Args()
	if len(rest) == 0 {
		return "", errors.New("missing archive file")
	}
	file := rest[0]
	if err := fs.Parse(rest[1:]); err != nil {
		return "", err
	}
	if fs.NArg() > 0 {
		return "", fmt.Errorf("unexpected arguments %v", fs.Args())
	}
	return file, nil
}

func archiveImport(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("archive import", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "cascata.toml", "config file")
	as := fs.String("as", "", "import under this ref instead of the archive's")
	overwrite := fs.Bool("overwrite", false, "replace an existing project of that ref (its database and storage)")
	passEnv := fs.String("passphrase-env", "CASCATA_ARCHIVE_PASSPHRASE", "environment variable holding the passphrase")
	jobs := fs.Int("jobs", 2, "pg_restore workers and checksum connections")
	tempDir := fs.String("temp-dir", "", "scratch space for the unpacked archive (default: the system temp dir)")
	vectors := fs.String("vectors-dir", "", "where to restore a vector-store snapshot, if the archive has one")
	file, err := splitPositional(fs, args)
	if err != nil {
		return err
	}
	pass, err := passphraseFrom(*passEnv)
	if err != nil {
		return err
	}
	cfg, err := config.Load(*path)
	if err != nil {
		return err
	}
	pv := cfg.Provision
	if pv.OwnerURL == "" {
		return errors.New("[provision].owner_url is required to create the project's database")
	}
	if err := targetAllowed(cfg.Admin.EjectAllowedHosts, "[provision].owner_url (the import's target)", pv.OwnerURL); err != nil {
		return err
	}
	loginPassword := pv.LoginPassword
	if pv.LoginPasswordEnv != "" && os.Getenv(pv.LoginPasswordEnv) != "" {
		loginPassword = os.Getenv(pv.LoginPasswordEnv)
	}
	cat, err := openCatalog(cfg, *path)
	if err != nil {
		return err
	}
	start := time.Now()
	res, err := archive.Import(ctx, archive.ImportOptions{
		ArchivePath:   file,
		Passphrase:    pass,
		Ref:           *as,
		OwnerURL:      pv.OwnerURL,
		LoginUser:     pv.LoginUser,
		LoginPassword: loginPassword,
		StorageRoot:   pv.StorageRoot,
		VectorsDir:    *vectors,
		SecretsDir:    secretsDir(cfg),
		Overwrite:     *overwrite,
		Exists: func(_ context.Context, ref string) (bool, error) {
			_, ok := cat.Project(ref)
			return ok, nil
		},
		TempDir:    *tempDir,
		Jobs:       *jobs,
		Extensions: pv.Extensions,
		Storage:    func(ref string) (*archive.StorageTarget, error) { return storageTarget(cfg, ref) },
	}, progressPrinter(stderr))
	if err != nil {
		return err
	}
	p := res.Project
	if _, ok := cat.Project(p.Ref); ok {
		_, err = cat.Change(p.Ref, "import", func(cur *config.Project) error { *cur = p; return nil })
	} else {
		_, err = cat.Add(p, "import")
	}
	if err != nil {
		return fmt.Errorf("the project was restored but could not be registered (database %s, storage %s): %w",
			config.RedactURL(p.DatabaseURL), p.StorageDir, err)
	}
	for _, w := range res.Warnings {
		fmt.Fprintf(stderr, "warning: %s\n", w)
	}
	fmt.Fprintf(stdout, "imported project %s in %v: database %s, storage %s; registered in %s (a running cascata serve picks it up on restart)\n",
		p.Ref, time.Since(start).Round(time.Millisecond), config.RedactURL(p.DatabaseURL), p.StorageDir+p.StorageURL, cfg.State.Dir)
	if len(res.CreatedRoles) > 0 {
		fmt.Fprintf(stdout, "created roles: %s\n", strings.Join(res.CreatedRoles, ", "))
	}
	return nil
}

func archiveVerify(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("archive verify", flag.ContinueOnError)
	fs.SetOutput(stderr)
	passEnv := fs.String("passphrase-env", "CASCATA_ARCHIVE_PASSPHRASE", "environment variable holding the passphrase")
	path := fs.String("config", "", "with -project: also compare the project's storage with the archive")
	ref := fs.String("project", "", "the project whose storage (storage_url objects or storage_dir files) is compared")
	file, err := splitPositional(fs, args)
	if err != nil {
		return err
	}
	pass, err := passphraseFrom(*passEnv)
	if err != nil {
		return err
	}
	m, err := archive.Verify(ctx, file, pass)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s: intact; format %d, project %s, PostgreSQL %s, created %s, %d members, %d tables\n",
		file, m.Version, m.Project.Ref, m.Postgres.ServerVersion, m.CreatedAt.Format(time.RFC3339), len(m.Members)+2, len(m.Tables))
	if *ref == "" {
		return nil
	}
	if *path == "" {
		*path = "cascata.toml"
	}
	e, err := catalogProject(*path, *ref)
	if err != nil {
		return err
	}
	diffs, err := archive.VerifyStorage(ctx, m, &e.Project)
	if err != nil {
		return err
	}
	where := e.Project.StorageDir + e.Project.StorageURL
	for _, d := range diffs {
		fmt.Fprintf(stdout, "%s: %s\n", where, d)
	}
	if len(diffs) > 0 {
		return fmt.Errorf("the storage of project %s differs from the archive in %d objects or files", *ref, len(diffs))
	}
	fmt.Fprintf(stdout, "%s: every one of the %d files matches the archive\n", where, len(m.Files))
	return nil
}

// storageTarget is where an import of ref puts the storage files when not
// in [provision].storage_root: the storage_url of a project cascata.toml
// declares under that ref, else <[provision].storage_url>/<ref>; nil for a
// local directory.
func storageTarget(cfg *config.Config, ref string) (*archive.StorageTarget, error) {
	src := cfg.ProjectByRef(ref)
	join := ""
	if src == nil || src.StorageURL == "" {
		pv := cfg.Provision
		if pv.StorageURL == "" {
			return nil, nil
		}
		src = &config.Project{Ref: ref, StorageURL: pv.StorageURL, S3Endpoint: pv.S3Endpoint, S3Region: pv.S3Region,
			S3AccessKeyEnv: pv.S3AccessKeyEnv, S3SecretKeyEnv: pv.S3SecretKeyEnv}
		join = ref
	}
	s3, err := storage.FromProject(src)
	if err != nil {
		return nil, err
	}
	if join != "" {
		s3 = s3.Join(join)
	}
	return &archive.StorageTarget{S3: s3, AccessKeyEnv: src.S3AccessKeyEnv, SecretKeyEnv: src.S3SecretKeyEnv}, nil
}

// secretsDir is where an import writes its key files: [state].dir/secrets,
// or nowhere in a fleet, where the secret goes into the shared catalog (a
// file would exist on one instance only; a JWKS cannot be imported there).
func secretsDir(cfg *config.Config) string {
	if cfg.Catalog.URL != "" {
		return ""
	}
	return filepath.Join(cfg.State.Dir, "secrets")
}
