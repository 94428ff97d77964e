package archive

import (
	"bytes"
	"crypto/ed25519"
	crand "crypto/rand"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"cascata/auth"
)

// TestJWKSAndVectors: a project verified by a JWKS file (and an HMAC
// secret) with a vector snapshot directory travels whole; its EdDSA tokens
// verify after the import.
func TestJWKSAndVectors(t *testing.T) {
	ctx := t.Context()
	p := testProject(t, "keyed", "CREATE TABLE items (id int PRIMARY KEY, embedding float4[]); INSERT INTO items VALUES (1, '{0.5,0.25}');")
	pub, priv, err := ed25519.GenerateKey(crand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p.JWKSFile = filepath.Join(t.TempDir(), "jwks.json")
	if err := auth.WriteJWKSFile(p.JWKSFile, auth.JWK{KeyID: "k1", Key: pub}); err != nil {
		t.Fatal(err)
	}
	token, err := auth.Mint(auth.MintKey{PrivateKey: priv, KeyID: "k1"}, map[string]any{"role": "anon", "ref": "keyed"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	vectors := t.TempDir()
	rng := rand.NewChaCha8([32]byte{3})
	writeFile(t, filepath.Join(vectors, "index", "segment-0.bin"), 70000, 0o600, rng)
	writeFile(t, filepath.Join(vectors, "meta.json"), 20, 0o644, rng)

	secrets, err := SecretsFromProject(&p)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "keyed.caf")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	m, err := Export(ctx, ExportOptions{Project: p, Secrets: secrets, Passphrase: []byte(testPassphrase), VectorsDir: vectors, scryptN: minScryptN}, f, nil)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Vectors) != 3 {
		t.Errorf("manifest lists %d vector entries, want 3", len(m.Vectors))
	}

	tg := newTarget(t, "keyed")
	// Without a secrets dir a JWKS has nowhere to go: refused before anything is created.
	before := stateOf(t, tg)
	opts := tg.options(path)
	opts.SecretsDir = ""
	if _, err := Import(ctx, opts, nil); err == nil || !strings.Contains(err.Error(), "JWKS") {
		t.Errorf("import without secrets dir: %v, want a refusal naming the JWKS", err)
	}
	if after := stateOf(t, tg); !before.equal(after) {
		t.Errorf("refused import changed the instance:\nbefore %+v\nafter  %+v", before, after)
	}

	opts = tg.options(path)
	opts.VectorsDir = filepath.Join(t.TempDir(), "restored-vectors")
	res, err := Import(ctx, opts, nil)
	if err != nil {
		t.Fatal(err)
	}
	a, b := treeSums(t, vectors), treeSums(t, opts.VectorsDir)
	if len(a) != 3 || len(a) != len(b) {
		t.Errorf("vectors: %d entries restored, want %d", len(b), len(a))
	}
	for k, v := range a {
		if b[k] != v {
			t.Errorf("vectors %s: %q, want %q", k, b[k], v)
		}
	}
	orig, _ := os.ReadFile(p.JWKSFile)
	got, err := os.ReadFile(res.Project.JWKSFile)
	if err != nil || !bytes.Equal(orig, got) {
		t.Errorf("restored JWKS file %s: %v (equal: %v)", res.Project.JWKSFile, err, bytes.Equal(orig, got))
	}
	if fi, err := os.Stat(res.Project.JWKSFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("JWKS file mode: %v %v", fi.Mode(), err)
	}
	v := auth.NewVerifier()
	hs, err := res.Project.JWTSecrets()
	if err != nil {
		t.Fatal(err)
	}
	if err := v.SetProject(res.Project.Ref, auth.KeyConfig{Secrets: hs, JWKSFile: res.Project.JWKSFile}, auth.Policy{Roles: res.Project.Roles}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.Verify(ctx, res.Project.Ref, "anon", token); err != nil {
		t.Errorf("EdDSA token minted before the export: %v", err)
	}
	if _, err := v.Verify(ctx, res.Project.Ref, "anon", "x.y.z"); err == nil {
		t.Error("a garbage token verified")
	}
}
