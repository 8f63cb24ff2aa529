"""Typed values of merged columns: sort keys, sums and PostgreSQL's text output.

Values arrive in text format (result format 0). Sort keys follow PostgreSQL for
the column's type OID: integers and numeric by value (NaN above every number),
floats by value (NaN above Infinity), bool f < t, text-like types as bytes (C
collation: the test clusters run with --no-locale), bpchar without its trailing
blanks, date/time/uuid as their ISO text (AD dates; BC dates sort wrongly).
"""

from __future__ import annotations

import decimal
import math
import struct
from decimal import Decimal

INT_OIDS = frozenset((20, 21, 23, 26))          # int8, int2, int4, oid
FLOAT4, FLOAT8, NUMERIC, INT8 = 700, 701, 1700, 20
BYTES_OIDS = frozenset((18, 19, 25, 705, 1043, 1082, 1083, 1114, 1184, 1266, 2950))
BPCHAR, BOOL = 1042, 16
TEXT_OIDS = frozenset((18, 19, 25, 705, 1043, BPCHAR))   # ordered by collation in PostgreSQL

# Exact decimal arithmetic: additions never round; Inf + -Inf = NaN like PostgreSQL.
EXACT = decimal.Context(prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN, traps=[])

NUMERIC_MIN_SIG_DIGITS = 16
NUMERIC_MAX_DISPLAY_SCALE = 1000
DEC_DIGITS = 4


class UnsupportedType(ValueError):
    """A column type the merge cannot compare or add."""


def _num_key(raw: bytes):
    d = Decimal(raw.decode())
    return (1, 0) if d.is_nan() else (0, d)


def _float_key(raw: bytes):
    f = float(raw)
    return (1, 0.0) if f != f else (0, f)


# Binary result format (asyncpg, pgjdbc with binary transfer ask for it): the
# merge passes such a column's type as -oid. Integers, floats, bool, date and
# time values are decoded; text-like values and uuid compare as their bytes,
# as in text format. numeric, timetz and the rest are refused in binary.
_BIN_INT_SIGNED = frozenset((20, 21, 23, 1082, 1083, 1114, 1184))   # date/time: counts since an epoch
_BIN_FLOAT = {FLOAT4: struct.Struct("!f"), FLOAT8: struct.Struct("!d")}
_BIN_BYTES = frozenset((18, 19, 25, 705, 1043, 2950))
_INT_SIZES = {21: 2, 23: 4, 20: 8, 26: 4}


def _bin_int(raw: bytes) -> int:
    return int.from_bytes(raw, "big", signed=True)


def _bin_float_key(fmt):
    def key(raw: bytes):
        f = fmt.unpack(raw)[0]
        return (1, 0.0) if f != f else (0, f)
    return key


def _binary_key(oid: int):
    if oid in _BIN_INT_SIGNED:
        return _bin_int
    if oid == 26:
        return lambda raw: int.from_bytes(raw, "big")
    if oid in _BIN_FLOAT:
        return _bin_float_key(_BIN_FLOAT[oid])
    if oid == BOOL:
        return lambda raw: raw != b"\x00"
    if oid == BPCHAR:
        return lambda raw: raw.rstrip(b" ")
    if oid in _BIN_BYTES:
        return bytes
    raise UnsupportedType(f"cannot compare values of type oid {oid} in binary format across shards")


def key_func(oid: int):
    """bytes -> comparable key for a non-NULL value of this type (UnsupportedType);
    a negative oid: the column is in binary format."""
    if oid < 0:
        return _binary_key(-oid)
    if oid in INT_OIDS:
        return int
    if oid == NUMERIC:
        return _num_key
    if oid in (FLOAT4, FLOAT8):
        return _float_key
    if oid == BOOL:
        return lambda raw: raw == b"t"
    if oid == BPCHAR:
        return lambda raw: raw.rstrip(b" ")
    if oid in BYTES_OIDS:
        return bytes
    raise UnsupportedType(f"cannot compare values of type oid {oid} across shards")


# --- sums -------------------------------------------------------------------

def sum_parser(oid: int):
    """bytes -> addable value for a shard's sum()/count() column (-oid: binary)."""
    if oid < 0:
        if -oid in _INT_SIZES:
            return _bin_int
        if -oid in _BIN_FLOAT:
            fmt = _BIN_FLOAT[-oid]
            return lambda raw: fmt.unpack(raw)[0]
        raise UnsupportedType(f"cannot add values of type oid {-oid} in binary format across shards")
    if oid in INT_OIDS:
        return int
    if oid == NUMERIC:
        return lambda raw: Decimal(raw.decode())
    if oid in (FLOAT4, FLOAT8):
        return float
    raise UnsupportedType(f"cannot add values of type oid {oid} across shards")


def add(a, b):
    if isinstance(a, Decimal):
        return EXACT.add(a, b)
    return a + b


def format_value(oid: int, value) -> bytes:
    """A sum or count in the column's format (-oid: binary)."""
    if oid < 0:
        if -oid in _BIN_FLOAT:
            return _BIN_FLOAT[-oid].pack(value)
        return int(value).to_bytes(_INT_SIZES[-oid], "big", signed=True)
    if oid == NUMERIC:
        return format_numeric(value)
    if oid == FLOAT8:
        return format_float8(value)
    if oid == FLOAT4:
        return format_float4(value)
    return str(value).encode()


