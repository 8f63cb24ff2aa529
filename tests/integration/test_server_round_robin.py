"""server_round_robin: idle servers are reused in turn instead of the most
recently used first (LIFO), so a round-robin address behind a database gets
an even load. Seen from the backends' pids that serve one client's
successive transactions. Runs against PgBouncer too
(GEOBOUNCER_TEST_TARGET=pgbouncer)."""

from __future__ import annotations

import pytest
from _util_pool import query_one


def _pids_in_turn(b, servers: int, rounds: int) -> list[int]:
    held = [b.connect() for _ in range(servers)]       # transactions open: one server each
    try:
        for conn in held:
            query_one(conn, "SELECT 1")
    finally:
        for conn in held:
            conn.rollback()
            conn.close()
    conn = b.connect(autocommit=True)
    try:
        return [query_one(conn, "SELECT pg_backend_pid()")[0] for _ in range(rounds)]
    finally:
        conn.close()


@pytest.mark.parametrize("round_robin", [0, 1])
def test_idle_servers_reused_in_turn_or_last_first(pg, bouncer, round_robin):
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "default_pool_size": 3,
                           "server_round_robin": round_robin})
    pids = _pids_in_turn(b, servers=3, rounds=6)
    if round_robin:
        assert len(set(pids)) == 3 and pids[:3] == pids[3:], pids     # each in turn, the same turn
    else:
        assert len(set(pids)) == 1, pids                            # the most recently used, always
