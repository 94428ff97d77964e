// Package pgcluster creates, starts and stops throw-away PostgreSQL clusters
// (a primary and an optional streaming replica) on free loopback ports.
//
// It is used once per package by tests (through package pgtest) and by the
// `cascata demo` command, which keeps its cluster in a directory and starts
// it again on the same ports next time.
//
// The PostgreSQL server binaries (initdb, postgres, pg_ctl, pg_basebackup)
// are located with FindBinaries. PostgreSQL refuses to run as root, so when
// the current process is root every server program is run as the "postgres"
// OS user and the cluster directories are owned by that user.
//
// Layout of a cluster directory:
//
//	cluster.json   recorded ports, written once the cluster is complete
//	primary/       primary data directory
//	replica/       replica data directory (when Options.Replica)
//	run/           unix sockets of both servers
//	primary.log    server logs
//	replica.log
package pgcluster
