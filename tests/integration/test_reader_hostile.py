"""Hostile clients and a bad network against the server reader as a libev
read callback (net/server_reader.py): whatever closes a client or its
server while a reply is only partly written must not write into that reply.

To put a reply exactly where a test wants it, the pooler reaches PostgreSQL
over its unix socket (no tcp_socket_buffer there: one recv takes what
PostgreSQL flushed at once) while the client's side is tiny
(tcp_socket_buffer, the client's SO_RCVBUF): a result of a few KB is read
whole from the server, ReadyForQuery included, and only part of it fits
the client's socket. A NOTICE is flushed by PostgreSQL at once: a chunk
that ends at a message boundary.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time

import pytest
from _util_pool import RawClient, errors_in, parse_error_fields, query_message
from fixtures.pooler import TARGET
from fixtures.ports import wait_until
from test_fatal_boundary import tls_upgrade
from test_red_team import data_values, finish

APP = ("app", "app_pw", "app")
ROW = 7000          # one value: the whole result fits one write of PostgreSQL's 8 KB buffer
TINY = {"pool_mode": "transaction", "auth_type": "md5", "tcp_socket_buffer": 1024}


def unix_databases(pg) -> dict:
    return {"app": {"host": str(pg.socket_dir), "port": pg.port, "dbname": "app"}}


def tiny_client(b, rcvbuf: int = 1024) -> RawClient:
    """A logged-in raw client whose receive window is a few KB (SO_RCVBUF before connect)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(20)
    sock.connect((b.host, b.port))
    return _logged_in(sock)


