package archive

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"cascata/internal/config"
	"cascata/internal/storage"
)

// A project whose files are in an S3-compatible store (storage_url)
// travels the same way as one with a storage_dir: every object below the
// prefix is a storage/<key> member, streamed from the store into the
// archive (and from the unpacked archive into the target store), with its
// content type and user metadata in manifest.files.

// objectMode is the permission bits objects get as archive members.
const objectMode = 0o644

// listObjects lists a project's objects and checks that every key can be
// a storage/ member: a clean relative path, and no key that is also the
// folder of another. Zero-byte "folder" markers (keys ending in "/") are
// left out.
func listObjects(ctx context.Context, store *storage.S3) ([]storage.Object, int64, error) {
	all, err := store.List(ctx)
	if err != nil {
		return nil, 0, err
	}
	var (
		objects []storage.Object
		total   int64
	)
	keys := map[string]bool{}
	for _, o := range all {
		if strings.HasSuffix(o.Key, "/") && o.Size == 0 {
			continue
		}
		if err := checkRelPath(o.Key); err != nil {
			return nil, 0, fmt.Errorf("object %s%s cannot be archived: %v", store, o.Key, err)
		}
		keys[o.Key] = true
		objects = append(objects, o)
		total += o.Size
	}
	for _, o := range objects {
		for dir := o.Key; strings.Contains(dir, "/"); {
			dir = dir[:strings.LastIndexByte(dir, '/')]
			if keys[dir] {
				return nil, 0, fmt.Errorf("objects %s%s and %s%s cannot both be archived: one is the other's folder", store, dir, store, o.Key)
			}
		}
	}
	return objects, total, nil
}

// writeObjects streams every object into the archive under storage/ and
// returns the file list. Each object's bytes are checked against the size
// and ETag the store listed.
func (a *archiveWriter) writeObjects(ctx context.Context, store *storage.S3, objects []storage.Object, total int64, progress ProgressFunc) ([]FileEntry, error) {
	var (
		files []FileEntry
		done  int64
	)
	progress("storage", 0, total)
	for _, o := range objects {
		name := prefixStorage + o.Key
		if err := a.tw.WriteHeader(header(name, tar.TypeReg, objectMode, o.Size, o.LastModified)); err != nil {
			return nil, fmt.Errorf("write %s: %w", name, err)
		}
		body, err := store.Get(ctx, o.Key, o.Size, o.ETag)
		if err != nil {
			return nil, err
		}
		a.h.Reset()
		_, err = io.CopyBuffer(io.MultiWriter(a.tw, a.h), ctxReader{ctx, body}, a.buf)
		if cerr := body.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, fmt.Errorf("archive object %s%s: %w", store, o.Key, err)
		}
		sum := hex.EncodeToString(a.h.Sum(nil))
		a.members = append(a.members, Member{Name: name, Type: typeFile, Mode: objectMode, Size: o.Size, SHA256: sum})
		files = append(files, FileEntry{Path: o.Key, Type: typeFile, Mode: objectMode, Size: o.Size, SHA256: sum,
			ContentType: o.ContentType, Metadata: o.Metadata})
		done += o.Size
		progress("storage", done, total)
	}
	return files, nil
}

// openProjectStore opens the store of a project with a storage_url.
func openProjectStore(p *config.Project) (*storage.S3, error) {
	cfg, err := storage.FromProject(p)
	if err != nil {
		return nil, err
	}
	return storage.Open(cfg)
}

// StorageTarget is an S3 prefix an import writes the storage files to,
// instead of a local directory.
type StorageTarget struct {
	S3 storage.S3Config
	// AccessKeyEnv and SecretKeyEnv name the variables holding S3's
	// credentials; they go into the imported project's settings.
	AccessKeyEnv, SecretKeyEnv string
}

// checkObjectsFree fails with ErrProjectExists when the target prefix
// holds objects (unless overwrite), and returns the keys it holds.
func checkObjectsFree(ctx context.Context, store *storage.S3, overwrite bool) ([]string, error) {
	objs, err := store.List(ctx)
	if err != nil {
		return nil, err
	}
	if len(objs) > 0 && !overwrite {
		return nil, fmt.Errorf("%w: %s holds %d objects", ErrProjectExists, store, len(objs))
	}
	keys := make([]string, len(objs))
	for i, o := range objs {
		keys[i] = o.Key
	}
	return keys, nil
}

