"""Per-batch routing of a client's work: the rewrite_query and routing_rules
hooks (pgbouncer-rr) and the automatic read/write split. Functions over a
ClientConnection (net/client.py)."""

from __future__ import annotations

import logging

from ..proto import messages as m
from ..routing import RewriteFailed
from ..routing.classify import BEGIN_READ_ONLY, READ
from .checkout import ClientError

log = logging.getLogger("geobouncer")

_Q, _P, _B = (ord(c) for c in "QPB")
_READ, _BEGIN_READ_ONLY = READ, BEGIN_READ_ONLY


def route_batch(client, buf: bytearray, msgs: list) -> list:
    """Run rewrite_query, the read/write split, then routing_rules on every
    Query and Parse of the batch. A route takes effect only at a transaction
    boundary: the first routable message of a batch that starts outside a
    transaction. The routing hook has the last word."""
    hooks = client.app.hooks
    split = client.rw_split
    server = client.server
    # A deferred BEGIN (net/defer_begin.py): the hooks are told in_transaction
    # as without the deferral (true), but this first statement still routes.
    deferred = client.deferred_begin
    in_tx = deferred is not None or (server is not None and (server.tx_status != b"I" or not server.answered()))
    target = None
    decided = in_tx and deferred is None
    # The split classes such a transaction by its BEGIN, as before the deferral:
    # plain to the primary (a later statement may write, or read its own write),
    # READ ONLY to a replica. A routing hook still has the last word.
    begin_kind = deferred[1] if deferred is not None else None
    rewritten: dict[int, bytes] = {}   # message index -> its new bytes
    for index, (mtype, start, end) in enumerate(msgs):
        if mtype == _B and not decided and (client.stmt_routes or split):
            # A Bind of a statement prepared earlier goes where its Parse was
            # routed, or (read/write split) where its class of statement goes.
            portal_end = buf.index(0, start + 5)
            name = bytes(buf[portal_end + 1:buf.index(0, portal_end + 1)])
            if split and (begin_kind or name in client.stmt_class):
                target = _split_target(client, begin_kind or client.stmt_class[name])
            else:
                target = client.stmt_routes.get(name)
            decided = in_tx = True
        if mtype != _Q and mtype != _P:
            continue
        body = bytes(buf[start + 5:end])
        if mtype == _Q:
            q_start, q_end = 0, len(body) - 1
        else:
            q_start = body.index(b"\x00") + 1
            q_end = body.index(b"\x00", q_start)
        text = body[q_start:q_end].decode("utf-8", "surrogateescape")
        if hooks.has_rewrite:
            try:
                new_text = hooks.rewrite(client.user, text, in_tx)
            except RewriteFailed as exc:
                raise ClientError("XX000", f"query rewrite failed: {exc}") from None
            if new_text is not None and new_text != text:
                text = new_text
                body = body[:q_start] + text.encode("utf-8", "surrogateescape") + body[q_end:]
                rewritten[index] = m.message(bytes((mtype,)), body)
        if split:
            kind = client.app.classifier.classify(text)
            if mtype == _P and q_start > 1:
                client.stmt_class[body[:q_start - 1]] = kind
            if not decided:
                target = _split_target(client, begin_kind or kind)
        if hooks.has_routing:
            key = hooks.route(client.user, text, in_tx, client.app.is_database_key)
            if key is not None and not decided:
                target = key   # the user's hook has the last word
            elif key is not None and key != (target or _route_key(client)):
                _log_refused_route(client, key)
            if mtype == _P and q_start > 1:   # a named statement: remember its route
                client.stmt_routes[body[:q_start - 1]] = target or _route_key(client)
        decided = in_tx = True
    if target is not None:
        _route_to(client, target)
    if not rewritten:
        return msgs
    # Rebuild the batch with the rewritten messages, and their new offsets.
    parts = [rewritten.get(i) or bytes(buf[start:end]) for i, (_, start, end) in enumerate(msgs)]
    buf[:msgs[-1][2]] = b"".join(parts)
    rebuilt, pos = [], 0
    for (mtype, _, _), raw in zip(msgs, parts):
        rebuilt.append((mtype, pos, pos + len(raw)))
        pos += len(raw)
    return rebuilt


def _split_target(client, kind: str) -> str:
    """Reads (and BEGIN READ ONLY) to a healthy replica, the rest to the primary."""
    primary = client.pool.db.name
    if kind == _READ or kind == _BEGIN_READ_ONLY:
        return client.app.failover.pick_replica(primary) or primary
    return primary


def _route_key(client) -> str:
    pool = client.server.pool if client.server is not None else (client.route_pool or client.pool)
    return pool.db.name


def _route_to(client, key: str) -> None:
    """Send this client's next work to the [databases] entry ``key``."""
    if key == _route_key(client):
        return
    entry = client.app.database_for(key)
    pool = client.app.get_pool(entry, client.user, client.auth_result)
    client.route_pool = pool
    server = client.server
    if server is not None:
        # Session pooling: keep one server per pool the client was routed to.
        client.held[server.pool] = server
        client.server = client.held.pop(pool, None)


def _log_refused_route(client, key: str) -> None:
    if key not in client.refused_routes:
        client.refused_routes.add(key)
        log.warning("%s routing_rules chose %s in the middle of a transaction on %s: ignored",
                    client.label(), key, _route_key(client))
