"""The client's loop for a sharded database (``app = shards=app_0,app_1,...``).

Every request is planned (sharding/plan.py: which shards, how to merge), sent
to the shards' servers (one server per shard, linked through a ShardLink,
net/shard_link.py) and the replies are passed on as they are (one shard) or
merged (sharding/merge.py). Servers are taken in shard order, so two clients
that each need several shards never wait on each other in a circle.

Transactions are routed by their first statement: a lone BEGIN is answered
here and sent, with its options, in front of the first statement, to the
shard that statement goes to. A transaction stays on the shards it touched;
reaching another shard is refused (25000-class error, the transaction is then
failed), or with ``two_phase_commit`` joins it, and COMMIT runs PREPARE
TRANSACTION on every shard before COMMIT PREPARED (net/two_phase.py).
Outside a transaction each request takes servers and gives them back at once
(transaction pooling), whatever the pool_mode.
"""

from __future__ import annotations

import logging
from time import monotonic

import gevent

from ..proto import messages as m
from ..proto.framing import ProtocolError
from ..routing import RewriteFailed
from ..routing.classify import READ
from ..sharding.counters import ShardCounters
from ..sharding.plan import MAX_CACHED_TEXT, Planner
from ..sharding.rules import ShardingError
from . import extended_shard
from .checkout import ClientError
from .login import ClientGone
from .shard_link import ShardLost, link, unlink
from .shard_replies import learn_collation, merge_replies, rollback_quietly
from .shard_inbox import Inbox, count_request, count_sent
from .shard_tx import local_reply, shard_for_key

log = logging.getLogger("geobouncer")

_Q, _X, _Z, _E, _C, _EMPTY = (ord(c) for c in "QXZECI")
_P, _B, _D, _S, _H, _F, _CLOSE = (ord(c) for c in "PBDSHFC")
_EXTENDED = frozenset((_P, _B, _D, _S, _H, _CLOSE, ord("E")))
_COPY_STRAYS = frozenset(b"dcf")

_ROUTABLE = frozenset(("route", "all"))
_planners: dict = {}


def plan_for(planner, text: str):
    """The plan of a simple Query's text. A text too long to be cached
    (hundreds of kB: a bulk INSERT, or an attack) is planned in a thread, so
    its parse shares the interpreter with everyone else's work instead of
    stopping it."""
    return _off_the_hub(planner.plan_text, text)


def plan_statement(planner, text: str):
    """A Parse's plan (extended protocol), long texts in a thread as above."""
    return _off_the_hub(planner.plan, text)


def _off_the_hub(plan, text: str):
    if len(text) <= MAX_CACHED_TEXT:
        return plan(text)
    return gevent.get_hub().threadpool.apply(plan, (text,))


def planner_for(sdb) -> Planner:
    planner = _planners.get(sdb.name)
    if planner is None or planner.sdb is not sdb:
        planner = _planners[sdb.name] = Planner(sdb)
    return planner


