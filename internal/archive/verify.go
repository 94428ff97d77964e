package archive

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/klauspost/compress/zstd"
)

// Magic numbers of the compressed forms.
var (
	magicGzip = []byte{0x1f, 0x8b}
	magicZstd = []byte{0x28, 0xb5, 0x2f, 0xfd}
)

// maxZstdWindow bounds the decoder's memory on hostile input.
const maxZstdWindow = 64 << 20

// Verify checks the archive at path with passphrase and returns its
// manifest. It reads the whole file once and touches nothing: names and
// member types, every member's size and SHA-256 against the manifest, the
// manifest's own SHA-256 and HMAC, the format version, the passphrase.
func Verify(ctx context.Context, path string, passphrase []byte) (*Manifest, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("verify archive: %w", err)
	}
	defer f.Close()
	m, _, err := verifyStream(ctx, f, passphrase, nil, nil)
	if err != nil {
		return nil, fmt.Errorf("verify archive %s: %w", path, err)
	}
	return m, nil
}

// VerifyReader is Verify over a stream (e.g. an upload being received).
func VerifyReader(ctx context.Context, r io.Reader, passphrase []byte) (*Manifest, error) {
	m, _, err := verifyStream(ctx, r, passphrase, nil, nil)
	if err != nil {
		return nil, fmt.Errorf("verify archive: %w", err)
	}
	return m, nil
}

// sinkFunc receives db files and tree members while they are verified: r
// yields exactly e.size bytes of a file (nil for a directory). The bytes
// are hashed as the sink reads them; the caller must not use what it wrote
// until verifyStream has returned without error.
type sinkFunc func(ctx context.Context, kind memberKind, e treeEntry, r io.Reader) error

// seenMember is what the stream said about a member.
type seenMember struct {
	typ  string
	mode uint32
	size int64
	sum  string
}

// scanned is everything verifyStream collected before checking.
type scanned struct {
	manifest []byte
	sig      []byte
	secrets  []byte
	seen     map[string]seenMember
}

// verifyStream reads the whole archive, hashing every member and handing
// tree and db members to sink, then checks everything against the
// manifest. onBytes receives the count of raw bytes read so far.
func verifyStream(ctx context.Context, r io.Reader, passphrase []byte, sink sinkFunc, onBytes func(int64)) (*Manifest, Secrets, error) {
	if len(passphrase) == 0 {
		return nil, Secrets{}, ErrNoPassphrase
	}
	sc, err := scan(ctx, r, sink, onBytes)
	if err != nil {
		return nil, Secrets{}, err
	}
	return check(sc, passphrase)
}

// countingReader counts bytes read and reports them.
type countingReader struct {
	ctx     context.Context
	r       io.Reader
	n       int64
	onBytes func(int64)
	next    int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	n, err := c.r.Read(p)
	c.n += int64(n)
	if c.onBytes != nil && c.n >= c.next {
		c.onBytes(c.n)
		c.next = c.n + 16<<20
	}
	return n, err
}

// decompress detects the compression by its magic number.
func decompress(br *bufio.Reader) (io.Reader, func(), error) {
	magic, _ := br.Peek(4)
	switch {
	case bytes.HasPrefix(magic, magicGzip):
		gz, err := gzip.NewReader(br)
		if err != nil {
			return nil, nil, fmt.Errorf("%w: gzip: %v", ErrCorrupt, err)
		}
		gz.Multistream(false)
		return gz, func() { _ = gz.Close() }, nil
	case bytes.HasPrefix(magic, magicZstd):
		zr, err := zstd.NewReader(br, zstd.WithDecoderMaxWindow(maxZstdWindow), zstd.WithDecoderConcurrency(2))
		if err != nil {
			return nil, nil, fmt.Errorf("%w: zstd: %v", ErrCorrupt, err)
		}
		return zr, zr.Close, nil
	}
	return br, func() {}, nil
}

// streamErr classifies a read error of the archive stream.
func streamErr(ctx context.Context, what string, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return fmt.Errorf("%w: %s: archive is truncated (or not a Cascata archive)", ErrCorrupt, what)
	}
	if errors.Is(err, tar.ErrHeader) || errors.Is(err, tar.ErrInsecurePath) {
		return fmt.Errorf("%w: %s: not a valid tar stream (%v)", ErrCorrupt, what, err)
	}
	return fmt.Errorf("%w: %s: %v", ErrCorrupt, what, err)
}

