"""The Prometheus endpoint: /metrics, /healthz and /readyz on ``metrics_port``.

Metric names and labels are prometheus-community/pgbouncer_exporter's (the
``pgbouncer_stats_*`` names of its releases up to 0.10, read from SHOW STATS), so
its dashboards and alerts work on geobouncer unchanged; geobouncer's own state is
under ``geobouncer_*``. Every value is computed when the endpoint is scraped, from
the very builders the admin console's SHOW POOLS / STATS / DATABASES / LISTS use
(admin/show.py): nothing is counted on the query path for metrics, except one
histogram bucket per routing-hook call (routing/hooks.py).

The HTTP server is gevent's WSGI server inside the pooler process. A slow or
hostile HTTP client holds one greenlet of a small pool, for at most
``metrics_request_timeout`` seconds; it never blocks the hub, so it never delays a query.
"""

from __future__ import annotations

import logging
import math
import socket as pysocket
from time import monotonic

import gevent
from gevent import socket
from gevent.pool import Pool as GreenletPool
from gevent.pywsgi import WSGIHandler, WSGIServer
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from . import __version__
from .admin import show
from .readiness import Readiness
from .routing.hook import DURATION_BOUNDS

log = logging.getLogger("geobouncer")

MAX_HTTP_CONNECTIONS = 32  # concurrent HTTP connections; more wait in the backlog

# SHOW POOLS column -> (pgbouncer_pools_* name, help)
POOL_GAUGES = (
    ("cl_active", "client_active_connections",
     "Client connections linked to server connection and able to process queries"),
    ("cl_active_cancel_req", "client_active_cancel_connections",
     "Client connections that have forwarded query cancellations to the server"),
    ("cl_waiting", "client_waiting_connections", "Client connections waiting on a server connection"),
    ("cl_waiting_cancel_req", "client_waiting_cancel_connections",
     "Client connections that have not forwarded query cancellations to the server yet"),
    ("sv_active", "server_active_connections", "Server connections linked to a client connection"),
    ("sv_active_cancel", "server_active_cancel_connections",
     "Server connections currently forwarding a cancel request"),
    ("sv_being_canceled", "server_being_canceled_connections",
     "Servers waiting for in-flight cancel requests before they can become idle"),
    ("sv_idle", "server_idle_connections", "Server connections idle and ready for a client query"),
    ("sv_used", "server_used_connections",
     "Server connections idle more than server_check_delay, needing server_check_query"),
    ("sv_tested", "server_testing_connections",
     "Server connections running server_reset_query or server_check_query"),
    ("sv_login", "server_login_connections", "Server connections in the process of logging in"),
)

# SHOW STATS column -> (pgbouncer_stats_* name, factor to the metric's unit, help)
STAT_COUNTERS = (
    ("total_query_count", "queries_pooled_total", 1, "Total number of SQL queries pooled"),
    ("total_query_time", "queries_duration_seconds_total", 1e-6,
     "Total number of seconds spent by the pooler when actively connected to PostgreSQL, "
     "executing queries"),
    ("total_received", "received_bytes_total", 1, "Total volume in bytes of network traffic received"),
    ("total_sent", "sent_bytes_total", 1, "Total volume in bytes of network traffic sent"),
    ("total_wait_time", "client_wait_seconds_total", 1e-6,
     "Time spent by clients waiting for a server in seconds"),
    ("total_xact_count", "sql_transactions_pooled_total", 1, "Total number of SQL transactions pooled"),
    ("total_xact_time", "server_in_transaction_seconds_total", 1e-6,
     "Total number of seconds spent connected to PostgreSQL in a transaction"),
    ("total_client_parse_count", "client_parses_total", 1,
     "Total number of prepared statement Parse messages received from clients"),
    ("total_server_parse_count", "server_parses_total", 1,
     "Total number of prepared statement Parse messages sent to PostgreSQL"),
    ("total_bind_count", "binds_total", 1,
     "Total number of prepared statements readied for execution with a Bind message"),
    ("total_server_assignment_count", "server_assignments_total", 1,
     "Total number of times a server connection was assigned to a client"),
)

