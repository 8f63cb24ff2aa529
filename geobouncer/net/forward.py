"""The client's loop in transaction and statement pooling: whole messages
through the prepared-statement tracker, with session SETs remembered, and fast
paths for a lone Query and for unnamed extended batches. Functions over a
ClientConnection (net/client.py).

A batch that finds no server linked gets one, or its answer from the pooler
itself, in net/unlinked.py; which query texts are read for their session
effects is net/params.py's."""

from __future__ import annotations

from time import monotonic

from ..pool.deallocate import MAY_DROP_ALL, deallocate_locally, watch_drop
from ..pool.prepared import FAKE, INJECTED
from ..proto.scan import OWES_SYNC
from . import defer_begin, inline, params, route, stream
from .checkout import ClientError
from .fastio import Handoff, Parked, receiver
from .handoff import queue_if_full, write_request
from .login import ClientGone
from .params import INSPECT_FIRST, INSPECT_SPELLINGS, MAY_SET_LATER, needs_inspection
from .unlinked import NOTHING_TO_ANSWER, answer_lost, drop_unanswered, server_or_answer

RECV_SIZE = 65536
_Q, _S, _F, _X = (ord(c) for c in "QSFX")
_P, _B, _D, _E = (ord(c) for c in "PBDE")
_RENAMED = frozenset(ord(c) for c in "PBDC")
_FAKE = FAKE
_INJECTED_ENTRY = (INJECTED, True, None)
_BIG = 1 << 16      # batches above this are sent in pieces, bodies sliced through views


def serve_transaction(client) -> None:
    """Transaction/statement pooling: whole messages, translated by the
    server's prepared-statement tracker (pool/prepared.py)."""
    recv = receiver(client.sock, RECV_SIZE, client)
    buf = bytearray(client.pending if not client.closing else b"")
    client.pending = b""
    # After a lone Query the client is parked and served from the hub while it can be (net/inline.py).
    client.inline = park = inline.eligible(client)
    if client.queued is not None and not client.closing and (buf or client.queued.done):
        _finish_queued(client)      # resumed while queued: the hand-off first, requests keep their order
    scratch: list = []
    plain = not (client.app.hooks.enabled or client.rw_split)
    messages = client.scanner.messages
    lone_query = client.scanner.lone_query
    unnamed_batch = client.scanner.unnamed_batch
    while True:
        if not buf and plain:
            # the idle read (net/client.py: parking)
            client.parkable = client.server is None and client.queued is None
            try:
                data = recv()
            except Handoff:
                client.parkable = False
                _finish_queued(client)
                continue
            client.parkable = False
            if not data:
                raise ClientGone()
            if client.closing:
                continue            # told FATAL (net/last_words.py): nothing more goes to a server
            if client.queued is not None:
                _finish_queued(client)
            # Fast path: exactly one complete simple Query that needs no reading.
            # (lost_tx is checked after the read: a server can be lost meanwhile.)
            # A semicolon only at the end ("...;\0", pgbench's texts) has nothing after it.
            if (lone_query(data) and data[5] not in INSPECT_FIRST and data[5:8] not in INSPECT_SPELLINGS
                    and not client.lost_tx
                    and (data.find(b";", 5, -2) < 0 or MAY_SET_LATER.search(data, 5) is None)):
                _forward_query(client, data)
                if park:
                    raise Parked()
                continue
            buf += data
        if plain:
            batch = unnamed_batch(buf, INSPECT_FIRST, INSPECT_SPELLINGS)
            if batch is not None and _forward_unnamed(client, buf, batch):
                if park and not buf:
                    raise Parked()
                continue
        msgs = messages(buf)
        if msgs is None:
            if len(buf) >= 5 and stream.large_message(client, buf):
                stream.stream_large(client, buf, recv, scratch)
                continue
            client.parkable = not buf and client.server is None and client.queued is None
            try:
                data = recv()
            except Handoff:
                client.parkable = False
                _finish_queued(client)
                continue
            client.parkable = False
            if not data:
                raise ClientGone()
            if client.closing:
                buf.clear()
                continue
            if client.queued is not None:
                _finish_queued(client)
            buf += data
            continue
        client.request_time = monotonic()
        terminate = msgs[-1][0] == _X
        if terminate:
            msgs.pop()
        if msgs:
            _forward_tracked(client, buf, msgs, scratch)
        if terminate:
            raise ClientGone()


