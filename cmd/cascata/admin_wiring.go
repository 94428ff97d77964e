package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"cascata/admin"
	"cascata/internal/catalog"
	"cascata/internal/config"
	"cascata/internal/eject"
	"cascata/internal/jobs"
	"cascata/internal/pgcluster"
	"cascata/proxy"

	"github.com/jackc/pgx/v5/pgconn"
)

// adminPlane holds what the admin plane changes at run time: the project
// catalog (file + [state].dir, or the fleet's control database), the job
// runner and the ejector. newApp opens it, so the catalog's project set is
// in force before the proxy serves.
type adminPlane struct {
	a       *app
	cat     projectCatalog
	fleet   *fleetPlane  // nil without [catalog].url
	pauser  admin.Pauser // the proxy, or the fleet's pauses
	jobs    *jobs.Runner
	ej      *eject.Ejector
	applied map[string]bool // refs put in force last time (catalog calls are serialized)
}

// projectCatalog is the project catalog: *catalog.Catalog (one instance)
// or *catalog.Shared (a fleet).
type projectCatalog interface {
	admin.ProjectStore
	SetFile(cfg *config.Config, text []byte) error
}

// openPlane opens the catalog in [state].dir (putting the merged project set
// in force through applyProjects), the job runner in [state].dir/jobs and
// the ejector.
func openPlane(a *app) (*adminPlane, error) {
	p := &adminPlane{a: a, applied: map[string]bool{}, pauser: a.srv}
	if a.cfg.Catalog.URL != "" {
		f, err := openFleet(a, p.apply)
		if err != nil {
			return nil, err
		}
		p.fleet, p.cat, p.pauser = f, f.cat, f.member
	} else {
		cat, err := catalog.Open(catalog.Options{Dir: a.cfg.State.Dir, Config: a.cfg, File: a.fileText(), Apply: p.apply, Logger: a.log})
		if err != nil {
			return nil, err
		}
		p.cat = cat
	}
	var err error
	jo := jobs.Options{Dir: filepath.Join(a.cfg.State.Dir, "jobs"), Logger: a.log}
	if p.fleet != nil {
		// Jobs live in the control database: every instance lists them and
		// serves their results; one claims each.
		jo.Shared = &jobs.SharedOptions{Pool: p.fleet.pool, InstanceID: p.fleet.id, InstanceTimeout: a.cfg.Catalog.InstanceTimeout.Duration}
	}
	if p.jobs, err = jobs.New(jo); err != nil {
		return nil, err
	}
	binDir := ""
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if bins, err := pgcluster.FindBinaries(ctx); err == nil {
		binDir = bins.Dir
	} else {
		a.log.Warn("PostgreSQL programs not found next to the server binaries; ejection looks for pg_dump and pg_restore on PATH", "error", err)
	}
	if p.ej, err = eject.New(eject.Options{Pauser: p.pauser, Catalog: p.cat, BinDir: binDir, Logger: a.log}); err != nil {
		return nil, err
	}
	return p, nil
}

// apply puts a catalog set in force and forgets the JWT keys of projects
// that left it (applyProjects only knows the file's projects).
func (p *adminPlane) apply(projects []config.Project) error {
	if err := p.a.applyProjects(projects); err != nil {
		return err
	}
	now := make(map[string]bool, len(projects))
	for _, pr := range projects {
		now[pr.Ref] = true
	}
	for ref := range p.applied {
		if !now[ref] {
			p.a.ver.RemoveProject(ref)
		}
	}
	p.applied = now
	return nil
}

// reloadFile puts a reloaded cascata.toml in force through the catalog
// (SIGHUP): run-time changes of projects the file did not change stay.
func (p *adminPlane) reloadFile(cfg *config.Config) error { return p.cat.SetFile(cfg, p.a.fileText()) }

// fileText is cascata.toml as written (the catalog hashes each project's
// table); nil when it cannot be read, and the catalog hashes the loaded
// projects instead.
func (a *app) fileText() []byte {
	if a.cfgPath == "" {
		return nil
	}
	text, err := catalogFileText(a.cfgPath)
	if err != nil {
		a.log.Warn("cannot re-read the config file for the catalog", "error", err)
		return nil
	}
	return text
}

// catalogFileText is what the catalog fingerprints the file's projects
// from: cascata.toml as written. `serve` and the offline archive commands
// both open the catalog with it, so that a run-time change one of them
// records carries the fingerprint the other computes; otherwise the change
// looks like one the file overrode, and is dropped at the next start.
func catalogFileText(cfgPath string) ([]byte, error) {
	text, err := os.ReadFile(cfgPath)
	if err != nil {
		return nil, fmt.Errorf("read %s for the project catalog: %w", cfgPath, err)
	}
	return text, nil
}

// start follows the fleet once the instance listens (nothing to do alone).
func (p *adminPlane) start(proxyAddr, adminAddr string) {
	if p.fleet != nil {
		p.fleet.start(proxyAddr, adminAddr)
	}
}

// close stops the job runner: running jobs are cancelled (an ejection
// resumes its project on the source) and waited for until ctx ends.
func (p *adminPlane) close(ctx context.Context) error { return p.jobs.Close(ctx) }

