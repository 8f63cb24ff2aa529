"""Signals, as PgBouncer handles them, queued and dispatched by one greenlet.

SIGHUP      re-read the config (RELOAD)
SIGTERM     SHUTDOWN WAIT_FOR_CLIENTS; a second one exits at once
SIGINT      SHUTDOWN WAIT_FOR_SERVERS; a second one exits at once
SIGQUIT     exit at once
SIGUSR1     PAUSE
SIGUSR2     RESUME (from PAUSE or SUSPEND)

The log lines are PgBouncer's. The handlers only queue the signal (gunicorn's
pattern): the hub never runs a reload or a shutdown itself.

A background job of a non-interactive shell starts with SIGINT and SIGQUIT
ignored; an ignored signal is discarded before any handler could see it, so
those are reset to their default before ours are installed.

``shutdown_timeout`` bounds the graceful shutdowns: past it the remaining
clients get an ErrorResponse and the process exits.
"""

from __future__ import annotations

import logging
import os
import signal

import gevent
from gevent.queue import Queue

log = logging.getLogger("geobouncer")

_HANDLED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
_DRAIN_LOG_EVERY = 10.0   # seconds between "waiting for N clients" lines


class Signals:
    def __init__(self, app):
        self.app = app   # the Bouncer: reload, run state; app.lifecycle: pause/resume/shutdown
        self.queue: Queue = Queue()
        self._drain = None

    def install(self) -> None:
        for sig in _HANDLED:
            if signal.getsignal(sig) == signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)
            gevent.signal_handler(sig, self.queue.put, sig)
        gevent.spawn(self._dispatch)

    def _dispatch(self) -> None:
        while True:
            sig = self.queue.get()
            try:
                getattr(self, f"on_{signal.Signals(sig).name.lower()}")()
            except Exception:   # noqa: BLE001 - one bad signal must not stop the next
                log.exception("handling signal %d failed", sig)

    # --- one method per signal -------------------------------------------------------
    def on_sighup(self) -> None:
        log.info("got SIGHUP, re-reading config")
        self.app.reload()

    def on_sigterm(self) -> None:
        app = self.app
        if app.shutting_down:
            log.info("got SIGTERM while shutting down, fast exit")
            app.lifecycle.shutdown_now()
            return
        log.info("got SIGTERM, shutting down, waiting for all clients disconnect")
        app.lifecycle.shutdown_wait_clients()

    def on_sigint(self) -> None:
        app = self.app
        if app.shutting_down:
            log.info("got SIGINT while shutting down, fast exit")
            app.lifecycle.shutdown_now()
            return
        log.info("got SIGINT, shutting down, waiting for all servers connections to be released")
        app.lifecycle.shutdown_safe()

    def on_sigquit(self) -> None:
        log.info("got SIGQUIT, fast exit")
        self.app.listeners.stop()          # the unix socket file goes, as PgBouncer's atexit does
        self.app.lifecycle.remove_pidfile()
        logging.shutdown()
        os._exit(0)

    def on_sigusr1(self) -> None:
        app = self.app
        if app.paused or app.suspended:
            log.info("got SIGUSR1, but already paused/suspended")
            return
        log.info("got SIGUSR1, pausing all activity")
        app.lifecycle.pause()

    def on_sigusr2(self) -> None:
        app = self.app
        if app.shutting_down:
            log.info("got SIGUSR2 while shutting down, ignoring")
        elif app.suspended:
            log.info("got SIGUSR2, continuing from SUSPEND")
            app.lifecycle.resume_all()
        elif app.paused:
            log.info("got SIGUSR2, continuing from PAUSE")
            app.lifecycle.resume_all()
        else:
            log.info("got SIGUSR2, but not paused/suspended")

    # --- graceful shutdown bound -------------------------------------------------------
    def watch_shutdown(self) -> None:
        """Started by a graceful shutdown: say what it waits for, and end it
        after shutdown_timeout (0: wait as long as it takes, as PgBouncer)."""
        if self._drain is None:
            self._drain = gevent.spawn(self._watch)

    def _waiting_for(self) -> tuple[int, int]:
        app = self.app
        clients = sum(1 for c in list(app.clients) if not c.admin)
        servers = sum(len(p.active) for p in list(app.pools.values()))
        return clients, servers

    def _watch(self) -> None:
        app = self.app
        timeout = app.settings.shutdown_timeout
        waited = 0.0
        while not app.stopped.is_set():
            clients, servers = self._waiting_for()
            if app.shutting_down == "wait_for_clients":
                log.info("shutdown: waiting for %d clients to disconnect", clients)
            else:
                log.info("shutdown: waiting for %d server connections to be released (%d clients)",
                         servers, clients)
            step = _DRAIN_LOG_EVERY if not timeout else min(_DRAIN_LOG_EVERY, max(timeout - waited, 0.0))
            if app.stopped.wait(step):
                return
            waited += step
            if timeout and waited >= timeout:
                clients, _ = self._waiting_for()
                log.warning("shutdown_timeout (%gs) reached, closing %d remaining clients", timeout, clients)
                app.lifecycle.shutdown_now(reason="server shutdown: shutdown_timeout reached")
                return

