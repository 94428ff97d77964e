// Package catalog is the set of projects a Cascata process serves: the
// projects of cascata.toml plus the changes made at run time (admin API
// POST/PATCH/DELETE, ejections, archive imports).
//
// Run-time changes are persisted atomically in the state directory
// (catalog.json: write a temporary file, fsync, rename, fsync the directory)
// and reloaded on restart. A run-time change of a project wins over the file
// until the file changes that project: the catalog keeps a hash of the file's
// version of each project at the time of the change, and when the file's
// version no longer has that hash (edited, added or removed in the file), the
// file wins and the run-time change is dropped.
//
// Every change of the set is put in force through the Apply callback before
// it is persisted; a change Apply refuses changes nothing.
package catalog

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"cascata/internal/config"

	"github.com/BurntSushi/toml"
)

// Errors callers can test with errors.Is.
var (
	// ErrNotFound: no project with that ref.
	ErrNotFound = errors.New("project not found")
	// ErrExists: a project with that ref is already served.
	ErrExists = errors.New("project already exists")
	// ErrConflict: the project changed under the caller (compare-and-swap failed).
	ErrConflict = errors.New("project changed concurrently")
)

// Where a project's current version comes from.
const (
	SourceFile    = "file"    // cascata.toml, unchanged at run time
	SourceRuntime = "runtime" // a run-time change (API, ejection, import)
)

const (
	stateFileName = "catalog.json"
	stateVersion  = 1
)

// Entry is one project of the catalog with where its version comes from.
type Entry struct {
	Project config.Project
	// Source is SourceFile or SourceRuntime.
	Source string
	// Reason names the last run-time change ("api", "eject", "import"); "" for file projects.
	Reason string
	// Changed is when the last run-time change happened; zero for file projects.
	Changed time.Time
}

// Options configure Open.
type Options struct {
	// Dir is the state directory ([state].dir); created if missing. Required.
	Dir string
	// Config is the loaded cascata.toml: its projects are the file's set and its
	// [proxy] and [provision] tables give run-time projects their defaults. Required.
	Config *config.Config
	// File is the text Config was parsed from. Each project's [[projects]]
	// table as written there is what decides whether the file changed a
	// project, so that new defaults of a later Cascata version do not count
	// as changes. Nil hashes the loaded (defaulted) project instead.
	File []byte
	// Apply puts a complete set of projects in force. Required.
	Apply func([]config.Project) error
	// Logger; nil discards.
	Logger *slog.Logger
}

// override is a run-time change of one project, as persisted.
type override struct {
	Ref     string          `json:"ref"`
	Deleted bool            `json:"deleted,omitempty"`
	Project *config.Project `json:"project,omitempty"`
	// FileHash is the hash of the file's version of the project when the
	// change was made; "" when the file had no such project.
	FileHash string    `json:"file_hash"`
	Reason   string    `json:"reason"`
	Changed  time.Time `json:"changed"`
}

type stateDoc struct {
	Version   int        `json:"version"`
	Overrides []override `json:"overrides"`
}

// Catalog is the live project set. Its methods are safe for concurrent use;
// changes are serialized, and each is applied and persisted before it returns.
type Catalog struct {
	dir   string
	apply func([]config.Project) error
	log   *slog.Logger

	mu        sync.Mutex
	cfg       *config.Config
	file      map[string]config.Project
	fileHash  map[string]string
	fileOrder []string
	over      map[string]override
}

