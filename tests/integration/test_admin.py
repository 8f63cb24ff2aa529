"""The admin console (database ``pgbouncer``): SHOW commands and process control.

Column names and order are PgBouncer 1.25's (src/admin.c, src/stats.c), so
monitoring tools that read them by name or by position keep working. Values
are checked against a situation the test sets up.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import struct
import threading

import asyncpg
import psycopg2
import psycopg2.extras
import pytest
from fixtures.bouncer import TARGET
from fixtures.ports import port_is_open, wait_until

# GEOBOUNCER_TEST_TARGET=pgbouncer runs PgBouncer 1.18: columns and commands added
# since (SHOW STATE, replication, the *_client_connections columns ...) run only
# against geobouncer; the rest checks the tests themselves against PgBouncer.
since_118 = pytest.mark.skipif(TARGET == "pgbouncer", reason="added after PgBouncer 1.18")
RENAMED_SINCE_118 = {"reserve_pool": "reserve_pool_size"}

SOCKET_COLUMNS = ["type", "user", "database", "replication", "state", "addr", "port", "local_addr",
                  "local_port", "connect_time", "request_time", "wait", "wait_us", "close_needed",
                  "ptr", "link", "remote_pid", "tls", "application_name", "prepared_statements", "id"]
COLUMNS = {
    "POOLS": ["database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req",
              "cl_waiting_cancel_req", "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle",
              "sv_used", "sv_tested", "sv_login", "maxwait", "maxwait_us", "pool_mode",
              "load_balance_hosts"],
    "CLIENTS": SOCKET_COLUMNS,
    "SERVERS": SOCKET_COLUMNS,
    "DATABASES": ["name", "host", "port", "database", "force_user", "pool_size", "min_pool_size",
                  "reserve_pool_size", "server_lifetime", "pool_mode", "load_balance_hosts",
                  "max_connections", "current_connections", "max_client_connections",
                  "current_client_connections", "paused", "disabled"],
    "STATS": ["database", "total_server_assignment_count", "total_xact_count", "total_query_count",
              "total_received", "total_sent", "total_xact_time", "total_query_time", "total_wait_time",
              "total_client_parse_count", "total_server_parse_count", "total_bind_count",
              "avg_server_assignment_count", "avg_xact_count", "avg_query_count", "avg_recv", "avg_sent",
              "avg_xact_time", "avg_query_time", "avg_wait_time", "avg_client_parse_count",
              "avg_server_parse_count", "avg_bind_count"],
    "USERS": ["name", "pool_size", "reserve_pool_size", "pool_mode", "max_user_connections",
              "current_connections", "max_user_client_connections", "current_client_connections"],
    "CONFIG": ["key", "value", "default", "changeable"],
    "LISTS": ["list", "items"],
    "VERSION": ["version"],
    "STATE": ["key", "value"],
}
LIST_NAMES = ["databases", "users", "peers", "pools", "peer_pools", "free_clients", "used_clients",
              "login_clients", "free_servers", "used_servers", "dns_names", "dns_zones", "dns_queries",
              "dns_pending"]


NEWER_SHOW = pytest.mark.geobouncer_only("SHOW columns of PgBouncer 1.25")

# --- helpers ----------------------------------------------------------------------

def admin_conn(b, user: str = "postgres"):
    return b.connect("pgbouncer", user, autocommit=True)


def show(b, what: str, user: str = "postgres") -> tuple[list[str], list[dict]]:
    conn = admin_conn(b, user)
    try:
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute(f"SHOW {what}")
            names = [d.name for d in cur.description]
            return names, [dict(r) for r in cur.fetchall()]
    finally:
        conn.close()


def rows(b, what: str, **match) -> list[dict]:
    return [r for r in show(b, what)[1] if all(r.get(k) == v for k, v in match.items())]


def one(b, what: str, **match) -> dict:
    found = rows(b, what, **match)
    assert len(found) == 1, (what, match, show(b, what)[1])
    return found[0]


def query(conn, sql: str):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone() if cur.description else None


class Background(threading.Thread):
    """Run ``fn`` in a thread; ``result`` or ``error`` once done."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn = fn
        self.result = None
        self.error = None
        self.start()

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def finish(self, timeout: float = 15.0):
        self.join(timeout)
        assert not self.is_alive(), "background call did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def still_blocked(thread: Background, grace: float = 0.5) -> bool:
    """True if the call has not returned after ``grace`` seconds (it should be waiting)."""
    thread.join(grace)
    return thread.is_alive()


