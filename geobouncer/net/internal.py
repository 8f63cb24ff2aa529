"""The pooler's own requests on a server connection (SET, reset and check
queries, auth_query): sent while nobody is linked, answered to the pooler, not
forwarded. Functions over a ServerConnection (net/server.py)."""

from __future__ import annotations

import struct

import gevent
from gevent.event import AsyncResult

from ..proto import messages as m
from ..proto.framing import message_at

_D, _E, _S, _Z = (ord(c) for c in "DESZ")


class ServerError(Exception):
    """PostgreSQL refused or failed something the pooler asked (login, SET ...)."""

    def __init__(self, sqlstate: str, text: str, fatal: bool = False):
        super().__init__(text)
        self.sqlstate = sqlstate
        self.text = text
        self.fatal = fatal


class InternalQuery:
    """The pooler's own query in flight: rows and the first error are collected."""

    __slots__ = ("error", "pending", "result", "rows", "tail")

    def __init__(self, pending: int = 1):
        self.result = AsyncResult()
        self.rows: list[list[str | None]] = []
        self.error: ServerError | None = None
        self.pending = pending   # ReadyForQuery messages still expected
        self.tail = b""          # an incomplete message, completed by the next read


def run_internal(server, payload: bytes, replies: int = 1, timeout: float | None = None) -> InternalQuery:
    """Send the pooler's own request (not linked to a client) and wait for its
    ``replies`` ReadyForQuery messages. Raises ServerError on error."""
    q = InternalQuery(replies)
    server.internal = q
    try:
        server.sock.sendall(payload)
        q.result.get(timeout=timeout)
    except gevent.Timeout:
        server.close("internal query timeout")
        raise ServerError("57014", "internal query timeout") from None
    except OSError as exc:
        server.close(f"write failed: {exc}")
        raise ServerError("08006", "server connection failed") from None
    finally:
        server.internal = None
    if q.error:
        raise q.error
    return q


def query(server, sql: str, timeout: float | None = None) -> list[list[str | None]]:
    return run_internal(server, m.query(sql), timeout=timeout).rows


def internal_data(server, data: bytes) -> None:
    """Consume the replies to the pooler's own query."""
    q = server.internal
    if q.tail:
        data = q.tail + data
    pos = 0
    n = len(data)
    while pos < n:
        found = message_at(data, pos, 1 << 26)
        if found is None:
            break
        mtype, start, end = found
        body = data[start:end]
        if mtype == _D:
            q.rows.append(_decode_row(body))
        elif mtype == _E and q.error is None:
            fields = m.parse_error_fields(body)
            q.error = ServerError(fields.get("C", "XX000"), fields.get("M", "error"),
                                  fields.get("S") in ("FATAL", "PANIC"))
        elif mtype == _S:
            name, value = m.parse_parameter_status(body)
            server.params[name] = value
            if name in server.tparams or name in server.pool.tracked:
                server.tparams[name] = value
        elif mtype == _Z:
            server.tx_status = body[:1]
            q.pending -= 1
            if q.pending == 0:
                q.result.set(True)
        pos = end
    q.tail = data[pos:]


def _decode_row(body) -> list[str | None]:
    count = struct.unpack_from("!H", body, 0)[0]
    pos = 2
    row: list[str | None] = []
    for _ in range(count):
        n = struct.unpack_from("!i", body, pos)[0]
        pos += 4
        if n < 0:
            row.append(None)
        else:
            row.append(bytes(body[pos:pos + n]).decode(errors="replace"))
            pos += n
    return row
