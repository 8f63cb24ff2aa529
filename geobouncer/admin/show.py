"""SHOW commands of the admin console: each builder returns (columns, rows).

Columns follow PgBouncer 1.25's names and order.
"""

from __future__ import annotations

import time
from time import monotonic

from .. import __version__
from ..net.tls import describe as tls_describe

T, I8, I4 = 25, 20, 23


def _cols(spec: str) -> list[tuple[str, int]]:
    """'name:t count:i' -> [(name, oid)]; t = text, i = bigint."""
    out = []
    for item in spec.split():
        name, kind = item.split(":")
        out.append((name, T if kind == "t" else I8))
    return out


def _wall(app, mono: float) -> str:
    """A monotonic instant as a wall-clock timestamp, as PgBouncer prints them."""
    stamp = time.time() - (monotonic() - mono)
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))


def server_state(app, server, now: float) -> str:
    """A server's state as PgBouncer lists it: active, idle, used or tested."""
    if server in server.pool.active:
        if server.client is None and server.internal is not None:
            return "tested"              # running server_reset_query / server_check_query
        return "active"
    settings = app.settings
    if settings.server_check_query and now - server.idle_since > settings.server_check_delay:
        return "used"                    # to be checked with server_check_query before reuse
    return "idle"


def show_pools(app):
    cols = _cols("database:t user:t cl_active:i cl_waiting:i cl_active_cancel_req:i "
                 "cl_waiting_cancel_req:i sv_active:i sv_active_cancel:i sv_being_canceled:i "
                 "sv_idle:i sv_used:i sv_tested:i sv_login:i maxwait:i maxwait_us:i pool_mode:t "
                 "load_balance_hosts:t")
    rows = []
    now = monotonic()
    for pool in list(app.pools.values()):
        waiting = [c for c in pool.clients if c.state == "waiting"]
        active = len(pool.clients) - len(waiting)
        maxwait = max((now - c.wait_started for c in waiting), default=0.0)
        servers = list(pool.active) + list(pool.idle)
        states = [server_state(app, s, now) for s in servers]
        cancels = sum(1 for s in servers if s.cancelling)
        rows.append([pool.db.name, pool.user, active, len(waiting), cancels, 0,
                     states.count("active"), cancels, 0, states.count("idle"), states.count("used"),
                     states.count("tested"), pool.connecting, int(maxwait), int((maxwait % 1) * 1e6),
                     pool.mode, _load_balance(pool.db)])
    rows.append(["pgbouncer", "pgbouncer", sum(1 for c in app.clients if c.admin), 0, 0, 0, 0, 0, 0,
                 0, 0, 0, 0, 0, 0, "statement", None])
    return cols, rows


def _load_balance(db):
    """PgBouncer shows load_balance_hosts only for a database with several hosts."""
    if db.hosts and len(db.hosts) > 1:
        return db.load_balance_hosts or "round-robin"
    return None


CONN_COLS = ("type:t user:t database:t replication:t state:t addr:t port:i local_addr:t local_port:i "
             "connect_time:t request_time:t wait:i wait_us:i close_needed:i ptr:t link:t remote_pid:i "
             "tls:t application_name:t prepared_statements:i id:i")


def client_row(app, c, state: str, now: float) -> list:
    wait = now - c.wait_started if c.state == "waiting" else 0.0
    local = _sockname(c.sock)
    if c.unix:
        local = ("unix", app.settings.listen_port)
    # PgBouncer prints an active client with no server linked as idle.
    # (A client in a BEGIN answered here, net/defer_begin.py, is in a transaction: active.)
    if state == "active" and c.server is None and c.deferred_begin is None:
        state = "idle"
    return ["C", c.user or "(nouser)", c.dbname or "(nodb)", "none", state, c.addr[0],
            c.addr[1] if not c.unix else app.settings.listen_port, local[0], local[1],
            _wall(app, c.connect_time), _wall(app, c.request_time), int(wait), int((wait % 1) * 1e6), 0,
            repr(c), repr(c.server) if c.server else "", _peer_pid(c.sock) if c.unix else 0,
            tls_describe(c.sock), c.tparams.get("application_name") or c.startup.get("application_name", ""),
            len(c.statements), c.id]


def server_row(app, s, state: str) -> list:
    client = s.client
    app_name = client.tparams.get("application_name", "") if client is not None else ""
    if state == "active" and client is None:
        state = "idle"
    return ["S", s.pool.user, s.pool.db.name, "none", state, s.host, s.port,
            s.local_addr[0] if s.local_addr else None,
            s.local_addr[1] if s.local_addr and len(s.local_addr) > 1 else 0,
            _wall(app, s.created_at), _wall(app, s.linked_at or s.created_at), 0, 0,
            int(s.stale), repr(s), repr(client) if client else "", s.pid, tls_describe(s.sock), app_name,
            len(s.tracker.prepared) if s.tracker is not None else 0, s.id]