@pytest.fixture
def admin_bouncer(pg, bouncer):
    return bouncer(
        databases={"app": pg.conninfo("app", pool_size=3), "postgres": pg.conninfo("postgres"),
                   "forced": pg.conninfo("app", user="trust_user")},
        users={"md5_user": {"pool_mode": "session"}},
        pgbouncer={"pool_mode": "transaction", "default_pool_size": 7, "stats_users": "md5_user",
                   "admin_users": "postgres"},
    )


# --- SHOW: columns -----------------------------------------------------------------------

@pytest.mark.parametrize("what", [w for w in COLUMNS if TARGET != "pgbouncer" or w != "STATE"])
def test_show_columns(admin_bouncer, what):
    names, _ = show(admin_bouncer, what)
    if TARGET == "pgbouncer":   # 1.18's columns are 1.25's, minus the newer ones
        names = [RENAMED_SINCE_118.get(n, n) for n in names]
        assert [n for n in COLUMNS[what] if n in names] == names
    else:
        assert names == COLUMNS[what]


def test_show_help_is_a_notice(admin_bouncer):
    conn = admin_conn(admin_bouncer)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW HELP")
            assert cur.description is None  # PgBouncer answers with a NOTICE, no result set
        notices = "".join(conn.notices)
        assert "Console usage" in notices
        for command in ("SHOW", "PAUSE", "RESUME", "RELOAD", "SHUTDOWN", "KILL"):
            assert command in notices
    finally:
        conn.close()


# --- SHOW: values -----------------------------------------------------------------------

@since_118
def test_show_clients_lists_the_client(admin_bouncer):
    b = admin_bouncer
    conn = b.connect("app", "app", application_name="gb-admin-test", autocommit=True)
    try:
        query(conn, "SELECT 1")
        client = one(b, "CLIENTS", application_name="gb-admin-test")
        assert client["type"] == "C"
        assert (client["user"], client["database"]) == ("app", "app")
        assert client["state"] in ("active", "idle")
        assert client["addr"] == "127.0.0.1"
        assert client["replication"] == "none"
        admin_rows = rows(b, "CLIENTS", database="pgbouncer")
        assert admin_rows and all(r["user"] == "postgres" for r in admin_rows)
        assert len({r["id"] for r in show(b, "CLIENTS")[1]}) == len(show(b, "CLIENTS")[1])
    finally:
        conn.close()
    wait_until(lambda: not rows(b, "CLIENTS", application_name="gb-admin-test"), timeout=10,
               message="client gone from SHOW CLIENTS")


@since_118
def test_show_clients_state_idle_and_active(admin_bouncer):
    # PgBouncer 1.25 prints "idle" for a logged-in client that is not linked to
    # a server, "active" for one that is (socket_row in src/admin.c).
    b = admin_bouncer
    conn = b.connect("app", "app", application_name="gb-state-test")
    try:
        query(conn, "SELECT 1")
        conn.commit()
        assert one(b, "CLIENTS", application_name="gb-state-test")["state"] == "idle"
        query(conn, "SELECT 1")  # psycopg2 opened a transaction: linked until COMMIT
        linked = one(b, "CLIENTS", application_name="gb-state-test")
        assert linked["state"] == "active"
        assert linked["link"]
        conn.commit()
    finally:
        conn.close()


def test_show_servers_after_a_query(admin_bouncer):
    b = admin_bouncer
    conn = b.connect("app", "app", application_name="gb-server-test")
    try:
        backend_pid = query(conn, "SELECT pg_backend_pid()")[0]  # transaction left open
        server = one(b, "SERVERS", remote_pid=backend_pid)
        assert server["type"] == "S"
        assert (server["user"], server["database"], server["state"]) == ("app", "app", "active")
        assert server["port"] == b.databases["app"]["port"]
        client = one(b, "CLIENTS", application_name="gb-server-test")
        assert server["link"] == client["ptr"]
        assert client["link"] == server["ptr"]
        conn.commit()
        wait_until(lambda: one(b, "SERVERS", remote_pid=backend_pid)["state"] == "idle", timeout=10,
                   message="server idle after COMMIT")
    finally:
        conn.close()


