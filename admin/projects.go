package admin

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"time"

	"cascata/internal/config"
	"cascata/internal/jobs"
)

// ProjectView is a project as the admin plane shows it: routing and pool
// state, URLs with passwords masked, never a secret.
type ProjectView struct {
	Ref         string   `json:"ref"`
	DatabaseURL string   `json:"database_url"`
	OwnerURL    string   `json:"owner_url,omitempty"`
	ReplicaURLs []string `json:"replica_urls"`
	// JWTKeys names where the keys come from ("jwt_secret", "jwt_secret_env:NAME", ...), never their values.
	JWTKeys       []string     `json:"jwt_keys"`
	JWTIssuer     string       `json:"jwt_issuer,omitempty"`
	JWTAudience   string       `json:"jwt_audience,omitempty"`
	Roles         []string     `json:"roles"`
	RoleClaim     string       `json:"role_claim"`
	AnonRole      string       `json:"anon_role,omitempty"`
	PoolMode      string       `json:"pool_mode"`
	PoolSize      int          `json:"pool_size"`
	MaxPinned     int          `json:"max_pinned"`
	MaxReplicaLag string       `json:"max_replica_lag"`
	StorageDir    string       `json:"storage_dir,omitempty"`
	Source        string       `json:"source"`
	ChangedBy     string       `json:"changed_by,omitempty"`
	Changed       time.Time    `json:"changed,omitzero"`
	Paused        bool         `json:"paused"`
	Job           *jobs.Status `json:"job,omitempty"`
	Pools         []PoolStat   `json:"pools"`
}

// ProjectList is GET /v1/projects.
type ProjectList struct {
	Projects []ProjectView `json:"projects"`
}

// ProjectRequest is the body of POST /v1/projects: the fields of a
// [[projects]] entry of cascata.toml, with the same defaults. Without
// database_url the project is provisioned on [provision]: a new database
// named after the ref, with database_url, owner_url and storage_dir filled
// in and, when no JWT key is given, a generated jwt_secret.
type ProjectRequest struct {
	Ref           string   `json:"ref"`
	DatabaseURL   string   `json:"database_url"`
	OwnerURL      string   `json:"owner_url"`
	ReplicaURLs   []string `json:"replica_urls"`
	JWTSecret     string   `json:"jwt_secret"`
	JWTSecretEnv  string   `json:"jwt_secret_env"`
	JWTSecretFile string   `json:"jwt_secret_file"`
	JWKSFile      string   `json:"jwks_file"`
	JWKSURL       string   `json:"jwks_url"`
	JWTIssuer     string   `json:"jwt_issuer"`
	JWTAudience   string   `json:"jwt_audience"`
	JWTAllowNoExp bool     `json:"jwt_allow_no_exp"`
	JWTLeeway     string   `json:"jwt_leeway"`
	Roles         []string `json:"roles"`
	RoleClaim     string   `json:"role_claim"`
	AnonRole      string   `json:"anon_role"`
	TrustedRoles  []string `json:"trusted_roles"`
	PoolMode      string   `json:"pool_mode"`
	PoolSize      int      `json:"pool_size"`
	MaxPinned     int      `json:"max_pinned"`
	MaxReplicaLag string   `json:"max_replica_lag"`
	StorageDir    string   `json:"storage_dir"`
}

// ProjectPatch is the body of PATCH /v1/projects/{ref}: only the fields
// present change. Keys given replace the project's keys.
type ProjectPatch struct {
	DatabaseURL   *string   `json:"database_url"`
	OwnerURL      *string   `json:"owner_url"`
	ReplicaURLs   *[]string `json:"replica_urls"`
	JWTSecret     *string   `json:"jwt_secret"`
	JWTSecretEnv  *string   `json:"jwt_secret_env"`
	JWTSecretFile *string   `json:"jwt_secret_file"`
	JWKSFile      *string   `json:"jwks_file"`
	JWKSURL       *string   `json:"jwks_url"`
	JWTIssuer     *string   `json:"jwt_issuer"`
	JWTAudience   *string   `json:"jwt_audience"`
	JWTAllowNoExp *bool     `json:"jwt_allow_no_exp"`
	JWTLeeway     *string   `json:"jwt_leeway"`
	Roles         *[]string `json:"roles"`
	RoleClaim     *string   `json:"role_claim"`
	AnonRole      *string   `json:"anon_role"`
	TrustedRoles  *[]string `json:"trusted_roles"`
	PoolMode      *string   `json:"pool_mode"`
	PoolSize      *int      `json:"pool_size"`
	MaxPinned     *int      `json:"max_pinned"`
	MaxReplicaLag *string   `json:"max_replica_lag"`
	StorageDir    *string   `json:"storage_dir"`
}