def show_clients(app):
    now = monotonic()
    rows = [client_row(app, c, c.state, now) for c in list(app.clients) if c.state != "login"]
    return _cols(CONN_COLS), rows


def show_servers(app):
    now = monotonic()
    rows = [server_row(app, s, server_state(app, s, now))
            for pool in list(app.pools.values()) for s in list(pool.active) + list(pool.idle)]
    return _cols(CONN_COLS), rows


def _peer_pid(sock) -> int:
    import socket as pysocket
    import struct

    try:
        raw = sock.getsockopt(pysocket.SOL_SOCKET, getattr(pysocket, "SO_PEERCRED", 17),
                              struct.calcsize("3i"))
        return struct.unpack("3i", raw)[0]
    except (OSError, AttributeError):
        return 0


def show_databases(app):
    cols = _cols("name:t host:t port:i database:t force_user:t pool_size:i min_pool_size:i "
                 "reserve_pool_size:i server_lifetime:i pool_mode:t load_balance_hosts:t "
                 "max_connections:i current_connections:i max_client_connections:i "
                 "current_client_connections:i paused:i disabled:i")
    s = app.settings
    rows = []
    for name, db in app.cfg.databases.items():
        rows.append([name, db.host, db.port, db.dbname or name, db.user,
                     db.pool_size if db.pool_size is not None else s.default_pool_size,
                     db.min_pool_size if db.min_pool_size is not None else s.min_pool_size,
                     db.reserve_pool_size if db.reserve_pool_size is not None else s.reserve_pool_size,
                     int(db.server_lifetime or s.server_lifetime), db.pool_mode, _load_balance(db),
                     db.max_db_connections or s.max_db_connections,
                     app.counters.per_db.get(name, 0),
                     db.max_db_client_connections or s.max_db_client_connections,
                     app.client_count_for_db(name),
                     int(name in app.paused_dbs),
                     int(name in app.disabled)])
    rows.append(["pgbouncer", None, s.listen_port, "pgbouncer", "pgbouncer", 2, 0, 0, 0, "statement",
                 None, 0, 0, 0, 0, 0, 0])
    return cols, rows


_STAT_KEYS = ("xact_count", "query_count", "bytes_received", "bytes_sent", "xact_time",
              "query_time", "wait_time", "client_parse_count", "server_parse_count", "bind_count")


def show_stats(app):
    cols = _cols("database:t total_server_assignment_count:i total_xact_count:i total_query_count:i "
                 "total_received:i total_sent:i total_xact_time:i total_query_time:i total_wait_time:i "
                 "total_client_parse_count:i total_server_parse_count:i total_bind_count:i "
                 "avg_server_assignment_count:i avg_xact_count:i avg_query_count:i avg_recv:i "
                 "avg_sent:i avg_xact_time:i avg_query_time:i avg_wait_time:i "
                 "avg_client_parse_count:i avg_server_parse_count:i avg_bind_count:i")
    rows = []
    for db, tot in app.stats.totals_by_db().items():
        avg = app.stats.averages.get(db, {})
        rows.append([db, tot["server_assignment_count"]] + [tot[k] for k in _STAT_KEYS]
                    + [int(avg.get("server_assignment_count", 0))] + [int(avg.get(k, 0)) for k in _STAT_KEYS])
    return cols, rows


def user_names(app) -> set[str]:
    """PgBouncer's user list: auth_file users, [users] entries, pool users and the
    console's own ``pgbouncer``."""
    return set(app.auth_file) | set(app.cfg.users) | {p.user for p in app.pools.values()} | {"pgbouncer"}


def show_users(app):
    cols = _cols("name:t pool_size:i reserve_pool_size:i pool_mode:t max_user_connections:i "
                 "current_connections:i max_user_client_connections:i current_client_connections:i")
    names = user_names(app)
    rows = []
    for name in sorted(names):
        u = app.cfg.users.get(name)
        rows.append([name, u.pool_size if u else None, u.reserve_pool_size if u else None,
                     u.pool_mode if u else None, (u.max_user_connections if u else None) or 0,
                     app.counters.per_user.get(name, 0),
                     (u.max_user_client_connections if u else None) or 0,
                     app.client_count_for_user(name)])
    return cols, rows


