"""Closing a server whose socket takes nothing more (its backend not reading):
ServerConnection.close (net/server.py) must not wait to write its
Terminate. Here query_timeout (the janitor) ends a client whose greenlet is
blocked writing a large query to a stopped backend (SIGSTOP): gevent's
sendall in the close raised ConcurrentObjectUseError there (another greenlet
waits to write on that socket), the janitor pass failed with a traceback,
the server's descriptor was never closed and the client never got its EOF.
Now the close sends no Terminate while a write holds the server's write lock,
the blocked write ends with EBADF, the client is closed and the backend,
continued, sees EOF and exits. The same close from the hub with a full buffer
(where gevent's sendall raised BlockingSwitchOutError) is
tests/unit/test_server_close.py.
"""

from __future__ import annotations

import os
import signal
import socket
import threading

import pytest
from _util_pool import another_client_gets, errors_in, query_message
from fixtures.ports import wait_until
from test_red_team import finish, raw_login, read_n_ready, rows_of

BIG = 48 << 20       # more than every socket buffer between the client and the backend


def _backend_alive(pg, pid: int) -> bool:
    conn = pg.connect("postgres", "postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
            return cur.fetchone()[0] == 1
    finally:
        conn.close()


def _read_to_end(raw, seconds: float) -> tuple[bool, list]:
    """(ended, messages): did the pooler end the connection within ``seconds``?"""
    raw.sock.settimeout(seconds)
    out = []
    try:
        while True:
            msg = raw.read_message()
            if msg is None:
                return True, out
            out.append(msg)
    except (ConnectionResetError, BrokenPipeError):
        return True, out
    except socket.timeout:
        return False, out


@pytest.mark.timeout(90)
@pytest.mark.geobouncer_only("the pooler's own log and close path")
def test_query_timeout_closes_a_server_its_client_is_blocked_writing_to(pg, bouncer):
    # Over PostgreSQL's Unix socket: its send buffer, once full, stays full
    # while the backend does not read (TCP frees some room as in-flight data is
    # acknowledged, and a Terminate of 5 bytes then fits: it went inside the query).
    b = bouncer(databases={"app": dict(host=str(pg.socket_dir), port=pg.port, dbname="app")},
                pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "default_pool_size": 2,
                           "query_timeout": 1})
    raw = raw_login(b)
    pid = None
    try:
        raw.sock.sendall(query_message("BEGIN; SELECT pg_backend_pid()"))   # the server stays linked
        pid = int(rows_of(read_n_ready(raw, 1))[0][0])
        os.kill(pid, signal.SIGSTOP)
        big = query_message("SELECT length('" + "x" * BIG + "')")

        def write():
            try:
                raw.sock.sendall(big)
            except OSError:
                pass                                 # closed under it: expected

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        ended, messages = _read_to_end(raw, 15)      # query_timeout, the janitor's next tick
        assert ended, "the client was not closed"
        fatal = [e for e in errors_in(messages) if e.get("S") == "FATAL"]
        assert all(e["M"] == "query timeout" for e in fatal), fatal
        assert another_client_gets(b) == ("served",)  # the other server, or the freed slot
        log = b.log_text()
        assert "janitor pass failed" not in log and "Traceback" not in log, log[-3000:]
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        raw.close()
    # Its descriptor was closed: the backend, running again, sees EOF mid-message.
    wait_until(lambda: not _backend_alive(pg, pid), timeout=20, message="the stalled backend ends")
    finish(b)
