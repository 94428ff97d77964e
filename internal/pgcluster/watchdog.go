package pgcluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"syscall"
)

// watchdogScript waits for the owner process ($1) to be gone, then stops
// the servers of the data directories it is given ($4...) with pg_ctl ($2)
// and removes the cluster's directory ($3, "" to keep it). It looks for
// /proc/PID, which a process of another user may see but not signal.
const watchdogScript = `owner=$1 pgctl=$2 dir=$3
shift 3
while [ -d "/proc/$owner" ]; do sleep 1; done
for d in "$@"; do "$pgctl" stop -D "$d" -m immediate >/dev/null 2>&1; done
if [ -n "$dir" ]; then rm -rf "$dir"; fi
`

// StopWhenGone starts a small process of its own session that stops the
// cluster's servers (and removes a temporary directory Start made) within
// about a second of process pid's end, however it ends: a test binary
// killed by a timeout or a fuzzing coordinator does not run its own clean-up.
// The returned function ends the watch, for an owner that stops the cluster
// itself.
func (c *Cluster) StopWhenGone(pid int) (unwatch func(), err error) {
	if _, err := os.Stat("/proc/self"); err != nil {
		return nil, fmt.Errorf("watch cluster: no /proc to watch process %d: %w", pid, err)
	}
	args := []string{"-c", watchdogScript, "cascata-pg-watchdog", strconv.Itoa(pid), c.env.bins.PgCtl, ""}
	if c.tempDir && !c.env.opts.KeepDir {
		args[5] = c.Dir
	}
	for _, s := range []*Server{c.Replica, c.Primary} {
		if s != nil {
			args = append(args, s.DataDir)
		}
	}
	cmd := c.env.run.command(context.Background(), "/bin/sh", args...)
	cmd.Dir = "/"
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setsid = true // a signal to the owner's process group leaves it be
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("watch cluster: %w", err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	return func() {
		if err := cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
			c.env.log.Warn("stop the cluster's watchdog", "error", err)
		}
		<-done
	}, nil
}
