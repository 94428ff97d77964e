package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"cascata/auth"
	"cascata/internal/archive"
	"cascata/internal/jobs"
	"cascata/internal/pgcluster"
	"cascata/internal/pgtest"

	"github.com/jackc/pgx/v5"
)

const archivePassphrase = "correct horse battery staple"

// startClusters starts n clusters at once, stopped when the test ends.
func startClusters(t *testing.T, ctx context.Context, n int) []*pgcluster.Cluster {
	t.Helper()
	out := make([]*pgcluster.Cluster, n)
	stops := make([]func(context.Context) error, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { out[i], stops[i], errs[i] = pgtest.Start(ctx, pgcluster.Options{}) })
	}
	wg.Wait()
	for _, stop := range stops {
		if stop != nil {
			t.Cleanup(func() {
				sctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				if err := stop(sctx); err != nil {
					t.Error(err)
				}
			})
		}
	}
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// testConfig is a test instance's cascata.toml: proxy and admin plane on
// free loopback ports, its state dir, adminExtra lines in [admin], then
// rest (its other tables).
func testConfig(stateDir, adminExtra, rest string) string {
	return fmt.Sprintf(`
[proxy]
listen = "127.0.0.1:0"
shutdown_timeout = "5s"

[admin]
listen = "127.0.0.1:0"
token_env = "CASCATA_TEST_ADMIN_TOKEN"
%s
[state]
dir = %q
%s`, adminExtra, stateDir, rest)
}

// provisionTable is a [provision] table creating projects with ownerURL
// under storageRoot, the login password in CASCATA_TEST_LOGIN_PW.
func provisionTable(ownerURL, storageRoot string) string {
	return fmt.Sprintf(`
[provision]
owner_url = %q
login_password_env = "CASCATA_TEST_LOGIN_PW"
storage_root = %q
`, ownerURL, storageRoot)
}

// do sends a raw request to the admin plane and returns status and body.
func (r *runningApp) do(t *testing.T, method, path string, header map[string]string, body []byte) (int, []byte) {
	t.Helper()
	req, _ := http.NewRequestWithContext(t.Context(), method, r.adminURL+path, bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+appAdminToken)
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, data
}

