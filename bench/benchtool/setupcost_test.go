package main

import (
	"context"
	"testing"
	"time"
)

// Every mode of setup-cost is valid protocol that PostgreSQL runs without
// an error (an ErrorResponse fails the run), and the CPU count sees the
// cluster's processes.
func TestSetupCostModes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conns, err := setupConns(ctx, cluster.Primary.URL("authenticator", testLoginPassword, "bench"), 2)
	t.Cleanup(func() {
		for _, h := range conns {
			_ = h.Conn.Close()
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	before, err := postgresTicks(0)
	if err != nil {
		t.Fatal(err)
	}
	for _, mode := range setupModes {
		n, err := setupRun(conns, mode, 200*time.Millisecond)
		if err != nil || n == 0 {
			t.Fatalf("%s: %d transactions, %v", mode, n, err)
		}
	}
	if after, err := postgresTicks(0); err != nil || after <= before {
		t.Fatalf("PostgreSQL's CPU ticks went from %d to %d (%v)", before, after, err)
	}
}
