package archive

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"regexp"
	"slices"
	"strings"
	"time"
	"unicode/utf8"
)

// Format identification written into every manifest.
const (
	// FormatName is the manifest's "format" value.
	FormatName = "cascata-archive"
	// FormatVersion is the version this package writes and the only one it reads.
	FormatVersion = 1
)

// Member names and prefixes inside the tar stream.
const (
	memberManifest = "manifest.json"
	memberSig      = "manifest.sig"
	memberSecrets  = "secrets.enc"
	prefixDB       = "db/"
	prefixStorage  = "storage/"
	prefixVectors  = "vectors/"
)

// Limits on members read into memory while verifying.
const (
	maxManifestBytes = 256 << 20
	maxSigBytes      = 4 << 10
	maxSecretsBytes  = 16 << 20
)

// Errors an archive can be refused with; test with errors.Is. Every error
// returned by Verify and Import for a bad archive wraps one of the first five.
var (
	// ErrCorrupt: a member's bytes, size or type differ from the manifest,
	// a member is missing or extra, the stream is truncated or garbled.
	ErrCorrupt = errors.New("archive is corrupt")
	// ErrUnsafeMember: a member name escapes its folder (.., absolute path)
	// or a member is a symlink, hard link, device or other special file.
	ErrUnsafeMember = errors.New("archive holds an unsafe member")
	// ErrUnsupportedVersion: the manifest is not of format version 1.
	ErrUnsupportedVersion = errors.New("unsupported archive format version")
	// ErrWrongPassphrase: secrets.enc cannot be opened with the passphrase.
	ErrWrongPassphrase = errors.New("wrong passphrase")
	// ErrNoPassphrase: an empty passphrase was given.
	ErrNoPassphrase = errors.New("a passphrase is required (set CASCATA_ARCHIVE_PASSPHRASE)")
	// ErrProjectExists: the target ref, database or storage directory exists
	// and ImportOptions.Overwrite is false.
	ErrProjectExists = errors.New("project already exists")
	// ErrDataMismatch: after the restore, a table or large-object checksum
	// differs from the one recorded at export.
	ErrDataMismatch = errors.New("restored data does not match the archive's checksums")
)

// Compression of the whole archive stream.
type Compression string

// Compression values.
const (
	CompressionNone Compression = "none"
	CompressionGzip Compression = "gzip"
	CompressionZstd Compression = "zstd"
)

// ParseCompression accepts "none", "gzip", "zstd" and "" (zstd).
func ParseCompression(s string) (Compression, error) {
	switch c := Compression(s); c {
	case "":
		return CompressionZstd, nil
	case CompressionNone, CompressionGzip, CompressionZstd:
		return c, nil
	}
	return "", fmt.Errorf("compression must be none, gzip or zstd, not %q", s)
}

// Manifest is manifest.json. Field meanings are specified in docs/caf.md.
type Manifest struct {
	// Format is always FormatName.
	Format string `json:"format"`
	// Version is the format version (FormatVersion).
	Version int `json:"version"`
	// CreatedAt is when the export started (UTC).
	CreatedAt time.Time `json:"created_at"`
	// Project holds the project's ref and settings; URLs carry no password.
	Project ProjectSettings `json:"project"`
	// Postgres describes the source database.
	Postgres PostgresInfo `json:"postgres"`
	// Roles are the roles the database refers to (owners, grantees, policy
	// roles) plus the project roles; Import creates the missing ones.
	Roles []Role `json:"roles"`
	// Extensions are the database's extensions; Import checks the target
	// offers them before it creates anything.
	Extensions []Extension `json:"extensions"`
	// Secrets describes how secrets.enc is sealed.
	Secrets SealInfo `json:"secrets"`
	// Tables holds one data checksum per table, sorted by schema and name.
	Tables []TableChecksum `json:"tables"`
	// LargeObjects is the checksum over all large objects.
	LargeObjects LargeObjectChecksum `json:"large_objects"`
	// Sequences records sequence positions as seen at export (informative:
	// sequences are not transactional, pg_dump reads them itself).
	Sequences []SequenceValue `json:"sequences"`
	// Files lists the storage tree: directories and regular files.
	Files []FileEntry `json:"files"`
	// Vectors lists the vector snapshot tree (empty when none).
	Vectors []FileEntry `json:"vectors,omitempty"`
	// Members lists every tar member but manifest.json and manifest.sig.
	Members []Member `json:"members"`
}

// ProjectSettings are a project's ref and settings: every config.Project
// setting by its toml key (jwt_secret*, jwks_file and storage_dir left out,
// URLs without passwords).
type ProjectSettings struct {
	Ref      string                     `json:"ref"`
	Settings map[string]json.RawMessage `json:"settings"`
}

