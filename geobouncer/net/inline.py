"""A lone simple Query, or an extended batch that names nothing, served
from the hub, with no greenlet.

Theory of operation. In transaction pooling a client that sends one plain
simple Query at a time, or one unnamed extended batch (the common cases:
pgbench -S, -M extended, most drivers outside a transaction and before they
name statements), is parked as soon as its request has gone out (net/forward.py):
its greenlet ends and the read watcher of its socket calls ``readable`` in
the hub when bytes come, as parking by the janitor already does
(net/client.py). The server's replies are written to it from the hub too
(net/server_reader.py), so in the steady state such a client costs no
greenlet switch at all. ``readable`` serves the next request itself only
when nothing can block: to the linked server, an idle one the pool hands
over at once with the client's parameters, or the queue of a full pool
(net/handoff.py); what the server's socket does not take at once is
written by a greenlet holding the server's write lock
(handoff.send_from_hub). Anything else (other messages, a server to open,
check or bring to the client's parameters, a client with a request still
queued, a client being closed, an error, EOF) goes to a new greenlet with
the bytes read (``client.pending``), which runs the client's loop as always.
"""

from __future__ import annotations

from time import monotonic

from gevent.socket import socket as _PLAIN

from ..pool.pool import TAKE
from .handoff import queue_if_full, send_from_hub, write_request
from .params import INSPECT_FIRST, INSPECT_SPELLINGS, MAY_SET_LATER

RECV_SIZE = 65536
_MAX = 16384        # larger requests go through the greenlet


def eligible(client) -> bool:
    """May this client be served from the hub (its loop parks it after a lone Query)?"""
    pool = client.pool
    return (type(client.sock) is _PLAIN and pool.tracking and pool.cluster is None
            and not client.app.hooks.enabled and not client.rw_split)


def readable(client) -> bool:
    """The parked client's read callback. True: served (the client stays
    parked); False: its greenlet must run, with what was read in ``client.pending``."""
    try:
        data = client.sock._sock.recv(RECV_SIZE)
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False                  # the greenlet's own read sees the end
    if not data or client.closing:
        return False                  # being closed (its FATAL is on the way): nothing more is forwarded
    if len(data) <= _MAX and client.queued is None and not client.lost_tx:
        scanner = client.scanner
        if scanner.lone_query(data):
            if data[5] not in INSPECT_FIRST and data[5:8] not in INSPECT_SPELLINGS \
                    and (data.find(b";", 5, -2) < 0 or MAY_SET_LATER.search(data, 5) is None) \
                    and _request(client, data, 0, 0):   # (a ";" just before the final NUL: nothing after it)
                return True
        elif client.unnamed_change is None:
            batch = scanner.unnamed_batch(data, INSPECT_FIRST, INSPECT_SPELLINGS)
            if batch is not None and batch[0] == len(data) and _request(client, data, batch[1], batch[2]):
                stats = (client.route_pool or client.pool).stats
                if batch[2] or batch[3]:
                    stats.client_parse_count += batch[2]
                    stats.server_parse_count += batch[2]
                    stats.bind_count += batch[3]
                client.portal_change = None
                return True
    client.pending = data
    return False


def _request(client, data: bytes, syncs: int, parses: int) -> bool:
    """net/forward.py's _forward_query (``syncs`` 0) and _forward_unnamed
    (an extended batch that names nothing, ending with its ``syncs``-th
    Sync), for what can be done without blocking."""
    now = monotonic()
    server = client.server
    if server is None:
        app = client.app
        pool = client.route_pool or client.pool
        if app.paused or pool.paused:
            return False
        if not pool.idle:
            client.request_time = now
            return queue_if_full(app, pool, client, data, syncs, parses)
        settings = app.settings
        decision, server = pool.checkout(now, settings.server_lifetime,
                                         settings.server_check_delay if settings.server_check_query else None)
        if decision is not TAKE or server.tparams != client.tparams \
                or server.session_sets != client.session_sets:
            # A check, a retirement or a parameter sync: the greenlet's.
            pool.untake(server)
            return False
        client.request_time = now
        client.attach(server, True)
    elif not server.answered():
        # Still busy with what it was sent (a client pipelining into a long
        # query): it may not be reading. The greenlet writes, and so stops
        # reading the client while the server's socket is full; from here each
        # request would get a greenlet waiting for the server's write lock, with
        # no bound while the client's requests arrive one per read.
        return False
    else:
        client.request_time = now
    try:
        write_request(server, data, now, syncs, parses, send_from_hub)
    except OSError:
        server.dirty = True
        client.shutdown("08P01", "server conn crashed?")
    return True
