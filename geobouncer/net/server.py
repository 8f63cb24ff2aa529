"""Server connections: connect and log in to PostgreSQL, then one reader
greenlet per connection that forwards the server's bytes to the linked client.

Theory of operation. A server connection is written to by exactly one party at
a time: the linked client's greenlet (forwarding queries), or whoever holds it
unlinked (the pooler's own SET / reset / check queries). It is read only by its
own reader greenlet, for its whole life, so a server that dies while idle is
noticed at once. The reader walks message headers over each received chunk and
decodes only what the pooler must see: ReadyForQuery (transaction state and the
count of answered requests), ParameterStatus (tracked parameters), COPY starts,
and FATAL errors. Everything is forwarded with one ``sendall`` per chunk. After
forwarding, if the last ReadyForQuery said idle and nothing is outstanding, the
server goes back to its pool (transaction and statement modes).

The linked client is the replies' consumer: the reader needs of it only
``send(bytes)``, ``on_client_write_failed()``, ``on_server_idle(server)`` and
``on_server_lost(server, reason)``, so a merger that reads several servers for
one client (sharding) can stand in its place.

This module holds the connection, its reader loop and close, and the one
definition of "between requests". Login and the pooler's own queries are in
net/server_login.py and net/internal.py; what the tracker found in a chunk,
applied to the connection and its client, in net/tracker_news.py; what a
server says that nobody asked for (an error after the last ReadyForQuery,
bytes while unlinked) and the reports of host trouble in net/server_trouble.py.
"""

from __future__ import annotations

from time import monotonic

import gevent

from ..pool.prepared import FAKE, Tracker
from ..pool.states import SV_LOGIN
from ..proto import messages as m
from ..proto.framing import ProtocolError
from ..proto.scan import REQUEST_REPLIES, SERVER_WATCH, ServerScanner
from .fastio import receiver
from . import internal, last_words, server_login
from .internal import InternalQuery, ServerError  # noqa: F401 - re-exported
from .server_login import send_cancel  # noqa: F401 - re-exported
from .server_trouble import error_after_ready, report_trouble, unexpected
from .tracker_news import settle, statements_dropped

RECV_SIZE = 65536
# Types the reader must decode in full; everything else streams through.
_Z, _S, _E, _G, _H, _W, _C = (ord(c) for c in "ZSEGHWC")
_WATCHED = SERVER_WATCH
# Replies that complete a request, or that the prepared-statement tracker must see.
# And notices: those of a Query the pooler injected are swallowed (pool/prepared.py).
_TRACKED = _WATCHED | REQUEST_REPLIES | frozenset(b"N")
# While the tracker needs no exact matching but there are statements a drop
# would take (this server's, the client's): CommandComplete too, for the tags
# that drop every prepared statement (DEALLOCATE ALL, DISCARD ALL; also run
# through a prepared statement, whose text the client's side does not see).
_LEAN = _WATCHED | frozenset((_C,))
_DROP_HEADS = (b"DEAL", b"DISC")


_next_id = 0


