"""What geobouncer survives: cancel requests, a PostgreSQL restart, garbage input.

Every test also checks that the rest keeps working: another client's query,
an open connection, a new login, the process itself.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import subprocess
import threading

import psycopg2
import psycopg2.errors
import pytest
from _util_pool import (
    SSL_REQUEST,
    RawClient,
    check_pooler_alive,
    close_quietly,
    errors_in,
    message,
    pool_row,
    query_one,
    run_in_thread,
    startup_packet,
    terminate_backends,
)
from fixtures.pooler import TARGET, pooler_sqlstate
from fixtures.ports import wait_until


def active_queries(pg, like: str) -> int:
    return pg.psql("SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' AND state = 'active' "
                   "AND query LIKE %s AND pid <> pg_backend_pid()", (like,))[0][0]


# -- cancel ---------------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_cancel_cancels_only_that_query(pg, bouncer, pool_mode):
    b = bouncer(pgbouncer={"pool_mode": pool_mode, "auth_type": "md5", "default_pool_size": 3})
    victim = b.connect(autocommit=True)
    other = b.connect(autocommit=True)
    try:
        slow = run_in_thread(query_one, victim, "SELECT pg_sleep(30) /* gb-victim */")
        bystander = run_in_thread(query_one, other, "SELECT 'bystander' FROM pg_sleep(2) /* gb-bystander */")
        wait_until(lambda: active_queries(pg, "%gb-victim%") == 1 and active_queries(pg, "%gb-bystander%") == 1,
                   timeout=10, message="both queries running")
        victim.cancel()
        with pytest.raises(psycopg2.errors.QueryCanceled, match="canceling statement due to user request"):
            slow.get(15)
        assert bystander.get(15) == ("bystander",)   # the other server's query was not cancelled
        assert query_one(victim, "SELECT 'victim ok'") == ("victim ok",)
        assert query_one(other, "SELECT 'other ok'") == ("other ok",)
    finally:
        close_quietly(victim, other)
        terminate_backends(pg, "app", "%gb-victim%")


@pytest.mark.timeout(60)
def test_cancel_of_idle_client_does_not_hit_the_server_it_used_before(pg, bouncer):
    """Transaction pooling, one server: A used it, now B runs on it; A's cancel must not cancel B."""
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "default_pool_size": 1})
    a = b.connect(autocommit=True)
    other = b.connect(autocommit=True)
    try:
        pid = query_one(a, "SELECT pg_backend_pid()")[0]
        out = run_in_thread(query_one, other, "SELECT pg_backend_pid() FROM pg_sleep(2) /* gb-b-query */")
        wait_until(lambda: active_queries(pg, "%gb-b-query%") == 1, timeout=10, message="B's query running")
        a.cancel()
        assert out.get(15) == (pid,)
        assert query_one(a, "SELECT 'a ok'") == ("a ok",)
    finally:
        close_quietly(a, other)


