"""Hostile clients and a bad network against requests served from the hub
(geobouncer/net/inline.py): after a lone Query or an unnamed extended batch
the client is parked and its socket's read callback forwards the next such
request itself while nothing can block. Pipelining into a busy server,
hand-offs that need the client's greenlet, headers split at every byte,
garbage after parking, admin commands and timeouts while parked. After
each case the pooler must be consistent and quiet (test_queued_hostile's
assert_settled). Real PostgreSQL, real geobouncer processes; the expected
behaviour is PgBouncer 1.18's (GEOBOUNCER_TEST_TARGET=pgbouncer).
"""

from __future__ import annotations

import time

import pytest
from _util_pool import close_quietly, errors_in, message, query_message
from fixtures.ports import wait_until
from test_queued_hostile import assert_settled
from test_queued_queries import hold_transaction, logged_in, reply, rows, start, waiting


def parked(b, raw, sql: str = "SELECT 'parked'") -> None:
    """One lone Query answered: the client is parked, served from the hub next."""
    raw.send(query_message(sql))
    replies = reply(raw)
    assert errors_in(replies) == [], replies


# --- pipelining into a busy server --------------------------------------------------

@pytest.mark.timeout(40)
def test_pipelined_queries_into_a_busy_server_are_held_back_not_fatal(pg, bouncer):
    """A parked client whose server is busy (pg_sleep) pipelines many 16 KB
    Queries, one per packet: the server reads none of them meanwhile, so
    its socket fills. The pooler must stop reading the client (as PgBouncer
    does), not end it with "server conn crashed?" when a write from the hub
    does not fit."""
    b = start(bouncer, pg, default_pool_size=2)
    raw = logged_in(b)
    count = 400
    padded = query_message("SELECT 1 /*" + "x" * 16000 + "*/")
    assert len(padded) <= 16384
    try:
        parked(b, raw)
        raw.send(query_message("SELECT pg_sleep(1.5)"))
        time.sleep(0.05)
        for _ in range(count):
            assert raw.send(padded), "the pooler closed the connection"
            time.sleep(0.002)      # one Query per packet: each read by the hub's callback alone
        raw.sock.settimeout(20)
        replies = []
        for _ in range(count + 1):
            got = reply(raw)
            replies += got
            assert errors_in(got) == [], got
        assert sum(1 for mtype, _ in replies if mtype == b"Z") == count + 1
        assert rows(replies)[1:] == [b"1"] * count
        assert_settled(b, pg, 2)
    finally:
        raw.close()
