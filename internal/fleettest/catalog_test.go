package fleettest

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"testing"
	"time"

	"cascata/admin"
	"cascata/internal/pgtest"
)

// propagation is how soon a catalog change made through one instance must
// be in force on every other one.
const propagation = time.Second

// projectBody is a POST /v1/projects body for a database of the data
// cluster.
func projectBody(ref string) admin.ProjectRequest {
	return admin.ProjectRequest{
		Ref:         ref,
		DatabaseURL: project{ref: ref}.databaseURL(),
		OwnerURL:    data.Primary.SuperuserURL(ref),
		JWTSecret:   jwtSecret(ref),
		PoolSize:    5,
	}
}

func TestProjectChangeReachesEveryInstance(t *testing.T) {
	f := newFleet(t, fleetOptions{n: 3})
	i1, i2, i3 := f.insts[0], f.insts[1], f.insts[2]

	// Every admin answer names the instance that gave it, and each
	// instance sees the other two.
	ids := map[string]bool{}
	for _, in := range f.insts {
		r := in.admin(t, "GET", "/v1/projects", nil, http.StatusOK, nil)
		if r.instance == "" {
			t.Errorf("%s: no X-Cascata-Instance header", in.name)
		}
		ids[r.instance] = true
	}
	if len(ids) != 3 {
		t.Errorf("X-Cascata-Instance of three instances: %v, want three different ids", ids)
	}
	f.waitLive(t, 3)

	// Registered through i1: i2 and i3 let a client in within a second.
	i1.admin(t, "POST", "/v1/projects", projectBody(refA), http.StatusCreated, nil)
	clients := urls(t, f.insts, refA, "authenticated")
	everywhere(t, []*instance{i2, i3}, time.Now(), propagation, "project registered on i1 reachable", func(in *instance) error {
		return selectOne(t.Context(), clients[in.name])
	})

	// Changed through i3: every instance shows it, and the roles change is
	// in force for clients too (service_role is no longer allowed).
	roles := []string{"anon", "authenticated"}
	poolSize := 7
	i3.admin(t, "PATCH", "/v1/projects/"+refA, admin.ProjectPatch{PoolSize: &poolSize, Roles: &roles}, http.StatusOK, nil)
	patched := time.Now()
	everywhere(t, f.insts, patched, propagation, "PATCH on i3 visible", func(in *instance) error {
		v, err := in.project(t.Context(), refA)
		if err == nil && (v.PoolSize != poolSize || !slices.Equal(v.Roles, roles)) {
			err = fmt.Errorf("pool_size %d roles %v", v.PoolSize, v.Roles)
		}
		return err
	})
	services := urls(t, f.insts, refA, "service_role")
	everywhere(t, f.insts, patched, propagation, "service_role refused after the PATCH", func(in *instance) error {
		err := selectOne(t.Context(), services[in.name])
		if sqlState(err) != "28000" {
			return fmt.Errorf("service_role client: %v, want SQLSTATE 28000", err)
		}
		return nil
	})

	// Removed through i2: unknown everywhere.
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	r, err := i2.call(ctx, "DELETE", "/v1/projects/"+refA, nil)
	if err != nil || r.status/100 != 2 {
		t.Fatalf("DELETE on i2: %v %v", r, err)
	}
	everywhere(t, f.insts, time.Now(), propagation, "project deleted on i2 unknown", func(in *instance) error {
		err := selectOne(t.Context(), clients[in.name])
		if sqlState(err) != "3D000" {
			return fmt.Errorf("client: %v, want SQLSTATE 3D000", err)
		}
		return nil
	})
	for _, in := range f.insts {
		in.admin(t, "GET", "/v1/projects/"+refA, nil, http.StatusNotFound, nil)
	}
}

// migrationLog matches log lines that speak of migrations.
var migrationLog = regexp.MustCompile(`(?i)migrat`)

// claimsLog matches log lines about installing cascata.claims().
var claimsLog = regexp.MustCompile(`cascata\.claims\(\)`)

// errorLog matches log lines at level ERROR or that report an error.
var errorLog = regexp.MustCompile(`level=ERROR|(?i)\berror\b`)

