"""conf/geobouncer.ini, written from the settings table.

``scripts/gen-conf`` writes the result to conf/geobouncer.ini and a unit test
checks that the file matches, so the sample cannot drift from the table.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping

from .settings import SETTINGS, Setting

WIDTH = 79

#: Keys left active in the sample so that it loads and listens as it is.
SAMPLE_VALUES: Mapping[str, str] = {
    "listen_addr": "127.0.0.1",
    "listen_port": "6432",
    "auth_type": "md5",
    "auth_file": "userlist.txt",
}

_HEADER = """\
;; geobouncer configuration: the pgbouncer.ini format, read the same way.
;;
;; Generated from geobouncer/config/settings.py by scripts/gen-conf; edit the
;; table there and regenerate rather than editing this file.
;;
;; Lines starting with ; or # are comments (not later in a line).  Every
;; [pgbouncer] key is listed below, commented out, with its default.  Times are
;; in seconds, fractions allowed.  "%include FILE" reads another file in place;
;; a relative FILE is taken from the including file's directory.

[databases]
;; name = connection string: libpq-style key=value pairs; quote values that
;; contain blanks with '...'.  Keys: dbname host port user password auth_user
;; auth_query auth_dbname pool_size min_pool_size reserve_pool_size
;; connect_query pool_mode max_db_connections max_db_client_connections
;; server_lifetime client_encoding datestyle timezone application_name
;; load_balance_hosts target_session_attrs query_wait_timeout topology_query
;;
; mydb = host=127.0.0.1 port=5432 dbname=mydb
; replicas = host=10.0.0.2,10.0.0.3 port=5432 dbname=mydb pool_size=10
; forced = host=/var/run/postgresql user=app password='s3cr''et'
;; "*" serves any database name not listed, with dbname = the requested name:
; * = host=127.0.0.1 port=5432
postgres = host=127.0.0.1 port=5432

[users]
;; user = settings: pool_mode pool_size reserve_pool_size max_user_connections
;; max_user_client_connections query_timeout query_wait_timeout
;; idle_transaction_timeout transaction_timeout client_idle_timeout
; app = pool_mode=transaction max_user_connections=50

[pgbouncer]
"""


def render_default_ini(active: Mapping[str, str] = SAMPLE_VALUES) -> str:
    """The sample ini: every key commented out with its default, ``active`` set."""
    unknown = set(active) - {s.name for s in SETTINGS}
    if unknown:
        raise KeyError(f"unknown settings: {', '.join(sorted(unknown))}")
    parts = [_HEADER]
    group = None
    for setting in SETTINGS:
        if setting.group != group:
            group = setting.group
            parts.append(f"\n;;;\n;;; {group}\n;;;\n")
        parts.append(_render_setting(setting, active.get(setting.name)))
    return "".join(parts)


def _render_setting(setting: Setting, active_value: str | None) -> str:
    lines = textwrap.wrap(setting.doc, WIDTH - 3)
    lines.append(_default_note(setting))
    text = "\n" + "".join(f";; {line}\n" for line in lines)
    if active_value is not None:
        return text + f"{setting.name} = {active_value}\n"
    shown = setting.format(setting.default) if setting.default is not None else None
    if shown is None:
        shown = setting.example or ""
    return text + f";{setting.name} = {shown}".rstrip() + "\n"


def _default_note(setting: Setting) -> str:
    if setting.default is None:
        note = "Default: not set."
    elif setting.format(setting.default) == "":
        note = "Default: empty."
    else:
        note = f"Default: {setting.format(setting.default)}."
    if setting.choices:
        note += f" One of: {', '.join(setting.choices)}."
    if not setting.reloadable:
        note += " Needs a restart."
    return note
