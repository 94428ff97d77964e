package archive

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"cascata/internal/config"
	"cascata/internal/pgtest"

	"github.com/klauspost/compress/zstd"
)

const tinySQL = `
CREATE TABLE public.notes (id serial PRIMARY KEY, body text NOT NULL, owner text);
ALTER TABLE public.notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY mine ON public.notes TO authenticated USING (owner = current_setting('request.jwt.claims', true)::json->>'sub');
GRANT SELECT ON public.notes TO authenticated;
INSERT INTO public.notes (body, owner) SELECT 'note ' || g, CASE WHEN g % 2 = 0 THEN 'alice' ELSE 'bob' END FROM generate_series(1, 100) g;
SELECT lo_from_bytea(4242, '\xdeadbeef');
`

var (
	tinyOnce    sync.Once
	tinyProject config.Project
	tinyPlain   []byte // uncompressed archive
	tinyZstd    []byte
	tinyGzip    []byte
	tinyErr     error
)

// tiny returns a small project and its archive (exported once).
func tiny(t *testing.T) (config.Project, []byte, []byte) {
	t.Helper()
	tinyOnce.Do(func() {
		st := &onceT{TB: t}
		p := testProject(st, "tiny", tinySQL)
		rng := rand.NewChaCha8([32]byte{1})
		writeFile(t, filepath.Join(p.StorageDir, "a.txt"), 100, 0o644, rng)
		writeFile(t, filepath.Join(p.StorageDir, "empty"), 0, 0o600, rng)
		writeFile(t, filepath.Join(p.StorageDir, "dir", "sub", "b.bin"), 5000, 0o640, rng)
		path, _ := exportTo(t, p, CompressionNone)
		zpath, _ := exportTo(t, p, CompressionZstd)
		gpath, _ := exportTo(t, p, CompressionGzip)
		tinyProject = p
		if tinyPlain, tinyErr = os.ReadFile(path); tinyErr == nil {
			tinyZstd, tinyErr = os.ReadFile(zpath)
		}
		if tinyErr == nil {
			tinyGzip, tinyErr = os.ReadFile(gpath)
		}
	})
	if tinyErr != nil {
		t.Fatal(tinyErr)
	}
	return tinyProject, tinyPlain, tinyZstd
}

// onceT keeps a fixture's temporary directories alive past the first test
// that uses it.
type onceT struct{ testing.TB }

func (o *onceT) TempDir() string {
	dir, err := os.MkdirTemp(fixtureDir, "")
	if err != nil {
		o.Fatal(err)
	}
	return dir
}

// member is one tar member of an archive rewritten by a test.
type member struct {
	hdr  tar.Header
	data []byte
	off  int64 // offset of the data in the original stream
}

func readMembers(t *testing.T, archive []byte) []member {
	t.Helper()
	cr := &offsetReader{r: bytes.NewReader(archive)}
	tr := tar.NewReader(cr)
	var out []member
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		off := cr.n
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, member{hdr: *hdr, data: data, off: off})
	}
}

type offsetReader struct {
	r io.Reader
	n int64
}

func (o *offsetReader) Read(p []byte) (int, error) {
	n, err := o.r.Read(p)
	o.n += int64(n)
	return n, err
}

