// Package pgtest wires pgcluster into tests: Main starts one PostgreSQL
// cluster per test binary from TestMain, and small helpers run SQL from
// tests. It is meant to be imported only from _test.go files.
//
// Typical use:
//
//	var cluster *pgcluster.Cluster
//
//	func TestMain(m *testing.M) {
//		os.Exit(pgtest.Main(m, pgcluster.Options{Replica: true}, &cluster))
//	}
//
// Tests never skip: missing PostgreSQL binaries make Main fail with a
// message telling how to install them.
package pgtest
