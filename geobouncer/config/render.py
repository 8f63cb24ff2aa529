"""conf/geobouncer.ini, written from the settings table.

``scripts/gen-conf`` writes the result to conf/geobouncer.ini and a unit test
checks that the file matches, so the sample cannot drift from the table.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping

from .entries import DATABASE_KEYS
from .setting import Setting
from .settings import SETTINGS

WIDTH = 79

#: Keys left active in the sample so that it loads and listens as it is.
SAMPLE_VALUES: Mapping[str, str] = {
    "listen_addr": "127.0.0.1",
    "listen_port": "6432",
    "auth_type": "md5",
    "auth_file": "userlist.txt",
}

#: [databases] keys that PgBouncer does not have, with what they do.
GEOBOUNCER_DATABASE_KEYS: Mapping[str, str] = {
    "replicas": "host[:port],... streaming replicas of this database; each gets a "
    "pool and a database key of its own (name@host:port), is health-checked every "
    "health_check_period and left out for replica_ban_time when it fails.",
    "load_balance": "round_robin (default), random or least_active: how reads are "
    "spread over the replicas.",
    "read_write_split": "1: in transaction and statement pooling, a read (one SELECT "
    "outside a transaction) goes to a replica, everything else to host; the hint "
    "/* geobouncer:primary */ forces the primary. Needs replicas.",
    "replica_max_lag": "bytes of WAL a replica may lag the primary before reads skip it.",
    "topology_query": "fast switchover: run on host at start and on RELOAD, its rows "
    "name the cluster's nodes (endpoint as host or host:port, or a second column "
    "with the port); when the writer fails, clients wait while the nodes are polled "
    "with pg_is_in_recovery() and resume on the new writer.",
}

_TOP = """\
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
;; contain blanks with '...'.
"""

_EXAMPLES = """\
;;
; mydb = host=127.0.0.1 port=5432 dbname=mydb
;; several hosts: new server connections go to each in turn (load_balance_hosts)
; spread = host=10.0.0.2,10.0.0.3 port=5432 dbname=mydb pool_size=10
; forced = host=/var/run/postgresql user=app password='s3cr''et'
;; a primary with two replicas, reads sent to the replicas automatically
; app = host=10.0.0.1 dbname=app replicas='10.0.0.2:5432,10.0.0.3:5432' load_balance=round_robin read_write_split=1 replica_max_lag=16000000
;; a cluster whose writer may move (a table listing 'host:port' of every node)
; ha = host=10.0.0.1 dbname=app topology_query='select endpoint from topology'
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


def _databases_doc() -> str:
    pgbouncer_keys = [key for key in DATABASE_KEYS if key not in GEOBOUNCER_DATABASE_KEYS]
    lines = textwrap.wrap("PgBouncer's keys: " + " ".join(pgbouncer_keys), WIDTH - 3)
    lines.append("Keys geobouncer adds:")
    for key, doc in GEOBOUNCER_DATABASE_KEYS.items():
        wrapped = textwrap.wrap(f"{key}: {doc}", WIDTH - 5)
        lines += ["  " + wrapped[0], *("    " + line for line in wrapped[1:])]
    return "".join(f";; {line}\n" for line in lines)


def render_default_ini(active: Mapping[str, str] = SAMPLE_VALUES) -> str:
    """The sample ini: every key commented out with its default, ``active`` set."""
    unknown = set(active) - {s.name for s in SETTINGS}
    if unknown:
        raise KeyError(f"unknown settings: {', '.join(sorted(unknown))}")
    parts = [_TOP, _databases_doc(), _EXAMPLES]
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
