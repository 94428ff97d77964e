package archive

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestChildEnvironment samples /proc/<pid>/environ of the pg_dump and
// pg_restore processes an export and an import start, while they run: they
// must hold nothing of this process's environment but PATH, and no secret.
func TestChildEnvironment(t *testing.T) {
	secrets := map[string]string{
		"CASCATA_ADMIN_TOKEN":    "admin-token-must-not-leak",
		"CASCATA_LOGIN_PASSWORD": "login-password-must-not-leak",
		"OTHER_JWT_SECRET":       "other-project-jwt-secret-must-not-leak",
		"PGPASSWORD":             "inherited-pgpassword-must-not-leak",
		"PGHOST":                 "inherited-pghost.invalid",
	}
	for k, v := range secrets {
		t.Setenv(k, v)
	}
	p := testProject(t, "envcheck", `
CREATE TABLE public.payload (id int PRIMARY KEY, v text NOT NULL);
INSERT INTO public.payload SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 100000) g;`)

	s := startSampler(t)
	path, _ := exportTo(t, p, CompressionNone)
	tg := newTarget(t, "envcheck_in")
	opts := tg.options(path)
	opts.Ref = "envcheck_in"
	res, err := Import(t.Context(), opts, nil)
	if err != nil {
		t.Fatal(err)
	}
	samples := s.stop()

	allowed := []string{"PATH", "LC_ALL", "LANG", "PGCONNECT_TIMEOUT", "PGPASSWORD"}
	seen := map[string]int{}
	for _, smp := range samples {
		seen[smp.comm]++
		for _, kv := range smp.env {
			k, v, _ := strings.Cut(kv, "=")
			if !slices.Contains(allowed, k) {
				t.Errorf("%s has %s in its environment", smp.comm, k)
			}
			for name, secret := range secrets {
				if strings.Contains(v, secret) {
					t.Errorf("%s's environment holds the value of %s", smp.comm, name)
				}
			}
			if k == "PGPASSWORD" && smp.comm == "pg_restore" {
				// The restore's one connection is the new owner role's.
				if !strings.Contains(res.Project.OwnerURL, ":"+v+"@") {
					t.Errorf("pg_restore's PGPASSWORD is not its connection's password")
				}
			}
		}
	}
	if seen["pg_dump"] == 0 || seen["pg_restore"] == 0 {
		t.Fatalf("sampled %v: want pg_dump and pg_restore seen running", seen)
	}
	t.Logf("environments sampled: %v", seen)
}

// envSample is one child's environment as /proc showed it.
type envSample struct {
	comm string
	env  []string
}

// sampler polls /proc for pg_dump and pg_restore processes that descend
// from this test process and records their environment.
type sampler struct {
	done    chan struct{}
	wg      sync.WaitGroup
	mu      sync.Mutex
	samples []envSample
}

func startSampler(t *testing.T) *sampler {
	s := &sampler{done: make(chan struct{})}
	self := os.Getpid()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for {
			s.scan(self)
			select {
			case <-s.done:
				return
			case <-tick.C:
			}
		}
	}()
	t.Cleanup(func() { s.stop() })
	return s
}

func (s *sampler) stop() []envSample {
	select {
	case <-s.done:
	default:
		close(s.done)
	}
	s.wg.Wait()
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.samples)
}

func (s *sampler) scan(self int) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		comm, ppid, ok := procStat(pid)
		if !ok || (comm != "pg_dump" && comm != "pg_restore") {
			continue
		}
		// Its parent is this process, or a pg_dump/pg_restore worker's parent is.
		if ppid != self {
			if _, gp, ok := procStat(ppid); !ok || gp != self {
				continue
			}
		}
		raw, err := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if err != nil || len(raw) == 0 {
			continue
		}
		var env []string
		for _, kv := range bytes.Split(bytes.TrimRight(raw, "\x00"), []byte{0}) {
			env = append(env, string(kv))
		}
		s.mu.Lock()
		s.samples = append(s.samples, envSample{comm: comm, env: env})
		s.mu.Unlock()
	}
}

// procStat returns a process's command name and parent pid.
func procStat(pid int) (string, int, bool) {
	raw, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return "", 0, false
	}
	lp, rp := bytes.IndexByte(raw, '('), bytes.LastIndexByte(raw, ')')
	if lp < 0 || rp < lp {
		return "", 0, false
	}
	fields := strings.Fields(string(raw[rp+1:]))
	if len(fields) < 2 {
		return "", 0, false
	}
	ppid, err := strconv.Atoi(fields[1])
	if err != nil {
		return "", 0, false
	}
	return string(raw[lp+1 : rp]), ppid, true
}

// TestNoSecretInPlaintext: no byte sequence of the archive outside
// secrets.enc holds a password or a JWT secret of the project.
func TestNoSecretInPlaintext(t *testing.T) {
	p := testProject(t, "plaintext", "CREATE TABLE public.t (id int PRIMARY KEY); INSERT INTO public.t VALUES (1);")
	p.RoleLogins = map[string]string{"service_role": src.Primary.URL("service_role", "role-login-pw-must-not-leak", "plaintext")}
	p.ReplicaURLs = []string{src.Primary.URL("authenticator", "replica-pw-must-not-leak", "plaintext")}
	path, m := exportTo(t, p, CompressionNone)
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range []string{"role-login-pw-must-not-leak", "replica-pw-must-not-leak", "src-login-pw", p.JWTSecret} {
		if bytes.Contains(raw, []byte(secret)) {
			t.Errorf("the archive holds %q in plaintext", secret)
		}
	}
	if got := string(m.Project.Settings["role_logins"]); !strings.Contains(got, "service_role:xxxxx@") {
		t.Errorf("role_logins in the manifest = %s, want the URL with its password replaced", got)
	}
}