# SHOW DATABASES column -> (pgbouncer_databases_* name, help); the text columns are labels.
DATABASE_LABELS = ("name", "host", "port", "database", "force_user", "pool_mode")
DATABASE_GAUGES = (
    ("pool_size", "pool_size", "Maximum number of server connections"),
    ("reserve_pool_size", "reserve_pool", "Maximum number of additional connections for this database"),
    ("max_connections", "max_connections", "Maximum number of allowed connections for this database"),
    ("current_connections", "current_connections", "Current number of connections for this database"),
    ("paused", "paused", "1 if this database is currently paused, else 0"),
    ("disabled", "disabled", "1 if this database is currently disabled, else 0"),
)

# SHOW LISTS row -> (pgbouncer_* name, help)
LIST_GAUGES = {
    "databases": ("databases", "Count of databases"),
    "users": ("users", "Count of users"),
    "pools": ("pools", "Count of pools"),
    "free_clients": ("free_clients", "Count of free clients"),
    "used_clients": ("used_clients", "Count of used clients"),
    "login_clients": ("login_clients", "Count of clients in login state"),
    "free_servers": ("free_servers", "Count of free servers"),
    "used_servers": ("used_servers", "Count of used servers"),
    "dns_names": ("cached_dns_names", "Count of DNS names in the cache"),
    "dns_zones": ("cached_dns_zones", "Count of DNS zones in the cache"),
    "dns_queries": ("in_flight_dns_queries", "Count of in-flight DNS queries"),
}


class PoolerCollector:
    """A prometheus_client collector over the live Bouncer (``app``)."""

    def __init__(self, app):
        self.app = app

    def collect(self):
        app = self.app
        yield GaugeMetricFamily("pgbouncer_up", "The pooler answered this scrape", value=1)
        version = GaugeMetricFamily("pgbouncer_version_info", "The pooler version info", labels=["version"])
        version.add_metric([show.show_version(app)[1][0][0]], 1)
        yield version
        yield from _pools(app)
        yield from _stats(app)
        yield from _databases(app)
        yield from _lists(app)
        s = app.settings
        yield GaugeMetricFamily("pgbouncer_config_max_client_connections",
                                "Config maximum number of client connections", value=s.max_client_conn)
        yield GaugeMetricFamily("pgbouncer_config_max_user_connections",
                                "Config maximum number of server connections per user",
                                value=s.max_user_connections)
        yield from _routing(app)
        yield from _switchover(app)
        yield from _replicas(app)
        peers = CounterMetricFamily("geobouncer_peer_cancel_requests_total",
                                    "Cancel requests for another peer's key, by what became of them",
                                    labels=["result"])
        peers.add_metric(["forwarded"], app.peers.forwarded)
        peers.add_metric(["dropped"], app.peers.dropped)
        yield peers


def _by_name(cols, rows):
    names = [name for name, _ in cols]
    return [dict(zip(names, row)) for row in rows]


def _label(value) -> str:
    return "" if value is None else str(value)


def _pools(app):
    rows = _by_name(*show.show_pools(app))
    labels = ["database", "user"]
    for column, name, doc in POOL_GAUGES:
        family = GaugeMetricFamily(f"pgbouncer_pools_{name}", doc, labels=labels)
        for row in rows:
            family.add_metric([row["database"], row["user"]], row[column])
        yield family
    family = GaugeMetricFamily("pgbouncer_pools_client_maxwait_seconds",
                               "Age of oldest unserved client connection, in seconds", labels=labels)
    for row in rows:
        family.add_metric([row["database"], row["user"]], row["maxwait"] + row["maxwait_us"] / 1e6)
    yield family


def _stats(app):
    rows = _by_name(*show.show_stats(app))
    for column, name, factor, doc in STAT_COUNTERS:
        family = CounterMetricFamily(f"pgbouncer_stats_{name}", doc, labels=["database"])
        for row in rows:
            family.add_metric([row["database"]], row[column] * factor)
        yield family


def _databases(app):
    rows = _by_name(*show.show_databases(app))
    for column, name, doc in DATABASE_GAUGES:
        family = GaugeMetricFamily(f"pgbouncer_databases_{name}", doc, labels=list(DATABASE_LABELS))
        for row in rows:
            value = row[column]
            family.add_metric([_label(row[k]) for k in DATABASE_LABELS],
                              math.nan if value is None else value)
        yield family


