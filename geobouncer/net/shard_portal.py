"""Execute with a row limit on a sharded database (net/extended_shard.py).

Each execution reaches the shards as Parse + Bind + Execute + Sync of its own,
so a shard's portal cannot be suspended and resumed later. An Execute with
``max_rows`` > 0 therefore runs the whole statement once, keeps the (merged)
result in the pooler's portal, and hands it out ``max_rows`` rows at a time
with PortalSuspended, as PostgreSQL would; the last Execute ends with the
CommandComplete (a SELECT's tag counting the rows of that Execute, as
PostgreSQL's does). The kept results of one client together are bounded by
MAX_KEPT bytes (its portals share the budget): past it the
Execute fails with 54000 rather than grow without limit.
"""

from __future__ import annotations

from collections import deque

from ..proto import messages as m
from ..proto.framing import message_at

MAX_KEPT = 128 << 20
PORTAL_SUSPENDED = m.message(b"s")
_D, _C = ord("D"), ord("C")


class Kept:
    """A result being collected (``add``) and then handed out (``take``)."""

    __slots__ = ("buf", "size", "messages", "overflow", "last", "budget")

    def __init__(self, budget: int = MAX_KEPT):
        self.budget = budget               # what the client's other kept results leave
        self.buf = bytearray()
        self.size = 0
        self.messages: deque | None = None
        self.overflow = False
        self.last: bytes | None = None     # the CommandComplete, once handed out

    def add(self, data: bytes) -> None:
        """The sink the execution writes to instead of the client's socket."""
        self.size += len(data)
        if self.size > self.budget:
            self.overflow = True
            self.buf.clear()
        elif not self.overflow:
            self.buf += data

    def finish(self) -> bool:
        """Split what was collected into messages; False when it overflowed."""
        if self.overflow:
            return False
        out, buf, pos = deque(), self.buf, 0
        while True:
            found = message_at(buf, pos, len(buf) + 5)
            if found is None:
                break
            out.append(bytes(buf[pos:found[2]]))
            pos = found[2]
        self.messages, self.buf = out, bytearray()
        return True

    def take(self, limit: int) -> tuple[bytes, bool]:
        """Up to ``limit`` rows (0: all that is left): the bytes to send and
        whether the result is finished (no PortalSuspended). Once finished,
        each further Execute gets the CommandComplete again with no rows, as
        PostgreSQL answers for a portal run to its end."""
        messages = self.messages
        out, rows = [], 0
        if not messages and self.last is not None:
            return _retag(self.last, 0), True
        while messages:
            first = messages[0][0]
            if first == _C:
                self.last = messages.popleft()
                out.append(_retag(self.last, rows))
                continue
            out.append(messages.popleft())
            if first == _D:
                rows += 1
                if rows == limit:
                    # PostgreSQL stops at the limit without looking further: a
                    # result of exactly that many rows is suspended too.
                    out.append(PORTAL_SUSPENDED)
                    return b"".join(out), False
        return b"".join(out), True


_COUNTED = (b"SELECT", b"INSERT", b"UPDATE", b"DELETE", b"MERGE", b"FETCH", b"MOVE")


def _retag(message: bytes, rows: int) -> bytes:
    """The CommandComplete of a portal run in pieces counts the rows of the
    last Execute only, as PostgreSQL's (SELECT n, UPDATE n, INSERT 0 n...)."""
    words = message[5:-1].split(b" ")
    if words[0] in _COUNTED and words[-1].isdigit():
        return m.command_complete(b" ".join(words[:-1] + [str(rows).encode()]).decode())
    return message


def max_rows(body: bytes, pos: int) -> int:
    """The row limit of an Execute body (after the portal name); 0 if absent."""
    if len(body) >= pos + 4:
        value = int.from_bytes(body[pos:pos + 4], "big", signed=True)
        return value if value > 0 else 0
    return 0
