"""Closing a client from another greenlet, its FATAL at a message boundary.

Theory of operation. The janitor, the console or a shutdown closes a client
while its server's reader may be writing a reply to it. The reader forwards
what each ``recv`` returned, so a chunk may end inside a message (a large
DataRow): the server's scanner ``skip`` counts what of it is still to come
from the server, and a write that did not complete at once holds the client's
write lock. An ErrorResponse written then would land inside the DataRow and
the client would read garbage.

So when the client's stream is not at a boundary, the close is left to a
greenlet that waits (LAST_WORDS_TIMEOUT in all) for the write under way to
end, lets the reader forward the real rest of that one message and nothing
after it (``server.to_boundary``: the reader stops there), then writes the
ErrorResponse and shuts the socket down. Padding the message instead is not
sound: a DataRow's column lengths are inside it, and the start of the row
has already gone out. Past the deadline, when the message is too large to
wait for, or when the server goes away first, the socket is shut down without
the error, as before: the close says enough. The server is marked dirty: it
is closed, never given back.

The socket is only ever shut down here, never closed: the client's own
greenlet closes it once it has seen the EOF (no gevent watcher is live then).
"""

from __future__ import annotations

import logging
import socket as pysocket

import gevent

from ..proto import messages as m
from . import tls
from .fastio import plain

log = logging.getLogger("geobouncer")

LAST_WORDS_TIMEOUT = 5.0   # to end the message under way and write the error
MAX_REST = 1 << 24         # a message with more still to come is not waited for
_POLL = 0.02               # while the reader fetches the message's rest from the server


_pending: set = set()       # the greenlets of closes still writing their last words


def owes_last_words(server) -> bool:
    """Is ``server`` still to forward the rest of a message to a client being
    closed? Whoever closes servers wholesale (KILL, SHUTDOWN) leaves it to that
    close, which closes it (it is dirty) once the message has ended."""
    return server.to_boundary


def pending() -> bool:
    return bool(_pending)


def wait_pending(timeout: float) -> None:
    """Let the closes under way write their last words (a SHUTDOWN before the
    process exits), for at most ``timeout`` seconds."""
    if _pending:
        gevent.joinall(list(_pending), timeout=timeout)


def at_boundary(client, server) -> bool:
    """Does what was written to ``client`` so far end with a whole message?
    Held bytes (an incomplete header, a watched message) were not forwarded."""
    return not client.wlock.locked() and _message_ended(server)


def _message_ended(server) -> bool:
    """Did the last chunk forwarded from ``server`` end with a whole message?"""
    scanner = server.scanner if server is not None else None
    return scanner is None or not scanner.skip


def shutdown(client, sqlstate: str | None, text: str | None, server_reason: str | None) -> None:
    """ClientConnection.shutdown: the FATAL (if ``text``), then EOF. With
    ``server_reason`` the linked server is closed for that reason (query
    timeout) once the message under way, if any, has been written."""
    server = client.server
    rest = b""
    if text:
        data = m.error_response(sqlstate or "08P01", text, "FATAL")
        if not at_boundary(client, server):
            rest, locked = data, False
        else:
            rest, locked = _send_now(client.sock, data), True
        if rest and (server is None or server.scanner is None or server.scanner.skip <= MAX_REST):
            if locked:
                client.wlock.acquire(blocking=False)   # free: at_boundary, and no switch since
            if server is not None and not locked:
                server.dirty = True
                server.to_boundary = True
            closer = gevent.spawn(_finish, client, server, rest, locked, server_reason)
            _pending.add(closer)
            closer.link(_pending.discard)
            return
    _drop_server(client, server, server_reason)
    _shut(client.sock)


def forward_rest(server, data) -> bool:
    """The reader's part once ``server.to_boundary`` is set: forward what of
    ``data`` ends the message under way. True while more of it is to come."""
    scanner = server.scanner
    skip = scanner.skip
    client = server.client
    if skip <= 0 or client is None:
        return False
    piece = data[:skip]
    scanner.skip = skip - len(piece)    # before the write: the closer looks at it
    try:
        client.send(piece)
    except OSError:
        return False
    server.pool.stats.bytes_sent += len(piece)
    return scanner.skip > 0


def _finish(client, server, rest: bytes, locked: bool, server_reason: str | None) -> None:
    timeout = gevent.Timeout(LAST_WORDS_TIMEOUT)
    timeout.start()
    try:
        if not locked:
            locked = _wait_for_boundary(client, server)
        if locked:
            client.sock.sendall(rest)   # we hold the write lock: nobody writes between
    except gevent.Timeout as exc:
        if exc is not timeout:
            raise
        log.info("%s the message under way did not end within %.0fs: closed without the error",
                 client.label(), LAST_WORDS_TIMEOUT)
    except (OSError, ValueError, AttributeError):
        pass                           # the client went away (a TLS socket's errors too)
    finally:
        timeout.close()
        _shut(client.sock)
        if locked:
            client.wlock.release()     # writers waiting for it now fail on the shut socket
        _drop_server(client, server, server_reason)   # else the client's cleanup closes it


def _wait_for_boundary(client, server) -> bool:
    """Wait until the client's stream ends with a whole message; True with the
    client's write lock held then, False if the message can no longer end."""
    wlock = client.wlock
    while True:
        wlock.acquire()                # the write under way ends
        if _message_ended(server):
            return True
        wlock.release()
        if server.closed or server.client is not client:
            log.info("%s its server went away in the middle of a message: closed without the error",
                     client.label())
            return False
        gevent.sleep(_POLL)


def _send_now(sock, data: bytes) -> bytes:
    """Write ``data`` without waiting; what the socket did not take (plain
    sockets; a TLS record goes whole or not at all, and is not waited for)."""
    try:
        if not plain(sock):
            tls.send_now(sock, data)
            return b""
        sent = sock._sock.send(data)
    except (BlockingIOError, InterruptedError):
        return data
    except OSError:
        return b""                     # the client is gone: nothing to wait for
    return data[sent:]


def _drop_server(client, server, reason: str | None) -> None:
    if server is None or not reason or client.server is not server:
        return
    client.server = None
    server.client = None
    server.close(reason)


def _shut(sock) -> None:
    try:
        sock.shutdown(pysocket.SHUT_RDWR)
    except OSError:
        pass
