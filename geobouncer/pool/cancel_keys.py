"""Cancel keys handed to clients, in PgBouncer's layout.

A client's BackendKeyData is 8 random bytes from the OS's CSPRNG (``secrets``),
read as a "process id" (bytes 0-3) and a "secret key" (bytes 4-7). Keys from a
Mersenne Twister can be predicted after a few hundred logins, which would let
one user cancel another's queries.

With ``peer_id`` set (PgBouncer 1.19+ peering), bytes 1-2 carry the peer id
(little end first) and the two low bits of byte 7 a forwarding TTL, so a peer
that receives a cancel for a key it did not issue can pass it to its owner.
Byte 0's top bit is cleared: the "pid" is positive, as some clients require.
"""

from __future__ import annotations

import secrets

TTL_MASK = 0x03


def new_cancel_key(peer_id: int = 0) -> tuple[int, int]:
    raw = bytearray(secrets.token_bytes(8))
    if peer_id > 0:
        raw[1] = peer_id & 0xFF
        raw[2] = (peer_id >> 8) & 0xFF
        raw[7] |= TTL_MASK
    raw[0] &= 0x7F
    return int.from_bytes(raw[:4], "big"), int.from_bytes(raw[4:], "big")


def peer_of(pid: int, key: int) -> int:
    """The peer id a key issued under peering carries (0 without peering)."""
    raw = pid.to_bytes(4, "big")
    return raw[1] | (raw[2] << 8)
