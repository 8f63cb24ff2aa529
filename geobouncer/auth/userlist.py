"""PgBouncer's auth_file (userlist.txt).

One user per line, two double-quoted fields, the rest of the line ignored:

    "username1" "password" ...
    "username2" "md5abcdef012342345" ...
    "username3" "SCRAM-SHA-256$<iterations>:<salt>$<storedkey>:<serverkey>"

A double quote inside a field is written twice (""). Leading whitespace and
blank lines are skipped; a line whose first character is ';' or '#' is a
comment. A later line for the same user replaces an earlier one.

PgBouncer stops at the first broken line and keeps what it read so far; we
refuse the whole file instead and say where, so a typo is noticed at start-up
or RELOAD rather than as users who can no longer log in. The two fields must
be separated by whitespace only (PgBouncer skips anything up to the next
quote, even across lines).
"""

from __future__ import annotations

import os


class AuthFileError(Exception):
    """str() is "path:line: message" (or "path: message" for the whole file)."""

    def __init__(self, path: str, line: int | None, message: str):
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line
        self.message = message


def load_auth_file(path: str | os.PathLike) -> dict[str, str]:
    """Read an auth_file: {user name: secret}."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise AuthFileError(path, None, f"could not open auth_file: {exc.strerror}") from None
    users: dict[str, str] = {}
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise AuthFileError(path, number, "line is not valid UTF-8") from None
        try:
            entry = parse_auth_line(text)
        except ValueError as exc:
            raise AuthFileError(path, number, str(exc)) from None
        if entry is not None:
            users[entry[0]] = entry[1]
    return users


def parse_auth_line(line: str) -> tuple[str, str] | None:
    """One line -> (user, secret), or None for a blank or comment line.
    Raises ValueError with a message saying what is wrong."""
    text = line.lstrip()
    if not text or text[0] in ";#":
        return None
    if text[0] != '"':
        raise ValueError('expected a double-quoted user name ("user" "password")')
    user, pos = _quoted_field(text, 0, "user name")
    rest = text[pos:]
    stripped = rest.lstrip()
    if not stripped.startswith('"') or len(stripped) == len(rest):
        raise ValueError("expected a double-quoted password after the user name")
    secret, _ = _quoted_field(stripped, 0, "password")
    return user, secret


def _quoted_field(text: str, start: int, what: str) -> tuple[str, int]:
    """The field opened by the quote at ``start`` (unescaped) and the position after it."""
    parts = []
    pos = start + 1
    while True:
        end = text.find('"', pos)
        if end < 0:
            raise ValueError(f"unterminated {what} (missing closing double quote)")
        parts.append(text[pos:end])
        if text.startswith('""', end):
            parts.append('"')
            pos = end + 2
        else:
            return "".join(parts), end + 1