// PostgresInfo describes the source server and database.
type PostgresInfo struct {
	ServerVersion    string `json:"server_version"`
	ServerVersionNum int    `json:"server_version_num"`
	PgDumpVersion    string `json:"pg_dump_version"`
	Database         string `json:"database"`
	Owner            string `json:"owner"`
	Encoding         string `json:"encoding"`
	Collate          string `json:"collate"`
	Ctype            string `json:"ctype"`
	// DumpFormat is "directory": db/ is pg_dump --format=directory output.
	DumpFormat string `json:"dump_format"`
}

// Role is a database role the project's database needs.
type Role struct {
	Name      string   `json:"name"`
	Inherit   bool     `json:"inherit"`
	BypassRLS bool     `json:"bypass_rls"`
	Login     bool     `json:"login"`
	MemberOf  []string `json:"member_of,omitempty"`
}

// Extension is an installed extension.
type Extension struct {
	Name    string `json:"name"`
	Version string `json:"version"`
	Schema  string `json:"schema"`
}

// SealInfo gives the key derivation and cipher of secrets.enc and of the
// manifest HMAC.
type SealInfo struct {
	Cipher string `json:"cipher"` // "AES-256-GCM"
	KDF    string `json:"kdf"`    // "scrypt"
	N      int    `json:"n"`
	R      int    `json:"r"`
	P      int    `json:"p"`
	Salt   []byte `json:"salt"` // base64 in JSON
}

// TableChecksum is the data checksum of one table (see docs/caf.md).
type TableChecksum struct {
	Schema   string `json:"schema"`
	Name     string `json:"name"`
	Rows     int64  `json:"rows"`
	Checksum string `json:"checksum"`
}

// LargeObjectChecksum covers every large object: oid and content.
type LargeObjectChecksum struct {
	Count    int64  `json:"count"`
	Checksum string `json:"checksum"`
}

// SequenceValue is a sequence's position at export.
type SequenceValue struct {
	Schema    string `json:"schema"`
	Name      string `json:"name"`
	LastValue *int64 `json:"last_value"` // nil: nextval never called
}

// FileEntry is a directory or regular file of a storage tree.
type FileEntry struct {
	Path   string `json:"path"` // slash-separated, relative to the tree root
	Type   string `json:"type"` // "file" or "dir"
	Mode   uint32 `json:"mode"` // permission bits (0o777 at most)
	Size   int64  `json:"size,omitempty"`
	SHA256 string `json:"sha256,omitempty"`
	// ContentType and Metadata (user metadata, names lower-case) are an
	// object's when the project's files were in an S3-compatible store.
	ContentType string            `json:"content_type,omitempty"`
	Metadata    map[string]string `json:"metadata,omitempty"`
}

// Member is one tar member with its integrity data.
type Member struct {
	Name   string `json:"name"`
	Type   string `json:"type"` // "file" or "dir"
	Mode   uint32 `json:"mode"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256,omitempty"` // of the content; empty for directories
}

// sigFile is manifest.sig.
type sigFile struct {
	ManifestSHA256 string `json:"manifest_sha256"`
	ManifestHMAC   string `json:"manifest_hmac_sha256"`
}

const (
	typeFile = "file"
	typeDir  = "dir"
)

