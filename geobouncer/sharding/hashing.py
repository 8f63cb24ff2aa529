"""PostgreSQL's PARTITION BY HASH for one column, in Python.

A row goes to remainder ``partition_hash(value) % modulus``, where the hash is
the type's extended hash function (hashint8extended, hashint4extended,
hashint2extended, hashtextextended, uuid_hash_extended) called with
PostgreSQL's partition seed and folded with hash_combine64 as
compute_partition_hash_value does. The hash functions are Bob Jenkins'
lookup3, as in PostgreSQL's src/common/hashfn.c.
"""

from __future__ import annotations

import struct
import uuid

HASH_PARTITION_SEED = 0x7A5B22367996DCFD
_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF

TYPES = {
    "bigint": "int8", "int8": "int8",
    "integer": "int4", "int": "int4", "int4": "int4",
    "smallint": "int2", "int2": "int2",
    "text": "text", "varchar": "text", "character varying": "text",
    "uuid": "uuid",
}
_RANGES = {"int8": (-(1 << 63), (1 << 63) - 1), "int4": (-(1 << 31), (1 << 31) - 1),
           "int2": (-(1 << 15), (1 << 15) - 1)}


def canonical_type(name: str) -> str:
    try:
        return TYPES[" ".join(name.lower().split())]
    except KeyError:
        raise ValueError(f"unsupported sharding key type {name!r} (bigint, integer, smallint, "
                         "text, varchar or uuid)") from None


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & _M32; a ^= _rot(c, 4); c = (c + b) & _M32
    b = (b - a) & _M32; b ^= _rot(a, 6); a = (a + c) & _M32
    c = (c - b) & _M32; c ^= _rot(b, 8); b = (b + a) & _M32
    a = (a - c) & _M32; a ^= _rot(c, 16); c = (c + b) & _M32
    b = (b - a) & _M32; b ^= _rot(a, 19); a = (a + c) & _M32
    c = (c - b) & _M32; c ^= _rot(b, 4); b = (b + a) & _M32
    return a, b, c


def _final(a: int, b: int, c: int) -> tuple[int, int, int]:
    c ^= b; c = (c - _rot(b, 14)) & _M32
    a ^= c; a = (a - _rot(c, 11)) & _M32
    b ^= a; b = (b - _rot(a, 25)) & _M32
    c ^= b; c = (c - _rot(b, 16)) & _M32
    a ^= c; a = (a - _rot(c, 4)) & _M32
    b ^= a; b = (b - _rot(a, 14)) & _M32
    c ^= b; c = (c - _rot(b, 24)) & _M32
    return a, b, c


def _seeded(length: int, seed: int) -> tuple[int, int, int]:
    a = b = c = (0x9E3779B9 + length + 3923095) & _M32
    if seed:
        a = (a + (seed >> 32)) & _M32
        b = (b + (seed & _M32)) & _M32
        a, b, c = _mix(a, b, c)
    return a, b, c


def hash_uint32_extended(k: int, seed: int) -> int:
    a, b, c = _seeded(4, seed)
    a = (a + (k & _M32)) & _M32
    a, b, c = _final(a, b, c)
    return (b << 32) | c


def hash_bytes_extended(data: bytes, seed: int) -> int:
    n = len(data)
    a, b, c = _seeded(n, seed)
    pos = 0
    while n - pos >= 12:
        x, y, z = struct.unpack_from("<III", data, pos)
        a, b, c = _mix((a + x) & _M32, (b + y) & _M32, (c + z) & _M32)
        pos += 12
    tail = data[pos:] + bytes(12 - (n - pos))
    x, y, z = struct.unpack("<III", tail)
    a = (a + x) & _M32
    b = (b + y) & _M32
    c = (c + ((z << 8) & _M32)) & _M32     # the lowest byte of c is reserved for the length
    a, b, c = _final(a, b, c)
    return (b << 32) | c


def _combine(a: int, b: int) -> int:
    return a ^ ((b + 0x49A0F4DD15E5A8E3 + (a << 54) + (a >> 7)) & _M64)


def _type_hash(ctype: str, value) -> int:
    seed = HASH_PARTITION_SEED
    if ctype == "int8":
        lo, hi = value & _M32, (value >> 32) & _M32
        lo ^= hi if value >= 0 else (~hi & _M32)
        return hash_uint32_extended(lo, seed)
    if ctype in ("int4", "int2"):
        return hash_uint32_extended(value & _M32, seed)
    if ctype == "text":
        # surrogateescape: a key that is not UTF-8 is routed by its bytes, and
        # the shard refuses it as PostgreSQL does (22021), not the pooler with a traceback.
        return hash_bytes_extended(value.encode("utf-8", "surrogateescape") if isinstance(value, str)
                                   else value, seed)
    if ctype == "uuid":
        return hash_bytes_extended(value.bytes, seed)
    raise ValueError(f"unsupported sharding key type {ctype!r}")


def partition_hash(ctype: str, value) -> int:
    """compute_partition_hash_value for one column (0 for NULL)."""
    if value is None:
        return 0
    return _combine(0, _type_hash(ctype, value))


def hash_remainder(ctype: str, value, modulus: int) -> int:
    return partition_hash(ctype, value) % modulus


def parse_text(ctype: str, text) -> object:
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8", "surrogateescape")
    if ctype in _RANGES:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f'invalid input syntax for type {_NAMES[ctype]}: "{text}"') from None
        low, high = _RANGES[ctype]
        if not low <= value <= high:
            raise ValueError(f'value "{text}" is out of range for type {_NAMES[ctype]}')
        return value
    if ctype == "uuid":
        try:
            return uuid.UUID(text.strip())
        except ValueError:
            raise ValueError(f'invalid input syntax for type uuid: "{text}"') from None
    return text


_NAMES = {"int8": "bigint", "int4": "integer", "int2": "smallint"}


def parse_binary(ctype: str, data: bytes) -> object:
    if ctype in _RANGES:
        # A driver may bind a small integer as int2 or int4 (psycopg 3 does).
        if len(data) not in (2, 4, 8):
            raise ValueError(f"invalid binary value for {ctype}: {len(data)} bytes")
        value = int.from_bytes(data, "big", signed=True)
        low, high = _RANGES[ctype]
        if not low <= value <= high:
            raise ValueError(f"value {value} is out of range for type {_NAMES[ctype]}")
        return value
    if ctype == "uuid" and len(data) != 16:
        raise ValueError(f"invalid binary value for uuid: {len(data)} bytes")
    if ctype == "uuid":
        return uuid.UUID(bytes=bytes(data))
    return bytes(data).decode("utf-8", "surrogateescape")
