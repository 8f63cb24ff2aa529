"""Framing of the PostgreSQL v3 wire protocol, without I/O.

Theory of operation: every message after startup is a 1-byte type, a 4-byte
big-endian length that counts itself but not the type byte, then the body.
The startup-phase packets (StartupMessage, SSLRequest, GSSENCRequest,
CancelRequest) have no type byte: a 4-byte length then a 4-byte code.

The readers here look at a buffer (bytes, bytearray or memoryview) and return
where the next complete message lies, or None when more bytes are needed.
They never copy the body and never consume anything: the caller owns the
buffer and decides what to forward, so trailing bytes are left alone.
A declared length that is negative-ish (< 4) or above the caller's limit
raises ProtocolError before anything is allocated.
"""

from __future__ import annotations

import struct

_HEADER = struct.Struct("!cI")
_INT32 = struct.Struct("!I")
_unpack_len = _INT32.unpack_from

PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

# A startup packet has no business being large: PgBouncer caps it too.
MAX_STARTUP_LEN = 10000


class ProtocolError(Exception):
    """The peer sent bytes that cannot be a valid message (SQLSTATE 08P01)."""


def message_at(buf, pos: int, limit: int) -> tuple[int, int, int] | None:
    """Locate the complete typed message starting at ``pos``.

    Returns ``(type_byte, body_start, message_end)`` or None if the buffer does
    not yet hold the whole message. ``limit`` caps the declared length.
    """
    if len(buf) - pos < 5:
        return None
    length = _unpack_len(buf, pos + 1)[0]
    if length < 4 or length > limit:
        raise ProtocolError(f"invalid message length {length}")
    end = pos + 1 + length
    if end > len(buf):
        return None
    return buf[pos], pos + 5, end


def header_at(buf, pos: int, limit: int) -> tuple[int, int] | None:
    """Type and full message end for the header at ``pos``, even if the body
    has not fully arrived yet (used to stream large messages through)."""
    if len(buf) - pos < 5:
        return None
    length = _unpack_len(buf, pos + 1)[0]
    if length < 4 or length > limit:
        raise ProtocolError(f"invalid message length {length}")
    return buf[pos], pos + 1 + length


def startup_packet_at(buf, pos: int = 0) -> tuple[int, int] | None:
    """Locate an untyped startup-phase packet: returns ``(code, end)`` or None."""
    if len(buf) - pos < 8:
        return None
    length = _unpack_len(buf, pos)[0]
    if length < 8 or length > MAX_STARTUP_LEN:
        raise ProtocolError(f"invalid startup packet length {length}")
    end = pos + length
    if end > len(buf):
        return None
    return _unpack_len(buf, pos + 4)[0], end


def parse_startup_params(body) -> dict[str, str]:
    """Parse the key/value pairs of a StartupMessage (after the 8-byte header)."""
    raw = bytes(body)
    if not raw.endswith(b"\x00"):
        raise ProtocolError("startup packet is not terminated")
    parts = raw[:-1].split(b"\x00")
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) % 2:
        raise ProtocolError("startup packet has an odd number of fields")
    params: dict[str, str] = {}
    try:
        for i in range(0, len(parts), 2):
            params[parts[i].decode()] = parts[i + 1].decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError("startup packet is not valid UTF-8") from exc
    return params


def split_messages(buf, limit: int = 1 << 30) -> tuple[list[tuple[int, bytes]], int]:
    """All complete messages in ``buf`` as (type, body) pairs, and the number of
    bytes they took. Convenience for tests and slow paths, not the hot path."""
    out = []
    pos = 0
    while True:
        found = message_at(buf, pos, limit)
        if found is None:
            return out, pos
        mtype, body, end = found
        out.append((mtype, bytes(buf[body:end])))
        pos = end
