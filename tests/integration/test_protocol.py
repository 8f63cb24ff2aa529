"""The wire protocol through geobouncer against real PostgreSQL: pgbench, many
clients, extended protocol and pipelines, COPY, notices and notifications, big
messages, and what each pool mode keeps (session state, tracked parameters).
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import hashlib
import os
import re
import select
import subprocess
import time

import asyncpg
import psycopg
import psycopg2
import pytest
from _util_pool import (
    BackendSampler,
    RawClient,
    close_quietly,
    errors_in,
    query_message,
    query_one,
    run_in_thread,
    server_rows,
    wait_no_backends,
)
from fixtures.ports import wait_until
from psycopg import errors as pgerrors
from psycopg import pq

APP_PW = "app_pw"
BENCH_DB = "bench_proto"


def tx_bouncer(bouncer, pg, **settings):
    """A bouncer in transaction mode for db ``app`` (settings override)."""
    conf = {"pool_mode": "transaction", "auth_type": "md5", **settings}
    return bouncer(pgbouncer=conf)


def pg3(b, **kw):
    """psycopg 3 through the pooler: no server-side prepared statements."""
    kw.setdefault("autocommit", True)
    return psycopg.connect(b.dsn(), prepare_threshold=None, **kw)


def make_app_table(pg, name: str, columns: str) -> None:
    pg.psql(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} ({columns})", dbname="app")
    pg.psql(f"ALTER TABLE {name} OWNER TO app", dbname="app")


# -- pgbench ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench_db(pg):
    """Database ``bench_proto`` owned by app, initialised by ``pgbench -i -s 1`` directly."""
    if not pg.psql("SELECT 1 FROM pg_database WHERE datname = %s", (BENCH_DB,)):
        pg.psql(f"CREATE DATABASE {BENCH_DB} OWNER app")
    env = {**os.environ, "PGPASSWORD": APP_PW}
    proc = subprocess.run(["pgbench", "-i", "-q", "-s", "1", "-h", pg.host, "-p", str(pg.port), "-U", "app",
                           BENCH_DB], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return BENCH_DB


# tpcb-like is ~10x slower than -S on two cores: fewer transactions keep the file fast.
@pytest.mark.timeout(120)
@pytest.mark.parametrize("script, per_client", [("tpcb-like", 100), ("select-only", 200)])
@pytest.mark.parametrize("mode", ["simple", "extended", pytest.param("prepared", marks=pytest.mark.geobouncer_only(
    "prepared statements in transaction mode (PgBouncer 1.21+)"))])
def test_pgbench_transaction_pooling(pg, bouncer, bench_db, script, per_client, mode):
    """50 clients on 10 servers, two pgbench threads. With -M prepared each
    thread prepares with a blocking PQprepare while its other clients may hold
    every server: the pooler answers a Parse of a statement it has seen parse
    before without a server, or the thread would stall until query_wait_timeout
    (as PgBouncer 1.25 does)."""
    clients = 50
    b = bouncer(databases={BENCH_DB: pg.conninfo(BENCH_DB)},
                pgbouncer={"pool_mode": "transaction", "default_pool_size": 10, "max_client_conn": 200,
                           "auth_type": "md5"})
    wait_no_backends(pg, BENCH_DB)
    cmd = ["pgbench", "-n", "-c", str(clients), "-j", "2", "-t", str(per_client), "-M", mode,
           "-h", b.host, "-p", str(b.port), "-U", "app", BENCH_DB]
    if script == "select-only":
        cmd.insert(2, "-S")
    with BackendSampler(pg, BENCH_DB, interval=0.05) as sampler:
        proc = subprocess.run(cmd, env={**os.environ, "PGPASSWORD": APP_PW}, capture_output=True,
                              text=True, timeout=100)
        servers_during = len(server_rows(b, BENCH_DB))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert re.search(r"^number of failed transactions: 0 \(", out, re.MULTILINE), out
    done = re.search(r"^number of transactions actually processed: (\d+)/(\d+)$", out, re.MULTILINE)
    assert done, out
    assert int(done.group(1)) == int(done.group(2)) == clients * per_client, out
    assert not sampler.errors, sampler.errors
    assert len(sampler.samples) > 5
    assert 0 < sampler.max <= 10, f"backends seen: max {sampler.max}"
    assert servers_during <= 10
    servers = server_rows(b, BENCH_DB)
    assert 0 < len(servers) <= 10
    assert pg.backends(BENCH_DB) <= 10


# -- many clients ----------------------------------------------------------------

@pytest.mark.timeout(120)
def test_500_clients_on_10_servers(pg, bouncer):
    clients = 500
    b = bouncer(pgbouncer={"pool_mode": "transaction", "default_pool_size": 10, "max_client_conn": 600,
                           "auth_type": "md5"})
    wait_no_backends(pg)
    connected = 0

    async def main():
        nonlocal connected
        everyone = asyncio.Event()
        finished = asyncio.Event()
        gate = asyncio.Semaphore(100)   # bound the connect storm, not the concurrency
        results: dict[int, list] = {}
        counted = {}

        async def client(i: int):
            nonlocal connected
            async with gate:
                conn = await asyncpg.connect(host=b.host, port=b.port, user="app", password=APP_PW,
                                             database="app", statement_cache_size=0, timeout=60)
            try:
                connected += 1
                if connected == clients:
                    everyone.set()
                await asyncio.wait_for(everyone.wait(), 90)
                got = []
                for k in range(3):
                    async with conn.transaction():
                        v = await conn.fetchval("SELECT $1::int", i)
                        row = await conn.fetchrow("SELECT $1::text || ':' || $2::int AS tag", f"c{i}", k)
                    got.append((v, row["tag"]))
                results[i] = got
                await asyncio.wait_for(finished.wait(), 90)
            finally:
                await conn.close()

        async def watcher():
            # Every client connected at once: count them on the admin console.
            await asyncio.wait_for(everyone.wait(), 90)
            row = await asyncio.to_thread(_pool_clients, b)
            counted["at_peak"] = row
            while len(results) < clients:
                await asyncio.sleep(0.05)
            finished.set()

        tasks = [asyncio.create_task(client(i)) for i in range(clients)]
        watch = asyncio.create_task(watcher())
        done = await asyncio.wait_for(asyncio.gather(*tasks, watch, return_exceptions=True), 110)
        return results, counted, [d for d in done if isinstance(d, BaseException)]

    with BackendSampler(pg, "app", interval=0.05) as sampler:
        results, counted, failures = asyncio.run(main())
    assert not failures, failures[:5]
    assert len(results) == clients
    for i, got in results.items():
        assert got == [(i, f"c{i}:{k}") for k in range(3)], (i, got)
    assert counted["at_peak"] >= clients, counted
    assert not sampler.errors, sampler.errors
    assert len(sampler.samples) > 5
    assert 0 < sampler.max <= 10, f"backends seen: max {sampler.max}"
    assert len(server_rows(b)) <= 10


def _pool_clients(b) -> int:
    for row in b.admin("SHOW POOLS"):
        if row.database == "app" and row.user == "app":
            return row.cl_active + row.cl_waiting
    return 0


# -- extended protocol --------------------------------------------------------------

def test_extended_protocol_parameters_rows_binary(pg, bouncer):
    b = tx_bouncer(bouncer, pg)
    with pg3(b) as conn:
        values = (123456789, "héllo wörld ✓", decimal.Decimal("12345.678900"), datetime.date(2024, 2, 29),
                  b"\x00\x01\xfe\xff" * 100, None, 2 ** 40)
        row = conn.execute("SELECT %s::int, %s::text, %s::numeric, %s::date, %s::bytea, %s::text, %s::bigint",
                           values).fetchone()
        assert row == values
        # Binary parameters and binary results.
        row = conn.cursor(binary=True).execute("SELECT %b::int + 1, %b::text || '!', %b::bytea",
                                               (41, "bin", b"\x00\xff")).fetchone()
        assert row == (42, "bin!", b"\x00\xff")
        # Many rows, binary format.
        n = 200_000
        cur = conn.cursor(binary=True)
        cur.execute("SELECT i, md5(i::text) FROM generate_series(1, %s) AS i", (n,))
        rows = cur.fetchall()
        assert len(rows) == n
        assert sum(r[0] for r in rows) == n * (n + 1) // 2
        for i in (1, 777, n):
            assert rows[i - 1] == (i, hashlib.md5(str(i).encode()).hexdigest())
        # A server-side cursor: several Execute with a row limit on one portal.
        with conn.transaction():
            named = conn.cursor("gb_portal")
            named.itersize = 1000
            named.execute("SELECT i FROM generate_series(1, 5000) AS i")
            assert sum(r[0] for r in named) == 5000 * 5001 // 2
            named.close()
        assert conn.execute("SELECT %s::int * 2", (21,)).fetchone() == (42,)


def _pipeline_scenario(dsn: str):
    """A libpq pipeline: ok | sync | ok, division by zero, later statement | sync | ok | sync.
    Returns every result (status, values or SQLSTATE), then the table's contents."""
    conn = pq.PGconn.connect(dsn.encode())
    assert conn.status == pq.ConnStatus.OK, conn.error_message
    try:
        conn.enter_pipeline_mode()
        insert = b"INSERT INTO proto_pipe VALUES ($1) RETURNING v"
        conn.send_query_params(insert, [b"1"])
        conn.pipeline_sync()
        conn.send_query_params(insert, [b"2"])
        conn.send_query_params(b"SELECT 1 / $1::int", [b"0"])
        conn.send_query_params(insert, [b"4"])
        conn.pipeline_sync()
        conn.send_query_params(insert, [b"5"], result_format=1)
        conn.pipeline_sync()
        out = []
        syncs = 0
        deadline = time.monotonic() + 30
        while syncs < 3 and time.monotonic() < deadline:
            res = conn.get_result()
            if res is None:
                continue
            status = pq.ExecStatus(res.status).name
            if res.status == pq.ExecStatus.TUPLES_OK:
                out.append((status, [res.get_value(i, 0) for i in range(res.ntuples)]))
            elif res.status == pq.ExecStatus.FATAL_ERROR:
                out.append((status, res.error_field(pq.DiagnosticField.SQLSTATE)))
            else:
                out.append((status,))
            syncs += res.status == pq.ExecStatus.PIPELINE_SYNC
        while conn.get_result() is not None:
            pass
        conn.exit_pipeline_mode()
        after = conn.exec_(b"SELECT array_agg(v ORDER BY v)::text FROM proto_pipe")
        out.append(("table", after.get_value(0, 0)))
        usable = conn.exec_(b"SELECT 40 + 2")
        out.append(("after", usable.get_value(0, 0)))
        return out
    finally:
        conn.finish()


