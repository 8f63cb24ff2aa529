"""The extended protocol on a sharded database (net/sharded.py).

Statements and portals live here, in the pooler: Parse and Bind are answered
at once (ParseComplete, BindComplete), and each Execute is sent to the shards
its Bind values choose as an unnamed Parse + Bind + Describe + Execute + Sync
of its own — so a statement the client prepared once is prepared on whichever
shards its executions reach, and the shards need no statement names. The
Describe a client asks for is answered by one shard with the client's own text.
An error skips the rest of the client's messages up to its Sync, as a server
would.
"""

from __future__ import annotations

import struct

from ..proto import messages as m
from ..proto.framing import ProtocolError
from ..sharding.rules import ShardingError
from . import shard_portal
from .checkout import ClientError
from .shard_link import ShardLost

_U16 = struct.Struct("!H")
_I32 = struct.Struct("!i")
_Z, _E, _C, _I = (ord(c) for c in "ZECI")
_P, _B, _D, _S, _H, _X, _CL = (ord(c) for c in "PBDSHEC")
_DROP = frozenset(b"123")           # ParseComplete, BindComplete, CloseComplete from shards
_DESCRIBE_DROP = frozenset(b"12")
_ROWS_DROP = frozenset(b"12Tn")     # at Execute the description was given by Describe
PARSE_COMPLETE = m.message(b"1")
BIND_COMPLETE = m.message(b"2")
CLOSE_COMPLETE = m.message(b"3")
NO_DATA = m.message(b"n")
DESCRIBE_PORTAL = m.message(b"D", b"P\x00")


class Statement:
    __slots__ = ("text", "types", "plan")

    def __init__(self, text, types, plan):
        self.text = text
        self.types = types       # the Parse message's parameter-type tail, as sent
        self.plan = plan


class Portal:
    __slots__ = ("statement", "params", "formats", "result_formats", "bind_tail", "kept")

    def __init__(self, statement, params, formats, result_formats, bind_tail):
        self.statement = statement
        self.params = params
        self.formats = formats
        self.result_formats = result_formats
        self.bind_tail = bind_tail      # the Bind body after the portal and statement names
        self.kept = None                # a row-limited result being handed out (shard_portal)


MAX_STATEMENTS = 10000            # per client: the pooler keeps them, not the shards
MAX_STATEMENT_BYTES = 64 << 20    # their texts together


class ExtendedState:
    __slots__ = ("statements", "portals", "out", "failed", "deferred", "text_bytes")

    def __init__(self):
        self.statements: dict[bytes, Statement] = {}
        self.portals: dict[bytes, Portal] = {}
        self.out: list[bytes] = []
        self.failed = False
        self.deferred: bytes | None = None   # a Describe of this portal, sent with its Execute
        self.text_bytes = 0                  # the statements' texts together


def _cstr(body: bytes, pos: int) -> tuple[bytes, int]:
    end = body.find(b"\x00", pos)
    if end < 0:
        raise ProtocolError("unterminated string in message")
    return body[pos:end], end + 1


def _parse_bind(body: bytes):
    portal, pos = _cstr(body, 0)
    name, pos = _cstr(body, pos)
    tail = body[pos:]
    try:
        (nformats,) = _U16.unpack_from(body, pos)
        pos += 2
        formats = struct.unpack_from(f"!{nformats}h", body, pos)
        pos += 2 * nformats
        (nparams,) = _U16.unpack_from(body, pos)
        pos += 2
        params = []
        for _ in range(nparams):
            (size,) = _I32.unpack_from(body, pos)
            pos += 4
            if size < 0:
                params.append(None)
            else:
                if pos + size > len(body):
                    raise ProtocolError("invalid Bind message")
                params.append(body[pos:pos + size])
                pos += size
        (nresults,) = _U16.unpack_from(body, pos)
        result_formats = struct.unpack_from(f"!{nresults}h", body, pos + 2)
    except struct.error:
        raise ProtocolError("invalid Bind message") from None
    if len(formats) > 1 and len(formats) != len(params):
        raise ProtocolError("bind message has wrong number of parameter formats")
    per_param = (tuple(formats) * len(params) if len(formats) == 1 else tuple(formats)
                 or (0,) * len(params))
    return portal, name, Portal(None, params, per_param, result_formats, tail)


