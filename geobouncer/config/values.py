"""Value types of the settings table: parse one ini string, format one value back.

PgBouncer reads its integers with C ``strtol(value, &end, 0)`` and its times with
``strtod``; the parsers here accept the same spellings (``0x1f`` and ``017`` are
integers, times are non-negative plain seconds with an optional fraction and no
unit) and refuse anything else.  Parsers raise ``ValueError`` with a message; the
loader adds file, line and key.
"""

from __future__ import annotations

import math
import re

INT = "int"
TIME = "time"  # float seconds
BOOL = "bool"
STR = "str"  # always a string; empty is allowed
OPT_STR = "optional str"  # None when unset or empty
ENUM = "enum"
LIST = "list"  # comma- or space-separated -> tuple[str, ...]
OCTAL = "octal"  # file mode

KINDS = (INT, TIME, BOOL, STR, OPT_STR, ENUM, LIST, OCTAL)

_C_INT = re.compile(r"[+-]?(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")
_DECIMAL = re.compile(r"\+?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
_OCTAL = re.compile(r"(?:0[oO])?([0-7]+)\Z")
_LIST_SEP = re.compile(r"[,\s]+")
_TRUE = frozenset({"1", "on", "yes", "true"})
_FALSE = frozenset({"0", "off", "no", "false"})


def parse_int(
    raw: str, minimum: float | None = None, maximum: float | None = None
) -> int:
    """A C integer literal (decimal, ``0x`` hex or leading-zero octal) within bounds."""
    text = raw.strip()
    if not _C_INT.match(text):
        raise ValueError(f"invalid integer {raw!r}")
    sign = -1 if text[0] == "-" else 1
    digits = text.lstrip("+-")
    if digits[:2].lower() == "0x":
        value = int(digits, 0)
    elif len(digits) > 1 and digits[0] == "0":
        value = int(digits[1:], 8)
    else:
        value = int(digits)
    return _in_range(sign * value, minimum, maximum, raw)


def parse_time(
    raw: str, minimum: float | None = None, maximum: float | None = None
) -> float:
    """Non-negative seconds, fraction allowed: ``15``, ``0.5``, ``.1``, ``1e3``."""
    text = raw.strip()
    if not _DECIMAL.match(text):
        raise ValueError(f"invalid time {raw!r} (expected seconds, e.g. 15 or 0.5)")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"time out of range: {raw!r}")
    return _in_range(value, minimum, maximum, raw)


def parse_bool(raw: str) -> bool:
    """0/1, on/off, yes/no, true/false; like PgBouncer, any other integer is true."""
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    if _C_INT.match(text):
        return parse_int(text) != 0
    raise ValueError(
        f"invalid boolean {raw!r} (expected 0/1, on/off, yes/no, true/false)"
    )


def parse_enum(raw: str, choices: tuple[str, ...]) -> str:
    """One of ``choices``, compared case-insensitively; returns the canonical spelling."""
    text = raw.strip().lower()
    for choice in choices:
        if choice.lower() == text:
            return choice
    raise ValueError(f"invalid value {raw!r} (expected one of: {', '.join(choices)})")


def parse_list(raw: str) -> tuple[str, ...]:
    """``a, b c`` -> ``("a", "b", "c")``; empty -> ``()``."""
    return tuple(item for item in _LIST_SEP.split(raw.strip()) if item)


def parse_octal(raw: str) -> int:
    """A file mode written in octal, with or without a leading 0: ``0777``, ``700``."""
    match = _OCTAL.match(raw.strip())
    if not match:
        raise ValueError(f"invalid octal mode {raw!r} (e.g. 0777)")
    return _in_range(int(match.group(1), 8), 0, 0o7777, raw)


def parse_value(
    kind: str,
    raw: str,
    choices: tuple[str, ...] = (),
    minimum: float | None = None,
    maximum: float | None = None,
) -> object:
    """Parse ``raw`` as ``kind``; raises ``ValueError`` with a readable message."""
    if kind == INT:
        return parse_int(raw, minimum, maximum)
    if kind == TIME:
        return parse_time(raw, minimum, maximum)
    if kind == BOOL:
        return parse_bool(raw)
    if kind == ENUM:
        return parse_enum(raw, choices)
    if kind == LIST:
        return parse_list(raw)
    if kind == OCTAL:
        return parse_octal(raw)
    if kind == OPT_STR:
        return raw or None
    if kind == STR:
        return raw
    raise AssertionError(f"unknown setting kind {kind!r}")


def format_value(kind: str, value: object) -> str:
    """The ini spelling of a typed value: what ``parse_value`` reads back."""
    if value is None:
        return ""
    if kind == BOOL:
        return "1" if value else "0"
    if kind == TIME:
        return f"{value:g}"
    if kind == OCTAL:
        return f"0{value:o}"
    if kind == LIST:
        return ", ".join(value)  # type: ignore[arg-type]
    return str(value)


def _in_range(value, minimum, maximum, raw):
    if minimum is not None and value < minimum:
        raise ValueError(f"value {raw!r} is below the minimum {minimum:g}")
    if maximum is not None and value > maximum:
        raise ValueError(f"value {raw!r} is above the maximum {maximum:g}")
    return value
