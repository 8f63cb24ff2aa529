"""What a server connection says that no request asked for, and what may mean
its host is in trouble (net/server.py's reader calls these; none is on the
path of a request's replies).

  error_after_ready  an ErrorResponse after the ReadyForQuery that answered
                     the last request, in the same read: not shown to the
                     client, the server closed when released.
  unexpected         bytes from a server no client is linked to: parameter
                     changes and notices are kept, anything else closes it.
  report_trouble     tell failover/ (``pool.on_failure``) of an error or a
                     lost connection that may mean the host is down or demoted.
"""

from __future__ import annotations

import gevent
from gevent import get_hub

from ..proto import messages as m
from ..proto.framing import message_at

_S, _E = ord("S"), ord("E")
_IDLE_NOISE = frozenset(b"NA")     # NoticeResponse, NotificationResponse
# admin/crash shutdown, cannot connect now, read-only transaction (a demoted writer)
_HOST_TROUBLE = frozenset({"57P01", "57P02", "57P03", "25006"})


def error_after_ready(server, body) -> None:
    """An ErrorResponse after the ReadyForQuery that answered the last
    request, in the same read (the backend terminated or timed out while
    idle): nobody asked for it, and the client, its transaction over, is
    not shown it. The server is closed when released (transaction
    pooling), as if it had come a moment later ("server error while idle")."""
    fields = m.parse_error_fields(body)
    server.dirty = True
    server.close_reason = f"server error while idle: {fields.get('M', '')}"
    report_trouble(server, fields.get("M", ""), fields.get("C"))


def unexpected(server, data: bytes) -> None:
    """Bytes from a server nobody is using: parameter changes and notices are
    fine; anything else means the connection is in an unknown state."""
    pos = 0
    while True:
        found = message_at(data, pos, 1 << 26)
        if found is None:
            break
        mtype, start, end = found
        if mtype == _S:
            name, value = m.parse_parameter_status(data[start:end])
            server.params[name] = value
            if name in server.tparams:
                server.tparams[name] = value
        elif mtype == _E:
            fields = m.parse_error_fields(data[start:end])
            server.close(f"server error while idle: {fields.get('M', '')}")
            report_trouble(server, fields.get("M", ""), fields.get("C"))
            return
        elif mtype not in _IDLE_NOISE:
            server.close("unexpected data from idle server")
            return
        pos = end


def report_trouble(server, reason: str, sqlstate: str | None) -> None:
    """Report what may mean the host is down or demoted (failover/): a lost
    connection (``sqlstate`` None) or one of the SQLSTATEs above."""
    report = server.pool.on_failure
    if report is not None and (sqlstate is None or sqlstate in _HOST_TROUBLE):
        if gevent.getcurrent() is get_hub():
            gevent.spawn(report, server, reason, sqlstate)   # from the read callback: may block
        else:
            report(server, reason, sqlstate)
