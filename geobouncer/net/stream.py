"""Streaming paths of a client: session pooling forwards chunks as they come,
partial messages included; in transaction pooling, a message too large to hold
(a huge query, big CopyData) streams through the same way. The boundaries and
request counts come from the client's scanner (proto/scan.py); a server that
got part of a message is never reused (see ClientConnection._drop_server). A
functions over a ClientConnection (net/client.py)."""

from __future__ import annotations

from time import monotonic

from ..pool.prepared import PARSE
from ..proto.framing import ProtocolError
from ..proto.scan import OWES_SYNC
from .checkout import ClientError
from .fastio import receiver
from .login import ClientGone

RECV_SIZE = 65536
_Q, _F, _P = ord("Q"), ord("F"), ord("P")
_UNNAMED_PARSE = (PARSE, False, None)
_RENAMED = frozenset(ord(c) for c in "PBDC")
_STREAM_ABOVE = 1 << 20      # messages above 1 MiB stream through unless they must be read
_COPY_REST = frozenset(b"df")   # CopyData, CopyFail: nothing to answer
_HOLD_LIMIT = 0x3FFFFFFF     # PostgreSQL refuses messages over 1 GB: never hold more


def serve_session(client) -> None:
    recv = receiver(client.sock, RECV_SIZE, client)
    scanner = client.scanner
    stream = scanner.stream
    data = client.pending
    client.pending = b""
    while True:
        if not data:
            client.parkable = client.server is None and not scanner.owed and not scanner.held
            data = recv()
            client.parkable = False
            if not data:
                raise ClientGone()
        client.request_time = monotonic()
        if scanner.owed and client.server is None:
            raise ClientError("08P01", "server conn crashed?")   # lost mid-message
        chunk = stream(data)
        if chunk:
            client._send(chunk, scanner.requests, scanner.synced)
        if scanner.terminate:
            raise ClientGone()
        data = b""


def large_message(client, buf: bytearray) -> bool:
    """Is the partial message at the start of ``buf`` one to stream through
    rather than hold? Messages the pooler must read whole (Parse, Bind,
    Describe, Close; queries a hook or the split must see) are held, up to
    PostgreSQL's own 1 GB message limit."""
    length = client.scanner.pending_length(buf) - 1
    if length <= _STREAM_ABOVE:
        return False
    mtype = buf[0]
    reads_text = client.app.hooks.enabled or client.rw_split
    # Held after a deferred BEGIN: it goes out first (net/forward.py).
    deferred = client.deferred_begin is not None and mtype != ord("d")
    if mtype == _P and len(buf) > 5 and buf[5] == 0 and not reads_text:
        return True      # an unnamed Parse is not renamed: nothing in it to read
    if mtype in _RENAMED or deferred or (mtype == _Q and reads_text):
        if length > _HOLD_LIMIT:
            raise ProtocolError(f"message of {length} bytes is too large")
        return False
    return True


def _drop_large(client, buf: bytearray, recv, total: int) -> None:
    """The rest of a failed COPY FROM STDIN (large CopyData sent before the
    error came) from a client with no server: PostgreSQL would ignore it, so
    no server is linked (or waited for) to take it (net/unlinked.py,
    drop_unanswered, for the whole messages)."""
    owed = total - len(buf)
    buf.clear()
    while owed > 0:
        data = recv()
        if not data:
            raise ClientGone()
        if len(data) > owed:
            buf += data[owed:]
        owed -= min(len(data), owed)


def stream_large(client, buf: bytearray, recv, scratch: list) -> None:
    """Forward one large message (a huge query, big CopyData) as it arrives."""
    scanner = client.scanner
    mtype = buf[0]
    total = scanner.pending_length(buf)
    if client.server is None and mtype in _COPY_REST:
        _drop_large(client, buf, recv, total)
        return
    server = client.server or client._link()
    tracker = server.tracker
    if tracker is not None:
        if mtype == _P:            # unnamed (see _large_message)
            tracker.pending.append(_UNNAMED_PARSE)
            tracker.parses += 1
            client.unnamed_change = None
        else:
            effect = None
            if mtype in (_Q, _F):     # it commits an Execute's SET sent before it (net/forward.py)
                effect, tracker.sync_effect = tracker.sync_effect, None
            tracker.client_message(mtype, None, client.statements, scratch, effect)
            scratch.clear()
    client.request_time = monotonic()
    first = bytes(buf)
    buf.clear()
    scanner.start_streaming(total, len(first))
    # Like the batches of net/forward.py: a Query ends the extended messages
    # before it, a Parse or Bind leaves the server waiting for a Sync.
    synced = True if mtype in (_Q, _F) else False if mtype in OWES_SYNC else None
    if synced is False and tracker is not None:
        tracker.exact = True
    client._send(first, 1 if mtype in (_Q, _F) else 0, synced)
    while scanner.owed > 0:
        data = recv()
        if not data:
            raise ClientGone()
        if len(data) > scanner.owed:
            buf += data[scanner.owed:]
            data = data[:scanner.owed]
        scanner.take(len(data))
        if client.server is not server:
            raise ClientError("08P01", "server conn crashed?")   # lost mid-message
        client._send(data, 0, None)
    if server.client is client:
        server._maybe_release()   # its replies may all have come while we streamed