def _lists(app):
    for list_name, items in show.show_lists(app)[1]:
        if list_name in LIST_GAUGES:
            name, doc = LIST_GAUGES[list_name]
            yield GaugeMetricFamily(f"pgbouncer_{name}", doc, value=items)


def _routing(app):
    hooks = app.hooks.loaded()
    counters = (("calls", "geobouncer_routing_hook_calls_total", "Calls of the hook"),
                ("errors", "geobouncer_routing_hook_errors_total",
                 "Calls that raised or returned something unusable"),
                ("slow_calls", "geobouncer_routing_hook_slow_calls_total",
                 "Calls slower than hook_slow_call_ms"))
    for attr, name, doc in counters:
        family = CounterMetricFamily(name, doc, labels=["hook"])
        for hook in hooks:
            family.add_metric([hook.name], getattr(hook, attr))
        yield family
    family = HistogramMetricFamily("geobouncer_routing_hook_duration_seconds",
                                   "Time spent in routing_rules / rewrite_query calls", labels=["hook"])
    for hook in hooks:
        counts = list(hook.durations)
        buckets, seen = [], 0
        for bound, count in zip((*map(repr, DURATION_BOUNDS), "+Inf"), counts):
            seen += count
            buckets.append((bound, seen))
        family.add_metric([hook.name], buckets, sum_value=hook.total)
    yield family
    routed = CounterMetricFamily("geobouncer_routing_routed_queries_total",
                                 "Queries routing_rules sent to a [databases] entry", labels=["target"])
    for kind, target, count, *_ in app.hooks.stats():
        if kind == "route":
            routed.add_metric([target], count)
    yield routed


def _switchover(app):
    total = CounterMetricFamily("geobouncer_switchovers_total",
                                "Writer switchovers of a database with a topology_query", labels=["database"])
    switching = GaugeMetricFamily("geobouncer_switchover_in_progress",
                                  "1 while clients are held for a new writer", labels=["database"])
    nodes = GaugeMetricFamily("geobouncer_topology_node_info", "Nodes of a clustered database and their role",
                              labels=["database", "node", "host", "port", "role"])
    for name, cluster in app.clusters.items():
        total.add_metric([name], cluster.switchovers)
        switching.add_metric([name], int(cluster.switching))
        for row in cluster.rows():
            nodes.add_metric([row[0], row[1], _label(row[2]), _label(row[3]), _label(row[4])], 1)
    yield from (total, switching, nodes)


def _replicas(app):
    labels = ["database", "replica", "host", "port"]
    up = GaugeMetricFamily("geobouncer_replica_up",
                           "1 if the replica passed its last health check and is not banned", labels=labels)
    rotation = GaugeMetricFamily("geobouncer_replica_in_rotation",
                                 "1 if reads are sent to the replica now", labels=labels)
    lag = GaugeMetricFamily("geobouncer_replica_lag_bytes",
                            "Replay lag behind the primary's WAL, in bytes (NaN if unknown)", labels=labels)
    failures = CounterMetricFamily("geobouncer_replica_failures_total", "Times the replica was banned",
                                   labels=labels)
    now = monotonic()
    for name, replicas in app.replica_sets.items():
        in_rotation = set(map(id, replicas.available(now)))
        for r in replicas.replicas:
            values = [name, r.key, _label(r.host), _label(r.port)]
            up.add_metric(values, int(r.checked and r.banned_until <= now))
            rotation.add_metric(values, int(id(r) in in_rotation))
            lag.add_metric(values, math.nan if r.lag is None else r.lag)
            failures.add_metric(values, r.failures)
    yield from (up, rotation, lag, failures)


