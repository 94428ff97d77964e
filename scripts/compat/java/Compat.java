// pgjdbc part of the client matrix (scripts/compat/run.sh):
//
//   java -cp /usr/share/java/postgresql.jar Compat.java HOST PORT DB USER TOKEN TABLE
//
// Prints one line per check: "check NAME ok ...", "check NAME FAIL reason".
// The table (id int primary key, name text, qty int) and
// myschema.compat_marker exist already. Exit status 1 when a check failed.

import java.io.StringReader;
import java.io.StringWriter;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.HashSet;
import java.util.Objects;
import java.util.Properties;
import java.util.Set;

import org.postgresql.PGConnection;
import org.postgresql.PGStatement;

public class Compat {
    interface Check {
        void run() throws Exception;
    }

    static boolean failed;
    static String note = "";
    static String url;
    static Properties props;
    static Connection conn;
    static String t;

    static void check(String name, Check c) {
        note = "";
        long start = System.nanoTime();
        try {
            c.run();
            System.out.printf("check %s ok %dms %s%n", name, (System.nanoTime() - start) / 1_000_000, note);
        } catch (Throwable e) {
            failed = true;
            String state = e instanceof SQLException ? " (SQLSTATE " + ((SQLException) e).getSQLState() + ")" : "";
            System.out.printf("check %s FAIL %s%n", name, (e.getClass().getSimpleName() + ": " + e.getMessage() + state).replaceAll("\\s+", " "));
        }
        System.out.flush();
    }

    static void expect(String what, Object want, Object got) {
        if (!Objects.equals(want, got)) {
            throw new AssertionError(what + ": want " + want + ", got " + got);
        }
    }

    interface SqlRun {
        void run() throws SQLException;
    }

    static void expectState(String want, SqlRun r) {
        try {
            r.run();
        } catch (SQLException e) {
            expect("SQLSTATE of \"" + e.getMessage() + "\"", want, e.getSQLState());
            return;
        }
        throw new AssertionError("want SQLSTATE " + want + ", got no error");
    }

