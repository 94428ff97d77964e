package jobs_test

import (
	"os"
	"testing"

	"cascata/internal/pgcluster"
	"cascata/internal/pgtest"
)

// cluster holds the control databases of the shared-mode tests (one
// database per test); the file-mode tests do not use it.
var cluster *pgcluster.Cluster

func TestMain(m *testing.M) {
	os.Exit(pgtest.Main(m, pgcluster.Options{}, &cluster))
}
