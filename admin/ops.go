package admin

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"cascata/internal/catalog"
	"cascata/internal/fleet"
	"cascata/internal/jobs"
)

// PauseResult answers POST .../pause and .../resume.
type PauseResult struct {
	Project string `json:"project"`
	Paused  bool   `json:"paused"`
	// Drained is true once no transaction of the project runs (pause only).
	Drained bool `json:"drained"`
	// Message says why Drained is false.
	Message string `json:"message,omitempty"`
}

// EjectRequest is the body of POST /v1/projects/{ref}/eject.
type EjectRequest struct {
	// TargetURL becomes the project's database_url (as its login role).
	TargetURL string `json:"target_url"`
	// TargetOwnerURL has owner rights on the target database.
	TargetOwnerURL string `json:"target_owner_url"`
	// ReplicaURLs become the project's replica_urls.
	ReplicaURLs []string `json:"replica_urls"`
	// Method is "logical" (default) or "dump".
	Method string `json:"method"`
}

// JobStarted answers a request that started a job (202).
type JobStarted struct {
	Job string `json:"job"`
}

// JobList is GET /v1/jobs.
type JobList struct {
	Jobs []jobs.Status `json:"jobs"`
}

// PoolList is GET /v1/pools.
type PoolList struct {
	Pools []PoolStat `json:"pools"`
	// Routing says, per project, how many transactions ran on the primary
	// and on replicas; Replicas is the last check of each replica server.
	Routing  []RouteStat   `json:"routing"`
	Replicas []ReplicaStat `json:"replicas"`
	// Pinned counts, per project, the clients that keep a backend in
	// transaction mode for their session state, and their bound.
	Pinned []PinStat `json:"pinned"`
}

// ReadyFailure is one project whose primary does not answer.
type ReadyFailure struct {
	Project string `json:"project"`
	Error   string `json:"error"`
}

// Readiness answers /readyz.
type Readiness struct {
	Status   string         `json:"status"`
	Projects int            `json:"projects"`
	Failing  []ReadyFailure `json:"failing,omitempty"`
}

var refPattern = regexp.MustCompile(`^[a-z0-9_]{1,63}$`)

func (h *Handler) pause(w http.ResponseWriter, r *http.Request) {
	if h.opts.Projects == nil || h.opts.Pauser == nil {
		notWired(w, "pause")
		return
	}
	ref := r.PathValue("ref")
	if !h.known(w, ref) {
		return
	}
	if err := h.busy(ref, "pause"); err != nil {
		h.fail(w, r, err)
		return
	}
	if h.opts.Pauser.Paused(ref) {
		writeError(w, http.StatusConflict, "project %s is already paused", ref)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), h.opts.PauseWait)
	defer cancel()
	res := PauseResult{Project: ref, Paused: true, Drained: true}
	if err := h.opts.Pauser.Pause(ctx, ref); err != nil {
		if errors.Is(err, catalog.ErrUnavailable) {
			h.fail(w, r, err)
			return
		}
		res.Drained = false
		res.Message = err.Error()
	}
	h.log.Info("project paused", "project", ref, "drained", res.Drained)
	writeJSON(w, http.StatusOK, res)
}

func (h *Handler) resume(w http.ResponseWriter, r *http.Request) {
	if h.opts.Projects == nil || h.opts.Pauser == nil {
		notWired(w, "resume")
		return
	}
	ref := r.PathValue("ref")
	if !h.known(w, ref) {
		return
	}
	if err := h.busy(ref, "resume"); err != nil {
		h.fail(w, r, err)
		return
	}
	if !h.opts.Pauser.Paused(ref) {
		writeError(w, http.StatusConflict, "project %s is not paused", ref)
		return
	}
	h.opts.Pauser.Resume(ref)
	h.log.Info("project resumed", "project", ref)
	writeJSON(w, http.StatusOK, PauseResult{Project: ref, Paused: false, Drained: true})
}

func (h *Handler) eject(w http.ResponseWriter, r *http.Request) {
	if h.opts.Projects == nil || h.opts.Ejector == nil {
		notWired(w, "ejection")
		return
	}
	ref := r.PathValue("ref")
	var req EjectRequest
	if !h.decode(w, r, &req) {
		return
	}
	e, ok := h.opts.Projects.Project(ref)
	if !ok {
		writeError(w, http.StatusNotFound, "no project %q", ref)
		return
	}
	if req.Method == "" {
		req.Method = "logical"
	}
	if err := h.busy(ref, "eject"); err != nil {
		h.fail(w, r, err)
		return
	}
	if h.opts.Pauser != nil && h.opts.Pauser.Paused(ref) {
		writeError(w, http.StatusConflict, "project %s is paused: resume it before ejecting", ref)
		return
	}
	st, err := h.opts.Ejector.StartEject(e.Project, req)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusAccepted, JobStarted{Job: st.ID})
}

func (h *Handler) exportArchive(w http.ResponseWriter, r *http.Request) {
	if h.opts.Projects == nil || h.opts.Archiver == nil {
		notWired(w, "archive export")
		return
	}
	ref := r.PathValue("ref")
	e, ok := h.opts.Projects.Project(ref)
	if !ok {
		writeError(w, http.StatusNotFound, "no project %q", ref)
		return
	}
	pass := r.Header.Get("X-Cascata-Passphrase")
	if pass == "" {
		writeError(w, http.StatusBadRequest, "the passphrase header X-Cascata-Passphrase is required")
		return
	}
	if err := h.busy(ref, "archive"); err != nil {
		h.fail(w, r, err)
		return
	}
	st, err := h.opts.Archiver.StartExport(e.Project, pass)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusAccepted, JobStarted{Job: st.ID})
}