func parseDuration(name, s string) (config.Duration, error) {
	if s == "" {
		return config.Duration{}, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return config.Duration{}, fmt.Errorf("%w: %s: not a duration (e.g. \"30s\"): %q", ErrBadRequest, name, s)
	}
	return config.Duration{Duration: d}, nil
}

func (req ProjectRequest) project() (config.Project, error) {
	lag, err := parseDuration("max_replica_lag", req.MaxReplicaLag)
	if err != nil {
		return config.Project{}, err
	}
	leeway, err := parseDuration("jwt_leeway", req.JWTLeeway)
	if err != nil {
		return config.Project{}, err
	}
	return config.Project{
		Ref: req.Ref, DatabaseURL: req.DatabaseURL, OwnerURL: req.OwnerURL, ReplicaURLs: req.ReplicaURLs,
		JWTSecret: req.JWTSecret, JWTSecretEnv: req.JWTSecretEnv, JWTSecretFile: req.JWTSecretFile,
		JWKSFile: req.JWKSFile, JWKSURL: req.JWKSURL, JWTIssuer: req.JWTIssuer, JWTAudience: req.JWTAudience,
		JWTAllowNoExp: req.JWTAllowNoExp, JWTLeeway: leeway, Roles: req.Roles, RoleClaim: req.RoleClaim,
		AnonRole: req.AnonRole, TrustedRoles: req.TrustedRoles, PoolMode: req.PoolMode, PoolSize: req.PoolSize, MaxPinned: req.MaxPinned,
		MaxReplicaLag: lag, StorageDir: req.StorageDir,
	}, nil
}

// apply changes p by the fields present in the patch.
func (pt ProjectPatch) apply(p *config.Project) error {
	set := func(dst *string, v *string) {
		if v != nil {
			*dst = *v
		}
	}
	set(&p.DatabaseURL, pt.DatabaseURL)
	set(&p.OwnerURL, pt.OwnerURL)
	if pt.ReplicaURLs != nil {
		p.ReplicaURLs = slices.Clone(*pt.ReplicaURLs)
	}
	if pt.JWTSecret != nil || pt.JWTSecretEnv != nil || pt.JWTSecretFile != nil || pt.JWKSFile != nil || pt.JWKSURL != nil {
		p.JWTSecret, p.JWTSecretEnv, p.JWTSecretFile, p.JWKSFile, p.JWKSURL = "", "", "", "", ""
	}
	set(&p.JWTSecret, pt.JWTSecret)
	set(&p.JWTSecretEnv, pt.JWTSecretEnv)
	set(&p.JWTSecretFile, pt.JWTSecretFile)
	set(&p.JWKSFile, pt.JWKSFile)
	set(&p.JWKSURL, pt.JWKSURL)
	set(&p.JWTIssuer, pt.JWTIssuer)
	set(&p.JWTAudience, pt.JWTAudience)
	if pt.JWTAllowNoExp != nil {
		p.JWTAllowNoExp = *pt.JWTAllowNoExp
	}
	if pt.JWTLeeway != nil {
		d, err := parseDuration("jwt_leeway", *pt.JWTLeeway)
		if err != nil {
			return err
		}
		p.JWTLeeway = d
	}
	if pt.Roles != nil {
		p.Roles = slices.Clone(*pt.Roles)
	}
	set(&p.RoleClaim, pt.RoleClaim)
	set(&p.AnonRole, pt.AnonRole)
	if pt.TrustedRoles != nil {
		p.TrustedRoles = slices.Clone(*pt.TrustedRoles)
	}
	set(&p.PoolMode, pt.PoolMode)
	if pt.PoolSize != nil {
		if p.MaxPinned == max(1, p.PoolSize/4) {
			p.MaxPinned = 0 // it was the default: it follows pool_size
		}
		p.PoolSize = *pt.PoolSize
	}
	if pt.MaxPinned != nil {
		p.MaxPinned = *pt.MaxPinned
	}
	if pt.MaxReplicaLag != nil {
		d, err := parseDuration("max_replica_lag", *pt.MaxReplicaLag)
		if err != nil {
			return err
		}
		p.MaxReplicaLag = d
	}
	set(&p.StorageDir, pt.StorageDir)
	return nil
}

