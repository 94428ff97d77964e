#!/usr/bin/python3
"""Python part of the client matrix (scripts/compat/run.sh).

    /usr/bin/python3 compat.py psycopg2|asyncpg URL TABLE

Drives the proxy with psycopg2 (Debian python3-psycopg2) or asyncpg (Debian
python3-asyncpg) and prints one line per check: "check NAME ok ...",
"check NAME FAIL reason" or "check NAME skip reason". The table (id int
primary key, name text, qty int) and myschema.compat_marker exist already.
Exit status 1 when a check failed.
"""

import asyncio
import io
import sys
import threading
import time

FAILED = False
NOTE = ""

# The backend a statement runs on: server port and pid.
BACKEND = "inet_server_port()::text || ':' || pg_backend_pid()"
# Makes the proxy run a read on the primary (the search_path check steals
# primary backends).
PRIMARY = "/* cascata:primary */ "
MAX_HOLDERS = 15  # below the project's pool_size (20)


def report(name, start, err):
    global FAILED
    if err is None:
        print(f"check {name} ok {int((time.monotonic() - start) * 1000)}ms {NOTE}", flush=True)
    else:
        FAILED = True
        msg = " ".join(f"{type(err).__name__}: {err}".split())
        print(f"check {name} FAIL {msg}", flush=True)


def check(name, fn):
    global NOTE
    NOTE = ""
    start = time.monotonic()
    try:
        fn()
        report(name, start, None)
    except Exception as e:  # noqa: BLE001 - every failure is reported
        report(name, start, e)


async def acheck(name, fn):
    global NOTE
    NOTE = ""
    start = time.monotonic()
    try:
        await asyncio.wait_for(fn(), 30)
        report(name, start, None)
    except Exception as e:  # noqa: BLE001
        report(name, start, e)


def expect(what, want, got):
    if want != got:
        raise AssertionError(f"{what}: want {want!r}, got {got!r}")


def backends_note(ins, every, steals):
    global NOTE
    NOTE = f"(insert ran on {len(ins)} primary backends, statements on {len(every)} backends, {steals} steals)"
    if len(ins) < 2:
        raise AssertionError(f"the prepared insert ran on one backend only {ins}: re-preparing was not exercised")


class Stealer:
    """Takes a backend away from the client under test, so that its next
    transaction must run on another one: begins transactions on other
    connections (explicit transactions run on the primary) until one runs on
    that backend, and holds them until release()."""

    def __init__(self, connect):
        self.connect = connect
        self.holders = []
        self.began = 0
        self.steals = 0

    def steal(self, target):
        while self.began < MAX_HOLDERS:
            if self.began == len(self.holders):
                self.holders.append(self.connect())
            h = self.holders[self.began]
            self.began += 1
            cur = h.cursor()
            cur.execute("select " + BACKEND)  # psycopg2 begins a transaction first
            if cur.fetchone()[0] == target:
                self.steals += 1
                return

    def release(self):
        for h in self.holders[: self.began]:
            h.commit()
        self.began = 0

    def close(self):
        for h in self.holders:
            h.close()


class AsyncStealer(Stealer):
    async def steal(self, target):
        while self.began < MAX_HOLDERS:
            if self.began == len(self.holders):
                self.holders.append(await self.connect())
            h = self.holders[self.began]
            self.began += 1
            await h.execute("begin")
            if await h.fetchval("select " + BACKEND) == target:
                self.steals += 1
                return

    async def release(self):
        for h in self.holders[: self.began]:
            await h.execute("commit")
        self.began = 0

    async def close(self):
        for h in self.holders:
            await h.close()


# ---------------------------------------------------------------- psycopg2