def _forward_unnamed(client, buf: bytearray, batch: tuple) -> bool:
    """Fast path for an extended-protocol batch that names nothing (pgbench
    -M extended, a driver's first executions; found by the client scanner's
    ``unnamed_batch``): forwarded as is, or queued like a lone Query when the
    pool is full. False when it needs the general path after all."""
    if client.lost_tx or client.unnamed_change is not None:
        return False
    last, syncs, parses, binds = batch
    client.request_time = now = monotonic()
    server = client.server
    pool = client.route_pool or client.pool
    if server is None:
        if pool.tracking and not pool.idle and queue_if_full(client.app, pool, client, bytes(buf[:last]),
                                                               syncs, parses):
            del buf[:last]
        else:
            server = server_or_answer(client, buf, None)
            if server is None:
                return True
            if server.tracker is None:
                return False
    elif server.tracker is None:
        return False
    client.portal_change = None
    if parses or binds:
        stats = pool.stats
        stats.client_parse_count += parses
        stats.server_parse_count += parses
        stats.bind_count += binds
    if server is not None:
        chunk = bytes(buf[:last])
        del buf[:last]
        _write(server, chunk, now, syncs, parses)
    return True


def _forward_query(client, data: bytes) -> None:
    """One plain simple Query (the common case of transaction pooling).
    With the pool full it is queued, and whoever releases a server sends it
    (net/handoff.py, QueuedQuery); this greenlet goes back to the client."""
    client.request_time = now = monotonic()
    server = client.server
    if server is None:
        pool = client.route_pool or client.pool
        if not pool.idle and queue_if_full(client.app, pool, client, data):
            return
        server = server_or_answer(client, None, None)
        if server is None:
            return
    _write(server, data, now)


def _finish_queued(client) -> None:
    """This client's queued Query needs its greenlet: more bytes came before
    it was handed a server (wait for that first: requests keep their order),
    or it was handed one that needs parameters replayed, or a free slot."""
    queued = client.queued
    if not queued.done:
        limit = client.app.settings.query_wait_timeout
        if not queued.wait(limit - (monotonic() - client.wait_started) if limit > 0 else None):
            raise ClientError("08P01", "query_wait_timeout")     # _cleanup drops it
        if client.queued is not queued:
            return      # linked and sent by the releaser
    client.queued = None
    client.set_waiting(False)
    server, queued.server = queued.server, None
    request_time = client.request_time
    if server is None:
        # A slot freed up: open one. Not refused here: queueing excludes the
        # switchovers whose timeouts a client survives.
        server = client._link()
    else:
        try:
            client.attach(server)
        except BaseException:
            if server.client is None and not server.closed:
                client.app.releaser.release_idle(server)
            raise
    _write(server, queued.data, request_time, queued.syncs, queued.parses)


def _write(server, data, now: float, syncs: int = 0, parses: int = 0) -> None:
    """write_request from the client's greenlet: a server gone is the client's error."""
    try:
        write_request(server, data, now, syncs, parses)
    except OSError:
        server.dirty = True
        raise ClientError("08P01", "server conn crashed?") from None