func (h *Handler) importArchive(w http.ResponseWriter, r *http.Request) {
	if h.opts.Projects == nil || h.opts.Archiver == nil {
		notWired(w, "archive import")
		return
	}
	pass := r.Header.Get("X-Cascata-Passphrase")
	if pass == "" {
		writeError(w, http.StatusBadRequest, "the passphrase header X-Cascata-Passphrase is required")
		return
	}
	as := r.URL.Query().Get("as")
	if as != "" {
		if !refPattern.MatchString(as) {
			writeError(w, http.StatusBadRequest, "as must match [a-z0-9_]{1,63}, not %q", as)
			return
		}
		if _, exists := h.opts.Projects.Project(as); exists {
			writeError(w, http.StatusConflict, "project %s already exists", as)
			return
		}
	}
	body := http.MaxBytesReader(w, r.Body, h.opts.MaxArchiveBytes)
	st, err := h.opts.Archiver.StartImport(r.Context(), body, as, pass)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusAccepted, JobStarted{Job: st.ID})
}

func (h *Handler) listJobs(w http.ResponseWriter, r *http.Request) {
	if h.opts.Jobs == nil {
		notWired(w, "jobs")
		return
	}
	list := h.opts.Jobs.List()
	for i := range list {
		list[i].Log = nil
	}
	writeJSON(w, http.StatusOK, JobList{Jobs: list})
}

func (h *Handler) getJob(w http.ResponseWriter, r *http.Request) {
	if h.opts.Jobs == nil {
		notWired(w, "jobs")
		return
	}
	st, err := h.opts.Jobs.Get(r.PathValue("id"))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func (h *Handler) jobResult(w http.ResponseWriter, r *http.Request) {
	if h.opts.Jobs == nil {
		notWired(w, "jobs")
		return
	}
	path, name, err := h.opts.Jobs.Result(r.PathValue("id"))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	f, err := os.Open(path)
	if err != nil {
		h.fail(w, r, fmt.Errorf("open result: %w", err))
		return
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		h.fail(w, r, fmt.Errorf("open result: %w", err))
		return
	}
	if name == "" {
		name = r.PathValue("id") + ".result"
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Disposition", fmt.Sprintf("attachment; filename=%q", name))
	http.ServeContent(w, r, name, fi.ModTime(), f)
}

func (h *Handler) pools(w http.ResponseWriter, r *http.Request) {
	if h.opts.Pools == nil {
		notWired(w, "pool statistics")
		return
	}
	ps := h.opts.Pools.Pools()
	if ps == nil {
		ps = []PoolStat{}
	}
	list := PoolList{Pools: ps, Routing: []RouteStat{}, Replicas: []ReplicaStat{}, Pinned: []PinStat{}}
	if rr, ok := h.opts.Pools.(RoutingReader); ok {
		list.Routing, list.Replicas = rr.Routing()
	}
	if pr, ok := h.opts.Pools.(PinReader); ok {
		list.Pinned = pr.Pinned()
	}
	writeJSON(w, http.StatusOK, list)
}

// readyz pings every project's primary, a few at a time.
func (h *Handler) readyz(w http.ResponseWriter, r *http.Request) {
	if h.opts.Projects == nil || h.opts.Pinger == nil {
		notWired(w, "readiness")
		return
	}
	entries := h.opts.Projects.Projects()
	if h.opts.Draining != nil && h.opts.Draining() {
		writeJSON(w, http.StatusServiceUnavailable, Readiness{Status: "draining", Projects: len(entries)})
		return
	}
	var (
		mu   sync.Mutex
		wg   sync.WaitGroup
		sem  = make(chan struct{}, 8)
		fail []ReadyFailure
	)
	for _, e := range entries {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			ctx, cancel := context.WithTimeout(r.Context(), h.opts.ReadyTimeout)
			defer cancel()
			if err := h.opts.Pinger.Ping(ctx, e.Project.DatabaseURL); err != nil {
				mu.Lock()
				fail = append(fail, ReadyFailure{Project: e.Project.Ref, Error: err.Error()})
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	slices.SortFunc(fail, func(a, b ReadyFailure) int { return strings.Compare(a.Project, b.Project) })
	res := Readiness{Status: "ready", Projects: len(entries)}
	status := http.StatusOK
	if len(fail) > 0 {
		res.Status, res.Failing, status = "unready", fail, http.StatusServiceUnavailable
	}
	writeJSON(w, status, res)
}

// InstanceList is GET /v1/instances.
type InstanceList struct {
	Instances []fleet.Instance `json:"instances"`
}

// instances lists the fleet, or this instance alone without [catalog].url.
func (h *Handler) instances(w http.ResponseWriter, r *http.Request) {
	if h.opts.Instances == nil {
		self := fleet.Instance{ID: h.opts.InstanceID, Heartbeat: time.Now().UTC(), Live: true}
		writeJSON(w, http.StatusOK, InstanceList{Instances: []fleet.Instance{self}})
		return
	}
	list, err := h.opts.Instances.Instances(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, InstanceList{Instances: list})
}

// forgetInstance marks a silent instance of the fleet stopped, so that the
// others take its share of the host cap: 409 while it beats, 404 without a
// fleet or for an unknown id.
func (h *Handler) forgetInstance(w http.ResponseWriter, r *http.Request) {
	if h.opts.Instances == nil {
		writeError(w, http.StatusNotFound, "no fleet: [catalog].url is not set")
		return
	}
	if err := h.opts.Instances.Forget(r.Context(), r.PathValue("id")); err != nil {
		h.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
