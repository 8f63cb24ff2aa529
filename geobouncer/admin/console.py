"""The ``pgbouncer`` admin database: SHOW ..., SET, PAUSE, RESUME, RELOAD, KILL ...

Simple query protocol only, as in PgBouncer. The grammar, the messages and
their SQLSTATE (08P01 for every refusal, as PgBouncer's ``admin_error``) follow
PgBouncer; column names and order follow PgBouncer 1.25 so tools that read them
keep working. The process-control commands live in ``admin/control.py``.
"""

from __future__ import annotations

import logging
import os
import re
import socket as pysocket
import struct
from time import time

from .. import __version__
from ..proto import messages as m
from ..proto.framing import ProtocolError
from . import set as admin_set
from . import fanout, show, show_sockets, show_stats, workers_view
from .control import Control
from .errors import AdminError

log = logging.getLogger("geobouncer")

__all__ = ["AdminConsole", "AdminError", "table"]

# PgBouncer's grammar: CMD [arg] [;] where both are words ([0-9a-z_]+ or "quoted").
_WS0, _WS1 = r"[ \t\n\r]*", r"[ \t\n\r]+"
_WORD = r'("(?:[^"]|"")+"|[0-9a-z_]+)'
_COMMAND = re.compile(rf"^{_WS0}{_WORD}(?:{_WS1}{_WORD})?{_WS0}(?:;{_WS0})?$", re.IGNORECASE)
_TX_VERBS = ("BEGIN", "COMMIT", "ROLLBACK")    # geobouncer tolerates them: drivers send them
_SO_PEERCRED = getattr(pysocket, "SO_PEERCRED", 17)
BUILDERS = {**show.BUILDERS, **show_stats.BUILDERS, **show_sockets.BUILDERS,
            **workers_view.BUILDERS}


class AdminConsole:
    def __init__(self, app):
        self.app = app
        self.started_wall = time()
        self.control = Control(app)

    # --- login -----------------------------------------------------------------
    def authorize(self, client) -> bool:
        """PgBouncer's admin_pre_login/post_login. True when the client is
        already authenticated (``pgbouncer`` over the unix socket from the
        pooler's own OS user: no password, as PgBouncer)."""
        from ..net.checkout import ClientError

        s = self.app.settings
        user = client.user
        if client.unix and user == "pgbouncer" and peer_uid(client.sock) == os.getuid():
            client.stats_only = False
            if s.log_connections:
                log.info("%s pgbouncer access from unix socket", client.label())
            return True
        if user in s.admin_users:
            client.stats_only = False
        elif user in s.stats_users:
            client.stats_only = True
        elif s.auth_type == "any":
            # PgBouncer lets every auth_type=any login in (admin_post_login);
            # only admin_users get control rights: the others may only SHOW.
            client.stats_only = True
        else:
            raise ClientError("08P01", "not allowed")
        return False

    def welcome_params(self) -> dict[str, str]:
        return {"server_version": f"1.25.0/geobouncer {__version__}", "client_encoding": "UTF8",
                "server_encoding": "UTF8", "DateStyle": "ISO", "TimeZone": "GMT",
                "standard_conforming_strings": "on", "is_superuser": "on"}

    # --- the loop ----------------------------------------------------------------
    def serve(self, client) -> None:
        try:
            self._serve(client)
        finally:
            self.control.admin_gone(client)

    def _serve(self, client) -> None:
        from ..net.client import ClientGone

        while True:
            mtype, body = client._read_message()
            if mtype == ord("X"):
                raise ClientGone()
            if mtype != ord("Q"):
                client.send_error("08P01", _bad_packet_text(mtype))
                log.error("%s", _bad_packet_text(mtype))
                raise ClientGone()
            if self.app.settings.disable_pqexec:     # as PgBouncer: the console too
                raise ProtocolError("PQexec disallowed")
            sql = m.parse_query(body)
            try:
                out = self.execute(client, sql)
            except AdminError as exc:
                log.error("%s", exc.text)
                out = m.error_response(exc.sqlstate, exc.text)
            except admin_set.SetFailed as exc:
                log.error("%s", exc)
                log.error("SET failed")
                out = m.error_response("08P01", "SET failed")
            client.sock.sendall(out + m.READY_IDLE)

    def execute(self, client, sql: str) -> bytes:
        match = _COMMAND.match(sql)
        if match is None:
            pair = admin_set.parse_set(sql)
            if pair is None:
                raise AdminError(f"invalid command '{sql}', use SHOW HELP;")
            if client.stats_only and not admin_set.is_fake(pair[0]):
                raise AdminError("admin access needed")
            return admin_set.execute_set(self.app, *pair)
        verb = match.group(1).upper()
        arg = _unquote(match.group(2) or "")
        if verb in _TX_VERBS and not arg:
            return m.command_complete(verb)
        if verb in ("SHOW", "SELECT"):
            return self._show(client, sql, arg)
        handler = self.control.handler(verb)
        if handler is None:
            raise AdminError(f"invalid command '{sql}', use SHOW HELP;")
        if verb == "SHUTDOWN" and not client.stats_only and arg.upper() in fanout.SHUTDOWN_SIGNALS \
                and fanout.shutdown_all(arg.upper()):
            return m.command_complete("SHUTDOWN")
        out = handler(client, arg, sql)
        if self.app.cfg.peers and fanout.supervisor_pid() and not fanout.is_forwarded(client):
            if verb in fanout.FORWARDED:
                fanout.forward(self.app, sql)
            elif verb == "SUSPEND":
                fanout.suspend_all(self.app, (self.app.settings.suspend_timeout or 10) + 5)
        return out

    # --- SHOW ----------------------------------------------------------------------
    def _show(self, client, sql: str, arg: str) -> bytes:
        what = arg.lower()
        fake = admin_set.FAKE_PARAMS.get(what)
        if fake is not None:
            return table([(arg, show.T)], [[fake]], "SHOW")
        if what == "help":
            # PgBouncer answers SHOW HELP with a NOTICE, not a result set.
            return m.notice_response(show.HELP_TEXT) + m.command_complete("SHOW")
        if what == "fds" and client.stats_only:
            raise AdminError("admin access needed")
        builder = BUILDERS.get(what)
        if builder is None:
            raise AdminError(f"invalid command '{sql}', use SHOW HELP;")
        columns, rows = builder(self.app)
        return table(columns, rows, "SHOW")

    def cancel(self, client) -> None:
        """A cancel request on an admin connection (^C in psql while PAUSE or
        SUSPEND waits): PgBouncer resumes fully."""
        self.control.cancel(client)


def peer_uid(sock) -> int | None:
    """The OS user id of a unix-socket peer (SO_PEERCRED), or None."""
    try:
        raw = sock.getsockopt(pysocket.SOL_SOCKET, _SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    _pid, uid, _gid = struct.unpack("3i", raw)
    return uid


def _bad_packet_text(mtype: int) -> str:
    if mtype in (ord("P"), ord("B"), ord("E")):
        return "extended query protocol not supported by admin console"
    return f"unsupported packet type for admin console: {chr(mtype)}"


def _unquote(arg: str) -> str:
    if len(arg) >= 2 and arg[0] == '"' and arg[-1] == '"':
        return arg[1:-1].replace('""', '"')
    return arg


def table(columns: list[tuple[str, int]], rows: list[list], tag: str) -> bytes:
    out = [m.row_description(columns)]
    out.extend(m.data_row(row) for row in rows)
    out.append(m.command_complete(tag))
    return b"".join(out)