func writeMembers(t *testing.T, ms []member) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, m := range ms {
		h := m.hdr
		h.Size = int64(len(m.data))
		if h.Typeflag != tar.TypeReg {
			h.Size = 0
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(m.data); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// rewrite applies fn to the members of archive.
func rewrite(t *testing.T, archive []byte, fn func([]member) []member) []byte {
	t.Helper()
	return writeMembers(t, fn(readMembers(t, archive)))
}

// withManifest edits manifest.json and fixes the SHA-256 in manifest.sig
// (but cannot fix its HMAC without the key).
func withManifest(t *testing.T, archive []byte, edit func(map[string]any)) []byte {
	t.Helper()
	return rewrite(t, archive, func(ms []member) []member {
		var raw []byte
		for i := range ms {
			if ms[i].hdr.Name == memberManifest {
				var m map[string]any
				if err := json.Unmarshal(ms[i].data, &m); err != nil {
					t.Fatal(err)
				}
				edit(m)
				b, err := json.Marshal(m)
				if err != nil {
					t.Fatal(err)
				}
				ms[i].data, raw = b, b
			}
		}
		for i := range ms {
			if ms[i].hdr.Name == memberSig {
				var sig sigFile
				if err := json.Unmarshal(ms[i].data, &sig); err != nil {
					t.Fatal(err)
				}
				fresh, _ := signManifest(keys{mac: []byte("not the key")}, raw)
				var f sigFile
				_ = json.Unmarshal(fresh, &f)
				sig.ManifestSHA256 = f.ManifestSHA256
				ms[i].data, _ = json.Marshal(sig)
			}
		}
		return ms
	})
}

func insertBefore(ms []member, name string, add member) []member {
	for i := range ms {
		if ms[i].hdr.Name == name {
			return append(ms[:i:i], append([]member{add}, ms[i:]...)...)
		}
	}
	return append(ms, add)
}

func without(ms []member, name string) []member {
	var out []member
	for _, m := range ms {
		if m.hdr.Name != name {
			out = append(out, m)
		}
	}
	return out
}

func reg(name, body string) member {
	return member{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Format: tar.FormatPAX}, data: []byte(body)}
}

// refused imports archive into dst and checks it is refused with an error
// wrapping want and mentioning hint, and that nothing was created.
func refused(t *testing.T, tg target, archive []byte, passphrase string, want error, hint string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "bad.caf")
	if err := os.WriteFile(path, archive, 0o600); err != nil {
		t.Fatal(err)
	}
	before := stateOf(t, tg)
	opts := tg.options(path)
	opts.Passphrase = []byte(passphrase)
	_, err := Import(t.Context(), opts, nil)
	if err == nil {
		t.Fatalf("import succeeded, want %v", want)
	}
	if !errors.Is(err, want) || !strings.Contains(err.Error(), hint) {
		t.Errorf("import error = %v\nwant one wrapping %v and mentioning %q", err, want, hint)
	}
	if _, verr := Verify(t.Context(), path, []byte(passphrase)); !errors.Is(verr, want) {
		t.Errorf("verify error = %v, want %v", verr, want)
	}
	after := stateOf(t, tg)
	if !before.equal(after) {
		t.Errorf("a refused import changed the instance:\nbefore %+v\nafter  %+v", before, after)
	}
	t.Logf("refused: %v", err)
}