def test_show_pools_counts(admin_bouncer):
    b = admin_bouncer
    conn = b.connect("app", "app")
    try:
        query(conn, "SELECT 1")  # open transaction: one client linked to one server
        pool = one(b, "POOLS", database="app", user="app")
        assert (pool["cl_active"], pool["cl_waiting"], pool["sv_active"]) == (1, 0, 1)
        assert pool["pool_mode"] == "transaction"
        conn.commit()
        wait_until(lambda: one(b, "POOLS", database="app", user="app")["sv_idle"] == 1, timeout=10,
                   message="server back in the pool")
        pool = one(b, "POOLS", database="app", user="app")
        assert (pool["sv_active"], pool["cl_active"]) == (0, 1)
    finally:
        conn.close()
    wait_until(lambda: one(b, "POOLS", database="app", user="app")["cl_active"] == 0, timeout=10,
               message="client gone from SHOW POOLS")
    # [users] md5_user pool_mode=session overrides the global transaction mode.
    conn = b.connect("app", "md5_user", autocommit=True)
    try:
        query(conn, "SELECT 1")
        assert one(b, "POOLS", database="app", user="md5_user")["pool_mode"] == "session"
    finally:
        conn.close()


def stat_totals(b, dbname: str) -> dict:
    found = rows(b, "STATS", database=dbname)
    return found[0] if found else {}


def test_show_stats_counts_transactions(admin_bouncer):
    b = admin_bouncer
    conn = b.connect("app", "app")
    try:
        query(conn, "SELECT 1")
        conn.commit()
        wait_until(lambda: stat_totals(b, "app").get("total_xact_count", 0) >= 1, timeout=10,
                   message="first transaction counted")
        before = stat_totals(b, "app")
        n = 5
        for i in range(n):
            assert query(conn, f"SELECT {i}") == (i,)  # BEGIN; SELECT; COMMIT
            conn.commit()
        wait_until(lambda: stat_totals(b, "app")["total_xact_count"] >= before["total_xact_count"] + n,
                   timeout=10, message="transactions counted")
        after = stat_totals(b, "app")
        assert after["total_xact_count"] - before["total_xact_count"] == n
        assert after["total_query_count"] - before["total_query_count"] == 3 * n
    finally:
        conn.close()


@since_118
def test_show_stats_traffic_and_server_assignments(admin_bouncer):
    b = admin_bouncer
    # md5_user is session-pooled ([users]): one client, one server assignment,
    # however many transactions it runs. Database "postgres" sees no one else.
    conn = b.connect("postgres", "md5_user")
    try:
        n = 3
        for i in range(n):
            assert query(conn, f"SELECT repeat('x', 1000), {i}")[1] == i
            conn.commit()
        wait_until(lambda: stat_totals(b, "postgres").get("total_xact_count", 0) >= n, timeout=10,
                   message="transactions counted")
        stats = stat_totals(b, "postgres")
        assert stats["total_received"] > 0, stats  # bytes from clients
        assert stats["total_sent"] > 3000, stats   # three 1000-byte rows went back
        assert stats["total_query_time"] > 0, stats
        assert stats["total_xact_time"] > 0, stats
        if TARGET != "pgbouncer":  # a column PgBouncer 1.18 lacks
            assert stats["total_server_assignment_count"] == 1, stats
    finally:
        conn.close()


def test_show_config_values(admin_bouncer):
    b = admin_bouncer
    config = {r["key"]: r for r in show(b, "CONFIG")[1]}
    assert config["listen_port"]["value"] == str(b.port)
    assert config["listen_port"]["changeable"] == "no"
    assert config["default_pool_size"]["value"] == "7"
    assert config["default_pool_size"]["default"] == "20"
    assert config["default_pool_size"]["changeable"] == "yes"
    assert config["pool_mode"]["value"] == "transaction"
    assert config["stats_users"]["value"] == "md5_user"


@since_118
def test_show_databases_values(pg, admin_bouncer):
    b = admin_bouncer
    dbs = {r["name"]: r for r in show(b, "DATABASES")[1]}
    assert {"app", "postgres", "forced", "pgbouncer"} <= set(dbs)
    app = dbs["app"]
    assert (app["host"], app["port"], app["database"]) == ("127.0.0.1", pg.port, "app")
    assert app["pool_size"] == 3
    assert app["force_user"] is None
    assert (app["paused"], app["disabled"]) == (0, 0)
    assert dbs["postgres"]["pool_size"] == 7
    assert dbs["postgres"]["database"] == "postgres"
    assert dbs["forced"]["force_user"] == "trust_user"
    assert dbs["forced"]["database"] == "app"
    conn = b.connect("app", "app")
    try:
        query(conn, "SELECT 1")
        app = one(b, "DATABASES", name="app")
        assert app["current_connections"] == 1
        if TARGET != "pgbouncer":  # a column PgBouncer 1.18 lacks
            assert app["current_client_connections"] == 1
        conn.commit()
    finally:
        conn.close()


