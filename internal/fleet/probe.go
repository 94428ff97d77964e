package fleet

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"strings"
	"syscall"
	"time"
)

// A stale instance (no heartbeat for instance_timeout, not marked stopped)
// may be dead, or alive and cut off from the control database alone,
// holding its share. Its share is handed to the others only once it is
// known to be gone, which is knowable only where it ran: in the same
// network namespace of the same boot (its place), its addresses mean what
// they meant to it. There, an address that refuses connections, or that
// another instance answers, says its process is gone: a port is held by
// one process. Elsewhere an address may name another machine, a container
// of the same image, or a sidecar: nothing it says there is evidence.

// InstanceHeader is the admin plane's response header naming the instance
// that answered (admin.Handler sets it on every response, /healthz too):
// the probes read it.
const InstanceHeader = "X-Cascata-Instance"

// candidate is a stale instance that still holds a share.
type candidate struct {
	id, adminURL, proxyURL string
	heartbeat              time.Time
}

// thisPlace names the network namespace of this boot of this machine: ""
// where that cannot be read (then no stale instance is ever judged here).
func thisPlace() string {
	boot, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	ns, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(boot)) + "/" + ns
}

// foundGone asks a candidate's admin address (GET /healthz, whose answer
// names the instance) or, with no admin plane, its proxy address, and
// reports whether its process is gone: the connection is refused, or
// another instance (the asking one included) answers there. No answer in
// time, an answer as itself, or nothing to ask leaves it be.
func foundGone(ctx context.Context, client *http.Client, c candidate) bool {
	if c.adminURL != "" {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(c.adminURL, "/")+"/healthz", nil)
		if err != nil {
			return false
		}
		resp, err := client.Do(req)
		if err != nil {
			return errors.Is(err, syscall.ECONNREFUSED)
		}
		resp.Body.Close()
		id := resp.Header.Get(InstanceHeader)
		return id != "" && id != c.id // "": not an admin plane of cascata
	}
	if c.proxyURL == "" {
		return false
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", c.proxyURL)
	if err != nil {
		return errors.Is(err, syscall.ECONNREFUSED)
	}
	conn.Close() // something listens there: maybe the instance
	return false
}
