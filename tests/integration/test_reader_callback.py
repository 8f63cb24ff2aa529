"""The server reader as a libev read callback (net/server.py): replies are
written to the client from the hub without blocking, and what the client's
socket does not take at once goes to a greenlet that holds the client's
write lock until it is written. Slow readers, readers that stop and leave,
and readers mixed with quick clients: every byte arrives in order, nobody
else waits on them, and the pooler stays consistent. Real PostgreSQL, real
geobouncer; PgBouncer 1.18 behaves the same (GEOBOUNCER_TEST_TARGET=pgbouncer).
"""

from __future__ import annotations

import hashlib
import random
import socket
import threading
import time

import pytest
from _util_pool import another_client_gets, errors_in, pool_row, query_message
from fixtures.pooler import TARGET
from fixtures.ports import wait_until
from test_queued_queries import logged_in, reply, rows

ROWS = 20000
BIG = f"SELECT repeat(md5(i::text), 20) FROM generate_series(1, {ROWS}) AS i"


def expected_row(i: int) -> bytes:
    return hashlib.md5(str(i).encode()).hexdigest().encode() * 20


def read_result_slowly(raw, rng: random.Random, slow_bytes: int, stop_after: int | None = None):
    """Read one query's replies from ``raw`` in small pieces with pauses for
    the first ``slow_bytes``; returns the messages, or None once
    ``stop_after`` bytes were read (the caller then leaves)."""
    buf = bytearray()
    messages = []
    seen = 0
    while True:
        size = rng.choice((1, 7, 512, 4096, 16384)) if seen < slow_bytes else 65536
        data = raw.sock.recv(size)
        assert data, "the pooler closed the connection mid-result"
        seen += len(data)
        buf += data
        if seen < slow_bytes and rng.random() < 0.05:
            time.sleep(0.002)
        if stop_after is not None and seen >= stop_after:
            return None
        pos = 0
        while len(buf) - pos >= 5:
            length = int.from_bytes(buf[pos + 1:pos + 5], "big")
            if len(buf) - pos < 1 + length:
                break
            messages.append((bytes(buf[pos:pos + 1]), bytes(buf[pos + 5:pos + 1 + length])))
            pos += 1 + length
        del buf[:pos]
        if messages and messages[-1][0] == b"Z":
            assert not buf, "bytes after the ReadyForQuery"
            return messages


def assert_whole_result(messages) -> None:
    assert errors_in(messages) == []
    got = rows(messages)
    assert len(got) == ROWS
    for i, value in enumerate(got, 1):
        if value != expected_row(i):
            raise AssertionError(f"row {i} differs: {value[:40]!r}...")
    assert messages[-1] == (b"Z", b"I")


def start(bouncer, pool_mode: str, pool_size: int):
    return bouncer(pgbouncer={"pool_mode": pool_mode, "auth_type": "md5", "default_pool_size": pool_size})


def assert_quiet(b) -> None:
    if TARGET == "geobouncer":
        text = b.log_text()
        assert "Traceback" not in text and "internal error" not in text, text[-3000:]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_slow_reader_gets_every_byte_while_others_are_served(pg, bouncer, pool_mode):
    """A client reads a 13 MB result a few bytes at a time: every row arrives
    whole and in order, quick clients are served meanwhile, and the same
    connection's next query gets its own answer."""
    b = start(bouncer, pool_mode, 2)
    raw = logged_in(b)
    try:
        raw.sock.settimeout(30)
        raw.send(query_message(BIG))
        time.sleep(0.3)                        # the server has filled the client's socket by now
        for i in range(20):
            assert another_client_gets(b, f"SELECT {i}, 'quick'") == (i, "quick")
        assert_whole_result(read_result_slowly(raw, random.Random(1), 3 << 20))
        raw.send(query_message("SELECT 'after'"))
        assert rows(reply(raw)) == [b"after"]
    finally:
        raw.close()
    if pool_mode == "transaction":
        wait_until(lambda: int(pool_row(b).sv_active) == 0, timeout=10, message="no server left active")
    assert another_client_gets(b, "SELECT 'served'") == ("served",)
    assert_quiet(b)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_slow_readers_and_leavers_mixed(pg, bouncer, pool_mode):
    """Six clients read big results slowly and check every row; six others
    stop reading part-way and leave (some with a RST); quick clients run
    throughout. Every slow reader's result is whole, every quick client is
    answered, and afterwards every server PostgreSQL runs is clean."""
    b = start(bouncer, pool_mode, 12)
    failures: list = []
    done = threading.Event()

    def slow_reader(seed: int) -> None:
        try:
            raw = logged_in(b)
            raw.sock.settimeout(60)
            try:
                for _ in range(2):
                    raw.send(query_message(BIG))
                    assert_whole_result(read_result_slowly(raw, random.Random(seed), 1 << 20))
            finally:
                raw.close()
        except BaseException as exc:          # reported below
            failures.append(("slow", seed, repr(exc)))

    def leaver(seed: int) -> None:
        rng = random.Random(seed)
        try:
            raw = logged_in(b)
            raw.sock.settimeout(60)
            raw.send(query_message(BIG))
            read_result_slowly(raw, rng, 1 << 20, stop_after=rng.randrange(1, 4 << 20))
            if seed % 2:
                raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            raw.close()
        except BaseException as exc:
            failures.append(("leaver", seed, repr(exc)))

    def quick() -> None:
        i = 0
        while not done.is_set() and i < 200:
            try:
                assert another_client_gets(b, f"SELECT {i}") == (i,)
            except BaseException as exc:
                failures.append(("quick", i, repr(exc)))
                return
            i += 1

    threads = [threading.Thread(target=slow_reader, args=(s,)) for s in range(6)]
    threads += [threading.Thread(target=leaver, args=(100 + s,)) for s in range(6)]
    quick_thread = threading.Thread(target=quick)
    for t in threads + [quick_thread]:
        t.start()
    for t in threads:
        t.join(100)
    done.set()
    quick_thread.join(30)
    assert failures == []
    assert not any(t.is_alive() for t in threads)
    if pool_mode == "transaction":
        wait_until(lambda: int(pool_row(b).sv_active) == 0, timeout=15, message="no server left active")
    # No server was given back mid-result: each answers a fresh query at once.
    conns = [b.connect() for _ in range(4)]
    try:
        for conn in conns:
            with conn.cursor() as cur:
                cur.execute("SELECT 'clean', 1")
                assert cur.fetchall() == [("clean", 1)]
    finally:
        for conn in conns:
            conn.close()
    assert_quiet(b)
