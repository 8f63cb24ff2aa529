"""Fast paths over gevent sockets for the forwarding loops.

gevent's ``recv`` first tries the system call and, when nothing has arrived
yet (the common case in request/response traffic), raises and catches
EWOULDBLOCK before waiting: one Python exception per message. Here we wait on
the socket's read watcher first, then read. ``sendall`` goes through four
Python frames before reaching ``send``; here we try one non-blocking ``send``
and fall back to gevent's ``sendall`` only for what did not fit.

Uses gevent socket internals (``_sock``, ``_wait``, ``_read_event``) that have
been stable across gevent 1.x-26; ``plain_io`` falls back to the public API.
"""

from __future__ import annotations


def receiver(gsock, size: int):
    """A ``recv()`` callable for ``gsock``; returns b"" at EOF."""
    try:
        raw = gsock._sock
        wait = gsock._wait
        event = gsock._read_event
    except AttributeError:
        return lambda: gsock.recv(size)
    raw_recv = raw.recv

    def recv() -> bytes:
        while True:
            wait(event)
            try:
                return raw_recv(size)
            except BlockingIOError:
                continue
            except InterruptedError:
                continue

    return recv


def sender(gsock):
    """A ``sendall(data)`` callable for ``gsock``."""
    try:
        raw_send = gsock._sock.send
    except AttributeError:
        return gsock.sendall
    slow = gsock.sendall

    def sendall(data) -> None:
        try:
            sent = raw_send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(data):
            slow(memoryview(data)[sent:])

    return sendall
