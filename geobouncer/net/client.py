"""One greenlet per client: startup, authentication, then the forwarding loop.

The client greenlet reads the client's socket and writes to the linked server;
the server's reader writes the replies to the client's socket (see
net/server_reader.py: from the hub, or from a greenlet holding ``wlock``).
While linked, only that reader writes to the client; while not linked, only
this greenlet does (or, parked, its socket's read callback: net/inline.py). Requests are counted on the way out (Query,
Sync, FunctionCall each owe one ReadyForQuery) so the reader knows when the
server has answered everything and may go back to the pool.
"""

from __future__ import annotations

import logging
from time import monotonic

import gevent
from gevent.lock import Semaphore

from ..pool.prepared import QUERY, SYNC
from ..pool.states import CL_ACTIVE, CL_LOGIN, CL_WAITING
from ..proto import messages as m
from ..proto.framing import ProtocolError
from ..proto.scan import ClientScanner
from . import copy_fence, forward, inline, last_words, login, stream, tls
from . import params as tracked_params
from .checkout import ClientError, acquire_server
from .unlinked import LOST as _LOST
from .fastio import Parked, sender
from .fastio import plain as _plain_socket
from .handoff import drop_queued
from .login import ClientGone
from .server import ServerError

log = logging.getLogger("geobouncer")

_SYNC, _QUERY = SYNC, QUERY

__all__ = ["ClientConnection", "ClientGone"]