class ShardSession:
    """A sharded client's state: its transaction and the shards it holds."""

    __slots__ = ("client", "app", "sdb", "planner", "pools", "links", "status", "begin_sql",
                 "forced_shard", "forced_key", "extended", "counters", "next_message", "written",
                 "tx_started")

    def __init__(self, client):
        app = client.app
        self.client = client
        self.app = app
        self.sdb = app.cfg.sharded[client.pool.db.name]
        self.planner = planner_for(self.sdb)
        self.pools = [None] * len(self.sdb.shards)
        self.links: dict[int, object] = {}   # shard -> ShardLink, held for the transaction
        self.status = b"I"                   # the client's view: I, T or E
        self.begin_sql: str | None = None    # a BEGIN not sent yet
        self.forced_shard: int | None = None
        self.forced_key: str | None = None
        self.extended = extended_shard.ExtendedState()
        self.next_message = None             # the client's next message (Inbox.next)
        self.written: set[int] = set()       # shards this transaction wrote to
        self.tx_started: float | None = None  # when the open transaction began (SHOW STATS)
        self.counters = app.shard_stats.setdefault(self.sdb.name, ShardCounters())

    def pool(self, shard: int):
        pool = self.pools[shard]
        if pool is None or self.app.pools.get((pool.db.name, pool.user)) is not pool:
            client = self.client
            entry = self.app.database_for(self.sdb.shards[shard])
            pool = self.pools[shard] = self.app.get_pool(entry, client.user, client.auth_result)
        return pool

    def linked_servers(self) -> list:
        """The servers working for this client now (a cancel request reaches them all)."""
        return [server for pool in self.pools if pool is not None for server in list(pool.active)
                if getattr(server.client, "client", None) is self.client]

    # --- servers --------------------------------------------------------------
    def take(self, shards, read: str | None = None) -> list:
        """ShardLinks for ``shards`` (sorted), reusing those the transaction
        holds. ``read``: the text of a statement that writes nothing; outside a
        transaction it goes to a replica of a shard with read_write_split."""
        out = []
        for shard in sorted(shards):
            held = self.links.get(shard)
            if held is None:
                held = self._link_read(shard, read) if read is not None and self.status == b"I" else None
            if held is None:
                held = link(self.app, self.client, shard, self.pool(shard))
                if self.status == b"T":
                    self.links[shard] = held
                    if self.begin_sql is not None:
                        self._send_begin(held)
            out.append(held)
        return out

    def _link_read(self, shard: int, text: str):
        """A replica's server for a read, as the shard's own read/write split
        would choose (None: the shard's primary serves it)."""
        app = self.app
        name = self.sdb.shards[shard]
        entry = app.database_for(name)
        if entry is None or not entry.read_write_split or app.classifier.classify(text) != READ:
            return None
        key = app.failover.pick_replica(name)
        if key is None:
            return None
        client = self.client
        try:
            return link(app, client, shard, app.get_pool(app.database_for(key), client.user, client.auth_result))
        except ClientError:
            return None                  # the replica failed (now banned): the primary serves it

    def _send_begin(self, shard_link) -> None:
        shard_link.send_request(m.query(self.begin_sql), 1, self.client.request_time)
        failed = None
        for mtype, body in shard_link.messages():
            if mtype == _E:
                failed = body
        if failed is not None:
            fields = m.parse_error_fields(failed)
            raise ClientError(fields.get("C", "XX000"), fields.get("M", "BEGIN failed"), close=False)

    def give_back(self, links) -> None:
        for shard_link in links:
            if self.links.get(shard_link.shard) is not shard_link:
                unlink(self.app, shard_link, self.client.request_time)

    def end_transaction(self) -> None:
        self.extended.portals.clear()        # a portal lives until its transaction ends
        links, self.links = list(self.links.values()), {}
        for shard_link in links:
            unlink(self.app, shard_link, self.client.request_time)
        self.begin_sql = None
        self.written = set()
        self.status = b"I"

    def close_all(self) -> None:
        for shard_link in self.links.values():
            shard_link.server.client = None
            if not shard_link.server.closed:
                shard_link.server.close("sharded client disconnected in a transaction")
        self.links.clear()

    # --- targets --------------------------------------------------------------
    def resolve_targets(self, plan, params=(), formats=(), text=None):
        """The shards a statement goes to: a comment hint, else SET
        geobouncer.shard / sharding_key, else the routing hook's answer (one of
        this database's shard entries), else the plan's."""
        hooks = self.app.hooks
        if plan.hint is not None:
            shard = plan.hint
        elif self.forced_shard is not None:
            shard = self.forced_shard
        elif self.forced_key is not None:
            shard = shard_for_key(self.sdb, self.forced_key)
        elif hooks.has_routing and plan.kind in _ROUTABLE and (
                key := hooks.route(self.client.user, text or plan.sql, self.status != b"I",
                                   self.sdb.shards.__contains__)) is not None:
            shard = self.sdb.shards.index(key)
        else:
            targets = plan.targets(params, formats)
            return frozenset(range(len(self.sdb.shards))) if targets is None else targets
        if not 0 <= shard < len(self.sdb.shards):
            raise ShardingError("22023", f"no shard {shard}: database {self.sdb.name} has "
                                         f"{len(self.sdb.shards)} shards")
        return frozenset((shard,))

    def check_transaction(self, targets, write: bool) -> None:
        """Inside a transaction: reads may reach any shard (each joins the
        transaction); writes may reach one shard, or several with 2PC."""
        if self.status != b"T":
            return
        if write:
            written = self.written | set(targets)
            if len(written) > 1 and not self.app.settings.two_phase_commit:
                raise ShardingError("0A000", "a transaction may not write to more than one shard "
                                             f"(it wrote to shard {min(self.written or targets)}); "
                                             "set two_phase_commit = 1 to allow it")
            self.written = written


def serve(client) -> None:
    """The loop: whole messages from the client, one at a time."""
    session = client.shard_session = ShardSession(client)
    inbox = Inbox(client)
    session.next_message = inbox.next
    learn_collation(session)             # once per sharded database
    stats = client.pool.stats            # SHOW STATS: the sharded database's own row
    count_sent(client, stats)
    started = None                       # the first message of the request being served
    try:
        while True:
            mtype, body = inbox.next()
            now = client.request_time = monotonic()
            if mtype == _X:
                raise ClientGone()
            if started is None:
                started = now
            if mtype == _Q:
                _simple(session, body)
                count_request(session, stats, started)
                started = None
            elif mtype in _EXTENDED:
                extended_shard.message(session, mtype, body)
                if mtype == _S:
                    count_request(session, stats, started)
                    started = None
            elif mtype in _COPY_STRAYS:
                continue            # CopyData / CopyDone / CopyFail outside COPY: ignored, as PostgreSQL does
            else:
                raise ClientError("0A000", "this message type is not supported on a sharded database")
    finally:
        session.close_all()


