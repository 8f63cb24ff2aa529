"""The console's process-control commands, with PgBouncer's messages.

PAUSE, RESUME, SUSPEND, RELOAD, SHUTDOWN, KILL, KILL_CLIENT, DISABLE, ENABLE,
RECONNECT and WAIT_CLOSE. Each handler takes ``(client, arg, sql)`` and returns
the reply, or raises ``AdminError`` (08P01 unless PgBouncer uses another code).
A handler that must wait (PAUSE, SUSPEND, WAIT_CLOSE) waits in the admin
client's own greenlet, so nothing else is held up.
"""

from __future__ import annotations

import logging
from time import monotonic

import gevent

from ..net import last_words
from ..proto import messages as m
from .errors import AdminError

log = logging.getLogger("geobouncer")

_POLL = 0.05
_ADMIN_DB = "pgbouncer"


class Control:
    def __init__(self, app):
        self.app = app
        self.waiting: set = set()   # admin clients inside PAUSE / SUSPEND / WAIT_CLOSE

    def handler(self, verb: str):
        return getattr(self, f"cmd_{verb.lower()}", None)

    # --- helpers -------------------------------------------------------------------
    @staticmethod
    def _need_admin(client) -> None:
        if client.stats_only:
            raise AdminError("admin access needed")

    @staticmethod
    def _no_arg(arg: str, sql: str) -> None:
        if arg:
            raise AdminError(f"invalid command '{sql}', use SHOW HELP;")

    def _database(self, arg: str, action: str) -> str:
        """A database the console may act on (PgBouncer's find_or_register_database)."""
        if arg == _ADMIN_DB:
            raise AdminError(f"cannot {action} admin db: {arg}")
        if self.app.database_for(arg) is None:
            raise AdminError(f"no such database: {arg}")
        return arg

    def _wait(self, client, done, limit: float | None = None) -> bool:
        """Wait in this greenlet until ``done()``; False if ``limit`` seconds ran
        out. A cancel request (psql's ^C) ends the wait with PostgreSQL's error."""
        deadline = None if limit is None else monotonic() + limit
        self.waiting.add(client)
        try:
            while not done():
                if client not in self.waiting:
                    raise AdminError("canceling statement due to user request", "57014")
                if deadline is not None and monotonic() >= deadline:
                    return False
                gevent.sleep(_POLL)
            return True
        finally:
            self.waiting.discard(client)

    def cancel(self, client) -> None:
        """psql's ^C during PAUSE or SUSPEND: PgBouncer resumes everything."""
        if client not in self.waiting:
            log.warning("%s admin cancel request for non-waiting client?", client.label())
            return
        self.waiting.discard(client)
        if not self.app.shutting_down and (self.app.paused or self.app.suspended):
            self.app.lifecycle.resume_all()

    def admin_gone(self, client) -> None:
        """PgBouncer resumes a suspended pooler when its last admin leaves."""
        self.waiting.discard(client)
        if self.app.suspended and not any(c.admin and c is not client for c in self.app.clients):
            log.info("admin disappeared when suspended, doing RESUME")
            self.app.lifecycle.resume_all()

    # --- pause / resume / suspend ----------------------------------------------------------
    def cmd_pause(self, client, arg, sql):
        self._need_admin(client)
        app = self.app
        if app.paused or app.suspended:
            raise AdminError("already suspended/paused")
        if not arg:
            log.info("PAUSE command issued")
            app.lifecycle.pause()
        else:
            log.info("PAUSE '%s' command issued", arg)
            app.lifecycle.pause(self._database(arg, "pause"))
        # PAUSE returns once every server of the paused pools has been released.
        self._wait(client, lambda: app.lifecycle.pause_done(arg or None))
        return m.command_complete("PAUSE")

    def cmd_resume(self, client, arg, sql):
        self._need_admin(client)
        app = self.app
        if not arg:
            log.info("RESUME command issued")
            if app.shutting_down:
                raise AdminError("pooler is shutting down")
            if not (app.paused or app.suspended):
                raise AdminError("pooler is not paused/suspended")
            app.lifecycle.resume_all()
        else:
            log.info("RESUME '%s' command issued", arg)
            if arg == _ADMIN_DB or app.database_for(arg) is None:
                raise AdminError(f"no such database: {arg}")
            if arg not in app.paused_dbs:
                raise AdminError(f"database {arg} is not paused")
            app.lifecycle.resume(arg)
        return m.command_complete("RESUME")

    def cmd_suspend(self, client, arg, sql):
        self._no_arg(arg, sql)
        self._need_admin(client)
        app = self.app
        if app.paused or app.suspended:
            raise AdminError("already suspended/paused")
        if app.paused_dbs:
            raise AdminError("cannot suspend with paused databases")
        log.info("SUSPEND command issued")
        app.lifecycle.suspend()
        # Flush: let every request in flight be answered, for suspend_timeout at most;
        # then close the server connections still holding data, as PgBouncer does.
        timeout = app.settings.suspend_timeout or None
        if not self._wait(client, app.lifecycle.suspend_flushed, timeout) and app.suspended:
            app.lifecycle.suspend_close_busy()
            # A client mid-message gets the rest of it, then the FATAL, before its
            # server closes: SUSPEND answers once that is done (or given up).
            last_words.wait_pending(last_words.LAST_WORDS_TIMEOUT + 1)
        return m.command_complete("SUSPEND")

    # --- config / shutdown ------------------------------------------------------------
    def cmd_reload(self, client, arg, sql):
        self._no_arg(arg, sql)
        self._need_admin(client)
        # PgBouncer's line for the console command only, before the reload as it logs it
        # (SIGHUP logs its own line: signals.on_sighup).
        log.info("RELOAD command issued")
        if self.app.reload() is False:
            log.error("RELOAD Failed, see logs for more details")
            raise AdminError("RELOAD failed, see logs for additional details", "F0000")
        return m.command_complete("RELOAD")

    def cmd_shutdown(self, client, arg, sql):
        mode = arg.upper()
        if mode not in ("", "WAIT_FOR_CLIENTS", "WAIT_FOR_SERVERS"):
            raise AdminError(f"invalid command '{sql}', use SHOW HELP;")
        self._need_admin(client)
        app = self.app
        if mode == "WAIT_FOR_CLIENTS":
            log.info("SHUTDOWN WAIT_FOR_CLIENTS command issued")
            gevent.spawn(app.lifecycle.shutdown_wait_clients)
        elif mode == "WAIT_FOR_SERVERS":
            log.info("SHUTDOWN WAIT_FOR_SERVERS command issued")
            gevent.spawn(app.lifecycle.shutdown_safe)
        else:
            log.info("SHUTDOWN command issued")
            # PgBouncer does not answer and exits; geobouncer answers first (scripts
            # then see a success, not a lost connection) and exits right after.
            gevent.spawn_later(0.05, app.lifecycle.shutdown_now)
        return m.command_complete("SHUTDOWN")

    # --- databases and clients ------------------------------------------------------
    def cmd_kill(self, client, arg, sql):
        self._need_admin(client)
        app = self.app
        if app.paused or app.suspended:
            raise AdminError("already suspended/paused")
        if arg:
            log.info("KILL '%s' command issued", arg)
            names = {self._database(arg, "kill")}
        else:
            log.info("KILL command issued")
            names = {pool.db.name for pool in app.pools.values()}
        for name in names:
            app.lifecycle.pause(name)
        for c in list(app.clients):
            if c.pool is not None and c.pool.db.name in names:
                c.shutdown("08P01", "database removed")
        for pool in app.pools.values():
            if pool.db.name in names:
                for server in list(pool.idle) + list(pool.active):
                    if not last_words.owes_last_words(server):
                        server.close("database removed")
        return m.command_complete("KILL")

    def cmd_kill_client(self, client, arg, sql):
        self._need_admin(client)
        if not arg.isdigit():
            raise AdminError("invalid client pointer supplied")
        target = next((c for c in self.app.clients if c.id == int(arg) and not c.admin
                       and c.pool is not None), None)
        if target is None:
            raise AdminError("client not found")
        target.shutdown("08P01", "admin forced disconnect")
        return m.command_complete("KILL_CLIENT")

    def cmd_disable(self, client, arg, sql):
        self._need_admin(client)
        if not arg:
            raise AdminError("a database is required")
        log.info("DISABLE '%s' command issued", arg)
        self.app.disabled.add(self._database(arg, "disable"))
        return m.command_complete("DISABLE")

    def cmd_enable(self, client, arg, sql):
        self._need_admin(client)
        if not arg:
            raise AdminError("a database is required")
        log.info("ENABLE '%s' command issued", arg)
        self.app.disabled.discard(self._database(arg, "enable"))
        return m.command_complete("ENABLE")

    def cmd_reconnect(self, client, arg, sql):
        self._need_admin(client)
        if arg:
            log.info("RECONNECT '%s' command issued", arg)
            self._database(arg, "reconnect")
        else:
            log.info("RECONNECT command issued")
        for pool in list(self.app.pools.values()):
            if not arg or pool.db.name == arg:
                self.app.releaser.reconnect_pool(pool)
        return m.command_complete("RECONNECT")

    def cmd_worker_event(self, client, arg, sql):
        """geobouncer's own, between workers only (admin/worker_events.py)."""
        from . import fanout, worker_events
        self._need_admin(client)
        if not fanout.is_forwarded(client) or not worker_events.on_private_socket(self.app, client):
            raise AdminError("WORKER_EVENT is sent by geobouncer's workers to one another")
        refused = worker_events.receive(self.app, arg)
        if refused is not None:
            raise AdminError(refused)
        return m.command_complete("WORKER_EVENT")

    def cmd_wait_close(self, client, arg, sql):
        self._need_admin(client)
        if arg:
            log.info("WAIT_CLOSE '%s' command issued", arg)
            self._database(arg, "wait in")
        else:
            log.info("WAIT_CLOSE command issued")
        pools = self.app.pools

        def closed() -> bool:
            return not any(s.stale for p in list(pools.values()) if not arg or p.db.name == arg
                           for s in list(p.active) + list(p.idle))

        self._wait(client, closed)
        return m.command_complete("WAIT_CLOSE")