def unix_client(b) -> RawClient:
    """A logged-in raw client over the pooler's unix socket (no TCP window)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(str(b.workdir / f".s.PGSQL.{b.port}"))
    return _logged_in(sock)


def _logged_in(sock) -> RawClient:
    """A RawClient on a socket already connected to the pooler, logged in."""
    raw = RawClient.__new__(RawClient)
    raw.sock, raw.buf, raw.closed = sock, bytearray(), False
    assert raw.login(*APP)[-1][0] == b"Z"
    return raw


def read_all(raw: RawClient, seconds: float = 20) -> bytes:
    """Every byte until EOF (or ``seconds``)."""
    data = bytes(raw.buf)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            got = raw.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            break
        except socket.timeout:
            break
        if not got:
            break
        data += got
    return data


def split_messages(data: bytes):
    """The whole messages in ``data``, and the bytes after the last one."""
    out, pos = [], 0
    while len(data) - pos >= 5:
        length = int.from_bytes(data[pos + 1:pos + 5], "big")
        if len(data) - pos < 1 + length:
            break
        out.append((data[pos:pos + 1], data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out, data[pos:]


def value_of(row_body: bytes) -> bytes:
    size = int.from_bytes(row_body[2:6], "big")
    return row_body[6:6 + size]


@pytest.mark.timeout(60)
def test_idle_transaction_timeout_while_the_reply_is_still_being_written(pg, bouncer):
    """The reply that left the transaction idle was read whole from the
    server but the client has taken only part of it when
    idle_transaction_timeout fires: the client gets the rest of it, then the
    FATAL, as from PgBouncer 1.18 (the error used to land inside the DataRow)."""
    b = bouncer(databases=unix_databases(pg), pgbouncer={**TINY, "idle_transaction_timeout": 1})
    raw = tiny_client(b)
    try:
        raw.send(query_message("BEGIN"))
        assert raw.read_until(b"Z")[-1] == (b"Z", b"T")
        raw.send(query_message(f"SELECT repeat('x', {ROW})"))
        time.sleep(3.5)                   # not reading: the janitor fires meanwhile
        data = read_all(raw)
    finally:
        raw.close()
    messages, tail = split_messages(data)
    assert [t for t, _ in messages] == [b"T", b"D", b"C", b"Z", b"E"] and tail == b"", (messages[-2:], tail[:60])
    assert value_of(messages[1][1]) == b"x" * ROW
    error = errors_in(messages)[0]
    assert (error["S"], error["M"]) == ("FATAL", "idle transaction timeout"), error
    finish(b)


@pytest.mark.timeout(60)
@pytest.mark.geobouncer_only("PgBouncer 1.18 writes the suspend_timeout error mid-message")
def test_suspend_timeout_closes_a_server_mid_write_without_garbage(pg, bouncer):
    """SUSPEND's suspend_timeout closes a server whose NOTICE the client has
    taken only in part (the server's reader is killed mid-write): the client
    sees that NOTICE cut short and EOF, never an error written inside it."""
    b = bouncer(databases=unix_databases(pg), pgbouncer={**TINY, "suspend_timeout": 1})
    raw = tiny_client(b)
    try:
        raw.send(query_message(f"DO $$ BEGIN RAISE NOTICE '%', repeat('n', {ROW}); "
                               "PERFORM pg_sleep(4); END $$"))
        time.sleep(0.5)                   # the NOTICE is read, the client took part of it
        b.admin("SUSPEND")                # returns after suspend_timeout; RESUME as the console leaves
        data = read_all(raw)
    finally:
        raw.close()
    messages, tail = split_messages(data)
    assert [t for t, _ in messages] in ([], [b"N"], [b"N", b"E"]), messages[-2:]
    if messages:
        assert parse_error_fields(messages[0][1])["M"] == "n" * ROW
    else:
        # The NOTICE cut short: its own bytes only, no error inside it.
        assert tail[:1] == b"N" and b"suspend_timeout" not in tail, tail[-80:]
        assert set(tail[5:].split(b"\x00Mn", 1)[-1]) <= {ord("n")}, tail[-80:]
    finish(b)
    wait_until(lambda: not pg.psql("SELECT 1 FROM pg_stat_activity WHERE query LIKE 'DO $$%'"),
               timeout=10, message="the DO block's backend ended its sleep")


@pytest.mark.timeout(60)
def test_safe_shutdown_ends_from_the_read_callback(pg, bouncer):
    """SIGINT waits for the servers; the last one comes back from the read
    callback, in the hub (its COMMIT's reply), which then closes every client
    and server and stops: nothing there may block, and the process exits 0."""
    import signal
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5"})
    raw = tiny_client(b, rcvbuf=65536)
    other = tiny_client(b, rcvbuf=65536)
    try:
        raw.send(query_message("BEGIN; SELECT 1"))
        assert raw.read_until(b"Z")[-1] == (b"Z", b"T")
        other.send(query_message("SELECT 2"))
        assert other.read_until(b"Z")[-1] == (b"Z", b"I")
        b.signal(signal.SIGINT)
        time.sleep(0.5)
        assert b.is_running()
        raw.send(query_message("COMMIT"))
        replies = raw.read_until_close()
        assert [t for t, _ in replies][:2] == [b"C", b"Z"], replies
        assert b.wait_exit(15) == 0
    finally:
        raw.close()
        other.close()
    if TARGET == "geobouncer":
        text = b.log_text() + b.output_text()
        assert "Traceback" not in text and "internal error" not in text, text[-3000:]


class SlowLink:
    """A TCP hop between the pooler and PostgreSQL that takes the pooler's
    bytes slowly (a small receive window, read a KB at a time with a pause),
    as a far network does: a write of a few KB to the server does not
    complete at once. Threads, like fixtures/proxy.py."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)   # inherited by accept()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return
            far = socket.create_connection(self.target)
            self.socks += [near, far]
            threading.Thread(target=self._pump, args=(near, far, 0.01), daemon=True).start()
            threading.Thread(target=self._pump, args=(far, near, 0), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, pause: float) -> None:
        try:
            while True:
                data = src.recv(1024 if pause else 65536)
                if not data:
                    break
                dst.sendall(data)
                if pause:
                    time.sleep(pause)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        for sock in [self.listener, *self.socks]:
            try:
                sock.shutdown(socket.SHUT_RDWR)     # wakes a pump blocked in recv (close would not)
            except OSError:
                pass
            sock.close()


def pool_waiting(b) -> int:
    return int(next(r for r in b.admin("SHOW POOLS") if r.database == "app").cl_waiting)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [6000, 15000])
def test_queued_query_handed_from_the_read_callback_to_a_small_socket(pg, bouncer, size):
    """A queued query of up to 16 KB is written by the releaser itself, from
    the hub when a read callback releases the server; with tcp_socket_buffer
    small the server's socket does not take it at once: the query must still
    run, not end its client with "server conn crashed?"."""
    link = SlowLink(pg.port)
    b = bouncer(databases={"app": {"host": "127.0.0.1", "port": link.port, "dbname": "app"}},
                pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "default_pool_size": 1,
                           "tcp_socket_buffer": 1024})
    holder, queued = tiny_client(b, 65536), tiny_client(b, 65536)
    try:
        holder.send(query_message("BEGIN; SELECT 1"))
        assert holder.read_until(b"Z")[-1] == (b"Z", b"T")
        text = "q" * size
        queued.send(query_message(f"SELECT '{text}'"))
        wait_until(lambda: pool_waiting(b) == 1, timeout=10, message="the query waits for the server")
        holder.send(query_message("COMMIT"))
        assert holder.read_until(b"Z")[-1] == (b"Z", b"I")
        replies = queued.read_until(b"Z")
        assert errors_in(replies) == [], errors_in(replies)
        assert [value_of(body) for t, body in replies if t == b"D"] == [text.encode()]
    finally:
        holder.close()
        queued.close()
    try:
        finish(b)
    finally:
        link.close()


