package archive

import (
	"context"
	"errors"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"

	"cascata/internal/pgtest"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// TestExportUnderWriteLoad: transfers between accounts commit while the
// export runs; the archive holds one snapshot, so every transfer is either
// wholly in it (both balances and both ledger rows) or not at all.
func TestExportUnderWriteLoad(t *testing.T) {
	ctx := t.Context()
	p := testProject(t, "busy", `
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
CREATE TABLE ledger (id bigserial PRIMARY KEY, account int NOT NULL, amount bigint NOT NULL);
INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, 50) g;
CREATE TABLE filler AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 300000) g;`)

	var commits atomic.Int64
	wctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for w := range 3 {
		conn := pgtest.Connect(t, p.OwnerURL)
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			for wctx.Err() == nil {
				from, to, amount := 1+rng.IntN(50), 1+rng.IntN(50), 1+rng.IntN(100)
				err := pgx.BeginFunc(wctx, conn, func(tx pgx.Tx) error {
					for _, q := range []struct {
						sql  string
						args []any
					}{
						{"UPDATE accounts SET balance = balance - $2 WHERE id = $1", []any{from, amount}},
						{"INSERT INTO ledger (account, amount) VALUES ($1, -$2::bigint)", []any{from, amount}},
						{"UPDATE accounts SET balance = balance + $2 WHERE id = $1", []any{to, amount}},
						{"INSERT INTO ledger (account, amount) VALUES ($1, $2)", []any{to, amount}},
					} {
						if _, err := tx.Exec(wctx, q.sql, q.args...); err != nil {
							return err
						}
					}
					return nil
				})
				if err != nil {
					var pgErr *pgconn.PgError
					if wctx.Err() != nil || (errors.As(err, &pgErr) && pgErr.Code == "40P01") {
						continue // stopping, or a deadlock between two writers
					}
					errs <- err
					return
				}
				commits.Add(1)
			}
		}()
	}
	for commits.Load() < 20 {
		select {
		case err := <-errs:
			t.Fatal(err)
		default:
		}
	}
	before := commits.Load()
	path, m := exportTo(t, p, CompressionZstd)
	during := commits.Load() - before
	stop()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	t.Logf("%d transfers committed during the export", during)
	if during < 5 {
		t.Errorf("only %d transfers committed during the export; the test did not exercise concurrency", during)
	}

	tg := newTarget(t, "busy")
	res, err := Import(ctx, tg.options(path), nil) // checks the table checksums too
	if err != nil {
		t.Fatal(err)
	}
	url := res.Project.OwnerURL
	if got := pgtest.QueryValue(t, url, "SELECT sum(balance) FROM accounts"); got != "50000" {
		t.Errorf("sum of balances in the archive = %s, want 50000", got)
	}
	if got := pgtest.QueryValue(t, url, `
SELECT count(*) FROM accounts a
WHERE a.balance <> 1000 + coalesce((SELECT sum(amount) FROM ledger l WHERE l.account = a.id), 0)`); got != "0" {
		t.Errorf("%s accounts disagree with the ledger in the archive", got)
	}
	var ledgerRows int64
	for _, tc := range m.Tables {
		if tc.Name == "ledger" {
			ledgerRows = tc.Rows
		}
	}
	if got := pgtest.QueryValue(t, url, "SELECT count(*) FROM ledger"); got == "0" || got != strconv.FormatInt(ledgerRows, 10) {
		t.Errorf("ledger rows in the archive = %s, manifest says %d", got, ledgerRows)
	}
}
