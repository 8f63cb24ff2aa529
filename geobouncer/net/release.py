"""Giving servers back: after a transaction, after a session (reset query
first), on eviction, lifetime and reconnects. Owned by the Bouncer (app.py)."""

from __future__ import annotations

import logging
from time import monotonic

import gevent

from ..pool.pool import CLOSE, PARK, RESET, Pool
from .server import ServerError

log = logging.getLogger("geobouncer")


class ServerReleaser:
    __slots__ = ("app",)

    def __init__(self, app):
        self.app = app   # the Bouncer: settings, pools, clients, shutdown state

    def release_active(self, server, linked_at: float) -> None:
        """Transaction/statement mode: the reader saw the client's work end.
        The pool decides (Pool.checkin); this carries the decision out."""
        if server.closed:
            return
        s = self.app.settings
        decision, _ = server.pool.checkin(server, monotonic(), s.server_lifetime,
                                          s.server_reset_query_always and s.server_reset_query)
        if decision is CLOSE:
            server.close(server.close_reason or ("dirty" if server.dirty else "database configuration changed"
                                                 if server.stale else "server lifetime over"))
        elif decision is RESET:
            gevent.spawn(self._reset_and_release, server)
        elif decision is PARK and self.app.shutting_down:
            self.app.lifecycle.check_shutdown()

    def evict_idle_for(self, pool: Pool) -> bool:
        """max_db_connections / max_user_connections are full but ``pool`` has
        room of its own: close the oldest idle server of another pool of the same
        database (or user), as PgBouncer does. True if one was closed."""
        limits = pool.limits
        db_full = limits.max_db_connections and \
            self.app.counters.per_db.get(pool.db.name, 0) >= limits.max_db_connections
        user_full = limits.max_user_connections and \
            self.app.counters.per_user.get(pool.user, 0) >= limits.max_user_connections
        if not db_full and not user_full:
            return False
        victim = None
        for other in self.app.pools.values():
            if other is pool or not other.idle:
                continue
            if (db_full and other.db.name == pool.db.name) or (user_full and other.user == pool.user):
                candidate = other.idle[0]          # least recently used of that pool
                if victim is None or candidate.idle_since < victim.idle_since:
                    victim = candidate
        if victim is None:
            return False
        victim.close("evicted to make room for another pool (max_db_connections)" if db_full
                     else "evicted to make room for another pool (max_user_connections)")
        return True

    def release_idle(self, server) -> None:
        if not server.closed:
            server.pool.release(server)

    def release_after_client(self, server, pool) -> None:
        """A client left with a clean server (session mode): reset, then pool it."""
        if server.closed:
            return          # lost, or closed from outside, before this greenlet ran: never pooled
        if server.stale or self._too_old(server):
            server.close("server lifetime over" if not server.stale else "database configuration changed")
            return
        if pool.mode == "session" or self.app.settings.server_reset_query_always:
            self._reset_and_release(server)
        else:
            pool.release(server)

    def _reset_and_release(self, server) -> None:
        query = self.app.settings.server_reset_query
        if query:
            try:
                server.query(query, timeout=self.app.settings.server_connect_timeout or None)
            except ServerError as exc:
                server.close(f"server_reset_query failed: {exc.text}")
                return
            # DISCARD ALL drops prepared statements and SETs: forget what we knew.
            server.session_sets.clear()
            if server.tracker is not None:
                server.tracker.reset()
        if server.tx_status != b"I":
            server.close("server_reset_query left a transaction open")
            return
        if server.stale:      # a RELOAD or RECONNECT came while the reset query ran
            server.close("database configuration changed")
            return
        if not server.closed:
            server.pool.release(server)
        if self.app.shutting_down:
            self.app.lifecycle.check_shutdown()

    def _too_old(self, server) -> bool:
        lifetime = server.lifetime_limit(self.app.settings.server_lifetime)
        return lifetime > 0 and monotonic() - server.created_at > lifetime

    def reconnect_pool(self, pool: Pool) -> None:
        """Close idle servers now and active ones when released (RECONNECT, reload)."""
        for server in list(pool.idle):
            server.close("database configuration changed")
        for server in pool.active:
            server.stale = True
