package fleettest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cascata/admin"
	"cascata/auth"
	"cascata/internal/pgtest"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

const (
	// instanceTimeout is [catalog].instance_timeout of every fleet here:
	// short, so that a killed instance stops counting within a test.
	instanceTimeout = 3 * time.Second
	// shutdownTimeout is [proxy].shutdown_timeout: how long SIGTERM lets
	// clients finish.
	shutdownTimeout = 2 * time.Second
	// startTimeout bounds an instance's start until /healthz answers.
	startTimeout = 30 * time.Second
)

// project is a [[projects]] entry on the data cluster.
type project struct {
	ref      string
	login    string // login role; "" is authenticator
	replica  bool   // with the data cluster's replica in replica_urls
	poolSize int
}

func (p project) loginUser() string {
	if p.login == "" {
		return "authenticator"
	}
	return p.login
}

func (p project) databaseURL() string {
	return data.Primary.URL(p.loginUser(), loginPassword, p.ref)
}

func (p project) toml() string {
	var b strings.Builder
	fmt.Fprintf(&b, "\n[[projects]]\nref = %q\ndatabase_url = %q\nowner_url = %q\njwt_secret = %q\n",
		p.ref, p.databaseURL(), data.Primary.SuperuserURL(p.ref), jwtSecret(p.ref))
	if p.replica {
		fmt.Fprintf(&b, "replica_urls = [%q]\n", data.Replica.URL(p.loginUser(), loginPassword, p.ref))
	}
	if p.poolSize > 0 {
		fmt.Fprintf(&b, "pool_size = %d\n", p.poolSize)
	}
	return b.String()
}

func jwtSecret(ref string) string { return "fleet-test-secret-0123456789-abcdef-" + ref }

