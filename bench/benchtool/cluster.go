package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"cascata/auth"
	"cascata/internal/pgcluster"
)

// cmdCluster starts a primary and a streaming replica, sets up the project
// roles and database, writes the ports to -env and holds the cluster until
// SIGTERM/SIGINT, then stops it and removes its files.
func cmdCluster(args []string) error {
	fs := flag.NewFlagSet("cluster", flag.ContinueOnError)
	dir := fs.String("dir", "", "cluster directory (created; removed on exit)")
	db := fs.String("db", "bench", "project database")
	password := fs.String("password", "", "password of the authenticator login role")
	envFile := fs.String("env", "", "file receiving PRIMARY_PORT=/REPLICA_PORT= lines once ready")
	maxConn := fs.Int("max-connections", 400, "max_connections of both servers")
	sharedBuffers := fs.String("shared-buffers", "256MB", "shared_buffers of both servers")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" || *password == "" || *envFile == "" {
		return errors.New("-dir, -password and -env are required")
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()

	c, err := pgcluster.Start(ctx, pgcluster.Options{
		Dir:            *dir,
		Replica:        true,
		MaxConnections: *maxConn,
		ExtraConf:      []string{fmt.Sprintf("shared_buffers = '%s'", *sharedBuffers)},
		Logger:         log,
	})
	if err != nil {
		return err
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		if err := c.Stop(sctx); err != nil {
			log.Error("stop cluster", "error", err)
		}
	}()
	if err := pgcluster.SetupProject(ctx, c.Primary, pgcluster.ProjectSpec{Database: *db, LoginPassword: *password}); err != nil {
		return err
	}
	content := fmt.Sprintf("PRIMARY_PORT=%d\nREPLICA_PORT=%d\nCLUSTER_DIR=%s\n", c.Primary.Port, c.Replica.Port, c.Dir)
	tmp := *envFile + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, *envFile); err != nil {
		return err
	}
	log.Info("bench cluster ready; waiting for SIGTERM", "primary", c.Primary.Addr(), "replica", c.Replica.Addr())
	<-ctx.Done()
	log.Info("stopping the bench cluster")
	return nil
}

// cmdPorts prints N distinct free loopback ports, one per line.
func cmdPorts(args []string) error {
	n := 1
	if len(args) > 0 {
		if _, err := fmt.Sscan(args[0], &n); err != nil {
			return err
		}
	}
	var lns []net.Listener
	defer func() {
		for _, l := range lns {
			_ = l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		lns = append(lns, l)
		fmt.Println(l.Addr().(*net.TCPAddr).Port)
	}
	return nil
}

// cmdRSAKey creates an RSA key, writes its public half as a JWKS file and
// prints an RS256 token for the project and role.
func cmdRSAKey(args []string) error {
	fs := flag.NewFlagSet("rsakey", flag.ContinueOnError)
	jwks := fs.String("jwks", "", "JWKS file to write")
	ref := fs.String("project", "", "project ref (ref claim)")
	role := fs.String("role", "authenticated", "role claim")
	ttl := fs.Duration("ttl", 2*time.Hour, "token lifetime")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *jwks == "" || *ref == "" {
		return errors.New("-jwks and -project are required")
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(*jwks), 0o755); err != nil {
		return err
	}
	if err := auth.WriteJWKSFile(*jwks, auth.JWK{KeyID: "bench-rs256", Algorithm: "RS256", Use: "sig", Key: key}); err != nil {
		return err
	}
	tok, err := auth.Mint(auth.MintKey{KeyID: "bench-rs256", PrivateKey: key},
		map[string]any{"role": *role, "ref": *ref, "sub": "bench-rs-user"}, *ttl)
	if err != nil {
		return err
	}
	fmt.Println(tok)
	return nil
}
