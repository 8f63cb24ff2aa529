"""Storms against the queued lone Query (net/handoff.py): clients with
their own parameters and SETs queued behind each other, leaving at every
point, killed, timed out, their server terminated; hostile bytes sent while
queued. Helpers and the settled-state check: test_queued_hostile.py."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import pytest
from _util_pool import (
    close_quietly,
    errors_in,
    message,
    query_message,
    query_one,
    startup_packet,
)
from fixtures.pooler import TARGET
from fixtures.ports import wait_until
from test_queued_hostile import assert_settled, queue_behind, rss_kb
from test_queued_queries import hold_transaction, logged_in, reply, rows, start, waiting

# PgBouncer 1.18 replays only the tracked parameters, not a client's SETs.
REMEMBERS_SETS = TARGET == "geobouncer"
ZONES = ["UTC", "Asia/Tokyo", "Europe/Paris", "America/New_York", "Australia/Sydney", "Africa/Cairo"]
WHO = ("SELECT current_setting('TimeZone') || ',' || current_setting('application_name')"
       " || ',' || current_setting('work_mem')")


def own_clients(b, count: int) -> list:
    """Clients each with its own TimeZone, application_name and remembered
    SET work_mem; returns (client, expected answer) pairs."""
    out = []
    for i in range(count):
        zone, name, mem = ZONES[i % len(ZONES)], f"c{i}", f"{100 + i}kB"
        raw = logged_in(b, {"TimeZone": zone, "application_name": name})
        if REMEMBERS_SETS:
            raw.send(query_message(f"SET work_mem = '{mem}'"))
            assert errors_in(reply(raw)) == []
        else:
            mem = "4MB"
        out.append((raw, f"{zone},{name},{mem}".encode()))
    return out


def assert_defaults_on_every_server(b, servers: int) -> None:
    """No server is left with a client's SET: a client with the defaults
    sees them on each server it is given."""
    conns = [b.connect() for _ in range(servers)]
    try:
        cursors = [c.cursor() for c in conns]
        for cur in cursors:
            cur.execute("SELECT current_setting('work_mem'), current_setting('application_name')")
        seen = {cur.fetchone() for cur in cursors}
        if TARGET != "geobouncer":      # PgBouncer 1.18 leaves an unset application_name as it was
            seen = {(mem, "") for mem, _ in seen}
        assert seen == {("4MB", "")}, seen
    finally:
        close_quietly(*conns)


@pytest.mark.timeout(50)
@pytest.mark.parametrize("pool_size", [1, 3])
def test_own_parameters_and_sets_behind_each_other_while_some_leave(pg, bouncer, pool_size):
    """Twenty-four clients with their own TimeZone / application_name / SET
    queue; a third leave before the hand-off, a third at random moments
    while servers are handed and synced; the rest each see only their own
    values, and no server keeps any of them."""
    b = start(bouncer, pg, default_pool_size=pool_size)
    clients = own_clients(b, 24)
    holders = [hold_transaction(b)[0] for _ in range(pool_size)]
    rng = random.Random(4)
    try:
        for raw, _ in clients:
            raw.send(query_message(WHO))
        wait_until(lambda: waiting(b) == 24, timeout=10, message="all wait")
        early, late, stay = clients[0::3], clients[1::3], clients[2::3]
        for raw, _ in early:
            raw.close()
        for conn in holders:
            conn.commit()
        for raw, _ in late:
            time.sleep(rng.random() * 0.02)
            raw.close()
        for raw, expected in stay:
            replies = reply(raw)
            assert errors_in(replies) == [] and rows(replies) == [expected], replies
            raw.send(query_message(WHO))        # and again, with the pool busy with others
        for raw, expected in stay:
            assert rows(reply(raw)) == [expected]
        for raw, _ in stay:
            raw.close()
        close_quietly(*holders)
        assert_settled(b, pg, pool_size)
        assert_defaults_on_every_server(b, pool_size)
    finally:
        for raw, _ in clients:
            raw.close()
        close_quietly(*holders)


@pytest.mark.timeout(50)
def test_server_terminated_while_clients_with_own_parameters_wait(pg, bouncer):
    b = start(bouncer, pg, default_pool_size=2)
    clients = own_clients(b, 8)
    held = [hold_transaction(b) for _ in range(2)]
    try:
        for raw, _ in clients:
            raw.send(query_message(WHO))
        wait_until(lambda: waiting(b) == 8, timeout=10, message="all wait")
        pg.psql("SELECT pg_terminate_backend(%s)", (held[0][1],))
        for raw, expected in clients[:4]:
            raw.sock.settimeout(10)
            assert rows(reply(raw)) == [expected]
        pg.psql("SELECT pg_terminate_backend(%s)", (held[1][1],))
        for raw, expected in clients[4:]:
            raw.sock.settimeout(10)
            assert rows(reply(raw)) == [expected]
        for raw, _ in clients:
            raw.close()
        close_quietly(*[conn for conn, _ in held])
        assert_settled(b, pg, 2)
        assert_defaults_on_every_server(b, 2)
    finally:
        for raw, _ in clients:
            raw.close()
        close_quietly(*[conn for conn, _ in held])


_VICTIM = """
import sys, psycopg2
conn = psycopg2.connect(sys.argv[1]); conn.autocommit = True
cur = conn.cursor(); cur.execute("SET TimeZone = 'Asia/Tokyo'")
print("ready", flush=True)
sys.stdin.readline()
cur.execute("SELECT current_setting('TimeZone')")
print(cur.fetchone()[0], flush=True)
"""


@pytest.mark.timeout(50)
def test_sigkilled_psycopg2_processes_with_queued_queries(pg, bouncer):
    """Ten psycopg2 processes queue a query and are SIGKILLed: five before
    the server is released, five as it is handed round."""
    b = start(bouncer, pg)
    procs = [subprocess.Popen([sys.executable, "-c", _VICTIM, b.dsn()], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(10)]
    a = None
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        a, _ = hold_transaction(b)
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        wait_until(lambda: waiting(b) == 10, timeout=15, message="the ten wait")
        for proc in procs[:5]:
            proc.send_signal(signal.SIGKILL)
        a.commit()
        for proc in procs[5:]:
            proc.send_signal(signal.SIGKILL)
        for proc in procs:
            proc.wait(10)
        assert_settled(b, pg, 1)
        assert query_one(a, "SELECT current_setting('TimeZone') <> 'Asia/Tokyo'") == (True,)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        close_quietly(a)


@pytest.mark.timeout(40)
def test_query_wait_timeout_storm_spares_the_holder(pg, bouncer):
    """Eight queued clients, half of which sent more bytes (their greenlets
    wait themselves): every one ends with 08P01 query_wait_timeout in time;
    the holder keeps its transaction; a client queued after is served."""
    b = start(bouncer, pg, query_wait_timeout=2)
    a, pid = hold_transaction(b)
    queued = queue_behind(b, 8)
    try:
        started = time.monotonic()
        for raw in queued[:4]:
            raw.send(query_message("SELECT 'more'"))
        for raw in queued:
            replies = raw.read_until_close()
            assert [(e["C"], e["M"]) for e in errors_in(replies)] == [("08P01", "query_wait_timeout")], replies
        assert time.monotonic() - started < 6
        assert query_one(a, "SELECT pg_backend_pid()") == (pid,)
        a.commit()
        assert_settled(b, pg, 1)
    finally:
        for raw in queued:
            raw.close()
        close_quietly(a)


def _answered(raw, expected_rows) -> None:
    got = []
    while len(got) < len(expected_rows):
        replies = reply(raw)
        assert errors_in(replies) == [], replies
        got += rows(replies)
    assert got == expected_rows


@pytest.mark.timeout(40)
@pytest.mark.parametrize("kind", ["pipelined", "partial_header", "huge", "garbage", "terminate", "startup"])
def test_bytes_sent_while_queued(pg, bouncer, kind):
    """A queued client sends more before its server comes; a bystander is
    queued behind it. Whatever it sent, the bystander is served and the
    pooler settles; well-formed requests are answered in order."""
    b = start(bouncer, pg)
    a, _ = hold_transaction(b)
    raw, bystander = queue_behind(b, 2)
    try:
        if kind == "pipelined":
            raw.send(b"".join(query_message(f"SELECT 'p{i}'") for i in range(50)))
        elif kind == "partial_header":
            rest = query_message("SELECT 'split'")
            raw.send(rest[:3])
        elif kind == "huge":
            raw.send(query_message(f"SELECT length('{'x' * 2_000_000}')"))
        elif kind == "garbage":
            raw.send(b"\xff" * 64)
        elif kind == "terminate":
            raw.send(message(b"X"))
        else:
            raw.send(startup_packet({"user": "app", "database": "app"}))
        time.sleep(0.2)       # let the pooler read it while the query waits
        a.commit()
        raw.sock.settimeout(15)
        if kind == "pipelined":
            _answered(raw, [b"0"] + [f"p{i}".encode() for i in range(50)])
        elif kind == "partial_header" and TARGET == "geobouncer":
            _answered(raw, [b"0"])      # PgBouncer 1.18 answers only once the rest came
            raw.send(rest[3:])
            _answered(raw, [b"split"])
        elif kind == "partial_header":
            raw.send(rest[3:])
            _answered(raw, [b"0", b"split"])
        elif kind == "huge":
            _answered(raw, [b"0", b"2000000"])
        else:
            replies = raw.read_until_close()
            assert {e["C"] for e in errors_in(replies)} <= {"08P01"}, replies
        bystander.sock.settimeout(15)
        assert rows(reply(bystander)) == [b"1"]
        raw.close()
        bystander.close()
        assert_settled(b, pg, 1)
    finally:
        raw.close()
        bystander.close()
        close_quietly(a)


@pytest.mark.timeout(55)
def test_queue_and_leave_rounds_keep_memory_bounded(pg, bouncer):
    """Rounds of forty clients queued, half leaving, half served: the RSS of
    the pooler does not keep growing."""
    if TARGET != "geobouncer":
        pytest.skip("RSS of geobouncer's own process")
    b = start(bouncer, pg)
    sizes = []
    for round_ in range(6):
        a, _ = hold_transaction(b)
        queued = queue_behind(b, 40)
        for raw in queued[::2]:
            raw.close()
        a.commit()
        for raw in queued[1::2]:
            reply(raw)
            raw.close()
        a.close()
        wait_until(lambda: waiting(b) == 0, timeout=10, message="round settled")
        sizes.append(rss_kb(b.pid))
    assert sizes[-1] - sizes[1] < 8 * 1024, sizes
    assert_settled(b, pg, 1)


def _chaos_client(b, seed: int, rounds: int) -> int:
    """One client's random life: queries answered, pipelined pairs, leaving
    with a query in flight (then a new connection). Returns answers checked."""
    rng = random.Random(seed)
    checked = 0
    raw = logged_in(b, {"application_name": f"x{seed}"})
    try:
        for n in range(rounds):
            roll = rng.random()
            if roll < 0.15:
                raw.send(query_message("SELECT pg_sleep(0.01)"))
                raw.close()
                raw = logged_in(b, {"application_name": f"x{seed}"})
                continue
            count = 2 if roll < 0.4 else 1
            raw.send(b"".join(query_message(f"SELECT current_setting('application_name') || ':{n}:{k}'")
                              for k in range(count)))
            for k in range(count):
                replies = raw.read_until(b"Z")
                err = errors_in(replies)
                if err:
                    # a terminated server: its FATAL forwarded, PgBouncer's code and
                    # text, or (geobouncer) the parameter sync before the query failed
                    assert {e["C"] for e in err} <= {"57P01", "08P01", "08006"}, err
                    assert replies[-1][0] == b"E" and raw.read_until_close() == [], replies
                    raw.close()
                    raw = logged_in(b, {"application_name": f"x{seed}"})
                    break
                assert rows(replies) == [f"x{seed}:{n}:{k}".encode()], replies
                checked += 1
    finally:
        raw.close()
    return checked


@pytest.mark.timeout(55)
def test_chaos_of_clients_leaving_pipelining_and_servers_dying(pg, bouncer):
    """Thirty clients with their own application_name, pool of two, each a
    random life of queries, pipelined pairs and abrupt leaves, while
    servers are terminated: every answer is the asker's, and it settles."""
    from _util_pool import run_in_thread, terminate_backends
    b = start(bouncer, pg, default_pool_size=2)
    outcomes = [run_in_thread(_chaos_client, b, seed, 25) for seed in range(30)]
    for _ in range(3):
        time.sleep(0.3)
        terminate_backends(pg, "app")
    total = sum(o.get(45) for o in outcomes)
    assert total > 30 * 10, total
    assert_settled(b, pg, 2)