// token mints a JWT of role for ref.
func token(t testing.TB, ref, role string) string {
	t.Helper()
	tok, err := auth.Mint(auth.MintKey{Secret: []byte(jwtSecret(ref))}, map[string]any{"role": role, "ref": ref}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// clientURL is the connection string of an authenticated client of ref
// through the proxy (or load balancer) at addr.
func clientURL(t testing.TB, addr, ref string) string {
	t.Helper()
	return roleURL(t, addr, ref, "authenticated")
}

// urls is roleURL through each instance's proxy port, by instance name,
// made before goroutines need them (a failing mint ends the test).
func urls(t testing.TB, insts []*instance, ref, role string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, in := range insts {
		out[in.name] = roleURL(t, in.proxyAddr, ref, role)
	}
	return out
}

// clientAppName is the application_name of every test client; the proxy
// gives it to the backends that serve them, which tells them apart from
// the connections cascata opens for itself.
const clientAppName = "fleettest"

// roleURL is the connection string of a client of ref with a token of role.
func roleURL(t testing.TB, addr, ref, role string) string {
	t.Helper()
	return fmt.Sprintf("postgres://%s:%s@%s/%s?sslmode=disable&connect_timeout=5&application_name=%s",
		role, url.QueryEscape(token(t, ref, role)), addr, ref, clientAppName)
}

// fleetOptions describes the instances a test starts.
type fleetOptions struct {
	n        int
	projects []project
	// hostCap is [proxy].max_server_conn_per_host; 0 keeps the default.
	hostCap int
	// control is the control database URL; "" creates a fresh one.
	control string
	// controlVia, by instance name, is the address through which that
	// instance reaches the control database (a relay the test can cut).
	controlVia map[string]string
}

// fleet is the instances of one test sharing one control database.
type fleet struct {
	t       *testing.T
	control string
	insts   []*instance
}

// instance is one cascata process with its own ports and state directory.
type instance struct {
	name      string
	cfgPath   string
	logPath   string
	proxyAddr string
	adminAddr string
	proc      *proc // the current process; a restart replaces it
}

var controlDBs atomic.Int32

var (
	portsMu sync.Mutex
	ports   = map[int]bool{}
)

// freeAddr is a free loopback address no other instance or load balancer of
// this run was given: a port just closed may be handed out twice in a row.
func freeAddr(t testing.TB) string {
	t.Helper()
	portsMu.Lock()
	defer portsMu.Unlock()
	for {
		p := pgtest.FreePort(t)
		if !ports[p] {
			ports[p] = true
			return net.JoinHostPort("127.0.0.1", strconv.Itoa(p))
		}
	}
}

// newControlDB creates an empty database on the control cluster.
func newControlDB(t *testing.T) string {
	t.Helper()
	name := fmt.Sprintf("ctl_%d", controlDBs.Add(1))
	pgtest.Exec(t, control.Primary.SuperuserURL("postgres"), "CREATE DATABASE "+name)
	return control.Primary.SuperuserURL(name)
}

// newFleet writes the configuration of n instances and starts them one
// after the other; they are stopped when the test ends.
func newFleet(t *testing.T, o fleetOptions) *fleet {
	t.Helper()
	f := &fleet{t: t, control: o.control}
	if f.control == "" {
		f.control = newControlDB(t)
	}
	for i := range o.n {
		f.insts = append(f.insts, f.configure(fmt.Sprintf("i%d", i+1), o))
	}
	for _, in := range f.insts {
		in.start(t)
	}
	for _, in := range f.insts {
		in.waitHealthy(t)
	}
	return f
}

// configure writes one instance's cascata.toml on fresh loopback ports.
func (f *fleet) configure(name string, o fleetOptions) *instance {
	t := f.t
	t.Helper()
	dir := t.TempDir()
	in := &instance{
		name:      name,
		cfgPath:   filepath.Join(dir, "cascata.toml"),
		logPath:   filepath.Join(dir, "cascata.log"),
		proxyAddr: freeAddr(t),
		adminAddr: freeAddr(t),
	}
	var b strings.Builder
	fmt.Fprintf(&b, "[proxy]\nlisten = %q\nshutdown_timeout = %q\nquery_wait_timeout = \"20s\"\n", in.proxyAddr, shutdownTimeout)
	if o.hostCap > 0 {
		fmt.Fprintf(&b, "max_server_conn_per_host = %d\n", o.hostCap)
	}
	fmt.Fprintf(&b, "\n[admin]\nlisten = %q\ntoken_env = %q\n", in.adminAddr, adminTokenEnv)
	fmt.Fprintf(&b, "\n[state]\ndir = %q\n", filepath.Join(dir, "state"))
	controlURL := f.control
	if via := o.controlVia[name]; via != "" {
		u, err := url.Parse(controlURL)
		if err != nil {
			t.Fatal(err)
		}
		u.Host = via
		controlURL = u.String()
	}
	fmt.Fprintf(&b, "\n[catalog]\nurl = %q\ninstance_timeout = %q\n", controlURL, instanceTimeout)
	for _, p := range o.projects {
		b.WriteString(p.toml())
	}
	if err := os.WriteFile(in.cfgPath, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		in.terminate(t)
		if t.Failed() && in.proc != nil {
			t.Logf("%s log (%s), last lines:\n%s", in.name, in.logPath, in.proc.logTail(40))
		}
	})
	return in
}

// start runs the process (again, after a stop, on the same ports); it does
// not wait for it to serve.
func (in *instance) start(t testing.TB) {
	t.Helper()
	in.proc = startProc(t, in.name, in.logPath, []string{adminTokenEnv + "=" + adminToken}, cascataBin, "serve", "-config", in.cfgPath)
}

// waitHealthy waits until /healthz answers 200; the process exiting first
// fails the test with its log.
func (in *instance) waitHealthy(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(startTimeout)
	client := &http.Client{Timeout: time.Second}
	for {
		resp, err := client.Get("http://" + in.adminAddr + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if !in.proc.running() {
			t.Fatalf("%s exited while starting: %v\n%s", in.name, in.proc.cmd.ProcessState, in.proc.logTail(30))
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no /healthz within %v: %v\n%s", in.name, startTimeout, err, in.proc.logTail(30))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// terminate sends SIGTERM and waits for the exit, SIGKILL after the
// shutdown timeout and a margin. It returns how long the exit took.
func (in *instance) terminate(t testing.TB) time.Duration {
	return in.proc.terminate(t, shutdownTimeout+5*time.Second)
}

// kill sends SIGKILL and waits for the exit.
func (in *instance) kill() { in.proc.kill() }

// logLines returns the log lines (of every start) that match re.
func (in *instance) logLines(re *regexp.Regexp) []string {
	var out []string
	for _, l := range in.proc.logLines() {
		if re.MatchString(l) {
			out = append(out, l)
		}
	}
	return out
}

// adminResponse is one answer of the admin plane.
type adminResponse struct {
	status   int
	body     []byte
	instance string // X-Cascata-Instance
}

func (r adminResponse) String() string {
	return fmt.Sprintf("%d %s", r.status, strings.TrimSpace(string(r.body)))
}

// call sends one admin request, given 30s at most; it never fails the
// test, so goroutines may use it.
func (in *instance) call(ctx context.Context, method, path string, body any) (adminResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return adminResponse{}, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://"+in.adminAddr+path, rd)
	if err != nil {
		return adminResponse{}, err
	}
	req.Header.Set("Authorization", "Bearer "+adminToken)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return adminResponse{}, fmt.Errorf("%s %s on %s: %w", method, path, in.name, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return adminResponse{}, fmt.Errorf("%s %s on %s: %w", method, path, in.name, err)
	}
	return adminResponse{status: resp.StatusCode, body: b, instance: resp.Header.Get("X-Cascata-Instance")}, nil
}

// admin sends one admin request and fails the test unless the status is
// want; out, when not nil, receives the JSON body.
func (in *instance) admin(t testing.TB, method, path string, body any, want int, out any) adminResponse {
	t.Helper()
	r, err := in.call(t.Context(), method, path, body)
	if err != nil {
		t.Fatal(err)
	}
	if r.status != want {
		t.Fatalf("%s %s on %s: %s, want %d", method, path, in.name, r, want)
	}
	if out != nil {
		if err := json.Unmarshal(r.body, out); err != nil {
			t.Fatalf("%s %s on %s: %v in %s", method, path, in.name, err, r.body)
		}
	}
	return r
}

// instanceView is the part of a GET /v1/instances entry the tests read.
type instanceView struct {
	ID       string `json:"id"`
	AdminURL string `json:"admin_url"`
	Live     bool   `json:"live"`
	Share    int    `json:"share"`
}

// instances is GET /v1/instances, taken as {"instances": [...]} or a bare
// array, the two shapes the admin plane's lists come in.
func (in *instance) instances(t testing.TB) []instanceView {
	t.Helper()
	r := in.admin(t, "GET", "/v1/instances", nil, http.StatusOK, nil)
	var wrapped struct {
		Instances []instanceView `json:"instances"`
	}
	if err := json.Unmarshal(r.body, &wrapped); err == nil && wrapped.Instances != nil {
		return wrapped.Instances
	}
	var list []instanceView
	if err := json.Unmarshal(r.body, &list); err != nil {
		t.Fatalf("GET /v1/instances on %s: %v in %s", in.name, err, r.body)
	}
	return list
}

// liveCount is how many instances GET /v1/instances shows live.
func (in *instance) liveCount(t testing.TB) int {
	t.Helper()
	n := 0
	for _, v := range in.instances(t) {
		if v.Live {
			n++
		}
	}
	return n
}

// poll calls cond every 20ms until it returns nil or within passes. It
// returns when the attempt that succeeded began (an attempt may itself take
// a while on a loaded machine) or cond's last error.
func poll(within time.Duration, cond func() error) (time.Duration, error) {
	start := time.Now()
	for {
		began := time.Since(start)
		err := cond()
		switch {
		case err == nil && began <= within:
			return began, nil
		case err == nil:
			return began, fmt.Errorf("held only at an attempt begun after %v", began.Round(time.Millisecond))
		case time.Since(start) > within:
			return began, err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// eventually is poll that fails the test when cond never holds in time.
func eventually(t testing.TB, within time.Duration, what string, cond func() error) time.Duration {
	t.Helper()
	took, err := poll(within, cond)
	if err != nil {
		t.Fatalf("%s: not within %v: %v", what, within, err)
	}
	return took
}

// everywhere polls cond on every instance at once until it holds on each,
// counting within from since: an instance checked after another would
// otherwise be given less time. It fails the test naming the instances
// where cond did not hold in time, and logs when it held on each.
func everywhere(t testing.TB, insts []*instance, since time.Time, within time.Duration, what string, cond func(in *instance) error) {
	t.Helper()
	took := make([]time.Duration, len(insts))
	errs := make([]error, len(insts))
	var wg sync.WaitGroup
	for i, in := range insts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			offset := time.Since(since)
			d, err := poll(within-offset, func() error { return cond(in) })
			took[i], errs[i] = offset+d, err
		}()
	}
	wg.Wait()
	for i, in := range insts {
		if errs[i] != nil {
			t.Errorf("%s on %s: not within %v: %v", what, in.name, within, errs[i])
		} else {
			t.Logf("%s on %s after %v", what, in.name, took[i].Round(time.Millisecond))
		}
	}
	if t.Failed() {
		t.FailNow()
	}
}

// project is GET /v1/projects/{ref} without failing the test.
func (in *instance) project(ctx context.Context, ref string) (admin.ProjectView, error) {
	var v admin.ProjectView
	r, err := in.call(ctx, "GET", "/v1/projects/"+ref, nil)
	if err != nil {
		return v, err
	}
	if r.status != http.StatusOK {
		return v, fmt.Errorf("GET /v1/projects/%s: %v", ref, r)
	}
	return v, json.Unmarshal(r.body, &v)
}

// waitLive waits until every instance of the fleet shows n live instances.
func (f *fleet) waitLive(t testing.TB, n int) {
	t.Helper()
	for _, in := range f.insts {
		eventually(t, 2*instanceTimeout, fmt.Sprintf("%s sees %d live instances", in.name, n), func() error {
			if got := in.liveCount(t); got != n {
				return fmt.Errorf("%d live: %+v", got, in.instances(t))
			}
			return nil
		})
	}
}

// waitShares waits until every live instance holds an equal share of
// hostCap; not getting there is an error of the test, which goes on.
func (f *fleet) waitShares(t testing.TB, hostCap int) {
	t.Helper()
	var views []instanceView
	took, err := poll(4*instanceTimeout, func() error {
		views = f.insts[0].instances(t)
		want := hostCap / len(f.insts)
		for _, v := range views {
			if v.Live && v.Share != want {
				return fmt.Errorf("shares %+v, want %d each", views, want)
			}
		}
		return nil
	})
	if err != nil {
		t.Errorf("the fleet's shares of max_server_conn_per_host did not settle within %v: %v", 4*instanceTimeout, err)
		return
	}
	t.Logf("shares of max_server_conn_per_host settled %v after the fleet was up: %+v", took.Round(time.Millisecond), views)
}

// selectOne connects to ref through addr and runs SELECT 1.
func selectOne(ctx context.Context, connURL string) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, connURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var one int
	return conn.QueryRow(ctx, "SELECT 1").Scan(&one)
}

// sqlState is the SQLSTATE of err, "" when it is not a server error.
func sqlState(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}

// sameDatabase reports whether two postgres URLs name the same host, port
// and database (the admin plane masks passwords, so URLs differ there).
func sameDatabase(a, b string) bool {
	ua, err1 := url.Parse(a)
	ub, err2 := url.Parse(b)
	return err1 == nil && err2 == nil && ua.Host == ub.Host && ua.Path == ub.Path
}
