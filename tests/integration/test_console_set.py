"""Console ``SET key = value``: PgBouncer's grammar, validation and error texts,
SHOW CONFIG reflecting the change at once, restart-only keys left unchanged (as
PgBouncer 1.18 does), and the change taking effect (a smaller pool under load).

Runs against PgBouncer too (``GEOBOUNCER_TEST_TARGET=pgbouncer``); what only
geobouncer does (a NOTICE for a restart-only key) is checked only there.
"""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest
from fixtures.bouncer import TARGET


@pytest.fixture
def b(pg, bouncer):
    return bouncer(
        databases={"app": pg.conninfo("app"), "postgres": pg.conninfo("postgres")},
        pgbouncer={"pool_mode": "transaction", "default_pool_size": 10, "stats_users": "md5_user",
                   "admin_users": "postgres", "server_reset_query": "DISCARD ALL"},
    )


def console(b, user: str = "postgres"):
    return b.connect("pgbouncer", user, autocommit=True)


def run(conn, sql: str) -> str:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.statusmessage


def config(b) -> dict[str, tuple[str, str]]:
    """key -> (value, changeable)"""
    return {r.key: (r.value, r.changeable) for r in b.admin("SHOW CONFIG")}


def refused(conn, sql: str) -> psycopg2.Error:
    with pytest.raises(psycopg2.Error) as err:
        run(conn, sql)
    return err.value


def test_set_changes_show_config_at_once(b):
    conn = console(b)
    try:
        assert run(conn, "SET default_pool_size = 2") == "SET default_pool_size=2"
        assert config(b)["default_pool_size"] == ("2", "yes")
        assert {r.name: r.pool_size for r in b.admin("SHOW DATABASES")}["app"] == 2
        # quoted values, '' inside a string, "=" or TO, any case for SET
        assert run(conn, "SET query_timeout = '1.5'") == "SET query_timeout=1.5"
        assert run(conn, "set server_reset_query to 'SELECT ''x'''") == "SET server_reset_query=SELECT 'x'"
        assert run(conn, "SET pool_mode = session;") == "SET pool_mode=session"
        cfg = config(b)
        assert cfg["query_timeout"][0] == "1.5"
        assert cfg["server_reset_query"][0] == "SELECT 'x'"
        assert cfg["pool_mode"][0] == "session"
    finally:
        conn.close()


@pytest.mark.parametrize("sql", ["SET default_pool_size = 'abc'", "SET nosuch = 1",
                                 "SET pool_mode = foo", "SET log_connections = maybe",
                                 "SET query_timeout = '1s'", "SET DEFAULT_POOL_SIZE = 3"])
def test_invalid_set_is_set_failed(b, sql):
    conn = console(b)
    try:
        err = refused(conn, sql)
        assert (err.pgcode, err.pgerror.strip()) == ("08P01", "ERROR:  SET failed")
        assert run(conn, "SHOW VERSION") == "SHOW"        # the connection stays usable
    finally:
        conn.close()
    assert config(b)["default_pool_size"][0] == "10"


@pytest.mark.parametrize("sql", ["SET default_pool_size = -1", "SET query_timeout = 1.5",
                                 "SET default_pool_size"])
def test_set_outside_the_grammar_is_invalid_command(b, sql):
    conn = console(b)
    try:
        err = refused(conn, sql)
        assert err.pgcode == "08P01"
        assert f"invalid command '{sql}', use SHOW HELP;" in err.pgerror
    finally:
        conn.close()


def test_restart_only_setting_is_left_unchanged(b):
    conn = console(b)
    try:
        tag = run(conn, "SET listen_port = 7000")
        assert tag == "SET listen_port=7000"               # PgBouncer answers, and ignores it
        if TARGET != "pgbouncer":
            assert any("needs a restart" in n for n in conn.notices), conn.notices
    finally:
        conn.close()
    assert config(b)["listen_port"] == (str(b.port), "no")
    assert b.admin("SHOW VERSION")                         # still listening where it was


def test_changeable_column(b):
    cfg = config(b)
    for key in ("listen_port", "listen_addr", "unix_socket_dir", "pidfile", "user", "pkt_buf",
                "so_reuseport", "listen_backlog"):
        assert cfg[key][1] == "no", key
    for key in ("default_pool_size", "pool_mode", "auth_type", "query_timeout", "admin_users",
                "max_client_conn", "logfile", "suspend_timeout"):
        assert cfg[key][1] == "yes", key


def test_stats_user_may_not_set(b):
    conn = console(b, "md5_user")
    try:
        err = refused(conn, "SET default_pool_size = 3")
        assert err.pgcode == "08P01" and "admin access needed" in err.pgerror
    finally:
        conn.close()
    assert config(b)["default_pool_size"][0] == "10"


def test_client_parameters_are_ignored_with_a_notice(b):
    conn = console(b)
    try:
        assert run(conn, "SET client_encoding = 'LATIN1'") == "SET"
        assert any("SET ignored" in n for n in conn.notices), conn.notices
    finally:
        conn.close()


def test_reload_rereads_the_file_after_set(b):
    conn = console(b)
    try:
        run(conn, "SET default_pool_size = 3")
        assert config(b)["default_pool_size"][0] == "3"
        run(conn, "RELOAD")
    finally:
        conn.close()
    assert config(b)["default_pool_size"][0] == "10"


def backends(pg) -> int:
    rows = pg.psql("SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' AND usename = 'app'")
    return int(rows[0][0])


def test_set_default_pool_size_limits_a_pool_under_load(pg, b):
    run_admin = console(b)
    try:
        assert run(run_admin, "SET default_pool_size = 2") == "SET default_pool_size=2"
    finally:
        run_admin.close()
    errors: list[BaseException] = []

    def client():
        try:
            conn = b.connect("app", "app", autocommit=True)
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_sleep(0.4)")
            finally:
                conn.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    most_servers = most_waiting = 0
    deadline = time.monotonic() + 20
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        most_servers = max(most_servers, backends(pg))
        pools = [r for r in b.admin("SHOW POOLS") if r.database == "app"]
        most_waiting = max([most_waiting] + [r.cl_waiting for r in pools])
        time.sleep(0.05)
    for t in threads:
        t.join(10)
    assert not errors, errors
    assert most_waiting >= 1, "no client ever waited: the pool was not limited"
    assert 1 <= most_servers <= 2, most_servers