def _racer(b, name: str, rounds: int, seed: int) -> int:
    """Sends a query and, a random moment later, a second one: the second
    races the hand-off of a server to the first (queued) one."""
    rng = random.Random(seed)
    raw = logged_in(b, {"application_name": name})
    try:
        for n in range(rounds):
            raw.send(query_message(f"SELECT current_setting('application_name') || ':{n}a'"))
            delay = rng.choice((0, 0, 0.0005, 0.001, 0.003))
            if delay:
                time.sleep(delay)
            raw.send(query_message(f"SELECT current_setting('application_name') || ':{n}b'"))
            assert rows(reply(raw)) == [f"{name}:{n}a".encode()]
            assert rows(reply(raw)) == [f"{name}:{n}b".encode()]
    finally:
        raw.close()
    return rounds


@pytest.mark.timeout(55)
def test_second_query_races_the_hand_off(pg, bouncer):
    """Four clients with their own application_name share one server, each
    sending a query and a second one a moment later, over and over: the
    second races the hand-off (and the parameter sync) of the first. Every
    answer is in order and carries its own client's name."""
    from _util_pool import run_in_thread
    b = start(bouncer, pg)
    outcomes = [run_in_thread(_racer, b, f"r{i}", 150, i) for i in range(4)]
    assert [o.get(50) for o in outcomes] == [150] * 4
    assert_settled(b, pg, 1)


@pytest.mark.timeout(40)
def test_own_parameters_when_servers_are_reset_on_release(pg, bouncer):
    """server_reset_query_always: each server is DISCARDed before the next
    queued client gets it; every client still sees its own values (the
    pooler must know the reset put the server back to its defaults)."""
    b = start(bouncer, pg, server_reset_query_always=1, server_reset_query="DISCARD ALL")
    clients = own_clients(b, 8)
    a, _ = hold_transaction(b)
    try:
        for raw, _ in clients:
            raw.send(query_message(WHO))
        wait_until(lambda: waiting(b) == 8, timeout=10, message="all wait")
        a.commit()
        for raw, expected in clients:
            raw.sock.settimeout(10)
            assert rows(reply(raw)) == [expected]
        for raw, expected in reversed(clients):     # and again, in another order
            raw.send(query_message(WHO))
            assert rows(reply(raw)) == [expected]
        for raw, _ in clients:
            raw.close()
        assert_settled(b, pg, 1)
        assert_defaults_on_every_server(b, 1)
    finally:
        for raw, _ in clients:
            raw.close()
        close_quietly(a)
