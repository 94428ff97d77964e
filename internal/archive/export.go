package archive

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"time"

	"cascata/internal/config"
	"cascata/internal/pgtools"
	"cascata/internal/storage"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sync/errgroup"
)

// ProgressFunc receives progress: a phase name and, where known, how much
// of it is done out of a total (bytes or tables; 0, 0 when unknown). Calls
// never overlap. Export phases: "prepare", "storage", "vectors", "dump",
// "checksums", "pack-db", "manifest". Import phases: "unpack", "prepare",
// "restore", "checksums", "commit".
type ProgressFunc func(phase string, done, total int64)

// ExportOptions configures Export.
type ExportOptions struct {
	// Project is the project to archive: its Ref, settings and StorageDir.
	// URLs are recorded without their passwords; secret sources are not
	// recorded (Secrets carries the key material).
	Project config.Project
	// OwnerURL reaches the project's database with owner rights (pg_dump,
	// checksums); "" means Project.OwnerURL.
	OwnerURL string
	// Secrets are the JWT keys to seal into secrets.enc; see SecretsFromProject.
	Secrets Secrets
	// Passphrase seals the secrets and the manifest. Required.
	Passphrase []byte
	// Compression of the archive stream; "" means zstd.
	Compression Compression
	// VectorsDir, when set, is a vector-store snapshot directory archived
	// under vectors/.
	VectorsDir string
	// BinDir holds pg_dump; "" means the newest installed PostgreSQL's, or PATH.
	BinDir string
	// TempDir receives pg_dump's scratch output (as large as the dump);
	// "" means os.TempDir().
	TempDir string
	// Jobs is the number of pg_dump workers and checksum connections; 0 means 2.
	Jobs int

	// scryptN, in tests, lowers the scrypt cost (0 means the default).
	scryptN int
}

var refPattern = regexp.MustCompile(`^[a-z0-9_]{1,63}$`)

// SecretsFromProject resolves a project's JWT key material: its HMAC
// secrets (jwt_secret, jwt_secret_env, jwt_secret_file) and the content of
// its jwks_file. A jwks_url is a setting, not a secret, and is recorded in
// the manifest instead.
func SecretsFromProject(p *config.Project) (Secrets, error) {
	secrets, err := p.JWTSecrets()
	if err != nil {
		return Secrets{}, err
	}
	s := Secrets{HMACSecrets: secrets}
	if p.JWKSFile != "" {
		b, err := os.ReadFile(p.JWKSFile)
		if err != nil {
			return Secrets{}, fmt.Errorf("project %s: read jwks_file: %w", p.Ref, err)
		}
		if !json.Valid(b) {
			return Secrets{}, fmt.Errorf("project %s: jwks_file is not JSON", p.Ref)
		}
		s.JWKS = b
	}
	return s, nil
}

// serialProgress makes a ProgressFunc safe to call from several goroutines.
func serialProgress(p ProgressFunc) ProgressFunc {
	if p == nil {
		return func(string, int64, int64) {}
	}
	var mu sync.Mutex
	return func(phase string, done, total int64) {
		mu.Lock()
		defer mu.Unlock()
		p(phase, done, total)
	}
}

