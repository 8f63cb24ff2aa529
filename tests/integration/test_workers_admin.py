"""The admin console of any worker sees the whole pooler (``workers = N``), against real PostgreSQL.

- SHOW WORKERS on one connection has one row per worker: its peer id, its pid
  (the supervisor's children), its state and its client and server counts,
  the other workers asked over their unix sockets.

geobouncer only (PgBouncer has no workers setting).
"""

from __future__ import annotations

import pytest
from fixtures.pooler import TARGET
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
