"""PAUSE, RESUME, SUSPEND and the three shutdowns, as PgBouncer does them, and
the pidfile that says the process runs. Owned by the Bouncer (app.py).

The state stays on the Bouncer (``paused``, ``paused_dbs``, ``suspended``,
``resumed``, ``shutting_down``, ``stopped``): clients, the janitor, the console
and the signal handlers read it there. This object only moves it; the console
(admin/control.py) and the signals (signals.py) call it.
"""

from __future__ import annotations

import gevent

from . import pidfile
from .net import last_words


class Lifecycle:
    __slots__ = ("_last_words", "app")

    def __init__(self, app):
        self.app = app   # the Bouncer: run state, pools, clients, listeners, signals
        self._last_words = None    # a shutdown waiting for clients' last words

    # --- pause / resume / suspend -------------------------------------------------
    def pause(self, dbname: str | None = None) -> None:
        """PAUSE (every pool) or PAUSE db: no new server assignments until RESUME."""
        app = self.app
        if dbname is None:
            app.paused = True
        else:
            app.paused_dbs.add(dbname)
        self.sync_pool_pauses()
        app.resumed.clear()

    def sync_pool_pauses(self) -> None:
        """A pool is paused by PAUSE (or SUSPEND) or by PAUSE/KILL of its
        database: it then hands no released server to its waiters."""
        app = self.app
        for pool in app.pools.values():
            pool.paused = app.paused or pool.db.name in app.paused_dbs

    def resume(self, dbname: str | None = None) -> None:
        """RESUME (the global pause) or RESUME db (that database's own pause)."""
        app = self.app
        if dbname is None:
            app.paused = False
            self._resume_listeners()
        else:
            app.paused_dbs.discard(dbname)
        self.sync_pool_pauses()
        for pool in list(app.pools.values()):
            pool.hand_idle_to_waiters()
        # wake every waiter; each re-checks its own pool
        app.resumed.set()
        if app.paused or app.paused_dbs:
            app.resumed.clear()

    def resume_all(self) -> None:
        """RESUME after PAUSE or SUSPEND, or a cancel request while one waits."""
        self.app.suspended = False
        self.resume(None)

    def pause_done(self, dbname: str | None = None) -> bool:
        return all(not p.active for p in self.app.pools.values() if dbname is None or p.db.name == dbname)

    def suspend(self) -> None:
        """SUSPEND: stop accepting (connections queue in the backlog) and hand out
        no server; requests already sent are let through (see suspend_flushed)."""
        app = self.app
        app.suspended = True
        app.paused = True
        self.sync_pool_pauses()
        app.resumed.clear()
        for server in app.listeners.servers:
            server.stop_accepting()

    def suspend_flushed(self) -> bool:
        return not any(s.outstanding > 0 for p in self.app.pools.values() for s in list(p.active))

    def suspend_close_busy(self) -> None:
        """suspend_timeout ran out: close what still holds data, as PgBouncer does,
        its client with PgBouncer's FATAL (08P01 "suspend_timeout"). A reply may be
        half written to a client that reads slowly: the server then stays until
        that message has ended (net/last_words.py), as closing it at once would
        cut the message and leave the client only EOF; PgBouncer writes the error
        into the message instead. SUSPEND waits for these closes (wait_pending)."""
        for pool in self.app.pools.values():
            for server in list(pool.active):
                if server.outstanding > 0:
                    client = server.client
                    if client is not None and not client.closing:
                        client.shutdown("08P01", "suspend_timeout", server_reason="suspend_timeout")
                    else:
                        server.close("suspend_timeout")

    def _resume_listeners(self) -> None:
        if not self.app.shutting_down:
            for server in self.app.listeners.servers:
                server.start_accepting()

    # --- shutdown -------------------------------------------------------------------
    def shutdown_safe(self) -> None:
        """SIGINT: stop accepting, wait for servers to be released, then exit."""
        app = self.app
        if app.shutting_down:
            return self.shutdown_now()
        app.shutting_down = "safe"
        app.listeners.stop()
        self.pause()
        app.signals.watch_shutdown()
        self.check_shutdown()

    def shutdown_wait_clients(self) -> None:
        """SIGTERM: stop accepting, exit when the last client has gone."""
        app = self.app
        if app.shutting_down:
            return self.shutdown_now()
        app.shutting_down = "wait_for_clients"
        app.listeners.stop()
        gevent.sleep(0)     # connections accepted last register as clients first
        app.signals.watch_shutdown()
        self.check_shutdown()

    def check_shutdown(self) -> None:
        """A graceful shutdown ends once what it waits for is gone: called when a
        client leaves and when a server goes back to its pool."""
        app = self.app
        if app.shutting_down == "safe" and all(not p.active for p in app.pools.values()) or app.shutting_down == "wait_for_clients" and not app.clients:
            self.shutdown_now()

    def shutdown_now(self, reason: str = "pgbouncer is shutting down") -> None:
        """Close every client and server and stop. A client closed in the
        middle of a result gets its FATAL once the message under way has ended
        (net/last_words.py): its server is left to that, and the process waits
        for those last words (LAST_WORDS_TIMEOUT at most). Called again while
        it waits (a second signal), it stops at once."""
        app = self.app
        if self._last_words is not None:
            app.stopped.set()
            return
        app.shutting_down = app.shutting_down or "now"
        app.listeners.stop()
        for client in list(app.clients):
            client.shutdown("57P01", reason)
        self._close_servers()
        if last_words.pending():
            self._last_words = gevent.spawn(self._stop_after_last_words)
        else:
            app.stopped.set()

    def _close_servers(self, all_of_them: bool = False) -> None:
        for pool in self.app.pools.values():
            for server in list(pool.idle) + list(pool.active):
                if all_of_them or not last_words.owes_last_words(server):
                    server.close("shutdown")

    def _stop_after_last_words(self) -> None:
        try:
            last_words.wait_pending(last_words.LAST_WORDS_TIMEOUT + 1)
            self._close_servers(all_of_them=True)
        finally:
            self.app.stopped.set()

    # --- pidfile (geobouncer/pidfile.py) ---------------------------------------------
    def _pidfile(self) -> str | None:
        path = self.app.settings.pidfile
        return self.app.cfg.resolve_path(path) if path else None

    def check_pidfile(self) -> None:
        pidfile.check(self._pidfile())

    def write_pidfile(self) -> None:
        pidfile.write(self._pidfile())

    def remove_pidfile(self) -> None:
        pidfile.remove(self._pidfile())