// placeObjects uploads the staged storage files to the target store, each
// checked against the MD5 the store reports, and deletes on failure what it
// uploaded. With overwrite, objects of the prefix the archive does not hold
// are deleted once the import commits.
func (im *importer) placeObjects(ctx context.Context, st *stager, store *storage.S3, files []FileEntry, existing []string) error {
	var total, done int64
	for _, f := range files {
		total += f.Size
	}
	im.progress("storage", 0, total)
	keep := map[string]bool{}
	for _, f := range files {
		if f.Type != typeFile {
			continue
		}
		keep[f.Path] = true
		if err := im.putObject(ctx, st, store, f); err != nil {
			return err
		}
		im.undo.push("delete "+f.Path, func(ctx context.Context) error { return store.Delete(ctx, f.Path) })
		done += f.Size
		im.progress("storage", done, total)
	}
	for _, k := range existing {
		if !keep[k] {
			im.undo.onCommit(func() {
				if err := store.Delete(context.WithoutCancel(ctx), k); err != nil {
					im.warn("object %s%s of the replaced project could not be deleted: %v", store, k, err)
				}
			})
		}
	}
	return nil
}

func (im *importer) putObject(ctx context.Context, st *stager, store *storage.S3, f FileEntry) error {
	in, err := st.root.Open(filepath.FromSlash(f.Path))
	if err != nil {
		return fmt.Errorf("open staged %s: %w", f.Path, err)
	}
	defer in.Close()
	return store.Put(ctx, f.Path, ctxReader{ctx, in}, f.Size, f.ContentType, f.Metadata)
}

// VerifyStorage compares a project's storage (its storage_url objects or
// its storage_dir files) with an archive's file list and returns every
// object or file that is missing, changed (size, SHA-256 of its bytes,
// content type, user metadata) or extra. It reads every byte.
func VerifyStorage(ctx context.Context, m *Manifest, p *config.Project) ([]string, error) {
	want := map[string]FileEntry{}
	for _, f := range m.Files {
		if f.Type == typeFile {
			want[f.Path] = f
		}
	}
	var diffs []string
	seen := map[string]bool{}
	objects := p.StorageURL != ""
	check := func(path string, size int64, r io.Reader, contentType string, meta map[string]string) error {
		seen[path] = true
		w, ok := want[path]
		if !ok {
			diffs = append(diffs, fmt.Sprintf("%s: extra (not in the archive)", path))
			return nil
		}
		h := sha256.New()
		if _, err := io.Copy(h, ctxReader{ctx, r}); err != nil {
			return fmt.Errorf("read %s: %w", path, err)
		}
		sum := hex.EncodeToString(h.Sum(nil))
		switch {
		case size != w.Size || sum != w.SHA256:
			diffs = append(diffs, fmt.Sprintf("%s: changed (%d bytes, SHA-256 %s; the archive has %d bytes, %s)", path, size, short(sum), w.Size, short(w.SHA256)))
		case objects && w.ContentType != "" && contentType != w.ContentType:
			diffs = append(diffs, fmt.Sprintf("%s: content type %q, the archive has %q", path, contentType, w.ContentType))
		case objects && len(w.Metadata) > 0 && metaKey(meta) != metaKey(w.Metadata):
			diffs = append(diffs, fmt.Sprintf("%s: user metadata %s, the archive has %s", path, metaKey(meta), metaKey(w.Metadata)))
		}
		return nil
	}
	if objects {
		store, err := openProjectStore(p)
		if err != nil {
			return nil, err
		}
		objs, err := store.List(ctx)
		if err != nil {
			return nil, err
		}
		for _, o := range objs {
			body, err := store.Get(ctx, o.Key, o.Size, o.ETag)
			if err != nil {
				return nil, err
			}
			err = check(o.Key, o.Size, body, o.ContentType, o.Metadata)
			_ = body.Close()
			if err != nil {
				return nil, err
			}
		}
	} else {
		entries, _, err := walkTree(ctx, p.StorageDir)
		if err != nil {
			return nil, err
		}
		for _, e := range entries {
			if e.dir {
				continue
			}
			f, err := os.OpenFile(filepath.Join(p.StorageDir, filepath.FromSlash(e.rel)), os.O_RDONLY|noFollow, 0)
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			if err != nil {
				return nil, err
			}
			err = check(e.rel, e.size, f, "", nil)
			_ = f.Close()
			if err != nil {
				return nil, err
			}
		}
	}
	for _, path := range sortedKeys(want) {
		if !seen[path] {
			diffs = append(diffs, fmt.Sprintf("%s: missing", path))
		}
	}
	slices.Sort(diffs)
	return diffs, nil
}

// metaKey is a map's canonical text (sorted keys).
func metaKey(m map[string]string) string {
	var b strings.Builder
	for _, k := range sortedKeys(m) {
		fmt.Fprintf(&b, "%s=%q;", k, m[k])
	}
	return b.String()
}
