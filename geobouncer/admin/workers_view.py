"""``SHOW WORKERS``: the whole pooler from one admin connection.

Each worker answers ``SHOW WORKER`` with its own row; ``SHOW WORKERS`` gives
that row plus the row of every peer, asked over the peer's unix socket as the
pooler's own OS user logging in as ``pgbouncer`` (SO_PEERCRED, no password, as
PgBouncer's admin login). A peer that does not answer within ``TIMEOUT`` gets a
row with state ``unreachable``. The sockets are gevent's (the process is
monkey-patched), so a slow peer blocks only this console connection.
"""

from __future__ import annotations

import os
import socket
import struct

from ..proto import messages as m

__all__ = ["BUILDERS", "PeerSession", "ask_peer", "per_worker", "show_worker", "show_workers"]

TIMEOUT = 2.0
COLUMNS = [("worker", 23), ("pid", 23), ("state", 25), ("clients", 23), ("servers", 23)]


class PeerUnreachable(Exception):
    pass


def own_row(app) -> list:
    state = "suspended" if app.suspended else "paused" if app.paused else "active"
    servers = sum(p.server_count() for p in app.pools.values())
    return [app.settings.peer_id, os.getpid(), state, len(app.clients), servers]


def show_worker(app):
    return COLUMNS, [own_row(app)]


def show_workers(app):
    rows = [own_row(app)]
    for peer_id, entry in sorted(app.cfg.peers.items()):
        try:
            got = ask_peer(entry, "SHOW WORKER")
            rows.extend(got or [[peer_id, None, "unreachable", None, None]])
        except (OSError, PeerUnreachable):
            rows.append([peer_id, None, "unreachable", None, None])
    return COLUMNS, rows


def _address(entry):
    if entry.host.startswith("/"):
        return socket.AF_UNIX, os.path.join(entry.host, f".s.PGSQL.{entry.port}")
    return socket.AF_INET, (entry.host, entry.port)


class PeerSession:
    """A console connection to a peer, held open for several commands
    (``ask_peer`` for one; SUSPEND keeps one while the pooler is suspended)."""

    __slots__ = ("sock", "reader")

    def __init__(self, entry, application_name: str = ""):
        family, address = _address(entry)
        params = {"user": "pgbouncer", "database": "pgbouncer"}
        if application_name:
            params["application_name"] = application_name
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(TIMEOUT)
            self.sock.connect(address)
            self.sock.sendall(m.startup_message(params))
            self.reader = _Reader(self.sock)
            _until_ready(self.reader, None)
        except BaseException:
            self.sock.close()
            raise

    def run(self, sql: str, timeout: float | None = TIMEOUT) -> list[list]:
        """One command; its data rows (text values, None for NULL). ``timeout``
        bounds every read (None: PAUSE and SUSPEND wait as long as they must)."""
        self.sock.settimeout(timeout)
        self.sock.sendall(m.query(sql))
        rows: list[list] = []
        _until_ready(self.reader, rows)
        return rows

    def close(self) -> None:
        try:
            self.sock.sendall(m.message(b"X"))
        except OSError:
            pass
        self.sock.close()


def ask_peer(entry, sql: str, application_name: str = "", timeout: float | None = TIMEOUT) -> list[list]:
    """Run one admin command on a peer; its data rows (text values, None for NULL)."""
    session = PeerSession(entry, application_name)
    try:
        return session.run(sql, timeout)
    finally:
        session.close()


def _until_ready(reader, rows) -> None:
    while True:
        mtype, body = reader.message()
        if mtype == b"Z":
            return
        if mtype == b"E":
            raise PeerUnreachable(m.parse_error_fields(body).get("M", "error"))
        if mtype == b"D" and rows is not None:
            rows.append(_data_row(body))


def _data_row(body: bytes) -> list:
    (count,), pos, values = struct.unpack_from("!H", body), 2, []
    for _ in range(count):
        (size,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if size < 0:
            values.append(None)
        else:
            values.append(body[pos:pos + size].decode())
            pos += size
    return values


class _Reader:
    __slots__ = ("sock", "buf")

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise PeerUnreachable("peer closed the connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def message(self) -> tuple[bytes, bytes]:
        head = self._take(5)
        (size,) = struct.unpack("!i", head[1:])
        if size < 4 or size > 1 << 24:
            raise PeerUnreachable("bad message from peer")
        return head[:1], self._take(size - 4)


def per_worker(what: str):
    """``SHOW WORKER_POOLS`` (STATS, CLIENTS, SERVERS): PgBouncer's ``SHOW
    POOLS`` of every worker, each row led by its worker's peer id. The plain
    commands stay per worker, with PgBouncer's columns, for the tools that
    parse them; these give the whole pooler from one connection. A worker
    that does not answer in time has no rows (SHOW WORKERS says unreachable)."""
    def build(app):
        from . import show
        cols, rows = show.BUILDERS[what](app)
        out = [[app.settings.peer_id, *row] for row in rows]
        for peer_id, entry in sorted(app.cfg.peers.items()):
            try:
                out.extend([peer_id, *row] for row in ask_peer(entry, f"SHOW {what.upper()}"))
            except (OSError, PeerUnreachable):
                continue
        return [("worker", 23), *cols], out
    return build


BUILDERS = {"worker": show_worker, "workers": show_workers,
            **{f"worker_{what}": per_worker(what) for what in ("pools", "stats", "clients", "servers")}}
