package archive

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// treeEntry is a directory or regular file found under a tree root.
type treeEntry struct {
	rel   string // slash-separated path below the root
	dir   bool
	mode  uint32
	size  int64
	mtime time.Time
}

// walkTree lists root's directories and regular files in lexical order. A
// missing root is an empty tree; a symlink, device, socket or pipe below
// the root is an error (the archive never follows or carries them).
func walkTree(ctx context.Context, root string) ([]treeEntry, int64, error) {
	if root == "" {
		return nil, 0, nil
	}
	fi, err := os.Stat(root)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, 0, nil
	}
	if err != nil {
		return nil, 0, fmt.Errorf("storage dir: %w", err)
	}
	if !fi.IsDir() {
		return nil, 0, fmt.Errorf("storage dir %s is not a directory", root)
	}
	var (
		out   []treeEntry
		total int64
	)
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if p == root {
			return nil
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		if err := checkRelPath(rel); err != nil {
			return fmt.Errorf("%s: %v; rename it to archive the project", p, err)
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case info.Mode().IsDir():
			out = append(out, treeEntry{rel: rel, dir: true, mode: permOf(info.Mode()), mtime: info.ModTime()})
		case info.Mode().IsRegular():
			out = append(out, treeEntry{rel: rel, mode: permOf(info.Mode()), size: info.Size(), mtime: info.ModTime()})
			total += info.Size()
		default:
			return fmt.Errorf("%s is a %s, not a regular file or directory; the archive carries neither links nor special files", p, kindName(info.Mode()))
		}
		return nil
	})
	if err != nil {
		return nil, 0, fmt.Errorf("walk %s: %w", root, err)
	}
	return out, total, nil
}

func kindName(m fs.FileMode) string {
	switch {
	case m&fs.ModeSymlink != 0:
		return "symbolic link"
	case m&fs.ModeDevice != 0:
		return "device"
	case m&fs.ModeNamedPipe != 0:
		return "named pipe"
	case m&fs.ModeSocket != 0:
		return "socket"
	}
	return "special file"
}

// ctxReader stops a copy loop when its context ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// stager receives the storage (or vectors) tree of an archive into a
// private directory: directories are created owner-writable and get their
// recorded modes and times at the end (deepest first), files get theirs as
// soon as they are written. All paths go through an os.Root, so nothing
// can land outside the directory whatever the names say.
type stager struct {
	dir  string
	root *os.Root
	dirs []treeEntry
}

func newStager(dir string) (*stager, error) {
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, fmt.Errorf("staging dir: %w", err)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("staging dir: %w", err)
	}
	return &stager{dir: dir, root: root}, nil
}

func (s *stager) mkdir(e treeEntry) error {
	if err := s.root.MkdirAll(filepath.FromSlash(e.rel), 0o700); err != nil {
		return fmt.Errorf("create %s: %w", e.rel, err)
	}
	s.dirs = append(s.dirs, e)
	return nil
}

// file writes r (exactly e.size bytes) to e.rel through w, which hashes.
func (s *stager) file(ctx context.Context, e treeEntry, r io.Reader, buf []byte) error {
	rel := filepath.FromSlash(e.rel)
	if parent := filepath.Dir(rel); parent != "." {
		if err := s.root.MkdirAll(parent, 0o700); err != nil {
			return fmt.Errorf("create %s: %w", parent, err)
		}
	}
	f, err := s.root.OpenFile(rel, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("create %s: %w", e.rel, err)
	}
	_, err = io.CopyBuffer(f, ctxReader{ctx, r}, buf)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", e.rel, err)
	}
	if err := s.root.Chmod(rel, fs.FileMode(e.mode)); err != nil {
		return fmt.Errorf("chmod %s: %w", e.rel, err)
	}
	if err := s.root.Chtimes(rel, e.mtime, e.mtime); err != nil {
		return fmt.Errorf("chtimes %s: %w", e.rel, err)
	}
	return nil
}

// finish applies directory modes and times, deepest first.
func (s *stager) finish() error {
	dirs := slices.Clone(s.dirs)
	slices.SortFunc(dirs, func(a, b treeEntry) int {
		return strings.Count(b.rel, "/") - strings.Count(a.rel, "/")
	})
	for _, d := range dirs {
		rel := filepath.FromSlash(d.rel)
		if err := s.root.Chmod(rel, fs.FileMode(d.mode)); err != nil {
			return fmt.Errorf("chmod %s: %w", d.rel, err)
		}
		if err := s.root.Chtimes(rel, d.mtime, d.mtime); err != nil {
			return fmt.Errorf("chtimes %s: %w", d.rel, err)
		}
	}
	return nil
}

func (s *stager) close() error { return s.root.Close() }
