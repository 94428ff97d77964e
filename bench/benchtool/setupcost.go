package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

// The statements cascata puts in front of a client's messages when the
// client's identity or settings differ from a backend's (proxy/setup.go,
// proxy/backend.go, proxy/settings.go), sent here without a proxy.
const (
	setupIdentSQL  = "SELECT pg_catalog.set_config('role', $1, false), pg_catalog.set_config('request.jwt.claims', $2, false), pg_catalog.set_config('request.jwt.claims_mac', $3, false)"
	setupSetSQL    = "SELECT pg_catalog.set_config($1, $2, false)"
	setupClaimsSQL = "SELECT pg_catalog.set_config('request.jwt.claims', $1, false), pg_catalog.set_config('request.jwt.claims_mac', $2, false)"
	setupRoleSQL   = "SELECT pg_catalog.set_config('role', $1, false)"
	setupGateName  = "cascata_gate_0123456789abcdef0123456789abcdef"
)

// setupModes are what goes in front of `SELECT 1`, by name.
var setupModes = []string{
	"select1",              // nothing
	"ident-parsed",         // the identity inline, parsed as the unnamed statement
	"ident-bound",          // the identity inline, bound to cs_ident
	"claims-bound",         // only the claims inline (the role unchanged), bound to cs_claims
	"role-bound",           // only the role inline, bound to cs_role
	"group-parsed",         // the identity in a group of its own (Sync, gate), parsed
	"group-bound",          // the same, bound to cs_ident
	"group-setting-parsed", // the group with the identity bound and one setting parsed
	"group-setting-bound",  // the same with the setting bound to cs_set
}

// cmdSetupCost measures what the statements cascata sends for a switch of
// identity or settings cost PostgreSQL: n connections (no proxy) send
// `SELECT 1` with each mode's messages in front, a new identity every
// time, for dur per mode and round, and the PostgreSQL processes' CPU time
// (/proc) is divided by the transactions.
func cmdSetupCost(args []string) error {
	fs := flag.NewFlagSet("setup-cost", flag.ContinueOnError)
	url := fs.String("url", "", "PostgreSQL URL of a login that may SET ROLE authenticated")
	n := fs.Int("n", 32, "connections")
	dur := fs.Duration("dur", 6*time.Second, "length of each mode in each round")
	rounds := fs.Int("rounds", 3, "rounds (every mode in turn)")
	modes := fs.String("modes", strings.Join(setupModes, ","), "modes, comma-separated")
	postmaster := fs.Int("postmaster", 0, "PID of the postmaster whose processes are counted (0: every process named postgres)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *url == "" {
		return errors.New("-url is required")
	}
	list := strings.Split(*modes, ",")
	for _, m := range list {
		if !slices.Contains(setupModes, m) {
			return fmt.Errorf("unknown mode %q (modes: %s)", m, strings.Join(setupModes, ", "))
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	conns, err := setupConns(ctx, *url, *n)
	cancel()
	defer func() {
		for _, h := range conns {
			_ = h.Conn.Close()
		}
	}()
	if err != nil {
		return err
	}
	results := map[string][]float64{}
	for r := range *rounds {
		for _, mode := range list {
			before, err := postgresTicks(*postmaster)
			if err != nil {
				return err
			}
			count, err := setupRun(conns, mode, *dur)
			if err != nil {
				return fmt.Errorf("%s: %w", mode, err)
			}
			after, err := postgresTicks(*postmaster)
			if err != nil {
				return err
			}
			us := float64(after-before) * 1e6 / clkTck / float64(count)
			results[mode] = append(results[mode], us)
			fmt.Printf("round=%d mode=%s tps=%.0f pg_us_per_txn=%.1f\n", r, mode, float64(count)/dur.Seconds(), us)
		}
	}
	for _, mode := range list {
		v := results[mode]
		fmt.Printf("mode=%s pg_us_per_txn_min=%.1f pg_us_per_txn_max=%.1f\n", mode, slices.Min(v), slices.Max(v))
	}
	return nil
}

// setupConns opens n connections and prepares cs_ident and cs_set on
// each, as cascata does once per backend. It returns those it opened
// even with an error, for the caller to close.
func setupConns(ctx context.Context, url string, n int) ([]*pgconn.HijackedConn, error) {
	var conns []*pgconn.HijackedConn
	prep := encodeAll(nil, &pgproto3.Parse{Name: "cs_ident", Query: setupIdentSQL},
		&pgproto3.Parse{Name: "cs_set", Query: setupSetSQL}, &pgproto3.Parse{Name: "cs_claims", Query: setupClaimsSQL},
		&pgproto3.Parse{Name: "cs_role", Query: setupRoleSQL}, &pgproto3.Sync{})
	for range n {
		c, err := pgconn.Connect(ctx, url)
		if err != nil {
			return conns, fmt.Errorf("connect: %w", err)
		}
		h, err := c.Hijack()
		if err != nil {
			return conns, fmt.Errorf("hijack: %w", err)
		}
		conns = append(conns, h)
		if err := roundTrip(h, prep, 1); err != nil {
			return conns, fmt.Errorf("prepare: %w", err)
		}
	}
	return conns, nil
}

// setupRun runs one mode on every connection for dur and returns the
// transactions done.
func setupRun(conns []*pgconn.HijackedConn, mode string, dur time.Duration) (int64, error) {
	var count atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, len(conns))
	stop := time.Now().Add(dur)
	for i, h := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var buf []byte
			for iter := 0; time.Now().Before(stop); iter++ {
				claims := fmt.Sprintf(`{"sub":"user-%d-%d","role":"authenticated"}`, i, iter)
				var replies int
				buf, replies = setupMessages(buf[:0], mode, claims, iter)
				if err := roundTrip(h, buf, replies); err != nil {
					errs <- err
					return
				}
				count.Add(1)
			}
		}()
	}
	wg.Wait()
	close(errs)
	return count.Load(), <-errs
}