@since_118
def test_show_users_values(admin_bouncer):
    b = admin_bouncer
    conn = b.connect("app", "md5_user", autocommit=True)
    try:
        query(conn, "SELECT 1")
        user = one(b, "USERS", name="md5_user")
        assert user["pool_mode"] == "session"
        assert user["current_client_connections"] == 1
        assert user["current_connections"] == 1
    finally:
        conn.close()


@since_118
def test_show_lists_values(admin_bouncer):
    b = admin_bouncer
    conn = b.connect("app", "app", autocommit=True)
    try:
        query(conn, "SELECT 1")
        names, found = show(b, "LISTS")
        lists = {r["list"]: r["items"] for r in found}
        # PgBouncer 1.18 has no peers (1.19+)
        assert [r["list"] for r in found] == [n for n in LIST_NAMES if TARGET != "pgbouncer" or "peer" not in n]
        # PgBouncer counts the admin database and its pool like any other.
        assert lists["databases"] == len(show(b, "DATABASES")[1])
        assert lists["pools"] == len(show(b, "POOLS")[1])
        assert lists["used_clients"] >= 2  # this client and the admin console
        assert lists["used_servers"] >= 1
    finally:
        conn.close()


@since_118
def test_show_version_and_state(admin_bouncer):
    b = admin_bouncer
    (version,) = show(b, "VERSION")[1]
    assert re.search(r"\d+\.\d+", version["version"])
    if TARGET != "pgbouncer":  # no SHOW STATE in PgBouncer 1.18
        state = {r["key"]: r["value"] for r in show(b, "STATE")[1]}
        assert state == {"active": "yes", "paused": "no", "suspended": "no"}


# --- process control -------------------------------------------------------------------

def cl_waiting_seen(b, dbname: str, user: str, want: int, tries: int = 50) -> int:
    """Poll SHOW POOLS (bounded) until cl_waiting == want; return the last value."""
    value = -1
    for _ in range(tries):
        value = one(b, "POOLS", database=dbname, user=user)["cl_waiting"]
        if value == want:
            break
        threading.Event().wait(0.1)
    return value


def release_everything(b, threads, conns) -> None:
    """Cleanup that cannot hang: RESUME, let the threads end, then close."""
    try:
        b.admin("RESUME")
    except psycopg2.Error:
        pass
    for thread in threads:
        thread.join(10)
    if any(t.is_alive() for t in threads):
        b.kill()  # a stuck pooler: free the blocked client calls
        for thread in threads:
            thread.join(10)
    for conn in conns:
        conn.close()


def test_pause_waits_for_transactions_and_resume_releases_queries(admin_bouncer):
    b = admin_bouncer
    busy = b.connect("app", "app")
    idle = b.connect("app", "app", autocommit=True)
    admin = admin_conn(b)
    threads = []
    try:
        query(idle, "SELECT 1")
        assert query(busy, "SELECT 1") == (1,)  # transaction open on a server
        pause = Background(lambda: query(admin, "PAUSE"))
        threads.append(pause)
        assert still_blocked(pause), "PAUSE returned while a transaction was still open"
        busy.commit()
        pause.finish()
        if TARGET != "pgbouncer":
            assert {r["key"]: r["value"] for r in show(b, "STATE")[1]}["paused"] == "yes"
        waiting = Background(lambda: query(idle, "SELECT 42"))
        threads.append(waiting)
        assert still_blocked(waiting), "a query ran while the pooler was paused"
        cl_waiting = cl_waiting_seen(b, "app", "app", 1)
        query(admin, "RESUME")
        assert waiting.finish() == (42,)
        if TARGET != "pgbouncer":
            assert {r["key"]: r["value"] for r in show(b, "STATE")[1]}["paused"] == "no"
        # A client held by PAUSE is a waiting client (PgBouncer's cl_waiting).
        assert cl_waiting == 1
    finally:
        release_everything(b, threads, (busy, idle, admin))


