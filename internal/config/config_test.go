package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const minimal = `
[[projects]]
ref = "demo"
database_url = "postgres://authenticator:pw@127.0.0.1:5432/demo"
jwt_secret = "0123456789abcdef0123456789abcdef"
`

func TestDefaults(t *testing.T) {
	c, err := Parse([]byte(minimal))
	if err != nil {
		t.Fatal(err)
	}
	p := c.Proxy
	if p.Listen != "127.0.0.1:6432" || p.PoolMode != PoolModeTransaction || p.MaxClientConn != 10000 ||
		p.MaxServerConnPerHost != 90 || p.QueryWaitTimeout.Duration != 30*time.Second || p.MaxPreparedStatements != 200 ||
		p.AllowCleartextWithoutTLS != "loopback" {
		t.Fatalf("proxy defaults: %+v", p)
	}
	pr := c.Projects[0]
	if pr.PoolSize != 20 || pr.MaxPinned != 5 || pr.RoleClaim != "role" || len(pr.Roles) != 3 || pr.Consistency != "read_your_writes" ||
		pr.MaxReplicaLag.Duration != time.Second || pr.StorageDir != ".cascata/storage/demo" {
		t.Fatalf("project defaults: %+v", pr)
	}
}

// Every problem is reported at once, each with its key path.
func TestProblems(t *testing.T) {
	_, err := Parse([]byte(`
[proxy]
pool_mode = "statement"
listen = "nowhere"
unknown_key = 1

[admin]
cors_origins = ["*"]
eject_allowed_hosts = ["db.example.com", "user@evil"]

[provision]
extensions = ["pgcrypto", ""]

[[projects]]
ref = "Bad-Ref"
database_url = "mysql://x"
anon_role = "ghost"
role_logins = { nobody = "postgres://nobody@h/db" }

[[projects]]
ref = "twin"
database_url = "postgres://a@h/db"
jwt_secret = "s"
storage_url = "http://bucket/x"
storage_dir = "/tmp/x"
s3_endpoint = "ftp://x"
s3_access_key_env = "CASCATA_TEST_UNSET_S3_KEY"

[[projects]]
ref = "twin"
database_url = "postgres://a@h/db"
jwt_secret = "s"
pool_size = 4
max_pinned = 5
`))
	var ps Problems
	if !errors.As(err, &ps) {
		t.Fatalf("want Problems, got %v", err)
	}
	text := ps.Error()
	for _, want := range []string{
		"proxy.unknown_key: unknown key",
		"proxy.pool_mode: must be",
		"proxy.listen: not host:port",
		"admin.cors_origins[0]",
		`admin.eject_allowed_hosts[1]: must be a host name or host:port, not "user@evil"`,
		"provision.extensions[1]: must be an extension name",
		`projects[0] (Bad-Ref).ref: must match`,
		`projects[0] (Bad-Ref).database_url: must start with postgres://`,
		`projects[0] (Bad-Ref).jwt_secret_env: one of jwt_secret`,
		`projects[0] (Bad-Ref).anon_role: "ghost" is not in roles`,
		`projects[0] (Bad-Ref).role_logins.nobody: "nobody" is not in roles`,
		`projects[2] (twin).ref: duplicate of projects[1]`,
		`projects[2] (twin).max_pinned: must be between 1 and pool_size (4), not 5`,
		`projects[1] (twin).storage_url: must be s3://bucket/prefix`,
		`projects[1] (twin).storage_dir: storage_dir and storage_url exclude each other`,
		`projects[1] (twin).s3_endpoint: must be an http(s):// URL`,
		`projects[1] (twin).s3_access_key_env: environment variable CASCATA_TEST_UNSET_S3_KEY is empty or unset`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("missing problem %q in:\n%s", want, text)
		}
	}
}

func TestSecretsFromEnvAndFile(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "secret")
	if err := os.WriteFile(file, []byte("from-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("CASCATA_TEST_SECRET", "from-env")
	c, err := Parse([]byte(`
[[projects]]
ref = "p"
database_url = "postgres://a:pw@h/db"
jwt_secret_env = "CASCATA_TEST_SECRET"
jwt_secret_file = "` + file + `"
`))
	if err != nil {
		t.Fatal(err)
	}
	got, err := c.Projects[0].JWTSecrets()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || string(got[0]) != "from-env" || string(got[1]) != "from-file" {
		t.Fatalf("secrets %q", got)
	}
	if r := RedactURL("postgres://a:secret@h/db"); strings.Contains(r, "secret") {
		t.Fatalf("password in %s", r)
	}
}