// leave stops following the fleet and marks this instance stopped; called
// once the proxy has drained, so that its share of the host cap is not
// handed to others while it still holds backends.
func (p *adminPlane) leave() {
	if p.fleet != nil {
		p.fleet.close()
	}
}

// handler builds the admin HTTP handler on the plane.
func (p *adminPlane) handler() (http.Handler, error) {
	a := p.a
	return admin.New(admin.Options{
		Token:       a.cfg.Admin.AdminToken(),
		CORSOrigins: a.cfg.Admin.CORSOrigins,
		Gatherer:    a.reg,
		Logger:      a.log,
		Projects:    p.cat,
		Pools:       poolReader{a.srv},
		Pauser:      p.pauser,
		Jobs:        p.jobs,
		Ejector:     p,
		Archiver:    newArchiver(p),
		Pinger:      pinger{timeout: a.cfg.Proxy.ServerConnectTimeout.Duration},
		Draining:    func() bool { return !a.srv.Accepting() },
		Provisioner: newProvisioner(p),
		Instances:   p.instances(),
		InstanceID:  p.instanceID(),
	})
}

// StartEject starts an ejection job; the job reads the project's version
// current when it starts.
func (p *adminPlane) StartEject(pr config.Project, req admin.EjectRequest) (jobs.Status, error) {
	allowed := p.a.cfg.Admin.EjectAllowedHosts
	if err := targetAllowed(allowed, "target_url", req.TargetURL); err != nil {
		return jobs.Status{}, err
	}
	if err := targetAllowed(allowed, "target_owner_url", req.TargetOwnerURL); err != nil {
		return jobs.Status{}, err
	}
	for i, u := range req.ReplicaURLs {
		if err := targetAllowed(allowed, fmt.Sprintf("replica_urls[%d]", i), u); err != nil {
			return jobs.Status{}, err
		}
	}
	er := eject.Request{Project: pr, TargetURL: req.TargetURL, TargetOwnerURL: req.TargetOwnerURL, ReplicaURLs: req.ReplicaURLs, Method: eject.Method(req.Method)}
	if err := er.Validate(); err != nil {
		return jobs.Status{}, err
	}
	return p.jobs.Start("eject", pr.Ref, func(ctx context.Context, j *jobs.Job) error {
		e, ok := p.cat.Project(pr.Ref)
		if !ok {
			return fmt.Errorf("project %s was removed", pr.Ref)
		}
		er.Project = e.Project
		return p.ej.Run(ctx, er, j)
	})
}

// poolReader serves proxy.Server's statistics on the admin plane (the
// same types, package stats).
type poolReader struct{ srv *proxy.Server }

func (r poolReader) Pools() []admin.PoolStat { return r.srv.PoolStats() }
func (r poolReader) Pinned() []admin.PinStat { return r.srv.PinStats() }
func (r poolReader) Routing() ([]admin.RouteStat, []admin.ReplicaStat) {
	return r.srv.RouteStats(), r.srv.ReplicaStats()
}

// pinger checks a primary by logging in with its database_url.
type pinger struct{ timeout time.Duration }

func (p pinger) Ping(ctx context.Context, databaseURL string) error {
	cfg, err := pgconn.ParseConfig(databaseURL)
	if err != nil {
		return fmt.Errorf("database_url: %w", err)
	}
	if p.timeout > 0 {
		cfg.ConnectTimeout = p.timeout
	}
	c, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer c.Close(context.WithoutCancel(ctx))
	return c.Exec(ctx, "SELECT 1").Close()
}

// targetAllowed refuses (admin.ErrForbidden) a connection URL with a host
// outside allowed ([admin].eject_allowed_hosts: "host" allows any port,
// "host:port" that port only), every host of a multi-host URL included. An
// empty list allows any host. It parses the URL and connects to nothing.
func targetAllowed(allowed []string, what, rawURL string) error {
	if len(allowed) == 0 || rawURL == "" {
		return nil
	}
	cfg, err := pgconn.ParseConfig(rawURL)
	if err != nil {
		return fmt.Errorf("%w: %s is not a valid connection string", admin.ErrBadRequest, what)
	}
	type hostPort struct {
		host string
		port uint16
	}
	hosts := []hostPort{{cfg.Host, cfg.Port}}
	for _, fb := range cfg.Fallbacks {
		hosts = append(hosts, hostPort{fb.Host, fb.Port})
	}
	for _, h := range hosts {
		port := strconv.Itoa(int(h.port))
		ok := slices.ContainsFunc(allowed, func(a string) bool {
			if ah, ap, err := net.SplitHostPort(a); err == nil {
				return strings.EqualFold(ah, h.host) && ap == port
			}
			return strings.EqualFold(strings.Trim(a, "[]"), h.host)
		})
		if !ok {
			return fmt.Errorf("%w: %s: host %s is not in [admin].eject_allowed_hosts", admin.ErrForbidden, what, net.JoinHostPort(h.host, port))
		}
	}
	return nil
}

// instances is the fleet for /v1/instances; nil alone.
func (p *adminPlane) instances() admin.Fleet {
	if p.fleet == nil {
		return nil
	}
	return p.fleet.member
}

// instanceID names this instance in the admin plane's answers.
func (p *adminPlane) instanceID() string {
	if p.fleet == nil {
		return p.a.cfg.Catalog.InstanceID
	}
	return p.fleet.id
}