// startJob sends a request that must answer 202 {"job": ID} and waits
// until the job is no longer active.
func (r *runningApp) startJob(t *testing.T, path string, header map[string]string, body []byte) jobs.Status {
	t.Helper()
	code, data := r.do(t, "POST", path, header, body)
	if code != http.StatusAccepted {
		t.Fatalf("POST %s: %d: %s", path, code, data)
	}
	var started struct{ Job string }
	if err := json.Unmarshal(data, &started); err != nil || started.Job == "" {
		t.Fatalf("POST %s: %s (%v)", path, data, err)
	}
	deadline := time.Now().Add(45 * time.Second)
	for {
		var st jobs.Status
		r.admin(t, "GET", "/v1/jobs/"+started.Job, nil, http.StatusOK, &st)
		if !st.Active() {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("job %s still %s (phase %s, progress %.2f)", st.ID, st.State, st.Phase, st.Progress)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// rowsDigest is what a client of ref sees of the items table through the
// proxy at proxyAddr with tok.
func rowsDigest(t *testing.T, proxyAddr, ref, tok string) (string, error) {
	t.Helper()
	host, port, _ := net.SplitHostPort(proxyAddr)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, fmt.Sprintf("postgres://authenticated:%s@%s:%s/%s?sslmode=disable&default_query_exec_mode=simple_protocol",
		url.QueryEscape(tok), host, port, ref))
	if err != nil {
		return "", err
	}
	defer c.Close(context.Background())
	var n int64
	var sum string
	err = c.QueryRow(ctx, `SELECT count(*), md5(string_agg(id || ':' || v || ':' || encode(b, 'hex'), ',' ORDER BY id)) FROM items`).Scan(&n, &sum)
	return fmt.Sprintf("%d:%s", n, sum), err
}

// treeFiles maps every regular file under root to its content.
func treeFiles(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		rel, _ := filepath.Rel(root, p)
		out[rel] = string(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestArchiveThroughAdminPlane exports a project from instance A through
// its admin plane, downloads the .caf and imports it into instance B
// (another cluster, another state dir): a JWT minted on A reads the same
// rows through B's proxy. A wrong passphrase and an existing ref fail
// their jobs and create nothing.
func TestArchiveThroughAdminPlane(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	cls := startClusters(t, ctx, 2)
	clA, clB := cls[0], cls[1]

	if err := pgcluster.SetupProject(ctx, clA.Primary, pgcluster.ProjectSpec{Database: "shop", LoginPassword: appLoginPassword}); err != nil {
		t.Fatal(err)
	}
	pgtest.Exec(t, clA.Primary.SuperuserURL("shop"), `
		CREATE TABLE items (id bigserial PRIMARY KEY, v text NOT NULL, b bytea);
		INSERT INTO items (v, b) SELECT 'item ' || i || ' ünïcødé ✓', decode(md5(i::text), 'hex') FROM generate_series(1, 1000) i;
		GRANT SELECT ON items TO authenticated;
		DROP ROLE IF EXISTS auditor; CREATE ROLE auditor NOLOGIN; GRANT SELECT ON items TO auditor;`)

	t.Setenv("CASCATA_TEST_ADMIN_TOKEN", appAdminToken)
	t.Setenv("CASCATA_TEST_LOGIN_PW", appLoginPassword)
	dir := t.TempDir()
	instance := func(name string, cl *pgcluster.Cluster, projects string) (cfgPath, stateDir, storageRoot string) {
		base := filepath.Join(dir, name)
		if err := os.MkdirAll(base, 0o700); err != nil {
			t.Fatal(err)
		}
		cfgPath, stateDir, storageRoot = filepath.Join(base, "cascata.toml"), filepath.Join(base, "state"), filepath.Join(base, "storage")
		text := testConfig(stateDir, "", provisionTable(cl.Primary.SuperuserURL("postgres"), storageRoot)+projects)
		if err := os.WriteFile(cfgPath, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		return cfgPath, stateDir, storageRoot
	}
	cfgA, _, storageA := instance("a", clA, fmt.Sprintf(`
[[projects]]
ref = "shop"
database_url = %q
jwt_secret = %q
`, clA.Primary.URL("authenticator", appLoginPassword, "shop"), appSecret))
	cfgB, stateB, storageB := instance("b", clB, "")

	// The project's storage files on A.
	files := map[string][]byte{
		"hello.txt":             []byte("hello, archive\n"),
		"empty":                 nil,
		"nested/deep/blob.bin":  bytes.Repeat([]byte{0, 1, 2, 0xff, '\n'}, 40_000),
		"nested/ünïcødé ✓.json": []byte(`{"ok": true}`),
	}
	for name, data := range files {
		p := filepath.Join(storageA, "shop", name)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, 0o640); err != nil {
			t.Fatal(err)
		}
	}

	a := startApp(t, cfgA)
	b := startApp(t, cfgB)

	// A JWT minted on A, before the export.
	var tokOut, errOut bytes.Buffer
	if err := cmdToken([]string{"-config", cfgA, "-project", "shop", "-role", "authenticated"}, &tokOut, &errOut); err != nil {
		t.Fatalf("cascata token: %v %s", err, errOut.String())
	}
	tok := strings.TrimSpace(tokOut.String())
	want, err := rowsDigest(t, a.proxyAddr, "shop", tok)
	if err != nil || !strings.HasPrefix(want, "1000:") {
		t.Fatalf("on A: %q %v", want, err)
	}

	// Export on A.
	pass := map[string]string{"X-Cascata-Passphrase": archivePassphrase}
	if code, body := a.do(t, "POST", "/v1/projects/shop/archive", nil, nil); code != http.StatusBadRequest {
		t.Fatalf("export without passphrase: %d %s", code, body)
	}
	exp := a.startJob(t, "/v1/projects/shop/archive", pass, nil)
	if exp.State != jobs.Succeeded || exp.Kind != "archive" || exp.Project != "shop" || !exp.HasResult || exp.ResultName != "shop.caf" {
		t.Fatalf("export job: %+v", exp)
	}
	code, caf := a.do(t, "GET", "/v1/jobs/"+exp.ID+"/result", nil, nil)
	if code != http.StatusOK || len(caf) == 0 {
		t.Fatalf("download: %d, %d bytes", code, len(caf))
	}
	cafPath := filepath.Join(dir, "shop.caf")
	if err := os.WriteFile(cafPath, caf, 0o600); err != nil {
		t.Fatal(err)
	}
	// The offline CLI agrees the download is intact.
	t.Setenv("CASCATA_ARCHIVE_PASSPHRASE", archivePassphrase)
	var out bytes.Buffer
	errOut.Reset()
	if rc := run([]string{"archive", "verify", cafPath}, &out, &errOut); rc != 0 || !strings.Contains(out.String(), "intact") {
		t.Fatalf("cascata archive verify: %d %s %s", rc, out.String(), errOut.String())
	}

	// Import into B: refused requests first.
	if code, body := b.do(t, "POST", "/v1/archives/import", pass, nil); code != http.StatusBadRequest || !strings.Contains(string(body), "empty") {
		t.Fatalf("empty upload: %d %s", code, body)
	}
	wrong := b.startJob(t, "/v1/archives/import", map[string]string{"X-Cascata-Passphrase": "not the passphrase"}, caf)
	if wrong.State != jobs.Failed || !strings.Contains(wrong.Error, "wrong passphrase") || strings.Contains(wrong.Error, "import-") {
		t.Fatalf("wrong passphrase: %+v", wrong)
	}
	nothingCreated := func(ref string) {
		t.Helper()
		if code, body := b.do(t, "GET", "/v1/projects/"+ref, nil, nil); code != http.StatusNotFound {
			t.Fatalf("project %s on B: %d %s", ref, code, body)
		}
		if n := pgtest.QueryValue(t, clB.Primary.SuperuserURL("postgres"), "SELECT count(*) FROM pg_database WHERE datname LIKE $1", ref+"%"); n != "0" {
			t.Fatalf("%s databases of %s on B", n, ref)
		}
		if _, err := os.Stat(filepath.Join(storageB, ref)); !os.IsNotExist(err) {
			t.Fatalf("storage of %s on B: %v", ref, err)
		}
	}
	nothingCreated("shop")
	flipped := bytes.Clone(caf)
	flipped[len(flipped)/2] ^= 0x20
	for name, bad := range map[string][]byte{"flipped byte": flipped, "truncated": caf[:len(caf)*2/3]} {
		st := b.startJob(t, "/v1/archives/import", pass, bad)
		if st.State != jobs.Failed || !strings.Contains(st.Error, "corrupt") || !strings.Contains(st.Error, "nothing was created") {
			t.Fatalf("%s: %+v", name, st)
		}
	}
	nothingCreated("shop")

	// The import.
	imp := b.startJob(t, "/v1/archives/import", pass, caf)
	if imp.State != jobs.Succeeded || imp.Kind != "import" {
		t.Fatalf("import job: %+v", imp)
	}
	got, err := rowsDigest(t, b.proxyAddr, "shop", tok)
	if err != nil || got != want {
		t.Fatalf("on B with A's token: %q %v, want %q", got, err, want)
	}
	gotFiles, wantFiles := treeFiles(t, filepath.Join(storageB, "shop")), treeFiles(t, filepath.Join(storageA, "shop"))
	if len(gotFiles) != len(files) || fmt.Sprint(gotFiles) != fmt.Sprint(wantFiles) {
		t.Fatalf("storage files on B differ: %d files, want %d", len(gotFiles), len(wantFiles))
	}
	var view struct {
		Source    string `json:"source"`
		ChangedBy string `json:"changed_by"`
	}
	b.admin(t, "GET", "/v1/projects/shop", nil, http.StatusOK, &view)
	if view.Source != "runtime" || view.ChangedBy != "import" {
		t.Fatalf("imported project: %+v", view)
	}

	// The same ref again: refused, the imported project untouched.
	again := b.startJob(t, "/v1/archives/import", pass, caf)
	if again.State != jobs.Failed || !strings.Contains(again.Error, "exists") {
		t.Fatalf("second import: %+v", again)
	}
	if got, err := rowsDigest(t, b.proxyAddr, "shop", tok); err != nil || got != want {
		t.Fatalf("after the refused import: %q %v", got, err)
	}

	// Under another ref: the old token names "shop" and is refused there; a
	// token of the same (archived) secret for "other" reads the same rows.
	other := b.startJob(t, "/v1/archives/import?as=other", pass, caf)
	if other.State != jobs.Succeeded || other.Project != "other" {
		t.Fatalf("import as other: %+v", other)
	}
	if _, err := rowsDigest(t, b.proxyAddr, "other", tok); err == nil {
		t.Fatal("a token naming shop connected to other")
	}
	tokOther, err := auth.Mint(auth.MintKey{Secret: []byte(appSecret)}, map[string]any{"role": "authenticated", "ref": "other"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := rowsDigest(t, b.proxyAddr, "other", tokOther); err != nil || got != want {
		t.Fatalf("other: %q %v, want %q", got, err, want)
	}

	// An export of the import equals the original in every data and file checksum.
	back := b.startJob(t, "/v1/projects/shop/archive", pass, nil)
	if back.State != jobs.Succeeded {
		t.Fatalf("export from B: %+v", back)
	}
	code, caf2 := b.do(t, "GET", "/v1/jobs/"+back.ID+"/result", nil, nil)
	if code != http.StatusOK {
		t.Fatalf("download from B: %d %s", code, caf2)
	}
	caf2Path := filepath.Join(dir, "shop-b.caf")
	if err := os.WriteFile(caf2Path, caf2, 0o600); err != nil {
		t.Fatal(err)
	}
	m1, err := archive.Verify(ctx, cafPath, []byte(archivePassphrase))
	if err != nil {
		t.Fatal(err)
	}
	m2, err := archive.Verify(ctx, caf2Path, []byte(archivePassphrase))
	if err != nil {
		t.Fatal(err)
	}
	if err := archive.CompareData(m1, m2); err != nil {
		t.Fatalf("export of the import: %v", err)
	}

	// A role of the archive that is more than a project role on B (here:
	// it can log in) refuses the import, naming the role.
	pgtest.Exec(t, clB.Primary.SuperuserURL("postgres"), "ALTER ROLE auditor LOGIN")
	refused := b.startJob(t, "/v1/archives/import?as=third", pass, caf)
	if refused.State != jobs.Failed || !strings.Contains(refused.Error, "archive refused") || !strings.Contains(refused.Error, `"auditor"`) {
		t.Fatalf("import naming a login role: %+v", refused)
	}
	nothingCreated("third")

	// An instance without [provision] refuses imports at once.
	cfgC := filepath.Join(dir, "c.toml")
	if err := os.WriteFile(cfgC, []byte(testConfig(filepath.Join(dir, "c-state"), "", "")), 0o600); err != nil {
		t.Fatal(err)
	}
	c := startApp(t, cfgC)
	if code, body := c.do(t, "POST", "/v1/archives/import", pass, caf); code != http.StatusConflict || !strings.Contains(string(body), "[provision].owner_url") {
		t.Fatalf("import without [provision]: %d %s", code, body)
	}

	// Uploads are removed when their jobs end.
	if entries, err := os.ReadDir(filepath.Join(stateB, "uploads")); err != nil || len(entries) != 0 {
		t.Fatalf("uploads left: %v %v", entries, err)
	}
}
