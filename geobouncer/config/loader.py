"""Reading pgbouncer.ini: lines, sections, ``%include``, and the typed result.

The syntax follows PgBouncer's parser (libusual's cfparser):

- a line whose first non-blank character is ``;`` or ``#`` is a comment; those
  characters are not special later in a line, so a value runs to the end of its
  line (trailing blanks dropped) and is never unquoted in ``[pgbouncer]``;
- ``[name]`` opens a section: pgbouncer, databases, users or peers;
- ``%include FILE`` reads another file in place, at most 10 levels deep, with
  the current section carried into and out of it.  Unlike PgBouncer (which uses
  the working directory) a relative FILE is taken from the including file's
  directory, so a configuration tree works from wherever it is started;
- ``key = value``, blanks around ``=`` allowed; ``[pgbouncer]`` keys are
  case-insensitive, database and user names are not and may be double-quoted
  (``"my db" = ...``, ``""`` for a quote).  A repeated key: the last one wins.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from types import MappingProxyType

from .entries import (
    DatabaseEntry,
    PeerEntry,
    UserEntry,
    parse_connstr,
    parse_database,
    parse_peer,
    parse_user,
)
from .errors import ConfigError
from .settings import SETTINGS_BY_NAME
from .snapshot import Config, Settings

MAX_INCLUDE_DEPTH = 10
SECTIONS = ("pgbouncer", "databases", "users", "peers", "sharded_tables")
MAIN_SECTION = "pgbouncer"

_SECTION = re.compile(r"\[([^\]]*)\]\s*(?:[;#].*)?\Z")
_PLAIN_KEY = re.compile(r'([^\s="]+)\s*=[ \t]*(.*)\Z')
_QUOTED_KEY = re.compile(r'"((?:[^"]|"")*)"\s*=[ \t]*(.*)\Z')
_INCLUDE = re.compile(r"%include(?:[ \t]+(.*))?\Z")


@dataclass
class _Loading:
    """What has been read so far, across every included file."""

    section: str | None = None
    seen_main: bool = False
    settings: dict[str, object] = field(default_factory=dict)
    databases: dict[str, DatabaseEntry] = field(default_factory=dict)
    users: dict[str, UserEntry] = field(default_factory=dict)
    peers: dict[int, PeerEntry] = field(default_factory=dict)
    sharded_tables: list = field(default_factory=list)   # (name, value, file, line), checked at the end
    where: tuple = ("", 0)
    files: list[str] = field(default_factory=list)
    open_files: list[str] = field(default_factory=list)


def load_config(path: str | os.PathLike) -> Config:
    """Read, validate and freeze the configuration at ``path``; raises ``ConfigError``."""
    main = os.path.abspath(os.fspath(path))
    loading = _Loading()
    _read_file(main, _read_text(main), loading)
    if not loading.seen_main:
        raise ConfigError(f"missing [{MAIN_SECTION}] section", file=main)
    sharded = _sharding(loading, main)
    return Config(
        sharded=MappingProxyType(sharded),
        path=main,
        pgbouncer=Settings(loading.settings),
        databases=MappingProxyType(loading.databases),
        users=MappingProxyType(loading.users),
        peers=MappingProxyType(loading.peers),
        files=tuple(loading.files),
    )


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"file is not valid UTF-8 ({exc.reason})", file=path
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file: {exc.strerror or exc}", file=path
        ) from None


def _read_file(path: str, text: str, loading: _Loading) -> None:
    loading.open_files.append(path)
    if path not in loading.files:
        loading.files.append(path)
    for lineno, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line:
            continue
        loading.where = (path, lineno)
        try:
            _read_line(line, path, loading)
        except ConfigError as exc:
            raise exc.located(path, lineno) from None
    loading.open_files.pop()


def _read_line(line: str, path: str, loading: _Loading) -> None:
    include = _INCLUDE.match(line)
    if include:
        _include(include.group(1), path, loading)
    elif line[0] in ";#":
        return
    elif line[0] == "[":
        _open_section(line, loading)
    else:
        key, value = _split_key_value(line)
        if loading.section is None:
            raise ConfigError("setting outside of any section", key=key)
        _SECTION_READERS[loading.section](key, value, loading)


def _include(target: str | None, path: str, loading: _Loading) -> None:
    target = (target or "").strip()
    if not target:
        raise ConfigError("missing file name after %include")
    target = os.path.join(os.path.dirname(path), os.path.expanduser(target))
    target = os.path.normpath(target)
    if target in loading.open_files:
        raise ConfigError(f"%include {target}: file includes itself")
    if len(loading.open_files) > MAX_INCLUDE_DEPTH:
        raise ConfigError(f"%include {target}: nesting deeper than {MAX_INCLUDE_DEPTH}")
    try:
        text = _read_text(target)
    except ConfigError as exc:
        raise ConfigError(f"%include {target}: {exc.msg}") from None
    _read_file(target, text, loading)


def _open_section(line: str, loading: _Loading) -> None:
    match = _SECTION.match(line)
    if not match:
        raise ConfigError(f"malformed section header {line!r}")
    name = match.group(1).strip().lower()
    if name not in SECTIONS:
        raise ConfigError(f"unknown section [{match.group(1)}]")
    loading.section = name
    loading.seen_main = loading.seen_main or name == MAIN_SECTION


def _split_key_value(line: str) -> tuple[str, str]:
    quoted = _QUOTED_KEY.match(line)
    if quoted:
        return quoted.group(1).replace('""', '"'), quoted.group(2)
    plain = _PLAIN_KEY.match(line)
    if not plain:
        raise ConfigError(f"syntax error, expected 'key = value': {line!r}")
    return plain.group(1), plain.group(2)


def _read_setting(key: str, value: str, loading: _Loading) -> None:
    setting = SETTINGS_BY_NAME.get(key.lower())
    if setting is None:
        raise ConfigError("unknown setting", key=key)
    try:
        loading.settings[setting.name] = setting.parse(value)
    except ValueError as exc:
        raise ConfigError(str(exc), key=setting.name) from None


def _read_database(key: str, value: str, loading: _Loading) -> None:
    loading.databases[key] = parse_database(key, value)


def _read_sharded_table(key: str, value: str, loading: _Loading) -> None:
    loading.sharded_tables.append((key, value) + loading.where)


def _sharding(loading: _Loading, main: str) -> dict:
    """The sharded databases (``shards=``) and their ``[sharded_tables]`` rules,
    checked once every section is read (a rule may come before its database)."""
    from ..sharding.rules import ShardedDatabase, parse_rule   # pure: no I/O
    databases = loading.databases
    tables: dict[str, list] = {}
    for name, value, path, lineno in loading.sharded_tables:
        try:
            params = dict(parse_connstr(value))
            rule = parse_rule(name, params, databases)
        except ValueError as exc:
            raise ConfigError(f"sharded table {name!r}: {exc}", key=name).located(path, lineno) from None
        except ConfigError as exc:
            raise exc.located(path, lineno) from None
        tables.setdefault(rule.database, []).append(rule)
    out = {}
    for name, entry in databases.items():
        if not entry.shards:
            continue
        for shard in entry.shards:
            target = databases.get(shard)
            if target is None:
                raise ConfigError(f"database {name!r}: shard {shard!r} is not a [databases] entry",
                                  file=main, key="shards")
            if target.shards:
                raise ConfigError(f"database {name!r}: shard {shard!r} is itself sharded",
                                  file=main, key="shards")
        out[name] = ShardedDatabase(name, entry.shards, tables.get(name, ()))
    return out


def _read_user(key: str, value: str, loading: _Loading) -> None:
    loading.users[key] = parse_user(key, value)


def _read_peer(key: str, value: str, loading: _Loading) -> None:
    peer = parse_peer(key, value)
    loading.peers[peer.peer_id] = peer


_SECTION_READERS = {
    "pgbouncer": _read_setting,
    "databases": _read_database,
    "users": _read_user,
    "peers": _read_peer,
    "sharded_tables": _read_sharded_table,
}