// Export writes the project's archive to w and returns its manifest. The
// database is dumped from one snapshot (pg_dump --snapshot) and the table
// checksums are computed in that same snapshot, so writes running during
// the export are either wholly in the archive or not at all. w receives
// the stream as it is produced; on error the caller should discard what was
// written.
func Export(ctx context.Context, opts ExportOptions, w io.Writer, progress ProgressFunc) (*Manifest, error) {
	progress = serialProgress(progress)
	p := &opts.Project
	if len(opts.Passphrase) == 0 {
		return nil, fmt.Errorf("export: %w", ErrNoPassphrase)
	}
	if !refPattern.MatchString(p.Ref) {
		return nil, fmt.Errorf("export: project ref %q must match [a-z0-9_]{1,63}", p.Ref)
	}
	ownerURL := opts.OwnerURL
	if ownerURL == "" {
		ownerURL = p.OwnerURL
	}
	if ownerURL == "" {
		return nil, fmt.Errorf("export %s: no owner URL (set the project's owner_url or [provision].owner_url)", p.Ref)
	}
	comp, err := ParseCompression(string(opts.Compression))
	if err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	jobs := opts.Jobs
	if jobs <= 0 {
		jobs = 2
	}
	progress("prepare", 0, 0)
	pgDump, err := findTool(ctx, opts.BinDir, "pg_dump")
	if err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	dumpVersion, err := pgtools.Version(ctx, pgDump)
	if err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	var (
		tree         []treeEntry
		storageBytes int64
		store        *storage.S3
		objects      []storage.Object
	)
	if p.StorageURL != "" {
		if store, err = openProjectStore(p); err == nil {
			objects, storageBytes, err = listObjects(ctx, store)
		}
	} else {
		tree, storageBytes, err = walkTree(ctx, p.StorageDir)
	}
	if err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	var vectors []treeEntry
	var vectorBytes int64
	if opts.VectorsDir != "" {
		if vectors, vectorBytes, err = walkTree(ctx, opts.VectorsDir); err != nil {
			return nil, fmt.Errorf("export: vectors: %w", err)
		}
	}
	si, err := newSealInfo()
	if err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	if opts.scryptN != 0 {
		si.N = opts.scryptN
	}
	k, err := deriveKeys(opts.Passphrase, si)
	if err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	sealed, err := seal(k, opts.Secrets)
	if err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}

	settings, err := settingsOf(p)
	if err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	m := &Manifest{
		Format:    FormatName,
		Version:   FormatVersion,
		CreatedAt: time.Now().UTC(),
		Project:   settings,
		Secrets:   si,
	}

	// The snapshot: one REPEATABLE READ transaction whose snapshot pg_dump
	// imports; the checksums run inside it.
	conn, err := connect(ctx, ownerURL)
	if err != nil {
		return nil, fmt.Errorf("export %s: %w", p.Ref, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if err := applyChecksumSettings(ctx, conn); err != nil {
		return nil, fmt.Errorf("export %s: %w", p.Ref, err)
	}
	if m.Postgres, err = collectServer(ctx, conn); err != nil {
		return nil, fmt.Errorf("export %s: %w", p.Ref, err)
	}
	m.Postgres.PgDumpVersion = dumpVersion
	m.Postgres.DumpFormat = "directory"
	if _, err := conn.Exec(ctx, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"); err != nil {
		return nil, fmt.Errorf("export %s: begin: %w", p.Ref, err)
	}
	var snapshot string
	if err := conn.QueryRow(ctx, "SELECT pg_export_snapshot()").Scan(&snapshot); err != nil {
		return nil, fmt.Errorf("export %s: export snapshot: %w", p.Ref, err)
	}
	if m.Roles, err = collectRoles(ctx, conn, p.Roles, urlUser(p.DatabaseURL)); err != nil {
		return nil, fmt.Errorf("export %s: %w", p.Ref, err)
	}
	if m.Extensions, err = collectExtensions(ctx, conn); err != nil {
		return nil, fmt.Errorf("export %s: %w", p.Ref, err)
	}
	if m.Sequences, err = collectSequences(ctx, conn); err != nil {
		return nil, fmt.Errorf("export %s: %w", p.Ref, err)
	}

	scratch, err := os.MkdirTemp(opts.TempDir, "caf-export-")
	if err != nil {
		return nil, fmt.Errorf("export %s: scratch dir: %w", p.Ref, err)
	}
	defer os.RemoveAll(scratch)
	dumpDir := filepath.Join(scratch, "db")

	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g, gctx := errgroup.WithContext(wctx)
	g.Go(func() error {
		target, err := pgtools.ParseTarget(ownerURL, "")
		if err != nil {
			return fmt.Errorf("pg_dump: owner URL: %w", err)
		}
		progress("dump", 0, 0)
		err = pgtools.Run(gctx, target, pgDump, "--format=directory", "--file="+dumpDir,
			"--snapshot="+snapshot, "--jobs="+strconv.Itoa(jobs), "--compress=0", "--blobs",
			"--no-sync", "--no-password")
		if err != nil {
			return fmt.Errorf("pg_dump: %w", err)
		}
		return nil
	})
	var sums dataChecksums
	g.Go(func() error {
		var err error
		sums, err = computeChecksums(gctx, conn, ownerURL, snapshot, jobs, func(n, total int) {
			progress("checksums", int64(n), int64(total))
		})
		return err
	})

	out, err := newArchiveWriter(w, comp)
	if err != nil {
		cancel()
		_ = g.Wait()
		return nil, fmt.Errorf("export %s: %w", p.Ref, err)
	}
	werr := func() error {
		if err := out.writeBytes(memberSecrets, 0o600, m.CreatedAt, sealed, true); err != nil {
			return err
		}
		var err error
		if store != nil {
			m.Files, err = out.writeObjects(gctx, store, objects, storageBytes, progress)
		} else {
			m.Files, err = out.writeTree(gctx, prefixStorage, p.StorageDir, tree, storageBytes, "storage", progress)
		}
		if err != nil {
			return err
		}
		if opts.VectorsDir != "" {
			if m.Vectors, err = out.writeTree(gctx, prefixVectors, opts.VectorsDir, vectors, vectorBytes, "vectors", progress); err != nil {
				return err
			}
		}
		return nil
	}()
	if werr != nil {
		cancel()
	}
	gerr := g.Wait()
	if werr == nil && gerr == nil {
		_, gerr = conn.Exec(ctx, "COMMIT")
	}
	// A failing pg_dump or checksum query cancels the writer and the other
	// way round: report the cause, not the cancellation.
	switch {
	case gerr != nil && (werr == nil || errors.Is(werr, context.Canceled)):
		return nil, fmt.Errorf("export %s: %w", p.Ref, gerr)
	case werr != nil:
		return nil, fmt.Errorf("export %s: %w", p.Ref, werr)
	}
	m.Tables = sums.tables
	m.LargeObjects = sums.lobs

	if err := out.writeDumpDir(ctx, dumpDir, m.CreatedAt, progress); err != nil {
		return nil, fmt.Errorf("export %s: %w", p.Ref, err)
	}
	m.Members = out.members
	manifest, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("export %s: encode manifest: %w", p.Ref, err)
	}
	manifest = append(manifest, '\n')
	sig, err := signManifest(k, manifest)
	if err != nil {
		return nil, fmt.Errorf("export %s: %w", p.Ref, err)
	}
	progress("manifest", 0, 0)
	if err := out.writeBytes(memberManifest, 0o644, m.CreatedAt, manifest, false); err != nil {
		return nil, fmt.Errorf("export %s: %w", p.Ref, err)
	}
	if err := out.writeBytes(memberSig, 0o644, m.CreatedAt, sig, false); err != nil {
		return nil, fmt.Errorf("export %s: %w", p.Ref, err)
	}
	if err := out.close(); err != nil {
		return nil, fmt.Errorf("export %s: %w", p.Ref, err)
	}
	return m, nil
}

