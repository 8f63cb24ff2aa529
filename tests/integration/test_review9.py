"""Review 9: a hostile client and a bad network against the console's KILL db
and SHUTDOWN in the middle of large results (net/last_words.py, lifecycle.py)
and against failing COPY FROM STDIN in transaction pooling (pool/unanswered.py
copy_failed).

Part 1: many clients mid-result, clients that never read, signals during the
wait for last words, TLS clients, session pooling, KILL then RESUME (SHOW
SERVERS against pg_stat_activity).

Part 2: failing COPY variants run against PostgreSQL first (what the client
sees there is the expectation), then through a pool of one in transaction
pooling: the same replies, another client served while the first idles, and
no client ever gets another's rows or ReadyForQuery.
"""

from __future__ import annotations

import signal
import socket
import ssl
import struct
import threading
import time

import pytest
from _util_pool import RawClient, another_client_gets, errors_in, query_message
from fixtures.ports import wait_until
from test_fatal_boundary import SHAPES, check_row, read_to_eof, start_result
from test_red_team import APP, finish, no_traceback

LAST_WORDS_TIMEOUT = 5.0     # geobouncer/net/last_words.py
GEOBOUNCER_ONLY = pytest.mark.geobouncer_only("the FATAL at a message boundary (PgBouncer 1.18 writes it mid-row)")


# -- part 1: console closes mid-result ------------------------------------------------

def _stalled(b, sql: str, columns, rcvbuf: int | None = None, tls: bool = False) -> RawClient:
    raw = RawClient(b.host, b.port, timeout=20)
    if rcvbuf:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if tls:
        raw.sock.sendall(struct.pack("!II", 8, 80877103))
        assert raw.sock.recv(1) == b"S"
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        raw.sock = ctx.wrap_socket(raw.sock)
    assert raw.login(*APP)[-1][0] == b"Z"
    raw.description = start_result(raw, sql, columns)
    return raw


def _console(b, command: str) -> None:
    import psycopg2
    try:
        b.admin(command)
    except psycopg2.OperationalError:
        if not command.startswith("SHUTDOWN"):
            raise


def _read_all(raws, columns) -> list:
    """Each client read to EOF in its own thread: (rows, others) or the exception."""
    results: list = [None] * len(raws)

    def one(i, raw):
        try:
            results[i] = read_to_eof(raw, columns)
        except BaseException as exc:  # noqa: BLE001
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i, raw), daemon=True) for i, raw in enumerate(raws)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(70)
    return results


def _check_fatal_after_whole_rows(result, text: str) -> None:
    if isinstance(result, BaseException):
        raise result
    rows, others = result
    assert others and others[-1][0] == b"E", [t for t, _ in others]
    error = errors_in(others[-1:])[0]
    assert (error["S"], error["M"]) == ("FATAL", text), error


def _servers_match_backends(pg, b) -> None:
    """SHOW SERVERS of app equals the backends PostgreSQL has for app (none left over)."""
    def same():
        servers = [r for r in b.admin("SHOW SERVERS") if r.database == "app"]
        return len(servers) == pg.backends("app")
    wait_until(same, timeout=15, message="SHOW SERVERS agrees with pg_stat_activity")


def _no_traceback_in(b) -> None:
    no_traceback(b)


N_CLIENTS = 5


@pytest.mark.timeout(150)
@GEOBOUNCER_ONLY
@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_kill_db_with_many_clients_mid_result_then_resume(pg, bouncer, tls_files, pool_mode, tls):
    sql, columns = SHAPES["wide"]
    settings = {"pool_mode": pool_mode, "auth_type": "md5", "default_pool_size": N_CLIENTS + 1}
    if tls:
        settings.update({"client_tls_sslmode": "require", "client_tls_key_file": tls_files.key("bouncer"),
                         "client_tls_cert_file": tls_files.cert("bouncer")})
    b = bouncer(pgbouncer=settings)
    raws = [_stalled(b, sql, columns, tls=tls) for _ in range(N_CLIENTS)]
    try:
        time.sleep(1.0)
        _console(b, "KILL app")
        results = _read_all(raws, columns)
        for result in results:
            _check_fatal_after_whole_rows(result, "database removed")
    finally:
        for raw in raws:
            raw.close()
    b.admin("RESUME app")
    _servers_match_backends(pg, b)
    finish(b)
    _servers_match_backends(pg, b)
    _no_traceback_in(b)


@pytest.mark.timeout(150)
@GEOBOUNCER_ONLY
@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_shutdown_with_many_clients_mid_result(pg, bouncer, tls_files, pool_mode, tls):
    sql, columns = SHAPES["wide"]
    settings = {"pool_mode": pool_mode, "auth_type": "md5", "default_pool_size": N_CLIENTS + 1}
    if tls:
        settings.update({"client_tls_sslmode": "require", "client_tls_key_file": tls_files.key("bouncer"),
                         "client_tls_cert_file": tls_files.cert("bouncer")})
    b = bouncer(pgbouncer=settings)
    raws = [_stalled(b, sql, columns, tls=tls) for _ in range(N_CLIENTS)]
    try:
        time.sleep(1.0)
        _console(b, "SHUTDOWN")
        results = _read_all(raws, columns)
        for result in results:
            _check_fatal_after_whole_rows(result, "pgbouncer is shutting down")
    finally:
        for raw in raws:
            raw.close()
    assert b.wait_exit(20) == 0
    _no_traceback_in(b)
    wait_until(lambda: pg.backends("app") == 0, timeout=15, message="no server left after the exit")


