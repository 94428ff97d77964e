package archive

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"time"

	"cascata/internal/pgcluster"
	"cascata/internal/pgtools"

	"github.com/jackc/pgx/v5"
)

// findTool returns the path of a PostgreSQL client program: in binDir when
// given, else next to the server binaries pgcluster finds (the newest
// installed version), else on PATH.
func findTool(ctx context.Context, binDir, name string) (string, error) {
	serverDir := ""
	if binDir == "" {
		if b, err := pgcluster.FindBinaries(ctx); err == nil {
			serverDir = b.Dir
		}
	}
	return pgtools.Find(binDir, serverDir, name)
}

// withDatabase returns rawURL with its database replaced.
func withDatabase(rawURL, db string) (string, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return "", errors.New("invalid postgres URL")
	}
	u.Path = "/" + db
	u.RawPath = ""
	return u.String(), nil
}

// connect opens a pgx connection with a bounded connect timeout.
func connect(ctx context.Context, connURL string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(connURL)
	if err != nil {
		return nil, errors.New("parse postgres URL: invalid")
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 10 * time.Second
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to %s/%s as %s: %w", cfg.Host, cfg.Database, cfg.User, err)
	}
	return conn, nil
}

func ident(parts ...string) string { return pgx.Identifier(parts).Sanitize() }
