"""The janitor: once a second, PgBouncer's timeouts and pool upkeep
(server_idle_timeout, server_lifetime, min_pool_size, waiters, client timeouts,
cluster node rechecks, parking idle clients). Owned by the Bouncer (app.py)."""

from __future__ import annotations

import ctypes
import logging
import weakref
from time import monotonic

import gevent

from .net.checkout import ClientError
from .pool.pool import Pool
from .pool.states import CL_WAITING
from .proto import messages as m

log = logging.getLogger("geobouncer")

PARK_AFTER = 1.0   # seconds idle before an idle client gives up its greenlet
TRIM_AFTER_PARKING = 64   # parked at once: give the freed stacks back to the OS


def _trim_heap() -> None:
    """malloc_trim(0): glibc keeps freed memory mapped, so after a burst of
    logins the stacks of parked greenlets would stay in RSS for good."""
    if _libc is not None:
        _libc.malloc_trim(0)


try:
    _libc = ctypes.CDLL("libc.so.6")
    _libc.malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):   # not glibc
    _libc = None


# query_wait_notify: the clients told they wait, by the wait_started of that wait.
_wait_notified: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WAIT_NOTICE = m.notice_response("No server connection available in postgres backend, client being queued")


def _notify_waiting(client) -> None:
    """PgBouncer's notice to a client queued for query_wait_notify seconds. Its
    own greenlet: a client that does not read may block the write, never the
    janitor. Nothing else writes to a client that has no server."""
    try:
        client.send(_WAIT_NOTICE)
    except (OSError, ValueError):
        pass        # gone: its own greenlet sees that


