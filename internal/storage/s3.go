// Package storage reaches a project's files when they live in an
// S3-compatible object store (storage_url = "s3://bucket/prefix") rather
// than in a local directory (storage_dir). Objects are streamed: nothing
// holds an object's bytes in memory, whatever its size.
package storage

import (
	"context"
	"crypto/md5"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/url"
	"os"
	"strings"
	"time"

	"cascata/internal/config"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// S3Config is where a project's objects are and how to reach them.
type S3Config struct {
	// URL is "s3://bucket/prefix" (the prefix may be empty).
	URL string
	// Endpoint is the store's URL ("http://127.0.0.1:9000"), addressed
	// path-style; "" means AWS.
	Endpoint string
	// Region of the bucket; "" means us-east-1.
	Region string
	// AccessKey and SecretKey are the credentials; both empty means
	// anonymous requests.
	AccessKey string
	SecretKey string
}

// FromProject returns the S3 settings of a project with a storage_url,
// credentials read from the environment variables it names.
func FromProject(p *config.Project) (S3Config, error) {
	c := S3Config{URL: p.StorageURL, Endpoint: p.S3Endpoint, Region: p.S3Region}
	for _, v := range []struct {
		env string
		dst *string
	}{{p.S3AccessKeyEnv, &c.AccessKey}, {p.S3SecretKeyEnv, &c.SecretKey}} {
		if v.env == "" {
			continue
		}
		if *v.dst = os.Getenv(v.env); *v.dst == "" {
			return c, fmt.Errorf("project %s: environment variable %s is empty", p.Ref, v.env)
		}
	}
	return c, nil
}

// ApplyTo records c's location in p (storage_url and the s3_* settings;
// the credential variable names stay as they are).
func (c S3Config) ApplyTo(p *config.Project) {
	p.StorageURL, p.S3Endpoint, p.S3Region, p.StorageDir = c.URL, c.Endpoint, c.Region, ""
}

// Join returns c with its URL's prefix extended by name ("<url>/<name>").
func (c S3Config) Join(name string) S3Config {
	c.URL = strings.TrimSuffix(c.URL, "/") + "/" + name
	return c
}

// ParseURL splits "s3://bucket/prefix" into the bucket and a prefix that is
// empty or ends in "/".
func ParseURL(raw string) (bucket, prefix string, err error) {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "s3" || u.Host == "" {
		return "", "", fmt.Errorf("storage_url %q: must be s3://bucket/prefix", raw)
	}
	prefix = strings.Trim(u.Path, "/")
	if prefix != "" {
		prefix += "/"
	}
	return u.Host, prefix, nil
}

// Object is one object below the prefix.
type Object struct {
	// Key is relative to the prefix.
	Key          string
	Size         int64
	ETag         string
	ContentType  string
	Metadata     map[string]string // user metadata (x-amz-meta-*), names lower-case
	LastModified time.Time
}

// S3 is one bucket and prefix.
type S3 struct {
	c      *minio.Client
	bucket string
	prefix string
	url    string
}

// maxSinglePut is the largest object sent in one PUT (S3's limit); larger
// ones go in parts.
const maxSinglePut = 5 << 30

// Open returns the store of c. It connects to nothing yet.
func Open(c S3Config) (*S3, error) {
	bucket, prefix, err := ParseURL(c.URL)
	if err != nil {
		return nil, err
	}
	endpoint, secure := "s3.amazonaws.com", true
	if c.Endpoint != "" {
		u, err := url.Parse(c.Endpoint)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, fmt.Errorf("s3_endpoint %q: must be an http(s):// URL", c.Endpoint)
		}
		endpoint, secure = u.Host, u.Scheme == "https"
	}
	region := c.Region
	if region == "" {
		region = "us-east-1"
	}
	var creds *credentials.Credentials
	if c.AccessKey != "" || c.SecretKey != "" {
		creds = credentials.NewStaticV4(c.AccessKey, c.SecretKey, "")
	} else {
		creds = credentials.New(&credentials.Static{Value: credentials.Value{SignerType: credentials.SignatureAnonymous}})
	}
	client, err := minio.New(endpoint, &minio.Options{Creds: creds, Secure: secure, Region: region, BucketLookup: minio.BucketLookupPath})
	if err != nil {
		return nil, fmt.Errorf("s3 client for %s: %w", c.URL, err)
	}
	return &S3{c: client, bucket: bucket, prefix: prefix, url: "s3://" + bucket + "/" + prefix}, nil
}

// String is the store's s3:// URL.
func (s *S3) String() string { return s.url }

// List returns every object below the prefix, sorted by key, with its
// content type and user metadata.
func (s *S3) List(ctx context.Context) ([]Object, error) {
	var out []Object
	for info := range s.c.ListObjects(ctx, s.bucket, minio.ListObjectsOptions{Prefix: s.prefix, Recursive: true}) {
		if info.Err != nil {
			return nil, fmt.Errorf("list %s: %w", s.url, info.Err)
		}
		st, err := s.c.StatObject(ctx, s.bucket, info.Key, minio.StatObjectOptions{})
		if err != nil {
			return nil, fmt.Errorf("stat %s%s: %w", s.url, strings.TrimPrefix(info.Key, s.prefix), err)
		}
		out = append(out, objectOf(strings.TrimPrefix(info.Key, s.prefix), st))
	}
	return out, nil
}

