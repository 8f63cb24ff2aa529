"""The reader of a server connection (net/server.py): forwards what the
server sends to the linked client and watches what the pooler must know.

Theory of operation. A plain server socket is read by a libev read callback
(``readable``) that runs in the hub: it receives a chunk, scans it
(``chunk``), writes the reply to the client's socket without blocking and
releases the server when it has answered everything, with no greenlet
switch per reply (in request/response traffic each switch into and out of
a reader greenlet costs about as much as the scan; scripts/bench's
gevent-relay-cb target measures the difference). The hub must never block,
so whatever might is handed to a greenlet running ``read_loop``, the reader
as it always was: a TLS socket (its reads and writes may wait on the other
direction), the pooler's own queries (net/internal.py), a client being
closed at a message boundary (net/last_words.py), a consumer other than a
client's plain socket (a shard merge, a TLS client), and the rest of a
reply the client's socket did not take at once. For that rest the client's
write lock is taken in the hub (free: checked with no switch since), as a
write that did not complete at once always holds it, so nothing lands inside
it and last_words sees the stream mid-message. Losing the connection is
told to the client from a greenlet too (telling it may write to it). The
greenlet gives reading back to the callback as soon as the common case
holds again. Reports of host trouble from the hub go to a greenlet
(net/server_trouble.py); a queued request the releaser writes from the hub
is finished by a greenlet, holding the server's write lock, when the
server's socket does not take it at once (net/handoff.py).

The watcher is stopped before the socket is closed (ServerConnection.close):
libev must never watch a closed, possibly reused, descriptor.
"""

from __future__ import annotations

import logging
from socket import SHUT_RDWR
from time import monotonic

import gevent
from gevent import get_hub
from gevent.socket import socket as _PLAIN

from ..pool.prepared import FAKE
from ..proto.framing import ProtocolError
from ..proto.scan import REQUEST_REPLIES, SERVER_WATCH, ServerScanner
from . import copy_fence, internal, last_words
from .fastio import receiver, write_held
from .server_trouble import error_after_ready
from .tracker_news import settle, statements_dropped

log = logging.getLogger("geobouncer")

RECV_SIZE = 65536
_Z, _E, _C = (ord(c) for c in "ZEC")
# Types the reader must decode in full; everything else streams through.
_WATCHED = SERVER_WATCH
# Replies that complete a request, or that the prepared-statement tracker must see.
# And notices: those of a Query the pooler injected are swallowed (pool/prepared.py).
_TRACKED = _WATCHED | REQUEST_REPLIES | frozenset(b"N")
# While the tracker needs no exact matching but there are statements a drop
# would take (this server's, the client's): CommandComplete too, for the tags
# that drop every prepared statement (DEALLOCATE ALL, DISCARD ALL; also run
# through a prepared statement, whose text the client's side does not see).
_LEAN = _WATCHED | frozenset((_C,))
_DROP_HEADS = (b"DEAL", b"DISC")


def start(server) -> None:
    """After login: the callback for a plain socket, else a greenlet."""
    server.scanner = ServerScanner(_WATCHED)
    if type(server.sock) is _PLAIN:
        server.watch = get_hub().loop.io(server.sock.fileno(), 1)
        server.watch.start(readable, server)
    else:
        server.reader = gevent.spawn(read_loop, server)


def _hub_may_read(server) -> bool:
    """May reading go back to the callback? When nothing the greenlet is for
    is under way, and the connection is open (a watcher must never be started
    on a closed, possibly reused, descriptor: libev aborts the process). An idle server too (no client): it is read in the hub until
    a reply comes for a client, and bytes while idle are rare (the callback
    hands them to a greenlet); otherwise a server released right after each
    reply would stay with a greenlet for good."""
    client = server.client
    return (not server.closed and server.internal is None and not server.to_boundary
            and (client is None or (client.direct and type(client.sock) is _PLAIN)))


