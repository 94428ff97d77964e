package proxy_test

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"cascata/internal/pgcluster"
	"cascata/internal/pgtest"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

// TestMultiStatementQuery: one simple Query with three statements gives
// three result sets.
func TestMultiStatementQuery(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	ctx := context.Background()
	c := h.connect("p1", "authenticated", "multi")
	rs, err := c.PgConn().Exec(ctx, "SELECT 1; SELECT 'two', 2; SELECT generate_series(1, 3)").ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 3 {
		t.Fatalf("%d result sets, want 3", len(rs))
	}
	if got := rowsText(rs[0].Rows); got != "1" {
		t.Errorf("first result %q", got)
	}
	if got := rowsText(rs[1].Rows); got != "two,2" {
		t.Errorf("second result %q", got)
	}
	if got := rowsText(rs[2].Rows); got != "1;2;3" {
		t.Errorf("third result %q", got)
	}
	// An error in the middle stops the rest, as in PostgreSQL, and the
	// implicit transaction is rolled back.
	m := marker(t)
	_, err = c.PgConn().Exec(ctx, fmt.Sprintf("INSERT INTO items (body) VALUES ('%s'); SELECT 1/0; INSERT INTO items (body) VALUES ('%s')", m, m)).ReadAll()
	if code := sqlstate(err); code != "22012" {
		t.Fatalf("want 22012, got %v", err)
	}
	var n int
	if err := c.QueryRow(ctx, "SELECT count(*) FROM items WHERE body = $1", m).Scan(&n); err != nil || n != 0 {
		t.Fatalf("rows of the failed multi-statement query: %d, %v", n, err)
	}
}

// rowsText renders rows as "a,b;c,d".
func rowsText(rows [][][]byte) string {
	var out []string
	for _, r := range rows {
		var vals []string
		for _, v := range r {
			vals = append(vals, string(v))
		}
		out = append(out, strings.Join(vals, ","))
	}
	return strings.Join(out, ";")
}

// TestExtendedProtocolUnnamed: Parse/Bind/Describe/Execute/Sync with the
// unnamed statement, text and binary results, and a Prepare of the unnamed
// statement used inside a transaction.
func TestExtendedProtocolUnnamed(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 2})
	ctx := context.Background()
	c := h.connect("p1", "authenticated", "ext-user")
	pc := c.PgConn()
	res := pc.ExecParams(ctx, "SELECT $1::int + 1, current_user, current_setting('request.jwt.claims')::jsonb->>'sub'",
		[][]byte{[]byte("41")}, nil, nil, nil).Read()
	if res.Err != nil {
		t.Fatal(res.Err)
	}
	if got := rowsText(res.Rows); got != "42,authenticated,ext-user" {
		t.Fatalf("got %q", got)
	}
	// Binary parameter and result.
	res = pc.ExecParams(ctx, "SELECT $1::int4 * 2", [][]byte{binary.BigEndian.AppendUint32(nil, 21)}, []uint32{23}, []int16{1}, []int16{1}).Read()
	if res.Err != nil || len(res.Rows) != 1 || binary.BigEndian.Uint32(res.Rows[0][0]) != 42 {
		t.Fatalf("binary: %v %v", res.Err, res.Rows)
	}
	// Many rows.
	res = pc.ExecParams(ctx, "SELECT g FROM generate_series(1, $1::int) g", [][]byte{[]byte("5000")}, nil, nil, nil).Read()
	if res.Err != nil || len(res.Rows) != 5000 || string(res.Rows[4999][0]) != "5000" {
		t.Fatalf("5000 rows: %v, %d rows", res.Err, len(res.Rows))
	}
	// An error in an extended batch, then the connection goes on.
	res = pc.ExecParams(ctx, "SELECT 1/$1::int", [][]byte{[]byte("0")}, nil, nil, nil).Read()
	if code := sqlstate(res.Err); code != "22012" {
		t.Fatalf("want 22012, got %v", res.Err)
	}
	res = pc.ExecParams(ctx, "SELECT $1::text", [][]byte{[]byte("after")}, nil, nil, nil).Read()
	if res.Err != nil || rowsText(res.Rows) != "after" {
		t.Fatalf("after an error: %v %q", res.Err, rowsText(res.Rows))
	}
	// The unnamed statement prepared, then executed, inside a transaction.
	if _, err := pc.Exec(ctx, "BEGIN").ReadAll(); err != nil {
		t.Fatal(err)
	}
	sd, err := pc.Prepare(ctx, "", "SELECT $1::text || 'y' AS v, $2::int8 AS n", nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(sd.ParamOIDs) != 2 || sd.ParamOIDs[0] != 25 || sd.ParamOIDs[1] != 20 || len(sd.Fields) != 2 || sd.Fields[0].Name != "v" {
		t.Fatalf("statement description %+v", sd)
	}
	res = pc.ExecPrepared(ctx, "", [][]byte{[]byte("x"), []byte("9")}, nil, nil).Read()
	if res.Err != nil || rowsText(res.Rows) != "xy,9" {
		t.Fatalf("unnamed statement: %v %q", res.Err, rowsText(res.Rows))
	}
	if _, err := pc.Exec(ctx, "COMMIT").ReadAll(); err != nil {
		t.Fatal(err)
	}
	// Empty query through the extended protocol.
	res = pc.ExecParams(ctx, "", nil, nil, nil, nil).Read()
	if res.Err != nil {
		t.Fatalf("empty extended query: %v", res.Err)
	}
}