def tls_client(b) -> RawClient:
    """A logged-in raw client over TLS (the test CA is not checked)."""
    raw = RawClient(b.host, b.port, timeout=20)
    tls_upgrade(raw)
    assert raw.login(*APP)[-1][0] == b"Z"
    return raw


def read_slowly(raw: RawClient, stop: bytes, count: int, slow_bytes: int, rng: random.Random,
                pause: float = 0.02) -> list:
    """Messages up to the ``count``-th of type ``stop``, the first ``slow_bytes``
    read in small pieces, with a 2 ms pause before a ``pause`` share of them."""
    out, seen = [], 0
    while True:
        while len(raw.buf) >= 5:
            length = int.from_bytes(raw.buf[1:5], "big")
            if len(raw.buf) < 1 + length:
                break
            out.append((bytes(raw.buf[:1]), bytes(raw.buf[5:1 + length])))
            del raw.buf[:1 + length]
            if out[-1][0] == stop:
                count -= 1
                if not count:
                    assert not raw.buf, "bytes after the last reply"
                    return out
        size = rng.choice((1, 9, 700, 4096)) if seen < slow_bytes else 65536
        data = raw.sock.recv(size)
        assert data, f"EOF after {len(out)} messages"
        seen += len(data)
        raw.buf += data
        if seen < slow_bytes and rng.random() < pause:
            time.sleep(0.002)


BIG_ROWS = 3000     # 1.8 MB a result


def big_value(i: int) -> bytes:
    return (b"%06d" % i) * 100


@pytest.mark.timeout(90)
def test_pool_of_one_slow_pipelining_holder_and_queued_plain_and_tls_clients(pg, bouncer, tls_files):
    """One server; its holder pipelines a large SELECT, a COPY TO STDOUT and
    a small SELECT and reads them slowly, while plain and TLS clients queue
    behind it. The holder gets every byte in order, each queued client its
    own answer, on that one server, once the holder is done."""
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "default_pool_size": 1,
                           "tcp_socket_buffer": 4096, "client_tls_sslmode": "allow", "client_tls_key_file": tls_files.key("bouncer"),
                           "client_tls_cert_file": tls_files.cert("bouncer")})
    holder = tiny_client(b, 65536)
    queued = [tiny_client(b, 65536), tls_client(b), tiny_client(b, 65536), tls_client(b)]
    try:
        holder.send(query_message("SELECT pg_backend_pid()"))
        pid = value_of(holder.read_until(b"Z")[-3][1])
        gen = f"SELECT repeat(lpad(i::text, 6, '0'), 100) FROM generate_series(1, {BIG_ROWS}) AS i"
        holder.send(query_message(gen) + query_message(f"COPY ({gen}) TO STDOUT")
                    + query_message("SELECT 'end'"))
        time.sleep(0.3)
        for n, raw in enumerate(queued):
            raw.send(query_message(f"SELECT 'queued {n}', pg_backend_pid()"))
        wait_until(lambda: pool_waiting(b) == len(queued), timeout=10, message="all queued")
        started = time.monotonic()
        replies = read_slowly(holder, b"Z", 3, 1 << 20, random.Random(7))
        # tcp_socket_buffer set after connect() kept the server's window under
        # one loopback MSS: some 40 KB/s, this read took 90 s (PgBouncer: 0.1 s).
        assert time.monotonic() - started < 20
        kinds = [t for t, _ in replies]
        assert errors_in(replies) == []
        first = kinds.index(b"Z")
        rows = [value_of(body) for t, body in replies[:first] if t == b"D"]
        assert rows == [big_value(i) for i in range(1, BIG_ROWS + 1)]
        copied = [body for t, body in replies[first:] if t == b"d"]
        assert copied == [big_value(i) + b"\n" for i in range(1, BIG_ROWS + 1)]
        assert [value_of(body) for t, body in replies if t == b"D"][-1] == b"end"
        for n, raw in enumerate(queued):
            got = raw.read_until(b"Z")
            assert errors_in(got) == [], (n, errors_in(got))
            values = [data_values(body) for t, body in got if t == b"D"]
            assert values == [[f"queued {n}", pid.decode()]], (n, values)
            raw.send(query_message(f"SELECT 'again {n}'"))
            assert [value_of(body) for t, body in raw.read_until(b"Z") if t == b"D"] == [f"again {n}".encode()]
    finally:
        for raw in [holder, *queued]:
            raw.close()
    finish(b)


