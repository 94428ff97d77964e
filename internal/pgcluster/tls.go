package pgcluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// TLS file names in the data directory (relative paths in ssl_cert_file
// and ssl_key_file are read from there).
const (
	tlsCertFile = "pgcluster_tls.crt"
	tlsKeyFile  = "pgcluster_tls.key"
)

// EnableTLS makes the server accept TLS connections with the given PEM
// certificate (chain) and key, and returns once a TLS connection logs in.
// The files go to the data directory, owned by the server's OS user (the
// directory's owner) and the key readable by it alone, as PostgreSQL
// demands. Plain connections keep working.
func (s *Server) EnableTLS(ctx context.Context, certPEM, keyPEM []byte) error {
	fi, err := os.Stat(s.DataDir)
	if err != nil {
		return fmt.Errorf("enable TLS on %s: %w", s.Name, err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("enable TLS on %s: no owner of %s", s.Name, s.DataDir)
	}
	for _, f := range []struct {
		name string
		data []byte
		mode os.FileMode
	}{{tlsCertFile, certPEM, 0o644}, {tlsKeyFile, keyPEM, 0o600}} {
		p := filepath.Join(s.DataDir, f.name)
		if err := os.WriteFile(p, f.data, f.mode); err != nil {
			return fmt.Errorf("enable TLS on %s: %w", s.Name, err)
		}
		if err := os.Chown(p, int(st.Uid), int(st.Gid)); err != nil {
			return fmt.Errorf("enable TLS on %s: %w", s.Name, err)
		}
	}
	if err := s.alterSystem(ctx, "ssl_cert_file = '"+tlsCertFile+"'", "ssl_key_file = '"+tlsKeyFile+"'", "ssl = on"); err != nil {
		return fmt.Errorf("enable TLS on %s: %w", s.Name, err)
	}
	// The reload is asynchronous: wait until a TLS login works.
	tlsURL := strings.Replace(s.SuperuserURL("postgres"), "sslmode=disable", "sslmode=require", 1)
	if err := waitConnect(ctx, tlsURL, 10*time.Second); err != nil {
		return fmt.Errorf("enable TLS on %s: no TLS login: %w", s.Name, err)
	}
	return nil
}

// DisableTLS undoes EnableTLS: the server goes back to plain connections
// only (existing TLS connections stay as they are).
func (s *Server) DisableTLS(ctx context.Context) error {
	if err := s.alterSystem(ctx, "ssl", "ssl_cert_file", "ssl_key_file"); err != nil {
		return fmt.Errorf("disable TLS on %s: %w", s.Name, err)
	}
	return nil
}

// alterSystem runs ALTER SYSTEM SET for each "name = value", or ALTER
// SYSTEM RESET for each bare name, then reloads the configuration.
func (s *Server) alterSystem(ctx context.Context, settings ...string) error {
	c, err := connect(ctx, s.SuperuserURL("postgres"))
	if err != nil {
		return err
	}
	defer c.Close(context.Background())
	for _, set := range settings {
		sql := "ALTER SYSTEM RESET " + set
		if strings.Contains(set, "=") {
			sql = "ALTER SYSTEM SET " + set
		}
		if _, err := c.Exec(ctx, sql); err != nil {
			return fmt.Errorf("%s: %w", sql, err)
		}
	}
	var ok bool
	if err := c.QueryRow(ctx, "SELECT pg_reload_conf()").Scan(&ok); err != nil || !ok {
		return errors.Join(errors.New("pg_reload_conf failed"), err)
	}
	return nil
}
