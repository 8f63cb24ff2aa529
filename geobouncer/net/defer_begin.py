"""A lone BEGIN, deferred to the transaction's first statement (transaction
pooling with routing hooks or the read/write split).

A simple Query that is exactly one ``BEGIN`` / ``START TRANSACTION`` (with its
options), arriving while the client has no open transaction, is answered here
(transaction pooling only)
(CommandComplete "BEGIN" + ReadyForQuery 'T') and kept on the client
(``client.deferred_begin``: its Query messages and their class). The next batch is routed
by its own first statement (net/route.py), and the BEGIN goes to the server
chosen, just before it, as a Query the pooler injected: its CommandComplete and
ReadyForQuery are swallowed (pool/prepared.py, INJECTED), so the client sees
one BEGIN reply, the one sent here. Until then:

- COMMIT / END / ROLLBACK / ABORT (nothing else in the Query) is answered here
  (COMMIT or ROLLBACK, ReadyForQuery 'I'): nothing ran, nothing to end;
- another lone BEGIN gets PostgreSQL's WARNING 25001 "there is already a
  transaction in progress" and a BEGIN reply, and is sent after the first
  (its options apply, as on PostgreSQL; its warning from the server is
  swallowed). The class is BEGIN_READ_ONLY only when every one of them says
  READ ONLY (the split then picks a replica, whatever the first statement).

The routing hook is still called for these Queries, with in_transaction as
without the deferral (false for the first BEGIN), and its answer is not used;
the rewrite hook does not see them (a BEGIN is sent as the client wrote it).

A BEGIN preceded by a comment, one sharing its Query with other statements and
an extended-protocol BEGIN (Parse 'BEGIN' ...) are not deferred: they go to the
server as before and pin the transaction where they land.
"""

from __future__ import annotations

import re

from ..proto import messages as m
from ..routing.classify import BEGIN, BEGIN_READ_ONLY

_Q = ord("Q")
_HEADS = (b"begin", b"start")
_MAX_DEFERRED = 8    # BEGINs kept; past that one goes to the server with them (and warns from there)
_END = re.compile(rb"\s*(commit|end|rollback|abort)(?:\s+(?:work|transaction))?\s*;?\s*\Z", re.IGNORECASE)
_BEGIN_REPLY = m.command_complete("BEGIN") + m.ready_for_query(b"T")
_START_REPLY = m.command_complete("START TRANSACTION") + m.ready_for_query(b"T")
_ALREADY = m.notice_response("there is already a transaction in progress", "25001", "WARNING")
_COMMIT_REPLY = m.command_complete("COMMIT") + m.READY_IDLE
_ROLLBACK_REPLY = m.command_complete("ROLLBACK") + m.READY_IDLE


def begin_kind(client, text: bytes) -> str | None:
    """BEGIN or BEGIN_READ_ONLY when ``text`` is one lone BEGIN / START TRANSACTION."""
    if text.lstrip()[:5].lower() not in _HEADS:
        return None
    kind = client.app.classifier.classify(text.decode("utf-8", "surrogateescape"))
    return kind if kind == BEGIN or kind == BEGIN_READ_ONLY else None


def _begin_reply(text: bytes) -> bytes:
    """PostgreSQL's tag: START TRANSACTION for START TRANSACTION."""
    return _START_REPLY if text.lstrip()[:5].lower() == b"start" else _BEGIN_REPLY


def intercept(client, buf: bytearray, msgs: list) -> bool:
    """Answer the batch here when it is a BEGIN to defer, or what ends or
    repeats a deferred one. True when answered (and removed from ``buf``)."""
    if len(msgs) != 1 or msgs[0][0] != _Q or client.pool.mode == "statement":
        return False   # (statement pooling refuses transactions, at the server's ReadyForQuery)
    _, start, end = msgs[0]
    text = bytes(buf[start + 5:end - 1])
    in_tx = client.deferred_begin is not None
    if not in_tx:
        server = client.server
        if server is not None and (server.tx_status != b"I" or not server.answered()):
            return False
        kind = begin_kind(client, text)
        if kind is None:
            return False
        client.deferred_begin = ([bytes(buf[start:end])], kind)
        reply = _begin_reply(text)
    else:
        ending = _END.match(text)
        if ending is not None:
            client.deferred_begin = None
            reply = _ROLLBACK_REPLY if ending.group(1).lower() in (b"rollback", b"abort") else _COMMIT_REPLY
        elif len(client.deferred_begin[0]) < _MAX_DEFERRED and (kind := begin_kind(client, text)) is not None:
            # As PostgreSQL does: a warning, and its options apply (it is sent too).
            queries, first = client.deferred_begin
            queries.append(bytes(buf[start:end]))
            client.deferred_begin = (queries, first if kind == first else BEGIN)
            reply = _ALREADY + _begin_reply(text)
        else:
            return False
    hooks = client.app.hooks
    if hooks.has_routing:
        # Told as without the deferral (pgbouncer-rr); the answer is not used:
        # the transaction's first statement decides.
        hooks.route(client.user, text.decode("utf-8", "surrogateescape"), in_tx, client.app.is_database_key)
    del buf[:end]
    client.send(reply)
    return True