// scan reads every member once.
func scan(ctx context.Context, r io.Reader, sink sinkFunc, onBytes func(int64)) (*scanned, error) {
	cr := &countingReader{ctx: ctx, r: r, onBytes: onBytes}
	br := bufio.NewReaderSize(cr, 1<<20)
	dr, closeDecomp, err := decompress(br)
	if err != nil {
		return nil, err
	}
	defer closeDecomp()
	tr := tar.NewReader(dr)
	sc := &scanned{seen: map[string]seenMember{}}
	h := sha256.New()
	buf := make([]byte, 1<<20)
	afterManifest := false
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if errors.Is(err, tar.ErrInsecurePath) && hdr != nil {
			return nil, fmt.Errorf("%w: %q: insecure path", ErrUnsafeMember, hdr.Name)
		}
		if err != nil {
			return nil, streamErr(ctx, "reading member header", err)
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		name := hdr.Name
		isDir := false
		switch hdr.Typeflag {
		case tar.TypeReg:
		case tar.TypeDir:
			isDir = true
		case tar.TypeSymlink, tar.TypeLink:
			return nil, fmt.Errorf("%w: %q is a link (%s); archives carry only regular files and directories", ErrUnsafeMember, name, linkKind(hdr.Typeflag))
		case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
			return nil, fmt.Errorf("%w: %q is a device or pipe; archives carry only regular files and directories", ErrUnsafeMember, name)
		default:
			return nil, fmt.Errorf("%w: %q has unsupported tar type %q", ErrCorrupt, name, hdr.Typeflag)
		}
		if hdr.Mode&^0o777 != 0 {
			return nil, fmt.Errorf("%w: %q has mode %o (setuid, setgid, sticky or type bits)", ErrUnsafeMember, name, hdr.Mode)
		}
		kind, rel, err := classify(name, isDir)
		if err != nil {
			return nil, err
		}
		if isDir && hdr.Size != 0 {
			return nil, fmt.Errorf("%w: directory %q has a size", ErrCorrupt, name)
		}
		if hdr.Size < 0 {
			return nil, fmt.Errorf("%w: %q has a negative size", ErrCorrupt, name)
		}
		if _, dup := sc.seen[name]; dup || (kind == kindManifest && sc.manifest != nil) || (kind == kindSig && sc.sig != nil) {
			return nil, fmt.Errorf("%w: member %q appears twice", ErrCorrupt, name)
		}
		switch {
		case afterManifest && kind != kindSig:
			return nil, fmt.Errorf("%w: member %q follows manifest.json (only manifest.sig may)", ErrCorrupt, name)
		case sc.sig != nil:
			return nil, fmt.Errorf("%w: member %q follows manifest.sig, which must be last", ErrCorrupt, name)
		case kind == kindSig && !afterManifest:
			return nil, fmt.Errorf("%w: manifest.sig without manifest.json before it (manifest.json missing or misplaced)", ErrCorrupt)
		}
		mode := uint32(hdr.Mode)
		switch kind {
		case kindManifest:
			if sc.manifest, err = readSmall(tr, hdr.Size, maxManifestBytes, name); err != nil {
				return nil, streamErrIf(ctx, err)
			}
			afterManifest = true
			continue
		case kindSig:
			if sc.sig, err = readSmall(tr, hdr.Size, maxSigBytes, name); err != nil {
				return nil, streamErrIf(ctx, err)
			}
			continue
		case kindSecrets:
			if sc.secrets, err = readSmall(tr, hdr.Size, maxSecretsBytes, name); err != nil {
				return nil, streamErrIf(ctx, err)
			}
			sum := sha256.Sum256(sc.secrets)
			sc.seen[name] = seenMember{typ: typeFile, mode: mode, size: hdr.Size, sum: hex.EncodeToString(sum[:])}
			continue
		}
		if isDir {
			sc.seen[name] = seenMember{typ: typeDir, mode: mode}
			if sink != nil {
				if err := sink(ctx, kind, treeEntry{rel: rel, dir: true, mode: mode, mtime: hdr.ModTime}, nil); err != nil {
					return nil, err
				}
			}
			continue
		}
		h.Reset()
		body := io.TeeReader(tr, h)
		if sink != nil {
			err = sink(ctx, kind, treeEntry{rel: rel, mode: mode, size: hdr.Size, mtime: hdr.ModTime}, body)
		}
		if err == nil {
			_, err = io.CopyBuffer(io.Discard, ctxReader{ctx, body}, buf)
		}
		if err != nil {
			return nil, streamErrIf(ctx, fmt.Errorf("member %q: %w", name, err))
		}
		sc.seen[name] = seenMember{typ: typeFile, mode: mode, size: hdr.Size, sum: hex.EncodeToString(h.Sum(nil))}
	}
	// Nothing but zero padding may follow the end-of-archive marker.
	if err := onlyZeros(ctx, dr, buf); err != nil {
		return nil, err
	}
	if dr != io.Reader(br) {
		if _, err := br.Peek(1); !errors.Is(err, io.EOF) {
			if err == nil {
				return nil, fmt.Errorf("%w: data follows the end of the compressed stream", ErrCorrupt)
			}
			return nil, streamErr(ctx, "after the compressed stream", err)
		}
	}
	if onBytes != nil {
		onBytes(cr.n)
	}
	return sc, nil
}

