package proxy_test

import (
	"context"
	"fmt"
	"testing"
)

// BenchmarkSelectThroughProxy measures a one-row read per transaction
// through the proxy, 8 clients sharing a pool of 4 backends: simple
// protocol, extended protocol with an unnamed statement parsed each time
// (exec, as pgbench -M extended) and with a named one parsed once
// (cache_statement). Run with -cpuprofile to see the proxy's cost.
func BenchmarkSelectThroughProxy(b *testing.B) {
	for _, mode := range []string{"simple_protocol", "exec", "cache_statement"} {
		b.Run(mode, func(b *testing.B) {
			h := startProxy(b, harnessOpts{poolSize: 4, projects: []string{"p1"}})
			b.SetParallelism(4)
			i := 0
			b.RunParallel(func(pb *testing.PB) {
				i++
				c := h.connectMode("p1", "authenticated", fmt.Sprint(i), mode)
				ctx := context.Background()
				n := 0
				var v int
				for pb.Next() {
					n++
					if err := c.QueryRow(ctx, "SELECT $1::int", n).Scan(&v); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}