class _QuietHandler(WSGIHandler):
    """Hostile HTTP input is the client's problem: a 400 and a debug line, never
    gevent's traceback on stderr; the request timeout ends the connection wherever
    it fires (gevent would report it as an internal error and try a 500)."""

    def _handle_client_error(self, ex):
        log.debug("metrics: bad HTTP request from %s: %s", self.client_address, ex)
        if not isinstance(ex, ValueError):      # gevent prints a traceback for anything else
            ex = ValueError(str(ex) or type(ex).__name__)
        return super()._handle_client_error(ex)

    def handle_error(self, t, v, tb):
        if isinstance(v, gevent.Timeout):
            raise v
        log.error("metrics: HTTP request from %s failed: %s", self.client_address,
                  f"{t.__name__}: {v}")
        self._send_error_response_if_possible(500)


class _BoundedServer(WSGIServer):
    """Each HTTP connection gets ``request_timeout`` seconds, whatever the client does."""

    request_timeout = 10.0

    def handle(self, sock, address):
        with gevent.Timeout(self.request_timeout, False):
            super().handle(sock, address)


class MetricsServer:
    """The HTTP endpoint, started by the Bouncer when ``metrics_port`` is set."""

    def __init__(self, app):
        self.app = app
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PoolerCollector(app))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.readiness = Readiness(app)
        self._metrics_app = make_wsgi_app(self.registry)
        self.servers: list[WSGIServer] = []

    def start(self) -> None:
        s = self.app.settings
        addrs = _addresses(s.metrics_listen_addr or s.listen_addr or "127.0.0.1")
        pool = GreenletPool(MAX_HTTP_CONNECTIONS)
        for addr in addrs:
            family = pysocket.AF_INET6 if ":" in addr else pysocket.AF_INET
            sock = socket.socket(family, pysocket.SOCK_STREAM)
            sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_REUSEADDR, 1)
            if family == pysocket.AF_INET6:
                sock.setsockopt(pysocket.IPPROTO_IPV6, pysocket.IPV6_V6ONLY, 1)
            sock.bind((addr, s.metrics_port))
            sock.listen(64)
            server = _BoundedServer(sock, self.wsgi, spawn=pool, log=None, error_log=None,
                                    handler_class=_QuietHandler,
                                    environ={"SERVER_NAME": addr, "SERVER_PORT": str(s.metrics_port)})
            server.request_timeout = s.metrics_request_timeout
            server.start()
            self.servers.append(server)
            log.info("metrics on http://%s:%d/metrics", addr, s.metrics_port)

    def stop(self) -> None:
        for server in self.servers:
            server.close()
        self.servers.clear()

    def wsgi(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            try:
                return self._metrics_app(environ, start_response)
            except Exception:  # noqa: BLE001 - a scrape must never take the pooler down
                log.exception("metrics scrape failed")
                return _reply(start_response, "500 Internal Server Error", "scrape failed\n")
        if path == "/metrics/all":       # every worker's, combined (metrics_all.py)
            try:
                from prometheus_client import generate_latest

                from .metrics_all import combined
                text = combined(generate_latest(self.registry).decode(), environ.get("SERVER_NAME", ""),
                                self.app.settings.metrics_port)
            except Exception:  # noqa: BLE001 - a scrape must never take the pooler down
                log.exception("metrics scrape failed")
                return _reply(start_response, "500 Internal Server Error", "scrape failed\n")
            return _reply(start_response, "200 OK", text, "text/plain; version=0.0.4; charset=utf-8")
        if path == "/healthz":
            return _reply(start_response, "200 OK", f"ok geobouncer {__version__}\n")
        if path == "/readyz":
            ready, why = self.readiness.check()
            return _reply(start_response, "200 OK" if ready else "503 Service Unavailable", why + "\n")
        return _reply(start_response, "404 Not Found", "try /metrics, /metrics/all, /healthz or /readyz\n")


def _addresses(value: str) -> list[str]:
    """``"a, b"`` / ``"*"`` -> the addresses to bind, as listen_addr is read."""
    out: list[str] = []
    for addr in str(value).replace(" ", ",").split(","):
        addr = addr.strip()
        if addr == "*":
            out.extend(["0.0.0.0", "::"] if pysocket.has_ipv6 else ["0.0.0.0"])
        elif addr:
            out.append(addr)
    return out


def _reply(start_response, status: str, text: str, content_type: str = "text/plain; charset=utf-8"):
    body = text.encode()
    start_response(status, [("Content-Type", content_type),
                            ("Content-Length", str(len(body)))])
    return [body]
