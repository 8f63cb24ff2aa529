"""A client that leaves while its last reply is still being written to it.

When the pooler has read that reply whole from the server, ReadyForQuery
(idle) included, and nothing else is owed, the server's stream is at a
boundary: only the client loses the bytes it did not take. The server goes
back to the pool (it used to be closed, and the next client paid for a new
login). PgBouncer 1.18 closes it ("client disconnect while server was not
ready"): with the client's socket full its reader has not reached the
ReadyForQuery yet.

When the server has not finished the reply (megabytes still to come), the
server is closed, as in PgBouncer: it is never handed on mid-reply.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest
from _util_pool import RawClient, query_message
from fixtures.ports import wait_until
from test_reader_hostile import TINY, tiny_client, unix_databases

APP = ("app", "app_pw", "app")


def backend_pid(raw: RawClient) -> int:
    raw.send(query_message("SELECT pg_backend_pid()"))
    messages = raw.read_until(b"Z")
    row = next(body for mtype, body in messages if mtype == b"D")
    size = int.from_bytes(row[2:6], "big")
    return int(row[6:6 + size])


def leave(raw: RawClient, reset: bool) -> None:
    """Close without reading; ``reset``: with RST (SO_LINGER 0), else FIN (the
    kernel sends RST anyway when unread data is left)."""
    if reset:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()


def fresh_pid(b) -> int:
    conn = b.connect("app", "app", autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            return cur.fetchone()[0]
    finally:
        conn.close()


def server_closes(b) -> list[str]:
    return [line for line in b.log_text().splitlines() if " S-" in line and "closing because" in line]


@pytest.mark.timeout(60)
@pytest.mark.geobouncer_only("PgBouncer 1.18 closes the server: it has not read the ReadyForQuery yet")
@pytest.mark.parametrize("reset", [False, True])
def test_a_finished_reply_the_client_left_keeps_its_server(pg, bouncer, reset):
    b = bouncer(databases=unix_databases(pg), pgbouncer=TINY)
    raw = tiny_client(b)
    pid = backend_pid(raw)
    raw.send(query_message("SELECT repeat('x', 7000)"))   # read whole; the client takes ~2 KB of it
    time.sleep(1.0)
    leave(raw, reset)
    time.sleep(0.5)
    assert fresh_pid(b) == pid, server_closes(b)
    assert server_closes(b) == []
    assert b.log_text().count("new connection to server") == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reset", [False, True])
def test_an_unfinished_reply_the_client_left_closes_its_server(pg, bouncer, reset):
    b = bouncer(databases=unix_databases(pg), pgbouncer=TINY)
    raw = tiny_client(b)
    pid = backend_pid(raw)
    raw.send(query_message("SELECT repeat('x', 1000) FROM generate_series(1, 64000)"))
    time.sleep(1.0)
    leave(raw, reset)
    wait_until(lambda: any("client disconnect while server was not ready" in line for line in server_closes(b)),
               timeout=10, message="the server closed")
    assert fresh_pid(b) != pid
    wait_until(lambda: not pg.psql(f"SELECT 1 FROM pg_stat_activity WHERE pid = {pid}"),
               timeout=10, message="the old backend ended")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reset", [False, True])
def test_a_finished_reply_inside_a_transaction_the_client_left_closes_its_server(pg, bouncer, reset):
    """Reply done, but the transaction it left open is the client's: closed."""
    b = bouncer(databases=unix_databases(pg), pgbouncer=TINY)
    raw = tiny_client(b)
    pid = backend_pid(raw)
    raw.send(query_message("BEGIN; SELECT repeat('x', 7000)"))
    time.sleep(1.0)
    leave(raw, reset)
    wait_until(lambda: server_closes(b), timeout=10, message="the server closed")
    assert fresh_pid(b) != pid