@pytest.mark.timeout(60)
def test_psql_cancel_with_sigint(pg, bouncer):
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5"})
    proc = subprocess.Popen(["psql", "-X", "-h", b.host, "-p", str(b.port), "-U", "app", "-d", "app",
                             "-c", "SELECT pg_sleep(30) /* gb-psql */"],
                            env={**os.environ, "PGPASSWORD": "app_pw"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: active_queries(pg, "%gb-psql%") == 1, timeout=10, message="psql's query running")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        terminate_backends(pg, "app", "%gb-psql%")
    assert proc.returncode != 0
    assert "canceling statement due to user request" in err, (out, err)
    wait_until(lambda: active_queries(pg, "%gb-psql%") == 0, timeout=10, message="query gone")
    conn = b.connect(autocommit=True)
    assert query_one(conn, "SELECT 'after psql'") == ("after psql",)
    conn.close()


# -- PostgreSQL restart -------------------------------------------------------------------

def _query_new_connection(b, sql="SELECT 'fresh', current_user"):
    conn = b.connect(autocommit=True)
    try:
        return query_one(conn, sql)
    finally:
        conn.close()


def _follow_port(b, pg) -> None:
    """pg.start() may move to another port if its own was taken meanwhile."""
    if b.databases["app"]["port"] != pg.port:
        b.rewrite(databases={"app": pg.conninfo("app"), "postgres": pg.conninfo("postgres")})


@pytest.mark.timeout(90)
@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_postgres_restart_survived(pg, bouncer, pool_mode):
    b = bouncer(pgbouncer={"pool_mode": pool_mode, "auth_type": "md5", "server_login_retry": 1,
                           "default_pool_size": 5})
    conns = [b.connect(autocommit=True) for _ in range(3)]
    try:
        for i, conn in enumerate(conns):
            assert query_one(conn, "SELECT %s::int", (i,)) == (i,)
        old_pids = {r[0] for r in pg.psql("SELECT pid FROM pg_stat_activity WHERE datname = 'app'")}
        assert old_pids
        pg.restart("fast")
        _follow_port(b, pg)
        # New connections and queries work again (bounded: server_login_retry is 1 s).
        assert wait_until(lambda: _query_new_connection(b) == ("fresh", "app"), timeout=30,
                          interval=0.3, message="new connections work after the restart")
        # Existing clients: at most one error each, then (after reconnecting if needed) they work.
        for i, conn in enumerate(conns):
            try:
                result = query_one(conn, "SELECT %s::int + 100", (i,))
            except psycopg2.OperationalError:
                conn.close()
                conn = conns[i] = b.connect(autocommit=True)
                result = query_one(conn, "SELECT %s::int + 100", (i,))
            assert result == (i + 100,)
        new_pids = {r[0] for r in pg.psql("SELECT pid FROM pg_stat_activity WHERE datname = 'app'")}
        assert new_pids and not (new_pids & old_pids)
        outs = [run_in_thread(_query_new_connection, b, f"SELECT {k}, current_user") for k in range(10)]
        assert [o.get(20) for o in outs] == [(k, "app") for k in range(10)]
        assert b.is_running()
    finally:
        close_quietly(*conns)


@pytest.mark.timeout(90)
def test_postgres_down_then_up(pg, bouncer):
    """While PostgreSQL is down a query errors or waits (PgBouncer holds it until
    query_wait_timeout); it never hangs past that, and service resumes after the start."""
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "server_login_retry": 1,
                           "server_connect_timeout": 3, "query_wait_timeout": 20})
    keeper = b.connect(autocommit=True)
    try:
        assert query_one(keeper, "SELECT 1") == (1,)
        pg.stop("fast")
        try:
            during = run_in_thread(query_one, keeper, "SELECT 2")
            wait_until(lambda: during.done.is_set() or pool_row(b).cl_waiting == 1, timeout=10,
                       message="the query errored or waits for a server")
            assert b.is_running()
        finally:
            pg.start()
        _follow_port(b, pg)
        try:
            assert during.get(40) == (2,)     # held, then served once PostgreSQL was back
        except psycopg2.OperationalError:
            pass                              # or refused while PostgreSQL was down
        assert wait_until(lambda: _query_new_connection(b) == ("fresh", "app"), timeout=30, interval=0.3,
                          message="service back once PostgreSQL is up")
        if keeper.closed:
            keeper = b.connect(autocommit=True)
        try:
            result = query_one(keeper, "SELECT 3")
        except psycopg2.OperationalError:     # at most one error for an existing client
            keeper.close()
            keeper = b.connect(autocommit=True)
            result = query_one(keeper, "SELECT 3")
        assert result == (3,)
    finally:
        close_quietly(keeper)


# -- garbage input ------------------------------------------------------------------------

def _random_bytes(seed: int, n: int = 4096) -> bytes:
    return random.Random(seed).randbytes(n)


def _expect_error_or_close(raw: RawClient, codes=("08P01",)) -> list:
    """Read until the pooler closes; every ErrorResponse must carry one of ``codes``."""
    try:
        replies = raw.read_until_close()
    except TimeoutError:
        raise AssertionError("the pooler neither answered with an error nor closed within the timeout")
    errs = errors_in(replies)
    for err in errs:
        assert err.get("C") in codes, (err, replies)
        assert err.get("S") in ("ERROR", "FATAL"), err
    assert not [m for m in replies if m[0] in (b"Z", b"T", b"D")], replies   # nothing ran
    return errs


