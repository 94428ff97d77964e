package pgcluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// runner runs the PostgreSQL programs, as the "postgres" OS user when the
// current process is root.
type runner struct {
	cred *syscall.Credential // nil: run as the current user
	uid  int
	gid  int
	home string // working directory and HOME of the programs
}

// newRunner returns a runner for the current effective user.
func newRunner(home string) (*runner, error) {
	r := &runner{uid: -1, gid: -1, home: home}
	if os.Geteuid() != 0 {
		return r, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("running as root needs the postgres os user (install with `apt-get install -y postgresql`): %w", err)
	}
	uid, err := strconv.Atoi(u.Uid)
	if err != nil {
		return nil, fmt.Errorf("postgres uid %q: %w", u.Uid, err)
	}
	gid, err := strconv.Atoi(u.Gid)
	if err != nil {
		return nil, fmt.Errorf("postgres gid %q: %w", u.Gid, err)
	}
	r.uid, r.gid = uid, gid
	r.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	return r, nil
}

// command builds a command for a PostgreSQL program. PG* variables of the
// current environment are dropped so they cannot redirect the programs.
func (r *runner) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = r.home
	env := []string{"LC_ALL=C", "HOME=" + r.home}
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "PG") || strings.HasPrefix(kv, "LC_") ||
			strings.HasPrefix(kv, "LANG=") || strings.HasPrefix(kv, "HOME=") {
			continue
		}
		env = append(env, kv)
	}
	cmd.Env = env
	if r.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: r.cred}
	}
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// run runs a program and returns its combined output; the error includes
// the tail of that output.
func (r *runner) run(ctx context.Context, name string, args ...string) ([]byte, error) {
	var out bytes.Buffer
	cmd := r.command(ctx, name, args...)
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Run(); err != nil {
		return out.Bytes(), fmt.Errorf("%s: %w: %s", filepath.Base(name), err, tailLines(out.String(), 15))
	}
	return out.Bytes(), nil
}

// exitCode returns the exit status of a finished program, or -1.
func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	return -1
}

// chown gives path to the user the programs run as (no-op when not root).
func (r *runner) chown(path string) error {
	if r.cred == nil {
		return nil
	}
	if err := os.Lchown(path, r.uid, r.gid); err != nil {
		return fmt.Errorf("chown %s: %w", path, err)
	}
	return nil
}

// writeFile writes a file readable by the server and owned by its user.
func (r *runner) writeFile(path string, data []byte) error {
	if err := os.WriteFile(path, data, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", filepath.Base(path), err)
	}
	return r.chown(path)
}

// mkdir creates dir (mode 0700) owned by the server user if it is missing.
func (r *runner) mkdir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	return r.chown(dir)
}

// checkTraversable verifies that the server user can reach dir: every
// ancestor must be searchable by it.
func (r *runner) checkTraversable(dir string) error {
	if r.cred == nil {
		return nil
	}
	for p := filepath.Dir(dir); ; p = filepath.Dir(p) {
		fi, err := os.Stat(p)
		if err != nil {
			return fmt.Errorf("stat %s: %w", p, err)
		}
		perm := fi.Mode().Perm()
		ok := perm&0o001 != 0
		if st, isStat := fi.Sys().(*syscall.Stat_t); isStat {
			ok = ok || (int(st.Uid) == r.uid && perm&0o100 != 0) || (int(st.Gid) == r.gid && perm&0o010 != 0)
		}
		if !ok {
			return fmt.Errorf("cluster dir %s: parent %s is not searchable by the postgres os user (chmod o+x it or use another dir)", dir, p)
		}
		if p == filepath.Dir(p) {
			return nil
		}
	}
}

// tailLines returns the last n lines of s, trimmed.
func tailLines(s string, n int) string {
	s = strings.TrimRight(s, "\n")
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
