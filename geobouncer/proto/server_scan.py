"""The backend direction of proto/scan.py (see its docstring): ``ServerScanner``
forwards everything it need not hold (large DataRows stream through), holds
the messages in its ``watch`` set until complete and reports them, keeps the
last ReadyForQuery status, counts ReadyForQuery messages, knows when COPY
starts, and reads a reply that repeats the last one's shape by its DataRows
only.
"""

from __future__ import annotations

import struct

from .framing import ProtocolError

_unpack_len = struct.Struct("!I").unpack_from
_unpack_header = struct.Struct("!BI").unpack_from

_D = ord("D")
# Backend types every scanner watches: ReadyForQuery, ParameterStatus,
# ErrorResponse, CopyIn/Out/Both responses.
_Z, _E = ord("Z"), ord("E")
_COPY = frozenset(ord(c) for c in "GHW")
SERVER_WATCH = frozenset(ord(c) for c in "ZSEGHW")
# Replies that close an extended-protocol request (the prepared-statement tracker).
REQUEST_REPLIES = frozenset(ord(c) for c in "123TnCIs")
SERVER_HOLD_LIMIT = 1 << 26   # a watched message (an error, a status) is never this large
_LEARN_SKIP = 7         # whole replies scanned in full between two that shapes are learned from
_SHAPE_MAX = 2048       # the most bytes a reply's shape keeps (per server)


def _shape_of(data, n: int, found: list, watch: frozenset, status: bytes):
    """A whole reply ``data[:n]`` (valid: just scanned) as ServerScanner.shape:
    the bytes before its first DataRow and after its last, every watched
    message after them (None when one comes before)."""
    first = rows_end = -1
    pos = 0
    while pos < n:
        end = pos + 1 + _unpack_len(data, pos + 1)[0]
        if data[pos] == _D:
            if first < 0:
                first = pos
            rows_end = end           # what lies between is read by the shape's test: DataRows only
        pos = end
    if first < 0:
        first = rows_end = 0         # no rows: all of it comes after
    if found and found[0][1] < rows_end:
        return None                  # a watched message before the rows
    # The watched messages after the rows but the last (the ReadyForQuery), from the end.
    return (bytes(data[:first]), bytes(data[rows_end:n]), watch,
            tuple((t, start - n, end - n) for t, start, end in found[:-1]), status)


class ServerScanner:
    """Backend stream of one server connection; see the module docstring."""

    __slots__ = ("copy", "held", "learn", "ready", "shape", "skip", "status", "watch")

    def __init__(self, watch: frozenset = SERVER_WATCH):
        self.watch = watch
        self.held = b""        # an incomplete header or watched message
        self.skip = 0          # bytes of a streamed message still to come
        self.status = b"I"     # last ReadyForQuery status
        self.ready = 0         # ReadyForQuery messages in the last feed
        self.copy = False      # a CopyIn/Out/Both response came and no ReadyForQuery since
        # The last reply that came whole in one chunk, as the bytes around its
        # DataRows (``_shape_of``): (before, after, watch, found in after but
        # the final ReadyForQuery, status).
        self.shape = None
        self.learn = 0         # whole replies still to scan in full before the next is learned from

    def feed(self, data: bytes) -> tuple[bytes, int, list]:
        """Returns ``(buf, end, found)``: forward ``buf[:end]``; ``found`` lists
        ``(type, start, end)`` of the watched messages in it, all complete.
        What follows ``end`` is kept for the next feed."""
        skip = self.skip
        n = len(data)
        if skip >= n and not self.held:
            self.ready = 0
            self.skip = skip - n
            return data, n, []
        shape = self.shape
        if shape is not None and not skip and not self.held:
            # The same query again (a driver's loop, pgbench): the bytes around
            # the DataRows are the ones scanned last time; only the rows are read.
            before, after, watch, others, status = shape
            pos = len(before)
            stop = n - len(after)
            if watch is self.watch and data.endswith(after) and data.startswith(before):
                while pos < stop and data[pos] == _D:
                    length = _unpack_len(data, pos + 1)[0]    # ``after`` ends with a ReadyForQuery: 5 bytes are there
                    if length < 4:
                        break
                    pos += 1 + length
                if pos == stop:
                    self.ready = 1
                    self.status = status
                    self.copy = False
                    if not others:
                        return data, n, [(_Z, n - 6, n)]
                    return data, n, [*((t, n + start, n + end) for t, start, end in others), (_Z, n - 6, n)]
        clean = not skip and not self.held      # from a message boundary, nothing held
        if self.held:
            data = self.held + data
            n = len(data)
            self.held = b""
        pos = skip
        self.skip = 0
        found = []
        watch = self.watch
        ready = 0
        last_ready = -1     # where the last ReadyForQuery starts
        try:
            # pos < n here (a skip that covers the data returned above, and
            # held bytes come with no skip), and every branch leaves once its
            # message reaches n: no loop condition to test per message.
            while True:
                mtype, length = _unpack_header(data, pos)   # struct.error: under 5 bytes left
                end = pos + 1 + length
                if length < 4:
                    raise ProtocolError(f"invalid message length {length} from server")
                if mtype in watch:
                    if end > n:
                        if length > SERVER_HOLD_LIMIT:
                            raise ProtocolError("server message too large")
                        self.held = data[pos:]
                        n = pos
                        break
                    found.append((mtype, pos, end))
                    if mtype == _Z:
                        ready += 1
                        last_ready = pos
                        self.copy = False
                    elif mtype in _COPY:
                        self.copy = True
                    if end == n:
                        break
                elif end >= n:
                    if end > n:
                        self.skip = end - n
                    break
                pos = end
        except struct.error:
            self.held = data[pos:]       # an incomplete header
            n = pos
        self.ready = ready
        if ready:
            self.status = data[last_ready + 5:last_ready + 6]
            if ready == 1 and last_ready == n - 6 and clean and n <= _SHAPE_MAX \
                    and not self.held and not self.skip and not self.copy and _D not in watch:
                if self.learn:
                    self.learn -= 1
                else:
                    self.learn = _LEARN_SKIP
                    self.shape = _shape_of(data, n, found, watch, self.status)
        return data, n, found

    @property
    def mid_message(self) -> bool:
        return bool(self.skip or self.held)
