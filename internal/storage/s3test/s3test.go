// Package s3test starts a real S3-compatible server for tests: gofakes3
// with its file-backed backend (objects are files under a temporary
// directory, so large objects are not held in memory), served by
// net/http/httptest on 127.0.0.1 and stopped when the test ends.
package s3test

import (
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/johannesboyne/gofakes3"
	"github.com/johannesboyne/gofakes3/backend/s3afero"
	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/spf13/afero"
)

// Credentials the server accepts (it checks none).
const (
	AccessKey = "test-access-key"
	SecretKey = "test-secret-key"
	Region    = "us-east-1"
)

// Server is a running S3-compatible server.
type Server struct {
	// Endpoint is its http:// URL (s3_endpoint).
	Endpoint string
	// Client reaches it, path-style.
	Client *minio.Client
}

// Start starts a server with the given buckets.
func Start(t testing.TB, buckets ...string) *Server {
	t.Helper()
	fs := afero.NewBasePathFs(afero.NewOsFs(), t.TempDir())
	backend, err := s3afero.MultiBucket(fs)
	if err != nil {
		t.Fatalf("s3test: %v", err)
	}
	srv := httptest.NewServer(gofakes3.New(backend, gofakes3.WithLogger(gofakes3.DiscardLog())).Server())
	t.Cleanup(srv.Close)
	c, err := minio.New(strings.TrimPrefix(srv.URL, "http://"), &minio.Options{
		Creds: credentials.NewStaticV4(AccessKey, SecretKey, ""), BucketLookup: minio.BucketLookupPath, Region: Region})
	if err != nil {
		t.Fatalf("s3test: %v", err)
	}
	for _, b := range buckets {
		if err := c.MakeBucket(t.Context(), b, minio.MakeBucketOptions{}); err != nil {
			t.Fatalf("s3test: make bucket %s: %v", b, err)
		}
	}
	return &Server{Endpoint: srv.URL, Client: c}
}
