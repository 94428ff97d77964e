package archive

import (
	"errors"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"testing"
	"time"

	"cascata/internal/config"
)

func TestClassify(t *testing.T) {
	ok := []struct {
		name string
		dir  bool
		kind memberKind
		rel  string
	}{
		{"manifest.json", false, kindManifest, ""},
		{"manifest.sig", false, kindSig, ""},
		{"secrets.enc", false, kindSecrets, ""},
		{"db/toc.dat", false, kindDB, "toc.dat"},
		{"db/blob_16385.dat", false, kindDB, "blob_16385.dat"},
		{"storage/a/b c/ü.txt", false, kindStorage, "a/b c/ü.txt"},
		{"storage/a/", true, kindStorage, "a"},
		{"storage/..hidden", false, kindStorage, "..hidden"},
		{"storage/a\\..\\b", false, kindStorage, "a\\..\\b"},
		{"vectors/index.bin", false, kindVectors, "index.bin"},
	}
	for _, c := range ok {
		kind, rel, err := classify(c.name, c.dir)
		if err != nil || kind != c.kind || rel != c.rel {
			t.Errorf("classify(%q) = %v %q %v, want %v %q", c.name, kind, rel, err, c.kind, c.rel)
		}
	}
	bad := []struct {
		name string
		dir  bool
		want error
	}{
		{"/etc/passwd", false, ErrUnsafeMember},
		{"storage/../x", false, ErrUnsafeMember},
		{"storage/a/../../x", false, ErrUnsafeMember},
		{"storage/./x", false, ErrUnsafeMember},
		{"storage//x", false, ErrUnsafeMember},
		{"storage/x\x00y", false, ErrUnsafeMember},
		{"storage/\xff", false, ErrUnsafeMember},
		{"db/sub/toc.dat", false, ErrUnsafeMember},
		{"db/..", false, ErrUnsafeMember},
		{"db/toc.dat", true, ErrCorrupt},
		{"storage", true, ErrCorrupt},
		{"other/x", false, ErrCorrupt},
		{"storage/x/", false, ErrCorrupt},
		{"", false, ErrUnsafeMember},
	}
	for _, c := range bad {
		if _, _, err := classify(c.name, c.dir); !errors.Is(err, c.want) {
			t.Errorf("classify(%q, dir=%v) = %v, want %v", c.name, c.dir, err, c.want)
		}
	}
}

func TestSealOpen(t *testing.T) {
	si, err := newSealInfo()
	if err != nil {
		t.Fatal(err)
	}
	k, err := deriveKeys([]byte("pass"), si)
	if err != nil {
		t.Fatal(err)
	}
	in := Secrets{HMACSecrets: [][]byte{[]byte("one"), {0, 1, 2, 255}}, JWKS: []byte(`{"keys":[]}`)}
	sealed, err := seal(k, in)
	if err != nil {
		t.Fatal(err)
	}
	out, err := open(k, sealed)
	if err != nil || !reflect.DeepEqual(in, out) {
		t.Fatalf("open(seal(x)) = %+v, %v", out, err)
	}
	k2, _ := deriveKeys([]byte("Pass"), si)
	if _, err := open(k2, sealed); !errors.Is(err, ErrWrongPassphrase) {
		t.Errorf("open with another passphrase: %v", err)
	}
	if _, err := deriveKeys(nil, si); !errors.Is(err, ErrNoPassphrase) {
		t.Errorf("empty passphrase: %v", err)
	}
	for _, bad := range []struct{ n, r, p int }{
		{1 << 30, 8, 1},  // N out of range
		{1 << 20, 32, 1}, // each within its bound, 4 GiB together
		{1 << 20, 2, 16}, // 256 MiB, but 64 times the default's work
	} {
		huge := si
		huge.N, huge.R, huge.P = bad.n, bad.r, bad.p
		start := time.Now()
		if _, err := deriveKeys([]byte("pass"), huge); !errors.Is(err, ErrCorrupt) {
			t.Errorf("scrypt N=%d r=%d p=%d accepted after %v: %v", bad.n, bad.r, bad.p, time.Since(start).Round(time.Millisecond), err)
		}
	}
	// The most a manifest may ask for is allowed (not derived here: 2 s).
	most := si
	most.N, most.R, most.P = 1<<18, 8, 2
	if err := checkScrypt(most); err != nil {
		t.Errorf("scrypt N=2^18 r=8 p=2 refused: %v", err)
	}
}