def message(session, mtype: int, body: bytes) -> None:
    """One extended-protocol message of a sharded client."""
    state = session.extended
    if state.failed and mtype != _S:
        return
    try:
        deferred = state.deferred
        if deferred is not None:
            state.deferred = None
            if mtype == _X and body.startswith(deferred + b"\x00"):
                _message(session, state, mtype, body, describe=True)    # one round trip for both
                return
            _describe(session, state, b"P" + deferred + b"\x00")
            if state.failed and mtype != _S:
                return
        _message(session, state, mtype, body)
    except ShardLost:
        from .sharded import shard_lost
        state.out.append(shard_lost(session))
        state.failed = True
    except ShardingError as exc:
        _fail(session, state, exc.sqlstate, exc.text)
    except ClientError as exc:
        if exc.close:
            raise
        _fail(session, state, exc.sqlstate, exc.text)


def _fail(session, state, sqlstate: str, text: str) -> None:
    from .sharded import error_reply
    state.out.append(error_reply(session, sqlstate, text))
    state.failed = True


def _message(session, state, mtype: int, body: bytes, describe: bool = False) -> None:
    if mtype == _P:
        name, pos = _cstr(body, 0)
        text, pos = _cstr(body, pos)
        if session.status == b"E" and not _ends_transaction(session, text):
            raise ClientError("25P02", _ABORTED, close=False)     # as PostgreSQL's Parse
        if name and name in state.statements:
            raise ClientError("42P05", f'prepared statement "{name.decode(errors="replace")}" '
                                       "already exists", close=False)
        if len(body) < pos + 2 or len(body) != pos + 2 + 4 * _U16.unpack_from(body, pos)[0]:
            raise ProtocolError("invalid Parse message: parameter types do not match their count")
        if len(state.statements) >= MAX_STATEMENTS or state.text_bytes + len(text) > MAX_STATEMENT_BYTES:
            raise ClientError("54000", "too many prepared statements for one client of a sharded database "
                                       f"(at most {MAX_STATEMENTS}, {MAX_STATEMENT_BYTES >> 20} MB of text): "
                                       "close some first", close=False)
        from .sharded import plan_statement, rewritten
        sql = rewritten(session, text.decode("utf-8", "surrogateescape"))
        plan = plan_statement(session.planner, sql)
        if plan.kind == "all" and plan.statements == 0 and plan.write:
            # PostgreSQL's parser refused it (pglast is that parser): the Parse fails, as there.
            from ..sharding.plan import syntax_error
            message = syntax_error(sql)
            if message is not None:
                raise ClientError("42601", message, close=False)
        old = state.statements.get(name)
        if old is not None:                   # the unnamed statement, replaced
            state.text_bytes -= len(old.text)
        state.statements[name] = Statement(sql, body[pos:], plan)
        state.text_bytes += len(sql)
        state.out.append(PARSE_COMPLETE)
    elif mtype == _B:
        portal_name, name, portal = _parse_bind(body)
        statement = state.statements.get(name)
        if statement is None:
            raise ClientError("26000", f'prepared statement "{name.decode(errors="replace")}" '
                                       "does not exist", close=False)
        if session.status == b"E" and statement.plan.kind not in ("commit", "rollback"):
            raise ClientError("25P02", _ABORTED, close=False)     # as PostgreSQL's Bind
        if statement.plan.kind == "route":
            # A key value its type refuses fails the Bind, as in PostgreSQL (22P02).
            statement.plan.targets(portal.params, portal.formats)
        portal.statement = statement
        state.portals[portal_name] = portal
        state.out.append(BIND_COMPLETE)
    elif mtype == _D:
        if body[:1] == b"P" and body.endswith(b"\x00") and body.count(b"\x00") == 1 \
                and body[1:-1] in state.portals and state.portals[body[1:-1]].kept is None:
            state.deferred = body[1:-1]       # answered with the Execute if one follows
        else:
            _describe(session, state, body)
    elif mtype == _X:
        portal_name, pos = _cstr(body, 0)
        if len(body) != pos + 4:
            raise ProtocolError("invalid Execute message")
        portal = state.portals.get(portal_name)
        if portal is None:
            raise ClientError("34000", f'portal "{portal_name.decode(errors="replace")}" does not exist',
                              close=False)
        limit = shard_portal.max_rows(body, pos)
        if portal.kept is not None:            # a suspended portal: its next rows
            state.out.append(portal.kept.take(limit)[0])
            return
        _execute(session, state, portal, limit, describe)
    elif mtype == _CL:
        kind, name = body[:1], _cstr(body, 1)[0]
        if kind not in (b"S", b"P"):
            raise ProtocolError("invalid CLOSE message subtype")
        gone = (state.statements if kind == b"S" else state.portals).pop(name, None)
        if kind == b"S" and gone is not None:
            state.text_bytes -= len(gone.text)
        state.out.append(CLOSE_COMPLETE)
    elif mtype == _H:
        _flush(session, state)
    elif mtype == _S:
        state.failed = False
        if session.status == b"I":
            state.portals.clear()
        state.out.append(m.ready_for_query(session.status))
        _flush(session, state)


