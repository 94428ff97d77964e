package main

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"cascata/admin"
	"cascata/internal/config"
	"cascata/internal/pgtest"
)

// TestEjectAllowedHosts: with [admin].eject_allowed_hosts set, an ejection
// or an import whose target is another host is refused with 403 before any
// connection is made to it.
func TestEjectAllowedHosts(t *testing.T) {
	// The forbidden target: a listener that counts connections.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var dials atomic.Int64
	acceptDone := make(chan struct{})
	go func() {
		defer close(acceptDone)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			dials.Add(1)
			_ = c.Close()
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		<-acceptDone
	})
	forbidden := ln.Addr().String()
	closed := fmt.Sprintf("127.0.0.1:%d", pgtest.FreePort(t)) // the project's own (absent) server

	t.Setenv("CASCATA_TEST_ADMIN_TOKEN", appAdminToken)
	t.Setenv("CASCATA_TEST_LOGIN_PW", appLoginPassword)
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "cascata.toml")
	text := testConfig(filepath.Join(dir, "state"), `eject_allowed_hosts = ["db.internal.example", "127.0.0.1:1"]`,
		provisionTable("postgres://postgres@"+forbidden+"/postgres", filepath.Join(dir, "storage"))+fmt.Sprintf(`
[[projects]]
ref = "p"
database_url = "postgres://authenticator:pw@%s/p"
owner_url = "postgres://postgres@%s/p"
jwt_secret = %q
`, closed, closed, appSecret))
	if err := os.WriteFile(cfgPath, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	r := startApp(t, cfgPath)

	target := "postgres://authenticator:pw@" + forbidden + "/p"
	owner := "postgres://postgres@" + forbidden + "/p"
	allowedURL := "postgres://authenticator:pw@db.internal.example:5432/p"
	for name, req := range map[string]admin.EjectRequest{
		"target":         {TargetURL: target, TargetOwnerURL: owner, Method: "dump"},
		"owner only":     {TargetURL: allowedURL, TargetOwnerURL: owner, Method: "dump"},
		"replica":        {TargetURL: allowedURL, TargetOwnerURL: "postgres://postgres@db.internal.example/p", ReplicaURLs: []string{target}, Method: "logical"},
		"multi-host":     {TargetURL: "postgres://a:pw@db.internal.example:5432," + forbidden + "/p", TargetOwnerURL: "postgres://postgres@db.internal.example/p"},
		"allowed port 1": {TargetURL: "postgres://a:pw@127.0.0.1:2/p", TargetOwnerURL: "postgres://postgres@127.0.0.1:1/p"},
	} {
		var e struct{ Error string }
		r.admin(t, "POST", "/v1/projects/p/eject", req, http.StatusForbidden, &e)
		if !strings.Contains(e.Error, "eject_allowed_hosts") {
			t.Errorf("%s: error %q", name, e.Error)
		}
	}
	code, body := r.do(t, "POST", "/v1/archives/import", map[string]string{"X-Cascata-Passphrase": "x"}, []byte("not read"))
	if code != http.StatusForbidden || !strings.Contains(string(body), "[provision].owner_url") {
		t.Errorf("import: %d %s, want 403", code, body)
	}
	if n := dials.Load(); n != 0 {
		t.Errorf("%d connections reached the forbidden host", n)
	}
	if entries, _ := os.ReadDir(filepath.Join(dir, "state", "uploads")); len(entries) != 0 {
		t.Errorf("a refused import left uploads: %v", entries)
	}

	// The CLI import obeys the same list.
	t.Setenv("CASCATA_ARCHIVE_PASSPHRASE", "x")
	err = cmdArchive([]string{"import", "-config", cfgPath, filepath.Join(dir, "none.caf")}, os.Stdout, os.Stderr)
	if !errors.Is(err, admin.ErrForbidden) {
		t.Errorf("cli import: %v, want it refused", err)
	}
}

func TestTargetAllowed(t *testing.T) {
	allowed := []string{"DB.example.com", "127.0.0.2:6543", "[::1]:5432", "127.0.0.3"}
	for url, ok := range map[string]bool{
		"postgres://u@db.example.com/x":                       true,
		"postgres://u@db.EXAMPLE.com:7000/x":                  true,
		"postgres://u@127.0.0.2:6543/x":                       true,
		"postgres://u@127.0.0.2:5432/x":                       false,
		"postgres://u@[::1]:5432/x":                           true,
		"postgres://u@127.0.0.3:1/x":                          true,
		"postgres://u@evil.example.com/x":                     false,
		"postgres://u@db.example.com,evil.example.com/x":      false,
		"postgres://u@db.example.com/x?host=evil.example.com": false,
	} {
		err := targetAllowed(allowed, "target_url", url)
		if (err == nil) != ok {
			t.Errorf("%s: %v, want allowed=%v", url, err, ok)
		}
	}
	if err := targetAllowed(nil, "target_url", "postgres://u@anywhere/x"); err != nil {
		t.Errorf("empty list: %v", err)
	}
}

// TestStorageTarget: an import lands in the storage_url of the ref's
// declared project, else under [provision].storage_url, else locally.
func TestStorageTarget(t *testing.T) {
	t.Setenv("CASCATA_TEST_S3_KEY", "k")
	t.Setenv("CASCATA_TEST_S3_SECRET", "s")
	cfg := &config.Config{
		Provision: config.Provision{StorageURL: "s3://shared/projects/", S3Endpoint: "http://127.0.0.1:9", S3Region: "eu-west-1",
			S3AccessKeyEnv: "CASCATA_TEST_S3_KEY", S3SecretKeyEnv: "CASCATA_TEST_S3_SECRET"},
		Projects: []config.Project{{Ref: "declared", StorageURL: "s3://own/place", S3Endpoint: "http://127.0.0.1:8",
			S3AccessKeyEnv: "CASCATA_TEST_S3_KEY", S3SecretKeyEnv: "CASCATA_TEST_S3_SECRET"}, {Ref: "local", StorageDir: "/x"}},
	}
	for ref, want := range map[string]string{
		"declared": "s3://own/place http://127.0.0.1:8",
		"local":    "s3://shared/projects/local http://127.0.0.1:9",
		"fresh":    "s3://shared/projects/fresh http://127.0.0.1:9",
	} {
		tg, err := storageTarget(cfg, ref)
		if err != nil {
			t.Fatal(err)
		}
		if got := tg.S3.URL + " " + tg.S3.Endpoint; got != want || tg.S3.AccessKey != "k" || tg.AccessKeyEnv != "CASCATA_TEST_S3_KEY" {
			t.Errorf("%s: %s (%+v), want %s", ref, got, tg, want)
		}
	}
	cfg.Provision.StorageURL = ""
	if tg, err := storageTarget(cfg, "fresh"); err != nil || tg != nil {
		t.Errorf("without [provision].storage_url: %+v %v", tg, err)
	}
}