def test_pause_and_resume_one_database(admin_bouncer):
    b = admin_bouncer
    app = b.connect("app", "app", autocommit=True)
    other = b.connect("postgres", "app", autocommit=True)
    admin = admin_conn(b)
    threads = []
    try:
        query(app, "SELECT 1")
        query(admin, "PAUSE app")
        assert one(b, "DATABASES", name="app")["paused"] == 1
        assert one(b, "DATABASES", name="postgres")["paused"] == 0
        waiting = Background(lambda: query(app, "SELECT current_database()"))
        threads.append(waiting)
        assert query(other, "SELECT current_database()") == ("postgres",)  # not paused
        assert still_blocked(waiting), "a query ran on a paused database"
        cl_waiting = cl_waiting_seen(b, "app", "app", 1)
        query(admin, "RESUME app")
        assert waiting.finish() == ("app",)
        assert one(b, "DATABASES", name="app")["paused"] == 0
        assert cl_waiting == 1
    finally:
        release_everything(b, threads, (app, other, admin))


def test_kill_database_disconnects_its_clients(admin_bouncer):
    b = admin_bouncer
    victim = b.connect("app", "app", autocommit=True)
    bystander = b.connect("postgres", "app", autocommit=True)
    try:
        query(victim, "SELECT 1")
        query(bystander, "SELECT 1")
        b.admin("KILL app")
        with pytest.raises((psycopg2.OperationalError, psycopg2.InterfaceError)):
            query(victim, "SELECT 1")
        assert query(bystander, "SELECT 2") == (2,)
        assert all(r["sv_active"] == 0 and r["cl_active"] == 0 for r in rows(b, "POOLS", database="app"))
        # A killed database is paused until RESUME.
        assert one(b, "DATABASES", name="app")["paused"] == 1
        b.admin("RESUME app")
        again = b.connect("app", "app", autocommit=True)
        try:
            assert query(again, "SELECT 3") == (3,)
        finally:
            again.close()
    finally:
        victim.close()
        bystander.close()


def test_disable_and_enable_database(admin_bouncer):
    b = admin_bouncer
    existing = b.connect("app", "app", autocommit=True)
    try:
        query(existing, "SELECT 1")
        b.admin("DISABLE app")
        assert one(b, "DATABASES", name="app")["disabled"] == 1
        with pytest.raises(psycopg2.OperationalError) as err:
            b.connect("app", "app")
        assert 'database "app" is disabled' in str(err.value)  # PgBouncer's text
        assert query(existing, "SELECT 2") == (2,)  # clients already in keep working
        other = b.connect("postgres", "app")
        other.close()
        b.admin("ENABLE app")
        assert one(b, "DATABASES", name="app")["disabled"] == 0
        fresh = b.connect("app", "app", autocommit=True)
        try:
            assert query(fresh, "SELECT 3") == (3,)
        finally:
            fresh.close()
    finally:
        existing.close()