func TestSimultaneousStartOnEmptyCatalog(t *testing.T) {
	// newFleet starts every process before it waits for any, so both
	// migrate the empty control database at the same moment.
	// Their project's database has never been served either: both install
	// cascata.claims() in it at the same moment, and clients of both must
	// get claims that function accepts.
	f := newFleet(t, fleetOptions{n: 2, projects: []project{{ref: refFresh}}})
	for _, in := range f.insts {
		var role string
		c := pgtest.Connect(t, clientURL(t, in.proxyAddr, refFresh))
		if err := c.QueryRow(t.Context(), "SELECT cascata.claims()->>'role'").Scan(&role); err != nil || role != "authenticated" {
			t.Errorf("cascata.claims() through %s: %q, %v; want the role claim; the instance logged: %q",
				in.name, role, err, in.logLines(claimsLog))
		}
		for _, l := range in.logLines(migrationLog) {
			if errorLog.MatchString(l) {
				t.Errorf("%s logged a migration error: %s", in.name, l)
			}
		}
	}
	f.waitLive(t, 2)

	conn := pgtest.Connect(t, f.control)
	rows, err := conn.Query(t.Context(), `SELECT component, version, count(*) FROM cascata_control.migrations GROUP BY 1, 2 ORDER BY 1, 2`)
	if err != nil {
		t.Fatal(err)
	}
	next := map[string]int{}
	for rows.Next() {
		var component string
		var version, n int
		if err := rows.Scan(&component, &version, &n); err != nil {
			t.Fatal(err)
		}
		if n != 1 {
			t.Errorf("migration %s %d recorded %d times", component, version, n)
		}
		if version != next[component]+1 {
			t.Errorf("migration %s: version %d follows %d", component, version, next[component])
		}
		next[component] = version
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if len(next) == 0 {
		t.Fatal("cascata_control.migrations is empty")
	}
	b, _ := json.Marshal(next)
	t.Logf("migrated components and versions: %s", b)
}

func TestControlDatabaseRestart(t *testing.T) {
	// Busy clients of the cap project want more backends than each share:
	// the cap must hold across the outage too, when every heartbeat has
	// gone stale.
	f := newFleet(t, fleetOptions{n: 3, hostCap: hostCap, projects: []project{capProject}})
	i1, i2 := f.insts[0], f.insts[1]
	f.waitLive(t, 3)
	f.waitShares(t, hostCap)
	lb := startHAProxy(t, f.insts)
	sampler := sampleBackends(t)
	load := startClients(t, clientURL(t, lb.addr, refCap), 60, 20, busyQuery)
	load.waitQueries(t, 200, 10*time.Second)
	start := time.Now()

	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	if err := control.Primary.Stop(ctx, "fast"); err != nil {
		t.Fatal(err)
	}
	// Later tests need the control cluster whatever happens here.
	t.Cleanup(func() {
		sctx, scancel := context.WithTimeout(context.Background(), time.Minute)
		defer scancel()
		if err := control.Primary.Start(sctx); err != nil {
			t.Errorf("start control cluster again: %v", err)
		}
	})
	stopped := time.Now()

	// During the outage: writes refused with 503, reads and clients served.
	poolSize := 9
	for _, w := range []struct {
		method, path string
		body         any
	}{
		{"POST", "/v1/projects", projectBody(refLate)},
		{"PATCH", "/v1/projects/" + refCap, admin.ProjectPatch{PoolSize: &poolSize}},
		{"POST", "/v1/projects/" + refCap + "/pause", nil},
	} {
		wctx, wcancel := context.WithTimeout(ctx, 15*time.Second)
		r, err := i1.call(wctx, w.method, w.path, w.body)
		wcancel()
		if err != nil || r.status != http.StatusServiceUnavailable {
			t.Errorf("%s %s during the outage: %v %v, want 503", w.method, w.path, r, err)
		}
	}
	i2.admin(t, "GET", "/v1/projects/"+refCap, nil, http.StatusOK, nil)
	load.waitQueries(t, 200, 10*time.Second)
	// The outage outlasts instance_timeout, so every heartbeat is stale when
	// the control database comes back.
	<-time.After(time.Until(stopped.Add(instanceTimeout + 500*time.Millisecond)))
	if st, err := lb.status(); err != nil {
		t.Error(err)
	} else {
		for name, s := range st {
			if s != "UP" {
				t.Errorf("haproxy took %s out during the outage: %s", name, s)
			}
		}
	}
	if err := control.Primary.Start(ctx); err != nil {
		t.Fatal(err)
	}
	restarted := time.Now()
	t.Logf("control database down from +%v to +%v since sampling began", stopped.Sub(sampler.start).Round(time.Millisecond), restarted.Sub(sampler.start).Round(time.Millisecond))

	// The first write the fleet takes after the restart reaches everyone.
	took := eventually(t, 15*time.Second, "POST /v1/projects accepted after the restart", func() error {
		r, err := i1.call(ctx, "POST", "/v1/projects", projectBody(refLate))
		switch {
		case err != nil:
			return err
		case r.status == http.StatusCreated:
			return nil
		case r.status == http.StatusConflict:
			t.Errorf("POST answered with an error earlier, yet the project was created: %v", r)
			return nil
		}
		return fmt.Errorf("%v", r)
	})
	t.Logf("admin writes accepted %v after the control database started", took.Round(time.Millisecond))
	// Its catalog entry, that is: its clients would queue behind the busy
	// clients for a backend of the same host until the load stops.
	everywhere(t, f.insts, time.Now(), 3*time.Second, "project registered after the restart known", func(in *instance) error {
		_, err := in.project(t.Context(), refLate)
		return err
	})

	// Long enough after the restart for every instance to beat again.
	<-time.After(time.Until(restarted.Add(2 * time.Second)))
	load.waitQueries(t, 100, 10*time.Second)
	load.finish()
	sampler.check(t)
	t.Logf("clients through haproxy: %s", load.summary())
	if errs, fresh, inConn := load.errors(); fresh+inConn > 0 {
		t.Errorf("clients saw errors (control database stopped at +%v, started at +%v):\n%s",
			stopped.Sub(start).Round(time.Millisecond), restarted.Sub(start).Round(time.Millisecond), describe(errs, start))
	}
	for _, in := range f.insts {
		if err := selectOne(t.Context(), clientURL(t, in.proxyAddr, refLate)); err != nil {
			t.Errorf("client of the project registered after the restart, through %s: %v", in.name, err)
		}
	}
}
