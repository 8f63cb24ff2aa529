// pgjdbc through geobouncer (transaction pooling), run by tests/integration/test_clients.py.
//
//   java -cp /usr/share/java/postgresql.jar:. Prep HOST PORT DB USER PASSWORD CLIENTS ITERATIONS SCHEMA_PREFIX
//
// CLIENTS threads, one connection each, run at once. Client i works in schema
// SCHEMA_PREFIX + i (SET search_path outside a transaction), sets its own
// statement_timeout and application_name, and reuses PreparedStatements far past
// the driver's prepareThreshold (so pgjdbc switches to named server statements
// S_1, S_2 ... whose names every client shares). Every row read is checked against
// what this client wrote, and every read also checks the session settings: a
// client that sees another client's search_path / SET fails. Transactions use
// SET LOCAL, which must not outlive them. The test process checks the tables
// directly afterwards.
//
// Prints "OK client=<i> rows=<n> sum=<s>" per client, or "FAIL client=<i> ..." and
// exits 1.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Properties;

public class Prep {
    static final int PREPARE_THRESHOLD = 3;

    static String host, db, user, password, prefix;
    static int port, clients, iterations;
    static final List<String> failures = Collections.synchronizedList(new ArrayList<>());
    static final List<String> reports = Collections.synchronizedList(new ArrayList<>());

    public static void main(String[] args) throws Exception {
        if (args.length != 8) {
            System.err.println("usage: Prep HOST PORT DB USER PASSWORD CLIENTS ITERATIONS SCHEMA_PREFIX");
            System.exit(2);
        }
        host = args[0];
        port = Integer.parseInt(args[1]);
        db = args[2];
        user = args[3];
        password = args[4];
        clients = Integer.parseInt(args[5]);
        iterations = Integer.parseInt(args[6]);
        prefix = args[7];
        Class.forName("org.postgresql.Driver");
        List<Thread> threads = new ArrayList<>();
        for (int i = 0; i < clients; i++) {
            final int id = i;
            Thread t = new Thread(() -> {
                try {
                    runClient(id);
                } catch (Throwable e) {
                    failures.add("client=" + id + " " + e);
                    e.printStackTrace();
                }
            }, "client-" + i);
            threads.add(t);
            t.start();
        }
        for (Thread t : threads) {
            t.join(150_000);
            if (t.isAlive()) {
                failures.add(t.getName() + " did not finish");
            }
        }
        for (String r : reports) {
            System.out.println(r);
        }
        for (String f : failures) {
            System.out.println("FAIL " + f);
        }
        System.out.flush();
        System.exit(failures.isEmpty() ? 0 : 1);
    }

    static void check(boolean ok, int id, String what) {
        if (!ok) {
            throw new AssertionError("client=" + id + ": " + what);
        }
    }

    static void checkSettings(int id, String where, String searchPath, String timeout, String app,
                              String wantTimeout) {
        String schema = prefix + id;
        check(schema.equals(searchPath), id, where + ": search_path is " + searchPath + ", want " + schema);
        check(wantTimeout.equals(timeout), id, where + ": statement_timeout is " + timeout + ", want " + wantTimeout);
        check(("jdbc-" + id).equals(app), id, where + ": application_name is " + app + ", want jdbc-" + id);
    }

