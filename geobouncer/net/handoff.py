"""Handing a server to a client that waits for one.

``Waiter``: a client's greenlet blocked until a server is released to it
(or a slot frees up). ``QueuedQuery``: a lone simple Query queued while its
client's greenlet goes back to reading the client; the releaser sends it.
The pool (geobouncer.pool.pool) decides who gets a released server; these
carry the hand-off out.
"""

from __future__ import annotations

import gevent
from gevent import get_hub
from gevent.hub import Waiter as HubWaiter

from ..pool.prepared import QUERY, SYNC
from .fastio import Handoff, plain

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
_SYNC_ENTRY = (SYNC, False, None)


def write_request(server, data, now: float, syncs: int = 0, parses: int = 0, send=None) -> None:
    """Send a lone simple Query (``syncs`` 0), or an extended-protocol batch
    that names nothing and ends with its ``syncs``-th Sync, to the linked
    ``server``, counting the ReadyForQuery messages it owes; OSError when
    the server is gone. The tracker needs one entry per Sync for such a
    batch: its other messages are unnamed, and a reply to one of them
    changes nothing the tracker knows (pool/prepared.py, server_message)."""
    tracker = server.tracker
    effect = None
    if server.unsynced:
        # A Query, like a Sync, ends the extended messages before it, and
        # commits what they SET (net/forward.py).
        server.unsynced = False
        if tracker is not None:
            effect, tracker.sync_effect = tracker.sync_effect, None
    if syncs:
        requests = syncs
        if tracker is not None:
            if effect is not None:
                tracker.pending.append((SYNC, False, effect))
                syncs -= 1
            tracker.pending.extend((_SYNC_ENTRY,) * syncs)
            tracker.parses += parses
    else:
        requests = 1
        if tracker is not None:
            tracker.pending.append(_QUERY_ENTRY if effect is None else (QUERY, False, effect))
    if server.outstanding <= 0:
        server.outstanding = requests
        server.request_started = now
        if server.tx_status == b"I":
            server.xact_started = now
    else:
        server.outstanding += requests
    server.pool.stats.bytes_received += len(data)
    if send is None:
        server.send(data)
    else:
        send(server, data)


def send_from_hub(server, data) -> None:
    """A queued request written in the hub (a read callback released the
    server, net/server_reader.py): what the server's socket does not take at
    once (a small tcp_socket_buffer, a far server) is written by a greenlet
    holding the server's write lock, so the client's next bytes
    (fastio.sender) wait for it. OSError when the server is gone."""
    lock = server.wlock
    sock = server.sock
    sent = 0
    if not lock.locked() and plain(sock):
        try:
            sent = sock._sock.send(data)
        except (BlockingIOError, InterruptedError):
            pass
    if sent < len(data):
        held = lock.acquire(blocking=False)     # free unless another write is under way
        gevent.spawn(_send_rest, server, memoryview(data)[sent:], held)


def _send_rest(server, data, held: bool) -> None:
    lock = server.wlock
    if not held:
        lock.acquire()
    try:
        server.sock.sendall(data)
    except (OSError, ValueError, AttributeError):
        server.dirty = True         # gone: its reader tells the client
    finally:
        lock.release()


class QueuedQuery:
    """A lone simple Query, or an extended-protocol batch that names nothing
    (write_request), waiting for a server while its client's greenlet
    goes back to reading the client (transaction pooling under load: the
    common case). Whoever releases a server hands it over here (the same
    atomic ``take`` as Waiter's), links it and writes the query at once: the
    client's greenlet is not woken for it. When that cannot be done in the
    releaser (tracked parameters or SETs to replay take a round trip; a
    freed slot needs a login), the client's greenlet finishes: woken in its
    read (Handoff), or through the hub waiter once it waits for this
    hand-off itself (``wait``: more bytes came from the client meanwhile,
    and requests keep their order). A client that leaves first marks it
    done, so no server is handed to it (drop_queued, from the client's cleanup)."""

    __slots__ = ("_wake", "client", "data", "done", "parses", "server", "syncs")

    def __init__(self, client, data, syncs: int = 0, parses: int = 0):
        self.client = client
        self.data = data
        self.syncs = syncs
        self.parses = parses
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
        # Linked and written here when no round trip is needed. This may run in
        # the hub (a server's read callback releasing it, net/server_reader.py):
        # then what the socket does not take at once is left to a greenlet.
        here = server is not None and server.tparams == client.tparams \
            and server.session_sets == client.session_sets
        if here:
            client.queued = None
            client.set_waiting(False)
            client.attach(server, True)
            send = send_from_hub if gevent.getcurrent() is get_hub() else None
            try:
                write_request(server, self.data, client.request_time, self.syncs, self.parses, send)
            except OSError:
                server.dirty = True
                client.shutdown("08P01", "server conn crashed?")
        else:
            self.server = server
        if self._wake is not None:
            get_hub().loop.run_callback(self._wake.switch, None)
        elif not here:
            if client.greenlet is None:
                client.resume()     # parked (net/inline.py): a greenlet finishes the hand-off
            else:
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


def queue_if_full(app, pool, client, data, syncs: int = 0, parses: int = 0) -> bool:
    """Queue ``data`` (QueuedQuery, ``client.queued``; see write_request)
    when ``pool`` is full and nothing else could make a server come sooner
    (no pause, no switchover, no reserve); False: get a server
    (acquire_server)."""
    if not pool.full() or app.paused or pool.paused or pool.cluster is not None:
        return False
    queued = client.queued = QueuedQuery(client, data, syncs, parses)
    client.set_waiting(True)
    pool.waiters.append(queued)
    return True


def drop_queued(client) -> None:
    """The client is leaving with a request still queued: no server may be
    handed to it any more, and one handed but not linked yet goes back."""
    queued, client.queued = client.queued, None
    handed = queued.done
    queued.done = True
    server, queued.server = queued.server, None
    if server is not None:
        client.app.releaser.release_idle(server)
        return
    pool = client.route_pool or client.pool
    if not handed:
        try:
            pool.waiters.remove(queued)
        except ValueError:
            pass
    elif pool.may_open(False):
        pool.wake_one_waiter()    # the slot it was woken for goes to the next
