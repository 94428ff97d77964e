package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"cascata/auth"
	"cascata/internal/config"
	"cascata/internal/projectdb"
	"cascata/internal/projects"
	"cascata/internal/volatility"
	"cascata/proxy"
	"cascata/router"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"golang.org/x/sync/errgroup"
)

// app is the running process: the proxy, the verifier and the admin plane,
// wired together. Only this file knows all of them.
type app struct {
	cfgPath string
	cfg     *config.Config
	log     *slog.Logger
	ver     *auth.Verifier
	srv     *proxy.Server
	reg     *prometheus.Registry
	// claimKeys caches each project's claims key (cascata.keys), by ref and owner URL.
	claimKeys map[string][]byte
	cls       *router.Projects
	plane     *adminPlane // catalog, jobs, ejection (admin_wiring.go)
}

func newApp(cfgPath string, cfg *config.Config, log *slog.Logger) (*app, error) {
	a := &app{cfgPath: cfgPath, cfg: cfg, log: log, reg: prometheus.NewRegistry()}
	a.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	a.ver = auth.NewVerifier(auth.WithLogger(log))
	a.cls = router.NewProjects()
	var tlsConf *tls.Config
	if cfg.Proxy.TLSCertFile != "" {
		cert, err := tls.LoadX509KeyPair(cfg.Proxy.TLSCertFile, cfg.Proxy.TLSKeyFile)
		if err != nil {
			return nil, fmt.Errorf("load proxy TLS key pair: %w", err)
		}
		tlsConf = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	p := cfg.Proxy
	srv, err := proxy.NewServer(proxy.Options{
		MaxClientConn:         p.MaxClientConn,
		MaxServerConnPerHost:  p.MaxServerConnPerHost,
		ClientLoginTimeout:    p.ClientLoginTimeout.Duration,
		QueryWaitTimeout:      p.QueryWaitTimeout.Duration,
		ServerIdleTimeout:     p.ServerIdleTimeout.Duration,
		ServerConnectTimeout:  p.ServerConnectTimeout.Duration,
		MaxMessageBytes:       p.MaxMessageBytes,
		MaxPreparedStatements: p.MaxPreparedStatements,
		TLS:                   tlsConf,
		Cleartext:             p.AllowCleartextWithoutTLS,
		Auth:                  a.ver,
		Classifier:            a.cls,
		Metrics:               proxy.NewMetrics(a.reg),
		Logger:                log,
	})
	if err != nil {
		return nil, err
	}
	a.srv = srv
	if a.plane, err = openPlane(a); err != nil {
		return nil, err
	}
	return a, nil
}

// applyProjects puts a set of projects in force: keys in the verifier,
// pools and routes in the proxy. Projects not in the set are removed.
func (a *app) applyProjects(set []config.Project) error {
	a.installClaims(set)
	keep := map[string]bool{}
	err := projects.Apply(a.ver, a.srv, set, func(p *config.Project, pc *proxy.ProjectConfig) {
		keep[p.Ref] = true
		a.cls.SetFunctions(p.Ref, volatility.New(p.DatabaseURL, p.ReadOnlyFunctions, p.WriteFunctions, a.log))
		pc.ClaimsMAC = a.claimsMAC(p)
	})
	if err != nil {
		return err
	}
	// A removed project's claims key goes too: a database created again
	// under the same ref has a key of its own.
	for k := range a.claimKeys {
		if ref, _, _ := strings.Cut(k, "\x00"); !keep[ref] {
			delete(a.claimKeys, k)
		}
	}
	for _, old := range a.cfg.Projects {
		if !keep[old.Ref] {
			a.ver.RemoveProject(old.Ref)
			a.cls.SetFunctions(old.Ref, nil)
		}
	}
	return nil
}

// claimsInstallers bounds the projects whose cascata schema is installed at
// once: one after another, 1,250 projects took some 90 s at start-up.
const claimsInstallers = 8

// installClaims installs the cascata schema of the projects that have an
// owner URL and no key yet, claimsInstallers at a time; claimsMAC then
// finds their keys. A failure is logged by claimsMAC, which tries again.
func (a *app) installClaims(projects []config.Project) {
	if a.claimKeys == nil {
		a.claimKeys = map[string][]byte{}
	}
	due := map[string]string{} // claimKeys key -> owner URL
	for _, p := range projects {
		if k := claimsKeyOf(&p); p.OwnerURL != "" && a.claimKeys[k] == nil {
			due[k] = p.OwnerURL
		}
	}
	var (
		mu  sync.Mutex
		got = make(map[string][]byte, len(due))
		g   errgroup.Group
	)
	g.SetLimit(claimsInstallers)
	for k, url := range due {
		g.Go(func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if key, err := projectdb.Install(ctx, url); err == nil {
				mu.Lock()
				got[k] = key
				mu.Unlock()
			}
			return nil
		})
	}
	_ = g.Wait()
	maps.Copy(a.claimKeys, got)
}

