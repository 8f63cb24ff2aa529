"""The ``pgbouncer`` admin database: SHOW ..., PAUSE, RESUME, RELOAD, KILL ...

Simple query protocol only, as in PgBouncer. Column names and order follow
PgBouncer 1.25 so tools that read them keep working.
"""

from __future__ import annotations

import logging
import re
from time import monotonic, time

import gevent

from .. import __version__
from ..proto import messages as m
from . import show

log = logging.getLogger("geobouncer")

_T, _I8, _I4 = 25, 20, 23
_COMMAND = re.compile(r"^\s*(\w+)(?:\s+(.*?))?\s*;?\s*$", re.DOTALL)


class AdminError(Exception):
    def __init__(self, text: str, sqlstate: str = "08P01"):
        super().__init__(text)
        self.text = text
        self.sqlstate = sqlstate


class AdminConsole:
    def __init__(self, app):
        self.app = app
        self.started_wall = time()

    # --- login -----------------------------------------------------------------
    def authorize(self, client) -> None:
        from ..net.checkout import ClientError

        s = self.app.settings
        if client.user not in s.admin_users and client.user not in s.stats_users:
            raise ClientError("28000", "not allowed")
        client.stats_only = client.user not in s.admin_users

    def welcome_params(self) -> dict[str, str]:
        return {"server_version": f"1.25.0/geobouncer {__version__}", "client_encoding": "UTF8",
                "server_encoding": "UTF8", "DateStyle": "ISO", "TimeZone": "UTC",
                "standard_conforming_strings": "on", "integer_datetimes": "on",
                "is_superuser": "on", "application_name": ""}

    # --- the loop ----------------------------------------------------------------
    def serve(self, client) -> None:
        from ..net.client import ClientGone

        while True:
            mtype, body = client._read_message()
            if mtype == ord("X"):
                raise ClientGone()
            if mtype != ord("Q"):
                client.send_error("08P01", "admin console supports only the simple query protocol")
                raise ClientGone()
            sql = m.parse_query(body)
            try:
                out = self.execute(client, sql)
            except AdminError as exc:
                out = m.error_response(exc.sqlstate, exc.text)
            client.sock.sendall(out + m.READY_IDLE)

    def execute(self, client, sql: str) -> bytes:
        text = sql.strip().rstrip(";").strip()
        if not text:
            return m.EMPTY_QUERY
        match = _COMMAND.match(text)
        if not match:
            raise AdminError(f"invalid command '{text}', use SHOW HELP;", "42601")
        verb = match.group(1).upper()
        arg = (match.group(2) or "").strip()
        if verb == "SHOW":
            return self._show(client, arg)
        if verb in ("SET", "BEGIN", "COMMIT", "ROLLBACK"):
            if verb == "SET":
                raise AdminError("SET is not supported by geobouncer's console yet; edit the config and RELOAD")
            return m.command_complete(verb)
        if getattr(client, "stats_only", False):
            raise AdminError("admin access needed", "42501")
        handler = getattr(self, f"_cmd_{verb.lower()}", None)
        if handler is None:
            raise AdminError(f"invalid command '{text}', use SHOW HELP;", "42601")
        return handler(client, arg)

    # --- SHOW ----------------------------------------------------------------------
    def _show(self, client, arg: str) -> bytes:
        what = arg.split()[0].lower() if arg else ""
        if what == "help":
            # PgBouncer answers SHOW HELP with a NOTICE, not a result set.
            return m.notice_response(show.HELP_TEXT) + m.command_complete("SHOW")
        builder = show.BUILDERS.get(what)
        if builder is None:
            raise AdminError(f"invalid command 'SHOW {arg}', use SHOW HELP;", "42601")
        columns, rows = builder(self.app)
        return table(columns, rows, "SHOW")

    # --- commands ------------------------------------------------------------------
    def _cmd_pause(self, client, arg):
        db = _dbarg(arg)
        self.app.pause(db)
        # PAUSE returns once every server of the paused pools has been released.
        while not self.app.pause_done(db):
            gevent.sleep(0.05)
        return m.command_complete("PAUSE")

    def _cmd_resume(self, client, arg):
        self.app.resume(_dbarg(arg))
        return m.command_complete("RESUME")

    def _cmd_reload(self, client, arg):
        if self.app.reload() is False:
            raise AdminError("RELOAD failed, see the log; the old configuration stays in use", "F0000")
        return m.command_complete("RELOAD")

    def _cmd_shutdown(self, client, arg):
        mode = arg.upper()
        if mode == "WAIT_FOR_CLIENTS":
            gevent.spawn(self.app.shutdown_wait_clients)
        elif mode == "WAIT_FOR_SERVERS":
            gevent.spawn(self.app.shutdown_safe)
        else:
            gevent.spawn_later(0.05, self.app.shutdown_now)
        return m.command_complete("SHUTDOWN")

    def _cmd_kill(self, client, arg):
        db = _dbarg(arg)
        if not db:
            raise AdminError("KILL needs a database name")
        self.app.pause(db)
        for c in list(self.app.clients):
            if c.pool is not None and c.pool.db.name == db:
                c.shutdown("08P01", "database removed")
        for pool in self.app.pools.values():
            if pool.db.name == db:
                for server in list(pool.idle) + list(pool.active):
                    server.close("KILL command")
        return m.command_complete("KILL")

    def _cmd_kill_client(self, client, arg):
        target = next((c for c in self.app.clients if str(c.id) == arg.strip()), None)
        if target is None:
            raise AdminError(f"client {arg} not found")
        target.shutdown("08P01", "client killed by admin")
        return m.command_complete("KILL_CLIENT")

    def _cmd_disable(self, client, arg):
        db = _dbarg(arg)
        self.app.disabled.add(db)
        return m.command_complete("DISABLE")

    def _cmd_enable(self, client, arg):
        self.app.disabled.discard(_dbarg(arg))
        return m.command_complete("ENABLE")

    def _cmd_reconnect(self, client, arg):
        db = _dbarg(arg)
        for pool in self.app.pools.values():
            if not db or pool.db.name == db:
                self.app.releaser.reconnect_pool(pool)
        return m.command_complete("RECONNECT")

    def _cmd_wait_close(self, client, arg):
        db = _dbarg(arg)
        deadline = monotonic() + 600
        while monotonic() < deadline and any(
                any(s.stale for s in p.active) for p in self.app.pools.values() if not db or p.db.name == db):
            gevent.sleep(0.05)
        return m.command_complete("WAIT_CLOSE")

    def _cmd_suspend(self, client, arg):
        raise AdminError("SUSPEND is not supported (no online restart)")


def _dbarg(arg: str) -> str | None:
    arg = arg.strip().strip('"')
    return arg or None


def table(columns: list[tuple[str, int]], rows: list[list], tag: str) -> bytes:
    out = [m.row_description(columns)]
    out.extend(m.data_row(row) for row in rows)
    out.append(m.command_complete(tag))
    return b"".join(out)
