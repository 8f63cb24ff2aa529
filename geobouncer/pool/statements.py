"""What the prepared-statement rename stands on: statement ids, and who has what.

pool/prepared.py's Tracker renames a client's statements to pooler-wide ones
(its docstring has the theory of operation). This module holds the pieces that
match no reply to any request, so need none of the Tracker's FIFO:

  Registry          one pooler-wide id per distinct (query text, parameter
                    types), bounded; owned by the Bouncer.
  ParsedSet         the ids some server of one pool parsed successfully, which
                    the Registry holds weakly so forgotten ids leave it.
  parse_locally     answers a batch of only named Parse from those sets,
                    with no server at all (net/unlinked.py calls it).
  ServerStatements  the LRU of ids one server connection has prepared.
  server_name       an id's name on the server, ``GB_<id>``.

Each Tracker reads the Registry and keeps one ServerStatements; nothing here
knows the Tracker, so the dependency runs one way (prepared.py imports this
module, with the ParseComplete reply and the size limit both use).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

from ..proto import messages as m

_BIG = 1 << 16        # bodies above this are sliced through views, not copied
_P, _S, _H_ = (ord(c) for c in "PSH")
_C_ = ord("C")          # Close
_S_KIND = ord("S")      # ... of a statement (not a portal)

PARSE_COMPLETE = m.message(b"1")


class ParsedSet(set):
    """Ids some server of one pool parsed successfully; hashed by identity so
    the Registry can hold it weakly."""

    __slots__ = ()
    __hash__ = object.__hash__


class Registry:
    """Pooler-wide ids for distinct statements (query text + parameter types).

    Bounded: the least recently registered texts are forgotten beyond
    ``capacity``, so a stream of distinct statements does not grow memory for
    ever. Ids are never reused: a forgotten text seen again gets a new id (a
    new server name), and clients or servers that still hold the old id go on
    using it (a client keeps its own copy of the text)."""

    def __init__(self, capacity: int = 10000):
        self.ids: OrderedDict[bytes, int] = OrderedDict()
        self.capacity = capacity
        self.last_id = 0
        self.parsed_sets: weakref.WeakSet = weakref.WeakSet()
        self.parsed = self.parsed_set()   # default for Tracker.parsed (one set per pool in the pooler)

    def parsed_set(self) -> ParsedSet:
        """A new per-pool set of parsed ids (held weakly); forgotten ids leave it too."""
        parsed = ParsedSet()
        self.parsed_sets.add(parsed)
        return parsed

    def id_for(self, key: bytes) -> int:
        ids = self.ids
        sid = ids.get(key)
        if sid is None:
            self.last_id = sid = self.last_id + 1
            ids[key] = sid
            if len(ids) > self.capacity:
                _, old = ids.popitem(last=False)
                for parsed in self.parsed_sets:
                    parsed.discard(old)
        else:
            ids.move_to_end(key)
        return sid


_PARSE_ONLY = frozenset((_P, _S, _H_))


def parse_locally(registry: Registry, buf, msgs: list, client_stmts: dict,
                  needs_server=lambda head: False, parsed: set | None = None) -> bytes | None:
    """Answer a batch of only named Parse (+ Sync / Flush) without a server,
    when every statement has parsed successfully before with the same text and
    parameter types: ParseComplete per Parse, ReadyForQuery (idle: the client
    holds no server, so it is outside a transaction) per Sync. The statements
    are prepared on a server when first bound. None when the batch needs one
    (and for texts ``needs_server(first three bytes)`` says must be seen there).

    This is what lets a client that prepares synchronously while its other
    connections hold every server (pgbench -M prepared, many clients per
    thread) go on instead of waiting for a server that cannot come back."""
    names = []
    seen = set()
    for mtype, start, end in msgs:
        if mtype != _P:
            if mtype not in _PARSE_ONLY:
                return None
            continue
        if end - start > _BIG:
            return None      # a huge text: not worth a copy to look it up
        name_end = buf.index(0, start + 5, end)
        name = bytes(buf[start + 5:name_end])
        tail = bytes(buf[name_end + 1:end])
        if needs_server(tail[:3]):
            return None
        sid = registry.ids.get(tail)
        if not name or name in client_stmts or sid not in (registry.parsed if parsed is None else parsed) \
                or name in seen:
            return None
        seen.add(name)
        names.append((name, sid, tail))
    if not names:
        return None
    out = []
    for mtype, _, _ in msgs:
        if mtype == _P:
            out.append(PARSE_COMPLETE)
        elif mtype == _S:
            out.append(m.READY_IDLE)
    for name, sid, tail in names:
        client_stmts[name] = (sid, tail)
    return b"".join(out)


_CLOSE_COMPLETE = m.message(b"3")
_CLOSE_ONLY = frozenset((_C_, _S, _H_))


def close_locally(buf, msgs: list, client_stmts: dict) -> bytes | None:
    """Answer a batch of only Close of named statements (+ Sync / Flush)
    without a server: the statements are the client's names for the pooler's
    (the tracker answers such a Close itself when a server is linked, never
    sending it on), so CloseComplete per Close, ReadyForQuery (idle) per Sync.
    Linking a server for it held that server while the client, having sent
    no Sync, idled. None when the batch needs a server (a portal, the
    unnamed statement, anything else)."""
    names = []
    for mtype, start, end in msgs:
        if mtype not in _CLOSE_ONLY:
            return None
        if mtype == _C_:
            if end - start < 8 or buf[start + 5] != _S_KIND or buf.find(0, start + 6, end) != end - 1:
                return None         # a portal, the unnamed statement, or malformed: the server says
            names.append(bytes(buf[start + 6:end - 1]))
    if not names:
        return None
    for name in names:
        client_stmts.pop(name, None)
    return b"".join(_CLOSE_COMPLETE if mtype == _C_ else m.READY_IDLE
                    for mtype, _, _ in msgs if mtype != _H_)


class ServerStatements:
    """The statements one server connection has prepared, least recently used first."""

    __slots__ = ("limit", "lru")

    def __init__(self, limit: int):
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.limit = limit

    def __contains__(self, sid: int) -> bool:
        return sid in self.lru

    def __len__(self) -> int:
        return len(self.lru)

    def touch(self, sid: int) -> None:
        self.lru.move_to_end(sid)

    def add(self, sid: int) -> int | None:
        """Record ``sid``; returns an evicted id the caller must close, or None."""
        self.lru[sid] = None
        if self.limit and len(self.lru) > self.limit:
            evicted, _ = self.lru.popitem(last=False)
            return evicted
        return None

    def restore(self, sid: int) -> None:
        """The server still has ``sid`` (its Close was skipped): least recent again."""
        self.lru[sid] = None
        self.lru.move_to_end(sid, last=False)

    def discard(self, sid: int) -> None:
        self.lru.pop(sid, None)

    def clear(self) -> None:
        self.lru.clear()


def server_name(sid: int) -> bytes:
    return b"GB_%d\x00" % sid