// archiveWriter writes tar members through an optional compressor and
// records each member's integrity data.
type archiveWriter struct {
	tw      *tar.Writer
	comp    io.WriteCloser // nil without compression
	members []Member
	buf     []byte
	h       hash.Hash
}

func newArchiveWriter(w io.Writer, c Compression) (*archiveWriter, error) {
	a := &archiveWriter{buf: make([]byte, 1<<20), h: sha256.New()}
	switch c {
	case CompressionGzip:
		gz, err := gzip.NewWriterLevel(w, gzip.BestSpeed)
		if err != nil {
			return nil, fmt.Errorf("gzip: %w", err)
		}
		a.comp = gz
	case CompressionZstd:
		zw, err := zstd.NewWriter(w, zstd.WithEncoderLevel(zstd.SpeedFastest))
		if err != nil {
			return nil, fmt.Errorf("zstd: %w", err)
		}
		a.comp = zw
	}
	if a.comp != nil {
		a.tw = tar.NewWriter(a.comp)
	} else {
		a.tw = tar.NewWriter(w)
	}
	return a, nil
}

// header returns a PAX header with no owner information.
func header(name string, typ byte, mode uint32, size int64, mtime time.Time) *tar.Header {
	return &tar.Header{Typeflag: typ, Name: name, Mode: int64(mode), Size: size, ModTime: mtime.Round(time.Microsecond), Format: tar.FormatPAX}
}

// writeBytes writes a small in-memory member; record adds it to members.
func (a *archiveWriter) writeBytes(name string, mode uint32, mtime time.Time, data []byte, record bool) error {
	if err := a.tw.WriteHeader(header(name, tar.TypeReg, mode, int64(len(data)), mtime)); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if _, err := a.tw.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if record {
		sum := sha256.Sum256(data)
		a.members = append(a.members, Member{Name: name, Type: typeFile, Mode: mode, Size: int64(len(data)), SHA256: hex.EncodeToString(sum[:])})
	}
	return nil
}

