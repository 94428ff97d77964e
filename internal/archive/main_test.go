package archive

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"cascata/internal/config"
	"cascata/internal/pgcluster"
	"cascata/internal/pgtest"
)

// Two clusters stand for two Cascata instances: projects are exported
// from src and imported into dst.
var (
	src *pgcluster.Cluster
	dst *pgcluster.Cluster
	// fixtureDir holds fixtures shared by several tests.
	fixtureDir string
)

func TestMain(m *testing.M) { os.Exit(testMain(m)) }

func testMain(m *testing.M) int {
	var err error
	if fixtureDir, err = os.MkdirTemp("", "caf-fixtures-"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(fixtureDir)
	type started struct {
		c    *pgcluster.Cluster
		stop func(context.Context) error
		err  error
	}
	ch := make(chan started, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		c, stop, err := pgtest.Start(ctx, pgcluster.Options{})
		ch <- started{c, stop, err}
	}()
	received := false
	var second started
	code := pgtest.Main(m, pgcluster.Options{}, &src, func(ctx context.Context, _ *pgcluster.Cluster) error {
		second = <-ch
		received = true
		if second.err != nil {
			return fmt.Errorf("second cluster: %w", second.err)
		}
		dst = second.c
		return nil
	})
	if !received {
		second = <-ch
	}
	if second.stop != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := second.stop(ctx); err != nil {
			fmt.Fprintf(os.Stderr, "stop second cluster: %v\n", err)
			return 1
		}
	}
	return code
}

const testPassphrase = "correct horse battery staple"

// testProject creates a project database on the source cluster with the
// default roles, runs sql in it and returns its config.
func testProject(t testing.TB, ref, sql string) config.Project {
	t.Helper()
	ctx := t.Context()
	// Start afresh, so that -count=N works on the same clusters.
	pgtest.Exec(t, src.Primary.SuperuserURL("postgres"), "DROP DATABASE IF EXISTS "+ident(ref)+" WITH (FORCE)")
	if err := pgcluster.SetupProject(ctx, src.Primary, pgcluster.ProjectSpec{Database: ref, LoginPassword: "src-login-pw"}); err != nil {
		t.Fatal(err)
	}
	if sql != "" {
		pgtest.Exec(t, src.Primary.SuperuserURL(ref), sql)
	}
	return config.Project{
		Ref:         ref,
		DatabaseURL: src.Primary.URL("authenticator", "src-login-pw", ref),
		OwnerURL:    src.Primary.SuperuserURL(ref),
		JWTSecret:   ref + "-jwt-secret-0123456789abcdefghijklmnopqrstuvwxyz",
		Roles:       pgcluster.DefaultRoles(),
		RoleClaim:   "role",
		PoolMode:    config.PoolModeTransaction,
		PoolSize:    20,
		StorageDir:  filepath.Join(t.TempDir(), "storage", ref),
	}
}

// exportTo exports p into a new file and returns its path and manifest,
// with a cheap scrypt (see exportToN).
func exportTo(t testing.TB, p config.Project, comp Compression) (string, *Manifest) {
	t.Helper()
	return exportToN(t, p, comp, minScryptN)
}

// exportToN exports p with scrypt cost n (0: the default).
func exportToN(t testing.TB, p config.Project, comp Compression, n int) (string, *Manifest) {
	t.Helper()
	secrets, err := SecretsFromProject(&p)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), p.Ref+".caf")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	start, last := time.Now(), ""
	var phases []string
	m, err := Export(t.Context(), ExportOptions{Project: p, Secrets: secrets, Passphrase: []byte(testPassphrase), Compression: comp, TempDir: t.TempDir(), scryptN: n}, f,
		func(phase string, done, total int64) {
			if phase != last {
				phases = append(phases, fmt.Sprintf("%s@%.1fs", phase, time.Since(start).Seconds()))
				last = phase
			}
		})
	if testing.Verbose() {
		t.Logf("export %s phases: %v", p.Ref, phases)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatalf("export %s: %v", p.Ref, err)
	}
	return path, m
}

// target is where imports land on the destination instance.
type target struct {
	storageRoot string
	secretsDir  string
	tempDir     string
}

// newTarget returns fresh directories for imports into dst and drops the
// databases named dbs there (left by an earlier run with -count=N).
func newTarget(t testing.TB, dbs ...string) target {
	dir := t.TempDir()
	tg := target{storageRoot: filepath.Join(dir, "storage"), secretsDir: filepath.Join(dir, "secrets"), tempDir: filepath.Join(dir, "tmp")}
	if err := os.Mkdir(tg.tempDir, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, db := range dbs {
		pgtest.Exec(t, dst.Primary.SuperuserURL("postgres"), "DROP DATABASE IF EXISTS "+ident(db)+" WITH (FORCE)")
	}
	return tg
}

func (tg target) options(path string) ImportOptions {
	return ImportOptions{
		ArchivePath:   path,
		Passphrase:    []byte(testPassphrase),
		OwnerURL:      dst.Primary.SuperuserURL("postgres"),
		LoginUser:     "authenticator",
		LoginPassword: "dst-login-pw",
		StorageRoot:   tg.storageRoot,
		SecretsDir:    tg.secretsDir,
		TempDir:       tg.tempDir,
	}
}

// instanceState is what an import may create: databases and roles on the
// target server and entries under the target's directories.
type instanceState struct {
	databases, roles []string
	files            []string
}

func stateOf(t testing.TB, tg target) instanceState {
	t.Helper()
	var s instanceState
	s.databases = strings.Split(pgtest.QueryValue(t, dst.Primary.SuperuserURL("postgres"), "SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_database"), ",")
	s.roles = strings.Split(pgtest.QueryValue(t, dst.Primary.SuperuserURL("postgres"), "SELECT string_agg(rolname, ',' ORDER BY rolname) FROM pg_roles"), ",")
	for _, dir := range []string{tg.storageRoot, tg.secretsDir, tg.tempDir} {
		_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err == nil && p != dir {
				s.files = append(s.files, p)
			}
			return nil
		})
	}
	return s
}

func (s instanceState) equal(o instanceState) bool {
	return slices.Equal(s.databases, o.databases) && slices.Equal(s.roles, o.roles) && slices.Equal(s.files, o.files)
}

// treeSums maps each path below dir to "type mode size sha256".
func treeSums(t testing.TB, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		info, err := d.Info()
		if err != nil {
			return err
		}
		if d.IsDir() {
			out[rel] = fmt.Sprintf("dir %o", info.Mode().Perm())
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		h := sha256.New()
		if _, err := io.Copy(h, f); err != nil {
			return err
		}
		out[rel] = fmt.Sprintf("file %o %d %s", info.Mode().Perm(), info.Size(), hex.EncodeToString(h.Sum(nil)))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// writeFile writes size pseudo-random bytes with mode.
func writeFile(t testing.TB, path string, size int, mode fs.FileMode, rng *rand.ChaCha8) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, size)
	_, _ = rng.Read(b)
	if err := os.WriteFile(path, b, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}