func TestBadArchives(t *testing.T) {
	_, plain, zst := tiny(t)
	tg := newTarget(t)
	members := readMembers(t, plain)

	t.Run("intact", func(t *testing.T) {
		for name, a := range map[string][]byte{"plain": plain, "zstd": zst, "gzip": tinyGzip} {
			path := filepath.Join(t.TempDir(), name+".caf")
			if err := os.WriteFile(path, a, 0o600); err != nil {
				t.Fatal(err)
			}
			if _, err := Verify(t.Context(), path, []byte(testPassphrase)); err != nil {
				t.Errorf("%s: %v", name, err)
			}
		}
	})
	t.Run("truncated", func(t *testing.T) {
		for _, n := range []int{0, 100, 511, 513, len(plain) / 3, len(plain) / 2, len(plain) - 1500} {
			t.Run(fmt.Sprint(n), func(t *testing.T) {
				hint := "truncated"
				if n == 0 {
					hint = "manifest.json"
				}
				refused(t, tg, plain[:n], testPassphrase, ErrCorrupt, hint)
			})
		}
		refused(t, tg, zst[:len(zst)-10], testPassphrase, ErrCorrupt, "")
		refused(t, tg, tinyGzip[:len(tinyGzip)-10], testPassphrase, ErrCorrupt, "")
		refused(t, tg, zst[:len(zst)/2], testPassphrase, ErrCorrupt, "")
	})
	t.Run("flipped byte", func(t *testing.T) {
		for _, m := range members {
			if len(m.data) == 0 {
				continue
			}
			t.Run(m.hdr.Name, func(t *testing.T) {
				bad := bytes.Clone(plain)
				bad[m.off+int64(len(m.data))/2] ^= 0x01
				refused(t, tg, bad, testPassphrase, ErrCorrupt, "")
			})
		}
		t.Run("tar header", func(t *testing.T) {
			bad := bytes.Clone(plain)
			bad[members[1].off-512+100] ^= 0x01 // the mode field of a header
			refused(t, tg, bad, testPassphrase, ErrCorrupt, "")
		})
		t.Run("zstd stream", func(t *testing.T) {
			bad := bytes.Clone(zst)
			bad[len(bad)/2] ^= 0x40
			refused(t, tg, bad, testPassphrase, ErrCorrupt, "")
		})
	})
	t.Run("missing member", func(t *testing.T) {
		for _, name := range []string{"db/toc.dat", "storage/empty", "storage/dir/", "secrets.enc", memberManifest, memberSig} {
			t.Run(name, func(t *testing.T) {
				refused(t, tg, rewrite(t, plain, func(ms []member) []member { return without(ms, name) }), testPassphrase, ErrCorrupt, "")
			})
		}
	})
	t.Run("extra member", func(t *testing.T) {
		for _, m := range []member{reg("storage/extra.txt", "surprise"), reg("db/9999.dat", "x"), reg("notes.txt", "x")} {
			t.Run(m.hdr.Name, func(t *testing.T) {
				bad := rewrite(t, plain, func(ms []member) []member { return insertBefore(ms, memberManifest, m) })
				refused(t, tg, bad, testPassphrase, ErrCorrupt, m.hdr.Name)
			})
		}
		t.Run("after the end", func(t *testing.T) {
			refused(t, tg, append(bytes.Clone(plain), writeMembers(t, []member{reg("storage/late.txt", "late")})...), testPassphrase, ErrCorrupt, "follows the end")
		})
		t.Run("after manifest.sig", func(t *testing.T) {
			bad := rewrite(t, plain, func(ms []member) []member { return append(ms, reg("storage/late.txt", "late")) })
			refused(t, tg, bad, testPassphrase, ErrCorrupt, "manifest.sig")
		})
		t.Run("after zstd stream", func(t *testing.T) {
			refused(t, tg, append(bytes.Clone(zst), "garbage"...), testPassphrase, ErrCorrupt, "")
		})
		t.Run("after gzip stream", func(t *testing.T) {
			refused(t, tg, append(bytes.Clone(tinyGzip), "garbage"...), testPassphrase, ErrCorrupt, "follows the end of the compressed stream")
		})
	})
	t.Run("unknown version", func(t *testing.T) {
		bad := withManifest(t, plain, func(m map[string]any) { m["version"] = 2 })
		refused(t, tg, bad, testPassphrase, ErrUnsupportedVersion, "version 2")
	})
	t.Run("altered manifest", func(t *testing.T) {
		bad := withManifest(t, plain, func(m map[string]any) {
			tables := m["tables"].([]any)
			tables[0].(map[string]any)["rows"] = 99
		})
		refused(t, tg, bad, testPassphrase, ErrCorrupt, "HMAC")
	})
	t.Run("unsafe member", func(t *testing.T) {
		cases := []struct {
			name string
			m    member
			hint string
		}{
			{"dotdot", reg("storage/../../evil.txt", "x"), "path element"},
			{"leading dotdot", reg("../evil.txt", "x"), "path element"},
			{"absolute", reg("/tmp/evil.txt", "x"), "absolute"},
			{"symlink", member{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "storage/link", Linkname: "/etc/passwd", Mode: 0o777}}, "link"},
			{"hardlink", member{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "storage/hard", Linkname: "storage/a.txt", Mode: 0o644}}, "link"},
			{"char device", member{hdr: tar.Header{Typeflag: tar.TypeChar, Name: "storage/null", Devmajor: 1, Devminor: 3, Mode: 0o666}}, "device"},
			{"fifo", member{hdr: tar.Header{Typeflag: tar.TypeFifo, Name: "storage/fifo", Mode: 0o666}}, "pipe"},
			{"setuid", member{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "storage/suid", Mode: 0o4755}, data: []byte("x")}, "setuid"},
			{"db subdir", reg("db/../../x", "x"), "path element"},
		}
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				bad := rewrite(t, plain, func(ms []member) []member { return insertBefore(ms, "storage/a.txt", c.m) })
				refused(t, tg, bad, testPassphrase, ErrUnsafeMember, c.hint)
			})
		}
	})
	t.Run("wrong passphrase", func(t *testing.T) {
		refused(t, tg, plain, "Correct horse battery staple", ErrWrongPassphrase, "passphrase")
		refused(t, tg, zst, "", ErrNoPassphrase, "passphrase")
	})
	t.Run("not an archive", func(t *testing.T) {
		refused(t, tg, bytes.Repeat([]byte("not a tar file "), 100), testPassphrase, ErrCorrupt, "")
		var z bytes.Buffer
		zw, _ := zstd.NewWriter(&z)
		_, _ = zw.Write([]byte("compressed, but not a tar"))
		_ = zw.Close()
		refused(t, tg, z.Bytes(), testPassphrase, ErrCorrupt, "")
	})
}

