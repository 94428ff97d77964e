package archive

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"os"
	"testing"
	"time"
)

// tarOf is a tar stream of members (name, then body) of type typ; a member
// that is not a regular file has no body and links to /etc/passwd.
func tarOf(tb testing.TB, typ byte, members ...string) []byte {
	tb.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for i := 0; i+1 < len(members); i += 2 {
		h := &tar.Header{Name: members[i], Typeflag: typ, Mode: 0o600, Size: int64(len(members[i+1]))}
		if typ != tar.TypeReg {
			h.Size, h.Linkname = 0, "/etc/passwd"
		}
		if err := tw.WriteHeader(h); err != nil {
			tb.Fatal(err)
		}
		if typ == tar.TypeReg {
			if _, err := tw.Write([]byte(members[i+1])); err != nil {
				tb.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

func gzipOf(tb testing.TB, b []byte) []byte {
	tb.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := zw.Write(b); err != nil {
		tb.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

// An archive is untrusted input (POST /v1/archives/import takes an upload):
// whatever its bytes, verifying it ends, without a panic, either with its
// manifest or with an error that wraps one of the package's archive errors.
func FuzzVerifyReader(f *testing.F) {
	// Real archives of a small project, in each compression.
	p := testProject(f, "fuzz_src", tinySQL)
	for _, c := range []Compression{CompressionNone, CompressionGzip, CompressionZstd} {
		path, _ := exportTo(f, p, c)
		data, err := os.ReadFile(path)
		if err != nil {
			f.Fatal(err)
		}
		// The seeds reach the end of the checks: mutations of them start deep.
		if _, err := VerifyReader(f.Context(), bytes.NewReader(data), []byte(testPassphrase)); err != nil {
			f.Fatalf("the %s seed does not verify: %v", c, err)
		}
		f.Add(data)
	}
	manifest := `{"format":"cascata-archive","version":1,"members":[]}`
	f.Add([]byte{})
	f.Add([]byte("not an archive"))
	f.Add(magicGzip)
	f.Add(magicZstd)
	f.Add(tarOf(f, tar.TypeReg, memberManifest, manifest))
	f.Add(tarOf(f, tar.TypeReg, memberManifest, manifest, memberSig, "{}", memberSecrets, "x"))
	f.Add(tarOf(f, tar.TypeReg, "../escape", "x"))
	f.Add(tarOf(f, tar.TypeSymlink, "storage/link", ""))
	f.Add(tarOf(f, tar.TypeReg, "db/toc.dat", "x", "db/toc.dat", "y"))
	f.Add(gzipOf(f, tarOf(f, tar.TypeReg, memberManifest, `{"format":"cascata-archive","version":2}`)))
	f.Fuzz(func(t *testing.T, data []byte) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		m, err := VerifyReader(ctx, bytes.NewReader(data), []byte(testPassphrase))
		if err == nil {
			if m == nil {
				t.Fatal("no error and no manifest")
			}
			return
		}
		if m != nil {
			t.Fatalf("a manifest with an error: %v", err)
		}
		for _, want := range []error{ErrCorrupt, ErrUnsafeMember, ErrUnsupportedVersion, ErrWrongPassphrase} {
			if errors.Is(err, want) {
				return
			}
		}
		t.Fatalf("the error wraps none of the archive errors: %v", err)
	})
}
