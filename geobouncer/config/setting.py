"""One row of the settings table (config/settings.py), and the means to write rows.

``Setting`` is one ``[pgbouncer]`` key: name, value type, default, whether RELOAD
may change it, and its documentation.  ``row`` and ``block`` keep the table to one
short call per key; the group names head the sections of the generated
conf/geobouncer.ini (render.py), in the order the table lists them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .values import format_value, parse_value

GENERIC = "Generic settings"
AUTH = "Authentication settings"
LOG = "Log settings"
CONSOLE = "Console access control"
CHECKS = "Connection sanity checks, timeouts"
TLS = "TLS settings"
DANGEROUS = "Dangerous timeouts"
NETWORK = "Low-level network settings"
GEOBOUNCER = "geobouncer extensions"


@dataclass(frozen=True)
class Setting:
    """One ``[pgbouncer]`` key."""

    name: str
    type: str  # one of values.KINDS
    default: object  # int, float seconds, bool, str, tuple; None means "not set"
    reloadable: bool  # False: a changed value only takes effect after a restart
    doc: str
    group: str = GENERIC
    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    example: str | None = None  # shown in the generated ini when the default is unset
    extension: bool = False  # a geobouncer key, unknown to PgBouncer

    def parse(self, raw: str) -> object:
        """The typed value of ``raw``; raises ``ValueError``."""
        return parse_value(self.type, raw, self.choices, self.min, self.max)

    def format(self, value: object) -> str:
        """The ini spelling of ``value``."""
        return format_value(self.type, value)


def row(name, kind, default, doc, *, reload=True, **extra) -> Setting:
    return Setting(name, kind, default, reload, doc, **extra)


def block(group: str, *settings: Setting) -> tuple[Setting, ...]:
    return tuple(dataclasses.replace(s, group=group) for s in settings)