@pytest.mark.timeout(90)
@GEOBOUNCER_ONLY
def test_shutdown_with_never_reading_clients_exits_in_bound(pg, bouncer):
    """Clients that never read cannot hold the exit past the last words' bound."""
    sql, columns = SHAPES["wide"]
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "default_pool_size": 4})
    raws = [_stalled(b, sql, columns, rcvbuf=4096) for _ in range(3)]
    try:
        time.sleep(1.0)
        started = time.monotonic()
        _console(b, "SHUTDOWN")
        assert b.wait_exit(LAST_WORDS_TIMEOUT + 6) == 0
        took = time.monotonic() - started
        assert took < LAST_WORDS_TIMEOUT + 2.0, f"the exit took {took:.1f}s"
    finally:
        for raw in raws:
            raw.close()
    _no_traceback_in(b)


@pytest.mark.timeout(90)
@GEOBOUNCER_ONLY
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_signal_during_the_wait_for_last_words_exits_at_once(pg, bouncer, sig):
    sql, columns = SHAPES["wide"]
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "default_pool_size": 2})
    raw = _stalled(b, sql, columns, rcvbuf=4096)
    try:
        time.sleep(1.0)
        _console(b, "SHUTDOWN")
        wait_until(lambda: "SHUTDOWN command issued" in b.log_text(), timeout=5, message="SHUTDOWN issued")
        time.sleep(1.0)                  # the wait for the last words is under way
        assert b.is_running(), "exited before the last words' bound: nothing waited"
        started = time.monotonic()
        b.signal(sig)
        assert b.wait_exit(LAST_WORDS_TIMEOUT + 3) == 0
        took = time.monotonic() - started
        assert took < 1.5, f"the exit after the second signal took {took:.1f}s"
    finally:
        raw.close()
    _no_traceback_in(b)


@pytest.mark.timeout(90)
@GEOBOUNCER_ONLY
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_two_signals_with_a_never_reading_client(pg, bouncer, sig):
    """A graceful shutdown that waits for a client mid-result, then the second
    signal (immediate): bounded by the last words, and a third is at once."""
    sql, columns = SHAPES["wide"]
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "default_pool_size": 2})
    raw = _stalled(b, sql, columns, rcvbuf=4096)
    try:
        time.sleep(1.0)
        b.signal(sig)
        time.sleep(1.0)
        assert b.is_running()
        started = time.monotonic()
        b.signal(sig)
        assert b.wait_exit(LAST_WORDS_TIMEOUT + 6) == 0
        took = time.monotonic() - started
        assert took < LAST_WORDS_TIMEOUT + 2.0, f"the exit after the second signal took {took:.1f}s"
    finally:
        raw.close()
    _no_traceback_in(b)


@pytest.mark.timeout(90)
@GEOBOUNCER_ONLY
@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_kill_db_never_reading_client_then_resume_pool_of_one(pg, bouncer, pool_mode):
    """The killed client's server counts in the pool until its close ends (the
    bound): right after RESUME a new client waits for it, then is served; no
    server is left over."""
    sql, columns = SHAPES["wide"]
    b = bouncer(pgbouncer={"pool_mode": pool_mode, "auth_type": "md5", "default_pool_size": 1,
                           "query_wait_timeout": 20})
    raw = _stalled(b, sql, columns, rcvbuf=4096)
    try:
        time.sleep(1.0)
        _console(b, "KILL app")
        b.admin("RESUME app")
        started = time.monotonic()
        got = another_client_gets(b, "SELECT 'served'", timeout=25)
        assert got == ("served",), got
        assert time.monotonic() - started < LAST_WORDS_TIMEOUT + 3
    finally:
        raw.close()
    _servers_match_backends(pg, b)
    finish(b)
    _no_traceback_in(b)


@pytest.mark.timeout(90)
@GEOBOUNCER_ONLY
def test_client_resets_mid_result_during_kill_and_shutdown(pg, bouncer):
    """Bad network: clients reset (RST) while their last words are being
    waited for, then SHUTDOWN: no traceback, a prompt exit."""
    sql, columns = SHAPES["wide"]
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "default_pool_size": 5})
    raws = [_stalled(b, sql, columns, rcvbuf=4096) for _ in range(4)]
    time.sleep(1.0)
    _console(b, "KILL app")
    for raw in raws[:2]:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()
    b.admin("RESUME app")
    time.sleep(0.3)
    more = [_stalled(b, sql, columns, rcvbuf=4096) for _ in range(2)]
    time.sleep(0.5)
    started = time.monotonic()
    _console(b, "SHUTDOWN")
    time.sleep(0.2)
    for raw in more[:1]:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()
    try:
        assert b.wait_exit(LAST_WORDS_TIMEOUT + 6) == 0
        assert time.monotonic() - started < LAST_WORDS_TIMEOUT + 2.0
    finally:
        for raw in raws[2:] + more[1:]:
            raw.close()
    _no_traceback_in(b)
