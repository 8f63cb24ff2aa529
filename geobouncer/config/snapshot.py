"""Immutable configuration snapshots and what changed between two of them.

A RELOAD loads a new ``Config`` next to the old one; nothing is ever mutated, so
a greenlet holding the old snapshot keeps a consistent view until it looks again.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .entries import DatabaseEntry, PeerEntry, UserEntry
from .settings import SETTINGS, SETTINGS_BY_NAME


def _no_entries() -> Mapping:
    return MappingProxyType({})


class Settings:
    """The ``[pgbouncer]`` section: one typed attribute per key, defaults filled in.

    Attributes are plain instance attributes (no ``__getattr__`` indirection), so
    reading ``cfg.pgbouncer.query_wait_timeout`` on a hot path costs a dict lookup.
    """

    def __init__(self, values: Mapping[str, object] | None = None) -> None:
        given = dict(values or {})
        unknown = set(given) - set(SETTINGS_BY_NAME)
        if unknown:
            raise KeyError(f"unknown settings: {', '.join(sorted(unknown))}")
        for setting in SETTINGS:
            object.__setattr__(
                self, setting.name, given.get(setting.name, setting.default)
            )

    def get(self, name: str) -> object:
        """The value of ``name`` (case-insensitive); ``KeyError`` for an unknown key."""
        key = name.lower()
        if key not in SETTINGS_BY_NAME:
            raise KeyError(name)
        return self.__dict__[key]

    def as_dict(self) -> dict[str, object]:
        """Every key and its value, in table order."""
        return {s.name: self.__dict__[s.name] for s in SETTINGS}

    def formatted(self, name: str) -> str:
        """The value of ``name`` spelled as in the ini file (for SHOW CONFIG)."""
        return SETTINGS_BY_NAME[name.lower()].format(self.get(name))

    def __iter__(self) -> Iterator[str]:
        return (s.name for s in SETTINGS)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Settings is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Settings is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Settings) and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash(tuple(self.__dict__.items()))

    def __repr__(self) -> str:
        changed = {
            s.name: v
            for s, v in zip(SETTINGS, self.__dict__.values())
            if v != s.default
        }
        return f"<Settings {changed!r}>"


@dataclass(frozen=True)
class Config:
    """One loaded configuration: the main file and everything it includes.

    ``databases`` keeps file order and includes the ``"*"`` fallback, if any.
    """

    path: str  # absolute path of the main file
    pgbouncer: Settings = field(default_factory=Settings)
    databases: Mapping[str, DatabaseEntry] = field(default_factory=_no_entries)
    users: Mapping[str, UserEntry] = field(default_factory=_no_entries)
    peers: Mapping[int, PeerEntry] = field(default_factory=_no_entries)
    sharded: Mapping[str, object] = field(default_factory=_no_entries)  # name -> ShardedDatabase
    files: tuple[str, ...] = ()  # every file read, main file first

    def __post_init__(self) -> None:
        # Read-only views: a snapshot shared between greenlets must not change.
        for name in ("databases", "users", "peers", "sharded"):
            value = getattr(self, name)
            if not isinstance(value, MappingProxyType):
                object.__setattr__(self, name, MappingProxyType(dict(value)))

    def database_for(self, name: str) -> DatabaseEntry | None:
        """The entry serving database ``name``: its own, else one made from ``*``."""
        entry = self.databases.get(name)
        if entry is not None:
            return entry
        fallback = self.databases.get("*")
        if fallback is None:
            return None
        return dataclasses.replace(fallback, name=name, dbname=fallback.dbname or name)

    def resolve_path(self, value: str | None) -> str | None:
        """``value`` as an absolute path; relative paths start at the main file's dir."""
        if value is None or value == "":
            return None
        value = os.path.expanduser(value)
        if os.path.isabs(value):
            return os.path.normpath(value)
        return os.path.normpath(os.path.join(os.path.dirname(self.path), value))


def diff_configs(old: Config, new: Config) -> tuple[set[str], set[str]]:
    """Changed ``[pgbouncer]`` keys as (reloadable, needing a restart)."""
    reloadable: set[str] = set()
    restart_only: set[str] = set()
    for setting in SETTINGS:
        if old.pgbouncer.get(setting.name) != new.pgbouncer.get(setting.name):
            (reloadable if setting.reloadable else restart_only).add(setting.name)
    return reloadable, restart_only


def diff_entries(old: Mapping, new: Mapping) -> tuple[set, set, set]:
    """(added, removed, changed) names between two ``databases``/``users``/``peers``."""
    added = set(new) - set(old)
    removed = set(old) - set(new)
    changed = {name for name in set(old) & set(new) if old[name] != new[name]}
    return added, removed, changed
