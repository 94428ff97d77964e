package storage_test

import (
	"io"
	"strings"
	"testing"

	"cascata/internal/storage"
	"cascata/internal/storage/s3test"

	"github.com/minio/minio-go/v7"
)

func TestParseURL(t *testing.T) {
	for raw, want := range map[string]string{
		"s3://bucket":            "bucket|",
		"s3://bucket/":           "bucket|",
		"s3://bucket/a/b":        "bucket|a/b/",
		"s3://bucket/a/b/":       "bucket|a/b/",
		"http://bucket/a":        "error",
		"s3:///a":                "error",
		"s3://bucket/ünï cödé/x": "bucket|ünï cödé/x/",
	} {
		b, p, err := storage.ParseURL(raw)
		got := b + "|" + p
		if err != nil {
			got = "error"
		}
		if got != want {
			t.Errorf("%s: %s, want %s", raw, got, want)
		}
	}
	if c := (storage.S3Config{URL: "s3://b/root/"}).Join("ref"); c.URL != "s3://b/root/ref" {
		t.Errorf("join: %s", c.URL)
	}
}

// TestGetChecksWhatItReads: a reader of an object whose bytes no longer
// match the size and ETag listed fails at its end.
func TestGetChecksWhatItReads(t *testing.T) {
	srv := s3test.Start(t, "bkt")
	s, err := storage.Open(storage.S3Config{URL: "s3://bkt/p", Endpoint: srv.Endpoint, AccessKey: s3test.AccessKey, SecretKey: s3test.SecretKey})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	if err := s.Put(ctx, "k", strings.NewReader("hello"), 5, "text/plain", map[string]string{"a": "1"}); err != nil {
		t.Fatal(err)
	}
	if err := s.Put(ctx, "empty", strings.NewReader(""), 0, "", nil); err != nil {
		t.Fatal(err)
	}
	objs, err := s.List(ctx)
	if err != nil || len(objs) != 2 || objs[1].Key != "k" || objs[1].ContentType != "text/plain" || objs[1].Metadata["a"] != "1" {
		t.Fatalf("list: %+v %v", objs, err)
	}
	k := objs[1]
	if _, err := srv.Client.PutObject(ctx, "bkt", "p/k", strings.NewReader("HELLO"), 5, minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	r, err := s.Get(ctx, "k", k.Size, k.ETag)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := io.ReadAll(r); err == nil || !strings.Contains(err.Error(), "differs from the store's ETag") {
		t.Fatalf("read of a changed object: %v", err)
	}
}