// pipelineOutcome reads one pipeline result into a short string.
func pipelineOutcome(p *pgconn.Pipeline) (string, error) {
	r, err := p.GetResults()
	if err != nil {
		var pe *pgconn.PgError
		if errors.As(err, &pe) {
			return "err:" + pe.Code, nil
		}
		return "", err
	}
	switch r := r.(type) {
	case *pgconn.ResultReader:
		res := r.Read()
		if res.Err != nil {
			var pe *pgconn.PgError
			if errors.As(res.Err, &pe) {
				return "err:" + pe.Code, nil
			}
			return "", res.Err
		}
		return rowsText(res.Rows), nil
	case *pgconn.PipelineSync:
		return "sync", nil
	case nil:
		return "none", nil
	default:
		return fmt.Sprintf("%T", r), nil
	}
}

// TestHeldBatchesOfChangingSize: a client's held batch buffer is reused
// between batches (and dropped after a large one); batches of every size,
// one after the other, each reach the server whole and unmixed.
func TestHeldBatchesOfChangingSize(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	ctx := context.Background()
	c := h.connect("p1", "authenticated", "batch-sizes")
	pc := c.PgConn()
	for i, size := range []int{1, 3000, 17, 9000, 0, 200_000, 5, 4000, 2_000_000, 64, 12} {
		val := bytes.Repeat([]byte{byte('a' + i)}, size)
		sum := md5.Sum(val)
		res := pc.ExecParams(ctx, "SELECT length($1::text), md5($1::text), $2::int", [][]byte{val, []byte(fmt.Sprint(i))}, nil, nil, nil).Read()
		if res.Err != nil {
			t.Fatalf("batch %d (%d bytes): %v", i, size, res.Err)
		}
		if got, want := rowsText(res.Rows), fmt.Sprintf("%d,%s,%d", size, hex.EncodeToString(sum[:]), i); got != want {
			t.Fatalf("batch %d (%d bytes): server saw %q, want %q", i, size, got, want)
		}
	}
}

// TestLongBatch: one batch of 3,000 queries (12,000 messages) before its
// Sync, more than the proxy holds to route a batch whole: every result
// comes back, in order.
func TestLongBatch(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	ctx := context.Background()
	pc := h.connect("p1", "authenticated", "long-batch").PgConn()
	b := &pgconn.Batch{}
	const n = 3000
	for i := range n {
		b.ExecParams("SELECT $1::int * 2", [][]byte{[]byte(fmt.Sprint(i))}, nil, nil, nil)
	}
	res, err := pc.ExecBatch(ctx, b).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != n {
		t.Fatalf("%d results, want %d", len(res), n)
	}
	for i, r := range res {
		if got, want := rowsText(r.Rows), fmt.Sprint(2*i); r.Err != nil || got != want {
			t.Fatalf("query %d: %q %v, want %s", i, got, r.Err, want)
		}
	}
}