class ClientConnection:
    # Per-connection state in slots: thousands of idle clients are the common case.
    direct = True      # a server's reader may write replies to its socket from the hub (net/server_reader.py)
    __slots__ = ("addr", "admin", "app", "auth_result", "baseline", "bytes_out", "cancel_key", "closing",
                 "connect_time", "dbname", "deferred_begin", "greenlet", "held", "id", "inline", "lost_tx", "parkable", "pending",
                 "pending_error", "pool", "portal_change", "queued", "refused_routes", "request_time", "route_pool",
                 "rw_split", "scanner", "send", "server", "session_sets", "shard_session", "sock", "startup", "state",
                 "statements", "stats_only", "stmt_class", "stmt_routes", "stmt_sets", "tparams", "unix",
                 "unnamed_change", "user", "wait_started", "wlock", "__weakref__")

    def __init__(self, app, sock, addr, unix: bool):
        self.app = app
        self.sock = sock
        self.wlock = Semaphore()   # the reader's writes vs. locally answered replies
        self.send = sender(sock, self.wlock)
        self.addr = addr if not unix else ("unix", 0)
        self.unix = unix
        self.id = app.next_id()
        self.state = CL_LOGIN
        self.user = ""
        self.dbname = ""
        self.pool = None
        self.server = None
        self.admin = False
        self.tparams: dict[str, str] = {}
        self.startup: dict[str, str] = {}
        self.cancel_key = (0, 0)
        self.connect_time = monotonic()
        self.request_time = self.connect_time
        self.bytes_out = 0
        self.pending = b""
        self.closing = False
        self.greenlet = None
        self.wait_started = 0.0
        self.pending_error: tuple[str, str] | None = None   # e.g. max_client_conn, sent after startup
        self.statements: dict[bytes, tuple[int, bytes]] = {}  # own name -> (statement id, Parse tail)
        self.session_sets: dict[str, str] = {}   # remembered SETs (pool/session_state.py)
        self.baseline: dict[str, str] = {}       # tracked values as of login (RESET ALL / DISCARD ALL)
        self.stmt_sets: dict[bytes, tuple] = {}  # named statement -> the SET/RESET it runs
        self.unnamed_change = None   # the same for the unnamed statement
        self.portal_change = None    # and for the portal last bound
        self.route_pool = None     # where routing_rules sent this client (None: its database)
        self.held: dict = {}       # session pooling with routing: pool -> server kept for later
        self.refused_routes: set[str] = set()
        self.stmt_routes: dict[bytes, str] = {}   # named statement -> where its Parse was routed
        self.stmt_class: dict[bytes, str] = {}    # named statement -> read/write class (split)
        self.rw_split = False      # automatic read/write split for this client's database
        self.deferred_begin = None  # (Query bytes, class): a BEGIN answered here (net/defer_begin.py)
        self.lost_tx = False       # a switchover took our transaction: say so at the next request
        self.auth_result = None
        self.scanner: ClientScanner | None = None   # frontend boundaries (proto/scan.py), after login
        self.parkable = False      # blocked in the idle read: the janitor may park this client
        self.inline = False        # parked after a lone Query, served from the hub (net/inline.py)
        self.queued = None         # a Query waiting for a server (net/handoff.py, QueuedQuery)
        self.stats_only = False
        self.shard_session = None  # a sharded database's state (net/sharded.py)

    def __repr__(self) -> str:
        return f"C-{self.id:#x}"

    def label(self) -> str:
        host, port = self.addr[0], self.addr[1]
        return f"{self!r}: {self.dbname or '(nodb)'}/{self.user or '(nouser)'}@{host}:{port}"

    # --- life cycle ------------------------------------------------------------
    def run(self) -> None:
        self.greenlet = gevent.getcurrent()
        try:
            login_timeout = self.app.settings.client_login_timeout or None
            with gevent.Timeout(login_timeout, ClientError("08P01", "client_login_timeout")):
                if not login.login(self):
                    self._cleanup()
                    return
            if self.admin:
                self._guarded(self.app.admin.serve, self)
                return
            self.scanner = ClientScanner(self.app.max_packet_size, not self.app.settings.disable_pqexec)
            self.rw_split = bool(self.pool.db.read_write_split) and self.pool.mode != "session"
        except BaseException as exc:
            self._ended(exc)
            return
        self._guarded(self._serve_loop)

    def _serve_loop(self) -> None:
        if self.pool.db.shards:
            from . import sharded  # the sharding modules only for sharded databases
            sharded.serve(self)
        elif self.pool.tracking or self.app.hooks.enabled or self.rw_split or self.pool.cluster:
            forward.serve_transaction(self)
        else:
            stream.serve_session(self)

    def _guarded(self, fn, *args) -> None:
        """Run the client's loop; every way out but parking ends the client."""
        try:
            fn(*args)
        except Parked:
            self._park()
        except BaseException as exc:
            self._ended(exc)
        else:
            self._cleanup()

    def _ended(self, exc: BaseException) -> None:
        try:
            if isinstance(exc, ClientError):
                self._fail(exc.sqlstate, exc.text)
            elif isinstance(exc, ProtocolError):
                self._fail("08P01", str(exc))
            elif isinstance(exc, (ClientGone, OSError, gevent.GreenletExit)):
                pass
            elif isinstance(exc, Exception):
                log.error("%s internal error", self.label(), exc_info=exc)
                self.send_error("XX000", "geobouncer internal error", fatal=True)
                if self.server is not None:
                    self.server.dirty = True
            else:
                raise exc
        finally:
            self._cleanup()

    # --- parking: an idle client costs no greenlet ---------------------------------
    def _park(self) -> None:
        """Idle between transactions with no server: let the greenlet (~8 KB of
        stacks) end; the socket's read watcher resumes the client in a new one
        when bytes (or EOF) arrive. Anything that closes the client from
        outside shuts the socket down, which wakes the watcher too."""
        self.greenlet = None
        self.parkable = False
        event = self.sock._read_event
        if event is None:
            self._cleanup()
            return
        # A plain function with the client as its argument, not a bound method:
        # gevent's close() would take a bound method's __self__ for a greenlet
        # to throw into.
        event.start(_unpark, self)

    def resume(self) -> None:
        """A parked client's greenlet is needed (bytes came, or a hand-off,
        net/handoff.py): start one. At once in ``greenlet``, so nobody starts two."""
        event = self.sock._read_event
        if event is not None:
            event.stop()
        self.greenlet = gevent.spawn(self._resume)

    def _resume(self) -> None:
        self.greenlet = gevent.getcurrent()
        self._guarded(self._serve_loop)

    def park_if_idle(self, hub) -> None:
        """The janitor's request. The wait is cancelled only if the client is
        still blocked in that very read when the hub gets to it (gevent's
        cancel_wait checks), and only the idle read honours it (fastio)."""
        event = self.sock._read_event
        if self.parkable and self.server is None and event is not None:
            hub.cancel_wait(event, Parked())

    def _fail(self, sqlstate: str, text: str) -> None:
        if self.app.settings.log_pooler_errors:
            log.warning("%s pooler error: %s", self.label(), text)
        self.send_error(sqlstate, text, fatal=True)

    def send_error(self, sqlstate: str, text: str, fatal: bool = False) -> None:
        """An ErrorResponse from the pooler itself, never blocking the caller
        (the janitor, the console, shutdown) and never inside another message:
        skipped while a reply is being written or a server's message has been
        forwarded only in part, and dropped when the socket cannot take it
        now — the close that follows says enough then."""
        if self.wlock.locked():
            return
        server = self.server
        if server is not None and server.scanner is not None and server.scanner.skip:
            return
        data = m.error_response(sqlstate, text, "FATAL" if fatal else "ERROR")
        try:
            if _plain_socket(self.sock):
                self.sock._sock.send(data)       # non-blocking: all of it, or nothing useful
            elif fatal:
                tls.send_now(self.sock, data)    # the same for TLS: the close follows
            else:
                self.send(data)
        except OSError:
            pass

    def _cleanup(self) -> None:
        if self.queued is not None:
            drop_queued(self)
        for held in list(self.held.values()):
            self._drop_server(held)
        self.held.clear()
        server = self.server
        if server is not None:
            self.server = None
            self._drop_server(server)
        self.app.forget_client(self)
        if self.state != CL_LOGIN and self.app.settings.log_disconnections:
            age = monotonic() - self.connect_time
            log.info("%s closing because: client close request (age=%ds)", self.label(), age)
        try:
            self.sock.close()
        except OSError:
            pass

    def _drop_server(self, server) -> None:
        """The client is leaving: a clean server goes back (after the reset in
        session mode), anything else is closed."""
        server.client = None
        if server.reusable() and not self.mid_message():
            gevent.spawn(self.app.releaser.release_after_client, server, server.pool)
        else:
            server.close("client disconnect while server was not ready")

    def _read_message(self) -> tuple[int, bytes]:
        """One whole message outside the forwarding loops (authentication, console)."""
        return login.read_message(self)

    def mid_message(self) -> bool:
        """Has the server been sent part of a message whose rest is still to come?"""
        return self.scanner is not None and self.scanner.owed > 0

    def shutdown(self, sqlstate: str | None = None, text: str | None = None,
                 server_reason: str | None = None) -> None:
        """Close this client from another greenlet (janitor, admin KILL, lost server):
        the FATAL at a message boundary, then EOF (net/last_words.py)."""
        if self.closing:
            return
        self.closing = True
        if text and self.app.settings.log_pooler_errors:
            log.warning("%s closing because: %s", self.label(), text)
        last_words.shutdown(self, sqlstate, text, server_reason)
        if self.queued is not None:
            self.queued.cancel(ClientGone())     # its greenlet may wait for a server, not read

    # --- linking to a server -----------------------------------------------------
    def _link(self):
        pool = self.route_pool or self.pool
        try:
            server = acquire_server(self.app, pool, self)
        except ClientError:
            if not (self.rw_split and pool is not self.pool):
                raise
            # The replica failed (now banned): this read goes to the primary.
            self.route_pool = None
            server = acquire_server(self.app, self.pool, self)
        return self.attach(server)

    def attach(self, server, checked: bool = False):
        """Link ``server`` to this client, replaying tracked parameters and
        remembered SETs first when they differ (``checked``: they do not)."""
        if not checked and (server.tparams != self.tparams or server.session_sets != self.session_sets):
            try:
                tracked_params.sync(server, self.tparams, self.session_sets)
            except ServerError as exc:
                server.close(f"parameter sync failed: {exc.text}")
                raise ClientError(exc.sqlstate, exc.text) from None
        server.client = self
        server.linked_at = self.request_time
        server.pool.stats.server_assignment_count += 1
        self.server = server
        return server

    def _send(self, data, requests: int, synced) -> None:
        """Forward ``data`` to the linked server (linking one first), counting the
        requests it owes a ReadyForQuery for."""
        server = self.server
        if server is None:
            server = self._link()
        if requests:
            if server.outstanding <= 0:
                server.outstanding = requests
                server.request_started = self.request_time
                if server.tx_status == b"I":
                    server.xact_started = self.request_time
            else:
                server.outstanding += requests
        if synced is not None:
            server.unsynced = not synced
        server.pool.stats.bytes_received += len(data)
        try:
            server.send(data)
        except OSError:
            server.dirty = True
            raise ClientError("08P01", "server conn crashed?") from None

    # --- callbacks from the server's reader (net/server_reader.py) ----------------
    def on_server_idle(self, server) -> None:
        """The server answered everything; return it unless the mode keeps it."""
        if self.scanner.owed:
            return        # a large message is still streaming to it (net/stream.py)
        if server.tracker is not None and server.tracker.doubtful:    # a failed COPY: net/copy_fence.py
            return copy_fence.start(server)
        mode = self.pool.limits.pool_mode
        if server.tx_status != b"I":
            if mode == "statement":
                self.server = None
                server.client = None
                server.close("transaction blocks not allowed in statement pooling mode")
                self.shutdown("08P01", "transaction blocks not allowed in statement pooling mode")
            return
        if mode == "session":
            return
        self.server = None
        server.client = None
        self.app.releaser.release_active(server, self.request_time)

    def on_server_lost(self, server, reason: str) -> None:
        # A server that died inside a message (PostgreSQL terminated while
        # blocked sending a DataRow) cut the client's stream there: nothing
        # may follow, not even an error; only EOF (net/last_words.py).
        cut = server.scanner is not None and server.scanner.skip > 0
        if self.server is server:
            self.server = None
        else:
            self.held = {p: s for p, s in self.held.items() if s is not server}
        if cut:
            self.shutdown()
            return
        if server.pool.cluster is not None or server.pool.db.name in self.app.extra_entries:
            self._transaction_lost(server)
            return
        self.shutdown("08P01", "server conn crashed?")   # PgBouncer's code and text

    def _transaction_lost(self, server) -> None:
        """A switchover (or a lost replica) took the client's server: its
        transaction is gone, but the client stays and may retry. Answer what it
        is waiting for now, or the next thing it sends."""
        owed = server.outstanding if server.outstanding > 0 else 0
        if server.tracker is not None:
            owed = sum(1 for entry in server.tracker.pending if entry[0] in (_SYNC, _QUERY))
        if owed:
            try:
                self.send(_LOST + m.READY_IDLE * owed)
            except OSError:
                self.shutdown()
        elif server.tx_status != b"I" or server.unsynced:
            self.lost_tx = True

    def on_client_write_failed(self) -> None:
        self.shutdown()

    def set_waiting(self, waiting: bool) -> None:
        if waiting:
            self.state = CL_WAITING
            self.wait_started = monotonic()
        else:
            self.state = CL_ACTIVE
            if self.pool is not None:
                self.pool.stats.wait_time += int((monotonic() - self.wait_started) * 1e6)


def _unpark(client) -> None:
    """A parked client's read callback, in the hub: never blocks. A lone
    Query is served here when it can be (net/inline.py); anything else
    needs the client's greenlet."""
    if client.inline and inline.readable(client):
        return
    client.resume()
