package pgtools

import (
	"context"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

func TestEnvHoldsOnlyTheConnection(t *testing.T) {
	t.Setenv("CASCATA_ADMIN_TOKEN", "admin-token")
	t.Setenv("PGPASSWORD", "inherited")
	t.Setenv("PGHOST", "inherited.invalid")
	t.Setenv("HOME", "/home/somebody")
	tg, err := ParseTarget("postgres://owner:s3cret@db.example.com:5433/app?sslmode=require&default_query_exec_mode=exec&sslpassword=keypw", "other")
	if err != nil {
		t.Fatal(err)
	}
	if tg.URL != "postgres://owner@db.example.com:5433/other?sslmode=require" {
		t.Errorf("URL = %s", tg.URL)
	}
	env := Env(tg)
	var keys []string
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		keys = append(keys, k)
	}
	slices.Sort(keys)
	if want := []string{"LANG", "LC_ALL", "PATH", "PGCONNECT_TIMEOUT", "PGPASSWORD"}; !slices.Equal(keys, want) {
		t.Errorf("keys = %v, want %v", keys, want)
	}
	if !slices.Contains(env, "PGPASSWORD=s3cret") {
		t.Errorf("env %v lacks the connection's password", env)
	}
	if e := Env(Target{}); slices.ContainsFunc(e, func(kv string) bool { return strings.HasPrefix(kv, "PG") }) {
		t.Errorf("a program without a connection gets %v", e)
	}

	// What a child really sees.
	sh, err := exec.LookPath("env")
	if err != nil {
		t.Fatal(err)
	}
	out, err := Output(context.Background(), Target{}, sh)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), "admin-token") || strings.Contains(string(out), "HOME=") {
		t.Errorf("child environment:\n%s", out)
	}
}