def format_numeric(d: Decimal) -> bytes:
    if d.is_nan():
        return b"NaN"
    if d.is_infinite():
        return b"-Infinity" if d < 0 else b"Infinity"
    return format(d, "f").encode()


def _special(f: float) -> bytes | None:
    if f != f:
        return b"NaN"
    if f in (float("inf"), float("-inf")):
        return b"Infinity" if f > 0 else b"-Infinity"
    return None


def _shortest_text(digits: str, exp10: int, negative: bool, limit: int) -> bytes:
    """digits * 10**exp10 as float8out/float4out print it (%g thresholds -4 and 15 or 6)."""
    stripped = digits.rstrip("0") or "0"
    exp10 += len(digits) - len(stripped)
    digits = stripped
    sci = exp10 + len(digits) - 1
    sign = "-" if negative else ""
    if -4 <= sci < limit:
        if sci >= len(digits) - 1:
            text = digits + "0" * (sci - len(digits) + 1)
        elif sci >= 0:
            text = digits[:sci + 1] + "." + digits[sci + 1:]
        else:
            text = "0." + "0" * (-sci - 1) + digits
    else:
        mant = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        text = f"{mant}e{'-' if sci < 0 else '+'}{abs(sci):02d}"
    return (sign + text).encode()


def _shortest(f: float, ffmt: str, ifmt: str, max_digits: int, limit: int) -> bytes:
    """Ryu's answer (PostgreSQL's float4out/float8out, extra_float_digits = 1): the
    shortest decimal strictly inside this float's rounding interval, nearest first."""
    special = _special(f)
    if special is not None:
        return special
    value = struct.unpack(ffmt, struct.pack(ffmt, f))[0]
    negative = math.copysign(1.0, value) < 0
    mag = abs(value)
    if mag == 0:
        return b"-0" if negative else b"0"
    bits = struct.unpack(ifmt, struct.pack(ffmt, mag))[0]
    exact = Decimal(mag)
    lo = exact - Decimal(struct.unpack(ffmt, struct.pack(ifmt, bits - 1))[0])
    above = struct.unpack(ffmt, struct.pack(ifmt, bits + 1))[0]
    hi = lo if math.isinf(above) else Decimal(above) - exact    # the largest float: same gap
    adjusted = exact.adjusted()
    for prec in range(max_digits + 1):
        quantum = Decimal(1).scaleb(adjusted - prec)
        for rounding in (decimal.ROUND_HALF_EVEN, decimal.ROUND_FLOOR, decimal.ROUND_CEILING):
            x = exact.quantize(quantum, rounding=rounding, context=EXACT)
            if (x < exact and (exact - x) * 2 < lo) or (x >= exact and (x - exact) * 2 < hi):
                _, digits, exp10 = x.as_tuple()
                return _shortest_text("".join(map(str, digits)), exp10, negative, limit=limit)
    raise AssertionError("no shortest text")        # max_digits always round-trips


def format_float8(f: float) -> bytes:
    """PostgreSQL 15 float8out: shortest round-trip text."""
    return _shortest(f, "<d", "<q", 17, 15)


def format_float4(f: float) -> bytes:
    """PostgreSQL 15 float4out: shortest round-trip text of the float4 nearest f."""
    return _shortest(f, "<f", "<i", 9, 6)


# --- avg ----------------------------------------------------------------------

def _weight_first(d: Decimal) -> tuple[int, int]:
    """Base-10000 weight and first base-10000 digit of |d| (0, 0 for zero)."""
    if d.is_zero():
        return 0, 0
    d = abs(d)
    weight = d.adjusted() // DEC_DIGITS
    first = int(EXACT.scaleb(d, -DEC_DIGITS * weight).to_integral_value(rounding=decimal.ROUND_FLOOR))
    return weight, first


def _dscale(d: Decimal) -> int:
    return max(0, -d.as_tuple().exponent)


def select_div_scale(num: Decimal, den: Decimal) -> int:
    """PostgreSQL numeric.c select_div_scale: at least 16 significant digits."""
    w1, f1 = _weight_first(num)
    w2, f2 = _weight_first(den)
    qweight = w1 - w2
    if f1 <= f2:
        qweight -= 1
    rscale = NUMERIC_MIN_SIG_DIGITS - qweight * DEC_DIGITS
    rscale = max(rscale, _dscale(num), _dscale(den), 0)
    return min(rscale, NUMERIC_MAX_DISPLAY_SCALE)


def numeric_div(num: Decimal, count: int) -> Decimal:
    """num / count as numeric_div does (count > 0): select_div_scale, round half away from 0."""
    if num.is_nan() or num.is_infinite():
        return num
    den = Decimal(count)
    rscale = select_div_scale(num, den)
    sign, digits, exp = num.as_tuple()
    mant = int("".join(map(str, digits)) or "0")
    shift = exp + rscale                         # mant * 10**shift / count, rounded
    top, bottom = (mant * 10 ** shift, count) if shift >= 0 else (mant, count * 10 ** -shift)
    q, r = divmod(top, bottom)
    if 2 * r >= bottom:
        q += 1
    return Decimal((sign, tuple(int(c) for c in str(q)), -rscale))