def case_random_before_login(b, seed):
    with RawClient(b.host, b.port) as raw:
        raw.send(_random_bytes(seed))
        _expect_error_or_close(raw)


def case_random_after_login(b, seed):
    with RawClient(b.host, b.port) as raw:
        assert raw.login("app", "app_pw", "app")[-1][0] == b"Z"
        raw.send(b"\x01" + _random_bytes(seed))   # \x01 is no message type
        errs = _expect_error_or_close(raw)
        assert errs, "an unknown message type gets an ErrorResponse"


def case_huge_length_before_login(b, _):
    with RawClient(b.host, b.port) as raw:
        raw.send(b"Q" + struct.pack("!I", 0x7FFFFFFF) + b"SELECT 1\x00")
        errs = _expect_error_or_close(raw)
        assert errs, "an oversized startup packet gets an ErrorResponse"


def case_huge_length_after_login(b, _):
    with RawClient(b.host, b.port, timeout=15) as raw:
        assert raw.login("app", "app_pw", "app")[-1][0] == b"Z"
        raw.send(b"Q" + struct.pack("!I", 0x7FFFFFFF) + b"SELECT 1\x00" + b"x" * 1000)
        _expect_error_or_close(raw, codes=("08P01", "08006", "54000"))


def _startup_raw(code: int, body: bytes) -> bytes:
    return struct.pack("!II", len(body) + 8, code) + body


def case_bad_startup_packets(b, _):
    bad = [
        _startup_raw((1234 << 16) | 5699, b""),                         # unknown request code
        struct.pack("!II", 4, 196608),                                  # length below 8
        struct.pack("!II", 7, 196608),
        _startup_raw(196608, b"user\x00app\x00database\x00ap"),          # no terminating NUL
        _startup_raw(196608, b"user\x00app\x00database\x00\x00"),        # odd number of fields
        _startup_raw(196608, b"database\x00app\x00\x00"),                 # no user
        _startup_raw(196608, b"user\x00\xff\xfe\x00database\x00app\x00\x00"),   # not UTF-8
        _startup_raw(1 << 16, b"user\x00app\x00\x00"),                     # protocol 1.0
        _startup_raw(80877102, b"\x00\x00"),                            # a truncated CancelRequest
    ]
    # PgBouncer 1.18 takes three of them leniently (no terminating NUL, odd number of fields,
    # a non-UTF-8 user name: an unknown user) and asks for a password; PostgreSQL and
    # geobouncer refuse them with 08P01.
    lenient = {3, 4, 6} if TARGET == "pgbouncer" else set()
    for i, packet in enumerate(bad):
        with RawClient(b.host, b.port) as raw:
            raw.send(packet)
            if i in lenient:
                first = raw.read_message()
                assert first and first[0] == b"R", (packet, first)   # a password request, nothing ran
                continue
            _expect_error_or_close(raw, codes=("08P01", "28000"))


def case_early_close(b, _):
    packet = startup_packet({"user": "app", "database": "app"})
    for cut in (1, 4, 6, len(packet) - 1):
        raw = RawClient(b.host, b.port)
        raw.send(packet[:cut])
        raw.close()
    # Closing in the middle of authentication.
    raw = RawClient(b.host, b.port)
    raw.send(packet)
    mtype, body = raw.read_message()
    assert mtype == b"R" and struct.unpack("!I", body[:4])[0] == 5, (mtype, body)   # md5 request
    raw.close()
    # A reset instead of a FIN.
    raw = RawClient(b.host, b.port)
    raw.send(packet[:10])
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()


