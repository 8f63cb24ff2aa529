"""Configuration: the pgbouncer.ini format, one settings table, immutable snapshots.

    cfg = load_config("conf/geobouncer.ini")      # ConfigError on any problem
    cfg.pgbouncer.listen_port                     # typed, defaults filled in
    cfg.database_for("mydb")                      # entry, or one made from "*"
    changed, need_restart = diff_configs(old, new)

Imports nothing else from geobouncer; standard library only.
"""

from .entries import DatabaseEntry, PeerEntry, UserEntry, parse_connstr
from .errors import ConfigError
from .loader import load_config
from .render import render_default_ini
from .setting import Setting
from .settings import SETTINGS, SETTINGS_BY_NAME
from .snapshot import Config, Settings, diff_configs, diff_entries

__all__ = [
    "SETTINGS",
    "SETTINGS_BY_NAME",
    "Config",
    "ConfigError",
    "DatabaseEntry",
    "PeerEntry",
    "Setting",
    "Settings",
    "UserEntry",
    "diff_configs",
    "diff_entries",
    "load_config",
    "parse_connstr",
    "render_default_ini",
]