EXPECTED_PIPELINE = [
    ("TUPLES_OK", [b"1"]), ("PIPELINE_SYNC",),
    ("TUPLES_OK", [b"2"]), ("FATAL_ERROR", b"22012"), ("PIPELINE_ABORTED",), ("PIPELINE_SYNC",),
    ("TUPLES_OK", [b"\x00\x00\x00\x05"]), ("PIPELINE_SYNC",),
    ("table", b"{1,5}"),   # the aborted implicit transaction (2) rolled back
    ("after", b"42"),
]


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_error_in_extended_pipeline(pg, bouncer, pool_mode):
    b = bouncer(pgbouncer={"pool_mode": pool_mode, "auth_type": "md5", "default_pool_size": 2})
    make_app_table(pg, "proto_pipe", "v int")
    assert _pipeline_scenario(b.dsn()) == EXPECTED_PIPELINE
    # The same through psycopg's own pipeline: the error is raised, the connection stays usable.
    pg.psql("TRUNCATE proto_pipe", dbname="app")
    with pg3(b) as conn:
        with pytest.raises(pgerrors.DivisionByZero):
            with conn.pipeline() as p:
                first = conn.execute("INSERT INTO proto_pipe VALUES (%s) RETURNING v", (10,))
                p.sync()
                conn.execute("INSERT INTO proto_pipe VALUES (%s)", (20,))
                conn.execute("SELECT 1 / %s::int", (0,))
                conn.execute("INSERT INTO proto_pipe VALUES (%s)", (40,))
                p.sync()
        assert first.fetchone() == (10,)
        assert conn.execute("SELECT array_agg(v ORDER BY v) FROM proto_pipe").fetchone() == ([10],)
        with conn.pipeline():
            later = [conn.execute("SELECT %s::int", (i,)) for i in range(5)]
        assert [c.fetchone()[0] for c in later] == list(range(5))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sync_every", [None, 250])
