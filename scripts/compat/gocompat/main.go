// Command gocompat is the Go part of the client matrix (scripts/compat/run.sh):
// it drives the proxy with pgx in one QueryExecMode, or with lib/pq, and
// prints one line per check: "check NAME ok" or "check NAME FAIL reason".
//
//	go run ./scripts/compat/gocompat -client pgx -mode cache_statement -url URL -table T
//	go run ./scripts/compat/gocompat -client libpq -url URL -table T
//
// The table (id int primary key, name text, qty int) and the schema myschema
// with the table compat_marker exist already; the exit status is 1 when a
// check failed.
package main

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
	"github.com/lib/pq"
)

var (
	failed bool
	note   string // set by a check: printed after its outcome
	only   string // -only: run connect and this check only
)

// check runs one named check with a time limit and prints its outcome.
func check(name string, fn func(ctx context.Context) error) {
	if (only == "" && name == "deallocate_all") || (only != "" && name != only && name != "connect") {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	note = ""
	start := time.Now()
	err := fn(ctx)
	if err != nil {
		failed = true
		fmt.Printf("check %s FAIL %s\n", name, oneLine(err.Error()))
		return
	}
	fmt.Printf("check %s ok %dms %s\n", name, time.Since(start).Milliseconds(), note)
}

// primaryHint makes the proxy run a read on the primary (the search_path
// check steals primary backends).
const primaryHint = "/* cascata:primary */ "

// backendSQL names the backend a statement runs on: server port and pid.
const backendSQL = "inet_server_port()::text || ':' || pg_backend_pid()"

// holder is another connection that can hold a transaction open.
type holder interface {
	// begin starts a transaction and returns the backend it runs on
	// (explicit transactions run on the primary).
	begin(ctx context.Context) (string, error)
	commit(ctx context.Context) error
	close()
}

// stealer takes a backend away from the client under test, so that the
// client's next transaction must run on another one: it begins
// transactions on other connections until one of them runs on that
// backend, and holds them until release.
type stealer struct {
	open    func(ctx context.Context) (holder, error)
	holders []holder
	began   int
	steals  int
}

const maxHolders = 15 // below the project's pool_size (20)

func (s *stealer) steal(ctx context.Context, target string) error {
	for s.began < maxHolders {
		if s.began == len(s.holders) {
			h, err := s.open(ctx)
			if err != nil {
				return fmt.Errorf("holding connection: %w", err)
			}
			s.holders = append(s.holders, h)
		}
		be, err := s.holders[s.began].begin(ctx)
		s.began++
		if err != nil {
			return fmt.Errorf("holding connection: %w", err)
		}
		if be == target {
			s.steals++
			return nil
		}
	}
	return nil // not found among maxHolders backends: leave it to chance
}

func (s *stealer) release(ctx context.Context) error {
	for ; s.began > 0; s.began-- {
		if err := s.holders[s.began-1].commit(ctx); err != nil {
			return fmt.Errorf("holding connection: %w", err)
		}
	}
	return nil
}

func (s *stealer) close() {
	for _, h := range s.holders {
		h.close()
	}
}

// backendsNote notes where the prepared statements ran and checks that
// the insert ran on two primary backends at least.
func backendsNote(ins, all map[string]bool, steals int) error {
	note = fmt.Sprintf("(insert ran on %d primary backends, statements on %d backends, %d steals)", len(ins), len(all), steals)
	if len(ins) < 2 {
		return fmt.Errorf("the prepared insert ran on one backend only %v: re-preparing was not exercised", ins)
	}
	return nil
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// sqlState returns the SQLSTATE of a pgx or lib/pq error, or "".
func sqlState(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	var pqErr *pq.Error
	if errors.As(err, &pqErr) {
		return string(pqErr.Code)
	}
	return ""
}

func expectState(err error, want string) error {
	if err == nil {
		return fmt.Errorf("want SQLSTATE %s, got no error", want)
	}
	if got := sqlState(err); got != want {
		return fmt.Errorf("want SQLSTATE %s, got %v", want, err)
	}
	return nil
}

func expectEq[T comparable](what string, want, got T) error {
	if want != got {
		return fmt.Errorf("%s: want %v, got %v", what, want, got)
	}
	return nil
}

var modes = map[string]pgx.QueryExecMode{
	"cache_statement": pgx.QueryExecModeCacheStatement,
	"cache_describe":  pgx.QueryExecModeCacheDescribe,
	"describe_exec":   pgx.QueryExecModeDescribeExec,
	"exec":            pgx.QueryExecModeExec,
	"simple_protocol": pgx.QueryExecModeSimpleProtocol,
}

func main() {
	client := flag.String("client", "pgx", "pgx | libpq")
	mode := flag.String("mode", "cache_statement", "pgx QueryExecMode: cache_statement | cache_describe | describe_exec | exec | simple_protocol")
	url := flag.String("url", "", "connection URL (through the proxy, JWT as password)")
	table := flag.String("table", "", "the table to use")
	flag.StringVar(&only, "only", "", "run the connect check and this one only")
	flag.Parse()
	if *url == "" || *table == "" {
		fmt.Fprintln(os.Stderr, "gocompat: -url and -table are required")
		os.Exit(2)
	}
	switch *client {
	case "pgx":
		m, ok := modes[*mode]
		if !ok {
			fmt.Fprintf(os.Stderr, "gocompat: unknown -mode %q\n", *mode)
			os.Exit(2)
		}
		runPgx(*url, m, pgx.Identifier{*table}.Sanitize(), *table)
	case "libpq":
		runLibpq(*url, pgx.Identifier{*table}.Sanitize())
	default:
		fmt.Fprintf(os.Stderr, "gocompat: unknown -client %q\n", *client)
		os.Exit(2)
	}
	if failed {
		os.Exit(1)
	}
}

// ---------------------------------------------------------------- pgx

type pgxHolder struct{ c *pgx.Conn }

func (h pgxHolder) begin(ctx context.Context) (string, error) {
	if _, err := h.c.Exec(ctx, "begin"); err != nil {
		return "", err
	}
	var be string
	err := h.c.QueryRow(ctx, "select "+backendSQL).Scan(&be)
	return be, err
}

func (h pgxHolder) commit(ctx context.Context) error {
	_, err := h.c.Exec(ctx, "commit")
	return err
}

func (h pgxHolder) close() { h.c.Close(context.Background()) }

func runPgx(url string, mode pgx.QueryExecMode, t, rawTable string) {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		fmt.Printf("check connect FAIL %v\n", err)
		os.Exit(1)
	}
	cfg.DefaultQueryExecMode = mode
	// Cancel with a CancelRequest (the default closes the connection).
	cfg.BuildContextWatcherHandler = func(c *pgconn.PgConn) ctxwatch.Handler {
		return &pgconn.CancelRequestContextWatcherHandler{Conn: c, CancelRequestDelay: 0, DeadlineDelay: 5 * time.Second}
	}
	var conn *pgx.Conn
	check("connect", func(ctx context.Context) error {
		conn, err = pgx.ConnectConfig(ctx, cfg)
		if err != nil {
			return err
		}
		var user string
		if err := conn.QueryRow(ctx, "select current_user").Scan(&user); err != nil {
			return err
		}
		return expectEq("current_user", "authenticated", user)
	})
	if conn == nil {
		return
	}
	defer conn.Close(context.Background())

	check("crud", func(ctx context.Context) error {
		if _, err := conn.Exec(ctx, "insert into "+t+" (id, name, qty) values ($1, $2, $3)", 1, "one", 1); err != nil {
			return fmt.Errorf("insert: %w", err)
		}
		var name string
		var qty int
		if err := conn.QueryRow(ctx, "select name, qty from "+t+" where id = $1", 1).Scan(&name, &qty); err != nil {
			return fmt.Errorf("select: %w", err)
		}
		if err := expectEq("name", "one", name); err != nil {
			return err
		}
		tag, err := conn.Exec(ctx, "update "+t+" set qty = qty + $1 where id = $2", 41, 1)
		if err != nil {
			return fmt.Errorf("update: %w", err)
		}
		if err := expectEq("updated rows", int64(1), tag.RowsAffected()); err != nil {
			return err
		}
		if err := conn.QueryRow(ctx, "select qty from "+t+" where id = $1", 1).Scan(&qty); err != nil {
			return fmt.Errorf("select after update: %w", err)
		}
		if err := expectEq("qty after update", 42, qty); err != nil {
			return err
		}
		if tag, err = conn.Exec(ctx, "delete from "+t+" where id = $1", 1); err != nil {
			return fmt.Errorf("delete: %w", err)
		}
		if err := expectEq("deleted rows", int64(1), tag.RowsAffected()); err != nil {
			return err
		}
		var n int
		if err := conn.QueryRow(ctx, "select count(*) from "+t+" where id = $1", 1).Scan(&n); err != nil {
			return err
		}
		return expectEq("rows after delete", 0, n)
	})

	check("rollback", func(ctx context.Context) error {
		tx, err := conn.Begin(ctx)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "insert into "+t+" (id, name, qty) values ($1, $2, $3)", 2, "two", 2); err != nil {
			_ = tx.Rollback(ctx)
			return fmt.Errorf("insert: %w", err)
		}
		var n int
		if err := tx.QueryRow(ctx, "select count(*) from "+t+" where id = 2").Scan(&n); err != nil {
			_ = tx.Rollback(ctx)
			return err
		}
		if err := expectEq("rows inside the transaction", 1, n); err != nil {
			_ = tx.Rollback(ctx)
			return err
		}
		if err := tx.Rollback(ctx); err != nil {
			return fmt.Errorf("rollback: %w", err)
		}
		if err := conn.QueryRow(ctx, "select count(*) from "+t+" where id = 2").Scan(&n); err != nil {
			return err
		}
		return expectEq("rows after rollback", 0, n)
	})

	// The default mode prepares every statement and reuses it from its
	// cache; every mode also gets explicitly named statements. Each
	// execution is its own transaction. After every other round, other
	// connections take the backend the insert ran on, so the next round
	// runs on another one, where the proxy must prepare the statements
	// again; reads go to the primary or a replica that has the writes.
	check("prepared", func(ctx context.Context) error {
		st := &stealer{open: func(ctx context.Context) (holder, error) {
			c, err := pgx.ConnectConfig(ctx, cfg)
			return pgxHolder{c}, err
		}}
		defer st.close()
		if _, err := conn.Prepare(ctx, "compat_ins", "insert into "+t+" (id, name, qty) values ($1, $2, $3) returning "+backendSQL); err != nil {
			return fmt.Errorf("prepare compat_ins: %w", err)
		}
		if _, err := conn.Prepare(ctx, "compat_sel", "select name, "+backendSQL+" from "+t+" where id = $1"); err != nil {
			return fmt.Errorf("prepare compat_sel: %w", err)
		}
		ins, all := map[string]bool{}, map[string]bool{}
		for i := 1; i <= 8; i++ {
			id := 100 + i
			var insBE string
			if err := conn.QueryRow(ctx, "compat_ins", id, fmt.Sprintf("p%d", i), i).Scan(&insBE); err != nil {
				return fmt.Errorf("execute compat_ins #%d: %w", i, err)
			}
			ins[insBE], all[insBE] = true, true
			for _, j := range []int{id, 101} {
				var name, be string
				if err := conn.QueryRow(ctx, "compat_sel", j).Scan(&name, &be); err != nil {
					return fmt.Errorf("execute compat_sel #%d (id %d): %w", i, j, err)
				}
				if err := expectEq("name", fmt.Sprintf("p%d", j-100), name); err != nil {
					return err
				}
				all[be] = true
			}
			// A text the driver prepares itself in the cache modes.
			var n int
			if err := conn.QueryRow(ctx, "select count(*) from "+t+" where id > $1", 100).Scan(&n); err != nil {
				return fmt.Errorf("cached select #%d: %w", i, err)
			}
			if err := expectEq("count", i, n); err != nil {
				return err
			}
			if st.began > 0 {
				if err := st.release(ctx); err != nil {
					return err
				}
			} else if i%2 == 1 {
				if err := st.steal(ctx, insBE); err != nil {
					return err
				}
			}
		}
		if err := conn.Deallocate(ctx, "compat_sel"); err != nil {
			return fmt.Errorf("deallocate: %w", err)
		}
		if _, err := conn.Exec(ctx, "compat_sel", 101); err == nil {
			return errors.New("compat_sel still runs after its deallocation")
		}
		return backendsNote(ins, all, st.steals)
	})

	check("error_then_ok", func(ctx context.Context) error {
		_, err := conn.Exec(ctx, "select 1/0")
		if err := expectState(err, "22012"); err != nil {
			return err
		}
		var one int
		if err := conn.QueryRow(ctx, "select 1").Scan(&one); err != nil {
			return fmt.Errorf("after the error: %w", err)
		}
		tx, err := conn.Begin(ctx)
		if err != nil {
			return err
		}
		_, err = tx.Exec(ctx, "select * from no_such_table")
		if err := expectState(err, "42P01"); err != nil {
			return err
		}
		_, err = tx.Exec(ctx, "select 1")
		if err := expectState(err, "25P02"); err != nil {
			return err
		}
		if err := tx.Rollback(ctx); err != nil {
			return err
		}
		return conn.QueryRow(ctx, "select 2").Scan(&one)
	})

	// SET, then other connections take the backend this client ran on, so
	// that its next transaction runs on another one.
	searchPath := func(ctx context.Context) error {
		if _, err := conn.Exec(ctx, "SET search_path TO myschema, public"); err != nil {
			return fmt.Errorf("set: %w", err)
		}
		defer conn.Exec(context.Background(), "RESET search_path")
		// Other connections take the backend this client last ran on.
		var be string
		if err := conn.QueryRow(ctx, primaryHint+"select "+backendSQL).Scan(&be); err != nil {
			return err
		}
		st := &stealer{open: func(ctx context.Context) (holder, error) {
			c, err := pgx.ConnectConfig(ctx, cfg)
			return pgxHolder{c}, err
		}}
		defer st.close()
		defer st.release(context.Background())
		if err := st.steal(ctx, be); err != nil {
			return err
		}
		var v, be2 string
		if err := conn.QueryRow(ctx, primaryHint+"select v, "+backendSQL+" from compat_marker").Scan(&v, &be2); err != nil {
			return fmt.Errorf("next transaction: %w", err)
		}
		if err := expectEq("compat_marker.v", "myschema", v); err != nil {
			return err
		}
		// The same read without the hint (it may go to a replica).
		if err := conn.QueryRow(ctx, "select v from compat_marker").Scan(&v); err != nil {
			return fmt.Errorf("read without the hint: %w", err)
		}
		var sp string
		if err := conn.QueryRow(ctx, "show search_path").Scan(&sp); err != nil {
			return err
		}
		note = fmt.Sprintf("(SET on %s, next transaction on %s)", be, be2)
		return expectEq("show search_path", "myschema, public", sp)
	}
	check("search_path", searchPath)

	check("copy", func(ctx context.Context) error {
		var rows [][]any
		var want bytes.Buffer
		for i := 1000; i < 1100; i++ {
			rows = append(rows, []any{i, fmt.Sprintf("copy %d", i), i % 7})
			fmt.Fprintf(&want, "%d\tcopy %d\t%d\n", i, i, i%7)
		}
		n, err := conn.CopyFrom(ctx, pgx.Identifier{rawTable}, []string{"id", "name", "qty"}, pgx.CopyFromRows(rows))
		if err != nil {
			return fmt.Errorf("CopyFrom: %w", err)
		}
		if err := expectEq("rows copied in", int64(100), n); err != nil {
			return err
		}
		var got bytes.Buffer
		if _, err := conn.PgConn().CopyTo(ctx, &got, "copy (select id, name, qty from "+t+" where id >= 1000 order by id) to stdout"); err != nil {
			return fmt.Errorf("CopyTo: %w", err)
		}
		if got.String() != want.String() {
			return fmt.Errorf("COPY TO differs from what went in (%d bytes, want %d)", got.Len(), want.Len())
		}
		// A source that fails half-way: pgx aborts with CopyFail.
		boom := errors.New("compat: source failed")
		i := 0
		_, err = conn.CopyFrom(ctx, pgx.Identifier{rawTable}, []string{"id", "name", "qty"}, pgx.CopyFromFunc(func() ([]any, error) {
			if i++; i > 50 {
				return nil, boom
			}
			return []any{2000 + i, "aborted", 0}, nil
		}))
		// PostgreSQL answers CopyFail with 57014 "COPY from stdin failed: <message>".
		if !errors.Is(err, boom) && (sqlState(err) != "57014" || !strings.Contains(err.Error(), boom.Error())) {
			return fmt.Errorf("CopyFrom with a failing source: want its error or 57014 with its message, got %v", err)
		}
		var n2 int
		if err := conn.QueryRow(ctx, "select count(*) from "+t+" where id >= 2000").Scan(&n2); err != nil {
			return fmt.Errorf("after CopyFail: %w", err)
		}
		note = "(CopyFrom, CopyTo, CopyFail)"
		return expectEq("rows of the aborted COPY", 0, n2)
	})

	check("cancel", func(ctx context.Context) error {
		qctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := conn.Exec(qctx, "select pg_sleep(5)")
		took := time.Since(start)
		if err := expectState(err, "57014"); err != nil {
			return err
		}
		if took > 2*time.Second {
			return fmt.Errorf("cancel took %v", took)
		}
		var one int
		if err := conn.QueryRow(ctx, "select 1").Scan(&one); err != nil {
			return fmt.Errorf("after the cancel: %w", err)
		}
		return nil
	})

	// pgx's DeallocateAll sends DEALLOCATE ALL: it drops this client's
	// statements only; the proxy's own statements on that backend must
	// survive (the search_path round trip needs them), and the driver's
	// cache must keep working.
	check("deallocate_all", func(ctx context.Context) error {
		if _, err := conn.Prepare(ctx, "compat_gone", "select 1"); err != nil {
			return err
		}
		if err := conn.DeallocateAll(ctx); err != nil {
			return fmt.Errorf("DeallocateAll: %w", err)
		}
		for i := 0; i < 3; i++ {
			var n int
			if err := conn.QueryRow(ctx, "select count(*) from "+t+" where id > $1", 100).Scan(&n); err != nil {
				return fmt.Errorf("cached select after DeallocateAll: %w", err)
			}
		}
		return searchPath(ctx)
	})
}

