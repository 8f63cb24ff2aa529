"""The admin console of any worker sees the whole pooler (``workers = N``), against real PostgreSQL.

- SHOW WORKERS on one connection has one row per worker: its peer id, its pid
  (the supervisor's children), its state and its client and server counts,
  the other workers asked over their unix sockets; SHOW WORKER_POOLS (STATS,
  CLIENTS, SERVERS) every worker's rows, led by the worker's id;
- PAUSE, RESUME, SUSPEND and RELOAD on one console apply to every worker;
  SHUTDOWN stops every worker and the supervisor.

geobouncer only (PgBouncer has no workers setting).
"""

from __future__ import annotations

import os
import re

import pytest
from fixtures.pooler import TARGET
from fixtures.ports import wait_until
from test_workers import start_workers, worker_pids

pytestmark = pytest.mark.skipif(TARGET != "geobouncer", reason="PgBouncer has no workers setting")


@pytest.mark.timeout(90)
def test_show_workers_lists_every_worker_from_one_connection(pg, bouncer):
    b = start_workers(bouncer)
    held = [b.connect("app", "app", autocommit=True) for _ in range(6)]
    try:
        for conn in held:
            conn.cursor().execute("SELECT 1")
        rows = b.admin("SHOW WORKERS")
        assert [r._fields for r in rows][0][:5] == ("worker", "pid", "state", "clients", "servers")
        assert sorted(int(r.worker) for r in rows) == [1, 2]
        assert {int(r.pid) for r in rows} == worker_pids(b)
        assert {r.state for r in rows} == {"active"}
        # the six clients, this admin connection and the one it opened to the
        # other worker (counted there while it answers), wherever SO_REUSEPORT put them
        assert sum(int(r.clients) for r in rows) == 8
        assert sum(int(r.servers) for r in rows) >= 1
    finally:
        for conn in held:
            conn.close()


@pytest.mark.timeout(90)
def test_per_worker_pools_stats_clients_servers_from_one_connection(pg, bouncer):
    b = start_workers(bouncer)
    held = [b.connect("app", "app", autocommit=True) for _ in range(6)]
    try:
        for conn in held:
            conn.cursor().execute("SELECT 1")
        pools = b.admin("SHOW WORKER_POOLS")
        assert pools[0]._fields[:3] == ("worker", "database", "user")
        app = [r for r in pools if r.database == "app"]
        # the six clients, on whichever worker accepted each
        assert sum(int(r.cl_active) for r in app) == 6
        clients = [r for r in b.admin("SHOW WORKER_CLIENTS") if r.database == "app"]
        assert len(clients) == 6 and {int(r.worker) for r in clients} <= {1, 2}
        by_worker = {int(r.worker): int(r.total_query_count)
                     for r in b.admin("SHOW WORKER_STATS") if r.database == "app"}
        assert sum(by_worker.values()) >= 6
        servers = [r for r in b.admin("SHOW WORKER_SERVERS") if r.database == "app"]
        assert len(servers) >= 1 and all(int(r.worker) in (1, 2) for r in servers)
    finally:
        for conn in held:
            conn.close()


def states(b) -> list[str]:
    return [r.state for r in sorted(b.admin("SHOW WORKERS"), key=lambda r: int(r.worker))]


@pytest.mark.timeout(90)
def test_pause_resume_on_one_console_apply_to_every_worker(pg, bouncer):
    b = start_workers(bouncer)
    b.admin("PAUSE")
    assert states(b) == ["paused", "paused"]
    b.admin("RESUME")
    assert states(b) == ["active", "active"]
    b.admin("PAUSE app")                                # a database: sent on as given
    b.admin("RESUME app")
    assert states(b) == ["active", "active"]
    conn = b.connect("app", "app", autocommit=True)     # serving again, wherever it lands
    conn.cursor().execute("SELECT 1")
    conn.close()


@pytest.mark.timeout(90)
def test_suspend_on_one_console_suspends_every_worker_while_it_lasts(pg, bouncer):
    b = start_workers(bouncer)
    for ending in ("RESUME", "close"):
        mark = b.log_offset()
        console = b.connect("pgbouncer", "postgres", autocommit=True)
        try:
            cur = console.cursor()
            cur.execute("SUSPEND")
            # A suspended worker takes no new connection (PgBouncer's SUSPEND), so
            # its state is read from the log: both said so before SUSPEND returned.
            issued = re.findall(r"\[(\d+)\] LOG SUSPEND command issued", b.log_text(mark))
            assert {int(pid) for pid in issued} == worker_pids(b)
            cur.execute("SHOW WORKER")
            assert cur.fetchone()[2] == "suspended"
            if ending == "RESUME":
                console.cursor().execute("RESUME")
        finally:
            console.close()          # PgBouncer resumes when the last admin leaves
        wait_until(lambda: states(b) == ["active", "active"], timeout=10,
                   message=f"every worker active again after {ending}")
    conn = b.connect("app", "app", autocommit=True)
    conn.cursor().execute("SELECT 1")
    conn.close()


@pytest.mark.timeout(60)
def test_reload_on_one_console_reloads_every_worker(bouncer):
    b = start_workers(bouncer)
    b.admin("RELOAD")
    wait_until(lambda: b.log_text().count("RELOAD command issued") == 2, timeout=10,
               message="both workers reloaded")


@pytest.mark.timeout(60)
def test_shutdown_on_one_console_stops_every_worker_and_the_supervisor(bouncer):
    b = start_workers(bouncer)
    workers = worker_pids(b)
    b.admin("SHUTDOWN")
    assert b.wait_exit(15) == 0
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]
