"""Session SETs remembered across servers in transaction pooling.

Beyond PgBouncer: a ``SET name = value`` (or ``RESET``) that a client runs
outside a transaction is remembered for that client, and replayed on whichever
server it lands on next; a server that carries another client's SET gets a
``RESET`` first. Parameters the server reports itself (ParameterStatus:
TimeZone, DateStyle, application_name ...) are tracked that way instead.
``SET LOCAL`` and SETs inside a transaction are left alone.

``parse`` reads a text that is one SET / RESET / DISCARD ALL, keeping the value
as written; a text of several statements (or with a comment) is refused here
and read by pool/session_multi.py.
"""

from __future__ import annotations

import re

_NAME = r'([A-Za-z_][A-Za-z0-9_$]*(?:\.[A-Za-z_][A-Za-z0-9_$]*)?)'
_SET = re.compile(r"^\s*set\s+(?:session\s+)?" + _NAME + r"\s*(?:=|\s+to\s+)\s*(.+?)\s*;?\s*$",
                  re.IGNORECASE | re.DOTALL)
_RESET = re.compile(r"^\s*reset\s+(all|" + _NAME[1:-1] + r")\s*;?\s*$", re.IGNORECASE | re.DOTALL)
_NOT_SESSION = {"local", "transaction", "session", "constraints"}


_DISCARD = re.compile(r"^\s*discard\s+all\s*;?\s*$", re.I)


def parse(text: str):
    """('set', name, raw_value) | ('reset', name) | ('reset_all',) | None.
    DISCARD ALL counts as RESET ALL here (it also drops the remembered SETs)."""
    if _DISCARD.match(text):
        return ("reset_all",)
    match = _SET.match(text)
    if match:
        name = match.group(1).lower()
        bare = _strip_quoted(match.group(2))
        value = match.group(2)
        if name in _NOT_SESSION or any(mark in bare for mark in (";", "--", "/*", "$")) or "\\" in value:
            # Several statements, a comment, a dollar quote or a backslash: pool/session_multi.py
            # reads those. The raw value is replayed as written, so its quotes must end where
            # _strip_quoted ends them whatever the replaying server's standard_conforming_strings
            # (PostgreSQL parses the whole replay with the setting it had before it).
            return None
        if value.lower() == "default":
            return ("reset", name)
        return ("set", name, value)
    match = _RESET.match(text)
    if match:
        name = match.group(1).lower()
        return ("reset_all",) if name == "all" else ("reset", name)
    return None


def _strip_quoted(value: str) -> str:
    """The value without its quoted parts (to spot a second statement)."""
    return re.sub(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"", "", value)


def apply(sets: dict[str, str], change) -> None:
    """Apply a parsed change to a {name: raw SQL value} map."""
    if change[0] == "set":
        sets[change[1]] = change[2]
    elif change[0] == "reset":
        sets.pop(change[1], None)
    else:
        sets.clear()


_RAW = "\x00"   # marks a value given as a plain string (startup parameter), not SQL


def raw_value(text: str) -> str:
    """A value as a startup parameter gives it: applied with set_config, which
    reads it as the server reads startup options (lists split on commas)."""
    return _RAW + text


def _assign(name: str, value: str) -> str:
    if value.startswith(_RAW):
        literal = "'" + value[1:].replace("'", "''") + "'"
        if "\\" in literal:    # a plain literal would read differently with standard_conforming_strings off
            literal = "E" + literal.replace("\\", "\\\\")
        return f"SELECT pg_catalog.set_config('{name}', {literal}, false)"
    return f"SET {_quoted(name)} = {value}"


def _quoted(name: str) -> str:
    """Each part of a dotted name as a quoted identifier: the parser gives names a
    client could only write quoted (x."select"), and a quoted name keeps its case."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def sync_sql(wanted: dict[str, str], current: dict[str, str]) -> str:
    """SQL that brings a server's remembered SETs (``current``) to ``wanted``."""
    parts = [f"RESET {_quoted(name)}" for name in current if name not in wanted]
    parts += [_assign(name, value) for name, value in wanted.items() if current.get(name) != value]
    return ";".join(parts)
