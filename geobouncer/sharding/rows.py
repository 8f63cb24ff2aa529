"""One shard's reply stream, read a message at a time, and the row codecs."""

from __future__ import annotations

import struct

from ..proto.messages import error_response, message

T, D, C, E, I, N, NODATA = (ord(c) for c in "TDCEINn")
COPY_OUT, COPY_DATA = ord("H"), ord("d")
_ASYNC = frozenset(b"NAS")       # NoticeResponse, NotificationResponse, ParameterStatus
_FIELD = struct.Struct("!IhIhih")
_H = struct.Struct("!H")
_i32 = struct.Struct("!i")


def parse_row_description(body: bytes) -> list[tuple]:
    """-> [(name bytes, table oid, attnum, type oid, size, modifier, format)]."""
    (n,) = _H.unpack_from(body)
    pos, out = 2, []
    for _ in range(n):
        end = body.index(b"\x00", pos)
        out.append((body[pos:end],) + _FIELD.unpack_from(body, end + 1))
        pos = end + 1 + _FIELD.size
    return out


def row_description_body(fields: list[tuple]) -> bytes:
    return _H.pack(len(fields)) + b"".join(f[0] + b"\x00" + _FIELD.pack(*f[1:]) for f in fields)


def parse_data_row(body: bytes) -> list[bytes | None]:
    (n,) = _H.unpack_from(body)
    pos, out = 2, []
    for _ in range(n):
        (size,) = _i32.unpack_from(body, pos)
        pos += 4
        if size < 0:
            out.append(None)
        else:
            out.append(bytes(body[pos:pos + size]))
            pos += size
    return out


class Sink:
    """What the shards report outside their rows: notices, the first error, the final tag."""

    __slots__ = ("pending", "error", "complete")

    def __init__(self):
        self.pending: list[bytes] = []
        self.error: bytes | None = None
        self.complete: bytes | None = None

    def fail(self, error: bytes) -> None:
        if self.error is None:
            self.error = error

    def flush(self):
        while self.pending:
            yield self.pending.pop(0)


class Shard:
    """One shard's stream: head (up to RowDescription), rows, end (tag or error)."""

    __slots__ = ("it", "sink", "done", "tag", "nodata")

    def __init__(self, it, sink: Sink):
        self.it, self.sink = iter(it), sink
        self.done = False
        self.tag = b""
        self.nodata = False     # a NoData came first (a Describe's), then the head

    def _next(self):
        """The next message that is not a notice, or None at the end of the stream."""
        if self.done:
            return None
        for mtype, body in self.it:
            if mtype in _ASYNC:       # notices, notifications, parameter changes: passed on
                self.sink.pending.append(message(bytes((mtype,)), body))
                continue
            if mtype == C:
                self.tag = bytes(body).rstrip(b"\x00")
                self.done = True
            elif mtype in (E, I):
                self.done = True
                if mtype == E:
                    self.sink.fail(message(b"E", body))
            return mtype, body
        self.done = True
        return None

    def head(self):
        """(T, body) | (NODATA, b"") | the end message; (E, b"") for a stream cut short."""
        msg = self._next()
        if msg is None:
            self.sink.fail(cut_short())
            return E, b""
        if msg[0] == NODATA:
            end = self._next()
            if end is not None and end[0] in (COPY_OUT, I):   # Describe, then a COPY TO or an empty query
                self.nodata = True
                return end
            if end is None or end[0] == E:
                self.sink.fail(cut_short())
                return E, b""
            return NODATA, b""
        return msg

    def rows(self):
        """DataRow bodies until the end of this shard's result."""
        while True:
            msg = self._next()
            if msg is None:
                return
            if msg[0] == D:
                yield msg[1]
            elif self.done:
                return

    def copy_data(self):
        """CopyData bodies until the end of this shard's COPY TO (CopyDone skipped)."""
        while True:
            msg = self._next()
            if msg is None:
                return
            if msg[0] == COPY_DATA:
                yield msg[1]
            elif self.done:
                return

    def drain(self) -> None:
        while self._next() is not None:
            pass


def cut_short() -> bytes:
    """The error for a shard whose reply ended without CommandComplete."""
    return error_response("08006", "a shard's reply ended before its CommandComplete")
