// Package stats holds what the proxy reports of itself at run time and the
// admin plane serves as it is (GET /v1/pools, GET /v1/projects/{ref}).
package stats

// Pool is one backend pool: a project on one server.
type Pool struct {
	Project string `json:"project"`
	Host    string `json:"host"`
	// ClientsActive is the clients holding a backend of the pool, one per
	// backend in use.
	ClientsActive    int     `json:"clients_active"`
	ClientsWaiting   int     `json:"clients_waiting"`
	ServersActive    int     `json:"servers_active"`
	ServersIdle      int     `json:"servers_idle"`
	PoolSize         int     `json:"pool_size"`
	Acquires         int64   `json:"acquires"`
	WaitSecondsTotal float64 `json:"wait_seconds_total"`
}

// Pin is one project's clients that keep a backend for their session
// state in transaction mode (temporary tables, LISTEN, WITH HOLD cursors,
// advisory locks), and the project's max_pinned.
type Pin struct {
	Project string `json:"project"`
	Pinned  int    `json:"pinned"`
	// Waiting is the clients whose statement waits for a slot (at most
	// query_wait_timeout).
	Waiting   int `json:"waiting"`
	MaxPinned int `json:"max_pinned"`
}

// Route counts where one project's transactions ran.
type Route struct {
	Project string `json:"project"`
	Primary int64  `json:"primary"`
	Replica int64  `json:"replica"`
}

// Replica is the last check of one replica server.
type Replica struct {
	Server     string  `json:"server"`
	Healthy    bool    `json:"healthy"`
	ReplayLSN  uint64  `json:"replay_lsn"`
	LagBytes   uint64  `json:"lag_bytes"`
	LagSeconds float64 `json:"lag_seconds"`
}