_ABORTED = "current transaction is aborted, commands ignored until end of transaction block"


def _ends_transaction(session, text: bytes) -> bool:
    """COMMIT / ROLLBACK (and their spellings): what an aborted transaction still takes."""
    plan = session.planner.plan(text.decode("utf-8", "surrogateescape")) if len(text) < 256 else None
    return plan is not None and plan.kind in ("commit", "rollback")


def _flush(session, state) -> None:
    if state.out:
        session.client.send(b"".join(state.out))
        state.out.clear()


def _describe(session, state, body: bytes) -> None:
    kind, name = body[:1], _cstr(body, 1)[0]
    if kind == b"S":
        statement = state.statements.get(name)
        if statement is None:
            raise ClientError("26000", f'prepared statement "{name.decode(errors="replace")}" '
                                       "does not exist", close=False)
        batch = (m.message(b"P", b"\x00" + statement.text.encode("utf-8", "surrogateescape") + b"\x00"
                           + statement.types) + m.message(b"D", b"S\x00") + m.SYNC)
        shard = _describe_shard(session, statement.plan, ())
    elif kind == b"P":
        portal = state.portals.get(name)
        if portal is None:
            raise ClientError("34000", f'portal "{name.decode(errors="replace")}" does not exist',
                              close=False)
        statement = portal.statement
        batch = (_parse_and_bind(statement, statement.text, portal) + m.message(b"D", b"P\x00") + m.SYNC)
        shard = _describe_shard(session, statement.plan, portal)
    else:
        raise ProtocolError("invalid DESCRIBE message subtype")
    if statement.plan.kind not in ("route", "all"):
        state.out.append(NO_DATA if kind == b"P" else m.message(b"t", b"\x00\x00") + NO_DATA)
        return
    (shard_link,) = session.take((shard,))
    try:
        _flush(session, state)
        shard_link.send_request(batch, 1, session.client.request_time)
        shard_link.errored = False
        shard_link.raw_until_ready(state.out.append, _DESCRIBE_DROP)
        if shard_link.errored:
            state.failed = True
    finally:
        session.give_back([shard_link])


def _describe_shard(session, plan, portal) -> int:
    """A Describe goes to one shard: one the statement would reach, else shard 0."""
    if session.links:
        return min(session.links)
    try:
        if portal:
            targets = session.resolve_targets(plan, portal.params, portal.formats)
        else:
            targets = None
    except ShardingError:
        targets = None
    return min(targets) if targets else 0


