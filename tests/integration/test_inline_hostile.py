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

import os
import re
import subprocess
import threading
import time

import pytest
from _util_pool import close_quietly, errors_in, message, query_message
from fixtures.pooler import TARGET, pooler_sqlstate
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
    """A parked client whose server is busy (pg_sleep) pipelines 16 KB
    Queries, one per packet, each read alone by the hub's callback: the
    server reads none of them meanwhile, and the socket to it fills. The
    pooler must stop reading the client (as PgBouncer does), not end it
    with "server conn crashed?" because a write from the hub did not fit."""
    b = start(bouncer, pg, default_pool_size=2)
    raw = logged_in(b)
    count = 400
    padded = query_message("SELECT 1 /*" + "x" * 16000 + "*/")
    failed = []

    def pipeline() -> None:
        for _ in range(count):
            if not raw.send(padded):
                failed.append("the pooler closed the connection")
                return
            time.sleep(0.004)     # one Query per packet: each read by the hub's callback alone

    try:
        parked(b, raw)
        raw.send(query_message("SELECT pg_sleep(3)"))
        sender = threading.Thread(target=pipeline)
        sender.start()
        raw.sock.settimeout(20)
        replies = []
        for _ in range(count + 1):
            got = reply(raw)
            replies += got
            assert errors_in(got) == [], got
        sender.join(20)
        assert not failed
        assert rows(replies)[1:] == [b"1"] * count
        assert_settled(b, pg, 2)
    finally:
        raw.close()


# --- hand-offs that need the parked client's greenlet ---------------------------------

def settings_of(raw, sql: str) -> list[bytes]:
    raw.send(query_message(sql))
    replies = reply(raw)
    assert errors_in(replies) == [], replies
    return rows(replies)


@pytest.mark.timeout(40)
def test_queued_parked_clients_with_their_own_parameters_are_woken(pg, bouncer):
    """Parked clients, each with its own application_name, TimeZone or a
    remembered SET, queue behind a held pool of one: the server released
    needs a parameter sync for each, which only its greenlet can do. Every
    one must be woken and see its own settings."""
    b = start(bouncer, pg)
    clients = []
    try:
        for i in range(6):
            extra = {"application_name": f"app{i}"} if i % 3 == 0 else \
                {"TimeZone": f"Etc/GMT+{i}"} if i % 3 == 1 else None
            raw = logged_in(b, extra)
            if i % 3 == 2 and TARGET == "geobouncer":      # PgBouncer 1.18 does not replay SETs
                raw.send(query_message(f"SET statement_timeout = '{i + 10}s'"))
                assert errors_in(reply(raw)) == []
            parked(b, raw)
            clients.append(raw)
        a, _ = hold_transaction(b)
        sql = "SELECT current_setting('application_name') || '|' || current_setting('TimeZone')" \
              " || '|' || current_setting('statement_timeout')"
        for raw in clients:
            raw.send(query_message(sql))
        wait_until(lambda: waiting(b) == len(clients), timeout=10, message="all wait")
        a.commit()
        for i, raw in enumerate(clients):
            raw.sock.settimeout(10)
            (got,) = settings_of_reply(raw)
            name, zone, timeout = got.decode().split("|")
            if i % 3 == 0:
                assert name == f"app{i}", got
            elif i % 3 == 1:
                assert zone == f"Etc/GMT+{i}", got
            elif TARGET == "geobouncer":
                assert timeout == f"{i + 10}s", got
        assert_settled(b, pg, 1)
    finally:
        for raw in clients:
            raw.close()


def settings_of_reply(raw) -> list[bytes]:
    replies = reply(raw)
    assert errors_in(replies) == [], replies
    return rows(replies)


@pytest.mark.timeout(40)
def test_parked_queued_client_gets_a_new_server_when_the_holder_dies(pg, bouncer):
    """The only server is held and then terminated: the freed slot needs a
    new login, done by the parked, queued client's greenlet."""
    b = start(bouncer, pg)
    raw = logged_in(b)
    try:
        parked(b, raw)
        a, pid = hold_transaction(b)
        raw.send(query_message("SELECT pg_backend_pid()"))
        wait_until(lambda: waiting(b) == 1, timeout=10, message="the query waits")
        pg.psql(f"SELECT pg_terminate_backend({pid})")
        raw.sock.settimeout(10)
        replies = reply(raw)
        assert errors_in(replies) == [] and rows(replies) and rows(replies) != [str(pid).encode()], replies
        close_quietly(a)
        assert_settled(b, pg, 1)
    finally:
        raw.close()


