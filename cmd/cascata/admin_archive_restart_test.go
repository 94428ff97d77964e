package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"cascata/auth"
	"cascata/internal/pgcluster"
	"cascata/internal/pgtest"
	"cascata/internal/storage/s3test"

	"github.com/minio/minio-go/v7"
)

// TestCLIImportIntoDeclaredRefSurvivesRestart: `cascata archive import
// -as REF -overwrite` into a ref cascata.toml declares (its database not
// created yet) registers a run-time change that `cascata serve` keeps
// across restarts: the CLI and serve fingerprint the file's project alike.
func TestCLIImportIntoDeclaredRefSurvivesRestart(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	cl := startClusters(t, ctx, 1)[0]
	if err := pgcluster.SetupProject(ctx, cl.Primary, pgcluster.ProjectSpec{Database: "origin", LoginPassword: appLoginPassword}); err != nil {
		t.Fatal(err)
	}
	pgtest.Exec(t, cl.Primary.SuperuserURL("origin"), `
		CREATE TABLE items (id bigserial PRIMARY KEY, v text NOT NULL, b bytea);
		INSERT INTO items (v, b) SELECT 'item ' || i, decode(md5(i::text), 'hex') FROM generate_series(1, 300) i;
		GRANT SELECT ON items TO authenticated;`)

	const archiveSecret = "archive-secret-0123456789-abcdef-0123456789"
	const fileSecret = "declared-secret-0123456789-abcdef-012345678"
	t.Setenv("CASCATA_TEST_ADMIN_TOKEN", appAdminToken)
	t.Setenv("CASCATA_TEST_LOGIN_PW", appLoginPassword)
	t.Setenv("CASCATA_ARCHIVE_PASSPHRASE", archivePassphrase)
	dir := t.TempDir()
	head := func(state string) string {
		return testConfig(filepath.Join(dir, state), "", provisionTable(cl.Primary.SuperuserURL("postgres"), filepath.Join(dir, state+"-storage")))
	}
	write := func(name, text string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	// Where the archive comes from, and the instance that declares "declared".
	cfgSrc := write("src.toml", head("src")+fmt.Sprintf(`
[[projects]]
ref = "origin"
database_url = %q
jwt_secret = %q
`, cl.Primary.URL("authenticator", appLoginPassword, "origin"), archiveSecret))
	// Its files go to an S3-compatible store.
	s3 := s3test.Start(t, "files")
	t.Setenv("CASCATA_TEST_S3_KEY", s3test.AccessKey)
	t.Setenv("CASCATA_TEST_S3_SECRET", s3test.SecretKey)
	cfgDst := write("dst.toml", head("dst")+fmt.Sprintf(`
# declared here, its database and files come from an archive
[[projects]]
ref = "declared"
database_url = %q
jwt_secret = %q
pool_size = 5
storage_url = "s3://files/declared"
s3_endpoint = %q
s3_access_key_env = "CASCATA_TEST_S3_KEY"
s3_secret_key_env = "CASCATA_TEST_S3_SECRET"
`, cl.Primary.URL("authenticator", appLoginPassword, "declared"), fileSecret, s3.Endpoint))
	files := map[string]string{"a.txt": "hello", "deep/er/b.bin": strings.Repeat("\x00\xff", 5000)}
	for name, data := range files {
		p := filepath.Join(dir, "src-storage", "origin", filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	pgtest.Exec(t, cl.Primary.SuperuserURL("postgres"), "DROP DATABASE IF EXISTS declared WITH (FORCE)")

	caf := filepath.Join(dir, "origin.caf")
	var out, errOut bytes.Buffer
	if err := cmdArchive([]string{"export", "-config", cfgSrc, "-project", "origin", "-out", caf}, &out, &errOut); err != nil {
		t.Fatalf("export: %v\n%s", err, errOut.String())
	}
	err := cmdArchive([]string{"import", "-config", cfgDst, caf, "-as", "declared"}, &out, &errOut)
	if err == nil || !strings.Contains(err.Error(), "overwrite") {
		t.Fatalf("import into a declared ref without -overwrite: %v", err)
	}
	if err := cmdArchive([]string{"import", "-config", cfgDst, caf, "-as", "declared", "-overwrite"}, &out, &errOut); err != nil {
		t.Fatalf("import: %v\n%s", err, errOut.String())
	}

	// A token of the archive's key names the new ref.
	tok, err := auth.Mint(auth.MintKey{Secret: []byte(archiveSecret)}, map[string]any{"role": "authenticated", "ref": "declared"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	var first string
	for i := range 2 {
		r := startApp(t, cfgDst)
		got, err := rowsDigest(t, r.proxyAddr, "declared", tok)
		if err != nil || !strings.HasPrefix(got, "300:") {
			t.Fatalf("start %d: %q %v (the import was dropped?)", i+1, got, err)
		}
		if i == 0 {
			first = got
		} else if got != first {
			t.Fatalf("after restart %q, before %q", got, first)
		}
		var view struct {
			Source    string `json:"source"`
			ChangedBy string `json:"changed_by"`
		}
		r.admin(t, "GET", "/v1/projects/declared", nil, 200, &view)
		if view.Source != "runtime" || view.ChangedBy != "import" {
			t.Fatalf("start %d: %+v", i+1, view)
		}
		r.stop()
	}

	// The files are in the bucket, and verify compares them with the archive.
	for name, data := range files {
		obj, err := s3.Client.GetObject(ctx, "files", "declared/"+name, minio.GetObjectOptions{})
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(obj)
		if err != nil || string(got) != data {
			t.Fatalf("object %s: %d bytes, %v", name, len(got), err)
		}
	}
	out.Reset()
	if err := cmdArchive([]string{"verify", caf, "-config", cfgDst, "-project", "declared"}, &out, &errOut); err != nil {
		t.Fatalf("verify: %v\n%s", err, out.String())
	}
	if _, err := s3.Client.PutObject(ctx, "files", "declared/a.txt", strings.NewReader("HELLO"), 5, minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	out.Reset()
	err = cmdArchive([]string{"verify", caf, "-config", cfgDst, "-project", "declared"}, &out, &errOut)
	if err == nil || !strings.Contains(out.String(), "a.txt: changed") {
		t.Fatalf("verify of a tampered object: %v\n%s", err, out.String())
	}
}
