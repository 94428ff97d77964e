package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
)

// The admin plane of cascata: /metrics and GET /v1/pools, with the bearer token.

// admin GETs a path of the admin plane with the bearer token.
func (w *world) admin(ctx context.Context, path string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, w.adminURL+path, nil)
	if err != nil {
		return nil, fmt.Errorf("admin request: %w", err)
	}
	req.Header.Set("Authorization", "Bearer "+w.adminToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", path, err)
	}
	defer resp.Body.Close()
	var body bytes.Buffer
	if _, err := body.ReadFrom(resp.Body); err != nil {
		return nil, fmt.Errorf("GET %s: %w", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s: %s", path, resp.Status, bytes.TrimSpace(body.Bytes()))
	}
	return body.Bytes(), nil
}

// scrape reads the samples of the admin plane's /metrics: series (name
// with its labels, as written) to value.
func (w *world) scrape(ctx context.Context) (map[string]float64, error) {
	body, err := w.admin(ctx, "/metrics")
	if err != nil {
		return nil, err
	}
	out := map[string]float64{}
	for _, line := range strings.Split(string(body), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ') // label values may hold spaces, the value none
		if i < 0 {
			return nil, fmt.Errorf("/metrics line %q", line)
		}
		series, v := line[:i], line[i+1:]
		if out[series], err = strconv.ParseFloat(strings.TrimSpace(v), 64); err != nil {
			return nil, fmt.Errorf("parse %s %q: %w", series, v, err)
		}
	}
	return out, nil
}

// goMetrics reads go_goroutines and the Go heap and stack in use from the
// admin plane's /metrics.
func (w *world) goMetrics(ctx context.Context, r *reading) error {
	m, err := w.scrape(ctx)
	if err != nil {
		return err
	}
	goroutines, ok1 := m["go_goroutines"]
	heap, ok2 := m["go_memstats_heap_inuse_bytes"]
	stack, ok3 := m["go_memstats_stack_inuse_bytes"]
	if !ok1 || !ok2 || !ok3 {
		return errors.New("/metrics lacks go_goroutines or go_memstats_*_inuse_bytes")
	}
	r.goroutines = int(goroutines)
	r.heapKB = int64(heap) / 1024
	r.stackKB = int64(stack) / 1024
	return nil
}

// poolProjects lists the projects that have a pool (GET /v1/pools).
func (w *world) poolProjects(ctx context.Context) (map[string]bool, error) {
	body, err := w.admin(ctx, "/v1/pools")
	if err != nil {
		return nil, err
	}
	var list struct {
		Pools []struct {
			Project string `json:"project"`
		} `json:"pools"`
	}
	if err := json.Unmarshal(body, &list); err != nil {
		return nil, fmt.Errorf("decode /v1/pools: %w", err)
	}
	out := make(map[string]bool, len(list.Pools))
	for _, p := range list.Pools {
		out[p.Project] = true
	}
	return out, nil
}

// dialHist is cascata_server_dial_seconds summed over servers: backend
// logins so far by bucket (cumulative, as Prometheus keeps them).
type dialHist struct {
	at      time.Time
	count   float64
	buckets map[float64]float64 // upper bound in seconds -> logins at most that long
}

// dials reads cascata_server_dial_seconds from the admin plane's /metrics.
func (w *world) dials(ctx context.Context) (dialHist, error) {
	h := dialHist{at: time.Now(), buckets: map[float64]float64{}}
	m, err := w.scrape(ctx)
	if err != nil {
		return h, err
	}
	for series, n := range m {
		switch {
		case strings.HasPrefix(series, "cascata_server_dial_seconds_count{"):
			h.count += n
		case strings.HasPrefix(series, "cascata_server_dial_seconds_bucket{"):
			_, le, _ := strings.Cut(series, `le="`)
			le, _, _ = strings.Cut(le, `"`)
			if le == "+Inf" {
				continue
			}
			ub, err := strconv.ParseFloat(le, 64)
			if err != nil {
				return h, fmt.Errorf("parse bucket %q: %w", series, err)
			}
			h.buckets[ub] += n
		}
	}
	return h, nil
}

// dialWindow is what the backend logins between two readings were.
type dialWindow struct {
	n       float64       // logins
	perSec  float64       // logins per second
	p50     time.Duration // upper bound of the bucket holding the median; 0: beyond the last bucket
	p99     time.Duration
	last    time.Duration // the last bucket's upper bound
	measure bool          // both readings were taken
}

func (h dialHist) since(before dialHist) dialWindow {
	win := dialWindow{n: h.count - before.count, measure: true}
	if d := h.at.Sub(before.at).Seconds(); d > 0 {
		win.perSec = win.n / d
	}
	bounds := make([]float64, 0, len(h.buckets))
	for ub := range h.buckets {
		bounds = append(bounds, ub)
	}
	slices.Sort(bounds)
	if len(bounds) > 0 {
		win.last = seconds(bounds[len(bounds)-1])
	}
	quantile := func(q float64) time.Duration {
		for _, ub := range bounds {
			if win.n > 0 && h.buckets[ub]-before.buckets[ub] >= q*win.n {
				return seconds(ub)
			}
		}
		return 0
	}
	win.p50, win.p99 = quantile(0.5), quantile(0.99)
	return win
}

// String renders the window for the report: "logins (per s), p50 / p99".
func (win dialWindow) String() string {
	if !win.measure {
		return "—"
	}
	if win.n == 0 {
		return "0"
	}
	q := func(d time.Duration) string {
		if d == 0 {
			return fmt.Sprintf("> %s", win.last)
		}
		return fmt.Sprintf("≤ %s", d)
	}
	return fmt.Sprintf("%.0f (%.1f/s), %s / %s", win.n, win.perSec, q(win.p50), q(win.p99))
}

func seconds(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }
