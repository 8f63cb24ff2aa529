"""Protocol-level prepared statements under transaction pooling, without I/O.

Theory of operation. A client names its statements ("S1", "__asyncpg_stmt_3__");
the server connection it lands on changes from one transaction to the next. So
the pooler renames: every distinct (query text, parameter types) gets one
pooler-wide id, and a server knows it as ``GB_<id>``. Each client keeps a map
from its own names to those ids; each server connection keeps an LRU set of the
ids it has prepared, bounded by max_prepared_statements (evicted ones are
closed on the server).

On the way to the server (``Tracker.client_messages``):
  Parse(name)     -> if the server has the statement, answered locally
                     (ParseComplete faked); else forwarded renamed.
  Bind/Describe   -> renamed; if the server lacks the statement, a Parse is
                     injected first and its ParseComplete swallowed.
  Close(name)     -> forgotten by the client, answered locally (CloseComplete);
                     the server keeps the statement for other clients.
  unnamed         -> forwarded untouched.

Every message that the server answers leaves an entry in a FIFO, so the replies
coming back (``Tracker.server_message``) can be matched to their requests:
replies to injected messages are swallowed, faked replies are inserted at
their place in the stream, and after an error the entries up to the next Sync
are dropped, as the server skips those messages.

This module holds the Tracker: the renaming and the matching. Beside it, as
functions over a Tracker or needing no FIFO:
  pool/unanswered.py   the FIFO's entry kinds (net/ reads them here) and the
                       requests PostgreSQL never answers, COPY's among them;
  pool/deallocate.py   statements the client's SQL drops (DEALLOCATE, DISCARD ALL);
  pool/statements.py   the ids it renames to, each server's prepared ids,
                       parse_locally and close_locally.
"""

from __future__ import annotations

import struct
from collections import deque

from ..proto import messages as m
from .deallocate import DEALLOCATED, DROP_ALL_TAGS, drop_all_done, drop_watch_over
from .statements import _BIG, PARSE_COMPLETE, Registry, ServerStatements, server_name
from .unanswered import BIND, CLOSE, COPY_END, DESCRIBE, EXECUTE, EXTENDED, FAKE, INJECTED, PARSE, QUERY, SYNC
from .unanswered import copy_end_sent, copy_failed, drop_stale_copy_ends, ready_irregular, skip_to_sync

_HDR = struct.Struct("!cI")


CLOSE_COMPLETE = m.message(b"3")
_P, _B, _D, _C, _S, _Q, _E, _F = (ord(c) for c in "PBDCSQEF")
_COPY_ENDS = frozenset(b"cf")   # CopyDone, CopyFail
# reply types
_R_PARSE, _R_BIND, _R_CLOSE = ord("1"), ord("2"), ord("3")
_R_ROWDESC, _R_NODATA = ord("T"), ord("n")
_R_COMPLETE, _R_EMPTY, _R_SUSPENDED = ord("C"), ord("I"), ord("s")
_R_READY, _R_ERROR = ord("Z"), ord("E")
_INJECTED_SWALLOWED = frozenset(b"CN")   # CommandComplete, a notice (ReadyForQuery apart)


def _parse_pieces(sid: int, tail: bytes, out: list) -> None:
    """Parse of GB_<sid> with ``tail`` (text, types) as two pieces: the text
    is not copied into a new message."""
    sname = server_name(sid)
    out.append(_HDR.pack(b"P", 4 + len(sname) + len(tail)) + sname)
    out.append(tail)


def _cstr_end(body, pos: int) -> int:
    end = body.find(b"\x00", pos)
    if end < 0:
        raise ValueError("unterminated string")
    return end


