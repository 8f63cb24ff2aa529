"""The SHOW commands tools read beside POOLS and STATS: STATS_TOTALS,
STATS_AVERAGES, TOTALS, MEM, FDS, SOCKETS, ACTIVE_SOCKETS, DNS_HOSTS, DNS_ZONES,
PEERS, PEER_POOLS, with PgBouncer 1.25's columns, and values checked against a
situation the test sets up (sv_used in SHOW POOLS among them).

Against PgBouncer 1.18 (``GEOBOUNCER_TEST_TARGET=pgbouncer``) the column check
is that 1.18's columns are among 1.25's (1.18 lacks the newer ones, and SHOW
PEERS / PEER_POOLS, which then run only against geobouncer).
"""

from __future__ import annotations

import os
import time

import psycopg2
import psycopg2.extras
import pytest
from fixtures.bouncer import TARGET
from fixtures.ports import wait_until

SOCKET = ["type", "user", "database", "replication", "state", "addr", "port", "local_addr", "local_port",
          "connect_time", "request_time", "wait", "wait_us", "close_needed", "ptr", "link", "remote_pid",
          "tls", "application_name", "prepared_statements", "id"]
DEBUG = ["recv_pos", "pkt_pos", "pkt_remain", "send_pos", "send_remain", "pkt_avail", "send_avail"]
STAT = ["server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent",
        "xact_time", "query_time", "wait_time"]
COLUMNS = {
    "STATS_TOTALS": ["database", *STAT, "client_parse_count", "server_parse_count", "bind_count"],
    "STATS_AVERAGES": ["database", *STAT, "avg_client_parse_count", "avg_server_parse_count",
                       "avg_bind_count"],
    "TOTALS": ["name", "value"],
    "MEM": ["name", "size", "used", "free", "memtotal"],
    "FDS": ["fd", "task", "user", "database", "addr", "port", "cancel", "link", "client_encoding",
            "std_strings", "datestyle", "timezone", "password", "scram_client_key", "scram_server_key"],
    "SOCKETS": SOCKET + DEBUG,
    "ACTIVE_SOCKETS": SOCKET + DEBUG,
    "DNS_HOSTS": ["hostname", "ttl", "addrs"],
    "DNS_ZONES": ["zonename", "serial", "count"],
    "PEERS": ["peer_id", "host", "port", "pool_size"],
    "PEER_POOLS": ["peer_id", "cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active_cancel",
                   "sv_login"],
}
NOT_IN_118 = {"PEERS", "PEER_POOLS"}
TOTALS_NAMES = [f"{kind}_{name}" for kind in ("total", "avg")
                for name in ("server_assignment_count", "xact_count", "query_count", "client_bytes",
                             "server_bytes", "xact_time", "query_time", "wait_time",
                             "ps_client_parse_count", "ps_server_parse_count", "ps_bind_count")]


@pytest.fixture
def b(pg, bouncer):
    return bouncer(
        databases={"app": pg.conninfo("app"), "postgres": pg.conninfo("postgres")},
        pgbouncer={"pool_mode": "transaction", "stats_period": 1, "admin_users": "postgres"},
    )


def show(b, what: str) -> tuple[list[str], list[dict]]:
    conn = b.connect("pgbouncer", "postgres", autocommit=True)
    try:
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute(f"SHOW {what}")
            return [d.name for d in cur.description], [dict(r) for r in cur.fetchall()]
    finally:
        conn.close()


def queries(b, n: int) -> None:
    conn = b.connect("app", "app", autocommit=True)
    try:
        with conn.cursor() as cur:
            for i in range(n):
                cur.execute("SELECT %s", (i,))
                assert cur.fetchone() == (i,)
    finally:
        conn.close()


@pytest.mark.parametrize("what", [w for w in COLUMNS if TARGET != "pgbouncer" or w not in NOT_IN_118])
def test_columns(b, what):
    names, _ = show(b, what)
    if TARGET == "pgbouncer":
        assert set(names) <= set(COLUMNS[what]), set(names) - set(COLUMNS[what])
    else:
        assert names == COLUMNS[what]


def test_stats_totals_count_the_work(b):
    queries(b, 5)
    row = next(r for r in show(b, "STATS_TOTALS")[1] if r["database"] == "app")
    assert row["xact_count"] >= 5 and row["query_count"] >= 5
    assert row["bytes_received"] > 0 and row["bytes_sent"] > 0 and row["query_time"] > 0


def test_totals_add_up_across_databases(b):
    queries(b, 4)
    totals = {r["name"]: int(r["value"]) for r in show(b, "TOTALS")[1]}
    if TARGET == "pgbouncer":
        assert set(totals) <= set(TOTALS_NAMES) | {"total_client_bytes"}
    else:
        assert list(totals) == TOTALS_NAMES
    assert totals["total_xact_count"] >= 4 and totals["total_client_bytes"] > 0


def test_stats_averages_follow_stats_period(b):
    conn = b.connect("app", "app", autocommit=True)
    try:
        def busy_average():
            with conn.cursor() as cur:
                for _ in range(20):
                    cur.execute("SELECT 1")
            rows = [r for r in show(b, "STATS_AVERAGES")[1] if r["database"] == "app"]
            return rows and rows[0]["xact_count"] > 0 and rows[0]["bytes_received"] > 0
        wait_until(busy_average, timeout=10, message="a non-zero average within a few stats_periods")
    finally:
        conn.close()