// streamErrIf classifies errors that come from reading the tar stream;
// sink errors (local I/O) pass through unchanged.
func streamErrIf(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if errors.Is(err, ErrCorrupt) || errors.Is(err, ErrUnsafeMember) {
		return err
	}
	var pe *os.PathError
	if errors.As(err, &pe) {
		return err
	}
	return streamErr(ctx, "reading", err)
}

func linkKind(t byte) string {
	if t == tar.TypeSymlink {
		return "symbolic link"
	}
	return "hard link"
}

// readSmall reads a member that is kept in memory.
func readSmall(r io.Reader, size, limit int64, name string) ([]byte, error) {
	if size > limit {
		return nil, fmt.Errorf("%w: %s is %d bytes, more than the %d allowed", ErrCorrupt, name, size, limit)
	}
	b := make([]byte, size)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return b, nil
}

// onlyZeros reads r to its end and fails on any non-zero byte.
func onlyZeros(ctx context.Context, r io.Reader, buf []byte) error {
	for {
		n, err := r.Read(buf)
		for _, b := range buf[:n] {
			if b != 0 {
				return fmt.Errorf("%w: data follows the end of the tar archive", ErrCorrupt)
			}
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return streamErr(ctx, "reading the end of the archive", err)
		}
	}
}

// check verifies the scanned archive against its manifest and opens the
// secrets.
func check(sc *scanned, passphrase []byte) (*Manifest, Secrets, error) {
	if sc.manifest == nil {
		return nil, Secrets{}, fmt.Errorf("%w: no manifest.json (is the archive truncated?)", ErrCorrupt)
	}
	if sc.sig == nil {
		return nil, Secrets{}, fmt.Errorf("%w: no manifest.sig (is the archive truncated?)", ErrCorrupt)
	}
	sig, err := checkManifestSum(sc.sig, sc.manifest)
	if err != nil {
		return nil, Secrets{}, err
	}
	var head struct {
		Format  string `json:"format"`
		Version int    `json:"version"`
	}
	if err := json.Unmarshal(sc.manifest, &head); err != nil {
		return nil, Secrets{}, fmt.Errorf("%w: manifest.json: %v", ErrCorrupt, err)
	}
	if head.Format != FormatName {
		return nil, Secrets{}, fmt.Errorf("%w: manifest format is %q, not %q", ErrCorrupt, head.Format, FormatName)
	}
	if head.Version != FormatVersion {
		return nil, Secrets{}, fmt.Errorf("%w: the archive is format version %d; this cascata reads version %d", ErrUnsupportedVersion, head.Version, FormatVersion)
	}
	var m Manifest
	dec := json.NewDecoder(bytes.NewReader(sc.manifest))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return nil, Secrets{}, fmt.Errorf("%w: manifest.json: %v", ErrCorrupt, err)
	}
	if err := checkMembers(&m, sc.seen); err != nil {
		return nil, Secrets{}, err
	}
	if sc.secrets == nil {
		return nil, Secrets{}, fmt.Errorf("%w: no secrets.enc", ErrCorrupt)
	}
	k, err := deriveKeys(passphrase, m.Secrets)
	if err != nil {
		return nil, Secrets{}, err
	}
	secrets, err := open(k, sc.secrets)
	if err != nil {
		return nil, Secrets{}, err
	}
	if err := checkManifestHMAC(k, sig, sc.manifest); err != nil {
		return nil, Secrets{}, err
	}
	if err := checkContent(&m); err != nil {
		return nil, Secrets{}, err
	}
	return &m, secrets, nil
}

