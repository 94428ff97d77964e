// Package admin is Cascata's HTTP control plane: health, readiness,
// Prometheus metrics, projects, pools, pause/resume, ejection, archives and
// long jobs (CONTRACT section 4).
//
// It reads and changes the running proxy only through the interfaces it
// declares here; cmd/cascata wires them to the real pieces. Every route but
// /healthz needs the bearer token; errors are {"error": "..."} with a fitting
// status: 400 for a malformed or invalid request (bodies are size-limited and
// decoded strictly: unknown fields are refused), 401 without the token, 404
// for an unknown project or job, 409 for an action that conflicts with the
// project's state (already exists, already paused, a job running), 501 for a
// route whose piece is not wired in.
package admin

import (
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/pprof"
	"slices"
	"strings"
	"time"

	"cascata/internal/fleet"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Options configure the admin handler. The interface fields are optional:
// a route whose dependency is nil answers 501.
type Options struct {
	// Token is the bearer token every route but /healthz requires. Required.
	Token string
	// CORSOrigins are exact origins allowed to call from a browser; none by default.
	CORSOrigins []string
	// Gatherer serves /metrics; nil = prometheus.DefaultGatherer.
	Gatherer prometheus.Gatherer
	// Logger; nil = discard.
	Logger *slog.Logger

	// Projects is the catalog (projects, run-time changes).
	Projects ProjectStore
	// Pools reads the proxy's pool statistics.
	Pools PoolReader
	// Pauser pauses and resumes projects in the proxy.
	Pauser Pauser
	// Jobs reads jobs and their result files.
	Jobs JobStore
	// Ejector starts ejection jobs.
	Ejector Ejector
	// Archiver starts archive export and import jobs.
	Archiver Archiver
	// Pinger checks a project's primary for /readyz.
	Pinger Pinger
	// Provisioner creates a new project's database on [provision] when
	// POST /v1/projects has no database_url.
	Provisioner Provisioner
	// Instances lists the fleet ([catalog].url); nil lists this instance alone.
	Instances Fleet
	// InstanceID names this instance: every response says it in the header
	// X-Cascata-Instance, so that behind a load balancer the answering
	// instance is known.
	InstanceID string

	// MaxBodyBytes limits JSON request bodies; 0 = 1 MiB.
	MaxBodyBytes int64
	// MaxArchiveBytes limits an uploaded archive; 0 = 64 GiB.
	MaxArchiveBytes int64
	// PauseWait bounds how long POST .../pause waits for running transactions; 0 = 30s.
	PauseWait time.Duration
	// Draining, if set, reports that the instance is shutting down: /readyz
	// then answers 503 "draining" at once, so that a load balancer takes
	// it out while its last clients finish.
	Draining func() bool
	// ReadyTimeout bounds each primary's ping in /readyz; 0 = 3s.
	ReadyTimeout time.Duration
}

// Handler is the admin plane's http.Handler.
type Handler struct {
	opts Options
	mux  *http.ServeMux
	log  *slog.Logger
}

// New builds the handler. It refuses to start without a token or with a
// wildcard CORS origin.
func New(opts Options) (*Handler, error) {
	if opts.Token == "" {
		return nil, errors.New("admin: a bearer token is required (set [admin].token_env)")
	}
	if slices.Contains(opts.CORSOrigins, "*") {
		return nil, errors.New("admin: wildcard CORS origin is not allowed")
	}
	if opts.Gatherer == nil {
		opts.Gatherer = prometheus.DefaultGatherer
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.MaxBodyBytes <= 0 {
		opts.MaxBodyBytes = 1 << 20
	}
	if opts.MaxArchiveBytes <= 0 {
		opts.MaxArchiveBytes = 64 << 30
	}
	if opts.PauseWait <= 0 {
		opts.PauseWait = 30 * time.Second
	}
	if opts.ReadyTimeout <= 0 {
		opts.ReadyTimeout = 3 * time.Second
	}
	h := &Handler{opts: opts, mux: http.NewServeMux(), log: opts.Logger}
	h.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, StatusBody{Status: "ok"})
	})
	h.mux.Handle("GET /metrics", promhttp.HandlerFor(opts.Gatherer, promhttp.HandlerOpts{}))
	// Go's profiler, behind the same bearer token, for measuring the proxy
	// under real load (go tool pprof -http : with the Authorization header).
	h.mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	h.mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	h.mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	h.mux.HandleFunc("GET /readyz", h.readyz)
	h.mux.HandleFunc("GET /v1/projects", h.listProjects)
	h.mux.HandleFunc("POST /v1/projects", h.createProject)
	h.mux.HandleFunc("GET /v1/projects/{ref}", h.getProject)
	h.mux.HandleFunc("PATCH /v1/projects/{ref}", h.patchProject)
	h.mux.HandleFunc("DELETE /v1/projects/{ref}", h.deleteProject)
	h.mux.HandleFunc("GET /v1/pools", h.pools)
	h.mux.HandleFunc("POST /v1/projects/{ref}/pause", h.pause)
	h.mux.HandleFunc("POST /v1/projects/{ref}/resume", h.resume)
	h.mux.HandleFunc("POST /v1/projects/{ref}/eject", h.eject)
	h.mux.HandleFunc("POST /v1/projects/{ref}/archive", h.exportArchive)
	h.mux.HandleFunc("POST /v1/archives/import", h.importArchive)
	h.mux.HandleFunc("GET /v1/jobs", h.listJobs)
	h.mux.HandleFunc("GET /v1/jobs/{id}", h.getJob)
	h.mux.HandleFunc("GET /v1/jobs/{id}/result", h.jobResult)
	h.mux.HandleFunc("GET /v1/instances", h.instances)
	h.mux.HandleFunc("DELETE /v1/instances/{id}", h.forgetInstance)
	h.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "no route %s %s", r.Method, r.URL.Path)
	})
	return h, nil
}

