package archive

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cascata/internal/storage"
	"cascata/internal/storage/s3test"

	"github.com/minio/minio-go/v7"
)

// The S3-compatible server of these tests is s3test's: gofakes3 with its
// file-backed backend on 127.0.0.1.

const (
	s3KeyEnv    = "CASCATA_TEST_S3_KEY"
	s3SecretEnv = "CASCATA_TEST_S3_SECRET"
	bigObject   = 150 << 20
)

// s3Server starts the server with buckets src and dst, the credentials in
// the environment, and returns its endpoint and a client.
func s3Server(t *testing.T) (string, *minio.Client) {
	t.Helper()
	t.Setenv(s3KeyEnv, s3test.AccessKey)
	t.Setenv(s3SecretEnv, s3test.SecretKey)
	srv := s3test.Start(t, "src", "dst")
	return srv.Endpoint, srv.Client
}

func s3Config(endpoint, url string) storage.S3Config {
	return storage.S3Config{URL: url, Endpoint: endpoint, Region: s3test.Region, AccessKey: s3test.AccessKey, SecretKey: s3test.SecretKey}
}

// s3Target imports every project into url on the test server.
func s3Target(endpoint, url string) func(string) (*StorageTarget, error) {
	return func(string) (*StorageTarget, error) {
		return &StorageTarget{S3: s3Config(endpoint, url), AccessKeyEnv: s3KeyEnv, SecretKeyEnv: s3SecretEnv}, nil
	}
}

// want is what the tests put into the source bucket.
type wantObject struct {
	size        int64
	sha256      string
	data        []byte // small objects only
	contentType string
	meta        map[string]string
}

// fillBucket puts 1,000 small objects and one 150 MiB object under prefix.
func fillBucket(t *testing.T, c *minio.Client, bucket, prefix string) map[string]wantObject {
	t.Helper()
	want := map[string]wantObject{}
	var mu sync.Mutex
	rng := rand.NewChaCha8([32]byte{3})
	type job struct {
		key  string
		data []byte
		ct   string
		meta map[string]string
	}
	jobs := make(chan job)
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Go(func() {
			for j := range jobs {
				_, err := c.PutObject(t.Context(), bucket, prefix+j.key, bytes.NewReader(j.data), int64(len(j.data)),
					minio.PutObjectOptions{ContentType: j.ct, UserMetadata: j.meta})
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	types := []string{"text/plain", "image/png", "application/json", "application/octet-stream"}
	for i := range 1000 {
		data := make([]byte, int(rng.Uint64()%4096))
		_, _ = rng.Read(data)
		key := fmt.Sprintf("d%02d/o%04d.bin", i%37, i)
		if i%100 == 0 {
			key = fmt.Sprintf("ünïcödé ✓/file %d.txt", i)
		}
		meta := map[string]string{"owner": "user-" + strconv.Itoa(i%7), "seq": strconv.Itoa(i)}
		sum := sha256.Sum256(data)
		mu.Lock()
		want[key] = wantObject{size: int64(len(data)), sha256: hex.EncodeToString(sum[:]), data: data, contentType: types[i%len(types)], meta: meta}
		mu.Unlock()
		select {
		case jobs <- job{key, data, types[i%len(types)], meta}:
		case err := <-errs:
			t.Fatal(err)
		}
	}
	close(jobs)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	// The big object is generated as it is sent.
	h := sha256.New()
	gen := io.TeeReader(io.LimitReader(rand.NewChaCha8([32]byte{4}), bigObject), h)
	meta := map[string]string{"kind": "video"}
	if _, err := c.PutObject(t.Context(), bucket, prefix+"media/big.mp4", gen, bigObject,
		minio.PutObjectOptions{ContentType: "video/mp4", UserMetadata: meta, DisableMultipart: true}); err != nil {
		t.Fatal(err)
	}
	want["media/big.mp4"] = wantObject{size: bigObject, sha256: hex.EncodeToString(h.Sum(nil)), contentType: "video/mp4", meta: meta}
	return want
}

// rssSampler records the peak resident set size of this process.
type rssSampler struct {
	peak atomic.Int64
	done chan struct{}
	wg   sync.WaitGroup
}

func rss() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}

func sampleRSS() *rssSampler {
	s := &rssSampler{done: make(chan struct{})}
	s.wg.Go(func() {
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			if r := rss(); r > s.peak.Load() {
				s.peak.Store(r)
			}
			select {
			case <-s.done:
				return
			case <-tick.C:
			}
		}
	})
	return s
}

func (s *rssSampler) stop() int64 {
	close(s.done)
	s.wg.Wait()
	return s.peak.Load()
}

// checkObjects compares every object under the store's prefix with want.
func checkObjects(t *testing.T, c *minio.Client, bucket, prefix string, want map[string]wantObject) {
	t.Helper()
	n := 0
	for info := range c.ListObjects(t.Context(), bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
		if info.Err != nil {
			t.Fatal(info.Err)
		}
		n++
		key := strings.TrimPrefix(info.Key, prefix)
		w, ok := want[key]
		if !ok {
			t.Errorf("%s/%s: extra object", bucket, info.Key)
			continue
		}
		obj, err := c.GetObject(t.Context(), bucket, info.Key, minio.GetObjectOptions{})
		if err != nil {
			t.Fatal(err)
		}
		st, err := obj.Stat()
		if err != nil {
			t.Fatal(err)
		}
		got := compareBody(t, obj, w)
		_ = obj.Close()
		if got != "" {
			t.Errorf("%s/%s: %s", bucket, info.Key, got)
		}
		if st.ContentType != w.contentType {
			t.Errorf("%s/%s: content type %q, want %q", bucket, info.Key, st.ContentType, w.contentType)
		}
		for k, v := range w.meta {
			if st.UserMetadata[http.CanonicalHeaderKey(k)] != v && st.UserMetadata[k] != v {
				t.Errorf("%s/%s: metadata %v, want %s=%s", bucket, info.Key, st.UserMetadata, k, v)
			}
		}
	}
	if n != len(want) {
		t.Errorf("%s/%s: %d objects, want %d", bucket, prefix, n, len(want))
	}
}

// compareBody compares r's bytes with w ("" when equal).
func compareBody(t *testing.T, r io.Reader, w wantObject) string {
	t.Helper()
	if w.data != nil {
		b, err := io.ReadAll(r)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, w.data) {
			return fmt.Sprintf("%d bytes differ from the %d put", len(b), len(w.data))
		}
		return ""
	}
	h := sha256.New()
	n, err := io.Copy(h, r)
	if err != nil {
		t.Fatal(err)
	}
	if sum := hex.EncodeToString(h.Sum(nil)); n != w.size || sum != w.sha256 {
		return fmt.Sprintf("%d bytes %s, want %d %s", n, short(sum), w.size, short(w.sha256))
	}
	return ""
}