# --- order of requests across park boundaries ------------------------------------------

@pytest.mark.timeout(40)
def test_requests_keep_their_order_while_queued_and_split(pg, bouncer):
    """Parked and queued: a second Query in its own packet, a third split at
    every byte, then an unnamed extended batch; all answered in order."""
    b = start(bouncer, pg)
    raw = logged_in(b)
    try:
        parked(b, raw)
        a, _ = hold_transaction(b)
        raw.send(query_message("SELECT 'one'"))
        wait_until(lambda: waiting(b) == 1, timeout=10, message="the first query waits")
        raw.send(query_message("SELECT 'two'"))
        for byte in query_message("SELECT 'three'"):
            raw.send(bytes([byte]))
            time.sleep(0.002)
        raw.send(unnamed_batch("SELECT 'four'"))
        time.sleep(0.2)
        a.commit()
        raw.sock.settimeout(10)
        got = [rows(reply(raw)) for _ in range(4)]
        assert got == [[b"one"], [b"two"], [b"three"], [b"four"]], got
        assert_settled(b, pg, 1)
    finally:
        raw.close()


def unnamed_batch(sql: str) -> bytes:
    return (message(b"P", b"\x00" + sql.encode() + b"\x00\x00\x00")
            + message(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
            + message(b"E", b"\x00\x00\x00\x00\x00")
            + message(b"S"))


@pytest.mark.timeout(40)
def test_header_split_at_every_byte_while_parked(pg, bouncer):
    """Every request after parking arrives a byte at a time, with the pool
    free and then held: each answered once, in order."""
    b = start(bouncer, pg)
    raw = logged_in(b)
    try:
        parked(b, raw)
        for i in range(3):
            for byte in query_message(f"SELECT {i}"):
                raw.send(bytes([byte]))
                time.sleep(0.001)
            assert rows(reply(raw)) == [str(i).encode()]
        for byte in unnamed_batch("SELECT 'x'"):
            raw.send(bytes([byte]))
        replies = reply(raw)
        assert rows(replies) == [b"x"] and errors_in(replies) == [], replies
        assert_settled(b, pg, 1)
    finally:
        raw.close()


@pytest.mark.timeout(40)
@pytest.mark.parametrize("linked", [False, True])
def test_query_and_terminate_in_one_packet_while_parked(pg, bouncer, linked):
    """Query + Terminate together after parking (inside a transaction, or
    not): the client goes, its server is not leaked."""
    b = start(bouncer, pg)
    raw = logged_in(b)
    try:
        parked(b, raw)
        if linked:
            parked(b, raw, "BEGIN")
        raw.send(query_message("SELECT 'last'") + message(b"X"))
        raw.sock.settimeout(10)
        raw.read_until_close()
        assert_settled(b, pg, 1)
    finally:
        raw.close()


# --- garbage after parking: FATAL 08P01, as before ----------------------------------------

GARBAGE = {
    "startup": b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
    "unknown-type": message(b"!", b"x"),
    "short-length": b"Q\x00\x00\x00\x02",
    # within max_packet_size: streamed to PostgreSQL, which refuses it ("server conn crashed?")
    "huge-length": b"Q\x7f\xff\xff\xff" + b"SELECT 1\x00",
    "password": message(b"p", b"secret\x00"),
}


@pytest.mark.timeout(40)
@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_after_parking_is_fatal_08p01(pg, bouncer, kind):
    b = start(bouncer, pg)
    raw = logged_in(b)
    try:
        parked(b, raw)
        raw.send(GARBAGE[kind])
        raw.sock.settimeout(10)
        replies = raw.read_until_close()
        errors = errors_in(replies)
        assert [(e["S"], e["C"]) for e in errors] == [("FATAL", "08P01")], replies
        assert_settled(b, pg, 1)
    finally:
        raw.close()


@pytest.mark.timeout(40)
def test_disable_pqexec_after_parking_with_an_extended_batch(pg, bouncer):
    """disable_pqexec: parked after an unnamed extended batch, a
    multi-statement Query is still a protocol violation."""
    b = start(bouncer, pg, disable_pqexec=1)
    raw = logged_in(b)
    try:
        raw.send(unnamed_batch("SELECT 1"))
        assert errors_in(reply(raw)) == []
        raw.send(query_message("SELECT 1; SELECT 2"))
        raw.sock.settimeout(10)
        replies = raw.read_until_close()
        assert [(e["S"], e["C"]) for e in errors_in(replies)] == [("FATAL", "08P01")], replies
        # (the console takes no simple Query either: assert_settled cannot ask it)
        fresh = logged_in(b)
        fresh.send(unnamed_batch("SELECT 'fresh'"))
        assert rows(reply(fresh)) == [b"fresh"]
        fresh.close()
        assert_quiet(b)
    finally:
        raw.close()


def assert_quiet(b) -> None:
    if TARGET == "geobouncer":
        text = b.log_text()
        assert "Traceback" not in text and "internal error" not in text, text[-3000:]


@pytest.mark.timeout(40)
def test_max_packet_size_after_parking(pg, bouncer):
    b = start(bouncer, pg, max_packet_size=4096)
    raw = logged_in(b)
    try:
        parked(b, raw)
        raw.send(query_message("SELECT 1 /*" + "x" * 6000 + "*/"))
        raw.sock.settimeout(10)
        replies = raw.read_until_close()
        assert [(e["S"], e["C"]) for e in errors_in(replies)] == [("FATAL", "08P01")], replies
        assert_settled(b, pg, 1)
    finally:
        raw.close()


# --- timeouts and admin commands while parked -------------------------------------------

@pytest.mark.timeout(40)
def test_query_wait_timeout_of_a_parked_queued_client(pg, bouncer):
    b = start(bouncer, pg, query_wait_timeout=1)
    raw = logged_in(b)
    try:
        parked(b, raw)
        a, _ = hold_transaction(b)
        raw.send(query_message("SELECT 'never'"))
        raw.sock.settimeout(10)
        started = time.monotonic()
        replies = raw.read_until_close()
        assert [(e["S"], e["C"], e["M"]) for e in errors_in(replies)] == \
            [("FATAL", "08P01", "query_wait_timeout")], replies
        assert time.monotonic() - started < 5
        a.commit()
        assert_settled(b, pg, 1)
        close_quietly(a)
    finally:
        raw.close()


@pytest.mark.timeout(40)
def test_idle_transaction_timeout_of_a_parked_client(pg, bouncer):
    """BEGIN and one query from the hub, then idle: the timeout ends the
    client and its server."""
    b = start(bouncer, pg, idle_transaction_timeout=1)
    raw = logged_in(b)
    try:
        parked(b, raw)
        parked(b, raw, "BEGIN")
        parked(b, raw, "SELECT 'in tx'")
        raw.sock.settimeout(10)
        replies = raw.read_until_close()
        expected = [("FATAL", pooler_sqlstate("25P03"))]
        assert [(e["S"], e["C"]) for e in errors_in(replies)] == expected, replies
        assert_settled(b, pg, 1)
    finally:
        raw.close()


@pytest.mark.timeout(40)
def test_client_idle_timeout_of_a_parked_client(pg, bouncer):
    b = start(bouncer, pg, client_idle_timeout=1)
    raw = logged_in(b)
    try:
        parked(b, raw)
        raw.sock.settimeout(10)
        replies = raw.read_until_close()
        assert [(e["S"], e["C"], e["M"]) for e in errors_in(replies)] == \
            [("FATAL", "08P01", "client_idle_timeout")], replies
        assert_settled(b, pg, 1)
    finally:
        raw.close()


@pytest.mark.timeout(40)
def test_statement_pooling_begin_from_the_hub_is_fatal_and_nothing_follows(pg, bouncer):
    """Statement pooling: a BEGIN served from the hub ends the client; a
    query it sends after the FATAL reaches no server (nextval is not
    transactional, so a forwarded one would show)."""
    b = start(bouncer, pg, pool_mode="statement")
    pg.psql("DROP SEQUENCE IF EXISTS inline_hostile_seq")
    pg.psql("CREATE SEQUENCE inline_hostile_seq")
    pg.psql("GRANT USAGE, SELECT, UPDATE ON SEQUENCE inline_hostile_seq TO app")
    raw = logged_in(b)
    try:
        parked(b, raw)
        raw.send(query_message("BEGIN"))
        raw.sock.settimeout(10)
        first = raw.read_until(b"E")
        raw.send(query_message("SELECT nextval('inline_hostile_seq')"))
        replies = first + raw.read_until_close()
        assert [(e["S"], e["C"]) for e in errors_in(replies)] == [("FATAL", "08P01")], replies
        assert not rows(replies), replies
        assert pg.psql("SELECT last_value, is_called FROM inline_hostile_seq") == [(1, False)]
        assert_settled(b, pg, 1)
    finally:
        raw.close()


_PAUSE_APP = pytest.param("PAUSE app", marks=pytest.mark.geobouncer_only(
    "PgBouncer 1.18 leaves the clients queued during PAUSE app waiting after RESUME app"))


@pytest.mark.timeout(40)
@pytest.mark.parametrize("command", ["KILL app", "RECONNECT app", _PAUSE_APP])
def test_admin_commands_with_parked_and_queued_clients(pg, bouncer, command):
    """Parked clients, some queued behind a held server, some in a
    transaction of their own (pool of 3): KILL ends them all; RECONNECT and
    PAUSE/RESUME let every one finish."""
    b = start(bouncer, pg, default_pool_size=3)
    idle = [logged_in(b) for _ in range(4)]
    in_tx = logged_in(b)
    admin = b.connect("pgbouncer", "postgres", autocommit=True)
    try:
        for raw in idle:
            parked(b, raw)
        parked(b, in_tx, "BEGIN")
        a, _ = hold_transaction(b)
        c, _ = hold_transaction(b)
        for i, raw in enumerate(idle):
            raw.send(query_message(f"SELECT {i}"))
        wait_until(lambda: waiting(b) == 4, timeout=10, message="four wait")
        if command == "KILL app":
            admin.cursor().execute(command)
            for raw in idle + [in_tx]:
                raw.sock.settimeout(10)
                replies = raw.read_until_close()
                got = [(e["S"], e["M"]) for e in errors_in(replies)]
                assert got == [("FATAL", "database removed")], replies
            admin.cursor().execute("RESUME app")
        else:
            admin.cursor().execute(command if command != "PAUSE app" else "RECONNECT app")
            parked(b, in_tx, "SELECT 'in tx'")
            parked(b, in_tx, "COMMIT")
            a.commit()
            c.commit()
            for i, raw in enumerate(idle):
                raw.sock.settimeout(10)
                assert rows(reply(raw)) == [str(i).encode()]
            if command == "PAUSE app":
                admin.cursor().execute("PAUSE app")
                for i, raw in enumerate(idle):
                    raw.send(query_message(f"SELECT {i} + 10"))
                time.sleep(0.3)
                assert waiting(b) == 4
                admin.cursor().execute("RESUME app")
                for i, raw in enumerate(idle):
                    assert rows(reply(raw)) == [str(i + 10).encode()]
        assert_settled(b, pg, 3)
    finally:
        for raw in idle + [in_tx]:
            raw.close()
        close_quietly(a, c, admin)


# --- checks and retirements the hub leaves to the greenlet ----------------------------------

@pytest.mark.timeout(40)
@pytest.mark.parametrize("settings", [{"server_check_query": "SELECT 1", "server_check_delay": 0},
                                      {"server_lifetime": 1}])
def test_checks_and_retirements_with_parked_clients(pg, bouncer, settings):
    """Every checkout from the hub finds a server to check (delay 0) or to
    retire (lifetime 1 s): put back for the greenlet (Pool.untake), which
    checks or replaces it; every query answered, the pool counted right."""
    b = start(bouncer, pg, default_pool_size=2, **settings)
    clients = [logged_in(b) for _ in range(4)]
    try:
        for raw in clients:
            parked(b, raw)
        deadline = time.monotonic() + 1.5
        n = 0
        while time.monotonic() < deadline:
            for raw in clients:
                raw.send(query_message(f"SELECT {n}"))
            for raw in clients:
                assert rows(reply(raw)) == [str(n).encode()]
            n += 1
            time.sleep(0.05)
        assert_settled(b, pg, 2)
    finally:
        for raw in clients:
            raw.close()


# --- drivers and pgbench with a tiny pool ------------------------------------------------------

def start_pgbench(b, tmp_path, name: str, mode: str, clients: int, seconds: int, body: str, *extra: str):
    """pgbench with a custom script that fails (division by zero) whenever
    the session does not see its own application_name (PGAPPNAME)."""
    script = tmp_path / f"{name}.sql"
    script.write_text(body.format(check=f"SELECT 1/(current_setting('application_name') = '{name}')::int;"))
    cmd = ["pgbench", "-n", "-c", str(clients), "-j", "2", "-T", str(seconds), "-M", mode, "-f", str(script),
           "-h", b.host, "-p", str(b.port), "-U", "app", *extra, "app"]
    env = {**os.environ, "PGPASSWORD": "app_pw", "PGAPPNAME": name}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.timeout(60)
def test_pgbench_modes_with_their_own_parameters_through_a_pool_of_two(pg, bouncer, tmp_path):
    """pgbench -M simple, extended and prepared (one reconnecting for every
    transaction, one in explicit transactions) at once, 23 clients on 2
    servers, each kind with its own application_name: every hand-off
    between them needs a parameter sync. No failed transaction, and the
    pooler is settled afterwards."""
    b = start(bouncer, pg, default_pool_size=2, max_client_conn=100)
    plain = "{check}\nSELECT :client_id;\n"
    in_tx = "BEGIN;\n{check}\nSELECT :client_id;\nEND;\n"
    benches = [start_pgbench(b, tmp_path, "bsimple", "simple", 8, 3, plain),
               start_pgbench(b, tmp_path, "bext", "extended", 8, 3, plain),
               start_pgbench(b, tmp_path, "bconn", "simple", 3, 3, plain, "-C")]
    if TARGET == "geobouncer":      # PgBouncer 1.18 keeps no prepared statements
        benches.append(start_pgbench(b, tmp_path, "bprep", "prepared", 4, 3, in_tx))
    outs = [proc.communicate(timeout=40)[0] for proc in benches]
    for proc, out in zip(benches, outs):
        assert proc.returncode == 0, out
        done = re.search(r"^number of transactions actually processed: (\d+)$", out, re.MULTILINE)
        assert done and int(done.group(1)) > 0, out
        failed = re.search(r"^number of failed transactions: (\d+)", out, re.MULTILINE)
        assert failed is None or failed.group(1) == "0", out
    assert_settled(b, pg, 2)


@pytest.mark.timeout(60)
def test_pgbench_through_reconnect_pause_resume_and_reload(pg, bouncer, tmp_path):
    """Parked and queued pgbench clients (simple and extended) while the
    console reconnects, pauses and resumes, and RELOAD resizes the pool:
    none of these may fail a transaction or leave a client never woken."""
    b = start(bouncer, pg, default_pool_size=2, max_client_conn=100)
    plain = "{check}\nSELECT :client_id;\n"
    benches = [start_pgbench(b, tmp_path, "rsimple", "simple", 8, 3, plain),
               start_pgbench(b, tmp_path, "rext", "extended", 8, 3, plain)]
    admin = b.connect("pgbouncer", "postgres", autocommit=True)
    try:
        time.sleep(0.5)
        for size in (3, 1, 2):
            with admin.cursor() as cur:
                cur.execute("RECONNECT app")
                time.sleep(0.2)
                cur.execute("PAUSE app")
                time.sleep(0.2)
                cur.execute("RESUME app")
            b.rewrite(pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "default_pool_size": size,
                                 "max_client_conn": 100})
            time.sleep(0.3)
        outs = [proc.communicate(timeout=40)[0] for proc in benches]
    finally:
        close_quietly(admin)
        for proc in benches:
            if proc.poll() is None:
                proc.kill()
    for proc, out in zip(benches, outs):
        assert proc.returncode == 0, out
        failed = re.search(r"^number of failed transactions: (\d+)", out, re.MULTILINE)
        assert failed is None or failed.group(1) == "0", out
    assert_settled(b, pg, 2)


