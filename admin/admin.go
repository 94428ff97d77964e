// Package admin is Cascata's HTTP control plane: health, readiness,
// Prometheus metrics, projects, pools, pause/resume, and long jobs.
//
// It reads and changes the running proxy only through the interfaces it
// declares here; cmd/cascata wires them to the real pieces.
package admin

import (
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Options configure the admin handler.
type Options struct {
	// Token is the bearer token every route but /healthz requires. Required.
	Token string
	// CORSOrigins are exact origins allowed to call from a browser; none by default.
	CORSOrigins []string
	// Gatherer serves /metrics; nil = prometheus.DefaultGatherer.
	Gatherer prometheus.Gatherer
	// Logger; nil = discard.
	Logger *slog.Logger
}

// Handler is the admin plane's http.Handler.
type Handler struct {
	opts Options
	mux  *http.ServeMux
	log  *slog.Logger
}

// New builds the handler. It refuses to start without a token.
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
	h := &Handler{opts: opts, mux: http.NewServeMux(), log: opts.Logger}
	h.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	h.mux.Handle("GET /metrics", promhttp.HandlerFor(opts.Gatherer, promhttp.HandlerOpts{}))
	return h, nil
}

// Handle registers an authenticated route (method and pattern as net/http).
func (h *Handler) Handle(pattern string, fn http.HandlerFunc) { h.mux.HandleFunc(pattern, fn) }

// ServeHTTP checks CORS and the bearer token, then routes.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
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

// errorBody is every error's JSON shape.
type errorBody struct {
	Error string `json:"error"`
}

func writeError(w http.ResponseWriter, status int, format string, args ...any) {
	writeJSON(w, status, errorBody{Error: fmt.Sprintf(format, args...)})
}

func writeJSON[T any](w http.ResponseWriter, status int, v T) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