def test_reconnect_replaces_server_connections(pg, admin_bouncer):
    b = admin_bouncer
    conn = b.connect("app", "app", autocommit=True)
    try:
        old_pid = query(conn, "SELECT pg_backend_pid()")[0]
        assert query(conn, "SELECT pg_backend_pid()")[0] == old_pid  # pooled: same server
        b.admin("RECONNECT app")
        new_pid = query(conn, "SELECT pg_backend_pid()")[0]
        assert new_pid != old_pid
        wait_until(lambda: not pg.psql("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (old_pid,)),
                   timeout=10, message="old server connection closed")
    finally:
        conn.close()


def test_reload_command(admin_bouncer):
    b = admin_bouncer
    b.rewrite(pgbouncer={**b._overrides, "default_pool_size": 11}, reload=False)
    conn = admin_conn(b)
    try:
        with conn.cursor() as cur:
            cur.execute("RELOAD")
            assert cur.statusmessage == "RELOAD"
    finally:
        conn.close()
    config = {r["key"]: r["value"] for r in show(b, "CONFIG")[1]}
    assert config["default_pool_size"] == "11"
    assert one(b, "DATABASES", name="postgres")["pool_size"] == 11


def test_shutdown_stops_the_process(admin_bouncer):
    b = admin_bouncer
    conn = admin_conn(b)
    try:
        with conn.cursor() as cur:
            try:
                cur.execute("SHUTDOWN")
            except psycopg2.OperationalError:
                pass  # PgBouncer does not answer SHUTDOWN: it just exits
    finally:
        conn.close()
    assert b.wait_exit(timeout=15) is not None
    assert not port_is_open(b.host, b.port)


# --- access control and protocol --------------------------------------------------------

def test_stats_user_can_show_but_not_control(admin_bouncer):
    b = admin_bouncer
    names, found = show(b, "POOLS", user="md5_user")
    assert names == COLUMNS["POOLS"] or TARGET == "pgbouncer" and names == COLUMNS["POOLS"][:-1]
    conn = admin_conn(b, "md5_user")
    try:
        for command in ("PAUSE", "RELOAD", "DISABLE app", "KILL app", "SHUTDOWN"):
            with pytest.raises(psycopg2.Error) as err:
                query(conn, command)
            assert "admin access needed" in str(err.value), command
    finally:
        conn.close()
    if TARGET != "pgbouncer":
        assert {r["key"]: r["value"] for r in show(b, "STATE")[1]}["paused"] == "no"
    assert b.is_running()


def test_user_in_neither_list_is_refused(admin_bouncer):
    b = admin_bouncer
    with pytest.raises(psycopg2.OperationalError) as err:
        admin_conn(b, "scram_user")
    assert "not allowed" in str(err.value)


def test_unknown_command_is_an_error_not_a_disconnect(admin_bouncer):
    b = admin_bouncer
    conn = admin_conn(b)
    try:
        with pytest.raises(psycopg2.Error):
            query(conn, "SHOW NOTHING_LIKE_THIS")
        assert show(b, "VERSION")[1]
        with conn.cursor() as cur:  # same connection still usable
            cur.execute("SHOW VERSION")
            assert cur.fetchall()
    finally:
        conn.close()


def read_message(sock, buf: bytearray):
    while True:
        if len(buf) >= 5:
            length = struct.unpack_from("!I", buf, 1)[0]
            if len(buf) >= 1 + length:
                message = bytes(buf[:1]), bytes(buf[5:1 + length])
                del buf[:1 + length]
                return message
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk


def raw_admin_login(b, user: str = "postgres", password: str = "postgres_pw"):
    """A hand-made client logged in to the console (md5 or cleartext)."""
    sock = socket.create_connection((b.host, b.port), timeout=10)
    body = struct.pack("!I", 196608) + b"user\0" + user.encode() + b"\0database\0pgbouncer\0\0"
    sock.sendall(struct.pack("!I", len(body) + 4) + body)
    buf = bytearray()
    while True:
        message = read_message(sock, buf)
        assert message is not None, "console closed the connection during login"
        mtype, payload = message
        if mtype == b"R":
            code = struct.unpack_from("!I", payload)[0]
            if code == 5:
                inner = hashlib.md5((password + user).encode()).hexdigest()
                answer = "md5" + hashlib.md5(inner.encode() + payload[4:8]).hexdigest()
            elif code == 3:
                answer = password
            else:
                assert code == 0, f"unexpected auth request {code}"
                continue
            data = answer.encode() + b"\0"
            sock.sendall(b"p" + struct.pack("!I", len(data) + 4) + data)
        elif mtype == b"E":
            raise AssertionError(f"console refused the login: {payload!r}")
        elif mtype == b"Z":
            return sock, buf


def test_extended_protocol_gets_a_clean_error(admin_bouncer):
    b = admin_bouncer
    sock, buf = raw_admin_login(b)
    with sock:
        query_text = b"SHOW POOLS\0"
        parse = b"P" + struct.pack("!I", 4 + 1 + len(query_text) + 2) + b"\0" + query_text + b"\0\0"
        sync = b"S" + struct.pack("!I", 4)
        sock.sendall(parse + sync)
        errors = []
        for _ in range(20):  # bounded: an error, then RFQ or the close
            message = read_message(sock, buf)
            if message is None or message[0] == b"Z":
                break
            if message[0] == b"E":
                fields = {chr(f[0]): f[1:].decode() for f in message[1].split(b"\0") if f}
                errors.append(fields)
        assert errors, "no ErrorResponse for an extended-protocol message"
        assert errors[0]["C"] == "08P01"
        assert "protocol" in errors[0]["M"]

    # A real extended-protocol driver gets an exception, not a hang.
    async def extended():
        conn = await asyncpg.connect(host=b.host, port=b.port, user="postgres", password="postgres_pw",
                                     database="pgbouncer", ssl=False, timeout=10)
        try:
            return await asyncio.wait_for(conn.fetch("SHOW POOLS"), 10)
        finally:
            conn.terminate()

    with pytest.raises((asyncpg.PostgresError, asyncpg.exceptions.InterfaceError, ConnectionError)):
        asyncio.run(extended())
    assert b.is_running()
    assert show(b, "VERSION")[1]
