package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"cascata/admin"
	"cascata/internal/jobs"
)

// The ops subcommands talk to a running cascata's admin plane:
//
//	cascata eject  -admin URL -project REF -target-url URL -target-owner-url URL [-replica-url URL]... [-method logical|dump] [-wait]
//	cascata pause  -admin URL -project REF
//	cascata resume -admin URL -project REF
//	cascata jobs   -admin URL [-wait] [ID]
//
// The bearer token comes from CASCATA_ADMIN_TOKEN; -admin defaults to
// CASCATA_ADMIN_URL, else http://127.0.0.1:8080.

// adminClient is a small client of the admin plane.
type adminClient struct {
	base  string
	token string
	http  *http.Client
}

func adminFlags(fs *flag.FlagSet) *string {
	def := os.Getenv("CASCATA_ADMIN_URL")
	if def == "" {
		def = "http://127.0.0.1:8080"
	}
	return fs.String("admin", def, "admin plane base URL (or CASCATA_ADMIN_URL)")
}

func newAdminClient(base string) (*adminClient, error) {
	tok := os.Getenv("CASCATA_ADMIN_TOKEN")
	if tok == "" {
		return nil, errors.New("CASCATA_ADMIN_TOKEN is not set")
	}
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("-admin must be an http(s) URL, not %q", base)
	}
	return &adminClient{base: strings.TrimRight(base, "/"), token: tok, http: &http.Client{Timeout: 2 * time.Minute}}, nil
}

// call sends a JSON request and decodes a JSON answer into out (if not nil).
func (c *adminClient) call(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("encode request: %w", err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return fmt.Errorf("request: %w", err)
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("%s %s: read answer: %w", method, path, err)
	}
	if resp.StatusCode >= 300 {
		var eb admin.ErrorBody
		if json.Unmarshal(data, &eb) == nil && eb.Error != "" {
			return fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, eb.Error)
		}
		return fmt.Errorf("%s %s: %s", method, path, resp.Status)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("%s %s: decode answer: %w", method, path, err)
		}
	}
	return nil
}

// waitJob polls a job until it finishes, printing phase changes to w.
func (c *adminClient) waitJob(ctx context.Context, id string, w io.Writer) (jobs.Status, error) {
	last := ""
	for {
		var st jobs.Status
		if err := c.call(ctx, http.MethodGet, "/v1/jobs/"+url.PathEscape(id), nil, &st); err != nil {
			return st, err
		}
		if st.Phase != last {
			fmt.Fprintf(w, "job %s: %s (%s, %.0f%%)\n", id, st.Phase, st.State, st.Progress*100)
			last = st.Phase
		}
		if !st.Active() {
			return st, nil
		}
		select {
		case <-ctx.Done():
			return st, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// stringList is a repeatable string flag.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// cmdEject starts an ejection through the admin plane.
func cmdEject(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("eject", flag.ContinueOnError)
	fs.SetOutput(stderr)
	base := adminFlags(fs)
	ref := fs.String("project", "", "project ref")
	target := fs.String("target-url", "", "the target's URL as the login role (becomes database_url)")
	owner := fs.String("target-owner-url", "", "the target's URL with owner rights")
	method := fs.String("method", "logical", `"logical" (short pause) or "dump" (paused during the copy)`)
	wait := fs.Bool("wait", false, "wait for the job to finish")
	var replicas stringList
	fs.Var(&replicas, "replica-url", "a replica URL of the target (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *ref == "" || *target == "" || *owner == "" {
		return errors.New("-project, -target-url and -target-owner-url are required")
	}
	c, err := newAdminClient(*base)
	if err != nil {
		return err
	}
	ctx := context.Background()
	var started admin.JobStarted
	req := admin.EjectRequest{TargetURL: *target, TargetOwnerURL: *owner, ReplicaURLs: replicas, Method: *method}
	if err := c.call(ctx, http.MethodPost, "/v1/projects/"+url.PathEscape(*ref)+"/eject", req, &started); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "ejection job %s started\n", started.Job)
	if !*wait {
		return nil
	}
	st, err := c.waitJob(ctx, started.Job, stdout)
	if err != nil {
		return err
	}
	if st.State == jobs.Failed {
		return fmt.Errorf("job %s failed: %s", st.ID, st.Error)
	}
	return nil
}

// cmdPause pauses a project (PgBouncer PAUSE) through the admin plane.
func cmdPause(args []string, stdout, stderr io.Writer) error {
	return pauseResume("pause", args, stdout, stderr)
}

// cmdResume resumes a paused project through the admin plane.
func cmdResume(args []string, stdout, stderr io.Writer) error {
	return pauseResume("resume", args, stdout, stderr)
}

func pauseResume(action string, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet(action, flag.ContinueOnError)
	fs.SetOutput(stderr)
	base := adminFlags(fs)
	ref := fs.String("project", "", "project ref")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *ref == "" {
		return errors.New("-project is required")
	}
	c, err := newAdminClient(*base)
	if err != nil {
		return err
	}
	var res admin.PauseResult
	if err := c.call(context.Background(), http.MethodPost, "/v1/projects/"+url.PathEscape(*ref)+"/"+action, nil, &res); err != nil {
		return err
	}
	return printJSON(stdout, res)
}

// cmdJobs shows one job (with its log), or lists jobs without an ID.
func cmdJobs(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("jobs", flag.ContinueOnError)
	fs.SetOutput(stderr)
	base := adminFlags(fs)
	wait := fs.Bool("wait", false, "wait for the job to finish")
	if err := fs.Parse(args); err != nil {
		return err
	}
	c, err := newAdminClient(*base)
	if err != nil {
		return err
	}
	ctx := context.Background()
	switch fs.NArg() {
	case 0:
		var list admin.JobList
		if err := c.call(ctx, http.MethodGet, "/v1/jobs", nil, &list); err != nil {
			return err
		}
		return printJSON(stdout, list)
	case 1:
		id := fs.Arg(0)
		if *wait {
			if _, err := c.waitJob(ctx, id, stderr); err != nil {
				return err
			}
		}
		var st jobs.Status
		if err := c.call(ctx, http.MethodGet, "/v1/jobs/"+url.PathEscape(id), nil, &st); err != nil {
			return err
		}
		return printJSON(stdout, st)
	default:
		return errors.New("usage: cascata jobs [-admin URL] [-wait] [ID]")
	}
}
