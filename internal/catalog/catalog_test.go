package catalog_test

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"cascata/internal/catalog"
	"cascata/internal/config"
)

const secret = "catalog-test-secret-catalog-test-secret"

func fileConfig(t *testing.T, projects string) *config.Config {
	t.Helper()
	cfg, err := config.Parse([]byte(projects))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

const twoProjects = `
[[projects]]
ref = "a"
database_url = "postgres://authenticator:pw@127.0.0.1:5432/a"
jwt_secret = "` + secret + `"

[[projects]]
ref = "b"
database_url = "postgres://authenticator:pw@127.0.0.1:5432/b"
jwt_secret = "` + secret + `"
`

// applied records every set put in force.
type applied struct {
	sets [][]config.Project
	fail error
}

func (a *applied) apply(ps []config.Project) error {
	if a.fail != nil {
		return a.fail
	}
	a.sets = append(a.sets, slices.Clone(ps))
	return nil
}

func (a *applied) last() map[string]config.Project {
	m := map[string]config.Project{}
	for _, p := range a.sets[len(a.sets)-1] {
		m[p.Ref] = p
	}
	return m
}

func open(t *testing.T, dir string, text string, ap *applied) *catalog.Catalog {
	t.Helper()
	c, err := catalog.Open(catalog.Options{Dir: dir, Config: fileConfig(t, text), File: []byte(text), Apply: ap.apply})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestRuntimeChangesSurviveReopen(t *testing.T) {
	dir := t.TempDir()
	ap := &applied{}
	c := open(t, dir, twoProjects, ap)
	if got := ap.last(); len(got) != 2 {
		t.Fatalf("initial set: %v", got)
	}
	// Add a run-time project (gets the file's defaults), change a, delete b.
	np, err := c.Add(config.Project{Ref: "c", DatabaseURL: "postgres://authenticator:pw@127.0.0.1:5432/c", JWTSecret: secret}, "api")
	if err != nil {
		t.Fatal(err)
	}
	if np.PoolSize != 20 || np.RoleClaim != "role" || len(np.Roles) != 3 || np.PoolMode != "transaction" {
		t.Fatalf("defaults not applied: %+v", np)
	}
	if _, err := c.Add(config.Project{Ref: "a", DatabaseURL: "postgres://x@h/a", JWTSecret: secret}, "api"); !errors.Is(err, catalog.ErrExists) {
		t.Fatalf("duplicate add: %v", err)
	}
	if _, err := c.Change("a", "eject", func(p *config.Project) error {
		p.DatabaseURL = "postgres://authenticator:pw@127.0.0.1:5499/a"
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := c.Remove("b", "api"); err != nil {
		t.Fatal(err)
	}
	if err := c.Remove("b", "api"); !errors.Is(err, catalog.ErrNotFound) {
		t.Fatalf("remove twice: %v", err)
	}
	want := func(ap *applied) {
		t.Helper()
		got := ap.last()
		if len(got) != 2 || got["a"].DatabaseURL != "postgres://authenticator:pw@127.0.0.1:5499/a" || got["c"].Ref != "c" {
			t.Fatalf("set: %+v", got)
		}
	}
	want(ap)
	if e, _ := c.Project("a"); e.Source != catalog.SourceRuntime || e.Reason != "eject" {
		t.Fatalf("entry a: %+v", e)
	}
	info, err := os.Stat(filepath.Join(dir, "catalog.json"))
	if err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("state file: %v %v", info, err)
	}

	// A new process with the same file sees the same set.
	ap2 := &applied{}
	c2 := open(t, dir, twoProjects, ap2)
	want(ap2)
	if len(c2.Projects()) != 2 {
		t.Fatal(c2.Projects())
	}

	// A later version giving projects new defaults is not a change of the file.
	cfg := fileConfig(t, twoProjects)
	cfg.Projects[0].PoolSize = 33
	ap4 := &applied{}
	if _, err := catalog.Open(catalog.Options{Dir: dir, Config: cfg, File: []byte(twoProjects), Apply: ap4.apply}); err != nil {
		t.Fatal(err)
	}
	want(ap4)

	// The file changes project a: the file wins for a; b stays deleted, c stays.
	changed := strings.Replace(twoProjects, "ref = \"a\"\n", "ref = \"a\"\npool_size = 7\n", 1)
	ap3 := &applied{}
	c3 := open(t, dir, changed, ap3)
	got := ap3.last()
	if got["a"].DatabaseURL != "postgres://authenticator:pw@127.0.0.1:5432/a" || got["a"].PoolSize != 7 {
		t.Fatalf("file change did not win: %+v", got["a"])
	}
	if _, ok := got["b"]; ok || got["c"].Ref != "c" {
		t.Fatalf("set after file change: %+v", got)
	}
	// SetFile (SIGHUP) removing b from the file drops its deletion: nothing to serve.
	onlyA := changed[:strings.Index(changed, "[[projects]]\nref = \"b\"")]
	if err := c3.SetFile(fileConfig(t, onlyA), []byte(onlyA)); err != nil {
		t.Fatal(err)
	}
	if got := ap3.last(); len(got) != 2 || got["c"].Ref != "c" || got["a"].Ref != "a" {
		t.Fatalf("after SetFile: %+v", got)
	}
}

func TestRefusedChangeChangesNothing(t *testing.T) {
	dir := t.TempDir()
	ap := &applied{}
	c := open(t, dir, twoProjects, ap)
	ap.fail = errors.New("refused")
	if _, err := c.Change("a", "api", func(p *config.Project) error { p.PoolSize = 3; return nil }); err == nil {
		t.Fatal("change applied despite refusal")
	}
	ap.fail = nil
	if e, _ := c.Project("a"); e.Project.PoolSize != 20 || e.Source != catalog.SourceFile {
		t.Fatalf("a changed: %+v", e)
	}
	// Invalid projects are refused with config.Problems.
	_, err := c.Add(config.Project{Ref: "Bad-Ref", DatabaseURL: "mysql://x"}, "api")
	var ps config.Problems
	if !errors.As(err, &ps) || len(ps) < 2 {
		t.Fatalf("invalid project: %v", err)
	}
	if _, err := c.Change("a", "api", func(p *config.Project) error { p.Ref = "z"; return nil }); err == nil {
		t.Fatal("ref change accepted")
	}
	if _, err := os.Stat(filepath.Join(dir, "catalog.json")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("state written for refused changes: %v", err)
	}
}

func TestDamagedStateIsAnError(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "catalog.json"), []byte(`{"version":1,"overrides":[],"extra":1}`), 0o600); err != nil {
		t.Fatal(err)
	}
	ap := &applied{}
	if _, err := catalog.Open(catalog.Options{Dir: dir, Config: fileConfig(t, twoProjects), Apply: ap.apply}); err == nil {
		t.Fatal("damaged state accepted")
	}
}

func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	for _, s := range []string{"one", "two"} {
		if err := catalog.WriteFileAtomic(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		if b, _ := os.ReadFile(p); string(b) != s {
			t.Fatalf("content %q", b)
		}
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Fatalf("temp files left: %v", ents)
	}
}
