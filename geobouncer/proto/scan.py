"""One scanner per direction of a linked client/server pair, without I/O.

Theory of operation. After login every message is a type byte and a 4-byte
length that counts itself. A scanner is fed whatever a ``recv`` returned —
a header split anywhere is normal — and answers two questions: where the
boundaries are (what may be forwarded now, what must wait for more bytes) and
what the pooler has to know about the messages it saw. Nobody else in the
pooler unpacks a length.

``ClientScanner`` (frontend -> server) validates every header before a byte of
the message is forwarded: a type a client may not send after login (a second
StartupMessage, SSLRequest or CancelRequest begins with a zero byte; a
PasswordMessage outside authentication), a length under 4, a length over
``max_packet_size``: ProtocolError (SQLSTATE 08P01). It counts the requests a
server owes a ReadyForQuery for (Query, FunctionCall, Sync) and whether the
extended-protocol messages sent so far end with a Sync. It has two modes:

- ``stream(data)``: everything is forwarded as it comes, partial messages
  included; ``owed`` says how many bytes of a started message are still to
  come. A server that got half a message is never reusable.
- ``messages(buf)``: the complete messages at the start of a buffer the caller
  holds (transaction pooling reads whole batches).

``ServerScanner`` (backend -> client) forwards everything it need not hold:
large DataRows stream through. Messages in its ``watch`` set are held until
complete and reported; it keeps the last ReadyForQuery status, counts
ReadyForQuery messages, and knows when COPY starts.
"""

from __future__ import annotations

import struct

from .framing import ProtocolError

_unpack_len = struct.Struct("!I").unpack_from
_unpack_header = struct.Struct("!BI").unpack_from

# Frontend message types the pooler forwards after login.
_Q, _S, _F, _X, _H = (ord(c) for c in "QSFXH")
# Extended-protocol messages after which a Sync is owed (a Flush owes none).
OWES_SYNC = frozenset(ord(c) for c in "PBDEC")
_P, _B, _D, _E = ord("P"), ord("B"), ord("D"), ord("E")
_NAMED = frozenset(ord(c) for c in "PBDC")    # messages whose names the pooler reads
_TARGETS = frozenset(b"SP")
_UNNAMED_BATCH = frozenset(b"PBDES")     # an extended batch the pooler forwards unread
_SHAPE_MAX = 2048       # the most bytes a batch's or a reply's shape keeps (per client, per server)
CLIENT_TYPES = frozenset(ord(c) for c in "QSFXPBDECHdcf")
_NO_QUERY_TYPES = CLIENT_TYPES - {_Q}     # disable_pqexec


def _bad_type(mtype: int) -> ProtocolError:
    if mtype == 0:
        return ProtocolError("startup packet after login")
    if mtype == ord("p"):
        return ProtocolError("password packet after login")
    return ProtocolError(f"unknown message type {mtype} (0x{mtype:02x})")