def readable(server) -> None:
    """The read callback (in the hub: must never block)."""
    client = server.client
    if (server.internal is not None or server.to_boundary
            or client is not None and (not client.direct or type(client.sock) is not _PLAIN)):
        _escalate(server, None)         # _hub_may_read, spelled out: this runs once per reply
        return
    try:
        data = server.sock._sock.recv(RECV_SIZE)
    except (BlockingIOError, InterruptedError):
        return
    except OSError as exc:
        _lose(server, f"server connection failed: {exc}")
        return
    if not data:
        _lose(server, "server closed the connection unexpectedly")
        return
    try:
        # Idle (no client): what it says is looked at (net/server_trouble.py,
        # unexpected), never written anywhere, so the plain path cannot block.
        rest = chunk(server, data, client is not None)
    except ProtocolError as exc:
        _lose(server, f"server connection failed: {exc}")
        return
    except Exception:     # a defect: never into the hub, and the server is not trusted after it
        log.exception("%r: internal error in the read callback", server)
        server.dirty = True
        _lose(server, "internal error")
        return
    if rest is not None:
        _escalate(server, rest)


def _escalate(server, rest) -> None:
    """Hand reading to a greenlet. ``rest``: (bytes, held), a reply the
    client's socket did not take, for the greenlet to write first; ``held``:
    with the client's write lock, taken for it."""
    server.watch.stop()
    client = server.client
    if rest is not None and rest[1]:
        rest = [*rest]          # the greenlet claims the lock: rest[1] = False
        reader = server.reader = gevent.spawn(read_loop, server, rest, client)
        # Killed before it ran (its server closed from outside in this very
        # loop iteration) it would never release the lock: the client could
        # not be written to again, and its FATAL would never come.
        reader.rawlink(lambda _: _unclaimed(rest, client))
    else:
        server.reader = gevent.spawn(read_loop, server, rest, client)


def _unclaimed(rest: list, client) -> None:
    if rest[1]:
        rest[1] = False
        try:
            client.sock.shutdown(SHUT_RDWR)    # its stream ends inside the reply
        except (OSError, ValueError, AttributeError):
            pass
        client.wlock.release()


def _lose(server, reason: str) -> None:
    server.watch.stop()
    server.reader = gevent.spawn(server._lost, reason)


def read_loop(server, rest=None, client=None) -> None:
    """The reader as a greenlet (see the module's docstring): until the
    common case holds again, for a plain socket; for ever, for TLS."""
    recv = receiver(server.sock, RECV_SIZE)
    try:
        if rest is not None:
            data, held = rest
            if held:
                rest[1] = False         # this greenlet releases the lock now (_unclaimed)
            _write_rest(server, client, data, held)
        while True:
            if server.watch is not None and _hub_may_read(server):
                server.reader = None
                server.watch.start(readable, server)
                return
            data = recv()
            if not data:
                server._lost("server closed the connection unexpectedly")
                return
            if server.internal is not None:
                internal.internal_data(server, data)
                continue
            if server.to_boundary:
                if last_words.forward_rest(server, data):
                    continue
                return
            chunk(server, data, False)
    except (OSError, ProtocolError) as exc:
        server._lost(f"server connection failed: {exc}")
    except gevent.GreenletExit:
        pass


def _write_rest(server, client, data, held: bool) -> None:
    """The reply the callback could not write at once; then, as after any forward, the release."""
    if not held:
        if server.client is not client:
            return          # it left before its turn came: the rest of its reply is nobody's
        server._forward(data)
    else:
        failed = False
        sock = client.sock
        try:
            write_held(sock, data, sock.sendall)   # killed part-way: the client's socket is shut
        except (OSError, ValueError, AttributeError):
            failed = True
        finally:
            client.wlock.release()      # also when this greenlet is killed
        if failed:
            if server.client is client and not server.answered():
                server.dirty = True     # the client went away mid-response; else the server is done
            client.on_client_write_failed()
            return
        server.pool.stats.bytes_sent += len(data)
    if server.scanner.ready and server.outstanding <= 0:
        client = server.client
        if client is not None and server.answered():
            client.on_server_idle(server)