    static Object one(Connection c, String sql) throws SQLException {
        try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            rs.next();
            return rs.getObject(1);
        }
    }

    static Connection connect() throws SQLException {
        return DriverManager.getConnection(url, props);
    }

    // The backend a statement runs on: server port and pid.
    static final String BACKEND = "inet_server_port()::text || ':' || pg_backend_pid()";
    static final int MAX_HOLDERS = 15;
    // Makes the proxy run a read on the primary (the search_path check
    // steals primary backends).
    static final String PRIMARY = "/* cascata:primary */ "; // below the project's pool_size (20)

    // Takes a backend away from the client under test, so that its next
    // transaction must run on another one: begins transactions on other
    // connections (explicit transactions run on the primary) until one runs
    // on that backend, and holds them until release().
    static class Stealer implements AutoCloseable {
        final java.util.List<Connection> holders = new java.util.ArrayList<>();
        int began;
        int steals;

        void steal(String target) throws SQLException {
            while (began < MAX_HOLDERS) {
                if (began == holders.size()) {
                    Connection c = connect();
                    c.setAutoCommit(false);
                    holders.add(c);
                }
                Connection h = holders.get(began++);
                if (target.equals(one(h, "select " + BACKEND))) {
                    steals++;
                    return;
                }
            }
        }

        void release() throws SQLException {
            for (int i = 0; i < began; i++) {
                holders.get(i).commit();
            }
            began = 0;
        }

        @Override
        public void close() throws SQLException {
            for (Connection h : holders) {
                h.close();
            }
        }
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 6) {
            System.err.println("usage: Compat HOST PORT DB USER TOKEN TABLE");
            System.exit(2);
        }
        url = "jdbc:postgresql://" + args[0] + ":" + args[1] + "/" + args[2];
        props = new Properties();
        props.setProperty("user", args[3]);
        props.setProperty("password", args[4]);
        props.setProperty("connectTimeout", "10");
        t = args[5];

        check("connect", () -> {
            conn = connect();
            expect("current_user", "authenticated", one(conn, "select current_user"));
        });
        if (conn == null) {
            System.exit(1);
        }

        check("crud", () -> {
            try (PreparedStatement ins = conn.prepareStatement("insert into " + t + " (id, name, qty) values (?, ?, ?)")) {
                ins.setInt(1, 1);
                ins.setString(2, "one");
                ins.setInt(3, 1);
                expect("inserted rows", 1, ins.executeUpdate());
            }
            try (PreparedStatement sel = conn.prepareStatement("select name, qty from " + t + " where id = ?")) {
                sel.setInt(1, 1);
                try (ResultSet rs = sel.executeQuery()) {
                    expect("a row", true, rs.next());
                    expect("name", "one", rs.getString(1));
                }
            }
            try (PreparedStatement upd = conn.prepareStatement("update " + t + " set qty = qty + ? where id = ?")) {
                upd.setInt(1, 41);
                upd.setInt(2, 1);
                expect("updated rows", 1, upd.executeUpdate());
            }
            expect("qty after update", 42, one(conn, "select qty from " + t + " where id = 1"));
            try (Statement st = conn.createStatement()) {
                expect("deleted rows", 1, st.executeUpdate("delete from " + t + " where id = 1"));
            }
            expect("rows after delete", 0L, one(conn, "select count(*) from " + t + " where id = 1"));
        });

        check("rollback", () -> {
            conn.setAutoCommit(false);
            try (Statement st = conn.createStatement()) {
                st.executeUpdate("insert into " + t + " (id, name, qty) values (2, 'two', 2)");
                expect("rows inside the transaction", 1L, one(conn, "select count(*) from " + t + " where id = 2"));
                conn.rollback();
            } finally {
                conn.setAutoCommit(true);
            }
            expect("rows after rollback", 0L, one(conn, "select count(*) from " + t + " where id = 2"));
        });

        // pgjdbc switches a PreparedStatement to a named server-side
        // statement after prepareThreshold (5) executions. Each execution
        // is its own transaction; after every other round other connections
        // take the backend the insert ran on.
        check("prepared", () -> {
            try (Stealer st = new Stealer();
                 PreparedStatement ins = conn.prepareStatement("insert into " + t + " (id, name, qty) values (?, ?, ?) returning " + BACKEND);
                 PreparedStatement sel = conn.prepareStatement("select name, " + BACKEND + " from " + t + " where id = ?")) {
                Set<String> insBackends = new HashSet<>();
                Set<String> all = new HashSet<>();
                for (int i = 1; i <= 8; i++) {
                    ins.setInt(1, 100 + i);
                    ins.setString(2, "p" + i);
                    ins.setInt(3, i);
                    String be;
                    try (ResultSet rs = ins.executeQuery()) {
                        rs.next();
                        be = rs.getString(1);
                    }
                    insBackends.add(be);
                    all.add(be);
                    for (int j : new int[] {100 + i, 101}) {
                        sel.setInt(1, j);
                        try (ResultSet rs = sel.executeQuery()) {
                            expect("row " + j + " found", true, rs.next());
                            expect("name", "p" + (j - 100), rs.getString(1));
                            all.add(rs.getString(2));
                        }
                    }
                    if (st.began > 0) {
                        st.release();
                    } else if (i % 2 == 1) {
                        st.steal(be);
                    }
                }
                expect("insert uses a named server-side statement", true, ins.unwrap(PGStatement.class).isUseServerPrepare());
                expect("select uses a named server-side statement", true, sel.unwrap(PGStatement.class).isUseServerPrepare());
                note = "(insert ran on " + insBackends.size() + " primary backends, statements on " + all.size() + " backends, " + st.steals + " steals)";
                if (insBackends.size() < 2) {
                    throw new AssertionError("the prepared insert ran on one backend only " + insBackends + ": re-preparing was not exercised");
                }
            }
        });

        check("error_then_ok", () -> {
            expectState("22012", () -> one(conn, "select 1/0"));
            expect("after the error", 1, one(conn, "select 1"));
            conn.setAutoCommit(false);
            try {
                expectState("42P01", () -> one(conn, "select * from no_such_table"));
                expectState("25P02", () -> one(conn, "select 1"));
                conn.rollback();
            } finally {
                conn.setAutoCommit(true);
            }
            try (PreparedStatement ps = conn.prepareStatement("select ?::int")) {
                for (int i = 0; i < 6; i++) {
                    ps.setInt(1, i);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        expect("after the rollback", i, rs.getInt(1));
                    }
                }
            }
        });

        // SET, then other connections take the backend this client ran on.
        check("search_path", () -> {
            try (Statement st = conn.createStatement()) {
                st.execute("SET search_path TO myschema, public");
            }
            String be = (String) one(conn, PRIMARY + "select " + BACKEND);
            try (Stealer st = new Stealer()) {
                st.steal(be);
                try (Statement s = conn.createStatement(); ResultSet rs = s.executeQuery(PRIMARY + "select v, " + BACKEND + " from compat_marker")) {
                    rs.next();
                    expect("compat_marker.v", "myschema", rs.getString(1));
                    note = "(SET on " + be + ", next transaction on " + rs.getString(2) + ")";
                }
                expect("compat_marker.v (no hint)", "myschema", one(conn, "select v from compat_marker"));
                expect("show search_path", "myschema, public", one(conn, "show search_path"));
            } finally {
                try (Statement st = conn.createStatement()) {
                    st.execute("RESET search_path");
                }
            }
        });

        check("copy", () -> {
            StringBuilder want = new StringBuilder();
            for (int i = 1000; i < 1100; i++) {
                want.append(i).append("\tcopy ").append(i).append('\t').append(i % 7).append('\n');
            }
            var cm = conn.unwrap(PGConnection.class).getCopyAPI();
            expect("rows copied in", 100L, cm.copyIn("copy " + t + " (id, name, qty) from stdin", new StringReader(want.toString())));
            StringWriter out = new StringWriter();
            cm.copyOut("copy (select id, name, qty from " + t + " where id >= 1000 order by id) to stdout", out);
            expect("COPY TO output equals COPY FROM input", true, want.toString().equals(out.toString()));
        });

        check("cancel", () -> {
            long start = System.nanoTime();
            try (Statement st = conn.createStatement()) {
                Thread canceller = new Thread(() -> {
                    try {
                        Thread.sleep(300);
                        st.cancel();
                    } catch (Exception e) {
                        e.printStackTrace();
                    }
                });
                canceller.start();
                expectState("57014", () -> st.executeQuery("select pg_sleep(5)"));
                canceller.join();
            }
            double cancelled = (System.nanoTime() - start) / 1e9;
            if (cancelled > 2) {
                throw new AssertionError("Statement.cancel took " + cancelled + "s");
            }
            expect("after the cancel", 1, one(conn, "select 1"));
            start = System.nanoTime();
            try (Statement st = conn.createStatement()) {
                st.setQueryTimeout(1);
                expectState("57014", () -> st.executeQuery("select pg_sleep(5)"));
            }
            double timedOut = (System.nanoTime() - start) / 1e9;
            if (timedOut > 3) {
                throw new AssertionError("setQueryTimeout(1) took " + timedOut + "s");
            }
            expect("after the timeout", 1, one(conn, "select 1"));
            note = String.format("(Statement.cancel after %.2fs, setQueryTimeout(1) after %.2fs)", cancelled, timedOut);
        });

        conn.close();
        System.exit(failed ? 1 : 0);
    }
}
