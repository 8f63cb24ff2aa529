"""Streaming paths of a client: session pooling forwards chunks as they come,
partial messages included; in transaction pooling, a message too large to hold
(a huge query, big CopyData) streams through the same way. The boundaries and
request counts come from the client's scanner (proto/scan.py); a server that
got part of a message is never reused (see ClientConnection._drop_server). A
mixin of ClientConnection (net/client.py)."""

from __future__ import annotations

from time import monotonic

from ..pool.prepared import PARSE
from ..proto.framing import ProtocolError
from .checkout import ClientError
from .fastio import receiver
from .login import ClientGone

RECV_SIZE = 65536
_Q, _F, _P = ord("Q"), ord("F"), ord("P")
_UNNAMED_PARSE = (PARSE, False, None)
_RENAMED = frozenset(ord(c) for c in "PBDC")
_STREAM_ABOVE = 1 << 20      # messages above 1 MiB stream through unless they must be read
_HOLD_LIMIT = 0x3FFFFFFF     # PostgreSQL refuses messages over 1 GB: never hold more


class ClientStreaming:
    __slots__ = ()

    def _serve(self) -> None:
        recv = receiver(self.sock, RECV_SIZE, self)
        scanner = self.scanner
        stream = scanner.stream
        data = self.pending
        self.pending = b""
        while True:
            if not data:
                self.parkable = self.server is None and not scanner.owed and not scanner.held
                data = recv()
                self.parkable = False
                if not data:
                    raise ClientGone()
            self.request_time = monotonic()
            if scanner.owed and self.server is None:
                raise ClientError("08P01", "server conn crashed?")   # lost mid-message
            chunk = stream(data)
            if chunk:
                self._send(chunk, scanner.requests, scanner.synced)
            if scanner.terminate:
                raise ClientGone()
            data = b""

    def _large_message(self, buf: bytearray) -> bool:
        """Is the partial message at the start of ``buf`` one to stream through
        rather than hold? Messages the pooler must read whole (Parse, Bind,
        Describe, Close; queries a hook or the split must see) are held, up to
        PostgreSQL's own 1 GB message limit."""
        length = self.scanner.pending_length(buf) - 1
        if length <= _STREAM_ABOVE:
            return False
        mtype = buf[0]
        reads_text = self.app.hooks.enabled or self.rw_split
        if mtype == _P and buf[5] == 0 and not reads_text:
            return True      # an unnamed Parse is not renamed: nothing in it to read
        if mtype in _RENAMED or (mtype == _Q and reads_text):
            if length > _HOLD_LIMIT:
                raise ProtocolError(f"message of {length} bytes is too large")
            return False
        return True

    def _stream_large(self, buf: bytearray, recv, scratch: list) -> None:
        """Forward one large message (a huge query, big CopyData) as it arrives."""
        scanner = self.scanner
        mtype = buf[0]
        total = scanner.pending_length(buf)
        server = self.server or self._link()
        tracker = server.tracker
        if tracker is not None:
            if mtype == _P:            # unnamed (see _large_message)
                tracker.pending.append(_UNNAMED_PARSE)
                tracker.parses += 1
                self.unnamed_change = None
            else:
                tracker.client_message(mtype, None, self.statements, scratch)
                scratch.clear()
        self.request_time = monotonic()
        first = bytes(buf)
        buf.clear()
        scanner.start_streaming(total, len(first))
        self._send(first, 1 if mtype in (_Q, _F) else 0, None)
        while scanner.owed > 0:
            data = recv()
            if not data:
                raise ClientGone()
            if len(data) > scanner.owed:
                buf += data[scanner.owed:]
                data = data[:scanner.owed]
            scanner.take(len(data))
            if self.server is not server:
                raise ClientError("08P01", "server conn crashed?")   # lost mid-message
            self._send(data, 0, None)
        if server.client is self:
            server._maybe_release()   # its replies may all have come while we streamed
