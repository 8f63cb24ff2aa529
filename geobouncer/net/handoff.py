"""Handing a server to a client that waits for one.

``Waiter``: a client's greenlet blocked until a server is released to it
(or a slot frees up). ``QueuedQuery``: a lone simple Query queued while its
client's greenlet goes back to reading the client; the releaser sends it.
The pool (geobouncer.pool.pool) decides who gets a released server; these
carry the hand-off out.
"""

from __future__ import annotations

from gevent import get_hub
from gevent.hub import Waiter as HubWaiter

from ..pool.prepared import QUERY
from .fastio import Handoff

_TIMED_OUT = object()


class Waiter:
    """A client waiting for a server. ``take`` is the atomic hand-off: once the
    waiter has given up (timed out, or its greenlet was interrupted) it
    refuses, so no server is lost; a server taken by a waiter that is then
    interrupted is given back by the caller (``_wait``).

    Lighter than an AsyncResult with a gevent.Timeout: one hub Waiter and, when
    there is a deadline, one libev timer."""

    __slots__ = ("_wake", "done", "server")

    def __init__(self):
        self.done = False
        self.server = None
        self._wake = HubWaiter()

    def take(self, server) -> bool:
        if self.done:
            return False
        self.done = True
        self.server = server
        get_hub().loop.run_callback(self._wake.switch, None)
        return True

    def wait(self, timeout: float | None) -> bool:
        """True once handed over (``server``: a server, or None when a slot
        freed up); False when ``timeout`` passed first."""
        return _wait_handed(self, timeout)


def _wait_handed(waiter, timeout: float | None) -> bool:
    wake = waiter._wake
    timer = None
    if timeout is not None:
        timer = get_hub().loop.timer(max(timeout, 0.0))
        timer.start(wake.switch, _TIMED_OUT)
    try:
        if wake.get() is _TIMED_OUT:
            if not waiter.done:
                waiter.done = True
                return False
            wake.get()          # handed over as the timer fired: its wake-up is on the way
        return True
    except BaseException:
        waiter.done = True
        raise
    finally:
        if timer is not None:
            timer.close()


_HANDOFF = Handoff()
_QUERY_ENTRY = (QUERY, False, None)


def write_query(server, data, now: float) -> None:
    """Send one simple Query to the linked ``server``, counting the
    ReadyForQuery it owes; OSError when the server is gone."""
    if server.tracker is not None:
        server.tracker.pending.append(_QUERY_ENTRY)
    if server.outstanding <= 0:
        server.outstanding = 1
        server.request_started = now
        if server.tx_status == b"I":
            server.xact_started = now
    else:
        server.outstanding += 1
    server.pool.stats.bytes_received += len(data)
    server.send(data)


class QueuedQuery:
    """A lone simple Query waiting for a server while its client's greenlet
    goes back to reading the client (transaction pooling under load: the
    common case). Whoever releases a server hands it over here (the same
    atomic ``take`` as Waiter's), links it and writes the query at once: the
    client's greenlet is not woken for it. When that cannot be done in the
    releaser (tracked parameters or SETs to replay take a round trip; a
    freed slot needs a login), the client's greenlet finishes: woken in its
    read (Handoff), or through the hub waiter once it waits for this
    hand-off itself (``wait``: more bytes came from the client meanwhile,
    and requests keep their order). A client that leaves first marks it
    done, so no server is handed to it (net/client.py, _drop_queued)."""

    __slots__ = ("_wake", "client", "data", "done", "server")

    def __init__(self, client, data):
        self.client = client
        self.data = data
        self.done = False
        self.server = None
        self._wake = None        # a hub Waiter, once the client's greenlet waits

    @property
    def blocked(self) -> bool:
        return self._wake is not None

    def take(self, server) -> bool:
        if self.done:
            return False
        self.done = True
        client = self.client
        if client.closing:
            return False
        here = server is not None and server.tparams == client.tparams \
            and server.session_sets == client.session_sets
        if here:
            client.queued = None
            client.set_waiting(False)
            client.attach(server, True)
            try:
                write_query(server, self.data, client.request_time)
            except OSError:
                server.dirty = True
                client.shutdown("08P01", "server conn crashed?")
        else:
            self.server = server
        if self._wake is not None:
            get_hub().loop.run_callback(self._wake.switch, None)
        elif not here:
            event = client.sock._read_event
            if event is not None:
                get_hub().cancel_wait(event, _HANDOFF)
        return True

    def cancel(self, exc: BaseException) -> None:
        """Its client is closed from outside (KILL, KILL_CLIENT) while its
        greenlet waits for this hand-off: end that wait now with ``exc``
        (``take`` refuses a closing client, so nothing else would wake it)."""
        if not self.done and self._wake is not None:
            get_hub().loop.run_callback(self._wake.throw, exc)

    def wait(self, timeout: float | None) -> bool:
        """The client's greenlet waits for the hand-off (Waiter.wait)."""
        self._wake = HubWaiter()
        return _wait_handed(self, timeout)


def queue_if_full(app, pool, client, query) -> bool:
    """Queue the lone simple Query ``query`` (QueuedQuery, ``client.queued``)
    when ``pool`` is full and nothing else could make a server come sooner
    (no pause, no switchover, no reserve); False: get a server
    (acquire_server)."""
    if not pool.full() or app.paused or pool.paused or pool.cluster is not None:
        return False
    queued = client.queued = QueuedQuery(client, query)
    client.set_waiting(True)
    pool.waiters.append(queued)
    return True
