package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"cascata/auth"

	"github.com/jackc/pgx/v5/pgconn"
)

// clkTck is USER_HZ, the unit of utime/stime in /proc/<pid>/stat (100 on
// every Linux architecture Go supports).
const clkTck = 100

// cpuSeconds returns utime+stime of a process in seconds.
func cpuSeconds(pid int) (float64, error) {
	st, err := readProcStat(pid)
	if err != nil {
		return 0, err
	}
	return float64(st.ticks) / clkTck, nil
}

// procStat is what the bench reads of /proc/<pid>/stat.
type procStat struct {
	comm  string
	ppid  int
	ticks int64 // utime + stime, in 1/clkTck s
}

func readProcStat(pid int) (procStat, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procStat{}, err
	}
	s := string(b)
	open, end := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')') // comm may hold spaces
	if open < 0 || end < open {
		return procStat{}, errors.New("bad /proc stat")
	}
	f := strings.Fields(s[end+1:])
	// After comm: state is field 3, ppid field 4, utime field 14, stime field 15.
	if len(f) < 13 {
		return procStat{}, errors.New("short /proc stat")
	}
	ppid, err0 := strconv.Atoi(f[1])
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err0, err1, err2); err != nil {
		return procStat{}, err
	}
	return procStat{comm: s[open+1 : end], ppid: ppid, ticks: ut + st}, nil
}

// rssKB returns VmRSS of a process in KiB.
func rssKB(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
		}
	}
	return 0, errors.New("no VmRSS")
}

// goMem reads the Go heap and stack in use from a Prometheus endpoint.
func goMem(url, token string) (int64, bool) {
	if url == "" {
		return 0, false
	}
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return 0, false
	}
	req.Header.Set("Authorization", "Bearer "+token)
	cl := http.Client{Timeout: 10 * time.Second}
	resp, err := cl.Do(req)
	if err != nil {
		return 0, false
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		return 0, false
	}
	var total float64
	found := 0
	for _, line := range strings.Split(string(body), "\n") {
		for _, name := range []string{"go_memstats_heap_inuse_bytes ", "go_memstats_stack_inuse_bytes "} {
			if rest, ok := strings.CutPrefix(line, name); ok {
				if v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64); err == nil {
					total += v
					found++
				}
			}
		}
	}
	return int64(total), found == 2
}

// connConfig builds a pgconn config for a proxy address.
func connConfig(addr, db, user, password string) (*pgconn.Config, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	cfg, err := pgconn.ParseConfig(fmt.Sprintf("host=%s port=%s dbname=%s user=%s sslmode=disable connect_timeout=30", host, port, db, user))
	if err != nil {
		return nil, err
	}
	cfg.Password = password
	return cfg, nil
}

// parallel runs f(i) for i in [0,n) on `workers` goroutines and returns the
// number of failures and the first error.
func parallel(n, workers int, f func(i int) error) (int64, error) {
	var (
		next, fails atomic.Int64
		once        sync.Once
		first       error
		wg          sync.WaitGroup
	)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := f(i); err != nil {
					fails.Add(1)
					once.Do(func() { first = err })
				}
			}
		}()
	}
	wg.Wait()
	return fails.Load(), first
}

// cmdLoad opens n connections through the proxy, each with its own JWT
// (-distinct) or all with one, then runs `SELECT 1` (simple protocol) in a
// loop on every connection for -dur and reports throughput and the proxy's
// CPU time during the timed phase.
func cmdLoad(args []string) error {
	fs := flag.NewFlagSet("load", flag.ContinueOnError)
	addr := fs.String("addr", "", "proxy host:port")
	db := fs.String("db", "", "project ref (database name)")
	role := fs.String("role", "authenticated", "role claim and user name")
	secretEnv := fs.String("secret-env", "", "env var holding the project's HS256 secret")
	n := fs.Int("n", 1000, "connections")
	dur := fs.Duration("dur", 15*time.Second, "timed phase")
	distinct := fs.Bool("distinct", false, "one token (sub claim) per connection instead of one shared token")
	pid := fs.Int("pid", 0, "proxy pid to measure")
	workers := fs.Int("connect-workers", 32, "parallel connects")
	if err := fs.Parse(args); err != nil {
		return err
	}
	secret := os.Getenv(*secretEnv)
	if *addr == "" || *db == "" || secret == "" {
		return errors.New("-addr, -db and a non-empty -secret-env are required")
	}
	tokens := make([]string, *n)
	for i := range tokens {
		if i > 0 && !*distinct {
			tokens[i] = tokens[0]
			continue
		}
		tok, err := auth.Mint(auth.MintKey{Secret: []byte(secret)},
			map[string]any{"role": *role, "ref": *db, "sub": fmt.Sprintf("00000000-0000-4000-8000-%012d", i)}, 2*time.Hour)
		if err != nil {
			return err
		}
		tokens[i] = tok
	}
	ctx := context.Background()
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
		cfg, err := connConfig(*addr, *db, *role, tokens[i])
		if err != nil {
			return err
		}
		c, err := pgconn.ConnectConfig(ctx, cfg)
		if err != nil {
			return err
		}
		conns[i] = c
		return nil
	})
	connectSecs := time.Since(t0).Seconds()
	fmt.Printf("connections=%d\nconnect_failures=%d\nconnect_secs=%.3f\nconnects_per_sec=%.1f\n", *n, fails, connectSecs, float64(*n)/connectSecs)
	if first != nil {
		fmt.Printf("connect_first_error=%q\n", first.Error())
		if fails == int64(*n) {
			return fmt.Errorf("no connection: %w", first)
		}
	}

	var cpu0, cpu1 float64
	if *pid > 0 {
		cpu0, _ = cpuSeconds(*pid)
	}
	var (
		txns, errs atomic.Int64
		once       sync.Once
		firstErr   error
		wg         sync.WaitGroup
	)
	start := time.Now()
	deadline := start.Add(*dur)
	for _, c := range conns {
		if c == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			var local int64
			for time.Now().Before(deadline) {
				_, err := c.Exec(ctx, "SELECT 1").ReadAll()
				if err != nil {
					errs.Add(1)
					once.Do(func() { firstErr = err })
					if c.IsClosed() {
						break
					}
					continue
				}
				local++
			}
			txns.Add(local)
		}()
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	if *pid > 0 {
		cpu1, _ = cpuSeconds(*pid)
	}
	t := txns.Load()
	live := int64(*n) - fails
	fmt.Printf("transactions=%d\nerrors=%d\nelapsed_secs=%.3f\ntps=%.1f\n", t, errs.Load(), elapsed, float64(t)/elapsed)
	if t > 0 {
		fmt.Printf("latency_ms=%.3f\n", elapsed*1000*float64(live)/float64(t))
	}
	if *pid > 0 {
		fmt.Printf("proxy_cpu_secs=%.2f\n", cpu1-cpu0)
		if t > 0 {
			fmt.Printf("proxy_cpu_per_1k=%.4f\n", (cpu1-cpu0)*1000/float64(t))
		}
	}
	if firstErr != nil {
		fmt.Printf("first_error=%q\n", firstErr.Error())
	}
	return nil
}
