"""``[databases]``, ``[users]`` and ``[peers]`` entries and their connection strings.

A value in these sections is a libpq-style list of ``key=value`` pairs.  A value may
be single-quoted; inside quotes ``''`` (PgBouncer) and ``\\'`` (libpq) both stand for
a quote and ``\\\\`` for a backslash; outside quotes a backslash escapes the next
character and whitespace ends the value.  Unknown keys are errors.  Errors raised
here carry the key; the loader adds file and line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError
from .settings import POOL_MODES
from .values import BOOL, ENUM, INT, STR, TIME, parse_value

LOAD_BALANCE_HOSTS = ("round-robin", "disable")
LOAD_BALANCE = ("round_robin", "random", "least_active")
TARGET_SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby")
UNSET_TIME = "unset time"  # a time where -1 means "not set": None

_COUNT = (INT, (), 0)
_TIME = (TIME, (), None)
_TEXT = (STR, (), None)
_MAYBE_TIME = (UNSET_TIME, (), None)

# fmt: off
DATABASE_KEYS: dict[str, tuple] = {
    "dbname": _TEXT, "host": _TEXT, "port": _TEXT, "user": _TEXT, "password": _TEXT,
    "auth_user": _TEXT, "auth_query": _TEXT, "auth_dbname": _TEXT,
    "pool_size": _COUNT, "min_pool_size": _COUNT, "reserve_pool_size": _COUNT,
    "connect_query": _TEXT, "pool_mode": (ENUM, POOL_MODES, None),
    "max_db_connections": _COUNT, "max_db_client_connections": _COUNT,
    "server_lifetime": _TIME, "client_encoding": _TEXT, "datestyle": _TEXT,
    "timezone": _TEXT, "application_name": _TEXT,
    "load_balance_hosts": (ENUM, LOAD_BALANCE_HOSTS, None),
    "target_session_attrs": (ENUM, TARGET_SESSION_ATTRS, None),
    "query_wait_timeout": _MAYBE_TIME, "topology_query": _TEXT,
    # geobouncer: replicas of this database and how reads are spread over them
    "replicas": _TEXT, "load_balance": (ENUM, LOAD_BALANCE, None),
    "read_write_split": (BOOL, (), None), "replica_max_lag": _COUNT,
    # geobouncer: a sharded database over these entries, in shard order
    "shards": _TEXT,
}
DATABASE_ALIASES = {"reserve_pool": "reserve_pool_size"}

USER_KEYS: dict[str, tuple] = {
    "pool_mode": (ENUM, POOL_MODES, None), "pool_size": _COUNT,
    "reserve_pool_size": _COUNT, "max_user_connections": _COUNT,
    "max_user_client_connections": _COUNT, "query_timeout": _TIME,
    "query_wait_timeout": _MAYBE_TIME, "idle_transaction_timeout": _TIME,
    "transaction_timeout": _TIME, "client_idle_timeout": _TIME,
}

PEER_KEYS: dict[str, tuple] = {"host": _TEXT, "port": (INT, (), 1), "pool_size": _COUNT}
# fmt: on

RESERVED_DATABASES = frozenset({"pgbouncer"})


@dataclass(frozen=True)
class DatabaseEntry:
    """One ``[databases]`` line.  ``None`` means "use the [pgbouncer] default"."""

    name: str
    host: str | None = None  # may be a comma-separated list, kept as written
    port: int = 5432  # the first of ``ports``
    dbname: str | None = None  # the entry name unless set; None only for "*"
    user: str | None = None
    password: str | None = field(default=None, repr=False)  # kept out of logs
    auth_user: str | None = None
    auth_query: str | None = None
    auth_dbname: str | None = None
    pool_size: int | None = None
    min_pool_size: int | None = None
    reserve_pool_size: int | None = None
    connect_query: str | None = None
    pool_mode: str | None = None
    max_db_connections: int | None = None
    max_db_client_connections: int | None = None
    server_lifetime: float | None = None
    client_encoding: str | None = None
    datestyle: str | None = None
    timezone: str | None = None
    application_name: str | None = None
    load_balance_hosts: str = "round-robin"
    target_session_attrs: str = "any"
    query_wait_timeout: float | None = None
    topology_query: str | None = None  # geobouncer: cluster discovery query
    replicas: str | None = None  # geobouncer: "host[:port],..." serving reads
    load_balance: str = "round_robin"  # geobouncer: round_robin | random | least_active
    read_write_split: bool = False  # geobouncer: reads to replicas automatically
    replica_max_lag: int | None = None  # geobouncer: bytes of WAL a replica may lag
    shards: tuple[str, ...] | None = None  # geobouncer: the entries this sharded database spans
    hosts: tuple[str, ...] = ()  # ``host`` split; () means the Unix socket
    ports: tuple[int, ...] = ()  # one port per host, or (port,) without hosts

    def __post_init__(self) -> None:
        if not self.hosts and self.host:
            object.__setattr__(self, "hosts", _split_hosts(self.host))
        if not self.ports:
            object.__setattr__(self, "ports", (self.port,) * max(1, len(self.hosts)))

    def startup_params(self) -> dict[str, str]:
        """Startup parameters to send to the server, for those this entry sets."""
        params = {
            "client_encoding": self.client_encoding,
            "DateStyle": self.datestyle,
            "TimeZone": self.timezone,
            "application_name": self.application_name,
        }
        return {name: value for name, value in params.items() if value is not None}


@dataclass(frozen=True)
class UserEntry:
    """One ``[users]`` line.  ``None`` means "use the database or [pgbouncer] value"."""

    name: str
    pool_mode: str | None = None
    pool_size: int | None = None
    reserve_pool_size: int | None = None
    max_user_connections: int | None = None
    max_user_client_connections: int | None = None
    query_timeout: float | None = None
    query_wait_timeout: float | None = None
    idle_transaction_timeout: float | None = None
    transaction_timeout: float | None = None
    client_idle_timeout: float | None = None


@dataclass(frozen=True)
class PeerEntry:
    """One ``[peers]`` line: another geobouncer that may own a cancel key."""

    peer_id: int
    host: str
    port: int = 6432
    pool_size: int | None = None


def parse_database(name: str, connstr: str) -> DatabaseEntry:
    """The entry for ``name = connstr``; raises ``ConfigError`` naming the bad key."""
    if name in RESERVED_DATABASES:
        raise ConfigError(
            f"database name {name!r} is reserved for the admin console", key=name
        )
    fields = _typed_fields(
        connstr, DATABASE_KEYS, DATABASE_ALIASES, f"database {name!r}"
    )
    host = fields.get("host") or None
    if "shards" in fields:
        shards = tuple(part.strip() for part in (fields["shards"] or "").split(",") if part.strip())
        if not shards:
            raise ConfigError(f"database {name!r}: shards= lists no [databases] entry", key="shards")
        if len(set(shards)) != len(shards):
            raise ConfigError(f"database {name!r}: a shard is listed twice", key="shards")
        clash = [key for key in ("host", "replicas", "topology_query", "auth_query") if fields.get(key)]
        if clash:
            raise ConfigError(f"database {name!r}: a sharded entry has no {clash[0]}= of its own "
                              "(set it on its shards)", key=clash[0])
        if fields.get("pool_mode") == "statement":
            raise ConfigError(f"database {name!r}: statement pooling is not supported for a sharded "
                              "database", key="pool_mode")
        fields["shards"] = shards
    hosts = _split_hosts(host, name) if host else ()
    ports = _parse_ports(fields.pop("port", "5432"), len(hosts), name)
    fields.setdefault("dbname", None if name == "*" else name)
    fields.update(
        host=host,
        hosts=hosts,
        port=ports[0],
        ports=ports if len(ports) > 1 else (ports[0],) * max(1, len(hosts)),
    )
    return DatabaseEntry(name=name, **fields)


def parse_user(name: str, connstr: str) -> UserEntry:
    """The entry for ``name = settings`` in ``[users]``."""
    return UserEntry(
        name=name, **_typed_fields(connstr, USER_KEYS, {}, f"user {name!r}")
    )


def parse_peer(name: str, connstr: str) -> PeerEntry:
    """The entry for ``peer_id = connstr`` in ``[peers]``."""
    if not name.isdigit() or not 1 <= int(name) <= 16383:
        # A cancel key carries 14 bits of peer id (PgBouncer's layout, as peer_id).
        raise ConfigError("peer id must be a number from 1 to 16383", key=name)
    fields = _typed_fields(connstr, PEER_KEYS, {}, f"peer {name}")
    if not fields.get("host"):
        raise ConfigError(f"peer {name}: host is required", key=name)
    return PeerEntry(peer_id=int(name), **fields)


def parse_connstr(text: str) -> list[tuple[str, str]]:
    """``"host=a port='5 4'"`` -> ``[("host", "a"), ("port", "5 4")]``; keys lowercased."""
    pairs = []
    pos = _skip_space(text, 0)
    while pos < len(text):
        start = pos
        while pos < len(text) and text[pos] != "=" and not text[pos].isspace():
            pos += 1
        key = text[start:pos]
        pos = _skip_space(text, pos)
        if pos >= len(text) or text[pos] != "=":
            raise ConfigError(
                f"missing '=' after {key!r} in connection string", key=key
            )
        if not key:
            raise ConfigError("missing parameter name before '=' in connection string")
        pos = _skip_space(text, pos + 1)
        if pos < len(text) and text[pos] == "'":
            value, pos = _read_quoted(text, pos + 1, key)
        else:
            value, pos = _read_plain(text, pos)
        pairs.append((key.lower(), value))
        pos = _skip_space(text, pos)
    return pairs


def _typed_fields(connstr, spec, aliases, owner) -> dict[str, object]:
    fields: dict[str, object] = {}
    for key, raw in parse_connstr(connstr):
        key = aliases.get(key, key)
        if key not in spec:
            raise ConfigError(
                f"{owner}: unknown parameter in connection string", key=key
            )
        kind, choices, minimum = spec[key]
        try:
            if kind == UNSET_TIME:
                fields[key] = None if raw.strip() == "-1" else parse_value(TIME, raw)
            else:
                fields[key] = parse_value(kind, raw, choices, minimum)
        except ValueError as exc:
            raise ConfigError(f"{owner}: {exc}", key=key) from None
    return fields


def _split_hosts(host: str, name: str | None = None) -> tuple[str, ...]:
    hosts = tuple(part.strip() for part in host.split(","))
    if any(not part for part in hosts):
        raise ConfigError(
            f"database {name!r}: empty name in host list {host!r}", key="host"
        )
    return hosts


def _parse_ports(raw: str, host_count: int, name: str) -> tuple[int, ...]:
    try:
        ports = tuple(parse_value(INT, part, (), 1, 65535) for part in raw.split(","))
    except ValueError as exc:
        raise ConfigError(f"database {name!r}: {exc}", key="port") from None
    if len(ports) > 1 and len(ports) != host_count:
        raise ConfigError(
            f"database {name!r}: {len(ports)} ports given for {host_count} hosts",
            key="port",
        )
    return ports  # type: ignore[return-value]


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _read_quoted(text: str, pos: int, key: str) -> tuple[str, int]:
    out = []
    while pos < len(text):
        char = text[pos]
        if char == "\\" and pos + 1 < len(text):
            out.append(text[pos + 1])
            pos += 2
        elif char == "'" and text[pos + 1 : pos + 2] == "'":
            out.append("'")
            pos += 2
        elif char == "'":
            return "".join(out), pos + 1
        else:
            out.append(char)
            pos += 1
    raise ConfigError("unterminated quoted string in connection string", key=key)


def _read_plain(text: str, pos: int) -> tuple[str, int]:
    out = []
    while pos < len(text) and not text[pos].isspace():
        if text[pos] == "\\" and pos + 1 < len(text):
            pos += 1
        out.append(text[pos])
        pos += 1
    return "".join(out), pos