// checkMembers compares the members read with the manifest's list, and the
// manifest's file lists with its member list.
func checkMembers(m *Manifest, seen map[string]seenMember) error {
	var problems []string
	listed := map[string]Member{}
	for _, mb := range m.Members {
		if _, dup := listed[mb.Name]; dup {
			problems = append(problems, fmt.Sprintf("%q listed twice", mb.Name))
			continue
		}
		listed[mb.Name] = mb
		s, ok := seen[mb.Name]
		switch {
		case !ok:
			problems = append(problems, fmt.Sprintf("member %q is missing", mb.Name))
		case s.typ != mb.Type:
			problems = append(problems, fmt.Sprintf("member %q is a %s, the manifest says %s", mb.Name, s.typ, mb.Type))
		case s.size != mb.Size:
			problems = append(problems, fmt.Sprintf("member %q has %d bytes, the manifest says %d", mb.Name, s.size, mb.Size))
		case s.sum != mb.SHA256:
			problems = append(problems, fmt.Sprintf("member %q has SHA-256 %s, the manifest says %s", mb.Name, short(s.sum), short(mb.SHA256)))
		case s.mode != mb.Mode:
			problems = append(problems, fmt.Sprintf("member %q has mode %o, the manifest says %o", mb.Name, s.mode, mb.Mode))
		}
	}
	for _, name := range sortedKeys(seen) {
		if _, ok := listed[name]; !ok {
			problems = append(problems, fmt.Sprintf("extra member %q not in the manifest", name))
		}
	}
	for tree, files := range map[string][]FileEntry{prefixStorage: m.Files, prefixVectors: m.Vectors} {
		n := 0
		for _, f := range files {
			name := tree + f.Path
			if f.Type == typeDir {
				name += "/"
			}
			mb, ok := listed[name]
			if !ok || mb.Type != f.Type || mb.Mode != f.Mode || mb.Size != f.Size || mb.SHA256 != f.SHA256 {
				problems = append(problems, fmt.Sprintf("file list entry %q does not match its member", name))
			}
			n++
		}
		members := 0
		for name := range listed {
			if strings.HasPrefix(name, tree) {
				members++
			}
		}
		if members != n {
			problems = append(problems, fmt.Sprintf("%s has %d members but the file list %d", strings.TrimSuffix(tree, "/"), members, n))
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("%w: %s", ErrCorrupt, joinFirst(problems, 5))
	}
	return nil
}

// checkContent validates manifest fields Import relies on.
func checkContent(m *Manifest) error {
	if !refPattern.MatchString(m.Project.Ref) {
		return fmt.Errorf("%w: manifest project ref %q is invalid", ErrCorrupt, m.Project.Ref)
	}
	if _, err := projectRoles(m.Project); err != nil {
		return err
	}
	for _, r := range m.Roles {
		if r.Name == "" || len(r.Name) > 63 {
			return fmt.Errorf("%w: manifest role name %q is invalid", ErrCorrupt, r.Name)
		}
	}
	if m.Postgres.DumpFormat != "directory" {
		return fmt.Errorf("%w: dump format %q; only directory is known", ErrCorrupt, m.Postgres.DumpFormat)
	}
	hasTOC := false
	for _, mb := range m.Members {
		if mb.Name == prefixDB+"toc.dat" {
			hasTOC = true
		}
	}
	if !hasTOC {
		return fmt.Errorf("%w: no db/toc.dat", ErrCorrupt)
	}
	return nil
}