def chunk(server, data, inline: bool):
    """Forward one chunk the server sent. The boundaries come from the
    scanner (proto/scan.py). With a prepared-statement tracker (transaction
    and statement pooling) the replies that close requests are matched to
    them, so replies to injected messages are dropped and locally answered
    ones inserted. While nothing queued needs that (the common case: plain
    queries, unnamed statements; ``tracker.exact`` False) only ReadyForQuery,
    parameter changes, errors and COPY starts are looked at, and the tags
    that drop every statement while there are statements to drop.
    ``inline`` (from the hub): returns (rest, held) when the client's socket
    did not take all of it (``_escalate``), else None."""
    tracker = server.tracker
    scanner = server.scanner
    exact = False
    pending = None
    if tracker is not None:
        pending = tracker.pending
        exact = tracker.exact
        client = server.client
        scanner.watch = _TRACKED if exact else _LEAN if tracker.prepared.lru or (
            client is not None and client.statements) else _WATCHED
    fenced = False
    if tracker is not None and tracker.fence is not None:
        # A fence after a doubtful COPY (net/copy_fence.py): up to its replies,
        # the stream goes as it is; what follows them is read here, as always.
        fenced, data = copy_fence.feed(server, data)
        if data is None:
            data = b""
    data, end, found = scanner.feed(data)
    out = None          # pieces, once a reply is dropped or one inserted
    cut = None          # an error nobody asked for: what comes before it is forwarded
    stats = server.pool.stats
    for mtype, start, stop in found:
        if mtype == _Z:
            server.outstanding -= 1
            status = server.tx_status = data[start + 5:start + 6]
            server.in_copy = False
            now = monotonic()
            stats.query_count += 1
            stats.query_time += int((now - server.request_started) * 1e6)
            server.request_started = now      # the next pipelined request starts here
            server.last_activity = now
            if status == b"I":
                stats.xact_count += 1
                stats.xact_time += int((now - server.xact_started) * 1e6)
                server.xact_started = now
            if not exact:
                if pending:
                    tracker.ready(status)
                continue
        elif mtype == _C:
            if not exact and data[start + 5:start + 9] not in _DROP_HEADS:
                continue
        elif mtype in _WATCHED:
            if mtype == _E and server.outstanding <= 0 and tracker is not None \
                    and server.tx_status == b"I" and not server.unsynced and server.client is not None:
                cut = start
                error_after_ready(server, data[start + 5:stop])
                break
            server._watched(mtype, data, start + 5, stop)
        if pending:
            keep, fakes = tracker.server_message(mtype, data[start + 5:stop])
            if fakes or not keep:
                if out is None:
                    out = []
                    run = 0
                out.append(data[run:stop if keep else start])
                if fakes:
                    out.append(fakes)
                run = stop
    if cut is not None:
        end = cut
    if out is not None:
        out.append(data[run:end])
        piece = b"".join(out)
    else:
        piece = data if end == len(data) else data[:end]
    if fenced is not False:
        piece = fenced + piece
        if tracker.fence is None:
            scanner.ready += 1      # the fence's ReadyForQuery: a release may be due
    if tracker is not None:
        if tracker.dropped_all:
            statements_dropped(server)
        if tracker.settle:
            settle(server)
        if exact and pending and pending[0][0] == FAKE and server.client is not None:
            piece += tracker.first_fakes()
    if piece:
        if not inline:
            server._forward(piece)
        else:
            wlock = server.client.wlock
            if wlock.locked():
                return piece, False     # another write is under way: the greenlet waits its turn
            try:
                sent = server.client.sock._sock.send(piece)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0                # the greenlet's write sees the error and handles it
            if sent:
                stats.bytes_sent += sent
            if sent < len(piece):
                wlock.acquire(blocking=False)   # free: no switch since the check
                return piece[sent:], True
    if scanner.ready and server.outstanding <= 0:
        client = server.client
        if client is not None and server.answered():
            client.on_server_idle(server)
    return None
