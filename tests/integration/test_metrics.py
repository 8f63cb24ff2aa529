"""The Prometheus endpoint (metrics_port): /metrics, /healthz, /readyz, against real PostgreSQL.

Names and labels are prometheus-community/pgbouncer_exporter's, so the values
are checked by name after traffic the test makes, and against SHOW STATS / SHOW
POOLS read at the same quiet moment. geobouncer's own series (routing hook
histogram, replicas) are checked the same way. A hostile HTTP client (many
half-sent requests) must not delay queries, and is cut off after the request
timeout.

geobouncer only: PgBouncer has no built-in metrics endpoint.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from fixtures.pooler import TARGET
from fixtures.ports import free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.skipif(TARGET != "geobouncer", reason="PgBouncer has no metrics endpoint")


# -- helpers ------------------------------------------------------------------------------

def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> dict:
    """{(sample name, frozenset(labels)): value}, plus {family name: type} under key 'types'."""
    status, text = http_get(port, "/metrics")
    assert status == 200, text
    samples, types = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    samples["types"] = types
    return samples


def value(samples: dict, name: str, /, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def label_sets(samples: dict, name: str) -> list[dict]:
    return [dict(k[1]) for k in samples if k != "types" and k[0] == name]


def metrics_bouncer(bouncer, **settings):
    port = free_port()
    conf = {"pool_mode": "transaction", "auth_type": "md5", "metrics_port": port,
            "metrics_listen_addr": "127.0.0.1", **settings}
    b = bouncer(pgbouncer=conf)
    wait_until(lambda: http_get(port, "/healthz")[0] == 200, timeout=10, message="metrics endpoint up")
    return b, port


# -- /metrics ------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_stats_counters_grow_with_queries_and_match_show_stats(bouncer):
    b, port = metrics_bouncer(bouncer)
    conn = b.connect("app", "app", autocommit=True)
    try:
        conn.cursor().execute("SELECT 1")           # the pool exists from here on
        before = scrape(port)
        n = 25
        with conn.cursor() as cur:
            for i in range(n):
                cur.execute("SELECT %s", (i,))
                assert cur.fetchone() == (i,)
        q0 = value(before, "pgbouncer_stats_queries_pooled_total", database="app")
        wait_until(lambda: value(scrape(port), "pgbouncer_stats_queries_pooled_total", database="app")
                   >= q0 + n, timeout=10, message="queries counted")
        after = scrape(port)
    finally:
        conn.close()
    assert value(after, "pgbouncer_stats_queries_pooled_total", database="app") == q0 + n
    assert (value(after, "pgbouncer_stats_sql_transactions_pooled_total", database="app")
            == value(before, "pgbouncer_stats_sql_transactions_pooled_total", database="app") + n)
    for name in ("pgbouncer_stats_received_bytes_total", "pgbouncer_stats_sent_bytes_total",
                 "pgbouncer_stats_queries_duration_seconds_total"):
        assert value(after, name, database="app") > value(before, name, database="app"), name
    assert after["types"]["pgbouncer_stats_queries_pooled"] == "counter"
    assert after["types"]["pgbouncer_pools_client_active_connections"] == "gauge"

    # the same numbers SHOW STATS gives, with the exporter's unit conversions
    wait_until(lambda: value(scrape(port), "pgbouncer_pools_server_active_connections",
                             database="app", user="app") == 0, timeout=10, message="client gone")
    samples = scrape(port)
    row = next(r for r in b.admin("SHOW STATS") if r.database == "app")
    assert value(samples, "pgbouncer_stats_queries_pooled_total", database="app") == row.total_query_count
    assert value(samples, "pgbouncer_stats_received_bytes_total", database="app") == row.total_received
    assert value(samples, "pgbouncer_stats_sent_bytes_total", database="app") == row.total_sent
    assert value(samples, "pgbouncer_stats_queries_duration_seconds_total", database="app") == \
        pytest.approx(row.total_query_time / 1e6)
    assert value(samples, "pgbouncer_config_max_client_connections") == 100
    assert value(samples, "pgbouncer_up") == 1
    assert label_sets(samples, "pgbouncer_version_info")[0]["version"].startswith("geobouncer")


@pytest.mark.timeout(60)
def test_waiting_clients_shown_while_the_pool_is_exhausted(bouncer):
    b, port = metrics_bouncer(bouncer, default_pool_size=1, query_wait_timeout=30)
    holder = b.connect("app", "app")
    holder.cursor().execute("SELECT 1")            # BEGIN ...: holds the only server
    done = threading.Event()

    def waiter():
        conn = b.connect("app", "app", autocommit=True)
        try:
            conn.cursor().execute("SELECT 2")
        finally:
            conn.close()
            done.set()

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    try:
        wait_until(lambda: value(scrape(port), "pgbouncer_pools_client_waiting_connections",
                                 database="app", user="app") == 1, timeout=10, message="a client waits")
        samples = scrape(port)
        assert value(samples, "pgbouncer_pools_server_active_connections", database="app", user="app") == 1
        assert value(samples, "pgbouncer_pools_server_idle_connections", database="app", user="app") == 0
        time.sleep(0.2)   # let the waiter age measurably
        assert value(scrape(port), "pgbouncer_pools_client_maxwait_seconds", database="app", user="app") > 0
        row = next(r for r in b.admin("SHOW POOLS") if r.database == "app")
        assert row.cl_waiting == 1 and row.sv_active == 1
    finally:
        holder.commit()
        holder.close()
    assert done.wait(10)
    wait_until(lambda: value(scrape(port), "pgbouncer_pools_server_idle_connections",
                             database="app", user="app") == 1, timeout=10, message="server back idle")
    samples = scrape(port)
    assert value(samples, "pgbouncer_pools_client_waiting_connections", database="app", user="app") == 0
    assert value(samples, "pgbouncer_pools_client_maxwait_seconds", database="app", user="app") == 0
    assert {"database", "user"} == set(label_sets(samples, "pgbouncer_pools_server_idle_connections")[0])


@pytest.mark.timeout(60)
def test_databases_and_lists(bouncer):
    b, port = metrics_bouncer(bouncer, default_pool_size=7)
    conn = b.connect("app", "app", autocommit=True)
    try:
        conn.cursor().execute("SELECT 1")
        samples = scrape(port)
    finally:
        conn.close()
    apps = [ls for ls in label_sets(samples, "pgbouncer_databases_pool_size") if ls["name"] == "app"]
    assert len(apps) == 1
    assert set(apps[0]) == {"name", "host", "port", "database", "force_user", "pool_mode"}
    assert value(samples, "pgbouncer_databases_pool_size", **apps[0]) == 7
    assert value(samples, "pgbouncer_databases_current_connections", **apps[0]) == 1
    assert value(samples, "pgbouncer_databases_paused", **apps[0]) == 0
    lists = {r.list: r.items for r in b.admin("SHOW LISTS")}
    assert value(samples, "pgbouncer_pools") == lists["pools"]
    assert value(samples, "pgbouncer_databases") == lists["databases"]
    assert value(samples, "pgbouncer_used_servers") == lists["used_servers"] == 1


ROUTER = """
def routing_rules(username, query):
    return "other" if "route-me" in query else None