// claimsKeyOf is the key of a project's claims key in claimKeys.
func claimsKeyOf(p *config.Project) string { return p.Ref + "\x00" + p.OwnerURL }

// claimsMAC installs the cascata schema in the project's database (once per
// owner URL) and returns the function that signs claims with its key. A
// project without an owner URL, or whose schema cannot be installed, runs
// without signed claims: cascata.claims() is then absent, and it is logged.
func (a *app) claimsMAC(p *config.Project) func(string) string {
	if p.OwnerURL == "" {
		a.log.Warn("project has no owner_url: cascata.claims() is not installed", "project", p.Ref)
		return nil
	}
	if a.claimKeys == nil {
		a.claimKeys = map[string][]byte{}
	}
	k := claimsKeyOf(p)
	key, ok := a.claimKeys[k]
	if !ok {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var err error
		key, err = projectdb.Install(ctx, p.OwnerURL)
		if err != nil {
			a.log.Warn("cascata.claims() could not be installed; claims are not signed", "project", p.Ref, "error", err)
			return nil
		}
		a.claimKeys[k] = key
	}
	return func(claims string) string { return projectdb.ClaimsMAC(key, claims) }
}

// reload re-reads the config file (SIGHUP). A bad file changes nothing.
func (a *app) reload() {
	cfg, err := config.Load(a.cfgPath)
	if err != nil {
		a.log.Error("reload refused: config has problems", "error", err)
		return
	}
	// Through the catalog: run-time changes (ejections, imports) win over
	// the file until the file changes that project.
	if err := a.plane.reloadFile(cfg); err != nil {
		a.log.Error("reload failed", "error", err)
		return
	}
	a.cfg = cfg
	a.log.Info("config reloaded", "projects", len(cfg.Projects))
}

func (a *app) adminHandler() (http.Handler, error) {
	return a.plane.handler()
}

// serve runs until ctx ends, then shuts down gracefully. ready, if not nil,
// receives the proxy's and admin's listen addresses once both accept.
func (a *app) serve(ctx context.Context, hup <-chan os.Signal, ready func(proxyAddr, adminAddr string)) error {
	ln, err := net.Listen("tcp", a.cfg.Proxy.Listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", a.cfg.Proxy.Listen, err)
	}
	errc := make(chan error, 2)
	go func() { errc <- a.srv.Serve(ln) }()
	var hs *http.Server
	adminAddr := ""
	if a.cfg.Admin.Listen != "" {
		h, err := a.adminHandler()
		if err != nil {
			_ = ln.Close()
			return err
		}
		aln, err := net.Listen("tcp", a.cfg.Admin.Listen)
		if err != nil {
			_ = ln.Close()
			return fmt.Errorf("listen %s: %w", a.cfg.Admin.Listen, err)
		}
		adminAddr = aln.Addr().String()
		hs = &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := hs.Serve(aln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("admin: %w", err)
			}
		}()
	}
	a.plane.start(ln.Addr().String(), adminAddr)
	a.log.Info("cascata listening", "proxy", ln.Addr().String(), "admin", adminAddr, "projects", len(a.cfg.Projects))
	if ready != nil {
		ready(ln.Addr().String(), adminAddr)
	}
	var runErr error
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case <-hup:
			a.reload()
		case err := <-errc:
			runErr = err
			break loop
		}
	}
	a.srv.StopAccepting()
	a.log.Info("shutting down", "timeout", a.cfg.Proxy.ShutdownTimeout.Duration)
	sctx, cancel := context.WithTimeout(context.Background(), a.cfg.Proxy.ShutdownTimeout.Duration)
	defer cancel()
	defer a.cls.Close()
	if err := a.plane.close(sctx); err != nil {
		a.log.Warn("jobs still running at shutdown", "error", err)
	}
	if err := a.srv.Shutdown(sctx); err != nil && runErr == nil {
		runErr = err
	}
	a.plane.leave()
	// The admin plane closes last: while the proxy drains, /readyz says
	// "draining" (the load balancer takes the instance out) and /healthz
	// still names this instance, so that the fleet does not count it gone
	// while it holds backends.
	if hs != nil {
		hctx, hcancel := context.WithTimeout(context.Background(), time.Second)
		_ = hs.Shutdown(hctx)
		hcancel()
	}
	return runErr
}

func newLogger(w io.Writer) *slog.Logger {
	level := slog.LevelInfo
	if os.Getenv("CASCATA_LOG_LEVEL") == "debug" {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}

// cmdServe runs the proxy and the admin plane until SIGTERM/SIGINT; SIGHUP reloads.
func cmdServe(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "cascata.toml", "config file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := config.Load(*path)
	if err != nil {
		return err
	}
	log := newLogger(stderr)
	a, err := newApp(*path, cfg, log)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	return a.serve(ctx, hup, nil)
}
