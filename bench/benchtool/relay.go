package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"cascata/internal/sockio"
)

// cmdRelay is the floor of the select-only comparison: a byte relay with no
// protocol logic at all (two goroutines copying per client, one server
// connection per client, no pooling, no parsing), reading and writing its
// sockets as cascata does (package sockio). What any Go proxy built on the
// standard network poller pays per transaction is at least this; the rest
// of cascata's cost is its own work. It runs until SIGTERM or -dur.
func cmdRelay(args []string) error {
	fs := flag.NewFlagSet("relay", flag.ExitOnError)
	listen := fs.String("listen", "", "host:port to listen on")
	target := fs.String("target", "", "host:port of PostgreSQL")
	dur := fs.Duration("dur", time.Hour, "stop after this long")
	_ = fs.Parse(args)
	if *listen == "" || *target == "" {
		return errors.New("-listen and -target are required")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *dur)
	defer cancel()
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	open := map[net.Conn]struct{}{}
	track := func(c net.Conn, add bool) {
		mu.Lock()
		defer mu.Unlock()
		if add {
			open[c] = struct{}{}
		} else {
			delete(open, c)
		}
	}
	go func() {
		<-ctx.Done()
		_ = ln.Close()
		mu.Lock()
		for c := range open {
			_ = c.Close()
		}
		mu.Unlock()
	}()
	d := net.Dialer{Timeout: 5 * time.Second}
	for {
		c, err := ln.Accept()
		if err != nil {
			break
		}
		s, err := d.DialContext(ctx, "tcp", *target)
		if err != nil {
			fmt.Fprintf(os.Stderr, "relay: dial %s: %v\n", *target, err)
			_ = c.Close()
			continue
		}
		c, s = sockio.New(c), sockio.New(s)
		track(c, true)
		track(s, true)
		wg.Add(2)
		pipe := func(dst, src net.Conn) {
			defer wg.Done()
			// Plain reads and writes: a sockio connection offers io.Copy
			// no kernel splice, as a proxy that reads the bytes has none.
			_, _ = io.CopyBuffer(dst, src, make([]byte, 32<<10))
			_ = dst.Close()
			_ = src.Close()
			track(src, false)
		}
		go pipe(s, c)
		go pipe(c, s)
	}
	wg.Wait()
	return nil
}