def show_config(app):
    from ..config import SETTINGS

    cols = _cols("key:t value:t default:t changeable:t")
    rows = []
    for setting in SETTINGS:
        value = app.settings.get(setting.name)
        rows.append([setting.name, _fmt(value), _fmt(setting.default), "yes" if setting.reloadable else "no"])
    return cols, rows


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (tuple, list)):
        return ",".join(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def show_lists(app):
    cols = _cols("list:t items:i")
    pools = app.pools.values()
    servers = sum(p.server_count() for p in pools)
    # the admin console's own database and pool count, as in PgBouncer
    rows = [["databases", len(app.cfg.databases) + 1], ["users", len(user_names(app))],
            ["peers", len(app.cfg.peers)], ["pools", len(app.pools) + 1],
            ["peer_pools", len(app.cfg.peers)],
            ["free_clients", 0], ["used_clients", len(app.clients)], ["login_clients",
             sum(1 for c in app.clients if c.state == "login")],
            ["free_servers", 0], ["used_servers", servers], ["dns_names", 0], ["dns_zones", 0],
            ["dns_queries", 0], ["dns_pending", 0]]
    return cols, rows


def show_version(app):
    return _cols("version:t"), [[f"geobouncer {__version__} (PgBouncer 1.25 compatible)"]]


def show_state(app):
    suspended = app.suspended
    paused = app.paused and not suspended
    return _cols("key:t value:t"), [["active", "yes" if not (paused or suspended) else "no"],
                                    ["paused", "yes" if paused else "no"],
                                    ["suspended", "yes" if suspended else "no"]]


HELP_TEXT = """Console usage
	SHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION
	SHOW PEERS|PEER_POOLS
	SHOW FDS|SOCKETS|ACTIVE_SOCKETS|LISTS|MEM|STATE
	SHOW DNS_HOSTS|DNS_ZONES
	SHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS
	SHOW ROUTING|TOPOLOGY|REPLICAS|SHARDS
	SHOW WORKERS|WORKER_POOLS|WORKER_STATS|WORKER_CLIENTS|WORKER_SERVERS
	SET key = arg
	RELOAD
	PAUSE [<db>]
	RESUME [<db>]
	DISABLE <db>
	ENABLE <db>
	RECONNECT [<db>]
	KILL [<db>]
	KILL_CLIENT <client_id>
	SUSPEND
	SHUTDOWN
	SHUTDOWN WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS
	WAIT_CLOSE [<db>]"""


def show_routing(app):
    """geobouncer's own: routing/rewrite hook calls, errors, slow calls, routes per target."""
    from ..routing import STATS_COLUMNS

    cols = [(name, T if name in ("kind", "name", "last_error") else I8) for name in STATS_COLUMNS]
    return cols, [list(row) for row in app.hooks.stats()]


def _sockname(sock):
    try:
        name = sock.getsockname()
        return (name[0], name[1]) if isinstance(name, tuple) else ("unix", 0)
    except OSError:
        return (None, 0)


def show_topology(app):
    """geobouncer's own: the nodes of each clustered database (topology_query)."""
    cols = _cols("database:t node:t host:t port:i role:t switching:i switchovers:i")
    return cols, [row for cluster in app.clusters.values() for row in cluster.rows()]


def show_replicas(app):
    """geobouncer's own: replicas, bans, lag (bytes) and the balancing policy."""
    cols = _cols("database:t replica:t host:t port:i banned:i in_rotation:i lag_bytes:i "
                 "failures:i load_balance:t")
    return cols, [row for replicas in app.replica_sets.values() for row in replicas.rows()]


def show_shards(app):
    """geobouncer's own: every shard of each sharded database, its entry, host,
    state (servers up or not) and the database's sharding counters."""
    cols = _cols("database:t shard:i entry:t host:t port:i dbname:t state:t sv_active:i sv_idle:i "
                 "queries:i single_shard:i multi_shard:i two_phase_commits:i two_phase_recovered:i")
    rows = []
    for name, sdb in app.cfg.sharded.items():
        counters = app.shard_stats.get(name)
        totals = [getattr(counters, f, 0) if counters is not None else 0
                  for f in ("queries", "single_shard", "multi_shard", "two_phase_commits",
                            "two_phase_recovered")]
        for shard, entry_name in enumerate(sdb.shards):
            entry = app.database_for(entry_name)
            pools = [p for (db, _), p in app.pools.items() if db == entry_name]
            active = sum(len(p.active) for p in pools)
            idle = sum(len(p.idle) for p in pools)
            failing = any(p.last_login_error and not (p.active or p.idle) for p in pools)
            state = "disabled" if entry_name in app.disabled else "failing" if failing else "up"
            rows.append([name, shard, entry_name, entry.host if entry else None,
                         entry.port if entry else None, entry.dbname if entry else None,
                         state, active, idle, *totals])
    return cols, rows


BUILDERS = {
    "topology": show_topology, "replicas": show_replicas, "shards": show_shards,
    "pools": show_pools, "clients": show_clients, "servers": show_servers,
    "databases": show_databases, "stats": show_stats, "users": show_users,
    "config": show_config, "lists": show_lists, "version": show_version, "state": show_state,
    "routing": show_routing,
}