// setupMessages appends one transaction of mode and returns how many
// ReadyForQuery messages answer it.
func setupMessages(buf []byte, mode, claims string, iter int) ([]byte, int) {
	identParams := [][]byte{[]byte("authenticated"), []byte(claims), []byte("")}
	parsed := []pgproto3.FrontendMessage{&pgproto3.Parse{Query: setupIdentSQL}, &pgproto3.Bind{Parameters: identParams}, &pgproto3.Execute{}}
	bound := []pgproto3.FrontendMessage{&pgproto3.Bind{PreparedStatement: "cs_ident", Parameters: identParams}, &pgproto3.Execute{}}
	gate := []pgproto3.FrontendMessage{&pgproto3.Parse{Name: setupGateName}, &pgproto3.Sync{},
		&pgproto3.Describe{ObjectType: 'S', Name: setupGateName}, &pgproto3.Close{ObjectType: 'S', Name: setupGateName}}
	tz := []byte("UTC")
	if iter%2 == 0 {
		tz = []byte("Asia/Tokyo")
	}
	setting := [][]byte{[]byte("timezone"), tz}
	query := &pgproto3.Query{String: "SELECT 1"}
	switch mode {
	case "ident-parsed":
		buf = encodeAll(buf, parsed...)
	case "ident-bound":
		buf = encodeAll(buf, bound...)
	case "claims-bound":
		buf = encodeAll(buf, &pgproto3.Bind{PreparedStatement: "cs_claims", Parameters: identParams[1:]}, &pgproto3.Execute{})
	case "role-bound":
		role := []byte("authenticated")
		if iter%2 == 0 {
			role = []byte("anon")
		}
		buf = encodeAll(buf, &pgproto3.Bind{PreparedStatement: "cs_role", Parameters: [][]byte{role}}, &pgproto3.Execute{})
	case "group-parsed":
		buf = encodeAll(encodeAll(buf, parsed...), gate...)
	case "group-bound":
		buf = encodeAll(encodeAll(buf, bound...), gate...)
	case "group-setting-parsed":
		buf = encodeAll(buf, bound...)
		buf = encodeAll(buf, &pgproto3.Parse{Query: setupSetSQL}, &pgproto3.Bind{Parameters: setting}, &pgproto3.Execute{})
		buf = encodeAll(buf, gate...)
	case "group-setting-bound":
		buf = encodeAll(buf, bound...)
		buf = encodeAll(buf, &pgproto3.Bind{PreparedStatement: "cs_set", Parameters: setting}, &pgproto3.Execute{})
		buf = encodeAll(buf, gate...)
	}
	replies := 1
	if strings.HasPrefix(mode, "group") {
		replies = 2
	}
	return encodeAll(buf, query), replies
}

func encodeAll(buf []byte, msgs ...pgproto3.FrontendMessage) []byte {
	for _, m := range msgs {
		var err error
		if buf, err = m.Encode(buf); err != nil {
			panic(err) // the messages above always encode
		}
	}
	return buf
}

// roundTrip writes buf and reads until the rfqs-th ReadyForQuery; an
// ErrorResponse fails it.
func roundTrip(h *pgconn.HijackedConn, buf []byte, rfqs int) error {
	if _, err := h.Conn.Write(buf); err != nil {
		return err
	}
	for rfqs > 0 {
		m, err := h.Frontend.Receive()
		if err != nil {
			return err
		}
		switch m := m.(type) {
		case *pgproto3.ReadyForQuery:
			rfqs--
		case *pgproto3.ErrorResponse:
			return fmt.Errorf("%s: %s", m.Code, m.Message)
		}
	}
	return nil
}

// postgresTicks sums the user and system clock ticks of the processes
// named postgres: the postmaster's own and its children's when postmaster
// is set, else every one on the machine.
func postgresTicks(postmaster int) (int64, error) {
	dirs, err := filepath.Glob("/proc/[0-9]*")
	if err != nil {
		return 0, err
	}
	var total int64
	for _, d := range dirs {
		pid, err := strconv.Atoi(filepath.Base(d))
		if err != nil {
			continue
		}
		st, err := readProcStat(pid)
		if err != nil || st.comm != "postgres" {
			continue // exited, or another program
		}
		if postmaster != 0 && pid != postmaster && st.ppid != postmaster {
			continue
		}
		total += st.ticks
	}
	return total, nil
}