@pytest.mark.timeout(60)
def test_drivers_mixing_transactions_and_autocommit_on_a_pool_of_two(pg, bouncer):
    """psycopg2, psycopg 3 (unnamed extended statements, served from the
    hub) and asyncpg (no statement cache: unnamed too), 12 clients on two
    servers, alternating autocommit statements and transactions that must
    stay on one server (a transaction-local setting read back), each
    checking its own application_name."""
    import asyncio

    import asyncpg
    import psycopg
    import psycopg2

    b = start(bouncer, pg, default_pool_size=2, max_client_conn=100)
    rounds = 25
    check = "SELECT current_setting('application_name'), current_setting('my.v', true)"

    def psycopg2_client(i: int) -> None:
        conn = psycopg2.connect(b.dsn(application_name=f"p2-{i}"))
        try:
            for n in range(rounds):
                conn.autocommit = n % 2 == 0
                with conn.cursor() as cur:
                    if conn.autocommit:
                        cur.execute(check)
                        name, value = cur.fetchone()
                        assert name == f"p2-{i}" and value in (None, ""), (name, value)
                        continue
                    cur.execute("SELECT set_config('my.v', %s, true)", (f"{i}-{n}",))
                    cur.execute(check)
                    assert cur.fetchone() == (f"p2-{i}", f"{i}-{n}")
                conn.commit()
        finally:
            conn.close()

    def psycopg3_client(i: int) -> None:
        with psycopg.connect(b.dsn(), prepare_threshold=None, autocommit=True,
                             application_name=f"p3-{i}") as conn:
            for n in range(rounds):
                if n % 2:
                    with conn.transaction():
                        conn.execute("SELECT set_config('my.v', %s, true)", (f"{i}-{n}",))
                        assert conn.execute(check).fetchone() == (f"p3-{i}", f"{i}-{n}")
                else:
                    name, value = conn.execute(check).fetchone()
                    assert name == f"p3-{i}" and value in (None, ""), (name, value)

    async def asyncpg_clients() -> None:
        async def one(i: int) -> None:
            conn = await asyncpg.connect(host=b.host, port=b.port, user="app", password="app_pw",
                                         database="app", statement_cache_size=0,
                                         server_settings={"application_name": f"ap-{i}"})
            try:
                for n in range(rounds):
                    if n % 2:
                        async with conn.transaction():
                            await conn.execute(f"SELECT set_config('my.v', '{i}-{n}', true)")
                            assert tuple(await conn.fetchrow(check)) == (f"ap-{i}", f"{i}-{n}")
                    else:
                        name, value = await conn.fetchrow(check)
                        assert name == f"ap-{i}" and value in (None, ""), (name, value)
            finally:
                await conn.close()
        await asyncio.gather(*(one(i) for i in range(4)))

    errors = []

    def guarded(fn, *args):
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{fn.__name__}{args}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=guarded, args=(psycopg2_client, i)) for i in range(4)]
    threads += [threading.Thread(target=guarded, args=(psycopg3_client, i)) for i in range(4)]
    threads.append(threading.Thread(target=guarded, args=(lambda: asyncio.run(asyncpg_clients()),)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert not errors, errors
    assert_settled(b, pg, 2)


@pytest.mark.timeout(40)
def test_safe_shutdown_lets_a_parked_transaction_finish_from_the_hub(pg, bouncer):
    """SIGINT with a parked client inside a transaction and another parked
    client idle: the transaction's next statements and its COMMIT are
    served, the idle client's next query gets no server, and the process
    exits once the transaction is over."""
    import signal
    b = start(bouncer, pg, default_pool_size=2)
    in_tx, idle = logged_in(b), logged_in(b)
    try:
        parked(b, idle)
        parked(b, in_tx, "BEGIN")
        parked(b, in_tx, "SELECT 'before'")
        b.exit_expected = True
        b.signal(signal.SIGINT)
        time.sleep(0.3)
        idle.send(query_message("SELECT 'refused'"))
        time.sleep(0.2)
        in_tx.send(query_message("SELECT 'during'"))
        assert settings_of_reply(in_tx) == [b"during"]
        parked(b, in_tx, "COMMIT")
        b.wait_exit(10)
        idle.sock.settimeout(5)
        assert rows(idle.read_until_close()) == []
        wait_until(lambda: pg.backends("app") == 0, timeout=10, message="no server left")
    finally:
        in_tx.close()
        idle.close()


# --- a seeded storm of all of the above ------------------------------------------------------

def storm_client(b, seed: int, until: float, errors: list) -> None:
    """Random sessions of lone Queries, pipelined and split ones, unnamed
    batches, transactions, garbage and abrupt leaves; every answer checked."""
    import random
    rng = random.Random(seed)
    raw = None
    n = 0
    try:
        while time.monotonic() < until:
            if raw is None:
                raw = logged_in(b)
                parked(b, raw)
            n += 1
            tag = f"{seed}-{n}"
            action = rng.randrange(9)
            if action == 0:
                assert settings_of(raw, f"SELECT '{tag}'") == [tag.encode()]
            elif action == 1:
                raw.send(query_message(f"SELECT '{tag}a'"))
                time.sleep(rng.random() * 0.003)
                raw.send(query_message(f"SELECT '{tag}b'"))
                assert settings_of_reply(raw) == [f"{tag}a".encode()]
                assert settings_of_reply(raw) == [f"{tag}b".encode()]
            elif action == 2:
                data = query_message(f"SELECT '{tag}'")
                cut = rng.randrange(1, len(data))
                raw.send(data[:cut])
                time.sleep(0.002)
                raw.send(data[cut:])
                assert settings_of_reply(raw) == [tag.encode()]
            elif action == 3:
                raw.send(unnamed_batch(f"SELECT '{tag}'"))
                assert settings_of_reply(raw) == [tag.encode()]
            elif action == 4:
                parked(b, raw, "BEGIN")
                assert settings_of(raw, f"SELECT '{tag}'") == [tag.encode()]
                parked(b, raw, "COMMIT" if rng.random() < 0.8 else "ROLLBACK")
            elif action == 5:
                raw.send(query_message(f"SELECT pg_sleep(0.01), '{tag}'"))
                raw.close()
                raw = None
            elif action == 6:
                raw.send(query_message(f"SELECT '{tag}'") + message(b"X"))
                raw.sock.settimeout(10)
                raw.read_until_close()
                raw.close()
                raw = None
            elif action == 7:
                # (not huge-length: that one goes to PostgreSQL, which closes the server)
                raw.send(GARBAGE[rng.choice(sorted(set(GARBAGE) - {"huge-length"}))])
                raw.sock.settimeout(10)
                got = raw.read_until_close()
                assert [e["S"] for e in errors_in(got)] == ["FATAL"], got
                raw.close()
                raw = None
            else:
                if rng.random() < 0.5:
                    parked(b, raw, "BEGIN")
                raw.close()
                raw = None
    except Exception as exc:  # noqa: BLE001 - reported by the test
        errors.append(f"client {seed} step {n}: {type(exc).__name__}: {exc}")
    finally:
        if raw is not None:
            raw.close()


@pytest.mark.timeout(60)
def test_seeded_storm_of_hostile_clients(pg, bouncer):
    b = start(bouncer, pg, default_pool_size=2, max_client_conn=100)
    errors: list = []
    until = time.monotonic() + 3
    threads = [threading.Thread(target=storm_client, args=(b, seed, until, errors)) for seed in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert not errors, errors
    assert_settled(b, pg, 2)
    if TARGET == "geobouncer":
        text = b.log_text()
        bad = [line for line in text.splitlines()
               if "server conn crashed" in line or "BlockingSwitchOut" in line]
        assert not bad, bad
