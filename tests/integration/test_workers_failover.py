"""``workers = N`` with fast switchover: one worker detects, every worker acts.

A streaming pair (primary + replica) behind two workers. Only worker 1 has
clients (they connect to its private unix socket, which the workers use to
reach one another), so only worker 1 can notice the writer dying through its
traffic. When it confirms the failure it tells worker 2 (WORKER_EVENT over the
workers' console channel); worker 2 verifies for itself and switches over too,
without a client of its own having failed first. Against real PostgreSQL;
geobouncer only.
"""

from __future__ import annotations

import re
from pathlib import Path

import psycopg2
import pytest
from fixtures.cluster import ROLE_PASSWORDS
from fixtures.pooler import TARGET
from fixtures.ports import wait_until
from test_failover import cluster_entry, ep, make_topology, wait_replayed
from test_workers import start_workers

pytestmark = pytest.mark.skipif(TARGET != "geobouncer", reason="PgBouncer has no workers setting")


def worker_socket_dir(b, index: int) -> str:
    found = sorted(Path(b.workdir).rglob(f"w{index}/.s.PGSQL.{b.port}"))
    assert found, f"no private socket of worker {index} under {b.workdir}"
    return str(found[0].parent)


def _query_via(host: str, port: int, sql: str, dbname: str = "app", user: str = "app") -> list[tuple]:
    conn = psycopg2.connect(host=host, port=port, dbname=dbname, user=user,
                            password=ROLE_PASSWORDS[user], connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()


def _port_via(host: str, port: int) -> int:
    return _query_via(host, port, "SELECT inet_server_port()")[0][0]


@pytest.mark.timeout(120)
def test_one_worker_detects_a_failed_writer_and_every_worker_switches(make_pg, make_replica, bouncer):
    primary = make_pg()
    replica = make_replica(primary)
    make_topology(primary, [primary, replica])
    wait_replayed(primary, [replica])
    b = start_workers(bouncer, databases={"app": cluster_entry(primary)}, auth_user="app",
                      server_failed_delay=60, switchover_timeout=30)
    w1, w2 = worker_socket_dir(b, 1), worker_socket_dir(b, 2)
    assert _port_via(w1, b.port) == primary.port
    mark = b.log_offset()
    primary.stop("immediate")
    replica.promote()

    # Worker 1's client finds out (its first try may fail: the writer died under it).
    def served_by_new_writer():
        try:
            return _port_via(w1, b.port) == replica.port
        except psycopg2.Error:
            return False
    wait_until(served_by_new_writer, timeout=30, message="worker 1 on the new writer")

    # Worker 2, which had no client, was told and switched over on its own check.
    log = b.log_text(mark)
    wait_until(lambda: len(set(re.findall(r"\[(\d+)\] WARNING app: .* is the new writer",
                                          b.log_text(mark)))) == 2,
               timeout=15, message="both workers switched over")
    log = b.log_text(mark)
    assert "another worker found the writer failing" in log or "another worker found a new writer" in log, log
    assert _port_via(w2, b.port) == replica.port
    topo = {row.node: row.role for row in b.admin("SHOW TOPOLOGY") if row.database == "app"}
    assert topo[ep(replica)] == "writer"


@pytest.mark.timeout(120)
def test_a_replica_banned_by_one_worker_is_banned_by_every_worker(make_pg, make_replica, bouncer):
    primary = make_pg()
    r1 = make_replica(primary)
    entry = {"host": "127.0.0.1", "port": primary.port, "dbname": "app", "read_write_split": 1,
             "replicas": f"127.0.0.1:{r1.port}"}
    # Health checks seldom: a ban on worker 2 within seconds can only come from worker 1.
    b = start_workers(bouncer, databases={"app": entry}, admin_users="postgres",
                      health_check_period=60, replica_ban_time=60)
    w1, w2 = worker_socket_dir(b, 1), worker_socket_dir(b, 2)

    def banned(where) -> int:
        return sum(row[4] for row in _query_via(where, b.port, "SHOW REPLICAS", "pgbouncer", "postgres"))
    wait_until(lambda: _port_via(w1, b.port) == r1.port, timeout=20, message="reads on the replica")
    assert banned(w1) == banned(w2) == 0
    r1.stop("immediate")
    try:
        _port_via(w1, b.port)             # worker 1's read meets the dead replica: banned there
    except psycopg2.Error:
        pass
    wait_until(lambda: banned(w1) == 1, timeout=10, message="worker 1 banned the replica")
    wait_until(lambda: banned(w2) == 1, timeout=5, message="worker 2 banned it too")
    assert "banned by another worker" in b.log_text()
    assert _port_via(w2, b.port) == primary.port        # worker 2's reads go to the primary now


def test_worker_events_are_refused_from_an_ordinary_admin(bouncer):
    b = bouncer(pgbouncer={"admin_users": "postgres"})
    with pytest.raises(psycopg2.Error) as info:
        b.admin('WORKER_EVENT "ban app 127.0.0.1:1"')
    assert "sent by geobouncer's workers" in str(info.value)
    assert b.admin("SHOW VERSION")                   # the console goes on