"""


@pytest.mark.timeout(60)
def test_routing_hook_counters_and_call_time_histogram(pg, bouncer, tmp_path):
    router = tmp_path / "router.py"
    router.write_text(ROUTER)
    port = free_port()
    b = bouncer(databases={"app": pg.conninfo("app"), "other": pg.conninfo("app")},
                pgbouncer={"pool_mode": "transaction", "metrics_port": port,
                           "routing_rules_py_module_file": str(router)})
    conn = b.connect("app", "app", autocommit=True)
    try:
        with conn.cursor() as cur:
            for _ in range(5):
                cur.execute("SELECT 'route-me'")
            for _ in range(3):
                cur.execute("SELECT 'stay'")
    finally:
        conn.close()
    samples = scrape(port)
    calls = value(samples, "geobouncer_routing_hook_calls_total", hook="routing_rules")
    assert calls >= 8
    assert value(samples, "geobouncer_routing_hook_duration_seconds_count", hook="routing_rules") == calls
    assert value(samples, "geobouncer_routing_hook_duration_seconds_bucket", hook="routing_rules",
                 le="+Inf") == calls
    assert value(samples, "geobouncer_routing_hook_duration_seconds_sum", hook="routing_rules") > 0
    assert value(samples, "geobouncer_routing_routed_queries_total", target="other") == 5
    assert samples["types"]["geobouncer_routing_hook_duration_seconds"] == "histogram"
    row = next(r for r in b.admin("SHOW ROUTING") if r.kind == "routing_rules")
    assert row.calls == calls


@pytest.mark.timeout(90)
def test_replica_up_and_lag(pg, pg_replica, bouncer):
    port = free_port()
    entry = (f"host=127.0.0.1 port={pg.port} dbname=app read_write_split=1 "
             f"replicas=127.0.0.1:{pg_replica.port}")
    b = bouncer(databases={"app": entry},
                pgbouncer={"pool_mode": "transaction", "metrics_port": port, "health_check_period": 0.5})
    conn = b.connect("app", "app", autocommit=True)   # health checks log in with a client's credentials
    try:
        conn.cursor().execute("SELECT 1")
        labels = {"database": "app", "replica": f"app@127.0.0.1:{pg_replica.port}",
                  "host": "127.0.0.1", "port": str(pg_replica.port)}
        wait_until(lambda: value(scrape(port), "geobouncer_replica_up", **labels) == 1, timeout=20,
                   message="replica checked")
        samples = scrape(port)
        assert value(samples, "geobouncer_replica_in_rotation", **labels) == 1
        assert value(samples, "geobouncer_replica_lag_bytes", **labels) >= 0
        assert value(samples, "geobouncer_replica_failures_total", **labels) == 0
    finally:
        conn.close()


# -- /healthz, /readyz ---------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_readyz_follows_the_only_server(pg, bouncer):
    b, port = metrics_bouncer(bouncer)
    assert http_get(port, "/readyz")[0] == 200       # no client yet: the server answers a connect
    conn = b.connect("app", "app", autocommit=True)
    conn.cursor().execute("SELECT 1")
    conn.close()
    pg.stop()
    try:
        wait_until(lambda: http_get(port, "/readyz")[0] == 503, timeout=15, message="not ready")
        assert http_get(port, "/healthz")[0] == 200   # the process itself is fine
    finally:
        pg.start()
    wait_until(lambda: http_get(port, "/readyz")[0] == 200, timeout=15, message="ready again")
    assert http_get(port, "/nope")[0] == 404


@pytest.mark.timeout(90)
def test_readyz_503_while_shutting_down(bouncer):
    b, port = metrics_bouncer(bouncer)
    conn = b.connect("app", "app", autocommit=True)
    try:
        conn.cursor().execute("SELECT 1")
        assert http_get(port, "/readyz")[0] == 200
        b.admin("SHUTDOWN WAIT_FOR_CLIENTS")
        wait_until(lambda: http_get(port, "/readyz")[0] == 503, timeout=10, message="draining")
        conn.cursor().execute("SELECT 2")        # the connected client is still served
    finally:
        conn.close()
    b.exit_expected = True
    b.wait_exit()


# -- hostile HTTP clients ------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_stuck_http_clients_do_not_block_the_pooler(bouncer):
    b, port = metrics_bouncer(bouncer, metrics_request_timeout=3)
    stuck = []
    for _ in range(40):                          # more than the endpoint serves at once
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /metr")                  # and never the rest
        stuck.append(s)
    try:
        conn = b.connect("app", "app", autocommit=True)
        try:
            with conn.cursor() as cur:
                for i in range(50):
                    cur.execute("SELECT %s", (i,))
                    assert cur.fetchone() == (i,)
        finally:
            conn.close()
        # the endpoint cuts them off after metrics_request_timeout and serves again
        stuck[0].settimeout(30)
        assert stuck[0].recv(100) == b""
        wait_until(lambda: http_get(port, "/healthz", timeout=2)[0] == 200, timeout=20,
                   message="endpoint serves again")
    finally:
        for s in stuck:
            s.close()
    assert "Traceback" not in b.log_text()


@pytest.mark.timeout(60)
def test_metrics_off_by_default(bouncer):
    b = bouncer(pgbouncer={"pool_mode": "transaction"})
    conn = b.connect("app", "app", autocommit=True)
    conn.close()
    assert "metrics on" not in b.log_text()
    rows = {r.key: r.value for r in b.admin("SHOW CONFIG")}
    assert rows["metrics_port"] == "0"
