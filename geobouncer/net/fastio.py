"""Fast paths over gevent sockets for the forwarding loops.

gevent's ``recv`` first tries the system call and, when nothing has arrived
yet (the common case in request/response traffic), raises and catches
EWOULDBLOCK before waiting: one Python exception per message. Here we wait on
the socket's read watcher first, then read. ``sendall`` goes through four
Python frames before reaching ``send``; here we try one non-blocking ``send``
and fall back to gevent's ``sendall`` only for what did not fit.

The watcher and the raw socket are looked up on every call, never kept: when
another greenlet closes the socket, gevent drops its watchers (``_read_event``
becomes None) and swaps the raw socket for a closed stand-in. Starting a kept
watcher on the closed — possibly reused — descriptor aborts the whole process
inside libev ("I/O watcher with invalid fd found in epoll_ctl").

Only plain gevent sockets take the fast path: a TLS socket's ``_sock`` is the
encrypted stream, so anything else uses the public API. A gevent TLS socket
shut down by another greenlet (``shutdown()`` drops its SSL object) raises
ValueError or AttributeError from a read or write already under way: that is
the same event as a closed plain socket, so it becomes OSError here.
"""

from __future__ import annotations

import socket as _pysocket
from errno import EBADF

from gevent.socket import socket as _gevent_socket


def plain(gsock) -> bool:
    """A plain gevent socket (not TLS): its ``_sock`` is the byte stream."""
    return type(gsock) is _gevent_socket


_plain = plain


class Parked(Exception):
    """Thrown into a client's read wait when the janitor parks an idle client
    (net/client.py). A read honours it only while ``owner.parkable`` says it
    is the idle read; anywhere else it is a stale request and the wait goes on."""


class Handoff(Exception):
    """Thrown into a client's read wait when the request it queued
    (net/handoff.py, QueuedQuery) was handed a server its own greenlet must
    finish linking. Honoured only while ``owner.queued`` is handed over;
    anything else is stale and the wait goes on."""


def _stale_handoff(owner) -> bool:
    queued = owner.queued if owner is not None else None
    return queued is None or not queued.done


def receiver(gsock, size: int, owner=None):
    """A ``recv()`` callable for ``gsock``; returns b"" at EOF."""
    if not _plain(gsock):
        def public_recv() -> bytes:
            while True:
                try:
                    return gsock.recv(size)
                except Parked:
                    if owner is not None and owner.parkable:
                        raise
                except Handoff:
                    if not _stale_handoff(owner):
                        raise
                except (ValueError, AttributeError):
                    raise OSError(EBADF, "socket closed") from None
        return public_recv
    wait = gsock._wait

    def recv() -> bytes:
        while True:
            event = gsock._read_event
            if event is None:
                raise OSError(EBADF, "socket closed")
            try:
                wait(event)
            except Parked:
                if owner is not None and owner.parkable:
                    raise
                continue
            except Handoff:
                if _stale_handoff(owner):
                    continue
                raise
            try:
                return gsock._sock.recv(size)
            except (BlockingIOError, InterruptedError):
                continue

    return recv


def sender(gsock, lock=None, shut_if_cut: bool = True):
    """A ``sendall(data)`` callable for ``gsock``. With ``lock`` (a gevent
    Semaphore shared by every writer of the socket), a write that cannot
    complete at once holds it until done, so the bytes of two writers never
    interleave; a write that completes at once cannot be interrupted (no
    greenlet switch happens) and takes no lock. ``shut_if_cut``: such a write
    interrupted part-way shuts the socket down (write_held; a client's, not
    a server's: its reader would take that for the server's trouble)."""
    slow = gsock.sendall
    held = write_held if shut_if_cut else _write_only
    if not _plain(gsock):
        def public_sendall(data) -> None:
            try:
                slow(data)
            except (ValueError, AttributeError):
                raise OSError(EBADF, "socket closed") from None

        if lock is None:
            return public_sendall

        def locked(data) -> None:
            with lock:
                held(gsock, data, public_sendall)
        return locked

    def sendall(data) -> None:
        if lock is not None and lock.locked():
            with lock:
                held(gsock, data, slow)
            return
        try:
            sent = gsock._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(data):
            if lock is None:
                slow(memoryview(data)[sent:])
            else:
                with lock:
                    held(gsock, memoryview(data)[sent:], slow)

    return sendall


def _write_only(gsock, data, write) -> None:
    write(data)


def write_held(gsock, data, write) -> None:
    """``write(data)`` to a socket several parties write to, the caller
    holding their lock. Interrupted part-way (the writer killed: its server
    closed from outside; a timeout) the stream may end inside a message, and
    whoever takes the lock next (net/last_words.py's FATAL) would write into
    it: the socket is shut down instead, so nothing more reaches the peer,
    which sees the stream end (its own greenlet then sees EOF and closes it)."""
    try:
        write(data)
    except BaseException:
        try:
            gsock.shutdown(_pysocket.SHUT_RDWR)
        except (OSError, ValueError, AttributeError):
            pass
        raise