def run_psycopg2(url, t):
    import psycopg2
    import psycopg2.errors

    state = {}

    def connect():
        conn = psycopg2.connect(url, connect_timeout=10)
        cur = conn.cursor()
        cur.execute("select current_user")
        expect("current_user", "authenticated", cur.fetchone()[0])
        conn.commit()
        state["conn"] = conn

    check("connect", connect)
    conn = state.get("conn")
    if conn is None:
        return

    def check_rb(name, fn):
        # After a failed check the connection may be in a failed transaction.
        def run():
            try:
                fn()
            except Exception:
                conn.rollback()
                raise
        check(name, run)

    def crud():
        cur = conn.cursor()
        cur.execute(f"insert into {t} (id, name, qty) values (%s, %s, %s)", (1, "one", 1))
        conn.commit()
        cur.execute(f"select name, qty from {t} where id = %s", (1,))
        expect("row", ("one", 1), cur.fetchone())
        conn.commit()
        cur.execute(f"update {t} set qty = qty + %s where id = %s", (41, 1))
        expect("updated rows", 1, cur.rowcount)
        conn.commit()
        cur.execute(f"select qty from {t} where id = 1")
        expect("qty after update", 42, cur.fetchone()[0])
        cur.execute(f"delete from {t} where id = 1")
        expect("deleted rows", 1, cur.rowcount)
        conn.commit()
        cur.execute(f"select count(*) from {t} where id = 1")
        expect("rows after delete", 0, cur.fetchone()[0])
        conn.commit()

    check_rb("crud", crud)

    def rollback():
        cur = conn.cursor()
        cur.execute(f"insert into {t} (id, name, qty) values (2, 'two', 2)")
        cur.execute(f"select count(*) from {t} where id = 2")
        expect("rows inside the transaction", 1, cur.fetchone()[0])
        conn.rollback()
        cur.execute(f"select count(*) from {t} where id = 2")
        expect("rows after rollback", 0, cur.fetchone()[0])
        conn.commit()

    check_rb("rollback", rollback)

    # psycopg2 has no protocol-level prepared statements: SQL PREPARE/EXECUTE,
    # each EXECUTE in its own transaction. After every other round other
    # connections take the backend the insert ran on.
    def prepared():
        st = Stealer(lambda: psycopg2.connect(url, connect_timeout=10))
        try:
            cur = conn.cursor()
            cur.execute(f"prepare pg2_ins (int, text, int) as insert into {t} (id, name, qty) values ($1, $2, $3) returning {BACKEND}")
            cur.execute(f"prepare pg2_sel (int) as select name, {BACKEND} from {t} where id = $1")
            conn.commit()
            ins, every = set(), set()
            for i in range(1, 9):
                cur.execute("execute pg2_ins (%s, %s, %s)", (100 + i, f"p{i}", i))
                be = cur.fetchone()[0]
                ins.add(be)
                every.add(be)
                conn.commit()
                for j in (100 + i, 101):
                    cur.execute("execute pg2_sel (%s)", (j,))
                    name, be2 = cur.fetchone()
                    expect("name", f"p{j - 100}", name)
                    every.add(be2)
                    conn.commit()
                if st.began:
                    st.release()
                elif i % 2 == 1:
                    st.steal(be)
            cur.execute("deallocate pg2_sel")
            conn.commit()
            try:
                cur.execute("execute pg2_sel (101)")
                raise AssertionError("pg2_sel still runs after DEALLOCATE")
            except psycopg2.Error as e:
                expect("SQLSTATE of EXECUTE after DEALLOCATE", "26000", e.pgcode)
                conn.rollback()
            backends_note(ins, every, st.steals)
        finally:
            st.close()

    check_rb("prepared", prepared)

    def error_then_ok():
        cur = conn.cursor()
        try:
            cur.execute("select 1/0")
            raise AssertionError("select 1/0 did not fail")
        except psycopg2.errors.DivisionByZero as e:
            expect("SQLSTATE", "22012", e.pgcode)
        try:
            cur.execute("select 1")
            raise AssertionError("statement in an aborted transaction did not fail")
        except psycopg2.errors.InFailedSqlTransaction as e:
            expect("SQLSTATE", "25P02", e.pgcode)
        conn.rollback()
        cur.execute("select 2")
        expect("after the error", 2, cur.fetchone()[0])
        conn.commit()

    check_rb("error_then_ok", error_then_ok)

    # SET, then other connections take the backend this client ran on, so
    # its next transaction runs on another one.
    def search_path():
        global NOTE
        cur = conn.cursor()
        cur.execute("SET search_path TO myschema, public")
        conn.commit()
        cur.execute(PRIMARY + "select " + BACKEND)
        be = cur.fetchone()[0]
        conn.commit()
        st = Stealer(lambda: psycopg2.connect(url, connect_timeout=10))
        try:
            st.steal(be)
            cur.execute(f"{PRIMARY}select v, {BACKEND} from compat_marker")
            v, be2 = cur.fetchone()
            expect("compat_marker.v", "myschema", v)
            cur.execute("select v from compat_marker")  # may go to a replica
            expect("compat_marker.v (no hint)", "myschema", cur.fetchone()[0])
            cur.execute("show search_path")
            expect("show search_path", "myschema, public", cur.fetchone()[0])
            conn.commit()
            NOTE = f"(SET on {be}, next transaction on {be2})"
        finally:
            st.close()
            conn.rollback()
            cur.execute("RESET search_path")
            conn.commit()

    check_rb("search_path", search_path)

    def copy():
        cur = conn.cursor()
        want = "".join(f"{i}\tcopy {i}\t{i % 7}\n" for i in range(1000, 1100))
        cur.copy_expert(f"copy {t} (id, name, qty) from stdin", io.StringIO(want))
        conn.commit()
        out = io.StringIO()
        cur.copy_expert(f"copy (select id, name, qty from {t} where id >= 1000 order by id) to stdout", out)
        conn.commit()
        expect("COPY TO output equals COPY FROM input", True, out.getvalue() == want)

    check_rb("copy", copy)

    def cancel():
        global NOTE
        conn.autocommit = True
        try:
            cur = conn.cursor()
            timer = threading.Timer(0.3, conn.cancel)
            timer.start()
            start = time.monotonic()
            try:
                cur.execute("select pg_sleep(5)")
                raise AssertionError("pg_sleep(5) was not cancelled")
            except psycopg2.errors.QueryCanceled as e:
                expect("SQLSTATE", "57014", e.pgcode)
            finally:
                timer.cancel()
            took = time.monotonic() - start
            if took > 2:
                raise AssertionError(f"cancel took {took:.1f}s")
            NOTE = f"(after {took:.2f}s)"
            cur.execute("select 1")
            expect("after the cancel", 1, cur.fetchone()[0])
        finally:
            conn.autocommit = False

    check("cancel", cancel)

    conn.close()


