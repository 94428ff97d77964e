package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
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

// goMetrics reads go_goroutines and the Go heap and stack in use from the
// admin plane's /metrics.
func (w *world) goMetrics(ctx context.Context, r *reading) error {
	body, err := w.admin(ctx, "/metrics")
	if err != nil {
		return err
	}
	want := map[string]*float64{"go_goroutines": new(float64), "go_memstats_heap_inuse_bytes": new(float64), "go_memstats_stack_inuse_bytes": new(float64)}
	seen := 0
	for _, line := range strings.Split(string(body), "\n") {
		name, v, ok := strings.Cut(line, " ")
		dst := want[name]
		if !ok || dst == nil {
			continue
		}
		if *dst, err = strconv.ParseFloat(strings.TrimSpace(v), 64); err != nil {
			return fmt.Errorf("parse %s %q: %w", name, v, err)
		}
		seen++
	}
	if seen != len(want) {
		return errors.New("/metrics lacks go_goroutines or go_memstats_*_inuse_bytes")
	}
	r.goroutines = int(*want["go_goroutines"])
	r.heapKB = int64(*want["go_memstats_heap_inuse_bytes"]) / 1024
	r.stackKB = int64(*want["go_memstats_stack_inuse_bytes"]) / 1024
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