// TestImportFailuresRollBack: failures after the import started creating
// things leave nothing behind.
func TestImportFailuresRollBack(t *testing.T) {
	ctx := t.Context()
	tg := newTarget(t)

	t.Run("pg_restore error", func(t *testing.T) {
		// The check constraint holds on the source only: restoring the
		// rows fails, after roles and the database were created.
		p := testProject(t, "broken", `
DROP ROLE IF EXISTS broken_owner;
CREATE ROLE broken_owner NOLOGIN;
CREATE TABLE t (id int PRIMARY KEY, CHECK (current_database() = 'broken'));
ALTER TABLE t OWNER TO broken_owner;
INSERT INTO t VALUES (1), (2);`)
		path, _ := exportTo(t, p, CompressionZstd)
		before := stateOf(t, tg)
		_, err := Import(ctx, tg.options(path), nil)
		if err == nil || !strings.Contains(err.Error(), "pg_restore") {
			t.Fatalf("import error = %v, want a pg_restore failure", err)
		}
		t.Logf("refused: %v", err)
		if after := stateOf(t, tg); !before.equal(after) {
			t.Errorf("a failed import left things behind:\nbefore %+v\nafter  %+v", before, after)
		}
	})
	t.Run("checksum mismatch", func(t *testing.T) {
		_, plain, _ := tiny(t)
		path := filepath.Join(t.TempDir(), "tiny.caf")
		if err := os.WriteFile(path, plain, 0o600); err != nil {
			t.Fatal(err)
		}
		before := stateOf(t, tg)
		opts := tg.options(path)
		opts.afterRestore = func(ctx context.Context, dbURL string) error {
			pgtest.Exec(t, dbURL, "UPDATE public.notes SET body = 'tampered' WHERE id = 7")
			return nil
		}
		_, err := Import(ctx, opts, nil)
		if !errors.Is(err, ErrDataMismatch) || !strings.Contains(err.Error(), "public.notes") {
			t.Fatalf("import error = %v, want ErrDataMismatch naming public.notes", err)
		}
		t.Logf("refused: %v", err)
		if after := stateOf(t, tg); !before.equal(after) {
			t.Errorf("a failed import left things behind:\nbefore %+v\nafter  %+v", before, after)
		}
	})
}

func TestImportExistingAndRename(t *testing.T) {
	ctx := t.Context()
	p, plain, _ := tiny(t)
	tg := newTarget(t, "tiny_a")
	path := filepath.Join(t.TempDir(), "tiny.caf")
	if err := os.WriteFile(path, plain, 0o600); err != nil {
		t.Fatal(err)
	}
	registered := map[string]bool{}
	opts := tg.options(path)
	opts.Exists = func(_ context.Context, ref string) (bool, error) { return registered[ref], nil }
	opts.Ref = "tiny_a"
	res, err := Import(ctx, opts, nil)
	if err != nil {
		t.Fatal(err)
	}
	registered[res.Project.Ref] = true
	if res.Project.Ref != "tiny_a" || !strings.HasSuffix(res.Project.OwnerURL, "/tiny_a?sslmode=disable") {
		t.Errorf("imported as %q at %s, want tiny_a", res.Project.Ref, res.Project.OwnerURL)
	}
	notes := "SELECT count(*) || ':' || md5(string_agg(body, ',' ORDER BY id)) FROM public.notes"
	want := pgtest.QueryValue(t, p.OwnerURL, notes)
	if got := pgtest.QueryValue(t, res.Project.OwnerURL, notes); got != want {
		t.Errorf("imported notes %q, want %q", got, want)
	}

	// Registered: refused, nothing changes.
	before := stateOf(t, tg)
	if _, err := Import(ctx, opts, nil); !errors.Is(err, ErrProjectExists) {
		t.Errorf("second import: %v, want ErrProjectExists", err)
	}
	// Not registered, but its database exists: refused too.
	registered["tiny_a"] = false
	other := opts
	other.StorageDir = filepath.Join(tg.storageRoot, "elsewhere")
	other.SecretsDir = filepath.Join(tg.secretsDir, "elsewhere")
	if _, err := Import(ctx, other, nil); !errors.Is(err, ErrProjectExists) || !strings.Contains(err.Error(), "database") {
		t.Errorf("import over an existing database: %v, want ErrProjectExists naming the database", err)
	}
	if after := stateOf(t, tg); !before.equal(after) {
		t.Errorf("refused imports changed the instance:\nbefore %+v\nafter  %+v", before, after)
	}

	// With Overwrite, the project is replaced, clients of the old database
	// notwithstanding.
	pgtest.Exec(t, res.Project.OwnerURL, "DELETE FROM public.notes WHERE id > 10")
	if err := os.WriteFile(filepath.Join(res.Project.StorageDir, "stale.txt"), []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	old := pgtest.Connect(t, res.Project.OwnerURL)
	opts.Overwrite = true
	res2, err := Import(ctx, opts, nil)
	if err != nil {
		t.Fatalf("overwrite: %v", err)
	}
	_ = old
	if got := pgtest.QueryValue(t, res2.Project.OwnerURL, notes); got != want {
		t.Errorf("after overwrite notes %q, want %q", got, want)
	}
	if _, err := os.Stat(filepath.Join(res2.Project.StorageDir, "stale.txt")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("overwrite kept a stale storage file: %v", err)
	}
	dbs := pgtest.QueryValue(t, dst.Primary.SuperuserURL("postgres"), "SELECT string_agg(datname, ',') FROM pg_database WHERE datname LIKE 'tiny_a%'")
	if dbs != "tiny_a" {
		t.Errorf("databases after overwrite: %s, want tiny_a only", dbs)
	}
	entries, _ := os.ReadDir(tg.storageRoot)
	if len(entries) != 1 {
		t.Errorf("storage root after overwrite holds %d entries, want 1", len(entries))
	}
}

func TestExportRefusals(t *testing.T) {
	p, _, _ := tiny(t)
	var buf bytes.Buffer
	if _, err := Export(t.Context(), ExportOptions{Project: p}, &buf, nil); !errors.Is(err, ErrNoPassphrase) {
		t.Errorf("export without passphrase: %v, want ErrNoPassphrase", err)
	}
	if buf.Len() != 0 {
		t.Errorf("export without passphrase wrote %d bytes", buf.Len())
	}
	q := p
	q.StorageDir = t.TempDir()
	if err := os.Symlink("/etc/passwd", filepath.Join(q.StorageDir, "link")); err != nil {
		t.Fatal(err)
	}
	_, err := Export(t.Context(), ExportOptions{Project: q, Passphrase: []byte("x")}, &buf, nil)
	if err == nil || !strings.Contains(err.Error(), "symbolic link") {
		t.Errorf("export of a storage dir with a symlink: %v, want a refusal naming it", err)
	}

	// Cancelled while pg_dump runs: the context's error, nothing left running.
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	_, err = Export(ctx, ExportOptions{Project: p, Passphrase: []byte("x"), scryptN: minScryptN}, io.Discard, func(phase string, _, _ int64) {
		if phase == "dump" {
			cancel()
		}
	})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled export: %v, want context.Canceled", err)
	}
	busy := "SELECT count(*) FROM pg_stat_activity WHERE datname = 'tiny'"
	deadline := time.Now().Add(10 * time.Second)
	for pgtest.QueryValue(t, src.Primary.SuperuserURL("postgres"), busy) != "0" {
		if time.Now().After(deadline) {
			t.Errorf("sessions still open on the source 10s after a cancelled export")
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
}
