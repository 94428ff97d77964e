package fleettest

import (
	"bufio"
	"encoding/csv"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// haproxyConfig is the load balancer of docs/fleet.md: TCP to the proxy
// ports, the health check an HTTP GET of /readyz on each admin port with the
// admin token, checked every 200ms, out after 2 failures, in after 1
// success. A connection refused by an instance that is going away is tried
// again on another one (retries with redispatch).
const haproxyConfig = `global
    maxconn 4096
    stats socket %s mode 600 level admin

defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    # /readyz opens a connection to every project's primary: it may take
    # longer than the check interval.
    timeout check 2s
    retries 3
    option redispatch 1

frontend cascata
    bind %s
    default_backend cascata

backend cascata
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host cascata hdr Authorization "Bearer %s"
    http-check expect status 200
    default-server inter 200ms fastinter 200ms downinter 200ms fall 2 rise 1
%s`

// loadBalancer is an haproxy process in front of a fleet.
type loadBalancer struct {
	addr string
	sock string
	proc *proc
}

// haproxyBinary finds haproxy; a machine without it fails the test with the
// command that installs it, since the fleet is not tested without it.
func haproxyBinary(t testing.TB) string {
	t.Helper()
	if p, err := exec.LookPath("haproxy"); err == nil {
		return p
	}
	if _, err := os.Stat("/usr/sbin/haproxy"); err == nil {
		return "/usr/sbin/haproxy"
	}
	t.Fatal("haproxy is not installed: run `apt-get install -y haproxy` (scripts/install-postgres.sh does it when run as root)")
	return ""
}

// startHAProxy starts haproxy in front of the instances and waits until it
// sees all of them up; it is stopped when the test ends.
func startHAProxy(t *testing.T, insts []*instance) *loadBalancer {
	t.Helper()
	bin := haproxyBinary(t)
	dir := t.TempDir()
	lb := &loadBalancer{addr: freeAddr(t), sock: filepath.Join(dir, "haproxy.sock")}
	var servers strings.Builder
	for _, in := range insts {
		_, adminPort, _ := net.SplitHostPort(in.adminAddr)
		fmt.Fprintf(&servers, "    server %s %s check port %s\n", in.name, in.proxyAddr, adminPort)
	}
	cfgPath := filepath.Join(dir, "haproxy.cfg")
	cfg := fmt.Sprintf(haproxyConfig, lb.sock, lb.addr, adminToken, servers.String())
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	// -db: stay in the foreground, so the test owns the process.
	lb.proc = startProc(t, "haproxy", filepath.Join(dir, "haproxy.log"), nil, bin, "-db", "-f", cfgPath)
	t.Cleanup(func() {
		lb.proc.terminate(t, 5*time.Second)
		if t.Failed() {
			t.Logf("haproxy log:\n%s", lb.proc.logTail(100))
		}
	})
	names := make([]string, len(insts))
	for i, in := range insts {
		names[i] = in.name
	}
	lb.waitStatus(t, "UP", 10*time.Second, names...)
	return lb
}

// status returns haproxy's view of each server of the backend ("UP",
// "DOWN", "UP 1/2", ...), read from the stats socket.
func (lb *loadBalancer) status() (map[string]string, error) {
	if !lb.proc.running() {
		return nil, fmt.Errorf("haproxy exited:\n%s", lb.proc.logTail(20))
	}
	conn, err := net.DialTimeout("unix", lb.sock, time.Second)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := conn.Write([]byte("show stat\n")); err != nil {
		return nil, err
	}
	r := csv.NewReader(bufio.NewReader(conn))
	r.FieldsPerRecord = -1
	rows, err := r.ReadAll()
	if err != nil {
		return nil, err
	}
	if len(rows) == 0 {
		return nil, fmt.Errorf("show stat: no header")
	}
	header := rows[0]
	header[0] = strings.TrimPrefix(header[0], "# ")
	px, sv, st := slices.Index(header, "pxname"), slices.Index(header, "svname"), slices.Index(header, "status")
	if px < 0 || sv < 0 || st < 0 {
		return nil, fmt.Errorf("show stat: unexpected header %v", header)
	}
	out := map[string]string{}
	for _, row := range rows[1:] {
		if len(row) > st && row[px] == "cascata" && row[sv] != "BACKEND" && row[sv] != "FRONTEND" {
			out[row[sv]] = row[st]
		}
	}
	return out, nil
}

// waitStatus waits until haproxy reports every named server in state
// (UP or DOWN, transitions such as "UP 1/2" not counted).
func (lb *loadBalancer) waitStatus(t testing.TB, state string, within time.Duration, names ...string) time.Duration {
	t.Helper()
	return eventually(t, within, "haproxy servers "+strings.Join(names, ",")+" "+state, func() error {
		st, err := lb.status()
		if err != nil {
			return err
		}
		for _, n := range names {
			if st[n] != state {
				return fmt.Errorf("servers: %v", st)
			}
		}
		return nil
	})
}
