package proxy_test

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"cascata/proxy"

	"github.com/jackc/pgx/v5/pgconn"
)

// TestOversizedPassword: a password far over any JWT's size is refused
// with a protocol violation (08P01) that says why, not an internal error;
// one over the JWT limit but within the message limit gets 28P01. The
// proxy keeps serving.
func TestOversizedPassword(t *testing.T) {
	h := startProxy(t, harnessOpts{projects: []string{"p1"}})
	host, port, _ := net.SplitHostPort(h.addr)
	for _, tc := range []struct {
		size int
		code string
		text string
	}{
		{100 * 1024, "08P01", "password message"},
		{12 * 1024, "28P01", ""},
	} {
		cfg, err := pgconn.ParseConfig("postgres://authenticated@" + net.JoinHostPort(host, port) + "/p1?sslmode=disable")
		if err != nil {
			t.Fatal(err)
		}
		cfg.Password = strings.Repeat("x", tc.size)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := pgconn.ConnectConfig(ctx, cfg)
		cancel()
		if err == nil {
			c.Close(context.Background())
			t.Fatalf("a %d-byte password was accepted", tc.size)
		}
		var pe *pgconn.PgError
		if !errors.As(err, &pe) {
			t.Fatalf("%d-byte password: %v, want an error from the server", tc.size, err)
		}
		if pe.Code != tc.code || pe.Severity != "FATAL" || !strings.Contains(pe.Message, tc.text) {
			t.Fatalf("%d-byte password: %s %s %q, want FATAL %s", tc.size, pe.Severity, pe.Code, pe.Message, tc.code)
		}
	}
	c := h.connect("p1", "authenticated", "after-big-password")
	if _, err := c.Exec(context.Background(), "SELECT 1"); err != nil {
		t.Fatal(err)
	}
}

// TestMaxMessageBytesBoundsClientsOnly: max_message_bytes caps what a client
// sends; the server's replies, relayed to the client, may be larger (they
// are bounded by PostgreSQL's own 1 GiB limit, not by this setting).
func TestMaxMessageBytesBoundsClientsOnly(t *testing.T) {
	h := startProxy(t, harnessOpts{projects: []string{"p1"}, opts: proxy.Options{MaxMessageBytes: 64 << 10}})
	c := h.connect("p1", "authenticated", "big-reply")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var n int
	var s string
	if err := c.QueryRow(ctx, "SELECT length(v), v FROM (SELECT repeat('x', 1 << 20) AS v) s").Scan(&n, &s); err != nil {
		t.Fatalf("a 1 MiB reply through a proxy with max_message_bytes = 64 KiB: %v", err)
	}
	if n != 1<<20 || len(s) != 1<<20 {
		t.Fatalf("reply of %d/%d bytes, want %d", n, len(s), 1<<20)
	}
	_, err := c.Exec(ctx, "SELECT '"+strings.Repeat("y", 100<<10)+"'")
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "08P01" || pe.Severity != "FATAL" {
		t.Fatalf("a 100 KiB query with max_message_bytes = 64 KiB: %v, want FATAL 08P01", err)
	}
}