// dbName matches the flat file names pg_dump --format=directory writes.
var dbName = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$`)

// checkRelPath checks a slash-separated relative path of a storage tree:
// valid UTF-8, no NUL, not absolute, clean, no "." or ".." element.
func checkRelPath(p string) error {
	switch {
	case p == "":
		return errors.New("empty path")
	case !utf8.ValidString(p):
		return errors.New("path is not valid UTF-8")
	case strings.ContainsRune(p, 0):
		return errors.New("path contains NUL")
	case strings.HasPrefix(p, "/"):
		return errors.New("absolute path")
	}
	for _, el := range strings.Split(p, "/") {
		switch el {
		case "":
			return errors.New("empty path element")
		case ".", "..":
			return fmt.Errorf("path element %q", el)
		}
	}
	if path.Clean(p) != p {
		return errors.New("path is not clean")
	}
	return nil
}

// memberKind classifies a tar member name.
type memberKind int

const (
	kindManifest memberKind = iota
	kindSig
	kindSecrets
	kindDB
	kindStorage
	kindVectors
)

// classify validates a member name and type flag and returns its kind and,
// for tree members, the path relative to the tree root. Directory names may
// end in "/".
func classify(name string, isDir bool) (memberKind, string, error) {
	if strings.HasPrefix(name, "/") {
		return 0, "", fmt.Errorf("%w: %q: absolute path", ErrUnsafeMember, name)
	}
	clean := strings.TrimSuffix(name, "/")
	if err := checkRelPath(clean); err != nil {
		return 0, "", fmt.Errorf("%w: %q: %v", ErrUnsafeMember, name, err)
	}
	if strings.HasSuffix(name, "/") && !isDir {
		return 0, "", fmt.Errorf("%w: %q: file name ends in /", ErrCorrupt, name)
	}
	switch {
	case clean == memberManifest && !isDir:
		return kindManifest, "", nil
	case clean == memberSig && !isDir:
		return kindSig, "", nil
	case clean == memberSecrets && !isDir:
		return kindSecrets, "", nil
	case strings.HasPrefix(clean, prefixDB) && !isDir:
		rel := strings.TrimPrefix(clean, prefixDB)
		if !dbName.MatchString(rel) {
			return 0, "", fmt.Errorf("%w: %q: not a pg_dump directory file name", ErrUnsafeMember, name)
		}
		return kindDB, rel, nil
	case strings.HasPrefix(clean, prefixStorage):
		return kindStorage, strings.TrimPrefix(clean, prefixStorage), nil
	case strings.HasPrefix(clean, prefixVectors):
		return kindVectors, strings.TrimPrefix(clean, prefixVectors), nil
	}
	return 0, "", fmt.Errorf("%w: unexpected member %q", ErrCorrupt, name)
}

// CompareData reports every difference between the data checksums of two
// manifests: tables, large objects, storage files and vector files (not
// timestamps, settings or the bytes of db/, which pg_dump does not make
// reproducible). Export → import → export yields manifests for which it
// returns nil.
func CompareData(a, b *Manifest) error {
	var diffs []string
	at := map[string]TableChecksum{}
	for _, t := range a.Tables {
		at[t.Schema+"."+t.Name] = t
	}
	bt := map[string]TableChecksum{}
	for _, t := range b.Tables {
		bt[t.Schema+"."+t.Name] = t
	}
	for _, k := range sortedKeys(at) {
		x := at[k]
		y, ok := bt[k]
		switch {
		case !ok:
			diffs = append(diffs, fmt.Sprintf("table %s missing", k))
		case x.Rows != y.Rows || x.Checksum != y.Checksum:
			diffs = append(diffs, fmt.Sprintf("table %s: %d rows %s vs %d rows %s", k, x.Rows, short(x.Checksum), y.Rows, short(y.Checksum)))
		}
	}
	for _, k := range sortedKeys(bt) {
		if _, ok := at[k]; !ok {
			diffs = append(diffs, fmt.Sprintf("table %s extra", k))
		}
	}
	if a.LargeObjects != b.LargeObjects {
		diffs = append(diffs, fmt.Sprintf("large objects: %d %s vs %d %s", a.LargeObjects.Count, short(a.LargeObjects.Checksum), b.LargeObjects.Count, short(b.LargeObjects.Checksum)))
	}
	diffs = append(diffs, compareTrees("storage", a.Files, b.Files)...)
	diffs = append(diffs, compareTrees("vectors", a.Vectors, b.Vectors)...)
	if len(diffs) == 0 {
		return nil
	}
	return fmt.Errorf("%d data differences: %s", len(diffs), joinFirst(diffs, 10))
}

func compareTrees(tree string, a, b []FileEntry) []string {
	var diffs []string
	am := map[string]FileEntry{}
	for _, f := range a {
		am[f.Path] = f
	}
	bm := map[string]FileEntry{}
	for _, f := range b {
		bm[f.Path] = f
	}
	for _, k := range sortedKeys(am) {
		x := am[k]
		y, ok := bm[k]
		switch {
		case !ok:
			diffs = append(diffs, fmt.Sprintf("%s/%s missing", tree, k))
		case x.Type != y.Type || x.Mode != y.Mode || x.Size != y.Size || x.SHA256 != y.SHA256 ||
			x.ContentType != y.ContentType || metaKey(x.Metadata) != metaKey(y.Metadata):
			diffs = append(diffs, fmt.Sprintf("%s/%s differs (%s %o %d %s %q vs %s %o %d %s %q)", tree, k,
				x.Type, x.Mode, x.Size, short(x.SHA256), x.ContentType, y.Type, y.Mode, y.Size, short(y.SHA256), y.ContentType))
		}
	}
	for _, k := range sortedKeys(bm) {
		if _, ok := am[k]; !ok {
			diffs = append(diffs, fmt.Sprintf("%s/%s extra", tree, k))
		}
	}
	return diffs
}

func short(s string) string {
	if len(s) > 12 {
		return s[:12]
	}
	return s
}

func joinFirst(items []string, n int) string {
	if len(items) <= n {
		return strings.Join(items, "; ")
	}
	return strings.Join(items[:n], "; ") + fmt.Sprintf("; and %d more", len(items)-n)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// permOf returns the permission bits of a file mode.
func permOf(m fs.FileMode) uint32 { return uint32(m.Perm()) }
