package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"runtime/debug"
	"sync"
	"time"

	"cascata/internal/catalog"
	"cascata/internal/config"
	"cascata/internal/controldb"
	"cascata/internal/fleet"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
)

// fleetPlane is this instance's part of a fleet ([catalog].url): the
// control database, the shared catalog that follows it, and the member that
// beats, shares the host cap and holds fleet-wide pauses.
type fleetPlane struct {
	id     string
	pool   *pgxpool.Pool
	cat    *catalog.Shared
	member *fleet.Member

	stop context.CancelFunc
	wg   sync.WaitGroup
}

// openFleet opens the shared catalog (putting its project set in force
// through apply) and joins the fleet. A control database that does not
// answer is not fatal: the catalog starts from its cache and the share of
// the host cap from the fleet size last seen.
func openFleet(a *app, apply func([]config.Project) error) (*fleetPlane, error) {
	cfg := a.cfg
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pool, err := controldb.Open(ctx, cfg.Catalog.URL, 16)
	if err != nil {
		return nil, err
	}
	f := &fleetPlane{id: instanceID(cfg.Catalog.InstanceID), pool: pool}
	f.cat, err = catalog.OpenShared(ctx, catalog.SharedOptions{Pool: pool, Dir: cfg.State.Dir, Config: cfg, File: a.fileText(), Apply: apply, Logger: a.log})
	if err != nil {
		pool.Close()
		return nil, err
	}
	f.member, err = fleet.New(fleet.Options{Pool: pool, ID: f.id, AdminURL: httpURL(cfg.Admin.Listen), ProxyURL: cfg.Proxy.Listen,
		Version: buildVersion(), Timeout: cfg.Catalog.InstanceTimeout.Duration, Cap: cfg.Proxy.MaxServerConnPerHost,
		Server: a.srv, Catalog: f.cat, Dir: cfg.State.Dir, Logger: a.log.With("instance", f.id)})
	if err == nil {
		err = f.member.Start(ctx)
	}
	if err != nil {
		pool.Close()
		return nil, err
	}
	a.reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "cascata_instance_info",
			Help:        "This instance of the fleet (constant 1): its id and version label every scrape.",
			ConstLabels: prometheus.Labels{"instance_id": f.id, "version": buildVersion()}}, func() float64 { return 1 }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "cascata_fleet_share",
			Help: "Backend connections per host this instance may hold: its share of max_server_conn_per_host."},
			func() float64 { return float64(f.member.Share()) }),
	)
	a.log.Info("joined the fleet", "instance", f.id, "share", f.member.Share())
	return f, nil
}

// start follows the control database until stopFleet. proxyAddr and
// adminAddr are the addresses the instance listens on, as the fleet lists
// them.
func (f *fleetPlane) start(proxyAddr, adminAddr string) {
	f.member.SetAddrs(httpURL(adminAddr), proxyAddr)
	ctx, cancel := context.WithCancel(context.Background())
	f.stop = cancel
	f.wg.Add(2)
	go func() { defer f.wg.Done(); f.cat.Run(ctx) }()
	go func() { defer f.wg.Done(); f.member.Run(ctx) }()
}

// close leaves the fleet (marks the instance stopped) and closes the pool.
func (f *fleetPlane) close() {
	if f.stop != nil {
		f.stop()
	}
	f.wg.Wait()
	f.pool.Close()
}

func httpURL(addr string) string {
	if addr == "" {
		return ""
	}
	return "http://" + addr
}

// instanceID is [catalog].instance_id, or the host name with a random
// suffix (new at each start, so a restarted instance is a new member).
func instanceID(configured string) string {
	if configured != "" {
		return configured
	}
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "cascata"
	}
	var b [3]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("%s-%s", host, hex.EncodeToString(b[:]))
}

// buildVersion is the module version or VCS revision of this binary.
func buildVersion() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			return s.Value[:12]
		}
	}
	return "devel"
}