type sqlHolder struct{ c *sql.Conn }

func (h sqlHolder) begin(ctx context.Context) (string, error) {
	if _, err := h.c.ExecContext(ctx, "begin"); err != nil {
		return "", err
	}
	var be string
	err := h.c.QueryRowContext(ctx, "select "+backendSQL).Scan(&be)
	return be, err
}

func (h sqlHolder) commit(ctx context.Context) error {
	_, err := h.c.ExecContext(ctx, "commit")
	return err
}

func (h sqlHolder) close() { h.c.Close() }

// ---------------------------------------------------------------- lib/pq

func runLibpq(url, t string) {
	db, err := sql.Open("postgres", url)
	if err != nil {
		fmt.Printf("check connect FAIL %v\n", err)
		os.Exit(1)
	}
	defer db.Close()
	// One client connection for every check (the cancel check marks a
	// connection bad, so it runs last).
	var conn *sql.Conn
	check("connect", func(ctx context.Context) error {
		conn, err = db.Conn(ctx)
		if err != nil {
			return err
		}
		var user string
		if err := conn.QueryRowContext(ctx, "select current_user").Scan(&user); err != nil {
			return err
		}
		return expectEq("current_user", "authenticated", user)
	})
	if conn == nil {
		return
	}
	defer conn.Close()

	check("crud", func(ctx context.Context) error {
		if _, err := conn.ExecContext(ctx, "insert into "+t+" (id, name, qty) values ($1, $2, $3)", 1, "one", 1); err != nil {
			return fmt.Errorf("insert: %w", err)
		}
		var name string
		if err := conn.QueryRowContext(ctx, "select name from "+t+" where id = $1", 1).Scan(&name); err != nil {
			return fmt.Errorf("select: %w", err)
		}
		if err := expectEq("name", "one", name); err != nil {
			return err
		}
		res, err := conn.ExecContext(ctx, "update "+t+" set qty = qty + $1 where id = $2", 41, 1)
		if err != nil {
			return fmt.Errorf("update: %w", err)
		}
		if n, _ := res.RowsAffected(); n != 1 {
			return fmt.Errorf("updated rows: want 1, got %d", n)
		}
		var qty int
		if err := conn.QueryRowContext(ctx, "select qty from "+t+" where id = $1", 1).Scan(&qty); err != nil {
			return err
		}
		if err := expectEq("qty after update", 42, qty); err != nil {
			return err
		}
		if res, err = conn.ExecContext(ctx, "delete from "+t+" where id = $1", 1); err != nil {
			return fmt.Errorf("delete: %w", err)
		}
		if n, _ := res.RowsAffected(); n != 1 {
			return fmt.Errorf("deleted rows: want 1, got %d", n)
		}
		var n int
		if err := conn.QueryRowContext(ctx, "select count(*) from "+t+" where id = 1").Scan(&n); err != nil {
			return err
		}
		return expectEq("rows after delete", 0, n)
	})

	check("rollback", func(ctx context.Context) error {
		tx, err := conn.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		defer tx.Rollback()
		if _, err := tx.ExecContext(ctx, "insert into "+t+" (id, name, qty) values (2, 'two', 2)"); err != nil {
			return err
		}
		if err := tx.Rollback(); err != nil {
			return err
		}
		var n int
		if err := conn.QueryRowContext(ctx, "select count(*) from "+t+" where id = 2").Scan(&n); err != nil {
			return err
		}
		return expectEq("rows after rollback", 0, n)
	})

	// lib/pq prepares a *sql.Stmt as a named server-side statement. After
	// every other round other connections take the insert's backend.
	check("prepared", func(ctx context.Context) error {
		st := &stealer{open: func(ctx context.Context) (holder, error) {
			c, err := db.Conn(ctx)
			return sqlHolder{c}, err
		}}
		defer st.close()
		insSt, err := conn.PrepareContext(ctx, "insert into "+t+" (id, name, qty) values ($1, $2, $3) returning "+backendSQL)
		if err != nil {
			return fmt.Errorf("prepare insert: %w", err)
		}
		defer insSt.Close()
		sel, err := conn.PrepareContext(ctx, "select name, "+backendSQL+" from "+t+" where id = $1")
		if err != nil {
			return fmt.Errorf("prepare select: %w", err)
		}
		defer sel.Close()
		ins, all := map[string]bool{}, map[string]bool{}
		for i := 1; i <= 8; i++ {
			id := 100 + i
			var insBE string
			if err := insSt.QueryRowContext(ctx, id, fmt.Sprintf("p%d", i), i).Scan(&insBE); err != nil {
				return fmt.Errorf("execute insert #%d: %w", i, err)
			}
			ins[insBE], all[insBE] = true, true
			for _, j := range []int{id, 101} {
				var name, be string
				if err := sel.QueryRowContext(ctx, j).Scan(&name, &be); err != nil {
					return fmt.Errorf("execute select #%d (id %d): %w", i, j, err)
				}
				if err := expectEq("name", fmt.Sprintf("p%d", j-100), name); err != nil {
					return err
				}
				all[be] = true
			}
			if st.began > 0 {
				if err := st.release(ctx); err != nil {
					return err
				}
			} else if i%2 == 1 {
				if err := st.steal(ctx, insBE); err != nil {
					return err
				}
			}
		}
		return backendsNote(ins, all, st.steals)
	})

	check("error_then_ok", func(ctx context.Context) error {
		_, err := conn.ExecContext(ctx, "select 1/0")
		if err := expectState(err, "22012"); err != nil {
			return err
		}
		var one int
		if err := conn.QueryRowContext(ctx, "select 1").Scan(&one); err != nil {
			return fmt.Errorf("after the error: %w", err)
		}
		tx, err := conn.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		defer tx.Rollback()
		_, err = tx.ExecContext(ctx, "select * from no_such_table")
		if err := expectState(err, "42P01"); err != nil {
			return err
		}
		_, err = tx.ExecContext(ctx, "select 1")
		if err := expectState(err, "25P02"); err != nil {
			return err
		}
		if err := tx.Rollback(); err != nil {
			return err
		}
		return conn.QueryRowContext(ctx, "select 2").Scan(&one)
	})

	check("search_path", func(ctx context.Context) error {
		if _, err := conn.ExecContext(ctx, "SET search_path TO myschema, public"); err != nil {
			return fmt.Errorf("set: %w", err)
		}
		defer conn.ExecContext(context.Background(), "RESET search_path")
		var be string
		if err := conn.QueryRowContext(ctx, primaryHint+"select "+backendSQL).Scan(&be); err != nil {
			return err
		}
		st := &stealer{open: func(ctx context.Context) (holder, error) {
			c, err := db.Conn(ctx)
			return sqlHolder{c}, err
		}}
		defer st.close()
		defer st.release(context.Background())
		if err := st.steal(ctx, be); err != nil {
			return err
		}
		var v, be2 string
		if err := conn.QueryRowContext(ctx, primaryHint+"select v, "+backendSQL+" from compat_marker").Scan(&v, &be2); err != nil {
			return fmt.Errorf("next transaction: %w", err)
		}
		note = fmt.Sprintf("(SET on %s, next transaction on %s)", be, be2)
		if err := expectEq("compat_marker.v", "myschema", v); err != nil {
			return err
		}
		// The same read without the hint (it may go to a replica).
		if err := conn.QueryRowContext(ctx, "select v from compat_marker").Scan(&v); err != nil {
			return fmt.Errorf("read without the hint: %w", err)
		}
		return expectEq("compat_marker.v (no hint)", "myschema", v)
	})

	// lib/pq has COPY FROM STDIN (pq.CopyIn) but no COPY TO STDOUT.
	check("copy", func(ctx context.Context) error {
		tx, err := conn.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		defer tx.Rollback()
		st, err := tx.PrepareContext(ctx, pq.CopyIn(strings.Trim(t, `"`), "id", "name", "qty"))
		if err != nil {
			return fmt.Errorf("copy in: %w", err)
		}
		for i := 1000; i < 1100; i++ {
			if _, err := st.ExecContext(ctx, i, fmt.Sprintf("copy %d", i), i%7); err != nil {
				return fmt.Errorf("copy row %d: %w", i, err)
			}
		}
		if _, err := st.ExecContext(ctx); err != nil {
			return fmt.Errorf("copy end: %w", err)
		}
		if err := st.Close(); err != nil {
			return err
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("commit: %w", err)
		}
		var n, sum int
		if err := conn.QueryRowContext(ctx, "select count(*), sum(qty) from "+t+" where id >= 1000").Scan(&n, &sum); err != nil {
			return err
		}
		if err := expectEq("rows copied in", 100, n); err != nil {
			return err
		}
		return nil
	})

	// lib/pq sends a CancelRequest when the context ends, and then
	// discards the connection (database/sql opens another one).
	check("cancel", func(ctx context.Context) error {
		qctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := conn.ExecContext(qctx, "select pg_sleep(5)")
		took := time.Since(start)
		if err == nil {
			return errors.New("pg_sleep(5) was not cancelled")
		}
		if took > 2*time.Second {
			return fmt.Errorf("cancel took %v: %v", took, err)
		}
		if s := sqlState(err); s != "57014" && !errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("want SQLSTATE 57014 or the context's error, got %v", err)
		}
		note = fmt.Sprintf("(%v after %v)", err, took.Round(time.Millisecond))
		var one int
		if err := db.QueryRowContext(ctx, "select 1").Scan(&one); err != nil {
			return fmt.Errorf("after the cancel: %w", err)
		}
		return nil
	})
}
