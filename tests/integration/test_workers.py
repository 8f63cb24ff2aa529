"""``workers = N``: a supervisor and N serving processes on shared sockets, against real PostgreSQL.

- clients through the one port land on both workers; each worker's cancel keys
  carry its index as peer id and a cancel reaching the wrong worker is forwarded;
- the connection limits are split between the workers (SHOW CONFIG of a worker);
- SIGHUP to the supervisor reloads every worker; SIGTERM stops them all, then the
  supervisor, which removes its pidfile;
- a worker that dies is started again;
- a rolling restart (SIGTERM to each worker in turn, each replaced before the
  next) under pgbench, connecting anew for every transaction: 0 failed
  transactions, no refused connection.

geobouncer only (PgBouncer has no workers setting).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import psycopg2
import psycopg2.errors
import pytest
from fixtures.pooler import TARGET
from fixtures.ports import free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families

from geobouncer.pool.cancel_keys import peer_of

pytestmark = pytest.mark.skipif(TARGET != "geobouncer", reason="PgBouncer has no workers setting")


def worker_pids(b) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(b.pid)], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def start_workers(bouncer, count: int = 2, databases=None, **settings):
    b = bouncer(databases=databases,
                pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "workers": count,
                           "pidfile": "geobouncer.pid", **settings})
    wait_until(lambda: len(worker_pids(b)) == count
               and b.log_text().count("process up: geobouncer") >= count,
               timeout=20, message=f"{count} workers up")
    return b


def peer_seen(b) -> int:
    conn = b.connect("app", "app", autocommit=True)
    try:
        conn.cursor().execute("SELECT 1")
        return peer_of(conn.get_backend_pid(), 0)
    finally:
        conn.close()


@pytest.mark.timeout(120)
def test_workers_share_the_port_and_forward_cancels(pg, bouncer):
    b = start_workers(bouncer)
    seen = set()
    for _ in range(60):
        seen.add(peer_seen(b))
        if seen == {1, 2}:
            break
    assert seen == {1, 2}
    forwarded = 0
    for _ in range(30):
        conn = b.connect("app", "app", autocommit=True)
        outcome = {}

        def run(conn=conn, outcome=outcome):
            try:
                conn.cursor().execute("SELECT pg_sleep(30)")
                outcome["done"] = "finished"
            except psycopg2.errors.QueryCanceled:
                outcome["done"] = "cancelled"

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            wait_until(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                                       "AND query = 'SELECT pg_sleep(30)'")[0][0] == 1, timeout=10,
                       message="pg_sleep running")
            conn.cancel()
            thread.join(15)
            assert outcome.get("done") == "cancelled"
        finally:
            conn.close()
        forwarded = b.log_text().count("forwarding cancel request to peer")
        if forwarded:
            break
    assert forwarded >= 1, "no cancel reached the other worker in 30 tries"


@pytest.mark.timeout(60)
def test_limits_are_split_between_workers(bouncer):
    b = start_workers(bouncer, default_pool_size=5, max_client_conn=100, max_db_connections=1)
    config = {r.key: r.value for r in b.admin("SHOW CONFIG")}
    assert config["default_pool_size"] == "2"
    assert config["max_client_conn"] == "50"
    assert config["max_db_connections"] == "1"     # below the worker count: 1 each
    assert config["peer_id"] in ("1", "2")
    assert config["workers"] == "1"                  # a worker does not supervise


@pytest.mark.timeout(60)
def test_signals_are_passed_on_and_the_supervisor_cleans_up(bouncer):
    b = start_workers(bouncer)
    pidfile = b.workdir / "geobouncer.pid"
    assert pidfile.read_text().strip() == str(b.pid)
    b.signal(signal.SIGHUP)
    wait_until(lambda: b.log_text().count("got SIGHUP, re-reading config") == 2, timeout=10,
               message="both workers reloaded")
    workers = worker_pids(b)
    b.signal(signal.SIGTERM)
    assert b.wait_exit(15) == 0
    assert not pidfile.exists()
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]


@pytest.mark.timeout(60)
def test_a_dead_worker_is_started_again(bouncer):
    b = start_workers(bouncer)
    victim = min(worker_pids(b))
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(worker_pids(b)) == 2 and victim not in worker_pids(b), timeout=15,
               message="worker replaced")
    wait_until(lambda: b.log_text().count("process up: geobouncer") == 3, timeout=15,
               message="replacement up")
    for _ in range(10):
        assert peer_seen(b) in (1, 2)


@pytest.mark.timeout(180)
def test_rolling_restart_under_pgbench_loses_nothing(pg, bouncer, tmp_path):
    b = start_workers(bouncer, default_pool_size=10)
    script = tmp_path / "select.sql"
    script.write_text("SELECT 1;\n")
    env = {**os.environ, "PGPASSWORD": b.userlist["app"]}
    bench = subprocess.Popen(
        ["pgbench", "-n", "-C", "-c", "4", "-T", "12", "-f", str(script),
         "-h", "127.0.0.1", "-p", str(b.port), "-U", "app", "app"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(2)
        ups = b.log_text().count("process up: geobouncer")
        for victim in sorted(worker_pids(b)):          # every worker, one at a time
            os.kill(victim, signal.SIGTERM)
            ups += 1
            wait_until(lambda victim=victim: victim not in worker_pids(b)
                       and len(worker_pids(b)) == 2
                       and b.log_text().count("process up: geobouncer") >= ups,
                       timeout=30, message="worker replaced")
            time.sleep(1)
        out, _ = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
    print(out)
    assert bench.returncode == 0, out
    assert "number of failed transactions: 0 " in out, out
    assert "aborted" not in out, out
    processed = int(out.split("number of transactions actually processed:")[1].split()[0])
    assert processed > 100, out
    assert b.log_text().count("process up: geobouncer") >= 4      # 2 at start + 2 replacements


@pytest.mark.timeout(60)
def test_each_worker_serves_its_own_metrics_and_all_of_them(pg, bouncer):
    for _ in range(50):                      # two free ports in a row
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
                break
            except OSError:
                continue
    b = start_workers(bouncer, metrics_port=port, metrics_listen_addr="127.0.0.1")
    for p in (port, port + 1):
        wait_until(lambda p=p: urllib.request.urlopen(f"http://127.0.0.1:{p}/healthz", timeout=5).status
                   == 200, timeout=15, message=f"metrics on {p}")
        text = urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=5).read().decode()
        assert "pgbouncer_config_max_client_connections 50.0" in text   # 100 split two ways
    # /metrics/all on either worker: the whole pooler under the same names.
    held = []
    try:
        for index in (1, 2):      # clients on both workers, through their private sockets
            where = str(next(Path(b.workdir).rglob(f"w{index}/.s.PGSQL.{b.port}")).parent)
            for _ in range(index + 1):
                conn = psycopg2.connect(host=where, port=b.port, dbname="app", user="app",
                                        password=b.userlist["app"])
                conn.autocommit = True
                conn.cursor().execute("SELECT 1")
                held.append(conn)
        for p in (port, port + 1):
            text = urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics/all", timeout=10).read().decode()
            families = {f.name: f for f in text_string_to_metric_families(text)}
            value = {f"{s.name}{sorted(s.labels.items())}": s.value
                     for f in families.values() for s in f.samples}
            assert value["pgbouncer_config_max_client_connections[]"] == 100.0    # 50 + 50
            assert value["pgbouncer_up[]"] == 1.0
            assert value["geobouncer_workers_scraped[]"] == 2.0
            active = value["pgbouncer_pools_client_active_connections[('database', 'app'), ('user', 'app')]"]
            assert active == 5.0                       # 2 on worker 1, 3 on worker 2
            assert value["pgbouncer_stats_queries_pooled_total[('database', 'app')]"] >= 5
    finally:
        for conn in held:
            conn.close()
