package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// idleStatements are what an ORM typically keeps prepared: the same texts
// on every client connection.
var idleStatements = []string{
	"SELECT abalance FROM pgbench_accounts WHERE aid = $1",
	"SELECT bbalance FROM pgbench_branches WHERE bid = $1",
	"SELECT tbalance FROM pgbench_tellers WHERE tid = $1",
	"SELECT aid, bid, abalance FROM pgbench_accounts WHERE aid BETWEEN $1 AND $1 + 10",
	"SELECT count(*) FROM pgbench_tellers WHERE bid = $1",
	"UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
	"UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2",
	"UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2",
	"INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
	"SELECT aid, abalance FROM pgbench_accounts WHERE aid = ANY($1::int[])",
}

// cmdIdle opens n client connections, measures the proxy's memory, has
// each prepare -stmts named statements, measures again, checks a sample of
// connections can execute their statements, and reports per-client memory.
func cmdIdle(args []string) error {
	fs := flag.NewFlagSet("idle", flag.ContinueOnError)
	addr := fs.String("addr", "", "proxy host:port")
	db := fs.String("db", "", "database (project ref)")
	user := fs.String("user", "", "user name")
	password := fs.String("password", "", "password (JWT); or -password-env")
	passwordEnv := fs.String("password-env", "", "env var holding the password")
	n := fs.Int("n", 5000, "client connections")
	stmts := fs.Int("stmts", 10, "named prepared statements per connection (at most 10)")
	pid := fs.Int("pid", 0, "proxy pid whose VmRSS is measured")
	metricsURL := fs.String("metrics-url", "", "proxy /metrics URL for the Go heap (optional)")
	metricsTokenEnv := fs.String("metrics-token-env", "", "env var holding the bearer token of -metrics-url")
	workers := fs.Int("workers", 32, "parallel connects/prepares")
	settle := fs.Duration("settle", 2*time.Second, "pause before each memory reading")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *passwordEnv != "" {
		*password = os.Getenv(*passwordEnv)
	}
	if *addr == "" || *pid == 0 || *stmts > len(idleStatements) {
		return errors.New("-addr and -pid are required; -stmts at most 10")
	}
	mtoken := os.Getenv(*metricsTokenEnv)
	ctx := context.Background()
	cfg, err := connConfig(*addr, *db, *user, *password)
	if err != nil {
		return err
	}
	// Warm up: backends open, statements known to the backend caches.
	warm, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("warm-up connect: %w", err)
	}
	for j := 0; j < *stmts; j++ {
		if _, err := warm.Prepare(ctx, fmt.Sprintf("s%d", j), idleStatements[j], nil); err != nil {
			return fmt.Errorf("warm-up prepare: %w", err)
		}
	}
	_ = warm.Close(ctx)

	type reading struct {
		rss      int64
		heap     int64
		heapSeen bool
	}
	read := func() reading {
		time.Sleep(*settle)
		r := reading{}
		r.rss, _ = rssKB(*pid)
		r.heap, r.heapSeen = goMem(*metricsURL, mtoken)
		return r
	}
	r0 := read()
	conns := make([]*pgconn.PgConn, *n)
	defer func() {
		for _, c := range conns {
			if c != nil {
				_ = c.Close(ctx)
			}
		}
	}()
	t0 := time.Now()
	fails, first := parallel(*n, *workers, func(i int) error {
		c, err := pgconn.ConnectConfig(ctx, cfg.Copy())
		if err != nil {
			return err
		}
		conns[i] = c
		return nil
	})
	connectSecs := time.Since(t0).Seconds()
	if first != nil {
		fmt.Printf("connect_first_error=%q\n", first.Error())
	}
	live := int64(*n) - fails
	if live == 0 {
		return fmt.Errorf("no connection: %w", first)
	}
	r1 := read()
	var prepSecs float64
	var pfails int64
	if *stmts > 0 {
		t1 := time.Now()
		pfails, first = parallel(*n, *workers, func(i int) error {
			c := conns[i]
			if c == nil {
				return nil
			}
			for j := 0; j < *stmts; j++ {
				if _, err := c.Prepare(ctx, fmt.Sprintf("s%d", j), idleStatements[j], nil); err != nil {
					return err
				}
			}
			return nil
		})
		prepSecs = time.Since(t1).Seconds()
		if first != nil {
			fmt.Printf("prepare_first_error=%q\n", first.Error())
		}
	}
	r2 := read()
	// The statements are really held: every 50th client executes its s0.
	var checks, cfails int64
	if *stmts > 0 {
		for i := 0; i < *n; i += 50 {
			if conns[i] == nil {
				continue
			}
			checks++
			res := conns[i].ExecPrepared(ctx, "s0", [][]byte{[]byte(fmt.Sprint(i%1000 + 1))}, nil, nil).Read()
			if res.Err != nil {
				cfails++
				if cfails == 1 {
					fmt.Printf("check_first_error=%q\n", res.Err.Error())
				}
			}
		}
	}
	per := func(a, b int64, div int64) float64 { return float64(b-a) / float64(div) }
	fmt.Printf("clients=%d\nconnect_failures=%d\nconnect_secs=%.2f\nstmts=%d\nprepare_failures=%d\nprepare_secs=%.2f\n", *n, fails, connectSecs, *stmts, pfails, prepSecs)
	fmt.Printf("rss_before_kb=%d\nrss_connected_kb=%d\nrss_prepared_kb=%d\n", r0.rss, r1.rss, r2.rss)
	fmt.Printf("rss_per_client_bytes=%.0f\n", per(r0.rss*1024, r1.rss*1024, live))
	fmt.Printf("rss_per_client_with_stmts_bytes=%.0f\n", per(r0.rss*1024, r2.rss*1024, live))
	if *stmts > 0 {
		fmt.Printf("rss_per_stmt_bytes=%.0f\n", per(r1.rss*1024, r2.rss*1024, live*int64(*stmts)))
	}
	if r0.heapSeen && r1.heapSeen && r2.heapSeen {
		fmt.Printf("go_inuse_per_client_bytes=%.0f\n", per(r0.heap, r1.heap, live))
		fmt.Printf("go_inuse_per_client_with_stmts_bytes=%.0f\n", per(r0.heap, r2.heap, live))
	}
	fmt.Printf("exec_checks=%d\nexec_check_failures=%d\n", checks, cfails)
	return nil
}