def _reply(session, data: bytes) -> None:
    session.client.send(data + m.ready_for_query(session.status))


def error_reply(session, sqlstate: str, text: str) -> bytes:
    """An error for the current request; inside a transaction it fails it."""
    if session.status == b"T":
        session.status = b"E"
        for shard_link in session.links.values():
            rollback_quietly(session, shard_link)
    return m.error_response(sqlstate, text)


def shard_lost(session) -> bytes:
    """A shard's server went away mid-request: the transaction, if any, is
    gone on every shard (the servers still held are closed, which rolls them
    back); the client stays and may retry."""
    in_transaction = session.status != b"I"
    for shard_link in list(session.links.values()):
        unlink(session.app, shard_link, session.client.request_time)
    session.links.clear()
    session.begin_sql = None
    session.status = b"E" if in_transaction else b"I"
    return m.error_response("08006", "server connection lost on a shard: the request was not completed"
                            + ("; the transaction was rolled back" if in_transaction else ""))


def rewritten(session, text: str) -> str:
    """rewrite_query's text for a sharded statement (planned after it)."""
    hooks = session.app.hooks
    if not hooks.has_rewrite:
        return text
    try:
        new_text = hooks.rewrite(session.client.user, text, session.status != b"I")
    except RewriteFailed as exc:
        raise ClientError("XX000", f"query rewrite failed: {exc}") from None
    return text if new_text is None else new_text


def _simple(session, body: bytes) -> None:
    if body[-1:] != b"\x00" or b"\x00" in body[:-1]:
        raise ProtocolError("invalid string in message")     # as PostgreSQL says; FATAL here
    text = body[:-1].decode("utf-8", "surrogateescape")
    try:
        out = run_statement(session, rewritten(session, text))
    except ShardLost:
        out = shard_lost(session)
    except ShardingError as exc:
        out = error_reply(session, exc.sqlstate, exc.text)
    except ClientError as exc:
        if exc.close:
            raise
        out = error_reply(session, exc.sqlstate, exc.text)
    if out is not None:
        _reply(session, out)


def run_statement(session, text: str):
    """One simple Query. Returns the reply to send before ReadyForQuery, or
    None when the replies were passed on already (ReadyForQuery included)."""
    plan, params = plan_for(session.planner, text)
    local = local_reply(session, plan, text)
    if local is not None:
        return local
    targets = session.resolve_targets(plan, params, (), text)
    session.check_transaction(targets, plan.write)
    split = plan.split() if len(targets) > 1 else None
    if len(targets) > 1 and plan.merge_error is not None and split is None:
        raise ShardingError(*plan.merge_error)
    if len(targets) > 1:
        session.counters.multi_shard += 1
    else:
        session.counters.single_shard += 1
    if plan.copy is not None:
        from . import copy_shard
        return copy_shard.run(session, plan, text, targets)
    if split is not None:
        targets = frozenset(split)
    links = session.take(targets, None if plan.write else text)
    try:
        if len(links) == 1:
            return _one_shard(session, links[0], split[links[0].shard] if split else text)
        if split is not None:
            texts = split
            merge = None
        else:
            sql = plan.shard_sql or text
            texts = {lk.shard: sql for lk in links}
            merge = plan.merge
        return _many_shards(session, links, texts, merge)
    finally:
        session.give_back(links)


def _one_shard(session, shard_link, text: str):
    shard_link.send_request(m.query(text), 1, session.client.request_time)
    status = shard_link.raw_until_ready(session.client.send)
    after(session, shard_link, status)
    return None


def after(session, shard_link, status: bytes) -> None:
    """The shard's transaction status after a request decides the client's."""
    if session.status == b"T" and status == b"E":
        session.status = b"E"
    elif status == b"I" and session.status != b"I" and len(session.links) <= 1:
        session.end_transaction()          # the text itself ended the transaction (COMMIT inside)
    elif session.status == b"I" and status != b"I":
        # A transaction opened by the text itself ("BEGIN; ..."): the server
        # stays with the client until the transaction ends.
        session.status = status
        session.links[shard_link.shard] = shard_link


def _many_shards(session, links, texts: dict, merge):
    now = session.client.request_time
    for shard_link in links:
        shard_link.send_request(m.query(texts[shard_link.shard]), 1, now)
    return merge_replies(session, links, merge, (), ())[0]
