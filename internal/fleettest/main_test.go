package fleettest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"cascata/internal/pgcluster"
	"cascata/internal/pgtest"

	"github.com/jackc/pgx/v5"
)

// The clusters of the package: data serves the projects, control holds the
// fleet's control databases (one per test), target receives ejections.
var data, control, target *pgcluster.Cluster

// cascataBin is the cascata binary built for this test run.
var cascataBin string

const (
	loginPassword = "fleet-login-pw"
	adminToken    = "fleet-admin-token-0123456789"
	adminTokenEnv = "CASCATA_FLEET_TEST_ADMIN_TOKEN"
	// capLogin is the login role of the host cap test's project alone, so
	// that its backends can be counted in pg_stat_activity.
	capLogin = "fleet_cap_login"
)

// Projects on the data cluster. Each ejection test moves its own database
// away; the others are shared by the tests that only read.
const (
	refA       = "fleet_a"     // registered and removed at run time
	refLoad    = "fleet_load"  // file-seeded, queried under restarts
	refLate    = "fleet_late"  // registered after the control database restarts
	refCap     = "fleet_cap"   // the host cap test, with its own login role
	refFresh   = "fleet_fresh" // first served by instances starting together
	refLogical = "fleet_ej_lr" // ejected with logical replication
	refDump    = "fleet_ej_dp" // ejected with pg_dump/pg_restore
)

// seedRows is how many rows an ejected table holds before the writers start,
// so the copy has something to move while clients write.
const seedRows = 2000

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	binDir, err := os.MkdirTemp("", "cascata-fleet-bin-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "fleettest: %v\n", err)
		return 1
	}
	defer os.RemoveAll(binDir)
	cascataBin = filepath.Join(binDir, "cascata")

	// The build and the two side clusters start together: on two cores the
	// build is mostly waiting for the linker while initdb waits for disk.
	var wg sync.WaitGroup
	var buildErr, controlErr, targetErr error
	var stopControl, stopTarget func(context.Context) error
	wg.Add(3)
	go func() { defer wg.Done(); buildErr = buildCascata(cascataBin) }()
	go func() {
		defer wg.Done()
		control, stopControl, controlErr = startCluster(pgcluster.Options{Logger: log})
	}()
	go func() {
		defer wg.Done()
		target, stopTarget, targetErr = startCluster(pgcluster.Options{Logger: log})
	}()
	wg.Wait()
	defer stopCluster("control", stopControl)
	defer stopCluster("target", stopTarget)
	if err := errors.Join(buildErr, controlErr, targetErr); err != nil {
		fmt.Fprintf(os.Stderr, "fleettest: %v\n", err)
		return 1
	}
	return pgtest.Main(m, pgcluster.Options{Replica: true, Logical: true, MaxConnections: 300, Logger: log}, &data, setupData, setupTarget)
}

func startCluster(opts pgcluster.Options) (*pgcluster.Cluster, func(context.Context) error, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	return pgtest.Start(ctx, opts)
}

func stopCluster(name string, stop func(context.Context) error) {
	if stop == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := stop(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "fleettest: stop %s cluster: %v\n", name, err)
	}
}

// buildCascata builds cmd/cascata from the module root into out.
func buildCascata(out string) error {
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goBin, "build", "-o", out, "./cmd/cascata")
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./cmd/cascata: %w\n%s", err, b)
	}
	return nil
}

// itemsTable is the table every project database has: writers insert
// (writer, n) pairs of their own choosing, so an acknowledged row can be
// looked for anywhere. at and origin are filled where the row is inserted
// (a copy keeps them), which tells which server took each write and when.
const itemsTable = `
	CREATE TABLE items (
		writer int NOT NULL,
		n      int NOT NULL,
		at     timestamptz NOT NULL DEFAULT clock_timestamp(),
		origin int NOT NULL DEFAULT inet_server_port(),
		PRIMARY KEY (writer, n));
	GRANT SELECT, INSERT ON items TO authenticated;`

func setupData(ctx context.Context, c *pgcluster.Cluster) error {
	for _, ref := range []string{refA, refLoad, refLate, refCap, refFresh, refLogical, refDump} {
		spec := pgcluster.ProjectSpec{Database: ref, LoginPassword: loginPassword}
		if ref == refCap {
			spec.LoginUser = capLogin
		}
		if err := pgcluster.SetupProject(ctx, c.Primary, spec); err != nil {
			return err
		}
		sql := itemsTable
		if ref == refLogical || ref == refDump {
			sql += fmt.Sprintf("INSERT INTO items (writer, n) SELECT -1, i FROM generate_series(1, %d) i;", seedRows)
		}
		if err := execSQL(ctx, c.Primary.SuperuserURL(ref), sql); err != nil {
			return fmt.Errorf("set up %s: %w", ref, err)
		}
	}
	return nil
}

// setupTarget creates the login role and an empty database per ejected
// project on the target; the project roles are the ejection's to create.
func setupTarget(ctx context.Context, _ *pgcluster.Cluster) error {
	sql := fmt.Sprintf("CREATE ROLE authenticator LOGIN NOINHERIT PASSWORD '%s'", loginPassword)
	if err := execSQL(ctx, target.Primary.SuperuserURL("postgres"), sql); err != nil {
		return err
	}
	for _, ref := range []string{refLogical, refDump} {
		if err := execSQL(ctx, target.Primary.SuperuserURL("postgres"), "CREATE DATABASE "+ref); err != nil {
			return err
		}
	}
	return nil
}

func execSQL(ctx context.Context, url, sql string) error {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	_, err = conn.Exec(ctx, sql)
	return err
}