func (h *Handler) view(ref string, pools []PoolStat) (ProjectView, bool) {
	e, ok := h.opts.Projects.Project(ref)
	if !ok {
		return ProjectView{}, false
	}
	p := e.Project
	v := ProjectView{
		Ref: p.Ref, DatabaseURL: config.RedactURL(p.DatabaseURL), ReplicaURLs: []string{},
		JWTIssuer: p.JWTIssuer, JWTAudience: p.JWTAudience, Roles: p.Roles, RoleClaim: p.RoleClaim, AnonRole: p.AnonRole,
		PoolMode: p.PoolMode, PoolSize: p.PoolSize, MaxPinned: p.MaxPinned, MaxReplicaLag: p.MaxReplicaLag.String(), StorageDir: p.StorageDir,
		Source: e.Source, ChangedBy: e.Reason, Changed: e.Changed, JWTKeys: []string{}, Pools: []PoolStat{},
	}
	if p.OwnerURL != "" {
		v.OwnerURL = config.RedactURL(p.OwnerURL)
	}
	for _, r := range p.ReplicaURLs {
		v.ReplicaURLs = append(v.ReplicaURLs, config.RedactURL(r))
	}
	for _, k := range []struct{ name, v string }{{"jwt_secret", p.JWTSecret}, {"jwt_secret_env", p.JWTSecretEnv}, {"jwt_secret_file", p.JWTSecretFile}, {"jwks_file", p.JWKSFile}, {"jwks_url", p.JWKSURL}} {
		switch {
		case k.v == "":
		case k.name == "jwt_secret":
			v.JWTKeys = append(v.JWTKeys, k.name)
		default:
			v.JWTKeys = append(v.JWTKeys, k.name+":"+k.v)
		}
	}
	if h.opts.Pauser != nil {
		v.Paused = h.opts.Pauser.Paused(ref)
	}
	if h.opts.Jobs != nil {
		if st, ok := h.opts.Jobs.ActiveFor(ref); ok {
			st.Log = nil
			v.Job = &st
		}
	}
	for _, ps := range pools {
		if ps.Project == ref {
			v.Pools = append(v.Pools, ps)
		}
	}
	return v, true
}

func (h *Handler) poolStats() []PoolStat {
	if h.opts.Pools == nil {
		return nil
	}
	return h.opts.Pools.Pools()
}

func (h *Handler) listProjects(w http.ResponseWriter, r *http.Request) {
	if h.opts.Projects == nil {
		notWired(w, "the project catalog")
		return
	}
	pools := h.poolStats()
	out := ProjectList{Projects: []ProjectView{}}
	for _, e := range h.opts.Projects.Projects() {
		if v, ok := h.view(e.Project.Ref, pools); ok {
			out.Projects = append(out.Projects, v)
		}
	}
	writeJSON(w, http.StatusOK, out)
}