class ServerConnection:
    __slots__ = ("client", "close_reason", "closed", "created_at", "cancelling", "dirty", "host", "id",
                 "idle_since", "in_copy", "internal", "key", "last_activity", "linked_at", "local_addr",
                 "outstanding", "params", "pid", "pool", "port", "reader", "request_started", "scanner",
                 "send", "session_sets", "sock", "stale", "state", "tparams", "to_boundary", "tracker",
                 "tx_status", "unsynced", "xact_started", "__weakref__")

    def __init__(self, pool, host: str, port: int):
        global _next_id
        _next_id += 1
        self.id = _next_id
        self.pool = pool
        self.host = host
        self.port = port
        self.sock = None
        self.state = SV_LOGIN
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
        self.reader = None
        self.cancelling = False
        self.stale = False            # config changed: close instead of reusing
        self.to_boundary = False      # the client is being closed: end the message under way, stop
        # Transaction/statement pooling renames prepared statements (pool/prepared.py).
        self.tracker = Tracker(pool.registry, pool.max_prepared, pool.parsed) if pool.tracking else None
        self.session_sets: dict[str, str] = {}   # SETs replayed here (pool/session_state.py)
        self.scanner: ServerScanner | None = None  # set by the reader (proto/scan.py)

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

    # --- the reader greenlet ---------------------------------------------------
    def _read_loop(self) -> None:
        """Forward what the server sends. The boundaries come from the scanner
        (proto/scan.py). With a prepared-statement tracker (transaction and
        statement pooling) the replies that close requests are matched to
        them, so replies to injected messages are dropped and locally
        answered ones inserted. While nothing queued needs that (the common
        case: plain queries, unnamed statements; ``tracker.exact`` False)
        only ReadyForQuery, parameter changes, errors and COPY starts are
        looked at, and the tags that drop every statement while there are
        statements to drop."""
        recv = receiver(self.sock, RECV_SIZE)
        tracker = self.tracker
        server_message = tracker.server_message if tracker is not None else None
        pending = tracker.pending if tracker is not None else None
        ready = tracker.ready if tracker is not None else None
        scanner = self.scanner = ServerScanner(_WATCHED)
        feed = scanner.feed
        watched = self._watched
        forward = self._forward
        stats = self.pool.stats
        exact = False
        try:
            while True:
                data = recv()
                if not data:
                    self._lost("server closed the connection unexpectedly")
                    return
                if self.internal is not None:
                    internal.internal_data(self, data)
                    continue
                if self.to_boundary:
                    if last_words.forward_rest(self, data):
                        continue
                    return
                if tracker is not None:
                    exact = tracker.exact
                    client = self.client
                    scanner.watch = _TRACKED if exact else _LEAN if tracker.prepared.lru or (
                        client is not None and client.statements) else _WATCHED
                data, end, found = feed(data)
                out = None          # pieces, once a reply is dropped or one inserted
                cut = None          # an error nobody asked for: what comes before it is forwarded
                for mtype, start, stop in found:
                    if mtype == _Z:
                        self.outstanding -= 1
                        status = self.tx_status = data[start + 5:start + 6]
                        self.in_copy = False
                        now = monotonic()
                        stats.query_count += 1
                        stats.query_time += int((now - self.request_started) * 1e6)
                        self.request_started = now      # the next pipelined request starts here
                        self.last_activity = now
                        if status == b"I":
                            stats.xact_count += 1
                            stats.xact_time += int((now - self.xact_started) * 1e6)
                            self.xact_started = now
                        if not exact:
                            if pending:
                                ready(status)
                            continue
                    elif mtype == _C:
                        if not exact and data[start + 5:start + 9] not in _DROP_HEADS:
                            continue
                    elif mtype in _WATCHED:
                        if mtype == _E and self.outstanding <= 0 and tracker is not None \
                                and self.tx_status == b"I" and not self.unsynced and self.client is not None:
                            cut = start
                            error_after_ready(self, data[start + 5:stop])
                            break
                        watched(mtype, data, start + 5, stop)
                    if pending:
                        keep, fakes = server_message(mtype, data[start + 5:stop])
                        if fakes or not keep:
                            if out is None:
                                out = []
                                run = 0
                            out.append(data[run:stop if keep else start])
                            if fakes:
                                out.append(fakes)
                            run = stop
                if cut is not None:
                    end = cut
                if out is not None:
                    out.append(data[run:end])
                    chunk = b"".join(out)
                else:
                    chunk = data if end == len(data) else data[:end]
                if tracker is not None:
                    if tracker.dropped_all:
                        statements_dropped(self)
                    if tracker.settle:
                        settle(self)
                    if exact and pending and pending[0][0] == FAKE and self.client is not None:
                        chunk += tracker.first_fakes()
                if chunk:
                    forward(chunk)
                if scanner.ready and self.outstanding <= 0:
                    client = self.client
                    if client is not None and self.answered():
                        client.on_server_idle(self)
        except (OSError, ProtocolError) as exc:
            self._lost(f"server connection failed: {exc}")
        except gevent.GreenletExit:
            pass

    def pool_limit(self) -> int:
        return 1 << 26

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
            # The client went away mid-response: this server cannot be reused.
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
        return (self.tx_status == b"I" and not self.dirty and not self.closed and self.answered())

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
        """Close the connection and take it out of its pool."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self.pool.server_closed(self, reason)
        if self.sock is not None:
            try:
                if not self.dirty and self.client is None:
                    self.sock.sendall(m.TERMINATE)
            except OSError:
                pass
            self.sock.close()
        if self.reader is not None and not from_reader and gevent.getcurrent() is not self.reader:
            self.reader.kill(block=False)
        if self.internal is not None and not self.internal.result.ready():
            self.internal.result.set_exception(ServerError("08006", reason))
