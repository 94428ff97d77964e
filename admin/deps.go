package admin

import (
	"context"
	"errors"
	"io"
	"net/http"

	"cascata/internal/catalog"
	"cascata/internal/config"
	"cascata/internal/eject"
	"cascata/internal/fleet"
	"cascata/internal/jobs"
	"cascata/internal/stats"
)

// ProjectStore is the project catalog (*catalog.Catalog satisfies it).
type ProjectStore interface {
	Projects() []catalog.Entry
	Project(ref string) (catalog.Entry, bool)
	Add(p config.Project, reason string) (config.Project, error)
	Change(ref, reason string, fn func(*config.Project) error) (config.Project, error)
	Remove(ref, reason string) error
}

// The statistics the admin plane serves are the proxy's own (package
// stats), under the names of this package's API.
type (
	PoolStat    = stats.Pool
	PinStat     = stats.Pin
	RouteStat   = stats.Route
	ReplicaStat = stats.Replica
)

// PoolReader reads the proxy's pools.
type PoolReader interface {
	Pools() []PoolStat
}

// PinReader, when the PoolReader has it too, adds pinned clients to GET
// /v1/pools.
type PinReader interface {
	Pinned() []PinStat
}

// RoutingReader, when the PoolReader has it too, adds routing counts and
// replica health to GET /v1/pools.
type RoutingReader interface {
	Routing() ([]RouteStat, []ReplicaStat)
}

// Pauser pauses projects (*proxy.Server satisfies it).
type Pauser interface {
	// Pause holds new transactions and waits until running ones finish or ctx ends.
	Pause(ctx context.Context, ref string) error
	// Resume lets a paused project's transactions run again.
	Resume(ref string)
	// Paused reports whether a project is paused.
	Paused(ref string) bool
}

// JobStore reads jobs (*jobs.Runner satisfies it).
type JobStore interface {
	Get(id string) (jobs.Status, error)
	List() []jobs.Status
	ActiveFor(project string) (jobs.Status, bool)
	Result(id string) (path, name string, err error)
}

// Ejector starts an ejection job of a project; errors wrapping
// eject.ErrInvalid are the request's fault (400).
type Ejector interface {
	StartEject(p config.Project, req EjectRequest) (jobs.Status, error)
}

// Archiver starts archive jobs (CONTRACT section 6).
type Archiver interface {
	// StartExport starts an export job whose result is the .caf file.
	StartExport(p config.Project, passphrase string) (jobs.Status, error)
	// StartImport reads an uploaded .caf (before returning) and starts its
	// import job; as renames the project when not "".
	StartImport(ctx context.Context, body io.Reader, as, passphrase string) (jobs.Status, error)
}

// Provisioner creates new projects' databases on [provision] (POST
// /v1/projects without a database_url). Errors wrapping ErrConflict or
// ErrBadRequest choose the status (409 when [provision] is not configured
// or the database exists).
type Provisioner interface {
	// Provision validates p, creates its database, roles and storage dir,
	// and returns p with DatabaseURL, OwnerURL and StorageDir filled.
	// Nothing is left behind when it fails.
	Provision(ctx context.Context, p config.Project) (config.Project, error)
	// Drop undoes a Provision whose project could not be registered: it
	// drops the database and removes the storage dir if still empty.
	Drop(ctx context.Context, p config.Project) error
}

// Fleet lists the instances of a fleet and forgets gone ones
// (*fleet.Member).
type Fleet interface {
	Instances(ctx context.Context) ([]fleet.Instance, error)
	Forget(ctx context.Context, id string) error
}

// Pinger checks that a database answers.
type Pinger interface {
	Ping(ctx context.Context, databaseURL string) error
}

// Errors a dependency may wrap to choose the status.
var (
	// ErrBadRequest makes a 400.
	ErrBadRequest = errors.New("bad request")
	// ErrConflict makes a 409.
	ErrConflict = errors.New("conflict")
	// ErrNotFound makes a 404.
	ErrNotFound = errors.New("not found")
	// ErrForbidden makes a 403: the request is understood and refused by
	// policy (an ejection or import target outside [admin].eject_allowed_hosts).
	ErrForbidden = errors.New("forbidden")
)

// statusOf maps an error to its HTTP status.
func statusOf(err error) int {
	switch {
	case errors.Is(err, ErrForbidden):
		return http.StatusForbidden
	case errors.Is(err, ErrNotFound), errors.Is(err, catalog.ErrNotFound), errors.Is(err, jobs.ErrNotFound), errors.Is(err, fleet.ErrNoInstance):
		return http.StatusNotFound
	case errors.Is(err, ErrConflict), errors.Is(err, catalog.ErrExists), errors.Is(err, catalog.ErrConflict),
		errors.Is(err, jobs.ErrBusy), errors.Is(err, jobs.ErrNoResult), errors.Is(err, fleet.ErrLive):
		return http.StatusConflict
	case errors.Is(err, ErrBadRequest), errors.Is(err, eject.ErrInvalid):
		return http.StatusBadRequest
	case errors.As(err, new(config.Problems)):
		return http.StatusBadRequest
	case errors.Is(err, jobs.ErrClosed), errors.Is(err, catalog.ErrUnavailable):
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}