// Handle registers an authenticated route (method and pattern as net/http).
func (h *Handler) Handle(pattern string, fn http.HandlerFunc) { h.mux.HandleFunc(pattern, fn) }

// ServeHTTP checks CORS and the bearer token, then routes.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if h.opts.InstanceID != "" {
		w.Header().Set(fleet.InstanceHeader, h.opts.InstanceID)
	}
	if origin := r.Header.Get("Origin"); origin != "" {
		if !slices.Contains(h.opts.CORSOrigins, origin) {
			writeError(w, http.StatusForbidden, "origin not allowed")
			return
		}
		w.Header().Set("Access-Control-Allow-Origin", origin)
		w.Header().Set("Vary", "Origin")
		if r.Method == http.MethodOptions {
			w.Header().Set("Access-Control-Allow-Methods", "GET, POST, PATCH, DELETE")
			w.Header().Set("Access-Control-Allow-Headers", "Authorization, Content-Type, X-Cascata-Passphrase")
			w.WriteHeader(http.StatusNoContent)
			return
		}
	}
	if r.URL.Path != "/healthz" && !h.authorized(r) {
		w.Header().Set("WWW-Authenticate", `Bearer realm="cascata"`)
		writeError(w, http.StatusUnauthorized, "missing or wrong bearer token")
		return
	}
	h.mux.ServeHTTP(w, r)
}

func (h *Handler) authorized(r *http.Request) bool {
	auth := r.Header.Get("Authorization")
	tok, ok := strings.CutPrefix(auth, "Bearer ")
	if !ok {
		return false
	}
	return subtle.ConstantTimeCompare([]byte(tok), []byte(h.opts.Token)) == 1
}

// StatusBody is a plain status answer.
type StatusBody struct {
	Status string `json:"status"`
}

// ErrorBody is every error's JSON shape.
type ErrorBody struct {
	Error string `json:"error"`
}

func writeError(w http.ResponseWriter, status int, format string, args ...any) {
	writeJSON(w, status, ErrorBody{Error: fmt.Sprintf(format, args...)})
}

func writeJSON[T any](w http.ResponseWriter, status int, v T) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// decode reads a JSON body into v strictly: size-limited, unknown fields
// refused, nothing after the value. It answers 400 (or 413) itself and
// returns false on failure.
func (h *Handler) decode(w http.ResponseWriter, r *http.Request, v any) bool {
	r.Body = http.MaxBytesReader(w, r.Body, h.opts.MaxBodyBytes)
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil && dec.More() {
		err = errors.New("unexpected data after the JSON value")
	}
	if err == nil {
		var extra json.RawMessage
		if derr := dec.Decode(&extra); derr == nil {
			err = errors.New("unexpected data after the JSON value")
		}
	}
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			writeError(w, http.StatusRequestEntityTooLarge, "request body larger than %d bytes", mbe.Limit)
			return false
		}
		writeError(w, http.StatusBadRequest, "bad JSON body: %v", err)
		return false
	}
	return true
}

// fail answers with the status fitting err (see statusOf).
func (h *Handler) fail(w http.ResponseWriter, r *http.Request, err error) {
	status := statusOf(err)
	if status >= 500 {
		h.log.Error("admin request failed", "method", r.Method, "path", r.URL.Path, "error", err)
	}
	writeError(w, status, "%v", err)
}

// notWired answers 501 for a route whose dependency is missing.
func notWired(w http.ResponseWriter, what string) {
	writeError(w, http.StatusNotImplemented, "%s is not available in this build", what)
}