def _forward_tracked(client, buf: bytearray, msgs: list, scratch: list) -> None:
    if client.lost_tx:
        answer_lost(client, buf, msgs)
        return
    if client.server is None and msgs[0][0] in NOTHING_TO_ANSWER:
        msgs = drop_unanswered(buf, msgs)
        if not msgs:
            return
    if client.app.hooks.enabled or client.rw_split:
        if defer_begin.intercept(client, buf, msgs):
            return
        msgs = route.route_batch(client, buf, msgs)
    server = client.server
    if server is None:
        server = server_or_answer(client, buf, msgs)     # or answered here: a Parse, a Close, an error
        if server is None:
            return
    tracker = server.tracker
    if tracker is None:   # pool mode changed under a RELOAD: plain forwarding
        last = msgs[-1][2]
        requests = sum(1 for t, _, _ in msgs if t in (_Q, _S, _F))
        client._send(bytes(buf[:last]), requests, None)
        del buf[:last]
        return
    deferred = client.deferred_begin
    client.deferred_begin = None
    first_entry = len(tracker.pending)
    stmts = client.statements
    client_message = tracker.client_message
    parses_before = tracker.parses
    client_parses = binds = 0
    out = None
    run = 0
    requests = 0
    synced = None
    sync_effect = tracker.sync_effect     # an Execute's SET whose Sync is still to come
    # SETs count only when run outside a transaction: as of this batch's start,
    # and before any other request of the batch.
    outside = server.tx_status == b"I" and not tracker.pending and deferred is None
    for mtype, start, end in msgs:
        effect = None
        if mtype == _Q:
            if (stmts or tracker.prepared.lru) and MAY_DROP_ALL.search(buf, start + 5, end):
                watch_drop(tracker, stmts)
            if needs_inspection(bytes(buf[start + 5:start + 8])) or MAY_SET_LATER.search(buf, start + 5, end):
                body = bytes(buf[start + 5:end])
                if deallocate_locally(tracker, body, stmts):
                    out = [] if out is None else out
                    out.append(buf[run:start])
                    run = end
                    continue
                change = params.query_change(body[:-1], client)
                effect = params.session_effect(client, server, change, outside)
                replaced = client_message(mtype, body, stmts, scratch, params.both(sync_effect, effect))
            else:
                replaced = client_message(mtype, None, stmts, scratch, sync_effect)
            requests += 1
            synced = True       # it ends the implicit transaction of the messages before it
            sync_effect = None
            outside = False
        elif mtype in _RENAMED:
            if mtype == _P or mtype == _B or mtype == _D:
                synced = False
                if mtype == _P:
                    client_parses += 1
                elif mtype == _B:
                    binds += 1
            if mtype == _P:
                # Read in place: a Parse's text is copied once, by the tracker.
                at = start + 5
                if (stmts or tracker.prepared.lru) and MAY_DROP_ALL.search(buf, at, end):
                    watch_drop(tracker, stmts)
                name_end = buf.find(0, at, end)
                query_at = name_end + 1
                change = None
                if needs_inspection(bytes(buf[query_at:query_at + 3])):   # SET, RESET, DISCARD ...
                    query_end = buf.find(0, query_at, end)
                    text = bytes(buf[query_at:query_end if query_end >= 0 else end])
                    change = params.query_change(text, client)
                if name_end == at:
                    client.unnamed_change = change
                else:
                    name = bytes(buf[at:name_end])
                    if name not in stmts:
                        client.stmt_sets[name] = change
                replaced = tracker.parse_at(buf, at, end, stmts, scratch)
            else:
                if end - start > _BIG:
                    with memoryview(buf) as view:
                        body = bytes(view[start + 5:end])
                else:
                    body = bytes(buf[start + 5:end])
                if mtype == _B:
                    # What the bound statement will do when executed (a SET, maybe).
                    portal_end = body.find(b"\x00")
                    name = body[portal_end + 1:body.find(b"\x00", portal_end + 1)]
                    client.portal_change = client.stmt_sets.get(name) if name else client.unnamed_change
                replaced = client_message(mtype, body, stmts, scratch)
        elif mtype == _S:
            requests += 1
            synced = True
            replaced = client_message(mtype, None, stmts, scratch, sync_effect)
            sync_effect = None
            outside = False
        elif mtype == _E and client.portal_change is not None:
            synced = False
            sync_effect = params.session_effect(client, server, client.portal_change, outside) or sync_effect
            replaced = client_message(mtype, None, stmts, scratch)
        else:
            if mtype == _F:
                requests += 1
                synced = True
            elif mtype in OWES_SYNC:
                synced = False
            replaced = client_message(mtype, None, stmts, scratch)
        if replaced:
            out = [] if out is None else out
            out.append(buf[run:start])
            out.extend(scratch)
            scratch.clear()
            run = end
    if client_parses or binds:
        stats = server.pool.stats
        stats.client_parse_count += client_parses
        stats.bind_count += binds
        stats.server_parse_count += tracker.parses - parses_before
    last = msgs[-1][2]
    if out is None:
        chunk = bytes(buf[:last])
    else:
        out.append(buf[run:last])
        # A large batch goes out piece by piece: joined, it would be one more copy.
        chunk = b"".join(out) if last <= _BIG else [piece for piece in out if len(piece)]
    del buf[:last]
    tracker.sync_effect = sync_effect
    if synced is False:
        tracker.exact = True    # what fails before the Sync decides what it skips (pool/unanswered.py)
    if deferred is not None:
        # The deferred BEGIN goes first; the client had its reply already.
        for _ in deferred[0]:
            tracker.pending.insert(first_entry, _INJECTED_ENTRY)
        tracker.exact = True
        requests += len(deferred[0])
        chunk = [*deferred[0], *chunk] if type(chunk) is list else b"".join(deferred[0]) + chunk
    if tracker.pending and tracker.pending[0][0] == _FAKE:
        # Replies answered here with nothing outstanding before them go out
        # now, before the batch reaches the server and its replies can follow.
        fakes = tracker.first_fakes()
        if fakes:
            client.send(fakes)
    if type(chunk) is list:
        for piece in chunk[:-1]:
            client._send(piece, 0, None)
        chunk = chunk[-1] if chunk else b""
    if chunk:
        client._send(chunk, requests, synced)
    else:
        if synced is not None:
            server.unsynced = not synced
        if server.client is client:
            server._maybe_release()
