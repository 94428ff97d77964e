package pgcluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// ErrNoBinaries is wrapped by the error FindBinaries (and Start) return when
// the PostgreSQL server programs cannot be found.
var ErrNoBinaries = errors.New("postgresql server binaries not found: install them with `apt-get install -y postgresql`")

// Binaries holds absolute paths of the PostgreSQL server programs.
type Binaries struct {
	// Dir is the directory the programs were found in; empty when they were
	// found one by one on PATH.
	Dir string
	// Initdb is the path of initdb.
	Initdb string
	// Postgres is the path of the postgres server.
	Postgres string
	// PgCtl is the path of pg_ctl.
	PgCtl string
	// PgBasebackup is the path of pg_basebackup.
	PgBasebackup string
}

var requiredPrograms = []string{"initdb", "postgres", "pg_ctl", "pg_basebackup"}

// FindBinaries locates initdb, postgres, pg_ctl and pg_basebackup: in the
// directory printed by `pg_config --bindir` when pg_config exists, else in
// the highest-versioned /usr/lib/postgresql/*/bin holding initdb, else on
// PATH. The error wraps ErrNoBinaries when some program is missing.
func FindBinaries(ctx context.Context) (*Binaries, error) {
	var missing []string
	if pgConfig, err := exec.LookPath("pg_config"); err == nil {
		out, err := exec.CommandContext(ctx, pgConfig, "--bindir").Output()
		if err == nil {
			dir := strings.TrimSpace(string(out))
			if isExecutable(filepath.Join(dir, "initdb")) {
				b, miss := binariesIn(dir)
				if b != nil {
					return b, nil
				}
				missing = miss
			}
		} else if ctx.Err() != nil {
			return nil, fmt.Errorf("pg_config --bindir: %w", ctx.Err())
		}
	}
	if missing == nil {
		if dir := highestDebianBinDir(); dir != "" {
			b, miss := binariesIn(dir)
			if b != nil {
				return b, nil
			}
			missing = miss
		}
	}
	if missing == nil {
		b := &Binaries{}
		dst := []*string{&b.Initdb, &b.Postgres, &b.PgCtl, &b.PgBasebackup}
		for i, name := range requiredPrograms {
			p, err := exec.LookPath(name)
			if err != nil {
				missing = append(missing, name)
				continue
			}
			abs, err := filepath.Abs(p)
			if err != nil {
				return nil, fmt.Errorf("find %s: %w", name, err)
			}
			*dst[i] = abs
		}
		if missing == nil {
			return b, nil
		}
	}
	return nil, fmt.Errorf("missing %s: %w", strings.Join(missing, ", "), ErrNoBinaries)
}

// binariesIn returns the programs in dir, or nil and the missing names.
func binariesIn(dir string) (*Binaries, []string) {
	b := &Binaries{Dir: dir}
	dst := []*string{&b.Initdb, &b.Postgres, &b.PgCtl, &b.PgBasebackup}
	var missing []string
	for i, name := range requiredPrograms {
		p := filepath.Join(dir, name)
		if !isExecutable(p) {
			missing = append(missing, name)
			continue
		}
		*dst[i] = p
	}
	if missing != nil {
		return nil, missing
	}
	return b, nil
}

// highestDebianBinDir returns the /usr/lib/postgresql/<version>/bin with the
// highest version that contains initdb, or "".
func highestDebianBinDir() string {
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	type cand struct {
		dir string
		ver float64
	}
	var cands []cand
	for _, m := range matches {
		v, err := strconv.ParseFloat(filepath.Base(filepath.Dir(m)), 64)
		if err != nil || !isExecutable(filepath.Join(m, "initdb")) {
			continue
		}
		cands = append(cands, cand{m, v})
	}
	if len(cands) == 0 {
		return ""
	}
	sort.Slice(cands, func(i, j int) bool { return cands[i].ver > cands[j].ver })
	return cands[0].dir
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0
}
