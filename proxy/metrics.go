package proxy

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the proxy's Prometheus collectors. Label values are bounded:
// project refs come from the configuration, states and results are constants.
type Metrics struct {
	clients      *prometheus.GaugeVec
	logins       *prometheus.CounterVec
	servers      *prometheus.GaugeVec
	serverOpens  *prometheus.CounterVec
	dialing      *prometheus.GaugeVec
	dialSeconds  *prometheus.HistogramVec
	transactions *prometheus.CounterVec
	queries      *prometheus.CounterVec
	poolWait     *prometheus.HistogramVec
	waitTimeouts *prometheus.CounterVec
	pinned       *prometheus.GaugeVec
	pinRefusals  *prometheus.CounterVec
	routes       *prometheus.CounterVec
	replicaLSNs  *prometheus.GaugeVec
	replicaBytes *prometheus.GaugeVec
	replicaSecs  *prometheus.GaugeVec
	replicaUp    *prometheus.GaugeVec
}

// NewMetrics creates the collectors and registers them with reg. A nil reg
// leaves them unregistered (tests).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		clients: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "cascata_client_connections", Help: "Client connections by project.",
		}, []string{"project"}),
		logins: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cascata_client_logins_total", Help: "Client login attempts by result.",
		}, []string{"result"}),
		servers: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "cascata_server_connections", Help: "Open backend connections by project.",
		}, []string{"project"}),
		serverOpens: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cascata_server_connects_total", Help: "Backend connections opened by project.",
		}, []string{"project"}),
		transactions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cascata_transactions_total", Help: "Transactions (units of backend use) by project and pool mode.",
		}, []string{"project"}),
		queries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cascata_queries_total", Help: "Query and Execute messages by project.",
		}, []string{"project"}),
		poolWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "cascata_pool_wait_seconds", Help: "Time a client waited for a backend connection.",
			Buckets: []float64{.0001, .0005, .001, .005, .01, .05, .1, .5, 1, 5, 30},
		}, []string{"project"}),
		waitTimeouts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cascata_pool_wait_timeouts_total", Help: "Clients that got no backend within query_wait_timeout.",
		}, []string{"project"}),
		pinned: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "cascata_pinned_clients", Help: "Clients keeping a backend in transaction mode for their session state (temporary objects, LISTEN, WITH HOLD cursors, advisory locks), by project; at most max_pinned.",
		}, []string{"project"}),
		pinRefusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cascata_pin_refusals_total", Help: "Statements refused, or session state scrubbed, because the project had max_pinned clients pinned already.",
		}, []string{"project"}),
		routes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cascata_route_decisions_total", Help: "Routing decisions by project, target and reason.",
		}, []string{"project", "target", "reason"}),
		replicaLSNs: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "cascata_replica_replay_lsn_bytes", Help: "Replay WAL position of each replica server, in bytes.",
		}, []string{"server"}),
		replicaBytes: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "cascata_replica_lag_bytes", Help: "WAL a replica server has received but not replayed yet.",
		}, []string{"server"}),
		replicaSecs: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "cascata_replica_lag_seconds", Help: "How long a replica server has lacked WAL its primary had (the age of the oldest primary WAL position it has not replayed).",
		}, []string{"server"}),
		replicaUp: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "cascata_replica_healthy", Help: "1 when a replica server is used for reads.",
		}, []string{"server"}),
		dialing: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "cascata_server_dials_in_progress", Help: "Backend logins under way, by server (host:port).",
		}, []string{"server"}),
		dialSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "cascata_server_dial_seconds", Help: "Time a backend login took (connect, TLS, authentication), by server (host:port); failed ones included.",
			Buckets: []float64{.005, .01, .02, .03, .05, .075, .1, .15, .25, .5, 1, 2.5, 5, 10},
		}, []string{"server"}),
	}
	if reg != nil {
		reg.MustRegister(m.clients, m.logins, m.servers, m.serverOpens, m.dialing, m.dialSeconds, m.transactions, m.queries, m.poolWait, m.waitTimeouts, m.pinned, m.pinRefusals, m.routes, m.replicaLSNs, m.replicaBytes, m.replicaSecs, m.replicaUp)
	}
	return m
}