func TestS3Storage(t *testing.T) {
	ctx := t.Context()
	endpoint, c := s3Server(t)
	start := time.Now()
	want := fillBucket(t, c, "src", "projects/s3proj/")
	t.Logf("filled the source bucket in %v", time.Since(start))

	p := testProject(t, "s3proj", "CREATE TABLE public.t (id int PRIMARY KEY); INSERT INTO public.t SELECT generate_series(1, 10);")
	p.StorageDir = ""
	p.StorageURL, p.S3Endpoint, p.S3Region = "s3://src/projects/s3proj", endpoint, "us-east-1"
	p.S3AccessKeyEnv, p.S3SecretKeyEnv = s3KeyEnv, s3SecretEnv

	// Export, measuring this process's memory while the 150 MiB object streams.
	runtime.GC()
	debug.FreeOSMemory()
	base := rss()
	smp := sampleRSS()
	start = time.Now()
	path, m1 := exportTo(t, p, CompressionNone)
	peakExport := smp.stop()
	t.Logf("export: %v; RSS %d MiB before, peak %d MiB (+%d MiB)", time.Since(start), base>>20, peakExport>>20, (peakExport-base)>>20)
	if len(m1.Files) != len(want) {
		t.Fatalf("manifest lists %d files, want %d", len(m1.Files), len(want))
	}
	for _, f := range m1.Files {
		w := want[f.Path]
		if f.SHA256 != w.sha256 || f.Size != w.size || f.ContentType != w.contentType || metaKey(f.Metadata) != metaKey(w.meta) {
			t.Fatalf("manifest entry %+v, want %+v", f, w)
		}
	}

	// Into another bucket.
	tg := newTarget(t, "s3_in_bucket", "s3_in_dir")
	opts := tg.options(path)
	opts.Ref = "s3_in_bucket"
	opts.Storage = s3Target(endpoint, "s3://dst/copy")
	runtime.GC()
	debug.FreeOSMemory()
	base = rss()
	smp = sampleRSS()
	start = time.Now()
	res, err := Import(ctx, opts, nil)
	peakImport := smp.stop()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("import into a bucket: %v; RSS %d MiB before, peak %d MiB (+%d MiB)", time.Since(start), base>>20, peakImport>>20, (peakImport-base)>>20)
	for what, peak := range map[string]int64{"export": peakExport - base, "import": peakImport - base} {
		if peak > 100<<20 {
			t.Errorf("%s: RSS grew by %d MiB while a %d MiB object streamed", what, peak>>20, bigObject>>20)
		}
	}
	if res.Project.StorageURL != "s3://dst/copy" || res.Project.StorageDir != "" || res.Project.S3AccessKeyEnv != s3KeyEnv {
		t.Errorf("imported project storage: %q %q %q", res.Project.StorageURL, res.Project.StorageDir, res.Project.S3AccessKeyEnv)
	}
	checkObjects(t, c, "dst", "copy/", want)
	if diffs, err := VerifyStorage(ctx, m1, &res.Project); err != nil || len(diffs) > 0 {
		t.Fatalf("verify after import: %v %v", diffs, err)
	}

	// An export of the import has the same files, content types and metadata.
	path2, m2 := exportTo(t, res.Project, CompressionNone)
	_ = os.Remove(path2)
	if err := CompareData(m1, m2); err != nil {
		t.Errorf("export of the import: %v", err)
	}

	// Into a local directory.
	opts = tg.options(path)
	opts.Ref = "s3_in_dir"
	res2, err := Import(ctx, opts, nil)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for key, w := range want {
		f, err := os.Open(filepath.Join(res2.Project.StorageDir, filepath.FromSlash(key)))
		if err != nil {
			t.Fatal(err)
		}
		if d := compareBody(t, f, w); d != "" {
			t.Errorf("%s: %s", key, d)
		}
		_ = f.Close()
		n++
	}
	if diffs, err := VerifyStorage(ctx, m1, &res2.Project); err != nil || len(diffs) > 0 {
		t.Fatalf("verify of the local copy: %v %v", diffs, err)
	}

	// Tampered, deleted and extra objects are reported.
	if _, err := c.PutObject(ctx, "dst", "copy/d05/o0005.bin", strings.NewReader("tampered"), 8, minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := c.RemoveObject(ctx, "dst", "copy/d06/o0006.bin", minio.RemoveObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.PutObject(ctx, "dst", "copy/intruder.txt", strings.NewReader("x"), 1, minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	diffs, err := VerifyStorage(ctx, m1, &res.Project)
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(diffs, "\n")
	for _, w := range []string{"d05/o0005.bin: changed", "d06/o0006.bin: missing", "intruder.txt: extra"} {
		if !strings.Contains(joined, w) {
			t.Errorf("verify did not report %q:\n%s", w, joined)
		}
	}
	if len(diffs) != 3 {
		t.Errorf("verify reported %d problems, want 3:\n%s", len(diffs), joined)
	}
}

// TestLocalToS3: a project with a storage_dir imports into a bucket, and
// an import into a prefix that holds objects is refused.
func TestLocalToS3(t *testing.T) {
	endpoint, c := s3Server(t)
	p, plain, _ := tiny(t)
	path := filepath.Join(t.TempDir(), "tiny.caf")
	if err := os.WriteFile(path, plain, 0o600); err != nil {
		t.Fatal(err)
	}
	tg := newTarget(t, "tiny_s3")
	opts := tg.options(path)
	opts.Ref = "tiny_s3"
	opts.Storage = s3Target(endpoint, "s3://dst/tiny")
	res, err := Import(t.Context(), opts, nil)
	if err != nil {
		t.Fatal(err)
	}
	for rel, sum := range treeSums(t, p.StorageDir) {
		if strings.HasPrefix(sum, "dir") {
			continue
		}
		obj, err := c.GetObject(t.Context(), "dst", "tiny/"+filepath.ToSlash(rel), minio.GetObjectOptions{})
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		if _, err := io.Copy(h, obj); err != nil {
			t.Fatalf("%s: %v", rel, err)
		}
		if !strings.HasSuffix(sum, hex.EncodeToString(h.Sum(nil))) {
			t.Errorf("%s differs in the bucket", rel)
		}
	}
	m, err := Verify(t.Context(), path, []byte(testPassphrase))
	if err != nil {
		t.Fatal(err)
	}
	if diffs, err := VerifyStorage(t.Context(), m, &res.Project); err != nil || len(diffs) > 0 {
		t.Fatalf("verify: %v %v", diffs, err)
	}

	opts.Ref = "tiny_s3_again"
	_, err = Import(t.Context(), opts, nil)
	if err == nil || !strings.Contains(err.Error(), "s3://dst/tiny/ holds") {
		t.Fatalf("import into a non-empty prefix: %v", err)
	}
}