func (h *Handler) getProject(w http.ResponseWriter, r *http.Request) {
	if h.opts.Projects == nil {
		notWired(w, "the project catalog")
		return
	}
	v, ok := h.view(r.PathValue("ref"), h.poolStats())
	if !ok {
		writeError(w, http.StatusNotFound, "no project %q", r.PathValue("ref"))
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// CreatedProject answers POST /v1/projects: the project as GET shows it
// and, when cascata generated it, the project's JWT secret. The secret is
// shown this once; GET never shows it.
type CreatedProject struct {
	ProjectView
	JWTSecret string `json:"jwt_secret,omitempty"`
}

func (h *Handler) createProject(w http.ResponseWriter, r *http.Request) {
	if h.opts.Projects == nil {
		notWired(w, "the project catalog")
		return
	}
	var req ProjectRequest
	if !h.decode(w, r, &req) {
		return
	}
	if req.DatabaseURL == "" {
		h.provisionProject(w, r, req)
		return
	}
	p, err := req.project()
	if err != nil {
		h.fail(w, r, err)
		return
	}
	if _, err := h.opts.Projects.Add(p, "api"); err != nil {
		h.fail(w, r, err)
		return
	}
	v, _ := h.view(p.Ref, h.poolStats())
	writeJSON(w, http.StatusCreated, CreatedProject{ProjectView: v})
}

// provisionProject creates a project without database_url: its database
// on [provision], then its catalog entry (the database is dropped again
// when the entry cannot be added).
func (h *Handler) provisionProject(w http.ResponseWriter, r *http.Request, req ProjectRequest) {
	if h.opts.Provisioner == nil {
		h.fail(w, r, fmt.Errorf("%w: database_url is required: this admin plane cannot provision new databases on [provision]", ErrBadRequest))
		return
	}
	if req.OwnerURL != "" || len(req.ReplicaURLs) > 0 {
		h.fail(w, r, fmt.Errorf("%w: owner_url and replica_urls need a database_url; without database_url the project gets a new database on [provision] and its URLs are filled in", ErrBadRequest))
		return
	}
	if _, ok := h.opts.Projects.Project(req.Ref); ok {
		h.fail(w, r, fmt.Errorf("%w: project %q exists", ErrConflict, req.Ref))
		return
	}
	var generated string
	if req.JWTSecret == "" && req.JWTSecretEnv == "" && req.JWTSecretFile == "" && req.JWKSFile == "" && req.JWKSURL == "" {
		b := make([]byte, 32)
		if _, err := rand.Read(b); err != nil {
			h.fail(w, r, fmt.Errorf("generate a JWT secret: %w", err))
			return
		}
		generated = base64.RawURLEncoding.EncodeToString(b)
		req.JWTSecret = generated
	}
	p, err := req.project()
	if err != nil {
		h.fail(w, r, err)
		return
	}
	if p, err = h.opts.Provisioner.Provision(r.Context(), p); err != nil {
		h.fail(w, r, err)
		return
	}
	if _, err := h.opts.Projects.Add(p, "api"); err != nil {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), 30*time.Second)
		defer cancel()
		if derr := h.opts.Provisioner.Drop(ctx, p); derr != nil {
			err = fmt.Errorf("%w (and the database provisioned for it could not be dropped: %v)", err, derr)
		}
		h.fail(w, r, err)
		return
	}
	h.log.Info("project provisioned", "project", p.Ref, "database_url", config.RedactURL(p.DatabaseURL), "storage_dir", p.StorageDir)
	v, _ := h.view(p.Ref, h.poolStats())
	writeJSON(w, http.StatusCreated, CreatedProject{ProjectView: v, JWTSecret: generated})
}

// busy returns a 409-wrapping error when the project has an active job.
func (h *Handler) busy(ref, action string) error {
	if h.opts.Jobs == nil {
		return nil
	}
	if st, ok := h.opts.Jobs.ActiveFor(ref); ok {
		return fmt.Errorf("%w: cannot %s project %s while its %s job %s is %s", ErrConflict, action, ref, st.Kind, st.ID, st.State)
	}
	return nil
}

// known answers 404 and returns false for an unknown project.
func (h *Handler) known(w http.ResponseWriter, ref string) bool {
	if _, ok := h.opts.Projects.Project(ref); !ok {
		writeError(w, http.StatusNotFound, "no project %q", ref)
		return false
	}
	return true
}

func (h *Handler) patchProject(w http.ResponseWriter, r *http.Request) {
	if h.opts.Projects == nil {
		notWired(w, "the project catalog")
		return
	}
	ref := r.PathValue("ref")
	var pt ProjectPatch
	if !h.decode(w, r, &pt) {
		return
	}
	if !h.known(w, ref) {
		return
	}
	if err := h.busy(ref, "change"); err != nil {
		h.fail(w, r, err)
		return
	}
	if _, err := h.opts.Projects.Change(ref, "api", pt.apply); err != nil {
		h.fail(w, r, err)
		return
	}
	v, _ := h.view(ref, h.poolStats())
	writeJSON(w, http.StatusOK, v)
}

func (h *Handler) deleteProject(w http.ResponseWriter, r *http.Request) {
	if h.opts.Projects == nil {
		notWired(w, "the project catalog")
		return
	}
	ref := r.PathValue("ref")
	if !h.known(w, ref) {
		return
	}
	if err := h.busy(ref, "delete"); err != nil {
		h.fail(w, r, err)
		return
	}
	if err := h.opts.Projects.Remove(ref, "api"); err != nil {
		if errors.Is(err, ErrNotFound) {
			writeError(w, http.StatusNotFound, "no project %q", ref)
			return
		}
		h.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