class Tracker:
    """The rename-and-match state of one server connection while clients use it.

    ``client_messages`` and ``server_message`` are the only entry points; both
    are pure over bytes (the caller does the I/O)."""

    def __init__(self, registry: Registry, limit: int, parsed: set | None = None):
        self.registry = registry
        # Statements some server of this pool parsed successfully (parse_locally).
        self.parsed = registry.parsed if parsed is None else parsed
        self.prepared = ServerStatements(limit)
        self.pending: deque = deque()
        self.parses = 0      # Parse messages really sent (SHOW STATS server parses)
        self.status = b"I"   # the last ReadyForQuery status seen
        self.dropped_all = False   # a DEALLOCATE ALL / DISCARD ALL completed: the client's names go too
        # Something queued needs every reply matched: a faked or swallowed reply,
        # a Parse sent to the server (its success marks the statement parsed, its
        # failure unmarks it). When False, a ReadyForQuery drops every entry up to
        # its Sync/Query anyway, so only ReadyForQuery, ErrorResponse and the
        # DEALLOCATE ALL / DISCARD ALL tags need to be shown to server_message.
        self.exact = False
        # What existed when a message that may drop every statement was sent
        # (``watch_drop``, pool/deallocate.py): (server ids, the client's names), until the queue empties.
        self.drop_watch = None
        self.dropped_names = None   # with dropped_all: only these names go (None: all)
        # Requests PostgreSQL will not answer (pool/unanswered.py): skipping to a
        # Sync after an extended-protocol error, a COPY FROM STDIN swallowing
        # Syncs, CopyDone entries queued; ``settle``: the reader has news
        # (``unanswered`` to take off what the server owes, ``needs_sync``);
        # ``sync_effect``: an Execute's SET sent, its Sync or Query not yet (net/forward.py).
        # ``doubtful``: how many ReadyForQuery messages are still to come is not
        # certain (a failed COPY FROM STDIN) until ``fence`` (net/copy_fence.py) says.
        self.irregular = self.skipping = self.copy_in = self.settle = self.needs_sync = False
        self.doubtful = False
        self.fence = None
        self.unanswered, self.sync_effect = 0, None

    def reset(self) -> None:
        """The server lost its statements (DISCARD ALL, reset query)."""
        self.prepared.clear()
        self.drop_watch = None

    # --- client -> server --------------------------------------------------------
    def client_message(self, mtype: int, body, client_stmts: dict, out: list, effect=None) -> bool:
        """Translate one complete client message. Returns False when the message
        goes to the server unchanged (the caller forwards the original bytes),
        True when its replacement (or nothing, if answered locally) was appended
        to ``out``, a scratch list for this one message. ``effect`` runs when a
        simple query succeeds."""
        pending = self.pending
        if mtype == _Q or mtype == _F:
            if pending and pending[-1][0] in EXTENDED:
                self.exact = True     # skipped if one of those fails (pool/unanswered.py)
            pending.append((QUERY, False, effect))
            return False
        if mtype == _S:
            pending.append((SYNC, False, effect))
            return False
        if mtype == _E:
            pending.append((EXECUTE, False, None))
            return False
        if mtype == _B:
            portal_end = _cstr_end(body, 0)
            stmt_end = _cstr_end(body, portal_end + 1)
            if stmt_end == portal_end + 1:
                pending.append((BIND, False, None))
                return False
            sid = self._ensure(body[portal_end + 1:stmt_end], client_stmts, out)
            pending.append((BIND, False, sid))
            if sid is None:   # never prepared by this client: the server will say so
                return False
            # Header, portal, new name, then the rest as it came (a view when
            # large: parameters can be big, and are not copied again here).
            sname = server_name(sid)
            rest = memoryview(body)[stmt_end + 1:] if len(body) > _BIG else body[stmt_end + 1:]
            out.append(_HDR.pack(b"B", 4 + portal_end + 1 + len(sname) + len(rest))
                       + bytes(body[:portal_end + 1]) + sname)
            out.append(rest)
            return True
        if mtype == _P:
            return self._parse(body, 0, len(body), client_stmts, out)
        if mtype == _D:
            name = body[1:-1]
            sid = None
            if body[:1] == b"S" and name:
                sid = self._ensure(name, client_stmts, out)
            pending.append((DESCRIBE, False, sid))
            if sid is None:
                return False
            out.append(m.message(b"D", b"S" + server_name(sid)))
            return True
        if mtype == _C:
            if body[:1] == b"S" and len(body) > 2:
                client_stmts.pop(bytes(body[1:-1]), None)
                self.exact = True
                pending.append((FAKE, False, CLOSE_COMPLETE))
                return True
            pending.append((CLOSE, False, None))
            return False
        if mtype in _COPY_ENDS and (pending or self.copy_in):   # one that may end a COPY
            copy_end_sent(self)
        return False

    def parse_at(self, buf, start: int, end: int, client_stmts: dict, out: list) -> bool:
        """``client_message`` for a Parse whose body is ``buf[start:end]``: its
        text is copied once (the copy the client's statement keeps), however
        large, and goes out in pieces, never joined."""
        return self._parse(buf, start, end, client_stmts, out)

    def _parse(self, buf, start: int, end: int, client_stmts: dict, out: list) -> bool:
        name_end = buf.find(b"\x00", start, end)
        if name_end < 0:
            raise ValueError("unterminated string")
        if name_end == start:   # unnamed: lives until the next Parse, pass it through
            self.pending.append((PARSE, False, None))
            self.parses += 1
            return False
        name = bytes(buf[start:name_end])
        if type(buf) is bytes:
            tail = buf[name_end + 1:end]
        else:
            with memoryview(buf) as view:
                tail = bytes(view[name_end + 1:end])
        existing = client_stmts.get(name)
        if existing is not None:
            # The name is taken: have the server refuse it (42P05 "already exists")
            # and skip to the next Sync, as a direct connection would.
            old_sid, old_tail = existing
            if old_sid not in self.prepared:
                self._send_parse(old_sid, old_tail, out, swallow=True)
            _parse_pieces(old_sid, old_tail, out)
            self.exact = True
            self.pending.append((PARSE, False, name))   # the name, to say it in the error
            return True
        sid = self.registry.id_for(tail)
        client_stmts[name] = (sid, tail)
        if sid in self.prepared:
            self.prepared.touch(sid)
            self.exact = True
            self.pending.append((FAKE, False, PARSE_COMPLETE))
            return True
        self._send_parse(sid, tail, out, swallow=False, owner=(client_stmts, name))
        return True

    def _ensure(self, name: bytes, client_stmts: dict, out: list) -> int | None:
        """The server id for a client's statement, preparing it on this server
        first if needed. None for a name the client never prepared (forwarded
        as is: the server answers 'does not exist', as on a direct connection)."""
        known = client_stmts.get(bytes(name))
        if known is None:
            return None
        sid, tail = known
        if sid in self.prepared:
            self.prepared.touch(sid)
        else:
            self._send_parse(sid, tail, out, swallow=True)
        return sid

    def _send_parse(self, sid: int, tail: bytes, out: list, swallow: bool, owner=None) -> None:
        """``owner`` (client_stmts, name): the client's own Parse, whose name is
        freed again if the server refuses or skips it."""
        self.exact = True     # its reply is swallowed or marks the statement parsed
        evicted = self.prepared.add(sid)
        if evicted is not None:
            out.append(m.message(b"C", b"S" + server_name(evicted)))
            self.pending.append((CLOSE, True, evicted))   # skipped after an error: still there
        # The server should not have it; if it does after all (a drop that did
        # not happen, a plan gone stale), a Close first keeps the Parse from
        # failing with 42P05. Closing a missing statement is not an error.
        out.append(m.message(b"C", b"S" + server_name(sid)))
        self.pending.append((CLOSE, True, None))
        _parse_pieces(sid, tail, out)
        self.pending.append((PARSE, swallow, sid, owner))
        self.parses += 1

    def first_fakes(self) -> bytes:
        """Faked replies now at the head of the queue (nothing real before them)."""
        pending = self.pending
        if pending and pending[0][0] == COPY_END:
            drop_stale_copy_ends(self)
        out = b""
        while pending and pending[0][0] == FAKE:
            reply = pending.popleft()[2]
            out += reply if reply is not None else DEALLOCATED + m.ready_for_query(self.status)
        return out

    # --- server -> client ---------------------------------------------------------
    def ready(self, status: bytes) -> None:
        """A ReadyForQuery while ``exact`` is False: nothing queued is faked,
        swallowed or injected, and no drop is watched, so this is
        ``server_message``'s ReadyForQuery case without the matching:
        every entry up to and including its Sync or Query is done."""
        self.status = status
        pending = self.pending
        if self.irregular:
            ready_irregular(self)
        while pending:
            entry = pending.popleft()
            if entry[0] == SYNC or entry[0] == QUERY:
                if entry[2] is not None:
                    entry[2](status)
                return

    def server_message(self, mtype: int, body) -> tuple[bool, bytes]:
        """Match one reply to its request. Returns (forward it?, faked replies
        that must follow it)."""
        pending = self.pending
        if pending and pending[0][0] == COPY_END:
            drop_stale_copy_ends(self)
        if not pending:
            return True, b""
        kind = pending[0][0]
        if kind == INJECTED:
            if mtype == _R_READY:
                pending.popleft()
                self.status = bytes(body[:1])
                return False, self.first_fakes()
            return mtype not in _INJECTED_SWALLOWED, b""
        if mtype == _R_READY:
            if self.irregular:
                ready_irregular(self)
            # drop whatever the server skipped, up to and including the Sync/Query
            while pending and pending[0][0] not in (SYNC, QUERY):
                pending.popleft()
            self.status = bytes(body[:1])
            if pending:
                effect = pending.popleft()[2]
                if effect is not None:
                    effect(self.status)
            fakes = self.first_fakes() if pending else b""
            if not pending:
                self.exact = False
                if self.drop_watch is not None:
                    drop_watch_over(self)
            return True, fakes
        if mtype == _R_ERROR:
            if self.copy_in:          # a COPY that fails: what it swallowed is not known
                copy_failed(self)
                if not pending:
                    return True, b""
                kind = pending[0][0]
            if kind == QUERY:
                failed = getattr(pending[0][2], "on_error", None)
                if failed is not None:
                    failed()                        # a text whose error may keep part of it (net/params.py)
                pending[0] = (QUERY, False, None)   # a failed query has no effect to apply
                return True, b""
            replacement = b""
            if (kind == BIND or kind == DESCRIBE) and pending[0][2] is not None \
                    and b"C0A000\x00" in body:
                # "cached plan must not change result type": the server's copy
                # is stale; the next use prepares it afresh (Close + Parse).
                self.prepared.discard(pending[0][2])
            if kind == PARSE and isinstance(pending[0][2], bytes):
                # A taken name: the server named its own statement; say the client's.
                name = pending[0][2].decode(errors="replace")
                replacement = m.error_response("42P05", f'prepared statement "{name}" already exists')
            skip_to_sync(self, self.exact and kind in EXTENDED)
            return not replacement, replacement
        done = False
        if mtype == _R_COMPLETE and body[:4] in (b"DEAL", b"DISC") and bytes(body[:-1]) in DROP_ALL_TAGS:
            drop_all_done(self)
        if mtype == _R_PARSE:
            done = kind == PARSE
        elif mtype == _R_BIND:
            done = kind == BIND
        elif mtype == _R_CLOSE:
            done = kind == CLOSE
        elif mtype == _R_ROWDESC or mtype == _R_NODATA:
            done = kind == DESCRIBE
        elif mtype == _R_COMPLETE or mtype == _R_EMPTY or mtype == _R_SUSPENDED:
            done = kind == EXECUTE
        if not done:
            return True, b""
        entry = pending.popleft()
        if kind == PARSE and type(entry[2]) is int:
            self.parsed.add(entry[2])
        return not entry[1], self.first_fakes()