func objectOf(key string, st minio.ObjectInfo) Object {
	o := Object{Key: key, Size: st.Size, ETag: strings.Trim(st.ETag, `"`), ContentType: st.ContentType, LastModified: st.LastModified.UTC()}
	if etagNotMD5(st) {
		o.ETag = "" // the size is all the store tells of the bytes
	}
	if len(st.UserMetadata) > 0 {
		o.Metadata = make(map[string]string, len(st.UserMetadata))
		for k, v := range st.UserMetadata {
			o.Metadata[strings.ToLower(k)] = v
		}
	}
	return o
}

// Get streams the object at key. The reader fails when the bytes read
// differ in length from size, or (for an object stored in one part, whose
// ETag is its MD5) in MD5 from etag: what was read is what the store holds.
func (s *S3) Get(ctx context.Context, key string, size int64, etag string) (io.ReadCloser, error) {
	obj, err := s.c.GetObject(ctx, s.bucket, s.prefix+key, minio.GetObjectOptions{})
	if err != nil {
		return nil, fmt.Errorf("get %s%s: %w", s.url, key, err)
	}
	return &checkedReader{r: obj, key: s.url + key, size: size, etag: etag, h: md5.New()}, nil
}

// checkedReader checks size and MD5 at the end of an object.
type checkedReader struct {
	r    *minio.Object
	key  string
	size int64
	etag string
	h    hash.Hash
	n    int64
}

func (c *checkedReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.h.Write(p[:n])
	c.n += int64(n)
	if errors.Is(err, io.EOF) {
		if c.n != c.size {
			return n, fmt.Errorf("%s: read %d bytes, the store listed %d", c.key, c.n, c.size)
		}
		if sum := hex.EncodeToString(c.h.Sum(nil)); isMD5(c.etag) && !strings.EqualFold(sum, c.etag) {
			return n, fmt.Errorf("%s: MD5 %s of the bytes read differs from the store's ETag %s", c.key, sum, c.etag)
		}
	}
	return n, err
}

func (c *checkedReader) Close() error { return c.r.Close() }

// etagNotMD5 says whether an object's ETag is no MD5 of its bytes even
// when it looks like one: objects encrypted with SSE-KMS or SSE-C.
func etagNotMD5(st minio.ObjectInfo) bool {
	return strings.HasPrefix(st.Metadata.Get("X-Amz-Server-Side-Encryption"), "aws:kms") ||
		st.Metadata.Get("X-Amz-Server-Side-Encryption-Customer-Algorithm") != ""
}

// isMD5 says whether an ETag is a plain MD5 (a single-part upload).
func isMD5(etag string) bool {
	if len(etag) != 32 {
		return false
	}
	_, err := hex.DecodeString(etag)
	return err == nil
}

// Put streams size bytes of r to key with a content type and user
// metadata, and checks the ETag the store returns against the MD5 of what
// was sent.
func (s *S3) Put(ctx context.Context, key string, r io.Reader, size int64, contentType string, meta map[string]string) error {
	h := md5.New()
	info, err := s.c.PutObject(ctx, s.bucket, s.prefix+key, io.TeeReader(r, h), size, minio.PutObjectOptions{
		ContentType:      contentType,
		UserMetadata:     meta,
		DisableMultipart: size <= maxSinglePut,
		// An empty body cannot carry a streaming signature's chunks (some
		// stores then miss the Content-Length); it needs no payload hash.
		DisableContentSha256: size == 0,
	})
	if err != nil {
		return fmt.Errorf("put %s%s: %w", s.url, key, err)
	}
	etag := strings.Trim(info.ETag, `"`)
	if sum := hex.EncodeToString(h.Sum(nil)); isMD5(etag) && !strings.EqualFold(sum, etag) {
		// A bucket that encrypts with KMS by default returns another ETag.
		st, err := s.c.StatObject(ctx, s.bucket, s.prefix+key, minio.StatObjectOptions{})
		if err != nil || !etagNotMD5(st) {
			return fmt.Errorf("put %s%s: the store's ETag %s differs from the MD5 %s of the bytes sent", s.url, key, etag, sum)
		}
	}
	if info.Size != size {
		return fmt.Errorf("put %s%s: the store took %d of %d bytes", s.url, key, info.Size, size)
	}
	return nil
}

// Delete removes the object at key.
func (s *S3) Delete(ctx context.Context, key string) error {
	if err := s.c.RemoveObject(ctx, s.bucket, s.prefix+key, minio.RemoveObjectOptions{}); err != nil {
		return fmt.Errorf("delete %s%s: %w", s.url, key, err)
	}
	return nil
}
