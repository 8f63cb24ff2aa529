"""geobouncer's own ``[pgbouncer]`` keys, unknown to PgBouncer: the pgbouncer-rr
hooks, pgbouncer-fast-switchover failover, replicas and health checks, metrics,
workers, shutdown and sharding.

They are rows of the one settings table: config/settings.py appends them after
PgBouncer's keys, so conf/geobouncer.ini lists them last.  Every row here has
``extension=True``.
"""

from __future__ import annotations

from .setting import GEOBOUNCER
from .setting import block as _block
from .setting import row as _s
from .values import BOOL, INT, LIST, OPT_STR, STR, TIME

NOT_ENABLED = "not_enabled"  # pgbouncer-rr's spelling of "no hook module"

# fmt: off
EXTENSION_SETTINGS = (
    *_block(
        GEOBOUNCER,
        _s("routing_rules_py_module_file", STR, NOT_ENABLED, "Python file defining "
           "routing_rules(username, query), which returns the [databases] entry that "
           "serves a query, or None for the client's own (pgbouncer-rr).",
           extension=True),
        _s("rewrite_query_py_module_file", STR, NOT_ENABLED, "Python file defining "
           "rewrite_query(username, query), which returns the query text to send "
           "(pgbouncer-rr).", extension=True),
        _s("rewrite_query_disconnect_on_failure", BOOL, False, "When rewrite_query "
           "fails, disconnect the client instead of sending the original query.",
           extension=True),
        _s("polling_frequency", TIME, 0.1, "During a switchover, seconds between polls "
           "of pg_is_in_recovery() on the cluster's nodes.", extension=True),
        _s("server_failed_delay", TIME, 30.0, "Seconds between reconnection attempts to "
           "a node that went down, so it is not stormed.", extension=True),
        _s("recreate_disconnected_pools", BOOL, True, "After a switchover, recreate the "
           "pools of the lost writer on the new one.", extension=True),
    ),
    *_block(
        GEOBOUNCER,
        _s("hook_slow_call_ms", TIME, 10.0, "Milliseconds (not seconds; fractions "
           "allowed): a routing_rules or rewrite_query call that takes longer is counted "
           "as slow in SHOW ROUTING and logged, at most once per 10 seconds per hook. "
           "0 disables.", extension=True),
        _s("switchover_timeout", TIME, 0.0, "Longest a client waits for a new writer "
           "during a switchover before it gets an error; 0 uses query_wait_timeout.",
           extension=True),
        _s("health_check_period", TIME, 5.0, "Seconds between health checks of each "
           "host of a database that lists replicas.", extension=True),
        _s("health_check_timeout", TIME, 2.0, "Seconds a health check may take before "
           "the host counts as down.", extension=True),
        _s("replica_ban_time", TIME, 30.0, "Seconds a replica that failed stays out of "
           "rotation before it is checked again.", extension=True),
        _s("write_functions", LIST, (), "Functions (besides the built-in list: nextval, "
           "setval, advisory locks ...) whose call makes a SELECT a write for the "
           "read/write split.", extension=True),
        _s("metrics_port", INT, 0, "Port of the HTTP endpoint serving Prometheus metrics "
           "on /metrics (pgbouncer_exporter's names and labels, plus geobouncer_*), "
           "/healthz and /readyz. 0 turns it off.", reload=False, min=0, max=65535,
           extension=True),
        _s("metrics_listen_addr", OPT_STR, None, "Comma-separated addresses (or *) the "
           "metrics endpoint listens on; unset uses listen_addr, or 127.0.0.1 when that "
           "is unset too.", reload=False, example="*", extension=True),
        _s("metrics_request_timeout", TIME, 10.0, "Seconds one HTTP connection to the "
           "metrics endpoint may take, reading the request and writing the answer; a "
           "slower client is disconnected.", reload=False, min=0.1, extension=True),
        _s("workers", INT, 1, "Serving processes to run. Above 1, a supervisor starts "
           "them on the same listening sockets, makes them peers of one another for "
           "cancel requests, splits the connection limits between them, passes signals "
           "on and restarts one that exits.", reload=False, min=1, max=256,
           extension=True),
        _s("shutdown_timeout", TIME, 0.0, "Longest a graceful shutdown (SIGTERM or SHUTDOWN "
           "WAIT_FOR_CLIENTS, SIGINT or SHUTDOWN WAIT_FOR_SERVERS) waits; then the "
           "remaining clients get an error and the process exits (set it below a "
           "Kubernetes terminationGracePeriodSeconds). 0 waits as long as it takes, as "
           "PgBouncer does.", extension=True),
        _s("two_phase_commit", BOOL, False, "Sharding: a transaction that touches several "
           "shards commits on all of them with PREPARE TRANSACTION and COMMIT PREPARED "
           "(the shards need max_prepared_transactions > 0); prepared transactions left by "
           "a crash are finished from the shards' own state. Off: such a transaction is "
           "refused at its second shard.", extension=True),
    ),
)
# fmt: on