def test_pipeline_10000_queries(pg, bouncer, sync_every):
    b = tx_bouncer(bouncer, pg, default_pool_size=2)
    n = 10_000
    pad = 200   # ~2.5 MB of answers while the client is still sending: both directions fill up

    def run():
        with pg3(b) as conn:
            with conn.pipeline() as p:
                curs = []
                for i in range(n):
                    curs.append(conn.execute("SELECT %s::int, repeat('x', %s)", (i, pad)))
                    if sync_every and (i + 1) % sync_every == 0:
                        p.sync()
            rows = [c.fetchone() for c in curs]
            return sum(r[0] for r in rows), {len(r[1]) for r in rows}, conn.execute("SELECT 7").fetchone()

    # A second client keeps using the pool meanwhile (two servers).
    def other():
        with pg3(b) as conn:
            return [conn.execute("SELECT %s::int", (i,)).fetchone()[0] for i in range(200)]

    outcome = run_in_thread(run)
    side = run_in_thread(other)
    try:
        total, widths, after = outcome.get(60)
    except TimeoutError:
        b.kill()   # unblock the client thread; the test fails as a deadlock
        raise AssertionError(f"pipeline of {n} queries did not finish (deadlock?)\n{b.log_text()[-3000:]}")
    assert total == n * (n - 1) // 2
    assert widths == {pad}
    assert after == (7,)
    assert side.get(30) == list(range(200))


