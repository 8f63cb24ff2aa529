"""Reading several shards' replies back for one client (net/sharded.py): merged
statement by statement, and the quiet rollback of a failed transaction."""

from __future__ import annotations

from ..proto import messages as m
from ..sharding.merge import merge_results
from ..sharding.rows import parse_data_row
from .shard_link import ShardLost

_Z, _E, _C, _EMPTY, _D = (ord(c) for c in "ZECID")


def rollback_quietly(session, shard_link) -> None:
    try:
        shard_link.send_request(m.query("ROLLBACK"), 1, session.client.request_time)
        for _ in shard_link.messages():
            pass
    except ShardLost:
        pass


COLLATION_QUERY = ("SELECT datcollate, coalesce(to_jsonb(d) ->> 'datlocprovider', 'c') "
                   "FROM pg_database d WHERE datname = current_database()")


def learn_collation(session) -> None:
    """Once per sharded database (kept on its planner): do all its shards order
    text by its bytes (libc C / POSIX / C.UTF-8)? Unknown (a shard could not be
    asked) counts as no, and the next client asks again."""
    from .shard_link import link, unlink
    planner = session.planner
    if planner.bytewise_text is not None:
        return
    answers = []
    try:
        for shard in range(len(session.sdb.shards)):
            shard_link = link(session.app, session.client, shard, session.pool(shard))
            try:
                shard_link.send_request(m.query(COLLATION_QUERY), 1, session.client.request_time)
                answers.append([parse_data_row(body) for mtype, body in shard_link.messages()
                                if mtype == _D])
            finally:
                unlink(session.app, shard_link, session.client.request_time)
    except Exception:  # noqa: BLE001 - a shard down now: asked again by the next client
        return
    planner.bytewise_text = all(
        rows and rows[0][1] in (b"c", "c") and _bytewise(rows[0][0]) for rows in answers)


def _bytewise(collate) -> bool:
    name = (collate.decode() if isinstance(collate, bytes) else str(collate)).lower()
    return name in ("c", "posix") or name.startswith("c.")


def merge_replies(session, links, merge, skip, hide, send=None) -> tuple[bytes, bool]:
    """Merge the shards' replies statement by statement (a text may hold
    several) up to every shard's ReadyForQuery; ``skip``: message types
    dropped from the shards' replies (ParseComplete...), ``hide``: from the
    merged ones (b"T"...). Sends the merged rows as they come (to ``send``,
    the client's socket by default); returns the tail to send and whether it
    failed."""
    statuses = {}
    send = send or session.client.send
    pending: list = []
    failed = False

    def stream(shard_link):
        for mtype, body in shard_link.messages():
            if mtype == _Z:              # not reached: peeked before
                statuses[shard_link.shard] = body[:1]
                return
            if mtype in skip:
                continue
            yield mtype, body
            if mtype == _C or mtype == _E or mtype == _EMPTY:
                return

    while True:
        live = []
        for shard_link in links:
            if shard_link.shard in statuses:
                continue
            while shard_link.peek() in skip:
                next(shard_link.messages())
            if shard_link.peek() == _Z:
                statuses[shard_link.shard] = next(shard_link.messages())[1][:1]
            else:
                live.append(shard_link)
        if not live:
            break
        for piece in merge_results(merge, [stream(lk) for lk in live], bool(session.planner.bytewise_text)):
            kind = piece[:1]
            if kind == b"E":
                failed = True
            elif kind in hide:
                continue
            pending.append(piece)
            if len(pending) >= 64:
                send(b"".join(pending))
                pending.clear()
    if failed and session.status == b"T":
        session.status = b"E"
        for shard_link in session.links.values():
            if statuses.get(shard_link.shard) == b"T":
                rollback_quietly(session, shard_link)
    return b"".join(pending), failed