def _parse_and_bind(statement, sql: str, portal) -> bytes:
    return (m.message(b"P", b"\x00" + sql.encode("utf-8", "surrogateescape") + b"\x00" + statement.types)
            + m.message(b"B", b"\x00\x00" + portal.bind_tail))


def _execute(session, state, portal, limit: int = 0, describe: bool = False) -> None:
    """Run a portal; with ``describe`` its Describe too, in the same batch
    (its RowDescription or NoData passed on before the rows)."""
    from .shard_tx import local_reply
    statement = portal.statement
    plan = statement.plan
    local = local_reply(session, plan, statement.text)
    if local is not None:
        state.out.append(NO_DATA + local if describe else local)
        return
    if plan.copy is not None:
        # The rows would be read by the client loop, which is waiting for the
        # shards here: refused, as COPY FROM STDIN is split per row only in a Query.
        raise ShardingError("0A000", "COPY FROM STDIN on a sharded database needs the simple query "
                                     "protocol (a Query message), not Parse/Bind/Execute")
    targets = session.resolve_targets(plan, portal.params, portal.formats)
    session.check_transaction(targets, plan.write)
    if len(targets) > 1:
        if plan.split(portal.params, portal.formats) is not None:
            raise ShardingError("0A000", "a multi-row INSERT with parameters whose rows go to several "
                                         "shards is not supported: send one row per statement")
        if plan.merge_error is not None:
            raise ShardingError(*plan.merge_error)
        session.counters.multi_shard += 1
    else:
        session.counters.single_shard += 1
    _flush(session, state)
    kept = None
    if limit:
        held = sum(p.kept.size for p in state.portals.values() if p.kept is not None and p.kept.messages)
        kept = shard_portal.Kept(shard_portal.MAX_KEPT - held)
    sink = kept.add if kept is not None else session.client.send
    links = session.take(targets, None if plan.write else statement.text)
    try:
        if len(links) == 1:
            batch = (_parse_and_bind(statement, statement.text, portal)
                     + (DESCRIBE_PORTAL if describe else b"") + m.execute() + m.SYNC)
            shard_link = links[0]
            shard_link.send_request(batch, 1, session.client.request_time)
            shard_link.errored = False
            status = shard_link.raw_until_ready(sink, _DROP)
            from .sharded import after
            after(session, shard_link, status)
            if shard_link.errored:
                state.failed = True
        else:
            sql = plan.shard_sql or statement.text
            batch = (_parse_and_bind(statement, sql, portal) + m.message(b"D", b"P\x00") + m.execute()
                     + m.SYNC)
            _run_many(session, state, links, batch, plan.merge, kept, describe)
    finally:
        session.give_back(links)
    if kept is not None:
        _hand_out(session, state, portal, kept, limit)


def _hand_out(session, state, portal, kept, limit: int) -> None:
    """A row-limited Execute: its first ``limit`` rows now, the rest kept."""
    if not kept.finish():
        raise ClientError("54000", "the results of row-limited Executes on a sharded database are kept "
                                   f"in the pooler, and this client's would exceed {shard_portal.MAX_KEPT >> 20} MB",
                          close=False)
    state.out.append(kept.take(0 if state.failed else limit)[0])
    if not state.failed:
        portal.kept = kept


def _run_many(session, state, links, batch: bytes, merge, kept=None, describe: bool = False) -> None:
    from .shard_replies import merge_replies
    now = session.client.request_time
    for shard_link in links:
        shard_link.send_request(batch, 1, now)
    _flush(session, state)
    # The description came with a Describe answered before: the merged one is
    # left out (kept when the Describe came along with this Execute).
    tail, failed = merge_replies(session, links, merge, _DESCRIBE_DROP, () if describe else (b"T", b"n"),
                                 kept.add if kept is not None else None)
    if failed:
        state.failed = True
    if tail:
        if kept is not None:
            kept.add(tail)
        else:
            state.out.append(tail)


__all__ = ["ExtendedState", "message", "ShardLost"]
