"""A lone simple Query that finds its pool full, in transaction pooling.

geobouncer queues it and lets the client's greenlet go back to reading the
client; whoever releases a server links it and sends the query
(geobouncer/net/handoff.py, QueuedQuery). Each way such a wait can end is
tried here against real PostgreSQL, through a raw protocol client so the
test controls what is on the wire and when. The behaviour asserted is
PgBouncer's: these tests run against it too (GEOBOUNCER_TEST_TARGET=pgbouncer).
"""

from __future__ import annotations

import time

import pytest
from _util_pool import (
    RawClient,
    close_quietly,
    errors_in,
    pool_row,
    query_message,
    query_one,
    wait_no_backends,
)
from fixtures.pooler import TARGET
from fixtures.ports import wait_until


def start(bouncer, pg, **settings):
    conf = {"pool_mode": "transaction", "auth_type": "md5", "default_pool_size": 1, **settings}
    b = bouncer(pgbouncer=conf)
    wait_no_backends(pg)
    return b


def hold_transaction(b):
    conn = b.connect()
    pid = query_one(conn, "SELECT pg_backend_pid()")[0]
    return conn, pid


def logged_in(b, extra=None) -> RawClient:
    raw = RawClient(b.host, b.port, timeout=20)
    assert raw.login("app", "app_pw", "app", extra)[-1][0] == b"Z"
    return raw


def waiting(b) -> int:
    return int(pool_row(b).cl_waiting)


def rows(replies) -> list[bytes]:
    """The first column of every DataRow."""
    out = []
    for mtype, body in replies:
        if mtype == b"D":
            size = int.from_bytes(body[2:6], "big")
            out.append(body[6:6 + size])
    return out


def reply(raw) -> list:
    replies = raw.read_until(b"Z")
    assert replies and replies[-1][0] == b"Z", replies
    return replies


@pytest.mark.timeout(60)
def test_a_queued_query_runs_on_the_server_released(pg, bouncer):
    b = start(bouncer, pg)
    a, pid = hold_transaction(b)
    raw = logged_in(b)
    try:
        raw.send(query_message("SELECT pg_backend_pid()"))
        wait_until(lambda: waiting(b) == 1, timeout=10, message="the query waits for the server")
        a.commit()
        replies = reply(raw)
        assert errors_in(replies) == [] and rows(replies) == [str(pid).encode()], replies
        assert waiting(b) == 0
    finally:
        raw.close()
        close_quietly(a)


@pytest.mark.timeout(60)
def test_clients_that_leave_while_queued_get_no_server(pg, bouncer):
    """Twenty clients queue a query and disconnect; the server released after
    that goes to none of them: the next client gets it at once."""
    b = start(bouncer, pg)
    a, pid = hold_transaction(b)
    leavers = [logged_in(b) for _ in range(20)]
    try:
        for raw in leavers:
            raw.send(query_message("SELECT 1"))
        wait_until(lambda: waiting(b) == 20, timeout=10, message="all twenty wait")
        for raw in leavers:
            raw.close()
        if TARGET == "geobouncer":
            # at once; PgBouncer 1.18 notices a waiting client's close only
            # when it has a server for it
            wait_until(lambda: waiting(b) == 0, timeout=10, message="the leavers are forgotten")
        else:
            time.sleep(0.5)
        a.commit()
        fresh = logged_in(b)
        try:
            started = time.monotonic()
            fresh.send(query_message("SELECT pg_backend_pid()"))
            replies = reply(fresh)
            assert rows(replies) == [str(pid).encode()], replies
            assert time.monotonic() - started < 5
            row = pool_row(b)
            assert (int(row.cl_waiting), int(row.sv_active) + int(row.sv_idle)) == (0, 1), row
        finally:
            fresh.close()
    finally:
        close_quietly(a)


@pytest.mark.timeout(60)
def test_bytes_sent_while_queued_follow_the_queued_query(pg, bouncer):
    """A second query sent while the first still waits goes after it, on the
    same server, and both are answered in order."""
    b = start(bouncer, pg)
    a, pid = hold_transaction(b)
    raw = logged_in(b)
    try:
        raw.send(query_message("SELECT 'first'"))
        wait_until(lambda: waiting(b) == 1, timeout=10, message="the first query waits")
        raw.send(query_message("SELECT 'second', pg_backend_pid()"))
        time.sleep(0.3)
        a.commit()
        first, second = reply(raw), reply(raw)
        assert rows(first) == [b"first"] and rows(second) == [b"second"], (first, second)
        assert errors_in(first + second) == []
    finally:
        raw.close()
        close_quietly(a)


@pytest.mark.timeout(60)
def test_a_queued_query_gets_its_own_parameters(pg, bouncer):
    """The server released was last used with other tracked parameters: they
    are set to the waiting client's before its query runs."""
    b = start(bouncer, pg)
    a, _ = hold_transaction(b)
    raw = logged_in(b, {"TimeZone": "Asia/Tokyo", "application_name": "queued_client"})
    try:
        raw.send(query_message("SELECT current_setting('TimeZone') || ' ' || current_setting('application_name')"))
        wait_until(lambda: waiting(b) == 1, timeout=10, message="the query waits")
        a.commit()
        replies = reply(raw)
        assert rows(replies) == [b"Asia/Tokyo queued_client"], replies
        # and the next client with the defaults gets its own back
        assert query_one(a, "SELECT current_setting('TimeZone') <> 'Asia/Tokyo'") == (True,)
    finally:
        raw.close()
        close_quietly(a)


@pytest.mark.timeout(60)
def test_a_queued_query_gets_a_new_server_when_the_busy_one_dies(pg, bouncer):
    b = start(bouncer, pg)
    a, pid = hold_transaction(b)
    raw = logged_in(b)
    try:
        raw.send(query_message("SELECT pg_backend_pid()"))
        wait_until(lambda: waiting(b) == 1, timeout=10, message="the query waits")
        pg.psql("SELECT pg_terminate_backend(%s)", (pid,))
        replies = reply(raw)
        assert errors_in(replies) == [], replies
        (new_pid,) = rows(replies)
        assert new_pid != str(pid).encode()
    finally:
        raw.close()
        close_quietly(a)


@pytest.mark.timeout(60)
def test_a_queued_client_times_out_alone(pg, bouncer):
    """query_wait_timeout ends the queued client (08P01), not the one holding
    the server, nor a client queued later that is still within its time."""
    b = start(bouncer, pg, query_wait_timeout=2)
    a, pid = hold_transaction(b)
    early = logged_in(b)
    try:
        early.send(query_message("SELECT 1"))
        started = time.monotonic()
        replies = early.read_until_close()
        assert [(e["C"], e["M"]) for e in errors_in(replies)] == [("08P01", "query_wait_timeout")], replies
        assert 1.5 < time.monotonic() - started < 6
        assert query_one(a, "SELECT pg_backend_pid()") == (pid,)
        late = logged_in(b)
        try:
            late.send(query_message("SELECT pg_backend_pid()"))
            wait_until(lambda: waiting(b) == 1, timeout=10, message="the late query waits")
            a.commit()
            assert rows(reply(late)) == [str(pid).encode()]
        finally:
            late.close()
    finally:
        early.close()
        close_quietly(a)
