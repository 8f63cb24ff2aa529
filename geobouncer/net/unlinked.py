"""A client's batch that finds no server linked (transaction and statement
pooling, net/forward.py): what the pooler answers itself, and the server linked
for the rest.

Linking a server for a batch PostgreSQL would answer with nothing, or that
the pooler can answer as well as a server, costs a server that the client
then holds while it idles, or makes the client wait for one that may not come
back (its own other connections hold them all). So, before a server is linked:

  drop_unanswered    the rest of a failed COPY FROM STDIN and a lone Flush:
                     PostgreSQL answers none of them; dropped.
  server_or_answer   a batch of only named Parse the pool has parsed before,
                     when no server is free (pool/statements.py parse_locally),
                     and a batch of only Close of named statements
                     (close_locally), answered here; otherwise the server
                     linked for it, or the error that kept one from being
                     linked (a switchover that timed out), answered here too.
  refuse_batch       a batch answered with an error and a ReadyForQuery per
                     request, no server (answer_lost: the first batch after a
                     switchover took the client's transaction).

The fast paths of net/forward.py call server_or_answer for their lone Query
or unnamed batch as well: it is the one place a request gets its server from
the client's greenlet, so it costs them no extra call.
"""

from __future__ import annotations

from ..pool.statements import close_locally, parse_locally
from ..proto import messages as m
from .checkout import ClientError, no_server_now
from .params import needs_inspection

_P, _C, _Q, _S = ord("P"), ord("C"), ord("Q"), ord("S")
LOST = m.error_response("08006", "server connection lost (switchover in progress): the transaction "
                         "was rolled back; retry it")
# CopyData, CopyDone, CopyFail, Flush: a batch starting with one is dropped up to the first other
NOTHING_TO_ANSWER = frozenset(b"dcfH")


def drop_unanswered(buf: bytearray, msgs: list) -> list:
    """COPY messages from a client with no server (a COPY keeps its server:
    the rest of a failed COPY FROM STDIN, sent before the error came), and a
    Flush with nothing pending: PostgreSQL answers none of them, so a server
    linked for them would be held for ever. Dropped; the messages left."""
    k = 0
    while k < len(msgs) and msgs[k][0] in NOTHING_TO_ANSWER:
        k += 1
    cut = msgs[k][1] if k < len(msgs) else msgs[-1][2]
    del buf[:cut]
    return [(mtype, start - cut, end - cut) for mtype, start, end in msgs[k:]]


def server_or_answer(client, buf: bytearray | None, msgs: list | None):
    """Link a server for the batch ``msgs`` in ``buf`` (an unnamed batch when
    ``msgs`` is None, a lone Query when ``buf`` is None too). None when the
    batch was answered here instead: Parse or Close the pooler answers
    itself, or an error the client survives."""
    if msgs is not None:
        first = msgs[0][0]
        pool = client.route_pool or client.pool
        if first == _P and no_server_now(pool):
            reply = parse_locally(client.app.registry, buf, msgs, client.statements, needs_inspection,
                                  pool.parsed)
            if reply is not None:
                del buf[:msgs[-1][2]]
                client.pool.stats.client_parse_count += sum(1 for t, _, _ in msgs if t == _P)
                client.send(reply)
                return None
        elif first == _C and pool.tracking:
            reply = close_locally(buf, msgs, client.statements)
            if reply is not None:
                del buf[:msgs[-1][2]]
                client.send(reply)
                return None
    try:
        return client._link()
    except ClientError as exc:
        if exc.close:
            raise
        error = m.error_response(exc.sqlstate, exc.text)
        if buf is None:
            client.send(error + m.READY_IDLE)
        else:
            refuse_batch(client, buf, msgs or client.scanner.messages(buf), error)
        return None


def answer_lost(client, buf: bytearray, msgs: list) -> None:
    """The first batch after a lost transaction (a switchover, net/client.py)
    gets the error, not a server."""
    if refuse_batch(client, buf, msgs, LOST):
        client.lost_tx = False


def refuse_batch(client, buf: bytearray, msgs: list, error: bytes) -> bool:
    """Answer a batch here with ``error`` and a ReadyForQuery per request it
    holds, without a server; the client stays connected. True if it was
    answered (it held a Query or a Sync)."""
    owed = sum(1 for mtype, _, _ in msgs if mtype == _Q or mtype == _S)
    del buf[:msgs[-1][2]]
    if owed:
        client.send(error + m.READY_IDLE * owed)
    return bool(owed)