class Janitor:
    __slots__ = ("app",)

    def __init__(self, app):
        self.app = app   # the Bouncer: settings, pools, clients, shutdown state

    def run(self) -> None:
        while not self.app.stopped.is_set():
            gevent.sleep(1.0)
            try:
                self.sweep(monotonic())
            except Exception:
                log.exception("janitor pass failed")

    def sweep(self, now: float) -> None:
        s = self.app.settings
        for pool in list(self.app.pools.values()):
            for server in pool.idle_servers_to_close(now, s.server_idle_timeout, s.server_lifetime):
                idle_too_long = s.server_idle_timeout > 0 and now - server.idle_since > s.server_idle_timeout
                server.close("server idle timeout" if idle_too_long else "server lifetime over")
            if s.server_fast_close and pool.active and pool.limits.pool_mode == "session":
                self.fast_close(pool)
            if pool.waiters and pool.may_open(True):
                pool.wake_one_waiter()
            want = min(pool.limits.min_pool_size, pool.limits.pool_size)
            # As PgBouncer: only while a client uses the pool, or the entry forces a user.
            wanted = pool.clients or pool.db.user
            if want and wanted and pool.server_count() < want and not pool.paused and not self.app.paused:
                if pool.last_login_error is None or now - pool.last_login_error[0] > s.server_login_retry:
                    gevent.spawn(self.fill_pool, pool)
        if (s.autodb_idle_timeout > 0 and "*" in self.app.cfg.databases) or s.pool_idle_timeout > 0:
            self.free_unused_pools(now, s.autodb_idle_timeout, s.pool_idle_timeout)
        hub = gevent.get_hub()
        parked = 0
        for client in list(self.app.clients):
            self.check_client_timeouts(client, now, s)
            # Idle a while with no server: park it (its greenlet ends; see net/client.py).
            if client.parkable and now - client.request_time > PARK_AFTER:
                client.park_if_idle(hub)
                parked += 1
        if parked >= TRIM_AFTER_PARKING:
            gevent.spawn_later(0.1, _trim_heap)   # once the parked greenlets have ended
        for cluster in self.app.clusters.values():
            cluster.maintain()

    @staticmethod
    def fast_close(pool: Pool) -> None:
        """server_fast_close: a linked server marked for reconnect (RECONNECT, a
        RELOAD that changed its connection settings) that is between
        transactions is closed now, not at its session's end, and its client
        with it, as PgBouncer does (session pooling: the other modes release
        such servers at each transaction's end anyway)."""
        for server in list(pool.active):
            client = server.client
            if server.stale and client is not None and not client.closing and server.reusable():
                client.shutdown("08P01", "database configuration changed",
                                server_reason="database configuration changed")

    def free_unused_pools(self, now: float, autodb_timeout: float, pool_timeout: float) -> None:
        """autodb_idle_timeout: a pool made from the ``*`` entry that has had
        no client and no busy server this long is freed, idle servers and
        statistics with it, as PgBouncer frees its automatic databases (so
        clients naming ever new databases cannot grow the pooler for good).
        pool_idle_timeout: any pool with no client and no server connection
        at all this long. Pools of switchover clusters and replica sets stay."""
        app = self.app
        for key, pool in list(app.pools.items()):
            name = pool.db.name
            if name in app.extra_entries or pool.cluster is not None:
                continue
            auto = autodb_timeout > 0 and name not in app.cfg.databases
            if pool.clients or pool.active or pool.connecting or pool.waiters or (pool.idle and not auto):
                pool.unused_since = None
                continue
            if pool.unused_since is None:
                pool.unused_since = now
                continue
            limit = autodb_timeout if auto else pool_timeout
            if limit > 0 and now - pool.unused_since >= limit:
                for server in list(pool.idle):
                    server.close("unused automatic database")
                del app.pools[key]
                log.info("freeing unused %s %s/%s", "automatic database" if auto else "pool", name, pool.user)

    def fill_pool(self, pool: Pool, want: int | None = None) -> None:
        from .net.checkout import open_server
        want = min(pool.limits.min_pool_size, pool.limits.pool_size) if want is None else want
        if pool.server_count() >= want or not pool.may_open(False):
            return
        try:
            server = open_server(self.app, pool)
        except ClientError:
            return
        self.app.releaser.release_idle(server)

    @staticmethod
    def _check_sharded(client, session, now: float, s) -> None:
        """The same timeouts for a client linked to several shards' servers."""
        servers = session.linked_servers()
        busy = [server for server in servers if server.outstanding > 0]
        if busy:
            if s.query_timeout > 0 and any(now - sv.request_started > s.query_timeout for sv in busy):
                for server in servers:
                    server.close("query timeout")
                client.shutdown("08P01", "query timeout")
        elif session.status != b"I":
            if s.idle_transaction_timeout > 0 and now - client.request_time > s.idle_transaction_timeout:
                for server in servers:
                    server.close("idle transaction timeout")
                client.shutdown("25P03", "idle transaction timeout")
        elif s.client_idle_timeout > 0 and now - client.request_time > s.client_idle_timeout:
            client.shutdown("08P01", "client_idle_timeout")

    def check_client_timeouts(self, client, now: float, s) -> None:
        if client.closing or client.state == "login":
            return
        if client.shard_session is not None:
            self._check_sharded(client, client.shard_session, now, s)
            return
        server = client.server
        if server is None:
            if s.query_wait_notify > 0 and client.state == CL_WAITING \
                    and now - client.wait_started > s.query_wait_notify \
                    and _wait_notified.get(client) != client.wait_started:
                _wait_notified[client] = client.wait_started     # once per wait
                gevent.spawn(_notify_waiting, client)
            queued = client.queued
            if queued is not None:
                # A Query queued while its greenlet reads the client (net/handoff.py);
                # one whose greenlet waits for it keeps its own deadline.
                if s.query_wait_timeout > 0 and now - client.wait_started > s.query_wait_timeout \
                        and not queued.done and not queued.blocked:
                    client.shutdown("08P01", "query_wait_timeout")
                return
            if client.deferred_begin is not None and s.idle_transaction_timeout > 0 \
                    and now - client.request_time > s.idle_transaction_timeout:
                client.shutdown("25P03", "idle transaction timeout")   # a BEGIN answered here
                return
            if s.client_idle_timeout > 0 and now - client.request_time > s.client_idle_timeout and client.state == "active":
                client.shutdown("08P01", "client_idle_timeout")
            return
        # The server is closed once a message under way has gone out whole (net/last_words.py).
        if s.transaction_timeout > 0 and server.tx_status != b"I" \
                and now - server.xact_started > s.transaction_timeout:
            client.shutdown("08P01", "transaction timeout", server_reason="transaction timeout")
        elif server.outstanding > 0:
            if s.query_timeout > 0 and now - server.request_started > s.query_timeout:
                client.shutdown("08P01", "query timeout", server_reason="query timeout")
        elif server.tx_status != b"I":
            # Through the close at a message boundary too: the last reply may still
            # be on its way to a slow client (it was read whole from the server).
            if s.idle_transaction_timeout > 0 and now - server.last_activity > s.idle_transaction_timeout:
                client.shutdown("25P03", "idle transaction timeout", server_reason="idle transaction timeout")
        elif s.client_idle_timeout > 0 and now - client.request_time > s.client_idle_timeout:
            client.shutdown("08P01", "client_idle_timeout")