class ClientScanner:
    """Frontend stream of one client after login; see the module docstring."""

    __slots__ = ("batch_shape", "held", "limit", "owed", "query_type", "requests", "synced", "terminate",
                 "types")

    def __init__(self, limit: int, pqexec: bool = True):
        self.limit = limit          # max_packet_size
        # disable_pqexec (``pqexec`` False): a simple Query is a protocol violation.
        self.types = CLIENT_TYPES if pqexec else _NO_QUERY_TYPES
        self.query_type = _Q if pqexec else -1
        self.held = b""             # an incomplete header (stream mode)
        self.owed = 0               # bytes of a forwarded message still to come
        self.requests = 0           # ReadyForQuery messages the last scan asks for
        self.synced = None          # True: last extended message was a Sync; False: unsynced; None: no news
        self.terminate = False      # a Terminate was seen (nothing after it is returned)
        # The last unnamed batch with one Bind, as the bytes around that Bind
        # (unnamed_batch): (before, after, syncs, parses, limit, first_bytes, heads).
        self.batch_shape = None

    def check(self, mtype: int, length: int) -> None:
        if mtype not in self.types:
            raise ProtocolError("PQexec disallowed") if mtype == _Q else _bad_type(mtype)
        if length < 4 or length > self.limit:
            raise ProtocolError(f"invalid message length {length}" if length < 4
                                else f"message of {length} bytes exceeds max_packet_size")

    # --- stream mode ----------------------------------------------------------
    def stream(self, data: bytes) -> bytes:
        """Scan ``data`` and return what may be forwarded now (an incomplete
        header is held back; an incomplete body is forwarded, ``owed`` counts
        the rest). Sets ``requests``, ``synced`` and ``terminate``."""
        self.requests = 0
        self.synced = None
        owed = self.owed
        n = len(data)
        if owed >= n and not self.held:
            self.owed = owed - n
            return data
        if self.held:
            data = self.held + data
            n = len(data)
            self.held = b""
        pos = owed
        requests = 0
        synced = None
        limit = self.limit
        types = self.types
        while pos < n:
            if n - pos < 5:
                self.held = data[pos:]
                break
            mtype = data[pos]
            length = _unpack_len(data, pos + 1)[0]
            if mtype not in types or length < 4 or length > limit:
                self.check(mtype, length)
            if mtype == _Q:
                # A Query, like a Sync, ends the extended messages before it
                # (after an error PostgreSQL skips it; its ReadyForQuery, still
                # owed then, keeps the server from looking answered).
                requests += 1
                synced = True
            elif mtype == _F:
                requests += 1
            elif mtype == _S:
                requests += 1
                synced = True
            elif mtype in OWES_SYNC:
                synced = False
            elif mtype == _X:
                self.terminate = True
                n = pos
                break
            pos += 1 + length
        self.requests = requests
        self.synced = synced
        if pos > n:
            self.owed = pos - n
            return data
        self.owed = 0
        return data if pos == len(data) else data[:pos]

    # --- whole-message mode --------------------------------------------------
    def messages(self, buf) -> list | None:
        """(type, start, end) of the complete messages at the start of ``buf``,
        or None when there is none yet. Validates every header it reaches,
        including that of an incomplete message. Stops after a Terminate."""
        msgs = []
        pos = 0
        n = len(buf)
        limit = self.limit
        types = self.types
        try:
            while pos < n:
                mtype, length = _unpack_header(buf, pos)    # struct.error: under 5 bytes left
                if mtype not in types or length < 4 or length > limit:
                    self.check(mtype, length)
                end = pos + 1 + length
                if end > n:
                    break
                if mtype in _NAMED:
                    if mtype == _P or mtype == _B:     # check_names, inline for the common two
                        first = buf.find(0, pos + 5, end)
                        if first < 0 or buf.find(0, first + 1, end) < 0:
                            raise ProtocolError(f"malformed {chr(mtype)} message")
                    else:
                        check_names(mtype, buf, pos + 5, end)
                msgs.append((mtype, pos, end))
                pos = end
                if mtype == _X:
                    break
        except struct.error:
            pass
        return msgs or None

    def unnamed_batch(self, buf, first_bytes: frozenset, heads: frozenset):
        """The complete messages at the start of ``buf`` when they are an
        extended-protocol batch that names nothing (Parse, Bind, Describe,
        Execute and Sync only, every name empty, ending with a Sync), and no
        Parse's text starts with a byte in ``first_bytes`` or three bytes in
        ``heads`` (texts the pooler must read): ``(end, syncs, parses,
        binds)``. None for anything else, valid or not: ``messages`` then
        validates and splits it. One pass, no list: the common batch of
        ``pgbench -M extended`` and of drivers' unnamed statements."""
        n = len(buf)
        limit = self.limit
        shape = self.batch_shape
        if shape is not None:
            # A driver sends the same batch again with only the Bind's values
            # changed (pgbench -M extended, an unnamed statement run in a loop):
            # the bytes before and after that Bind are the ones validated last
            # time, so only the Bind itself is looked at: ~15 times less work.
            before, after, syncs, parses, was_limit, was_first, was_heads = shape
            at = len(before)
            stop = n - len(after)
            if (stop - at > 6 and buf[at] == _B and buf.startswith(before) and buf.endswith(after)
                    and _unpack_len(buf, at + 1)[0] == stop - at - 1 and stop - at <= limit
                    and buf[at + 5] == 0 and buf[at + 6] == 0 and limit == was_limit
                    and first_bytes is was_first and heads is was_heads):
                return n, syncs, parses, 1
        pos = 0
        syncs = parses = binds = 0
        synced = -1         # where the last Sync ends
        bind_at = bind_end = 0
        try:
            while pos < n:
                mtype, length = _unpack_header(buf, pos)    # struct.error: under 5 bytes left
                if length > limit or mtype not in _UNNAMED_BATCH:
                    return None
                # A length under 4 ends inside the 5 bytes unpacked: never incomplete.
                # Each branch refuses it (Parse, Bind and Describe by their own minimum).
                end = pos + 1 + length
                if end > n:
                    break
                if mtype == _S:
                    if length < 4:
                        return None
                    syncs += 1
                    synced = end
                elif mtype == _E:
                    if length < 4:
                        return None
                elif mtype == _B:
                    if length < 6 or buf[pos + 5] != 0 or buf[pos + 6] != 0:
                        return None
                    binds += 1
                    bind_at, bind_end = pos, end
                elif mtype == _P:
                    at = pos + 6
                    if length < 8 or buf[pos + 5] != 0 or buf[at] in first_bytes \
                            or bytes(buf[at:at + 3]) in heads or buf.find(0, at, end) < 0:
                        return None
                    parses += 1
                elif length != 6 or buf[pos + 6] != 0 or buf[pos + 5] not in _TARGETS:    # Describe
                    return None
                pos = end
        except struct.error:
            pass
        if synced != pos:
            return None
        if binds == 1 and pos - (bind_end - bind_at) <= _SHAPE_MAX:
            self.batch_shape = (bytes(buf[:bind_at]), bytes(buf[bind_end:pos]), syncs, parses, limit,
                                first_bytes, heads)
        return pos, syncs, parses, binds

    def lone_query(self, data) -> bool:
        """Is ``data`` exactly one complete, valid simple Query (the common
        case of transaction pooling, forwarded without building a batch)?"""
        n = len(data)
        return (5 < n <= self.limit + 1 and data[0] == self.query_type
                and n == 1 + _unpack_len(data, 1)[0] and data[n - 1] == 0)

    @staticmethod
    def pending_length(buf) -> int:
        """Full size of the (validated) incomplete message at the start of ``buf``."""
        return 1 + _unpack_len(buf, 1)[0]

    def start_streaming(self, total: int, have: int) -> None:
        """A large message is being forwarded piecewise: ``total`` bytes, of
        which ``have`` go out now."""
        self.owed = total - have

    def take(self, n: int) -> None:
        """``n`` more bytes of the message being streamed went out."""
        self.owed -= n


def check_names(mtype: int, buf, body: int, end: int) -> None:
    """The names the pooler reads from a Parse, Bind, Describe or Close (body
    at ``buf[body:end]``) must be terminated inside the message, or it is a
    protocol violation. The rest of the body is PostgreSQL's to check."""
    if mtype == _P or mtype == _B:
        first = buf.find(0, body, end)
        if first >= 0 and buf.find(0, first + 1, end) >= 0:
            return
    elif end - body >= 2 and buf[end - 1] == 0 and buf[body] in _TARGETS:
        return
    raise ProtocolError(f"malformed {chr(mtype)} message")


# The backend direction lives in proto/server_scan.py; its names are imported from here too.
from .server_scan import REQUEST_REPLIES, SERVER_HOLD_LIMIT, SERVER_WATCH, ServerScanner  # noqa: E402,F401