def case_ssl_request_then_garbage(b, seed):
    with RawClient(b.host, b.port) as raw:
        raw.send(SSL_REQUEST)
        assert raw.read_byte() == b"N"   # no TLS configured
        raw.send(_random_bytes(seed))
        _expect_error_or_close(raw)
    # SSLRequest with bytes already behind it (a buffer-injection attempt): refused.
    with RawClient(b.host, b.port) as raw:
        raw.send(SSL_REQUEST + startup_packet({"user": "app", "database": "app"}))
        first = raw.read_byte()
        assert first in (b"N", b"E", b""), first
        if first == b"E":
            raw.buf[:0] = b"E"
        _expect_error_or_close(raw)


def case_unknown_startup_parameter(b, _):
    with RawClient(b.host, b.port) as raw:
        replies = raw.login("app", "app_pw", "app", extra={"gb_bogus_param": "1"})
        replies += raw.read_until_close()
        errs = errors_in(replies)
        assert len(errs) == 1, replies
        assert errs[0]["C"] == "08P01", errs
        assert "unsupported startup parameter" in errs[0]["M"], errs
        assert not [m for m in replies if m[0] == b"Z"]


def case_unknown_database(b, _):
    with RawClient(b.host, b.port) as raw:
        replies = raw.login("app", "app_pw", "no_such_db_here")
        replies += raw.read_until_close()
        errs = errors_in(replies)
        assert len(errs) == 1, replies
        assert errs[0]["C"] == pooler_sqlstate("3D000"), errs
        assert "no_such_db_here" in errs[0]["M"], errs
        assert not [m for m in replies if m[0] == b"Z"]


def case_garbage_storm(b, _):
    """Thirty raw connections at once, each sending its own random bytes or half a message."""
    failures = []

    def one(seed):
        try:
            with RawClient(b.host, b.port) as raw:
                if seed % 2:
                    raw.send(_random_bytes(seed, 512))
                    _expect_error_or_close(raw)
                else:
                    assert raw.login("app", "app_pw", "app")[-1][0] == b"Z"
                    raw.send(message(b"Q", b"SELECT 1")[:7])   # half a Query, then gone
        except Exception as exc:  # noqa: BLE001
            failures.append((seed, exc))

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(100, 130)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not [t for t in threads if t.is_alive()]
    assert not failures, failures


T, S = "transaction", "session"
CASES = [
    ("random-before-login-1", case_random_before_login, 1, T),
    ("random-before-login-2", case_random_before_login, 2, T),
    ("random-before-login-3", case_random_before_login, 3, T),
    ("random-after-login", case_random_after_login, 4, T),
    ("random-after-login-session", case_random_after_login, 4, S),
    ("huge-length-before-login", case_huge_length_before_login, None, T),
    ("huge-length-after-login", case_huge_length_after_login, None, T),
    ("huge-length-after-login-session", case_huge_length_after_login, None, S),
    ("bad-startup-packets", case_bad_startup_packets, None, T),
    ("early-close", case_early_close, None, T),
    ("ssl-request-then-garbage", case_ssl_request_then_garbage, 5, T),
    ("unknown-startup-parameter", case_unknown_startup_parameter, None, T),
    ("unknown-database", case_unknown_database, None, T),
    ("garbage-storm", case_garbage_storm, None, T),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case, seed, pool_mode",
                         [pytest.param(fn, seed, mode, id=name) for name, fn, seed, mode in CASES])
def test_garbage_input_survived(pg, bouncer, case, seed, pool_mode):
    b = bouncer(pgbouncer={"pool_mode": pool_mode, "auth_type": "md5", "default_pool_size": 4,
                           "client_login_timeout": 10})
    keeper = b.connect(autocommit=True)
    session = b.connect(autocommit=False)   # holds a server inside a transaction throughout
    try:
        pid = query_one(session, "SELECT pg_backend_pid()")[0]
        case(b, seed)
        check_pooler_alive(b, keeper)
        assert query_one(session, "SELECT pg_backend_pid()") == (pid,)
        session.commit()
        # The server of a client that sent garbage mid-stream is not handed to anyone dirty.
        for _ in range(4):
            assert query_one(keeper, "SELECT 'clean', txid_current_if_assigned()") == ("clean", None)
        assert "Traceback" not in b.output_text(), b.output_text()[-3000:]
    finally:
        close_quietly(keeper, session)