func TestSettingsRoundTrip(t *testing.T) {
	p := config.Project{
		Ref:           "demo",
		DatabaseURL:   "postgres://authenticator:secret@db:5432/demo",
		OwnerURL:      "postgres://postgres:topsecret@db:5432/demo",
		ReplicaURLs:   []string{"postgres://authenticator:secret@replica:5432/demo"},
		JWTSecret:     "never in the manifest",
		JWTSecretFile: "/etc/secret",
		JWTIssuer:     "https://issuer",
		JWTAudience:   "app",
		JWTLeeway:     config.Duration{Duration: 5 * time.Second},
		Roles:         []string{"anon", "member"},
		RoleClaim:     "app_metadata.role",
		AnonRole:      "anon",
		PoolMode:      "session",
		PoolSize:      7,
		MaxReplicaLag: config.Duration{Duration: 2 * time.Second},
		StorageDir:    "/var/lib/cascata/demo",
	}
	s, err := settingsOf(&p)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"jwt_secret", "jwt_secret_file", "storage_dir", "ref"} {
		if _, ok := s.Settings[k]; ok {
			t.Errorf("setting %s recorded", k)
		}
	}
	if got := string(s.Settings["owner_url"]); got != `"postgres://postgres:xxxxx@db:5432/demo"` {
		t.Errorf("owner_url recorded as %s", got)
	}
	var q config.Project
	unknown, err := applySettings(&q, s)
	if err != nil || len(unknown) > 0 {
		t.Fatalf("applySettings: %v %v", unknown, err)
	}
	if q.JWTLeeway != p.JWTLeeway || q.MaxReplicaLag != p.MaxReplicaLag || q.PoolSize != 7 || q.PoolMode != "session" ||
		!slices.Equal(q.Roles, p.Roles) || q.RoleClaim != p.RoleClaim || q.AnonRole != "anon" || q.JWTIssuer != p.JWTIssuer {
		t.Errorf("settings did not round-trip: %+v", q)
	}
	if q.DatabaseURL != "" || q.OwnerURL != "" || q.ReplicaURLs != nil || q.JWTSecret != "" || q.StorageDir != "" {
		t.Errorf("informative or secret settings applied: %+v", q)
	}
	s.Settings["from_the_future"] = []byte(`1`)
	if unknown, _ := applySettings(&q, s); !slices.Equal(unknown, []string{"from_the_future"}) {
		t.Errorf("unknown settings = %v", unknown)
	}
}

// TestCopyTree covers the cross-file-system path of moving storage in.
func TestCopyTree(t *testing.T) {
	src := filepath.Join(t.TempDir(), "src")
	rng := rand.NewChaCha8([32]byte{5})
	writeFile(t, filepath.Join(src, "a", "b", "c.bin"), 3000, 0o640, rng)
	writeFile(t, filepath.Join(src, "empty"), 0, 0o600, rng)
	if err := os.Chmod(filepath.Join(src, "a"), 0o555); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "dst")
	if err := copyTree(t.Context(), src, dst); err != nil {
		t.Fatal(err)
	}
	a, b := treeSums(t, src), treeSums(t, dst)
	if len(a) != 4 || !maps.Equal(a, b) {
		t.Errorf("copy differs:\n%v\n%v", a, b)
	}
	if err := removeTree(dst); err != nil {
		t.Errorf("removeTree: %v", err)
	}
	_ = os.Chmod(filepath.Join(src, "a"), 0o755)
}