def assert_quiet(b) -> None:
    if TARGET == "geobouncer":
        text = b.log_text() + b.output_text()
        for bad in ("Traceback", "internal error", "Impossible to call blocking", "invalid fd"):
            assert bad not in text, text[-3000:]


@pytest.mark.timeout(60)
def test_notice_flood_to_a_client_that_reads_late(pg, bouncer):
    """Twenty thousand NOTICEs, each flushed by PostgreSQL on its own, to a
    client that reads nothing for a while and then slowly: its socket fills,
    the reader moves between the callback and a greenlet many times, and
    every notice arrives once, in order, then the command's end. A quick
    client is served meanwhile.

    The slow client comes over the pooler's unix socket. Over loopback TCP
    with 4 KB buffers on both ends, Linux can fall into a silly-window
    stall that no pooler write undoes: the client's window, rounded down
    to the largest segment it has seen (2035 bytes), stays under the
    sender's MSS (2048, half the largest window), so every segment waits
    for the persist timer (ss: rwnd_limited 99.7%, snd_wnd 2035, the
    client's receive queue empty) and 2 MB take minutes. PgBouncer 1.18
    stalls there too, some of the time."""
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "default_pool_size": 2,
                           "tcp_socket_buffer": 4096})
    raw = unix_client(b)
    try:
        count = 20000
        raw.send(query_message(f"DO $$ BEGIN FOR i IN 1..{count} LOOP RAISE NOTICE 'n%', i; END LOOP; END $$"))
        time.sleep(0.5)
        quick = tiny_client(b, 65536)
        quick.send(query_message("SELECT 'quick'"))
        assert [value_of(body) for t, body in quick.read_until(b"Z") if t == b"D"] == [b"quick"]
        quick.close()
        replies = read_slowly(raw, b"Z", 1, 1 << 20, random.Random(3), pause=0.1)
        notices = [parse_error_fields(body)["M"] for t, body in replies if t == b"N"]
        assert notices == [f"n{i}" for i in range(1, count + 1)]
        assert [t for t, _ in replies][-2:] == [b"C", b"Z"]
        raw.send(query_message("SELECT 'next'"))
        assert [value_of(body) for t, body in raw.read_until(b"Z") if t == b"D"] == [b"next"]
    finally:
        raw.close()
    assert_quiet(b)
    finish(b)