# ---------------------------------------------------------------- asyncpg

async def run_asyncpg(url, t):
    import asyncpg

    state = {}

    async def connect():
        conn = await asyncpg.connect(url, timeout=10)
        expect("current_user", "authenticated", await conn.fetchval("select current_user"))
        state["conn"] = conn

    await acheck("connect", connect)
    conn = state.get("conn")
    if conn is None:
        return

    async def crud():
        await conn.execute(f"insert into {t} (id, name, qty) values ($1, $2, $3)", 1, "one", 1)
        row = await conn.fetchrow(f"select name, qty from {t} where id = $1", 1)
        expect("row", ("one", 1), tuple(row))
        expect("update", "UPDATE 1", await conn.execute(f"update {t} set qty = qty + $1 where id = $2", 41, 1))
        expect("qty after update", 42, await conn.fetchval(f"select qty from {t} where id = $1", 1))
        expect("delete", "DELETE 1", await conn.execute(f"delete from {t} where id = $1", 1))
        expect("rows after delete", 0, await conn.fetchval(f"select count(*) from {t} where id = $1", 1))

    await acheck("crud", crud)

    async def rollback():
        class Rollback(Exception):
            pass

        try:
            async with conn.transaction():
                await conn.execute(f"insert into {t} (id, name, qty) values ($1, $2, $3)", 2, "two", 2)
                expect("rows inside the transaction", 1, await conn.fetchval(f"select count(*) from {t} where id = 2"))
                raise Rollback()
        except Rollback:
            pass
        expect("rows after rollback", 0, await conn.fetchval(f"select count(*) from {t} where id = 2"))

    await acheck("rollback", rollback)

    # asyncpg prepares every statement under a name; conn.prepare() returns
    # one to reuse. After every other round other connections take the
    # backend the insert ran on.
    async def prepared():
        st = AsyncStealer(lambda: asyncpg.connect(url, timeout=10))
        try:
            ins_st = await conn.prepare(f"insert into {t} (id, name, qty) values ($1, $2, $3) returning {BACKEND}")
            sel = await conn.prepare(f"select name, {BACKEND} from {t} where id = $1")
            ins, every = set(), set()
            for i in range(1, 9):
                be = await ins_st.fetchval(100 + i, f"p{i}", i)
                ins.add(be)
                every.add(be)
                for j in (100 + i, 101):
                    name, be2 = await sel.fetchrow(j)
                    expect("name", f"p{j - 100}", name)
                    every.add(be2)
                if st.began:
                    await st.release()
                elif i % 2 == 1:
                    await st.steal(be)
            backends_note(ins, every, st.steals)
        finally:
            await st.close()

    await acheck("prepared", prepared)

    async def error_then_ok():
        try:
            await conn.execute("select 1/0")
            raise AssertionError("select 1/0 did not fail")
        except asyncpg.PostgresError as e:
            expect("SQLSTATE", "22012", e.sqlstate)
        expect("after the error", 1, await conn.fetchval("select 1"))
        tr = conn.transaction()
        await tr.start()
        try:
            await conn.execute("select * from no_such_table")
            raise AssertionError("no_such_table did not fail")
        except asyncpg.PostgresError as e:
            expect("SQLSTATE", "42P01", e.sqlstate)
        try:
            await conn.fetchval("select 1")
            raise AssertionError("statement in an aborted transaction did not fail")
        except asyncpg.PostgresError as e:
            expect("SQLSTATE", "25P02", e.sqlstate)
        await tr.rollback()
        expect("after the rollback", 2, await conn.fetchval("select 2"))

    await acheck("error_then_ok", error_then_ok)

    async def search_path():
        global NOTE
        await conn.execute("SET search_path TO myschema, public")
        be = await conn.fetchval(PRIMARY + "select " + BACKEND)
        st = AsyncStealer(lambda: asyncpg.connect(url, timeout=10))
        try:
            await st.steal(be)
            v, be2 = await conn.fetchrow(f"{PRIMARY}select v, {BACKEND} from compat_marker")
            expect("compat_marker.v", "myschema", v)
            expect("compat_marker.v (no hint)", "myschema", await conn.fetchval("select v from compat_marker"))
            expect("show search_path", "myschema, public", await conn.fetchval("show search_path"))
            NOTE = f"(SET on {be}, next transaction on {be2})"
        finally:
            await st.close()
            await conn.execute("RESET search_path")

    await acheck("search_path", search_path)

    # copy_records_to_table on a connection that has not written yet (as a
    # bulk-load script would), after another connection's write that a
    # replica has replayed (so the replica is fit): asyncpg sends
    # Parse/Describe/Flush of "SELECT cols FROM t LIMIT 1" (a read, which may
    # go to the replica), then the COPY as a simple Query, with no Sync in
    # between. Three rounds, 100 rows each.
    async def copy():
        want = ""
        for k in range(3):
            await conn.execute(f"insert into {t} values ($1, 'w', 0)", 900 + k)
            await asyncio.sleep(0.3)
            fresh = await asyncpg.connect(url, timeout=10)
            try:
                first = 1000 + 100 * k
                records = [(i, f"copy {i}", i % 7) for i in range(first, first + 100)]
                try:
                    res = await fresh.copy_records_to_table(t, records=records, columns=["id", "name", "qty"], timeout=3)
                except asyncio.TimeoutError:
                    raise AssertionError(f"copy_records_to_table on a fresh connection (round {k + 1}): no answer within 3s") from None
                expect("copy in", "COPY 100", res)
                want += "".join(f"{i}\tcopy {i}\t{i % 7}\n" for i in range(first, first + 100))
            finally:
                fresh.terminate()
        # conn did not write those rows, so read-your-writes does not hold
        # its reads back for them: wait (bounded) until its reads see them.
        for _ in range(50):
            if await conn.fetchval(f"select count(*) from {t} where id >= 1000") == 300:
                break
            await asyncio.sleep(0.1)
        out = io.BytesIO()
        await conn.copy_from_query(f"select id, name, qty from {t} where id >= 1000 order by id", output=out, timeout=5)
        expect("COPY TO output equals the records", True, out.getvalue() == want.encode())

    await acheck("copy", copy)

    # asyncpg's timeout sends a CancelRequest and waits for the server to
    # end the statement; the caller sees asyncio.TimeoutError.
    async def cancel():
        global NOTE
        start = time.monotonic()
        try:
            await conn.fetchval("select pg_sleep(5)", timeout=0.3)
            raise AssertionError("pg_sleep(5) was not cancelled")
        except asyncio.TimeoutError:
            pass
        expect("after the cancel", 1, await conn.fetchval("select 1"))
        took = time.monotonic() - start
        if took > 2:
            raise AssertionError(f"cancel took {took:.1f}s")
        NOTE = f"(TimeoutError, connection usable after {took:.2f}s)"
        # The same through asyncio: cancelling the task cancels the query.
        task = asyncio.ensure_future(conn.fetchval("select pg_sleep(5)"))
        await asyncio.sleep(0.3)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        expect("after the task's cancellation", 1, await conn.fetchval("select 1"))
        took = time.monotonic() - start
        if took > 3:
            raise AssertionError(f"two cancels took {took:.1f}s")

    await acheck("cancel", cancel)

    # asyncpg.Pool resets a connection on release with its reset query
    # (pg_advisory_unlock_all, CLOSE ALL, UNLISTEN *, RESET ALL), which
    # cascata emulates for the client's own session: the pool runs as it is.
    async def pool():
        p = await asyncpg.create_pool(url, min_size=1, max_size=2, timeout=10)
        try:
            first = None
            for i in range(3):
                async with p.acquire() as c:
                    expect("current_user", "authenticated", await c.fetchval("select current_user"))
                    sp = await c.fetchval("select current_setting('search_path')")
                    if first is None:
                        first = sp
                    # the SET of the last acquire was reset on release
                    expect("search_path after a release", first, sp)
                    await c.execute("set search_path = pg_catalog")
        finally:
            p.terminate()

    await acheck("pool", pool)
    await conn.close()


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in ("psycopg2", "asyncpg"):
        print("usage: compat.py psycopg2|asyncpg URL TABLE", file=sys.stderr)
        return 2
    client, url, table = sys.argv[1:]
    if client == "psycopg2":
        run_psycopg2(url, table)
    else:
        asyncio.run(run_asyncpg(url, table))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
