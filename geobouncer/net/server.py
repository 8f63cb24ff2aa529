"""Server connections: connect and log in to PostgreSQL, then a reader per
connection (net/server_reader.py) that forwards the server's bytes to the
linked client.

Theory of operation. A server connection is written to by exactly one party at
a time: the linked client's greenlet (forwarding queries), or whoever holds it
unlinked (the pooler's own SET / reset / check queries). It is read only by its
own reader, for its whole life, so a server that dies while idle is noticed at
once: a libev read callback in the hub in the common case, a greenlet whenever
that might block. The reader walks message headers over each received chunk and
decodes only what the pooler must see: ReadyForQuery (transaction state and the
count of answered requests), ParameterStatus (tracked parameters), COPY starts,
and FATAL errors. Everything is forwarded with one write per chunk. After
forwarding, if the last ReadyForQuery said idle and nothing is outstanding, the
server goes back to its pool (transaction and statement modes).

The linked client is the replies' consumer: the reader needs of it only
``send(bytes)``, ``on_client_write_failed()``, ``on_server_idle(server)`` and
``on_server_lost(server, reason)``, so a merger that reads several servers for
one client (sharding) can stand in its place (``direct`` False: its replies
are never written from the hub).

This module holds the connection, its close, and the one definition of
"between requests". The reader is net/server_reader.py; login and the
pooler's own queries are in net/server_login.py and net/internal.py; what the
tracker found in a chunk, applied to the connection and its client, in
net/tracker_news.py; what a server says that nobody asked for (an error after
the last ReadyForQuery, bytes while unlinked) and the reports of host trouble
in net/server_trouble.py.
"""

from __future__ import annotations

from time import monotonic

import gevent
from gevent.lock import Semaphore

from ..pool.prepared import Tracker
from ..proto import messages as m
from ..proto.scan import ServerScanner
from . import internal, server_login, tls
from .fastio import plain
from .internal import InternalQuery, ServerError  # noqa: F401 - re-exported
from .server_login import send_cancel  # noqa: F401 - re-exported
from .server_trouble import report_trouble, unexpected

_S, _E, _G, _H, _W = (ord(c) for c in "SEGHW")


_next_id = 0


