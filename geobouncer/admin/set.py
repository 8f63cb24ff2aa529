"""``SET key = value`` on the admin console, as PgBouncer does it.

PgBouncer's grammar: ``SET <word> (= | TO) <word>`` or ``... '<string>'`` (two
quotes inside a string stand for one). A word is ``[0-9a-z_]+`` or a
double-quoted name, so ``-1`` or ``1.5`` must be quoted; anything else is the
console's usual "invalid command". The key is matched case-sensitively (PgBouncer
says "unknown parameter: pgbouncer/DEFAULT_POOL_SIZE"). Every refusal of a known
shape is "SET failed" (08P01), with the reason in the log, as in PgBouncer.

A key that needs a restart is accepted and left unchanged, exactly as PgBouncer
1.18 does (its config parser skips non-reloadable keys once loaded); geobouncer
says so in a NOTICE and in the log. A few client-side parameters that drivers
like to set (client_encoding, DateStyle ...) are ignored with PgBouncer's
"SET ignored" notice.
"""

from __future__ import annotations

import logging
import re

from ..config import SETTINGS
from ..proto import messages as m

log = logging.getLogger("geobouncer")

_WS0, _WS1 = r"[ \t\n\r]*", r"[ \t\n\r]+"
_WORD = r'("(?:[^"]|"")+"|[0-9a-z_]+)'
_STRING = r"('(?:[^']|'')*')"
_SET_WORD = re.compile(rf"^{_WS0}set{_WS1}{_WORD}{_WS0}(?:=|to){_WS0}{_WORD}{_WS0}(?:;{_WS0})?$",
                       re.IGNORECASE)
_SET_STR = re.compile(rf"^{_WS0}set{_WS1}{_WORD}{_WS0}(?:=|to){_WS0}{_STRING}{_WS0}(?:;{_WS0})?$",
                      re.IGNORECASE)

# PgBouncer's fake_param_list: answered locally, never applied.
FAKE_PARAMS = {"client_encoding": "UTF-8", "default_transaction_isolation": "read committed",
               "standard_conforming_strings": "on", "datestyle": "ISO", "timezone": "GMT",
               "extra_float_digits": "2"}

_BY_NAME = {s.name: s for s in SETTINGS}


class SetFailed(Exception):
    """A SET PgBouncer would answer with "SET failed"; the reason goes to the log."""


def parse_set(sql: str) -> tuple[str, str] | None:
    """``(key, value)`` of a SET statement in PgBouncer's grammar, else None."""
    match = _SET_STR.match(sql) or _SET_WORD.match(sql)
    if match is None:
        return None
    return _unquote(match.group(1), '"'), _unquote(match.group(2), match.group(2)[0])


def _unquote(text: str, quote: str) -> str:
    if len(text) >= 2 and text[0] == quote and quote in "'\"":
        return text[1:-1].replace(quote * 2, quote)
    return text


def is_fake(key: str) -> bool:
    return key.lower() in FAKE_PARAMS


def resolve(settings, key: str, raw: str):
    """The setting and its parsed value; raises ``SetFailed``."""
    setting = _BY_NAME.get(key)
    if setting is None:
        raise SetFailed(f"unknown parameter: pgbouncer/{key}")
    try:
        value = setting.parse(raw)
    except ValueError as exc:
        raise SetFailed(f"invalid value '{raw}' for parameter {key}: {exc}") from None
    return setting, value


def execute_set(app, sql_key: str, raw: str) -> bytes:
    """Apply one SET; returns the reply (without ReadyForQuery)."""
    if is_fake(sql_key):
        return m.notice_response("SET ignored") + m.command_complete("SET")
    setting, value = resolve(app.settings, sql_key, raw)
    tag = m.command_complete(f"SET {sql_key}={raw}")
    if not setting.reloadable:
        log.warning("SET %s ignored: the setting needs a restart", sql_key)
        return m.notice_response(f"{sql_key} needs a restart to change; value unchanged") + tag
    error = app.set_setting(setting.name, value)
    if error:
        raise SetFailed(error)
    log.info("SET %s=%s", sql_key, raw)
    return tag