// writeFile streams a file of the local disk as a member and returns its
// SHA-256. The file is opened without following a symlink and its size is
// taken from the open file; a file that shrinks while being read is an
// error, one that grows is archived up to the size it had when opened.
func (a *archiveWriter) writeFile(ctx context.Context, name, abs string, mode uint32, mtime time.Time, onBytes func(int64)) (int64, string, error) {
	f, err := os.OpenFile(abs, os.O_RDONLY|noFollow, 0)
	if err != nil {
		return 0, "", fmt.Errorf("open %s: %w", abs, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return 0, "", fmt.Errorf("stat %s: %w", abs, err)
	}
	if !fi.Mode().IsRegular() {
		return 0, "", fmt.Errorf("%s is no longer a regular file", abs)
	}
	size := fi.Size()
	if err := a.tw.WriteHeader(header(name, tar.TypeReg, mode, size, mtime)); err != nil {
		return 0, "", fmt.Errorf("write %s: %w", name, err)
	}
	a.h.Reset()
	var done int64
	for done < size {
		if err := ctx.Err(); err != nil {
			return 0, "", err
		}
		n, err := f.Read(a.buf[:min(int64(len(a.buf)), size-done)])
		if n > 0 {
			a.h.Write(a.buf[:n])
			if _, werr := a.tw.Write(a.buf[:n]); werr != nil {
				return 0, "", fmt.Errorf("write %s: %w", name, werr)
			}
			done += int64(n)
			if onBytes != nil {
				onBytes(int64(n))
			}
		}
		if errors.Is(err, io.EOF) {
			if done < size {
				return 0, "", fmt.Errorf("%s shrank while being archived (%d of %d bytes)", abs, done, size)
			}
			break
		}
		if err != nil {
			return 0, "", fmt.Errorf("read %s: %w", abs, err)
		}
	}
	sum := hex.EncodeToString(a.h.Sum(nil))
	a.members = append(a.members, Member{Name: name, Type: typeFile, Mode: mode, Size: size, SHA256: sum})
	return size, sum, nil
}

// writeTree writes a walked tree under prefix and returns its file list.
func (a *archiveWriter) writeTree(ctx context.Context, prefix, root string, entries []treeEntry, total int64, phase string, progress ProgressFunc) ([]FileEntry, error) {
	var (
		files []FileEntry
		done  int64
	)
	progress(phase, 0, total)
	for _, e := range entries {
		name := prefix + e.rel
		if e.dir {
			if err := a.tw.WriteHeader(header(name+"/", tar.TypeDir, e.mode, 0, e.mtime)); err != nil {
				return nil, fmt.Errorf("write %s: %w", name, err)
			}
			a.members = append(a.members, Member{Name: name + "/", Type: typeDir, Mode: e.mode})
			files = append(files, FileEntry{Path: e.rel, Type: typeDir, Mode: e.mode})
			continue
		}
		size, sum, err := a.writeFile(ctx, name, filepath.Join(root, filepath.FromSlash(e.rel)), e.mode, e.mtime, func(n int64) {
			done += n
		})
		if err != nil {
			return nil, err
		}
		files = append(files, FileEntry{Path: e.rel, Type: typeFile, Mode: e.mode, Size: size, SHA256: sum})
		progress(phase, done, total)
	}
	return files, nil
}

// writeDumpDir writes pg_dump's directory output under db/.
func (a *archiveWriter) writeDumpDir(ctx context.Context, dir string, mtime time.Time, progress ProgressFunc) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("read dump dir: %w", err)
	}
	var total, done int64
	for _, e := range entries {
		if !e.Type().IsRegular() || !dbName.MatchString(e.Name()) {
			return fmt.Errorf("unexpected pg_dump output %q", e.Name())
		}
		if fi, err := e.Info(); err == nil {
			total += fi.Size()
		}
	}
	progress("pack-db", 0, total)
	for _, e := range entries {
		_, _, err := a.writeFile(ctx, prefixDB+e.Name(), filepath.Join(dir, e.Name()), 0o600, mtime, func(n int64) {
			done += n
			if done%(64<<20) < int64(len(a.buf)) {
				progress("pack-db", done, total)
			}
		})
		if err != nil {
			return err
		}
	}
	progress("pack-db", total, total)
	return nil
}

// close ends the tar stream and the compressor.
func (a *archiveWriter) close() error {
	if err := a.tw.Close(); err != nil {
		return fmt.Errorf("close tar: %w", err)
	}
	if a.comp != nil {
		if err := a.comp.Close(); err != nil {
			return fmt.Errorf("close compressor: %w", err)
		}
	}
	return nil
}