// TestPipeline: several unnamed extended queries and Syncs sent at once,
// with an error in the middle segment.
func TestPipeline(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	ctx := context.Background()
	c := h.connect("p2", "authenticated", "pipe")
	other := h.connect("p2", "anon", "other") // shares the only backend between segments

	for round := range 3 {
		p := c.PgConn().StartPipeline(ctx)
		p.SendQueryParams("SELECT 1", nil, nil, nil, nil)
		p.SendQueryParams("SELECT $1::text", [][]byte{[]byte("a")}, nil, nil, nil)
		p.SendQueryParams("SELECT current_user", nil, nil, nil, nil)
		p.SendPipelineSync()
		p.SendQueryParams("SELECT 1/0", nil, nil, nil, nil)
		p.SendQueryParams("SELECT 2", nil, nil, nil, nil)
		p.SendPipelineSync()
		p.SendQueryParams("SELECT 'after'", nil, nil, nil, nil)
		p.SendQueryParams("SELECT current_setting('request.jwt.claims')::jsonb->>'sub'", nil, nil, nil, nil)
		if err := p.Sync(); err != nil {
			t.Fatal(err)
		}
		var got []string
		syncs := 0
		for syncs < 3 && len(got) < 20 {
			o, err := pipelineOutcome(p)
			if err != nil {
				t.Fatalf("round %d: after %v: %v", round, got, err)
			}
			got = append(got, o)
			if o == "sync" {
				syncs++
			}
		}
		if err := p.Close(); err != nil {
			t.Fatalf("round %d: close pipeline: %v", round, err)
		}
		want := "1|a|authenticated|sync|err:22012|sync|after|pipe|sync"
		if g := strings.Join(got, "|"); g != want {
			t.Fatalf("round %d: pipeline results\n got %s\nwant %s", round, g, want)
		}
		var u string
		if err := other.QueryRow(ctx, "SELECT current_user").Scan(&u); err != nil || u != "anon" {
			t.Fatalf("other client between pipelines: %q %v", u, err)
		}
	}
}

