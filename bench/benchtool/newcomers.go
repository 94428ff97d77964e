package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"slices"
	"time"

	"cascata/auth"

	"github.com/jackc/pgx/v5/pgconn"
)

// cmdNewcomers logs in to projects PREFIX1..PREFIXn through the proxy one
// after another, each once, and runs `SELECT 1`: the login and the first
// query of a project with no backend yet (after the project's pool was
// dropped), timed apart. With -direct it also times a PostgreSQL login +
// `SELECT 1` after each, or only those (-only direct).
func cmdNewcomers(args []string) error {
	fs := flag.NewFlagSet("newcomers", flag.ContinueOnError)
	addr := fs.String("addr", "", "proxy host:port")
	prefix := fs.String("prefix", "p", "project refs are PREFIX1..PREFIXn")
	n := fs.Int("n", 100, "projects probed")
	role := fs.String("role", "authenticated", "role claim and user name")
	secretEnv := fs.String("secret-env", "", "env var holding the projects' HS256 secret")
	direct := fs.String("direct", "", "PostgreSQL URL timed the same way (optional)")
	only := fs.String("only", "", "proxy or direct: time that one alone")
	gap := fs.Duration("gap", 20*time.Millisecond, "pause after each probe")
	if err := fs.Parse(args); err != nil {
		return err
	}
	secret := os.Getenv(*secretEnv)
	switch {
	case *only != "direct" && (*addr == "" || secret == ""):
		return errors.New("-addr and a non-empty -secret-env are required")
	case *only == "direct" && *direct == "":
		return errors.New("-only direct needs -direct")
	}
	var directCfg *pgconn.Config
	if *direct != "" && *only != "proxy" {
		var err error
		if directCfg, err = pgconn.ParseConfig(*direct); err != nil {
			return fmt.Errorf("-direct: %w", err)
		}
	}
	ctx := context.Background()
	var proxyRes, directRes loginTimes
	for i := 1; i <= *n; i++ {
		if *only != "direct" {
			ref := fmt.Sprintf("%s%d", *prefix, i)
			tok, err := auth.Mint(auth.MintKey{Secret: []byte(secret)}, map[string]any{"role": *role, "ref": ref, "sub": "newcomer"}, time.Hour)
			if err != nil {
				return err
			}
			cfg, err := connConfig(*addr, ref, *role, tok)
			if err != nil {
				return err
			}
			if err := proxyRes.probe(ctx, cfg); err != nil {
				return fmt.Errorf("project %s: %w", ref, err)
			}
		}
		if directCfg != nil {
			if err := directRes.probe(ctx, directCfg); err != nil {
				return fmt.Errorf("direct: %w", err)
			}
		}
		time.Sleep(*gap)
	}
	proxyRes.print("proxy")
	directRes.print("direct")
	return nil
}

// loginTimes are the login and first-query times of probes.
type loginTimes struct{ login, query []time.Duration }

func (l *loginTimes) probe(ctx context.Context, cfg *pgconn.Config) error {
	t0 := time.Now()
	c, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer func() { _ = c.Close(context.WithoutCancel(ctx)) }()
	t1 := time.Now()
	if _, err := c.Exec(ctx, "SELECT 1").ReadAll(); err != nil {
		return err
	}
	l.login = append(l.login, t1.Sub(t0))
	l.query = append(l.query, time.Since(t1))
	return nil
}

func (l *loginTimes) print(name string) {
	if len(l.login) == 0 {
		return
	}
	ms := func(d []time.Duration, q float64) float64 {
		s := slices.Clone(d)
		slices.Sort(s)
		i := min(len(s)-1, max(0, int(q*float64(len(s))+0.5)-1)) // nearest rank
		return float64(s[i].Microseconds()) / 1000
	}
	fmt.Printf("%s_probes=%d %s_login_p50_ms=%.2f %s_login_p99_ms=%.2f %s_first_query_p50_ms=%.2f %s_first_query_p99_ms=%.2f\n",
		name, len(l.login), name, ms(l.login, 0.5), name, ms(l.login, 0.99), name, ms(l.query, 0.5), name, ms(l.query, 0.99))
}