// serverMetrics are the backend connection series of one pool, looked up
// once when the pool is created: a backend closed after its project was
// removed (and its series deleted) does not bring the series back.
type serverMetrics struct {
	open   prometheus.Gauge
	opened prometheus.Counter
}

func (m *Metrics) forServers(ref string) serverMetrics {
	return serverMetrics{open: m.servers.WithLabelValues(ref), opened: m.serverOpens.WithLabelValues(ref)}
}

func (sm serverMetrics) serverOpened() {
	sm.open.Inc()
	sm.opened.Inc()
}

func (sm serverMetrics) serverClosed() { sm.open.Dec() }

// dialMetrics are the backend login series of one server, looked up at
// each login (rare beside queries), so that deleting them (forgetServer)
// never leaves a host updating a detached series.
type dialMetrics struct {
	inProgress prometheus.Gauge
	seconds    prometheus.Observer
}

func (m *Metrics) forDials(server string) dialMetrics {
	return dialMetrics{inProgress: m.dialing.WithLabelValues(server), seconds: m.dialSeconds.WithLabelValues(server)}
}

// dialStarted counts a login under way; the returned func ends it.
func (dm dialMetrics) dialStarted() func() {
	start := time.Now()
	dm.inProgress.Inc()
	return func() {
		dm.inProgress.Dec()
		dm.seconds.Observe(time.Since(start).Seconds())
	}
}

// projectMetrics caches the per-project children so the hot path does no label lookups.
type projectMetrics struct {
	clients      prometheus.Gauge
	transactions prometheus.Counter
	queries      prometheus.Counter
	poolWait     prometheus.Observer
	waitTimeouts prometheus.Counter
	pinned       prometheus.Gauge
	pinRefusals  prometheus.Counter
}

func (m *Metrics) forProject(ref string) *projectMetrics {
	return &projectMetrics{
		clients:      m.clients.WithLabelValues(ref),
		transactions: m.transactions.WithLabelValues(ref),
		queries:      m.queries.WithLabelValues(ref),
		poolWait:     m.poolWait.WithLabelValues(ref),
		waitTimeouts: m.waitTimeouts.WithLabelValues(ref),
		pinned:       m.pinned.WithLabelValues(ref),
		pinRefusals:  m.pinRefusals.WithLabelValues(ref),
	}
}

func (m *Metrics) login(result string) { m.logins.WithLabelValues(result).Inc() }

func observeWait(o prometheus.Observer, start time.Time) { o.Observe(time.Since(start).Seconds()) }

func (m *Metrics) replicaLSN(server string, lsn, behind uint64, lagSeconds float64) {
	m.replicaLSNs.WithLabelValues(server).Set(float64(lsn))
	m.replicaBytes.WithLabelValues(server).Set(float64(behind))
	m.replicaSecs.WithLabelValues(server).Set(lagSeconds)
	m.replicaUp.WithLabelValues(server).Set(1)
}

func (m *Metrics) replicaDown(server string) { m.replicaUp.WithLabelValues(server).Set(0) }

// forgetServer deletes the series of a replica server no project uses any
// more: its replica series (labelled server) and its login series (addr).
func (m *Metrics) forgetServer(server, addr string) {
	for _, v := range []*prometheus.GaugeVec{m.replicaLSNs, m.replicaBytes, m.replicaSecs, m.replicaUp} {
		v.DeleteLabelValues(server)
	}
	m.dialing.DeleteLabelValues(addr)
	m.dialSeconds.DeleteLabelValues(addr)
}

// forgetProject deletes every series of a removed project, so projects that
// come and go leave no series behind. Children cached before (a session's
// projectMetrics, a pool's server gauges) are detached by the deletion:
// updates through them no longer show, and a later project with the same
// ref starts from fresh series.
func (m *Metrics) forgetProject(ref string) {
	l := prometheus.Labels{"project": ref}
	m.clients.DeletePartialMatch(l)
	m.servers.DeletePartialMatch(l)
	m.serverOpens.DeletePartialMatch(l)
	m.transactions.DeletePartialMatch(l)
	m.queries.DeletePartialMatch(l)
	m.poolWait.DeletePartialMatch(l)
	m.waitTimeouts.DeletePartialMatch(l)
	m.pinned.DeletePartialMatch(l)
	m.pinRefusals.DeletePartialMatch(l)
	m.routes.DeletePartialMatch(l)
}
