"""Multi-host entries (PgBouncer's comma host list and load_balance_hosts),
client connections over the unix socket, and the logging switches
(log_connections, log_disconnections, log_pooler_errors, stats_period)."""

from __future__ import annotations

import psycopg2
import pytest
from fixtures.pooler import TARGET
from fixtures.ports import wait_until


def server_port(conn) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT inet_server_port()")
        return cur.fetchone()[0]


@pytest.mark.geobouncer_only("a port per host in a host list (PgBouncer: one port for all hosts)")
def test_comma_host_list_round_robin_spreads_new_connections(pg, make_pg, bouncer):
    other = make_pg()
    entry = dict(host="127.0.0.1,127.0.0.1", port=f"{pg.port},{other.port}", dbname="app",
                 load_balance_hosts="round-robin")
    b = bouncer(databases={"app": entry}, pgbouncer=dict(pool_mode="session", auth_type="md5"))
    conns = [b.connect() for _ in range(4)]
    try:
        ports = [server_port(c) for c in conns]
    finally:
        for c in conns:
            c.close()
    assert set(ports) == {pg.port, other.port}, ports


@pytest.mark.geobouncer_only("a port per host in a host list, load_balance_hosts = disable (PgBouncer 1.24+)")
def test_comma_host_list_disable_uses_first_host_then_falls_back(pg, make_pg, bouncer):
    first, second = make_pg(), make_pg()
    entry = dict(host="127.0.0.1,127.0.0.1", port=f"{first.port},{second.port}", dbname="app",
                 load_balance_hosts="disable")
    b = bouncer(databases={"app": entry},
                pgbouncer=dict(pool_mode="session", auth_type="md5", server_login_retry=0))
    conns = [b.connect() for _ in range(3)]
    try:
        assert {server_port(c) for c in conns} == {first.port}
    finally:
        for c in conns:
            c.close()
    first.stop("immediate")
    conn = b.connect()
    try:
        assert server_port(conn) == second.port   # the first host is down: the next one serves
    finally:
        conn.close()


def test_clients_connect_over_the_unix_socket(pg, bouncer):
    b = bouncer(pgbouncer=dict(auth_type="md5"))
    conn = psycopg2.connect(host=str(b.workdir), port=b.port, dbname="app", user="app",
                            password="app_pw")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_user, 1 + 1")
            assert cur.fetchone() == ("app", 2)
        clients = [r for r in b.admin("SHOW CLIENTS") if r.database == "app"]
        assert clients and clients[0].addr == "unix"
    finally:
        conn.close()


def _one_session(b) -> None:
    conn = b.connect()
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
    conn.close()


def test_log_connections_and_disconnections_on(pg, bouncer):
    b = bouncer(pgbouncer=dict(auth_type="md5", log_connections=1, log_disconnections=1))
    _one_session(b)
    wait_until(lambda: "closing because: client close request" in b.log_text(), timeout=10,
               message="disconnection logged")
    text = b.log_text()
    assert "app/app@127.0.0.1" in text and "login attempt: db=app user=app" in text
    assert "new connection to server" in text


def test_log_connections_and_disconnections_off(pg, bouncer):
    b = bouncer(pgbouncer=dict(auth_type="md5", log_connections=0, log_disconnections=0))
    _one_session(b)
    _one_session(b)
    text = b.log_text()
    assert "login attempt" not in text
    assert "closing because: client close request" not in text


def test_log_pooler_errors_switch(pg, bouncer):
    loud = bouncer(pgbouncer=dict(auth_type="md5", log_pooler_errors=1))
    quiet = bouncer(pgbouncer=dict(auth_type="md5", log_pooler_errors=0))
    for b in (loud, quiet):
        try:
            psycopg2.connect(b.dsn(dbname="no_such_db")).close()
        except psycopg2.OperationalError:
            pass
    # Only the "pooler error" line is log_pooler_errors': PgBouncer's log_disconnections
    # line ("closing because: no such database: ...") names the error too.
    assert "pooler error: no such database: no_such_db" in loud.log_text()
    assert "pooler error:" not in quiet.log_text()


def test_stats_period_writes_stats_lines(pg, bouncer):
    b = bouncer(pgbouncer=dict(auth_type="md5", stats_period=1, pool_mode="transaction"))
    # PgBouncer logs one line for all databases ("LOG stats: ..."), geobouncer one per database.
    stats_tag = "LOG stats:" if TARGET == "pgbouncer" else "[app] stats:"
    conn = b.connect(autocommit=True)
    try:
        for _ in range(20):
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
        wait_until(lambda: stats_tag in b.log_text(), timeout=10, message="a stats line")
    finally:
        conn.close()
    line = next(l for l in b.log_text().splitlines() if stats_tag in l)
    for part in ("xacts/s", "queries/s", "in ", "out ", "xact ", "query ", "wait "):
        assert part in line, line
