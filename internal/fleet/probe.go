package fleet

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/url"
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

// instanceHeader is the admin plane's response header naming the instance
// that answered (admin.Handler sets it on every response, /healthz too).
const instanceHeader = "X-Cascata-Instance"

// verdict is what a probe of a stale instance's addresses found.
type verdict int

const (
	// verdictUnknown: no answer in time, or nothing to ask: it may be alive.
	verdictUnknown verdict = iota
	// verdictAlive: it answered as itself.
	verdictAlive
	// verdictGone: its address refuses connections or another instance
	// holds it.
	verdictGone
)

// candidate is a stale instance that still holds a share.
type candidate struct {
	id, adminURL, proxyURL string
	heartbeat              time.Time
}

// judged is a verdict on a candidate at one heartbeat of it.
type judged struct {
	heartbeat time.Time
	verdict   verdict
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

// probe asks a candidate's admin address (GET /healthz, whose answer names
// the instance) or, with no admin plane, its proxy address (a refused
// connection is the only verdict there). Any other instance answering,
// the asking one included, holds the candidate's port.
func probe(ctx context.Context, client *http.Client, c candidate) verdict {
	if c.adminURL != "" {
		u, err := url.Parse(c.adminURL)
		if err != nil {
			return verdictUnknown
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.JoinPath("healthz").String(), nil)
		if err != nil {
			return verdictUnknown
		}
		resp, err := client.Do(req)
		if err != nil {
			return refused(err)
		}
		resp.Body.Close()
		switch id := resp.Header.Get(instanceHeader); id {
		case c.id:
			return verdictAlive
		case "":
			return verdictUnknown // not an admin plane of cascata
		default:
			return verdictGone
		}
	}
	if c.proxyURL == "" {
		return verdictUnknown
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", c.proxyURL)
	if err != nil {
		return refused(err)
	}
	conn.Close()
	return verdictUnknown // something listens there: maybe the instance
}

// refused is verdictGone for a refused connection, verdictUnknown for any
// other failure (a timeout is no evidence).
func refused(err error) verdict {
	if errors.Is(err, syscall.ECONNREFUSED) {
		return verdictGone
	}
	return verdictUnknown
}