// Open loads the state directory, merges it with the file's projects, puts
// the result in force and persists what changed (run-time changes the file
// has since overridden are dropped).
func Open(opts Options) (*Catalog, error) {
	if opts.Dir == "" || opts.Config == nil || opts.Apply == nil {
		return nil, errors.New("catalog: Dir, Config and Apply are required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("catalog: state dir: %w", err)
	}
	c := &Catalog{dir: opts.Dir, apply: opts.Apply, log: opts.Logger, over: map[string]override{}}
	doc, err := readState(filepath.Join(opts.Dir, stateFileName))
	if err != nil {
		return nil, err
	}
	for _, o := range doc.Overrides {
		c.over[o.Ref] = o
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.setFileLocked(opts.Config, opts.File); err != nil {
		return nil, err
	}
	return c, nil
}

func readState(path string) (stateDoc, error) {
	var doc stateDoc
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return doc, nil
	}
	if err != nil {
		return doc, fmt.Errorf("catalog: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&doc); err != nil {
		return doc, fmt.Errorf("catalog: %s is damaged: %w", path, err)
	}
	if doc.Version != stateVersion {
		return doc, fmt.Errorf("catalog: %s has version %d, this build reads %d", path, doc.Version, stateVersion)
	}
	return doc, nil
}

// SetFile replaces the file's set (SIGHUP reload of cascata.toml; text as
// Options.File) and puts the merged set in force. Run-time changes of
// projects the file changed are dropped; the others stay.
func (c *Catalog) SetFile(cfg *config.Config, text []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.setFileLocked(cfg, text)
}

func (c *Catalog) setFileLocked(cfg *config.Config, text []byte) error {
	file := make(map[string]config.Project, len(cfg.Projects))
	order := make([]string, 0, len(cfg.Projects))
	for _, p := range cfg.Projects {
		file[p.Ref] = p
		order = append(order, p.Ref)
	}
	hashes, err := projectHashes(cfg, text)
	if err != nil {
		return err
	}
	over := make(map[string]override, len(c.over))
	var dropped []string
	for ref, o := range c.over {
		if o.FileHash != hashes[ref] {
			dropped = append(dropped, ref)
			continue
		}
		over[ref] = o
	}
	slices.Sort(dropped)
	oldCfg, oldFile, oldHash, oldOrder, oldOver := c.cfg, c.file, c.fileHash, c.fileOrder, c.over
	c.cfg, c.file, c.fileHash, c.fileOrder, c.over = cfg, file, hashes, order, over
	if err := c.apply(c.effectiveLocked()); err != nil {
		c.cfg, c.file, c.fileHash, c.fileOrder, c.over = oldCfg, oldFile, oldHash, oldOrder, oldOver
		return fmt.Errorf("catalog: put projects in force: %w", err)
	}
	for _, ref := range dropped {
		c.log.Info("cascata.toml changed a project: its run-time change is dropped", "project", ref)
	}
	if len(dropped) > 0 {
		// Harmless if it fails: the same changes are dropped again at the next open.
		if err := c.persistLocked(); err != nil {
			c.log.Error("catalog: persist after reload failed", "error", err)
		}
	}
	return nil
}

func (c *Catalog) persistLocked() error {
	doc := stateDoc{Version: stateVersion, Overrides: make([]override, 0, len(c.over))}
	for _, ref := range sortedRefs(c.over) {
		doc.Overrides = append(doc.Overrides, c.over[ref])
	}
	data, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return fmt.Errorf("catalog: encode state: %w", err)
	}
	if err := WriteFileAtomic(filepath.Join(c.dir, stateFileName), append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("catalog: persist: %w", err)
	}
	return nil
}

// effectiveLocked is the merged set: file projects in file order (with their
// run-time versions where changed, minus deleted ones), then run-time-only
// projects by ref.
func (c *Catalog) effectiveLocked() []config.Project {
	out := make([]config.Project, 0, len(c.file)+len(c.over))
	for _, ref := range c.fileOrder {
		if o, ok := c.over[ref]; ok {
			if !o.Deleted {
				out = append(out, *o.Project)
			}
			continue
		}
		out = append(out, c.file[ref])
	}
	for _, ref := range sortedRefs(c.over) {
		if _, inFile := c.file[ref]; inFile {
			continue
		}
		if o := c.over[ref]; !o.Deleted {
			out = append(out, *o.Project)
		}
	}
	return out
}

// Projects returns every served project.
func (c *Catalog) Projects() []Entry {
	c.mu.Lock()
	defer c.mu.Unlock()
	ps := c.effectiveLocked()
	out := make([]Entry, len(ps))
	for i, p := range ps {
		out[i] = c.entryLocked(p)
	}
	return out
}

// Project returns one served project.
func (c *Catalog) Project(ref string) (Entry, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.currentLocked(ref)
	if !ok {
		return Entry{}, false
	}
	return c.entryLocked(p), true
}

func (c *Catalog) entryLocked(p config.Project) Entry {
	if o, ok := c.over[p.Ref]; ok {
		return Entry{Project: clone(p), Source: SourceRuntime, Reason: o.Reason, Changed: o.Changed}
	}
	return Entry{Project: clone(p), Source: SourceFile}
}

func (c *Catalog) currentLocked(ref string) (config.Project, bool) {
	if o, ok := c.over[ref]; ok {
		if o.Deleted {
			return config.Project{}, false
		}
		return *o.Project, true
	}
	p, ok := c.file[ref]
	return p, ok
}

// Add registers a new project at run time. The project gets the file's
// defaults and is validated; a ref already served is ErrExists.
func (c *Catalog) Add(p config.Project, reason string) (config.Project, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.currentLocked(p.Ref); ok {
		return config.Project{}, fmt.Errorf("%w: %s", ErrExists, p.Ref)
	}
	np, err := Normalize(c.cfg, p)
	if err != nil {
		return config.Project{}, err
	}
	return np, c.setLocked(np.Ref, &np, reason)
}

// Change edits a project at run time: fn gets a copy of the current
// version; the result gets the file's defaults, is validated, put in force
// and persisted. The ref cannot change.
func (c *Catalog) Change(ref, reason string, fn func(*config.Project) error) (config.Project, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	cur, ok := c.currentLocked(ref)
	if !ok {
		return config.Project{}, fmt.Errorf("%w: %s", ErrNotFound, ref)
	}
	next := clone(cur)
	if err := fn(&next); err != nil {
		return config.Project{}, err
	}
	if next.Ref != ref {
		return config.Project{}, fmt.Errorf("catalog: the ref of a project cannot change (%s → %s)", ref, next.Ref)
	}
	np, err := Normalize(c.cfg, next)
	if err != nil {
		return config.Project{}, err
	}
	return np, c.setLocked(ref, &np, reason)
}

// Remove stops serving a project (a file project stays removed until the
// file changes it).
func (c *Catalog) Remove(ref, reason string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.currentLocked(ref); !ok {
		return fmt.Errorf("%w: %s", ErrNotFound, ref)
	}
	return c.setLocked(ref, nil, reason)
}

// setLocked records a run-time version of ref (nil = deleted), applies and
// persists it, and restores the previous state on failure.
func (c *Catalog) setLocked(ref string, p *config.Project, reason string) error {
	prev, had := c.over[ref]
	o := override{Ref: ref, Deleted: p == nil, Project: p, FileHash: c.fileHash[ref], Reason: reason, Changed: time.Now().UTC()}
	if p == nil {
		if _, inFile := c.file[ref]; !inFile {
			// A run-time-only project removed: nothing to remember.
			delete(c.over, ref)
		} else {
			c.over[ref] = o
		}
	} else {
		c.over[ref] = o
	}
	restore := func() {
		if had {
			c.over[ref] = prev
		} else {
			delete(c.over, ref)
		}
	}
	if err := c.apply(c.effectiveLocked()); err != nil {
		restore()
		return fmt.Errorf("catalog: put projects in force: %w", err)
	}
	if err := c.persistLocked(); err != nil {
		restore()
		if aerr := c.apply(c.effectiveLocked()); aerr != nil {
			c.log.Error("catalog: restoring the previous project set failed", "error", aerr)
		}
		return err
	}
	c.log.Info("project changed", "project", ref, "reason", reason, "deleted", p == nil)
	return nil
}

// Normalize gives a project the defaults cascata.toml would give it under
// cfg's [proxy] and [provision] tables and validates it, returning every
// problem as config.Problems.
//
// It round-trips the project through config.Parse so that the defaults and
// checks are exactly those of the file.
func Normalize(cfg *config.Config, p config.Project) (config.Project, error) {
	doc := struct {
		Proxy struct {
			PoolMode string `toml:"pool_mode"`
		} `toml:"proxy"`
		Provision config.Provision `toml:"provision"`
		Projects  []config.Project `toml:"projects"`
	}{Provision: cfg.Provision, Projects: []config.Project{p}}
	doc.Proxy.PoolMode = cfg.Proxy.PoolMode
	var buf bytes.Buffer
	if err := toml.NewEncoder(&buf).Encode(doc); err != nil {
		return config.Project{}, fmt.Errorf("catalog: encode project: %w", err)
	}
	parsed, err := config.Parse(buf.Bytes())
	if err != nil {
		return config.Project{}, err
	}
	return parsed.Projects[0], nil
}

// projectHashes hashes each project of the file: its [[projects]] table as
// written in text (canonical JSON of the decoded table), or, without text,
// the loaded project.
func projectHashes(cfg *config.Config, text []byte) (map[string]string, error) {
	out := make(map[string]string, len(cfg.Projects))
	sum := func(v any) (string, error) {
		data, err := json.Marshal(v)
		if err != nil {
			return "", fmt.Errorf("catalog: hash project: %w", err)
		}
		h := sha256.Sum256(data)
		return hex.EncodeToString(h[:]), nil
	}
	if text == nil {
		for _, p := range cfg.Projects {
			h, err := sum(p)
			if err != nil {
				return nil, err
			}
			out[p.Ref] = h
		}
		return out, nil
	}
	var doc struct {
		Projects []map[string]any `toml:"projects"`
	}
	if _, err := toml.Decode(string(text), &doc); err != nil {
		return nil, fmt.Errorf("catalog: read projects of the file: %w", err)
	}
	for _, table := range doc.Projects {
		ref, _ := table["ref"].(string)
		h, err := sum(table) // encoding/json sorts map keys
		if err != nil {
			return nil, err
		}
		out[ref] = h
	}
	return out, nil
}

func clone(p config.Project) config.Project {
	p.ReplicaURLs = slices.Clone(p.ReplicaURLs)
	p.Roles = slices.Clone(p.Roles)
	p.TrustedRoles = slices.Clone(p.TrustedRoles)
	return p
}

func sortedRefs[V any](m map[string]V) []string {
	refs := make([]string, 0, len(m))
	for r := range m {
		refs = append(refs, r)
	}
	slices.Sort(refs)
	return refs
}