# -- COPY ----------------------------------------------------------------------------

def _copy_rows(n: int):
    return [(i, hashlib.sha256(str(i).encode()).hexdigest()) for i in range(n)]


@pytest.mark.timeout(90)
def test_copy_in_and_out(pg, bouncer, tmp_path):
    b = tx_bouncer(bouncer, pg)
    make_app_table(pg, "proto_copy", "id int PRIMARY KEY, payload text")
    make_app_table(pg, "proto_copy2", "id int PRIMARY KEY, payload text")
    rows = _copy_rows(72_000)   # 72k * (5-6 + 1 + 64 + 1) bytes: > 5 MB each way
    size = sum(len(f"{i}\t{p}\n") for i, p in rows)
    assert size > 5_000_000
    with pg3(b) as conn:
        with conn.cursor() as cur:
            with cur.copy("COPY proto_copy (id, payload) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            assert cur.rowcount == len(rows)
        # What PostgreSQL stored, checked directly.
        direct = pg.psql("SELECT count(*), sum(id), md5(string_agg(payload, ',' ORDER BY id)) FROM proto_copy",
                         dbname="app")
        expected_md5 = hashlib.md5(",".join(p for _, p in rows).encode()).hexdigest()
        assert direct == [(len(rows), sum(i for i, _ in rows), expected_md5)]
        # COPY TO STDOUT through the pooler, every row compared.
        with conn.cursor() as cur:
            with cur.copy("COPY (SELECT id, payload FROM proto_copy ORDER BY id) TO STDOUT") as copy:
                got = [(int(i), p) for i, p in copy.rows()]
        assert got == rows
        # Raw bytes copy out, the server's text format.
        buf = bytearray()
        with conn.cursor() as cur:
            with cur.copy("COPY (SELECT id, payload FROM proto_copy ORDER BY id) TO STDOUT") as copy:
                for chunk in copy:
                    buf += chunk
        assert len(buf) == size
        # A bad row in COPY FROM: an error, and the connection and its server stay usable.
        with pytest.raises(pgerrors.InvalidTextRepresentation):
            with conn.cursor() as cur:
                with cur.copy("COPY proto_copy2 (id, payload) FROM STDIN") as copy:
                    copy.write(b"1\tok\nnot-a-number\tbad\n")
        assert conn.execute("SELECT count(*) FROM proto_copy2").fetchone() == (0,)
        assert conn.execute("SELECT 1").fetchone() == (1,)

    # psql \copy both ways through the pooler.
    out_file = tmp_path / "out.tsv"
    env = {**os.environ, "PGPASSWORD": APP_PW}
    base = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", b.host, "-p", str(b.port), "-U", "app", "-d", "app"]
    proc = subprocess.run(base + ["-c", f"\\copy (SELECT id, payload FROM proto_copy ORDER BY id) TO '{out_file}'"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert out_file.stat().st_size == size
    assert out_file.read_bytes() == bytes(buf)
    proc = subprocess.run(base + ["-c", f"\\copy proto_copy2 (id, payload) FROM '{out_file}'"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"COPY {len(rows)}" in proc.stdout
    assert pg.psql("SELECT count(*), md5(string_agg(payload, ',' ORDER BY id)) FROM proto_copy2",
                   dbname="app") == [(len(rows), expected_md5)]


# -- notices and notifications ------------------------------------------------------------

def test_notice_reaches_client(pg, bouncer):
    b = tx_bouncer(bouncer, pg)
    conn = b.connect(autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("DO $$ BEGIN RAISE NOTICE 'gb notice %', 6 * 7; END $$")
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
        assert any("gb notice 42" in n for n in conn.notices), conn.notices
    finally:
        conn.close()
    received = []
    with pg3(b) as conn3:
        conn3.add_notice_handler(lambda diag: received.append((diag.severity, diag.message_primary)))
        conn3.execute("DO $$ BEGIN RAISE WARNING 'gb warning %', 'w'; END $$")
        assert conn3.execute("SELECT 2").fetchone() == (2,)
    assert ("WARNING", "gb warning w") in received


def _wait_notifies(conn, count: int, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while len(conn.notifies) < count and time.monotonic() < deadline:
        if select.select([conn], [], [], max(0.0, deadline - time.monotonic())) != ([], [], []):
            conn.poll()
    return [(n.channel, n.payload) for n in conn.notifies]


def test_listen_notify_session_mode(pg, bouncer):
    b = bouncer(pgbouncer={"pool_mode": "session", "auth_type": "md5"})
    listener = b.connect(autocommit=True)
    notifier = b.connect(autocommit=True)
    try:
        with listener.cursor() as cur:
            cur.execute("LISTEN gb_channel")
        with notifier.cursor() as cur:
            cur.execute("NOTIFY gb_channel, 'payload-1'")
            cur.execute("SELECT pg_notify('gb_channel', 'payload-2')")
        # Also from outside the pooler: the listener is idle, the server pushes the message.
        pg.psql("SELECT pg_notify('gb_channel', 'payload-3')", dbname="app")
        got = _wait_notifies(listener, 3)
        assert got == [("gb_channel", "payload-1"), ("gb_channel", "payload-2"), ("gb_channel", "payload-3")]
        assert query_one(listener, "SELECT 'still usable'") == ("still usable",)
    finally:
        close_quietly(listener, notifier)


# -- big messages -----------------------------------------------------------------------

def _big_text(n: int) -> str:
    chunks = []
    i = 0
    while sum(map(len, chunks)) < n:
        chunks.append(hashlib.sha256(str(i).encode()).hexdigest())
        i += 1
    return "".join(chunks)[:n]


@pytest.mark.timeout(90)
def test_big_query_and_big_row(pg, bouncer):
    b = tx_bouncer(bouncer, pg)
    text = _big_text(1_000_000)
    digest = hashlib.md5(text.encode()).hexdigest()
    conn = b.connect(autocommit=True)
    try:
        # 1 MB of SQL text (simple protocol): the literal appears once.
        sql = f"SELECT md5(t), length(t) FROM (SELECT '{text}'::text AS t) AS s"
        assert len(sql) > 1_000_000
        assert query_one(conn, sql) == (digest, 1_000_000)
        # A 10 MB row back.
        n = 330_000
        expected = "".join(hashlib.md5(str(i).encode()).hexdigest() for i in range(1, n + 1))
        assert len(expected) > 10 * 1024 * 1024
        big = query_one(conn, "SELECT string_agg(md5(i::text), '' ORDER BY i) FROM generate_series(1, %s) AS i",
                        (n,))[0]
        assert len(big) == len(expected)
        assert big == expected
        assert query_one(conn, "SELECT 'after'") == ("after",)
    finally:
        conn.close()
    with pg3(b) as conn3:
        # 1 MB as a bound parameter (extended protocol), and the big row in binary.
        assert conn3.execute("SELECT md5(%s), length(%s)", (text, text)).fetchone() == (digest, 1_000_000)
        row = conn3.cursor(binary=True).execute(
            "SELECT convert_to(string_agg(md5(i::text), '' ORDER BY i), 'UTF8') FROM generate_series(1, %s) AS i",
            (n,)).fetchone()
        assert bytes(row[0]) == expected.encode()


# -- session mode ------------------------------------------------------------------------

def test_session_state_persists_and_is_reset(pg, bouncer):
    b = bouncer(pgbouncer={"pool_mode": "session", "auth_type": "md5", "default_pool_size": 1})
    default_work_mem = pg.psql("SHOW work_mem")[0][0]
    assert default_work_mem != "7MB"
    first = b.connect()   # not autocommit: psycopg2 opens a transaction per block
    try:
        with first.cursor() as cur:
            cur.execute("SET work_mem = '7MB'")
            cur.execute("CREATE TEMP TABLE gb_session_tmp (v int)")
            cur.execute("INSERT INTO gb_session_tmp VALUES (1), (2)")
            cur.execute("SELECT pg_advisory_lock(4242)")
            cur.execute("SELECT pg_backend_pid()")
            pid = cur.fetchone()[0]
        first.commit()
        for _ in range(3):   # across transactions: the same server, the same session
            with first.cursor() as cur:
                cur.execute("SHOW work_mem")
                assert cur.fetchone() == ("7MB",)
                cur.execute("SELECT sum(v), pg_backend_pid() FROM gb_session_tmp")
                assert cur.fetchone() == (3, pid)
            first.commit()
    finally:
        first.close()
    # The next client gets the same server (pool_size 1), reset by DISCARD ALL.
    second = b.connect(autocommit=True)
    try:
        assert query_one(second, "SELECT pg_backend_pid()") == (pid,)
        assert query_one(second, "SHOW work_mem") == (default_work_mem,)
        assert query_one(second, "SELECT to_regclass('pg_temp.gb_session_tmp') IS NULL "
                                 "AND NOT EXISTS (SELECT 1 FROM pg_class WHERE relname = 'gb_session_tmp')") == (True,)
        assert query_one(second, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == (0,)
    finally:
        second.close()


# -- transaction mode: tracked parameters ---------------------------------------------------

TRACKED_SQL = ("SELECT current_setting('TimeZone'), current_setting('DateStyle'), current_setting('IntervalStyle'),"
               " current_setting('application_name'), current_setting('client_encoding'),"
               " to_char(timestamptz '2024-01-01 12:00:00+00', 'HH24'), 'é', pg_backend_pid()")


@pytest.mark.geobouncer_only("the options startup parameter and IntervalStyle tracking (PgBouncer 1.20+)")
def test_tracked_parameters_per_client_in_transaction_mode(pg, bouncer, monkeypatch):
    # psycopg 3, not psycopg2: psycopg2 forces DateStyle to ISO right after connecting.
    b = tx_bouncer(bouncer, pg, default_pool_size=1)
    alpha = psycopg.connect(b.dsn(application_name="alpha", client_encoding="UTF8",
                                  options="-c TimeZone=Asia/Tokyo -c DateStyle=SQL,DMY -c IntervalStyle=iso_8601"),
                            prepare_threshold=None)
    # The other client sends TimeZone / DateStyle as plain startup parameters (libpq's PGTZ, PGDATESTYLE).
    monkeypatch.setenv("PGTZ", "America/Sao_Paulo")
    monkeypatch.setenv("PGDATESTYLE", "German, DMY")
    beta = psycopg.connect(b.dsn(application_name="beta", client_encoding="LATIN1",
                                 options="-c IntervalStyle=postgres_verbose"), prepare_threshold=None)
    monkeypatch.delenv("PGTZ")
    monkeypatch.delenv("PGDATESTYLE")
    expect = {
        "alpha": ["Asia/Tokyo", "SQL, DMY", "iso_8601", "alpha", "UTF8", "21", "é"],
        "beta": ["America/Sao_Paulo", "German, DMY", "postgres_verbose", "beta", "LATIN1", "09", "é"],
    }
    conns = {"alpha": alpha, "beta": beta}
    pids = set()

    def check(name: str, rnd: int) -> None:
        conn = conns[name]
        row = conn.execute(TRACKED_SQL).fetchone()   # opens a transaction (not autocommit)
        conn.execute("SELECT now()")                 # a second statement in the same transaction
        conn.commit()
        assert list(row[:7]) == expect[name], (name, rnd, row)
        pids.add(row[7])

    try:
        assert beta.info.encoding == "iso8859-1"
        for rnd in range(4):
            for name in ("alpha", "beta", "beta", "alpha"):
                check(name, rnd)
        assert len(pids) == 1, "pool_size 1: both clients share one server"
        # The welcome parameters each client got are its own.
        assert alpha.info.parameter_status("TimeZone") == "Asia/Tokyo"
        assert beta.info.parameter_status("TimeZone") == "America/Sao_Paulo"
        assert alpha.info.parameter_status("application_name") == "alpha"
        assert beta.info.parameter_status("DateStyle") == "German, DMY"
        # A SET outside a transaction is tracked and kept for that client only.
        alpha.autocommit = True
        alpha.execute("SET TimeZone = 'Europe/Paris'")
        alpha.execute("SET application_name = 'alpha2'")
        alpha.autocommit = False
        expect["alpha"][0] = "Europe/Paris"
        expect["alpha"][3] = "alpha2"
        expect["alpha"][5] = "13"
        for rnd in range(3):
            for name in ("beta", "alpha"):
                check(name, rnd)
        assert alpha.info.parameter_status("TimeZone") == "Europe/Paris"
        assert beta.info.parameter_status("TimeZone") == "America/Sao_Paulo"
        assert beta.info.parameter_status("application_name") == "beta"
    finally:
        close_quietly(alpha, beta)


# -- statement mode ------------------------------------------------------------------------

def test_statement_mode(pg, bouncer):
    b = bouncer(pgbouncer={"pool_mode": "statement", "auth_type": "md5", "default_pool_size": 2})
    make_app_table(pg, "proto_stmt", "v int")
    conn = b.connect(autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO proto_stmt VALUES (1), (2)")
            assert cur.rowcount == 2
            cur.execute("SELECT sum(v) FROM proto_stmt")
            assert cur.fetchone() == (3,)
            for i in range(10):
                cur.execute("SELECT %s::int", (i,))
                assert cur.fetchone() == (i,)
    finally:
        conn.close()
    with pg3(b) as conn3:
        assert conn3.execute("SELECT %s::int + 1", (1,)).fetchone() == (2,)

    tx = b.connect(autocommit=False)   # psycopg2 sends BEGIN before the first statement
    try:
        with pytest.raises(psycopg2.Error):
            with tx.cursor() as cur:
                cur.execute("INSERT INTO proto_stmt VALUES (100)")
                cur.execute("INSERT INTO proto_stmt VALUES (200)")
            tx.commit()
    finally:
        close_quietly(tx)
    # On the wire: BEGIN answered, then the pooler's error and a close.
    with RawClient(b.host, b.port) as raw:
        login = raw.login("app", "app_pw", "app")
        assert login[-1][0] == b"Z", login
        raw.send(query_message("BEGIN"))
        raw.send(query_message("INSERT INTO proto_stmt VALUES (300)"))
        replies = raw.read_until_close()
    errs = errors_in(replies)
    assert errs, replies
    assert any("transaction blocks not allowed in statement pooling mode" in e.get("M", "") for e in errs), errs
    # Nothing of the refused transaction was committed; no server stays in a transaction.
    assert pg.psql("SELECT array_agg(v ORDER BY v) FROM proto_stmt", dbname="app") == [([1, 2],)]
    wait_until(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' "
                               "AND state LIKE 'idle in transaction%'")[0][0] == 0,
               timeout=10, message="no server left inside the refused transaction")
    fresh = b.connect(autocommit=True)
    try:
        assert query_one(fresh, "SELECT 'ok'") == ("ok",)
    finally:
        fresh.close()
