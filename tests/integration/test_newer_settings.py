"""Settings of PgBouncer releases after 1.18 (so these tests are geobouncer's
alone): transaction_timeout, pool_idle_timeout, login_notify_message, query_wait_notify,
scram_iterations."""

from __future__ import annotations

import time

import psycopg2
import pytest
from _util_pool import RawClient, query_one
from fixtures.ports import wait_until

pytestmark = pytest.mark.geobouncer_only("settings newer than PgBouncer 1.18")


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_transaction_timeout_ends_a_long_transaction_only(pg, bouncer, pool_mode):
    b = bouncer(pgbouncer={"pool_mode": pool_mode, "auth_type": "md5", "transaction_timeout": 2})
    auto = b.connect(autocommit=True)
    conn = b.connect()
    try:
        pid = query_one(conn, "SELECT pg_backend_pid()")[0]        # BEGIN ... : in a transaction now
        assert query_one(auto, "SELECT pg_sleep(2.5), 1")[1] == 1   # a long statement outside: untouched
        time.sleep(1)
        with pytest.raises(psycopg2.OperationalError):
            query_one(conn, "SELECT 1")
        assert "closing because: transaction timeout" in b.log_text()
        assert b.log_text().count("closing because: transaction timeout") == 2    # client and server
        probe = pg.connect()
        try:
            wait_until(lambda: query_one(probe, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                         (pid,))[0] == 0, timeout=10, message="its server closed")
        finally:
            probe.close()
        assert query_one(auto, "SELECT 2") == (2,)
    finally:
        conn.close()
        auto.close()


def test_pool_idle_timeout_frees_an_unused_pool(pg, bouncer):
    b = bouncer(pgbouncer={"pool_mode": "session", "auth_type": "md5", "pool_idle_timeout": 1,
                           "server_idle_timeout": 1})
    conn = b.connect()
    assert query_one(conn, "SELECT 1") == (1,)
    pools = lambda: {row.database for row in b.admin("SHOW POOLS")} - {"pgbouncer"}   # noqa: E731
    time.sleep(2.5)
    assert pools() == {"app"}           # its client is still there
    conn.close()
    wait_until(lambda: pools() == set(), timeout=15, message="pool freed once its server is gone")
    conn = b.connect()
    assert query_one(conn, "SELECT 3") == (3,)
    conn.close()


def test_login_notify_message(pg, bouncer):
    b = bouncer(pgbouncer={"auth_type": "md5", "login_notify_message": "you are talking to a pooler"})
    raw = RawClient(b.host, b.port)
    try:
        replies = raw.login("app", "app_pw", "app")
    finally:
        raw.close()
    kinds = [t for t, _ in replies]
    assert kinds[-2:] == [b"N", b"Z"], kinds        # after BackendKeyData, before ReadyForQuery
    assert b"Myou are talking to a pooler\x00" in replies[-2][1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("queued", ["simple", "extended"], ids=["lone-query", "pipelined"])
def test_query_wait_notify_tells_a_queued_client_once(pg, bouncer, queued):
    """A client queued longer than query_wait_notify gets PgBouncer's notice,
    once for that wait, then its answer; one served at once gets none."""
    from _util_pool import another_client_gets
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "default_pool_size": 1,
                           "query_wait_notify": 1})
    holder = b.connect()
    raw = RawClient(b.host, b.port, timeout=20)
    try:
        query_one(holder, "SELECT 1")                   # in a transaction: the only server is held
        assert raw.login("app", "app_pw", "app")[-1][0] == b"Z"
        from _util_pool import query_message
        data = query_message("SELECT 41") if queued == "simple" else query_message("SELECT 41") * 2
        raw.sock.sendall(data)
        wait_until(lambda: int(next(r for r in b.admin("SHOW POOLS") if r.database == "app").cl_waiting) == 1,
                   timeout=10, message="the client waits")
        time.sleep(3.5)                                  # three janitor rounds past the limit
        holder.commit()
        replies = raw.read_until(b"Z")
        notices = [body for t, body in replies if t == b"N"]
        assert len(notices) == 1, replies
        assert b"MNo server connection available in postgres backend, client being queued\x00" in notices[0]
        assert [t for t, _ in replies if t != b"N"] == [b"T", b"D", b"C", b"Z"], replies
        if queued != "simple":
            assert [t for t, _ in raw.read_until(b"Z")] == [b"T", b"D", b"C", b"Z"]
        raw.sock.sendall(query_message("SELECT 42"))     # served at once: no notice
        assert [t for t, _ in raw.read_until(b"Z")] == [b"T", b"D", b"C", b"Z"]
        assert another_client_gets(b) == ("served",)
    finally:
        raw.close()
        holder.close()


def test_scram_iterations_reach_the_client(pg, bouncer):
    """scram_iterations: a SCRAM login against a plain-text auth_file password
    is offered that iteration count (server-first-message), and succeeds."""
    import struct

    from _util_pool import message, startup_packet
    from scramp import ScramClient
    b = bouncer(pgbouncer={"auth_type": "scram-sha-256", "scram_iterations": 8192})
    client = ScramClient(["SCRAM-SHA-256"], "app", "app_pw")
    raw = RawClient(b.host, b.port)
    try:
        raw.send(startup_packet({"user": "app", "database": "app"}))
        kind, body = raw.read_message()
        assert kind == b"R" and struct.unpack_from("!I", body)[0] == 10, body
        first = client.get_client_first().encode()
        raw.send(message(b"p", b"SCRAM-SHA-256\x00" + struct.pack("!i", len(first)) + first))
        kind, body = raw.read_message()
        assert kind == b"R" and struct.unpack_from("!I", body)[0] == 11, body
        server_first = body[4:].decode()
        assert ",i=8192" in server_first, server_first
        client.set_server_first(server_first)
        raw.send(message(b"p", client.get_client_final().encode()))
        kind, body = raw.read_message()
        assert kind == b"R" and struct.unpack_from("!I", body)[0] == 12, body
        client.set_server_final(body[4:].decode())
        assert raw.authenticate("app", "app_pw")[-1][0] == b"Z"
    finally:
        raw.close()