def test_mem_counts_live_connections(b):
    conns = [b.connect("app", "app", autocommit=True) for _ in range(3)]
    try:
        for conn in conns:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
        mem = {r["name"]: r for r in show(b, "MEM")[1]}
        assert {"client_cache", "server_cache", "pool_cache", "db_cache"} <= set(mem)
        assert mem["client_cache"]["used"] >= 3              # and the console itself
        assert mem["server_cache"]["used"] >= 1
        assert all(r["memtotal"] == r["size"] * (r["used"] + r["free"]) for r in mem.values())
    finally:
        for conn in conns:
            conn.close()


def test_fds_lists_listeners_clients_and_servers(pg, b):
    conn = b.connect("app", "app", autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        rows = show(b, "FDS")[1]
        tasks = {r["task"] for r in rows}
        assert tasks == {"pooler", "client", "server"}, rows
        pooler = [r for r in rows if r["task"] == "pooler"]
        assert str(b.port) in {str(r["port"]) for r in pooler}
        client = next(r for r in rows if r["task"] == "client")
        assert (client["user"], client["database"]) == ("app", "app") and int(client["cancel"]) != 0
        server = next(r for r in rows if r["task"] == "server")
        assert int(server["port"]) == pg.port and server["database"] == "app"
        assert all(int(r["fd"]) > 2 for r in rows)
    finally:
        conn.close()


def test_fds_needs_admin(pg, bouncer):
    b = bouncer(pgbouncer={"stats_users": "md5_user", "admin_users": "postgres"})
    conn = b.connect("pgbouncer", "md5_user", autocommit=True)
    try:
        with pytest.raises(psycopg2.Error) as err, conn.cursor() as cur:
            cur.execute("SHOW FDS")
        assert "admin access needed" in str(err.value)
    finally:
        conn.close()


def test_sockets_show_clients_and_servers_with_list_states(b):
    conn = b.connect("app", "app", autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        rows = show(b, "SOCKETS")[1]
        app_rows = [r for r in rows if r["database"] == "app"]
        assert {(r["type"], r["state"]) for r in app_rows} >= {("C", "cl_active"), ("S", "sv_idle")}, rows
        assert all(r["recv_pos"] is not None and r["pkt_avail"] is not None for r in rows)
        # nothing is buffered between queries: no active socket of the app pool
        assert not [r for r in show(b, "ACTIVE_SOCKETS")[1] if r["database"] == "app"
                    and r["type"] == "S"]
    finally:
        conn.close()


def test_show_pools_counts_sv_used(pg, bouncer):
    b = bouncer(pgbouncer={"pool_mode": "transaction", "server_check_delay": 1,
                           "admin_users": "postgres"})
    queries(b, 1)

    def pool():
        return next(r for r in show(b, "POOLS")[1] if r["database"] == "app")

    assert (pool()["sv_idle"], pool()["sv_used"]) == (1, 0)
    time.sleep(1.5)                                        # past server_check_delay
    wait_until(lambda: (pool()["sv_idle"], pool()["sv_used"]) == (0, 1), timeout=10,
               message="an idle server past server_check_delay counted as sv_used")
    assert next(r for r in show(b, "SERVERS")[1] if r["database"] == "app")["state"] == "used"
    queries(b, 1)                                          # checked, used, idle again
    assert (pool()["sv_idle"], pool()["sv_used"]) == (1, 0)


def test_show_clients_remote_pid_over_unix_socket(b):
    conn = psycopg2.connect(host=str(b.workdir), port=b.port, dbname="app", user="app",
                            password=b.userlist["app"])
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        rows = [r for r in show(b, "CLIENTS")[1] if r["database"] == "app"]
        assert [r["remote_pid"] for r in rows] == [os.getpid()], rows
        assert rows[0]["addr"] == "unix"
    finally:
        conn.close()


@pytest.mark.skipif(TARGET == "pgbouncer", reason="PgBouncer 1.18 has no SHOW PEERS")
def test_peers_and_peer_pools_list_the_peers(pg, bouncer):
    b = bouncer(pgbouncer={"peer_id": 1, "admin_users": "postgres", "default_pool_size": 9},
                extra_ini="[peers]\n1 = host=127.0.0.1 port=7001\n2 = host=/tmp port=7002 pool_size=3\n")
    peers = show(b, "PEERS")[1]
    assert [(r["peer_id"], r["host"], r["port"], r["pool_size"]) for r in peers] == [
        (1, "127.0.0.1", 7001, 9), (2, "/tmp", 7002, 3)]
    assert [r["peer_id"] for r in show(b, "PEER_POOLS")[1]] == [1, 2]
    lists = {r["list"]: r["items"] for r in show(b, "LISTS")[1]}
    assert lists["peers"] == 2 and lists["peer_pools"] == 2


def test_show_users_lists_auth_file_users_and_pgbouncer(b):
    names = {r["name"] for r in show(b, "USERS")[1]}
    assert set(b.userlist) | {"pgbouncer"} <= names, names
    lists = {r["list"]: r["items"] for r in show(b, "LISTS")[1]}
    assert lists["users"] == len(show(b, "USERS")[1])


def test_show_clients_application_name_of_a_console_client(b):
    conn = psycopg2.connect(b.dsn("pgbouncer", "postgres", application_name="ops-script"))
    conn.autocommit = True
    try:
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute("SHOW CLIENTS")
            mine = [r for r in cur.fetchall() if r["database"] == "pgbouncer"]
        assert "ops-script" in {r["application_name"] for r in mine}, mine
    finally:
        conn.close()