@pytest.mark.timeout(60)
@pytest.mark.geobouncer_only("PgBouncer 1.18 writes 'server conn crashed?' inside the DataRow cut short")
def test_server_terminated_mid_result_to_a_slow_client(pg, bouncer):
    """pg_terminate_backend while a large result is being written to a slow
    client: PostgreSQL, blocked inside a DataRow, exits without its FATAL,
    so the client's stream ends inside that row: whole rows, that row's own
    bytes, EOF; never an error written inside it. The pool recovers."""
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "tcp_socket_buffer": 4096})
    raw = tiny_client(b, 4096)
    try:
        raw.send(query_message("SELECT pg_backend_pid()"))
        pid = int(value_of(raw.read_until(b"Z")[-3][1]))
        raw.send(query_message("SELECT repeat(lpad(i::text, 6, '0'), 100) FROM generate_series(1, 200000) AS i"))
        time.sleep(0.5)
        pg.psql(f"SELECT pg_terminate_backend({pid})")
        time.sleep(0.3)
        messages, tail = split_messages(read_all(raw, 30))
    finally:
        raw.close()
    kinds = [t for t, _ in messages]
    rows = kinds.index(b"E") if b"E" in kinds else len(kinds)
    assert kinds[0] == b"T" and set(kinds[1:rows]) == {b"D"} and set(kinds[rows:]) <= {b"E"}, kinds[-4:]
    for i, (_, body) in enumerate(messages[1:rows], 1):
        assert value_of(body) == big_value(i), i
    if tail:        # the row cut short: its own bytes only
        assert rows == len(kinds), kinds[-3:]
        expected = b"D" + (610).to_bytes(4, "big") + b"\x00\x01" + (600).to_bytes(4, "big") + big_value(rows)
        assert tail == expected[:len(tail)], tail[-80:]
    else:           # PostgreSQL's FATAL made it: then the pooler's may follow
        assert "terminating connection" in errors_in(messages)[0]["M"]
    assert_quiet(b)
    finish(b)


@pytest.mark.timeout(60)
def test_reconnect_and_janitor_closes_while_a_slow_reader_streams(pg, bouncer):
    """RECONNECT, server_idle_timeout and server_lifetime close servers while
    one streams a large result to a slow reader (its reader moving between the
    callback and a greenlet) and quick clients come and go: the result is
    whole, its server is retired after it, and the process lives (a watcher on
    a closed descriptor aborts it)."""
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "default_pool_size": 4,
                           "tcp_socket_buffer": 4096, "server_idle_timeout": 1, "server_lifetime": 2})
    raw = tiny_client(b, 4096)
    try:
        gen = f"SELECT repeat(lpad(i::text, 6, '0'), 100) FROM generate_series(1, {BIG_ROWS}) AS i"
        raw.send(query_message(gen))
        for i in range(6):
            quick = tiny_client(b, 65536)
            quick.send(query_message(f"SELECT {i}"))
            assert [value_of(body) for t, body in quick.read_until(b"Z") if t == b"D"] == [str(i).encode()]
            quick.close()
            if i % 2:
                b.admin("RECONNECT")
            time.sleep(0.4)
        replies = read_slowly(raw, b"Z", 1, 300000, random.Random(5))
        assert errors_in(replies) == []
        assert [value_of(body) for t, body in replies if t == b"D"] == [big_value(i) for i in range(1, BIG_ROWS + 1)]
        raw.send(query_message("SELECT 'after'"))
        assert [value_of(body) for t, body in raw.read_until(b"Z") if t == b"D"] == [b"after"]
    finally:
        raw.close()
    assert b.is_running()
    assert_quiet(b)
    finish(b)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rst", [False, True], ids=["close", "reset"])
@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_client_leaves_with_its_last_reply_unwritten(pg, bouncer, mode, rst):
    """server_reset_query (always, in transaction pooling) and a pool of one: a client
    leaves while the pooler still writes its last reply (read whole from the
    server, ReadyForQuery included, the client's socket full). The server's
    reset runs while that write is being abandoned; the next client gets a
    clean session on a working server and nothing of the first one's reply."""
    b = bouncer(databases=unix_databases(pg),
                pgbouncer={**TINY, "pool_mode": mode, "default_pool_size": 1,
                           "server_reset_query": "DISCARD ALL", "server_reset_query_always": 1})
    raw = tiny_client(b)
    raw.send(query_message("CREATE TEMP TABLE mine(x int); SET SESSION work_mem = '1234kB'"))
    assert errors_in(raw.read_until(b"Z")) == []
    raw.send(query_message(f"SELECT repeat('x', {ROW})"))
    time.sleep(0.3)                       # read whole by the pooler, written in part
    if rst:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()
    for n in range(3):
        nxt = tiny_client(b, 65536)
        try:
            nxt.send(query_message("SELECT current_setting('work_mem'), to_regclass('pg_temp.mine')"))
            replies = nxt.read_until(b"Z")
            assert errors_in(replies) == [], errors_in(replies)
            assert [data_values(body) for t, body in replies if t == b"D"] == [["4MB", None]], (n, replies)
        finally:
            nxt.close()
    assert_quiet(b)
    finish(b)
