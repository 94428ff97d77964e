// Package fleettest runs several cascata processes against one control
// database ([catalog].url), with HAProxy in front of their proxy ports, the
// way an operator runs a fleet (docs/fleet.md). It holds tests only: the
// binary is built once per test run and every instance is a child process,
// so what is tested is what an operator starts, signals and kills.
//
// Three PostgreSQL clusters back the tests: the data cluster (primary and
// streaming replica, wal_level=logical so projects can be ejected with
// logical replication), the control cluster (alone, so it can be stopped
// and started while the fleet serves), and the target cluster that
// ejections move projects to.
package fleettest
