package projectdb_test

import (
	"bytes"
	"context"
	"os"
	"sync"
	"testing"

	"cascata/internal/pgcluster"
	"cascata/internal/pgtest"
	"cascata/internal/projectdb"
)

var cluster *pgcluster.Cluster

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m, pgcluster.Options{}, &cluster)) }

// Instances of a fleet starting together install the schema at the same
// moment: every one succeeds and gets the same key.
func TestInstallConcurrently(t *testing.T) {
	url := pgtest.NewDatabase(t, cluster, "install")
	const n = 6
	keys := make([][]byte, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			keys[i], errs[i] = projectdb.Install(context.Background(), url)
		}()
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("install %d: %v", i, errs[i])
		}
		if len(keys[i]) != 32 || !bytes.Equal(keys[i], keys[0]) {
			t.Fatalf("install %d got key %x, install 0 %x", i, keys[i], keys[0])
		}
	}
}
