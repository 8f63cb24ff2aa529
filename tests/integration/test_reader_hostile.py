"""Hostile clients and a bad network against the server reader as a libev
read callback (net/server_reader.py): whatever closes a client or its
server while a reply is only partly written must not write into that reply.

To put a reply exactly where a test wants it, the pooler reaches PostgreSQL
over its unix socket (no tcp_socket_buffer there: one recv takes what
PostgreSQL flushed at once) while the client's side is tiny
(tcp_socket_buffer, the client's SO_RCVBUF): a result of a few KB is read
whole from the server, ReadyForQuery included, and only part of it fits
the client's socket. A NOTICE is flushed by PostgreSQL at once: a chunk
that ends at a message boundary.
"""

from __future__ import annotations

import socket
import time

import pytest
from _util_pool import RawClient, errors_in, parse_error_fields, query_message
from fixtures.pooler import TARGET
from fixtures.ports import wait_until
from test_red_team import finish

APP = ("app", "app_pw", "app")
ROW = 7000          # one value: the whole result fits one write of PostgreSQL's 8 KB buffer
TINY = {"pool_mode": "transaction", "auth_type": "md5", "tcp_socket_buffer": 1024}


def unix_databases(pg) -> dict:
    return {"app": {"host": str(pg.socket_dir), "port": pg.port, "dbname": "app"}}


def tiny_client(b, rcvbuf: int = 1024) -> RawClient:
    """A logged-in raw client whose receive window is a few KB (SO_RCVBUF before connect)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(20)
    sock.connect((b.host, b.port))
    raw = RawClient.__new__(RawClient)
    raw.sock, raw.buf, raw.closed = sock, bytearray(), False
    assert raw.login(*APP)[-1][0] == b"Z"
    return raw


def read_all(raw: RawClient, seconds: float = 20) -> bytes:
    """Every byte until EOF (or ``seconds``)."""
    data = bytes(raw.buf)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            got = raw.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            break
        except socket.timeout:
            break
        if not got:
            break
        data += got
    return data


def split_messages(data: bytes):
    """The whole messages in ``data``, and the bytes after the last one."""
    out, pos = [], 0
    while len(data) - pos >= 5:
        length = int.from_bytes(data[pos + 1:pos + 5], "big")
        if len(data) - pos < 1 + length:
            break
        out.append((data[pos:pos + 1], data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out, data[pos:]


def value_of(row_body: bytes) -> bytes:
    size = int.from_bytes(row_body[2:6], "big")
    return row_body[6:6 + size]


@pytest.mark.timeout(60)
def test_idle_transaction_timeout_while_the_reply_is_still_being_written(pg, bouncer):
    """The reply that left the transaction idle was read whole from the
    server but the client has taken only part of it when
    idle_transaction_timeout fires: the client gets the rest of it, then the
    FATAL, as from PgBouncer 1.18 (the error used to land inside the DataRow)."""
    b = bouncer(databases=unix_databases(pg), pgbouncer={**TINY, "idle_transaction_timeout": 1})
    raw = tiny_client(b)
    try:
        raw.send(query_message("BEGIN"))
        assert raw.read_until(b"Z")[-1] == (b"Z", b"T")
        raw.send(query_message(f"SELECT repeat('x', {ROW})"))
        time.sleep(3.5)                   # not reading: the janitor fires meanwhile
        data = read_all(raw)
    finally:
        raw.close()
    messages, tail = split_messages(data)
    assert [t for t, _ in messages] == [b"T", b"D", b"C", b"Z", b"E"] and tail == b"", (messages[-2:], tail[:60])
    assert value_of(messages[1][1]) == b"x" * ROW
    error = errors_in(messages)[0]
    assert (error["S"], error["M"]) == ("FATAL", "idle transaction timeout"), error
    finish(b)


@pytest.mark.timeout(60)
@pytest.mark.geobouncer_only("PgBouncer 1.18 writes the suspend_timeout error mid-message")
def test_suspend_timeout_closes_a_server_mid_write_without_garbage(pg, bouncer):
    """SUSPEND's suspend_timeout closes a server whose NOTICE the client has
    taken only in part (the server's reader is killed mid-write): the client
    sees that NOTICE cut short and EOF, never an error written inside it."""
    b = bouncer(databases=unix_databases(pg), pgbouncer={**TINY, "suspend_timeout": 1})
    raw = tiny_client(b)
    try:
        raw.send(query_message(f"DO $$ BEGIN RAISE NOTICE '%', repeat('n', {ROW}); "
                               "PERFORM pg_sleep(20); END $$"))
        time.sleep(0.5)                   # the NOTICE is read, the client took part of it
        b.admin("SUSPEND")                # returns after suspend_timeout; RESUME as the console leaves
        data = read_all(raw)
    finally:
        raw.close()
    messages, tail = split_messages(data)
    assert [t for t, _ in messages] in ([], [b"N"], [b"N", b"E"]), messages[-2:]
    if messages:
        assert parse_error_fields(messages[0][1])["M"] == "n" * ROW
    else:
        # The NOTICE cut short: its own bytes only, no error inside it.
        assert tail[:1] == b"N" and b"suspend_timeout" not in tail, tail[-80:]
        assert set(tail[5:].split(b"\x00Mn", 1)[-1]) <= {ord("n")}, tail[-80:]
    finish(b)
