"""A sharded client's transaction control, answered by the pooler itself:
BEGIN (kept until the first statement, net/sharded.py sends it there),
COMMIT / ROLLBACK (on every shard the transaction touched, the writer last, or
two-phase, net/two_phase.py), SET / RESET geobouncer.shard and
geobouncer.sharding_key, and the planner's refusals."""

from __future__ import annotations

from ..proto import messages as m
from ..sharding.rules import ShardingError
from . import two_phase
from .shard_replies import rollback_quietly

_Z = ord("Z")


def shard_for_key(sdb, value: str) -> int:
    """SET geobouncer.sharding_key: the shard the database's first rule maps it to."""
    if not sdb.tables:
        raise ShardingError("22023", f"database {sdb.name} has no [sharded_tables] rule to map a key with")
    return sdb.tables[0].shard_for_text(value)


def local_reply(session, plan, text: str):
    """What the pooler answers itself (BEGIN, COMMIT/ROLLBACK of an untouched
    transaction, SET geobouncer.*, refusals): the reply without
    ReadyForQuery, or None when the statement goes to shards."""
    kind = plan.kind
    session.counters.queries += 1
    if kind == "begin":
        if session.status != b"I":
            return (m.notice_response("there is already a transaction in progress", "25001", "WARNING")
                    + m.command_complete("BEGIN"))
        session.status = b"T"
        session.begin_sql = text
        return m.command_complete("BEGIN")
    if kind in ("commit", "rollback"):
        return finish(session, kind)
    if session.status == b"E":
        return m.error_response("25P02", "current transaction is aborted, commands ignored until "
                                         "end of transaction block")
    if kind == "set_shard":
        if not 0 <= plan.value < len(session.sdb.shards):
            raise ShardingError("22023", f"no shard {plan.value}: database {session.sdb.name} has "
                                         f"{len(session.sdb.shards)} shards (0 to {len(session.sdb.shards) - 1})")
        session.forced_shard, session.forced_key = plan.value, None
        return m.command_complete("SET")
    if kind == "set_key":
        shard_for_key(session.sdb, plan.value)     # a value no shard takes: the error now
        session.forced_key, session.forced_shard = plan.value, None
        return m.command_complete("SET")
    if kind == "reset_shard":
        session.forced_shard = session.forced_key = None
        return m.command_complete("RESET")
    if kind == "error":
        raise ShardingError(*plan.error)
    return None



def finish(session, kind: str):
    """COMMIT / ROLLBACK: answered here when no shard was touched."""
    links = list(session.links.values())
    failed = session.status == b"E"
    try:
        if session.status == b"I":
            warning = m.notice_response("there is no transaction in progress", "25P01", "WARNING")
            return warning + m.command_complete("COMMIT" if kind == "commit" else "ROLLBACK")
        if not links:
            tag = "ROLLBACK" if failed or kind == "rollback" else "COMMIT"
            return m.command_complete(tag)
        if kind == "rollback" or failed:
            for shard_link in links:
                rollback_quietly(session, shard_link)
            return m.command_complete("ROLLBACK")
        if len(session.written) <= 1:
            # One shard wrote (or none): a plain COMMIT on each, the writer last.
            links.sort(key=lambda lk: lk.shard in session.written)
            out = []
            for shard_link in links:
                shard_link.send_request(m.query("COMMIT"), 1, session.client.request_time)
                out = [m.message(bytes((mtype,)), body) for mtype, body in shard_link.messages()
                       if mtype != _Z]
            return b"".join(out)
        return two_phase.commit(session, [lk for lk in links if lk.shard in session.written]
                                + [lk for lk in links if lk.shard not in session.written])
    finally:
        session.end_transaction()
