"""Streaming paths of a client: session pooling forwards chunks as they come,
partial messages included; in transaction pooling, a message too large to hold
(a huge query, big CopyData) streams through the same way. A mixin of
ClientConnection (net/client.py)."""

from __future__ import annotations

import struct
from time import monotonic

from ..proto.framing import ProtocolError
from .fastio import receiver
from .login import ClientGone

_unpack_len = struct.Struct("!I").unpack_from
RECV_SIZE = 65536
_Q, _S, _F, _X = (ord(c) for c in "QSFX")
_EXTENDED = frozenset(ord(c) for c in "PBDECH")
_KNOWN = frozenset(ord(c) for c in "QSFXPBDECHdcfp")
_RENAMED = frozenset(ord(c) for c in "PBDC")
_STREAM_ABOVE = 1 << 20      # messages above 1 MiB stream through unless they must be read
_HOLD_LIMIT = 0x3FFFFFFF     # PostgreSQL refuses messages over 1 GB: never hold more


class ClientStreaming:
    def _serve(self) -> None:
        recv = receiver(self.sock, RECV_SIZE)
        skip = 0
        partial = b""
        data = self.pending
        self.pending = b""
        while True:
            if not data:
                data = recv()
                if not data:
                    raise ClientGone()
            self.request_time = monotonic()
            if partial:
                data = partial + data
                partial = b""
            n = len(data)
            if skip >= n:
                skip -= n
                self._send(data, 0, None)
                data = b""
                continue
            pos = skip
            skip = 0
            requests = 0
            synced = None
            terminate = False
            while pos < n:
                if n - pos < 5:
                    partial = data[pos:]
                    break
                mtype = data[pos]
                length = _unpack_len(data, pos + 1)[0]
                if length < 4 or length > self.app.max_packet_size:
                    raise ProtocolError(f"invalid message length {length}")
                end = pos + 1 + length
                if mtype == _Q or mtype == _F:
                    requests += 1
                elif mtype == _S:
                    requests += 1
                    synced = True
                elif mtype in _EXTENDED:
                    synced = False
                elif mtype == _X:
                    terminate = True
                    break
                elif mtype not in _KNOWN:
                    raise ProtocolError(f"unknown message type {chr(mtype)!r}")
                if end > n:
                    skip = end - n
                    pos = n
                    break
                pos = end
            if pos:
                self._send(data[:pos] if pos < n else data, requests, synced)
            if terminate:
                raise ClientGone()
            data = b""

    def _large_message(self, buf: bytearray) -> bool:
        """Is the partial message at the start of ``buf`` one to stream through
        rather than hold? Messages the pooler must read whole (Parse, Bind,
        Describe, Close; queries a hook or the split must see) are held, up to
        PostgreSQL's own 1 GB message limit."""
        length = _unpack_len(buf, 1)[0]
        if length <= _STREAM_ABOVE:
            return False
        mtype = buf[0]
        if mtype in _RENAMED or (mtype == _Q and (self.app.hooks.enabled or self.rw_split)):
            if length > _HOLD_LIMIT:
                raise ProtocolError(f"message of {length} bytes is too large")
            return False
        return True

    def _stream_large(self, buf: bytearray, recv, scratch: list) -> None:
        """Forward one large message (a huge query, big CopyData) as it arrives."""
        mtype = buf[0]
        total = 1 + _unpack_len(buf, 1)[0]
        server = self.server or self._link()
        if server.tracker is not None:
            server.tracker.client_message(mtype, None, self.statements, scratch)
            scratch.clear()
        self.request_time = monotonic()
        first = bytes(buf[:total])
        del buf[:len(first)]
        remaining = total - len(first)
        self._send(first, 1 if mtype in (_Q, _F) else 0, None)
        while remaining > 0:
            data = recv()
            if not data:
                raise ClientGone()
            if len(data) > remaining:
                buf += data[remaining:]
                data = data[:remaining]
            remaining -= len(data)
            self._send(data, 0, None)