// TestPipelineFlush: a Flush in the middle of an extended batch pushes the
// results out before the Sync, and the batch goes on on the same backend.
func TestPipelineFlush(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	ctx := context.Background()
	c := h.connect("p2", "authenticated", "flusher")
	other := h.connect("p2", "anon", "other")
	p := c.PgConn().StartPipeline(ctx)
	p.SendQueryParams("SELECT pg_backend_pid()", nil, nil, nil, nil)
	p.SendFlushRequest()
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	r, err := p.GetResults()
	if err != nil {
		t.Fatal(err)
	}
	rr, ok := r.(*pgconn.ResultReader)
	if !ok {
		t.Fatalf("got %T before the Sync", r)
	}
	res := rr.Read()
	if res.Err != nil || len(res.Rows) != 1 {
		t.Fatalf("result before the Sync: %v", res.Err)
	}
	pid1 := string(res.Rows[0][0])
	// The other client must wait: the backend belongs to this batch until Sync.
	otherDone := make(chan error, 1)
	go func() {
		_, err := other.Exec(ctx, "SELECT 1")
		otherDone <- err
	}()
	p.SendQueryParams("SELECT pg_backend_pid()", nil, nil, nil, nil)
	if err := p.Sync(); err != nil {
		t.Fatal(err)
	}
	got, err := pipelineOutcome(p)
	if err != nil {
		t.Fatal(err)
	}
	if got != pid1 {
		t.Fatalf("second statement of the batch ran on backend %s, first on %s", got, pid1)
	}
	if got, err := pipelineOutcome(p); err != nil || got != "sync" {
		t.Fatalf("want sync, got %q %v", got, err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-otherDone; err != nil {
		t.Fatalf("other client: %v", err)
	}
}

// failingReader yields n lines and then an error.
type failingReader struct {
	lines, n int
	buf      bytes.Buffer
	prefix   string
}

func (r *failingReader) Read(p []byte) (int, error) {
	for r.buf.Len() < len(p) && r.n < r.lines {
		fmt.Fprintf(&r.buf, "%s-%d\n", r.prefix, r.n)
		r.n++
	}
	if r.buf.Len() == 0 {
		return 0, errors.New("the client's data source broke")
	}
	return r.buf.Read(p)
}

// TestCopy: COPY FROM STDIN of 10,000 rows and COPY TO STDOUT of the same,
// a COPY the client aborts (CopyFail) and one the server aborts mid-stream.
func TestCopy(t *testing.T) {
	for _, session := range []bool{false, true} {
		name := "transaction_mode"
		if session {
			name = "session_mode"
		}
		t.Run(name, func(t *testing.T) { testCopy(t, session) })
	}
}

func testCopy(t *testing.T, sessionMode bool) {
	h := startProxy(t, harnessOpts{poolSize: 1, sessionMode: sessionMode})
	ctx := context.Background()
	c := h.connect("p3", "authenticated", "copier")
	pc := c.PgConn()
	m := marker(t)

	var in bytes.Buffer
	for i := range 10000 {
		fmt.Fprintf(&in, "%s-%05d\n", m, i)
	}
	want := in.String()
	tag, err := pc.CopyFrom(ctx, &in, "COPY items (body) FROM STDIN")
	if err != nil {
		t.Fatal(err)
	}
	if tag.RowsAffected() != 10000 {
		t.Fatalf("COPY FROM: %q", tag)
	}
	var out bytes.Buffer
	tag, err = pc.CopyTo(ctx, &out, fmt.Sprintf("COPY (SELECT body FROM items WHERE body LIKE '%s-%%' ORDER BY body) TO STDOUT", m))
	if err != nil {
		t.Fatal(err)
	}
	if tag.RowsAffected() != 10000 || out.String() != want {
		t.Fatalf("COPY TO: %q, %d bytes back of %d, equal=%v", tag, out.Len(), len(want), out.String() == want)
	}
	var owner string
	if err := c.QueryRow(ctx, "SELECT DISTINCT owner FROM items WHERE body LIKE $1", m+"-%").Scan(&owner); err != nil || owner != "copier" {
		t.Fatalf("owner of copied rows: %q %v", owner, err)
	}

	// The client aborts: CopyFail after some data.
	m2 := m + "-fail"
	_, err = pc.CopyFrom(ctx, &failingReader{lines: 3000, prefix: m2}, "COPY items (body) FROM STDIN")
	if err == nil {
		t.Fatal("aborted COPY succeeded")
	}
	t.Logf("aborted COPY: %v", err)
	if pc.IsClosed() {
		t.Fatal("connection closed by an aborted COPY")
	}
	countRows(t, c, m2+"-%", 0)

	// The server aborts: a bad value in the middle while the client still sends.
	m3 := m + "-bad"
	var bad bytes.Buffer
	for i := range 20000 {
		if i == 1000 {
			fmt.Fprintf(&bad, "not-a-number\t%s-%d\n", m3, i)
			continue
		}
		fmt.Fprintf(&bad, "%d\t%s-%d\n", 9_000_000_000+i, m3, i)
	}
	_, err = pc.CopyFrom(ctx, &bad, "COPY items (id, body) FROM STDIN")
	if code := sqlstate(err); code != "22P02" {
		t.Fatalf("COPY with a bad value: want 22P02, got %v", err)
	}
	countRows(t, c, m3+"-%", 0)

	// The same inside a transaction, which then rolls back.
	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	bad.Reset()
	for i := range 5000 {
		fmt.Fprintf(&bad, "%d\t%s-%d\n", 9_100_000_000+i, m3, i)
	}
	bad.WriteString("x\ty\n")
	_, err = pc.CopyFrom(ctx, &bad, "COPY items (id, body) FROM STDIN")
	if code := sqlstate(err); code != "22P02" {
		t.Fatalf("COPY with a bad value in a transaction: want 22P02, got %v", err)
	}
	if _, err := tx.Exec(ctx, "SELECT 1"); sqlstate(err) != "25P02" {
		t.Fatalf("statement in the failed transaction: want 25P02, got %v", err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	countRows(t, c, m3+"-%", 0)
}

func countRows(t *testing.T, c *pgx.Conn, like string, want int) {
	t.Helper()
	var n int
	if err := c.QueryRow(context.Background(), "SELECT count(*) FROM items WHERE body LIKE $1", like).Scan(&n); err != nil {
		t.Fatalf("count rows: %v", err)
	}
	if n != want {
		t.Fatalf("%d rows like %q, want %d", n, like, want)
	}
}

// TestNotices: NOTICE and WARNING messages reach the client.
func TestNotices(t *testing.T) {
	sc := pgtest.Connect(t, cluster.Primary.SuperuserURL("p1"))
	ctx := context.Background()
	if _, err := sc.Exec(ctx, `CREATE OR REPLACE FUNCTION public.cascata_test_notice(msg text) RETURNS int LANGUAGE plpgsql AS $$
		BEGIN RAISE NOTICE 'notice: % as %', msg, current_user; RETURN 1; END $$`); err != nil {
		t.Fatal(err)
	}
	h := startProxy(t, harnessOpts{poolSize: 1})
	var mu sync.Mutex
	var notices []pgconn.Notice
	cfg, err := pgx.ParseConfig(h.url("p1", "authenticated", token(t, "p1", "authenticated", "n", nil)))
	if err != nil {
		t.Fatal(err)
	}
	cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) {
		mu.Lock()
		notices = append(notices, *n)
		mu.Unlock()
	}
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	var v int
	if err := c.QueryRow(ctx, "SELECT public.cascata_test_notice('hello')").Scan(&v); err != nil || v != 1 {
		t.Fatal(v, err)
	}
	// ROLLBACK outside a transaction: WARNING 25P01.
	if _, err := c.Exec(ctx, "ROLLBACK"); err != nil {
		t.Fatal(err)
	}
	// Extended protocol too.
	if res := c.PgConn().ExecParams(ctx, "SELECT public.cascata_test_notice($1)", [][]byte{[]byte("ext")}, nil, nil, nil).Read(); res.Err != nil {
		t.Fatal(res.Err)
	}
	mu.Lock()
	defer mu.Unlock()
	var got []string
	for _, n := range notices {
		got = append(got, n.Severity+" "+n.Code+" "+n.Message)
	}
	want := []string{
		"NOTICE 00000 notice: hello as authenticated",
		"WARNING 25P01 there is no transaction in progress",
		"NOTICE 00000 notice: ext as authenticated",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("notices:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// TestEmptyQueryAndErrors: empty queries, and errors after which the same
// connection goes on (also inside a transaction).
func TestEmptyQueryAndErrors(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	ctx := context.Background()
	c := h.connect("p2", "authenticated", "errs")
	pc := c.PgConn()
	for _, q := range []string{"", ";", " ", "-- only a comment"} {
		if _, err := pc.Exec(ctx, q).ReadAll(); err != nil {
			t.Fatalf("empty query %q: %v", q, err)
		}
	}
	if _, err := c.Exec(ctx, "SELECT 1/0"); sqlstate(err) != "22012" {
		t.Fatalf("want 22012, got %v", err)
	}
	if _, err := c.Exec(ctx, "SELEKT 1"); sqlstate(err) != "42601" {
		t.Fatalf("want 42601, got %v", err)
	}
	if _, err := c.Exec(ctx, "SELECT * FROM no_such_table"); sqlstate(err) != "42P01" {
		t.Fatalf("want 42P01, got %v", err)
	}
	var v int
	if err := c.QueryRow(ctx, "SELECT 3").Scan(&v); err != nil || v != 3 {
		t.Fatalf("after errors: %d %v", v, err)
	}
	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "SELECT 1/0"); sqlstate(err) != "22012" {
		t.Fatalf("want 22012, got %v", err)
	}
	if _, err := tx.Exec(ctx, "SELECT 1"); sqlstate(err) != "25P02" {
		t.Fatalf("in a failed transaction: want 25P02, got %v", err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.QueryRow(ctx, "SELECT 4").Scan(&v); err != nil || v != 4 {
		t.Fatalf("after the rolled back transaction: %d %v", v, err)
	}
}

// TestLargeValues: a 64 MiB value from the server and a 64 MiB parameter to
// it pass through whole.
func TestLargeValues(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	ctx := context.Background()
	c := h.connect("p1", "authenticated", "big")
	const size = 64 << 20
	rs, err := c.PgConn().Exec(ctx, fmt.Sprintf("SELECT repeat('x', %d), 'tail'", size)).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 1 || len(rs[0].Rows) != 1 {
		t.Fatalf("results: %d", len(rs))
	}
	row := rs[0].Rows[0]
	if len(row[0]) != size || bytes.Count(row[0], []byte{'x'}) != size || string(row[1]) != "tail" {
		t.Fatalf("value of %d bytes (want %d), next column %q", len(row[0]), size, row[1])
	}
	rs = nil
	row = nil

	big := bytes.Repeat([]byte("0123456789abcdef"), size/16)
	big[size/2] = 'Z'
	sum := md5.Sum(big)
	res := c.PgConn().ExecParams(ctx, "SELECT length($1::text), md5($1::text)", [][]byte{big}, nil, nil, nil).Read()
	if res.Err != nil {
		t.Fatal(res.Err)
	}
	if got := rowsText(res.Rows); got != fmt.Sprintf("%d,%s", size, hex.EncodeToString(sum[:])) {
		t.Fatalf("64 MiB parameter: server saw %q", got)
	}
	// And the connection is fine afterwards.
	var v int
	if err := c.QueryRow(ctx, "SELECT 8").Scan(&v); err != nil || v != 8 {
		t.Fatalf("after large values: %d %v", v, err)
	}
}

// TestBackendKeyDataProtocol30: a protocol 3.0 client gets a BackendKeyData
// with a 4-byte secret key (variable-length keys are protocol 3.2 only),
// also after asking for 3.2 and being negotiated down to 3.0.
func TestBackendKeyDataProtocol30(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 1})
	tok := token(t, "p1", "anon", "k", nil)
	for _, version := range []uint32{proto30, proto32} {
		r := h.rawDial(t)
		r.write(startupPacket(version, "user", "anon", "database", "p1"))
		if version == proto32 {
			if _, ok := r.receive().(*pgproto3.NegotiateProtocolVersion); !ok {
				t.Fatal("want NegotiateProtocolVersion")
			}
		}
		key := r.login(tok)
		if len(key.SecretKey) != 4 {
			t.Errorf("protocol %d.%d client: BackendKeyData secret key of %d bytes; protocol 3.0 has exactly 4 (libpq < 18 fails: \"message contents do not agree with length in message type K\")",
				version>>16, version&0xffff, len(key.SecretKey))
		}
		r.send(&pgproto3.Terminate{})
	}
	waitFor(t, "the clients to leave", 3*time.Second, func() bool { return h.srv.ClientCount() == 0 })
}

// clientProgram finds psql or pgbench next to the server binaries or on PATH.
func clientProgram(t *testing.T, name string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if b, err := pgcluster.FindBinaries(ctx); err == nil && b.Dir != "" {
		if p := filepath.Join(b.Dir, name); isFile(p) {
			return p
		}
	}
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s not found (Debian package postgresql-client): %v", name, err)
	}
	return p
}

func isFile(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir()
}

// libpqURL is a connection string for libpq programs (no pgx-only options).
func (h *harness) libpqURL(ref, role, tok string) string {
	host, port, _ := net.SplitHostPort(h.addr)
	return fmt.Sprintf("postgres://%s:%s@%s:%s/%s?sslmode=disable&connect_timeout=10", url.QueryEscape(role), url.QueryEscape(tok), host, port, ref)
}

// TestPsqlAndPgbench: libpq clients work through the proxy: psql runs
// queries (simple protocol, COPY) and pgbench runs a script with the simple
// and the extended (unnamed statement) protocol from several clients.
func TestPsqlAndPgbench(t *testing.T) {
	h := startProxy(t, harnessOpts{poolSize: 2})
	psql := clientProgram(t, "psql")
	pgbench := clientProgram(t, "pgbench")
	u := h.libpqURL("p2", "authenticated", token(t, "p2", "authenticated", "libpq-user", nil))
	run := func(name string, args ...string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, name, args...)
		cmd.Env = append(os.Environ(), "PGAPPNAME=cascata-test", "PGOPTIONS=", "PSQLRC=/dev/null")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s %v: %v\n%s", filepath.Base(name), args[1:], err, out)
		}
		return string(out)
	}
	out := run(psql, u, "-X", "-At", "-v", "ON_ERROR_STOP=1",
		"-c", "SELECT current_user, current_setting('request.jwt.claims')::jsonb->>'sub'",
		"-c", "SELECT 1; SELECT 2",
		"-c", "COPY (SELECT g FROM generate_series(1, 3) g) TO STDOUT")
	if want := "authenticated|libpq-user\n1\n2\n1\n2\n3\n"; out != want {
		t.Fatalf("psql output %q, want %q", out, want)
	}
	script := filepath.Join(t.TempDir(), "bench.sql")
	if err := os.WriteFile(script, []byte("\\set n random(1, 1000)\nSELECT :n::int + 1, current_user;\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, mode := range []string{"simple", "extended"} {
		out := run(pgbench, "-n", "-f", script, "-c", "4", "-t", "25", "-M", mode, u)
		if !strings.Contains(out, "number of transactions actually processed: 100/100") || !strings.Contains(out, "number of failed transactions: 0") {
			t.Fatalf("pgbench -M %s:\n%s", mode, out)
		}
	}
}