class ServerConnection:
    __slots__ = ("client", "close_reason", "closed", "created_at", "cancelling", "dirty", "host", "id",
                 "idle_since", "in_copy", "internal", "key", "last_activity", "linked_at", "local_addr",
                 "outstanding", "params", "pid", "pool", "port", "reader", "request_started", "scanner",
                 "send", "session_sets", "sock", "stale", "tparams", "to_boundary", "tracker",
                 "tx_status", "unsynced", "watch", "wlock", "xact_started", "__weakref__")

    def __init__(self, pool, host: str, port: int):
        global _next_id
        _next_id += 1
        self.id = _next_id
        self.pool = pool
        self.host = host
        self.port = port
        self.sock = None
        self.client = None
        self.tx_status = b"I"
        self.outstanding = 0          # ReadyForQuery messages owed to the client
        self.unsynced = False         # extended-protocol messages sent without Sync yet
        self.in_copy = False
        self.params: dict[str, str] = {}     # every ParameterStatus seen
        self.tparams: dict[str, str] = {}    # the tracked subset, compared with clients'
        self.pid = 0
        self.key = 0
        self.created_at = monotonic()
        self.idle_since = self.created_at
        self.linked_at = 0.0
        self.request_started = 0.0    # when outstanding went from 0 to 1
        self.xact_started = 0.0       # when the current transaction's first request went out
        self.last_activity = self.created_at
        self.internal: InternalQuery | None = None
        self.closed = False
        self.close_reason = ""
        self.dirty = False            # must not go back to the pool
        self.local_addr = ("", 0)
        self.reader = None            # a greenlet, while the hub may not read (net/server_reader.py)
        self.watch = None             # the libev read watcher of a plain socket
        self.wlock = Semaphore()      # held by a write to the server that did not complete at once
        self.cancelling = False
        self.stale = False            # config changed: close instead of reusing
        self.to_boundary = False      # the client is being closed: end the message under way, stop
        # Transaction/statement pooling renames prepared statements (pool/prepared.py).
        self.tracker = Tracker(pool.registry, pool.max_prepared, pool.parsed) if pool.tracking else None
        self.session_sets: dict[str, str] = {}   # SETs replayed here (pool/session_state.py)
        self.scanner: ServerScanner | None = None  # set by the reader (proto/server_scan.py)

    def __repr__(self) -> str:
        return f"S-{self.id:#x}"

    # --- login and the pooler's own queries (net/server_login.py, net/internal.py) ---
    def connect(self, startup: dict[str, str], password, scram_keys, timeout: float,
                tracked: frozenset, tls=None, tcp=None) -> None:
        server_login.connect(self, startup, password, scram_keys, timeout, tracked, tls, tcp)

    def run_internal(self, payload: bytes, replies: int = 1, timeout: float | None = None) -> InternalQuery:
        return internal.run_internal(self, payload, replies, timeout)

    def query(self, sql: str, timeout: float | None = None) -> list[list[str | None]]:
        return internal.query(self, sql, timeout)

    def describe(self) -> str:
        return f"{self.pool.db.name}/{self.pool.user}@{self.host}:{self.port}"

    def lifetime_limit(self, lifetime: float) -> float:
        return self.pool.db.server_lifetime or lifetime

    def _watched(self, mtype: int, data: bytes, start: int, end: int) -> None:
        """Decode a ParameterStatus, CopyIn/Out/Both or ErrorResponse (the
        reader loop handles ReadyForQuery itself)."""
        if mtype == _S:
            name, value = m.parse_parameter_status(data[start:end])
            self.params[name] = value
            client = self.client
            if client is not None and name in client.tparams:
                self.tparams[name] = value
                client.tparams[name] = value
            elif name in self.tparams:
                self.tparams[name] = value
            return
        if mtype in (_G, _H, _W):
            self.in_copy = True
            if mtype == _G and self.tracker is not None:
                self.tracker.copy_in = self.tracker.irregular = True   # it swallows Syncs
            return
        if mtype == _E:
            fields = m.parse_error_fields(data[start:end])
            if fields.get("S") in ("FATAL", "PANIC"):
                self.dirty = True
                self.close_reason = f"server error: {fields.get('M', '')}"
            report_trouble(self, fields.get("M", ""), fields.get("C"))

    def _forward(self, data) -> None:
        client = self.client
        if client is None:
            unexpected(self, data)
            return
        try:
            client.send(data)
        except OSError:
            # The client went away mid-response: this server cannot be reused, unless
            # what was lost ended its answer to everything asked (or it serves another
            # client already): then its stream is at a boundary, nothing owed.
            if self.client is client and not self.answered():
                self.dirty = True
            client.on_client_write_failed()
        else:
            self.pool.stats.bytes_sent += len(data)

    # --- the one definition of "between requests / transactions" -----------------
    def answered(self) -> bool:
        """Every request sent has been answered: nothing owed, nothing unsynced,
        no COPY, no reply half-read, nothing queued for the tracker."""
        scanner = self.scanner
        return (self.outstanding <= 0 and not self.unsynced and not self.in_copy
                and not (scanner is not None and (scanner.skip or scanner.held))
                and not (self.tracker is not None and self.tracker.pending))

    def reusable(self) -> bool:
        """May another client use this server now? Answered, outside any
        transaction, and neither broken nor doomed."""
        return (self.tx_status == b"I" and not self.dirty and not self.closed and self.answered()
                and not (self.tracker is not None and self.tracker.doubtful))   # net/copy_fence.py

    def _maybe_release(self) -> None:
        client = self.client
        if client is not None and self.answered():
            client.on_server_idle(self)

    def _lost(self, reason: str) -> None:
        if self.closed:
            return
        client = self.client
        self.close(reason, from_reader=True)
        report_trouble(self, reason, None)
        if client is not None:
            client.on_server_lost(self, reason)
        elif self.internal is not None:
            self.internal.result.set_exception(ServerError("08006", reason))

    def close(self, reason: str, from_reader: bool = False) -> None:
        """Close the connection and take it out of its pool. Never blocks nor
        switches: it runs in the hub too (a read callback releasing a server
        past its lifetime or in a transaction in statement mode, an idle
        server's stray bytes, the shutdown that the last released server
        ends), and gevent's own ``close`` only cancels the waits on the
        socket (their greenlets see EBADF)."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self.pool.server_closed(self, reason)
        if self.watch is not None:
            self.watch.stop()         # before the close: libev must not watch a closed descriptor
        sock = self.sock
        if sock is not None:
            if not self.dirty and self.client is None and not self.wlock.locked():
                _say_terminate(sock)
            sock.close()
        if self.reader is not None and not from_reader and gevent.getcurrent() is not self.reader:
            self.reader.kill(block=False)
        if self.internal is not None and not self.internal.result.ready():
            self.internal.result.set_exception(ServerError("08006", reason))


def _say_terminate(sock) -> None:
    """The Terminate message, as PgBouncer sends it: one non-blocking try,
    its result ignored (PostgreSQL takes the EOF that follows as well).
    gevent's ``sendall`` would wait when the socket's buffer is full (the
    backend not reading): in the hub that raises (no switch from the hub)
    and the close would stop half-way, its descriptor never closed;
    elsewhere it would block the closer (the janitor, the console) for as
    long as PostgreSQL does not read, or fail at once when another greenlet
    already waits to write there. Not sent while a write is under way (the
    write lock held): it would land inside that message."""
    try:
        if plain(sock):
            sock._sock.send(m.TERMINATE)
        else:
            tls.send_now(sock, m.TERMINATE)
    except OSError:          # BlockingIOError, a TLS record that did not go, a broken connection
        pass