    static void runClient(int id) throws SQLException {
        String schema = prefix + id;
        String ownTimeout = (100 + id) + "s";
        String url = "jdbc:postgresql://" + host + ":" + port + "/" + db;
        Properties props = new Properties();
        props.setProperty("user", user);
        props.setProperty("password", password);
        props.setProperty("prepareThreshold", String.valueOf(PREPARE_THRESHOLD));
        props.setProperty("ApplicationName", "jdbc-" + id);
        props.setProperty("sslmode", "disable");
        props.setProperty("connectTimeout", "20");
        props.setProperty("socketTimeout", "120");
        try (Connection conn = DriverManager.getConnection(url, props)) {
            conn.setAutoCommit(true);
            try (Statement st = conn.createStatement()) {
                st.execute("SET search_path = " + schema);
                st.execute("SET statement_timeout = '" + ownTimeout + "'");
            }
            PreparedStatement ins = conn.prepareStatement(
                    "INSERT INTO items (client, seq, val) VALUES (?, ?, ?)");
            PreparedStatement sel = conn.prepareStatement(
                    "SELECT val, current_setting('search_path'), current_setting('statement_timeout'),"
                    + " current_setting('application_name') FROM items WHERE client = ? AND seq = ?");
            PreparedStatement upd = conn.prepareStatement(
                    "UPDATE items SET val = val || ? WHERE client = ? AND seq = ?");
            PreparedStatement show = conn.prepareStatement(
                    "SELECT current_setting('statement_timeout'), current_setting('search_path')");
            long sum = 0;
            for (int seq = 0; seq < iterations; seq++) {
                String val = "j" + id + "-" + seq;
                ins.setInt(1, id);
                ins.setInt(2, seq);
                ins.setString(3, val);
                check(ins.executeUpdate() == 1, id, "insert seq=" + seq);
                sum += seq;
                if (seq % 5 == 4) {
                    // A transaction: SET LOCAL holds inside it and disappears at COMMIT.
                    conn.setAutoCommit(false);
                    try (Statement st = conn.createStatement()) {
                        st.execute("SET LOCAL statement_timeout = '55s'");
                    }
                    upd.setString(1, "+u");
                    upd.setInt(2, id);
                    upd.setInt(3, seq);
                    check(upd.executeUpdate() == 1, id, "update seq=" + seq);
                    try (ResultSet rs = show.executeQuery()) {
                        check(rs.next(), id, "show in transaction");
                        check("55s".equals(rs.getString(1)), id,
                              "SET LOCAL inside transaction: statement_timeout is " + rs.getString(1));
                        check(schema.equals(rs.getString(2)), id,
                              "search_path inside transaction is " + rs.getString(2));
                    }
                    conn.commit();
                    conn.setAutoCommit(true);
                    val = val + "+u";
                }
                sel.setInt(1, id);
                sel.setInt(2, seq);
                try (ResultSet rs = sel.executeQuery()) {
                    check(rs.next(), id, "row seq=" + seq + " not found in " + schema);
                    check(val.equals(rs.getString(1)), id, "row seq=" + seq + " is " + rs.getString(1) + ", want " + val);
                    checkSettings(id, "select seq=" + seq, rs.getString(2), rs.getString(3), rs.getString(4), ownTimeout);
                    check(!rs.next(), id, "more than one row for seq=" + seq);
                }
            }
            // RESET outside a transaction: the default comes back and stays.
            try (Statement st = conn.createStatement()) {
                st.execute("RESET statement_timeout");
            }
            for (int k = 0; k < 5; k++) {
                try (ResultSet rs = show.executeQuery()) {
                    check(rs.next(), id, "show after reset");
                    check("0".equals(rs.getString(1)), id, "after RESET statement_timeout is " + rs.getString(1));
                    check(schema.equals(rs.getString(2)), id, "after RESET search_path is " + rs.getString(2));
                }
            }
            try (PreparedStatement cnt = conn.prepareStatement(
                    "SELECT count(*), coalesce(sum(seq), 0), count(*) FILTER (WHERE client <> ?) FROM items")) {
                cnt.setInt(1, id);
                try (ResultSet rs = cnt.executeQuery()) {
                    check(rs.next(), id, "count");
                    check(rs.getLong(1) == iterations, id, "rows in " + schema + ": " + rs.getLong(1));
                    check(rs.getLong(2) == sum, id, "sum(seq) in " + schema + ": " + rs.getLong(2));
                    check(rs.getLong(3) == 0, id, "rows of other clients in " + schema + ": " + rs.getLong(3));
                    reports.add("OK client=" + id + " rows=" + rs.getLong(1) + " sum=" + rs.getLong(2));
                }
            }
        }
    }
}
