"""Real client libraries through geobouncer in transaction pooling, against real
PostgreSQL: asyncpg (default statement cache), psycopg 3 (prepare_threshold=0,
pipeline mode), psycopg2, SQLAlchemy ORM sessions, pgbench -M prepared, pgjdbc
(tests/clients/Prep.java) and node-postgres (tests/clients/prep.js).

Every test runs more clients than the pool has server connections, so a client's
transactions land on different servers and every server serves many clients.
Every test checks results: each client tags its rows and reads back exactly the
rows it wrote, and each client sets its own session state (SET outside a
transaction, startup parameters) and checks on every read that it sees its own
and never another client's; SET LOCAL does not outlive its transaction; RESET
brings the default back.

The Java and Node drivers come from ``scripts/install-client-deps``; when they
(or java / node themselves) are missing the tests fail and say so: they are
never skipped.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import psycopg
import pytest
from _util_pool import BackendSampler, wait_no_backends
from psycopg import pq

pytestmark = pytest.mark.geobouncer_only(
    "per-client SETs and prepared statements in transaction mode (PgBouncer 1.21+ has the statements only)")

REPO = Path(__file__).resolve().parents[2]
CLIENTS_DIR = REPO / "tests" / "clients"
JDBC_JAR = Path("/usr/share/java/postgresql.jar")
INSTALL_HINT = "run scripts/install-client-deps (scripts/test does) to install the client drivers"
APP_PW = "app_pw"
POOL = 3


# -- helpers ---------------------------------------------------------------------

def tx_bouncer(bouncer, **settings):
    """geobouncer in transaction mode with POOL servers for db ``app``."""
    conf = {
        "pool_mode": "transaction",
        "default_pool_size": POOL,
        "max_client_conn": 200,
        "auth_type": "md5",
        "max_prepared_statements": 20,
        "ignore_startup_parameters": "extra_float_digits",
        **settings,
    }
    return bouncer(pgbouncer=conf)


def make_schemas(pg, prefix: str, count: int) -> list[str]:
    """Schemas prefix0..prefixN-1 owned by app, each with an identical ``items`` table."""
    names = [f"{prefix}{i}" for i in range(count)]
    sql = []
    for name in names:
        sql.append(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        sql.append(f"CREATE SCHEMA {name} AUTHORIZATION app")
        sql.append(f"CREATE TABLE {name}.items (client int NOT NULL, seq int NOT NULL, val text NOT NULL,"
                   f" PRIMARY KEY (client, seq))")
        sql.append(f"ALTER TABLE {name}.items OWNER TO app")
    pg.psql(";".join(sql), dbname="app")
    return names


def make_table(pg, name: str, columns: str) -> None:
    pg.psql(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} ({columns}); ALTER TABLE {name} OWNER TO app",
            dbname="app")


def schema_rows(pg, schema: str) -> list[tuple]:
    return pg.psql(f"SELECT client, seq, val FROM {schema}.items ORDER BY client, seq", dbname="app")


def run_clients(fn, count: int, timeout: float = 100.0) -> list:
    """fn(i) for i in range(count) in threads, all at once; re-raises the first failure
    after listing every failure."""
    with ThreadPoolExecutor(max_workers=count) as ex:
        futures = [ex.submit(fn, i) for i in range(count)]
        results, errors = [], []
        for i, fut in enumerate(futures):
            try:
                results.append(fut.result(timeout=timeout))
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                errors.append(f"client {i}: {type(exc).__name__}: {exc}")
                results.append(None)
    assert not errors, f"{len(errors)} of {count} clients failed:\n" + "\n".join(errors[:8])
    return results


def expected_val(prefix: str, client: int, seq: int, updated: bool) -> str:
    return f"{prefix}{client}-{seq}" + ("+u" if updated else "")


def own_timeout(i: int, base: int = 100) -> str:
    return f"{base + i}s"


def assert_pool_bound(sampler: BackendSampler, pg, limit: int = POOL) -> None:
    assert not sampler.errors, sampler.errors
    assert sampler.samples, "the backend sampler took no sample"
    assert sampler.max <= limit, f"server connections seen: max {sampler.max}, pool size {limit}"
    assert pg.backends("app") <= limit


def tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.fail(f"`{name}` not found on PATH: the {name} client test cannot run; {INSTALL_HINT}",
                    pytrace=False)
    return path


# -- asyncpg -----------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_asyncpg_statement_cache_with_eviction(pg, bouncer):
    """12 asyncpg connections (default statement cache: every query is a named
    prepared statement ``__asyncpg_stmt_N__``, the same names in every client)
    run 20 distinct statements, three rounds, through 3 servers that may keep 5
    statements each: statements are evicted and prepared again all the time."""
    clients, distinct, rounds, max_prepared = 12, 20, 3, 5
    make_table(pg, "asy_rows", "client int, round int, k int, val text, PRIMARY KEY (client, round, k)")
    b = tx_bouncer(bouncer, max_prepared_statements=max_prepared)
    wait_no_backends(pg)
    prepared_seen: list[int] = []

    async def client(i: int) -> None:
        conn = await asyncpg.connect(host=b.host, port=b.port, user="app", password=APP_PW, database="app",
                                     timeout=20)
        try:
            mine = own_timeout(i)
            await conn.execute(f"SET statement_timeout = '{mine}'")
            await conn.execute(f"SET application_name = 'asy-{i}'")
            for r in range(rounds):
                for k in range(distinct):
                    row = await conn.fetchrow(
                        f"SELECT $1::int * {k + 1} + $2::int AS v, current_setting('statement_timeout') AS st,"
                        f" current_setting('application_name') AS app",
                        i, r)
                    assert row["v"] == i * (k + 1) + r, (i, r, k, row)
                    assert row["st"] == mine, f"client {i} sees statement_timeout {row['st']}, wants {mine}"
                    assert row["app"] == f"asy-{i}", f"client {i} sees application_name {row['app']}"
                    status = await conn.execute("INSERT INTO asy_rows (client, round, k, val) VALUES ($1, $2, $3, $4)",
                                                i, r, k, f"a{i}-{r}-{k}")
                    assert status == "INSERT 0 1"
                async with conn.transaction():
                    await conn.execute("SET LOCAL statement_timeout = '77s'")
                    assert await conn.fetchval("SELECT current_setting('statement_timeout')") == "77s"
                    status = await conn.execute("UPDATE asy_rows SET val = val || '+t' WHERE client = $1 AND round = $2",
                                                i, r)
                    assert status == f"UPDATE {distinct}"
                assert await conn.fetchval("SELECT current_setting('statement_timeout')") == mine
                rows = await conn.fetch("SELECT round, k, val FROM asy_rows WHERE client = $1 ORDER BY round, k", i)
                want = [(rr, k, f"a{i}-{rr}-{k}+t") for rr in range(r + 1) for k in range(distinct)]
                assert [tuple(x) for x in rows] == want, f"client {i} round {r} read other rows"
            prepared_seen.append(await conn.fetchval("SELECT count(*) FROM pg_prepared_statements"))
            await conn.execute("RESET statement_timeout")
            for _ in range(5):
                assert await conn.fetchval("SELECT current_setting('statement_timeout')") == "0"
                assert await conn.fetchval("SELECT current_setting('application_name')") == f"asy-{i}"
        finally:
            await conn.close()

    async def main():
        results = await asyncio.gather(*(client(i) for i in range(clients)), return_exceptions=True)
        errors = [f"client {i}: {type(e).__name__}: {e}" for i, e in enumerate(results) if isinstance(e, BaseException)]
        assert not errors, "\n".join(errors[:8])

    with BackendSampler(pg, "app", interval=0.05) as sampler:
        asyncio.run(main())
    assert_pool_bound(sampler, pg)
    rows = pg.psql("SELECT client, round, k, val FROM asy_rows ORDER BY 1, 2, 3", dbname="app")
    assert rows == [(i, r, k, f"a{i}-{r}-{k}+t") for i in range(clients) for r in range(rounds)
                    for k in range(distinct)]
    # Each server keeps at most max_prepared_statements of the pooler's statements.
    assert prepared_seen and max(prepared_seen) <= max_prepared, prepared_seen


# -- psycopg 3 ---------------------------------------------------------------------

SEL = ("SELECT val, current_setting('search_path'), current_setting('statement_timeout'),"
       " current_setting('application_name') FROM items WHERE client = %s AND seq = %s")


@pytest.mark.timeout(90)
def test_psycopg3_prepare_threshold_zero(pg, bouncer):
    """12 psycopg 3 connections with prepare_threshold=0 (every statement, SETs
    included, is a named prepared statement _pg3_N) in their own schemas."""
    clients, iterations = 12, 15
    schemas = make_schemas(pg, "pg3_c", clients)
    b = tx_bouncer(bouncer, max_prepared_statements=8)
    wait_no_backends(pg)

    def client(i: int) -> None:
        schema, mine = schemas[i], own_timeout(i)
        with psycopg.connect(b.dsn(), prepare_threshold=0, autocommit=True, application_name=f"pg3-{i}") as conn:
            conn.execute(f"SET search_path = {schema}")
            conn.execute(f"SET statement_timeout = '{mine}'")

            def check_settings(where: str, want_timeout: str = mine) -> None:
                row = conn.execute("SELECT current_setting('search_path'), current_setting('statement_timeout'),"
                                   " current_setting('application_name')").fetchone()
                assert row == (schema, want_timeout, f"pg3-{i}"), f"client {i} {where}: sees {row}"

            for seq in range(iterations):
                cur = conn.execute("INSERT INTO items (client, seq, val) VALUES (%s, %s, %s)",
                                   (i, seq, expected_val("p", i, seq, False)))
                assert cur.rowcount == 1
                updated = seq % 3 == 2
                if updated:
                    with conn.transaction():
                        conn.execute("SET LOCAL statement_timeout = '55s'")
                        cur = conn.execute("UPDATE items SET val = val || %s WHERE client = %s AND seq = %s",
                                           ("+u", i, seq))
                        assert cur.rowcount == 1
                        check_settings("inside a transaction after SET LOCAL", "55s")
                row = conn.execute(SEL, (i, seq)).fetchone()
                assert row == (expected_val("p", i, seq, updated), schema, mine, f"pg3-{i}"), \
                    f"client {i} seq {seq}: {row}"
            # Change a SET and change it back: the second SET of the same text is
            # only a Bind of psycopg's already prepared statement.
            conn.execute("SET statement_timeout = '5min'")
            for _ in range(3):
                check_settings("after SET statement_timeout = '5min'", "5min")
            conn.execute(f"SET statement_timeout = '{mine}'")
            for _ in range(5):
                check_settings(f"after SET statement_timeout = '{mine}' again")
            conn.execute("RESET statement_timeout")
            for _ in range(5):
                check_settings("after RESET statement_timeout", "0")
            rows = conn.execute("SELECT client, seq, val FROM items ORDER BY seq").fetchall()
            assert rows == [(i, s, expected_val("p", i, s, s % 3 == 2)) for s in range(iterations)]

    with BackendSampler(pg, "app", interval=0.05) as sampler:
        run_clients(client, clients)
    assert_pool_bound(sampler, pg)
    for i, schema in enumerate(schemas):
        assert schema_rows(pg, schema) == [(i, s, expected_val("p", i, s, s % 3 == 2)) for s in range(iterations)]


@pytest.mark.timeout(90)
def test_psycopg3_pipeline_mode(pg, bouncer):
    """8 psycopg 3 connections in pipeline mode (prepared statements, executemany,
    a transaction that fails inside a pipeline, one rolled back) through 3 servers."""
    clients, batch = 8, 25
    schemas = make_schemas(pg, "pipe_c", clients)
    b = tx_bouncer(bouncer, max_prepared_statements=6)
    wait_no_backends(pg)

    def client(i: int) -> None:
        schema, mine = schemas[i], own_timeout(i)
        with psycopg.connect(b.dsn(), prepare_threshold=0, autocommit=True, application_name=f"pipe-{i}") as conn:
            conn.execute(f"SET search_path = {schema}")
            conn.execute(f"SET statement_timeout = '{mine}'")
            # 1. a pipeline of inserts then reads, one Sync at the end
            with conn.pipeline():
                for seq in range(batch):
                    conn.execute("INSERT INTO items (client, seq, val) VALUES (%s, %s, %s)",
                                 (i, seq, expected_val("q", i, seq, False)))
                reads = [conn.execute(SEL, (i, seq)) for seq in range(batch)]
            for seq, cur in enumerate(reads):
                assert cur.fetchone() == (expected_val("q", i, seq, False), schema, mine, f"pipe-{i}"), \
                    f"client {i} seq {seq}"
            # 2. executemany (psycopg pipelines it) inside a transaction with SET LOCAL
            with conn.transaction():
                conn.execute("SET LOCAL statement_timeout = '44s'")
                with conn.cursor() as cur:
                    cur.executemany("UPDATE items SET val = val || %s WHERE client = %s AND seq = %s",
                                    [("+u", i, seq) for seq in range(0, batch, 2)])
                    assert cur.rowcount == len(range(0, batch, 2))
                assert conn.execute("SELECT current_setting('statement_timeout')").fetchone() == ("44s",)
            assert conn.execute("SELECT current_setting('statement_timeout')").fetchone() == (mine,)
            # 3. an error in the middle of a pipeline: the rest of the batch is skipped
            with pytest.raises(psycopg.errors.UniqueViolation), conn.pipeline():
                conn.execute("INSERT INTO items (client, seq, val) VALUES (%s, %s, %s)", (i, batch, "new"))
                conn.execute("INSERT INTO items (client, seq, val) VALUES (%s, %s, %s)", (i, 0, "dup"))
                conn.execute("INSERT INTO items (client, seq, val) VALUES (%s, %s, %s)", (i, batch + 1, "new"))
            # 4. a transaction rolled back inside a pipeline
            with conn.pipeline():
                try:
                    with conn.transaction():
                        conn.execute("INSERT INTO items (client, seq, val) VALUES (%s, %s, %s)", (i, 999, "gone"))
                        raise psycopg.Rollback()
                except psycopg.Rollback:  # pragma: no cover - transaction() swallows it
                    pass
                reads = [conn.execute(SEL, (i, seq)) for seq in range(batch)]
            for seq, cur in enumerate(reads):
                want = expected_val("q", i, seq, seq % 2 == 0)
                assert cur.fetchone() == (want, schema, mine, f"pipe-{i}"), f"client {i} seq {seq} after pipelines"
            rows = conn.execute("SELECT client, seq, val FROM items ORDER BY seq").fetchall()
            assert rows == [(i, s, expected_val("q", i, s, s % 2 == 0)) for s in range(batch)]

    with BackendSampler(pg, "app", interval=0.05) as sampler:
        run_clients(client, clients)
    assert_pool_bound(sampler, pg)
    for i, schema in enumerate(schemas):
        assert schema_rows(pg, schema) == [(i, s, expected_val("q", i, s, s % 2 == 0)) for s in range(batch)]


# Statement names a client reuses, Close, DEALLOCATE, DEALLOCATE ALL, DISCARD ALL,
# RESET ALL: run once on a direct connection and by every client through the
# pooler, the outcome of every step must be the same. Steps:
#   ("prepare", name, sql)  protocol Parse    ("exec", name, param)  Bind/Execute
#   ("close", name)         protocol Close    ("q", sql)             simple query
#   ("xq", sql)             extended protocol, unnamed statement (as psycopg's pipeline mode and
#                           pgjdbc send DEALLOCATE ALL / DISCARD ALL)
SCENARIO = [
    ("q", "SET statement_timeout = '123s'"),
    ("prepare", "s1", "SELECT $1::int + 1"),
    ("exec", "s1", "41"),
    ("prepare", "s2", "SELECT $1::text || '-x'"),
    ("exec", "s2", "a"),
    ("prepare", "s1", "SELECT $1::int + 2"),           # name in use: 42P05 on a direct connection
    ("exec", "s1", "41"),                               # still the first text
    ("q", "DEALLOCATE s1"),
    ("exec", "s1", "1"),                                # 26000
    ("q", "DEALLOCATE s1"),                             # 26000
    ("prepare", "s1", "SELECT $1::int + 2"),            # the name is free again
    ("exec", "s1", "40"),
    ("close", "s1"),
    ("close", "never_prepared"),                        # Close of an unknown name is not an error
    ("exec", "s1", "1"),                                # 26000
    ("prepare", "s1", "SELECT $1::int + 1"),
    ("exec", "s1", "9"),
    ("q", "DEALLOCATE PREPARE s1"),
    ("exec", "s1", "1"),
    ("prepare", "MiXed", "SELECT $1::int * 3"),
    ("q", "DEALLOCATE mixed"),                          # unquoted folds to lower case: 26000
    ("exec", "MiXed", "5"),
    ("q", 'DEALLOCATE "MiXed"'),
    ("exec", "MiXed", "5"),                             # 26000
    ("q", "DEALLOCATE ALL"),
    ("exec", "s2", "b"),                                # 26000
    ("prepare", "s2", "SELECT $1::text || '-y'"),
    ("exec", "s2", "b"),
    ("prepare", "s1", "SELECT $1::int + 1"),
    ("q", "SHOW statement_timeout"),
    ("q", "DISCARD ALL"),
    ("exec", "s1", "1"),                                # 26000
    ("q", "SHOW statement_timeout"),                    # DISCARD ALL reset the session: 0
    ("q", "SHOW application_name"),                     # back to the startup value
    ("prepare", "s1", "SELECT $1::int + 1"),
    ("exec", "s1", "99"),
    ("q", "SET statement_timeout = '124s'"),
    ("q", "RESET ALL"),
    ("q", "SHOW statement_timeout"),
    ("q", "SHOW application_name"),
    ("exec", "s1", "7"),                                # RESET ALL keeps prepared statements
    # the same through the extended protocol
    ("xq", "DEALLOCATE ALL"),
    ("exec", "s1", "1"),                                # 26000
    ("prepare", "s1", "SELECT $1::int + 1"),
    ("exec", "s1", "2"),
    ("prepare", "s2", "SELECT $1::text || '-y'"),
    ("exec", "s2", "c"),
    ("xq", "DISCARD ALL"),
    ("exec", "s2", "c"),                                # 26000
    ("prepare", "s2", "SELECT $1::text || '-y'"),
    ("exec", "s2", "d"),
    ("prepare", "s1", "SELECT $1::int + 1"),
    ("exec", "s1", "3"),
    ("q", "DEALLOCATE ALL"),                            # leave the session as it started
]


def run_scenario(pgconn, steps=SCENARIO) -> list[tuple]:
    """Run the steps on a psycopg ``pq.PGconn``; one (step, outcome) per step, the
    outcome being the rows or the SQLSTATE of the error."""
    out = []
    for step in steps:
        kind = step[0]
        if kind == "prepare":
            res = pgconn.prepare(step[1].encode(), step[2].encode())
        elif kind == "exec":
            res = pgconn.exec_prepared(step[1].encode(), [step[2].encode()])
        elif kind == "close":
            res = pgconn.close_prepared(step[1].encode())
        elif kind == "q":
            res = pgconn.exec_(step[1].encode())
        else:
            res = pgconn.exec_params(step[1].encode(), [])
        if res.status == pq.ExecStatus.FATAL_ERROR:
            outcome = ("error", res.error_field(pq.DiagnosticField.SQLSTATE).decode())
        elif res.status == pq.ExecStatus.TUPLES_OK:
            outcome = ("rows", [tuple(None if res.get_value(r, c) is None else res.get_value(r, c).decode()
                                      for c in range(res.nfields)) for r in range(res.ntuples)])
        else:
            outcome = ("ok", (res.command_status or b"").decode())
        out.append((step, outcome))
    return out


@pytest.mark.timeout(90)
def test_prepared_names_deallocate_discard_like_direct(pg, bouncer):
    """psycopg 3's libpq API, 6 clients on 2 servers, each running SCENARIO three
    times while 4 more clients keep the same statement texts prepared on every
    server: every step must have the outcome it has on a direct connection."""
    runners, noise_clients, repeats, pool = 6, 4, 3, 2
    b = tx_bouncer(bouncer, default_pool_size=pool, max_prepared_statements=10)
    wait_no_backends(pg)
    with psycopg.connect(pg.dsn("app", "app"), autocommit=True, application_name="scenario") as direct:
        expected = run_scenario(direct.pgconn)
    # sanity of the reference itself
    outcomes = {i: o for i, (_, o) in enumerate(expected)}
    assert outcomes[2] == ("rows", [("42",)]) and outcomes[5] == ("error", "42P05")
    assert outcomes[32] == ("rows", [("0",)]) and outcomes[33] == ("rows", [("scenario",)])
    stop = threading.Event()

    def noise(i: int) -> int:
        # Other clients that prepare the scenario's texts (pooler-wide statements) all the time.
        done = 0
        with psycopg.connect(b.dsn(), autocommit=True, application_name=f"noise-{i}") as conn:
            pgc = conn.pgconn
            for k in range(400):
                if stop.is_set():
                    break
                for sql in ("SELECT $1::int + 1", "SELECT $1::text || '-y'", "SELECT $1::int + 2"):
                    name = f"n{k % 3}".encode()
                    assert pgc.prepare(name, sql.encode()).status == pq.ExecStatus.COMMAND_OK
                    res = pgc.exec_prepared(name, [b"5"])
                    assert res.status == pq.ExecStatus.TUPLES_OK, res.error_message
                    assert pgc.close_prepared(name).status == pq.ExecStatus.COMMAND_OK
                    assert pgc.exec_(b"SHOW application_name").get_value(0, 0) == f"noise-{i}".encode()
                    done += 1
        return done

    def runner(i: int) -> None:
        with psycopg.connect(b.dsn(), autocommit=True, application_name="scenario") as conn:
            for rep in range(repeats):
                got = run_scenario(conn.pgconn)
                diffs = [f"step {n} {step}: direct {want[1]}, pooled {have[1]}"
                         for n, (step, want, have) in enumerate(
                             zip(SCENARIO, expected, got)) if want != have]
                assert not diffs, f"repeat {rep}, {len(diffs)} steps differ:\n" + "\n".join(diffs[:10])

    with BackendSampler(pg, "app", interval=0.05) as sampler, ThreadPoolExecutor(noise_clients) as ex:
        noise_futures = [ex.submit(noise, i) for i in range(noise_clients)]
        try:
            run_clients(runner, runners)
        finally:
            stop.set()
        assert all(f.result(timeout=60) > 0 for f in noise_futures)
    assert_pool_bound(sampler, pg, pool)


# -- psycopg2 ----------------------------------------------------------------------

ZONES = ["Pacific/Auckland", "Asia/Tokyo", "America/New_York", "Europe/Paris", "Australia/Sydney", "America/Sao_Paulo"]


@pytest.mark.timeout(90)
def test_psycopg2_transactions_and_session_sets(pg, bouncer):
    """12 psycopg2 connections: SETs in autocommit (search_path, statement_timeout,
    a custom placeholder, TimeZone and IntervalStyle which the server reports),
    then transactions (inserts, selects, updates, SET LOCAL, rollbacks)."""
    clients, iterations = 12, 12
    schemas = make_schemas(pg, "p2_c", clients)
    b = tx_bouncer(bouncer)
    wait_no_backends(pg)

    def client(i: int) -> None:
        schema, mine, zone = schemas[i], own_timeout(i), ZONES[i % len(ZONES)]
        style = "iso_8601" if i % 2 else "postgres_verbose"
        conn = b.connect(application_name=f"p2-{i}")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"SET search_path = {schema}")
                cur.execute(f"SET statement_timeout = '{mine}'")
                cur.execute(f"SET geo.client = 'c{i}'")
                cur.execute(f"SET TIME ZONE '{zone}'")
                cur.execute(f"SET IntervalStyle = {style}")
            conn.autocommit = False
            want = (schema, mine, f"c{i}", zone, style, f"p2-{i}")
            settings_sql = ("SELECT current_setting('search_path'), current_setting('statement_timeout'),"
                            " current_setting('geo.client', true), current_setting('TimeZone'),"
                            " current_setting('IntervalStyle'), current_setting('application_name')")
            for seq in range(iterations):
                with conn.cursor() as cur:
                    cur.execute("INSERT INTO items (client, seq, val) VALUES (%s, %s, %s)",
                                (i, seq, expected_val("r", i, seq, False)))
                    cur.execute(settings_sql)
                    assert cur.fetchone() == want, f"client {i} seq {seq} in a transaction"
                conn.commit()
                with conn.cursor() as cur:
                    cur.execute("SET LOCAL statement_timeout = '33s'")
                    cur.execute("UPDATE items SET val = val || '+u' WHERE client = %s AND seq = %s", (i, seq))
                    assert cur.rowcount == 1
                    cur.execute("SELECT current_setting('statement_timeout')")
                    assert cur.fetchone() == ("33s",)
                if seq % 4 == 3:
                    conn.rollback()
                else:
                    conn.commit()
                with conn.cursor() as cur:
                    cur.execute("INSERT INTO items (client, seq, val) VALUES (%s, %s, 'doomed')", (i, 1000 + seq))
                conn.rollback()
                with conn.cursor() as cur:
                    cur.execute("SELECT val FROM items WHERE client = %s AND seq = %s", (i, seq))
                    assert cur.fetchall() == [(expected_val("r", i, seq, seq % 4 != 3),)]
                    cur.execute(settings_sql)
                    assert cur.fetchone() == want, f"client {i} seq {seq} after SET LOCAL"
                conn.commit()
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("RESET statement_timeout")
                cur.execute("RESET geo.client")
                for _ in range(5):
                    cur.execute("SELECT current_setting('statement_timeout'), current_setting('search_path'),"
                                " current_setting('TimeZone'), coalesce(current_setting('geo.client', true), '')")
                    assert cur.fetchone() == ("0", schema, zone, ""), f"client {i} after RESET"
                cur.execute("SELECT client, seq, val FROM items ORDER BY seq")
                assert cur.fetchall() == [(i, s, expected_val("r", i, s, s % 4 != 3)) for s in range(iterations)]
        finally:
            conn.close()

    with BackendSampler(pg, "app", interval=0.05) as sampler:
        run_clients(client, clients)
    assert_pool_bound(sampler, pg)
    for i, schema in enumerate(schemas):
        assert schema_rows(pg, schema) == [(i, s, expected_val("r", i, s, s % 4 != 3)) for s in range(iterations)]


@pytest.mark.timeout(90)
def test_track_extra_parameters_search_path(pg, bouncer):
    """track_extra_parameters = search_path: 10 clients, some giving search_path at
    startup (options -c), some SETting it, some leaving it alone, through 3
    servers: each always works in its own schema, or in the default one."""
    clients, iterations = 10, 12
    schemas = make_schemas(pg, "tep_c", clients)
    make_table(pg, "public.items", "client int NOT NULL, seq int NOT NULL, val text NOT NULL, PRIMARY KEY (client, seq)")
    b = tx_bouncer(bouncer, track_extra_parameters="IntervalStyle, search_path")
    wait_no_backends(pg)
    default_path = pg.psql("SHOW search_path", dbname="app")[0][0]

    def how(i: int) -> str:
        return ("startup", "set", "default")[i % 3]

    def client(i: int) -> None:
        mode = how(i)
        extra = {"options": f"-c search_path={schemas[i]}"} if mode == "startup" else {}
        conn = b.connect(autocommit=True, **extra)
        path = default_path if mode == "default" else schemas[i]
        try:
            with conn.cursor() as cur:
                if mode == "set":
                    cur.execute(f"SET search_path = {schemas[i]}")
                for seq in range(iterations):
                    cur.execute("INSERT INTO items (client, seq, val) VALUES (%s, %s, %s)",
                                (i, seq, expected_val("t", i, seq, False)))
                    cur.execute("SELECT current_setting('search_path')")
                    assert cur.fetchone() == (path,), f"client {i} ({mode}) seq {seq}"
        finally:
            conn.close()

    with BackendSampler(pg, "app", interval=0.05) as sampler:
        run_clients(client, clients)
    assert_pool_bound(sampler, pg)
    for i in range(clients):
        where = "public" if how(i) == "default" else schemas[i]
        rows = pg.psql(f"SELECT client, seq, val FROM {where}.items WHERE client = %s ORDER BY seq", (i,),
                       dbname="app")
        assert rows == [(i, s, expected_val("t", i, s, False)) for s in range(iterations)], \
            f"client {i} ({how(i)}): rows in {where}.items"
    for i, schema in enumerate(schemas):
        assert {r[0] for r in schema_rows(pg, schema)} <= {i}, f"other clients' rows in {schema}.items"


# -- SQLAlchemy ----------------------------------------------------------------------

@pytest.mark.timeout(90)
@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_sqlalchemy_orm_sessions(pg, bouncer, driver):
    """10 threads, each with its own engine (one client connection at a time),
    ORM sessions doing inserts, selects and updates in transactions. With the
    psycopg (3) driver its default prepare_threshold=5 prepares repeated queries."""
    try:
        import sqlalchemy
    except ImportError:
        pytest.fail(f"SQLAlchemy not installed; {INSTALL_HINT}", pytrace=False)
    from sqlalchemy import Column, Integer, Text, event, select, text
    from sqlalchemy.orm import Session, declarative_base

    Base = declarative_base()

    class Item(Base):
        __tablename__ = "orm_items"
        id = Column(Integer, primary_key=True)
        client = Column(Integer, nullable=False)
        seq = Column(Integer, nullable=False)
        val = Column(Text, nullable=False)
        version = Column(Integer, nullable=False, default=1)

    clients, iterations = 10, 12
    make_table(pg, "orm_items", "id serial PRIMARY KEY, client int NOT NULL, seq int NOT NULL, val text NOT NULL,"
                                " version int NOT NULL DEFAULT 1")
    b = tx_bouncer(bouncer)
    wait_no_backends(pg)
    url = f"postgresql+{driver}://app:{APP_PW}@{b.host}:{b.port}/app"

    def client(i: int) -> None:
        mine = own_timeout(i)
        engine = sqlalchemy.create_engine(url, pool_size=1, max_overflow=0,
                                          connect_args={"application_name": f"orm-{i}"})

        @event.listens_for(engine, "connect")
        def on_connect(dbapi_conn, record):
            # Session SETs outside a transaction, as an application's connect hook does.
            dbapi_conn.autocommit = True
            cur = dbapi_conn.cursor()
            cur.execute(f"SET statement_timeout = '{mine}'")
            cur.close()
            dbapi_conn.autocommit = False

        try:
            for seq in range(iterations):
                with Session(engine) as session, session.begin():
                    session.add(Item(client=i, seq=seq, val=expected_val("o", i, seq, False)))
                with Session(engine) as session, session.begin():
                    item = session.scalars(select(Item).where(Item.client == i, Item.seq == seq)).one()
                    assert item.val == expected_val("o", i, seq, False)
                    item.val = expected_val("o", i, seq, True)
                    item.version += 1
                    session.execute(text("SET LOCAL statement_timeout = '22s'"))
                    assert session.execute(text("SELECT current_setting('statement_timeout')")).scalar() == "22s"
                with Session(engine) as session:
                    st, app = session.execute(text("SELECT current_setting('statement_timeout'),"
                                                   " current_setting('application_name')")).one()
                    assert (st, app) == (mine, f"orm-{i}"), f"client {i} seq {seq}"
                    items = session.scalars(select(Item).where(Item.client == i).order_by(Item.seq)).all()
                    assert [(x.client, x.seq, x.val, x.version) for x in items] == \
                        [(i, s, expected_val("o", i, s, True), 2) for s in range(seq + 1)]
            with Session(engine) as session, session.begin():
                for item in session.scalars(select(Item).where(Item.client == i)):
                    item.version += 10
        finally:
            engine.dispose()

    with BackendSampler(pg, "app", interval=0.05) as sampler:
        run_clients(client, clients)
    assert_pool_bound(sampler, pg)
    rows = pg.psql("SELECT client, seq, val, version FROM orm_items ORDER BY client, seq", dbname="app")
    assert rows == [(i, s, expected_val("o", i, s, True), 12) for i in range(clients) for s in range(iterations)]


# -- pgbench -------------------------------------------------------------------------

BENCH_DB = "bench_clients"


@pytest.mark.timeout(120)
def test_pgbench_prepared_50_clients(pg, bouncer):
    """pgbench -M prepared (tpcb-like, 7 named statements per client) with 50
    clients through 5 servers that may keep only 4 statements each.

    One pgbench thread per client (-j 50): pgbench prepares with a blocking
    PQprepare, so a thread driving several clients would wait there for a server
    while its other clients hold every server in an open transaction, a deadlock
    of pgbench's own making with any transaction pooler."""
    clients, per_client, pool = 50, 20, 5
    if not pg.psql("SELECT 1 FROM pg_database WHERE datname = %s", (BENCH_DB,)):
        pg.psql(f"CREATE DATABASE {BENCH_DB} OWNER app")
    env = {**os.environ, "PGPASSWORD": APP_PW}
    init = subprocess.run(["pgbench", "-i", "-q", "-s", "1", "-h", pg.host, "-p", str(pg.port), "-U", "app",
                           BENCH_DB], env=env, capture_output=True, text=True, check=False, timeout=120)
    assert init.returncode == 0, init.stdout + init.stderr
    b = bouncer(databases={BENCH_DB: pg.conninfo(BENCH_DB)},
                pgbouncer={"pool_mode": "transaction", "default_pool_size": pool, "max_client_conn": 200,
                           "auth_type": "md5", "max_prepared_statements": 4})
    wait_no_backends(pg, BENCH_DB)
    cmd = ["pgbench", "-n", "-c", str(clients), "-j", str(clients), "-t", str(per_client), "-M", "prepared",
           "-h", b.host, "-p", str(b.port), "-U", "app", BENCH_DB]
    with BackendSampler(pg, BENCH_DB, interval=0.05) as sampler:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=100)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert re.search(r"^number of failed transactions: 0 \(", out, re.MULTILINE), out
    done = re.search(r"^number of transactions actually processed: (\d+)/(\d+)$", out, re.MULTILINE)
    assert done and int(done.group(1)) == int(done.group(2)) == clients * per_client, out
    assert not sampler.errors and sampler.max <= pool, f"server connections seen: max {sampler.max}"
    # tpcb-like moves the same delta through accounts, tellers, branches and history.
    sums = pg.psql("SELECT (SELECT count(*) FROM pgbench_history), (SELECT coalesce(sum(delta), 0) FROM pgbench_history),"
                   " (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers),"
                   " (SELECT sum(bbalance) FROM pgbench_branches)", dbname=BENCH_DB)[0]
    assert sums[0] == clients * per_client, sums
    assert sums[1] == sums[2] == sums[3] == sums[4], f"balances disagree: {sums}"


# -- pgjdbc and node-postgres, as subprocesses ------------------------------------------

def check_driver_output(proc: subprocess.CompletedProcess, clients: int, iterations: int, what: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{out[-6000:]}"
    oks = re.findall(r"^OK client=(\d+) rows=(\d+) sum=(\d+)$", proc.stdout, re.MULTILINE)
    assert sorted(int(c) for c, _, _ in oks) == list(range(clients)), out[-4000:]
    assert all(int(n) == iterations and int(s) == sum(range(iterations)) for _, n, s in oks), out[-4000:]


def check_schemas(pg, schemas: list[str], prefix: str, iterations: int) -> None:
    for i, schema in enumerate(schemas):
        want = [(i, s, f"{prefix}{i}-{s}" + ("+u" if s % 5 == 4 else "")) for s in range(iterations)]
        assert schema_rows(pg, schema) == want, f"{schema}.items"


@pytest.mark.timeout(150)
def test_pgjdbc_prepared_statements(pg, bouncer, tmp_path):
    """tests/clients/Prep.java: 10 pgjdbc connections, PreparedStatements reused far
    past prepareThreshold (named server statements S_1.. in every client)."""
    java, javac = tool("java"), tool("javac")
    if not JDBC_JAR.exists():
        pytest.fail(f"pgjdbc not installed ({JDBC_JAR} missing); {INSTALL_HINT}", pytrace=False)
    compiled = subprocess.run([javac, "-d", str(tmp_path), str(CLIENTS_DIR / "Prep.java")],
                              capture_output=True, text=True, check=False, timeout=120)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    clients, iterations = 10, 20
    schemas = make_schemas(pg, "jdbc_c", clients)
    b = tx_bouncer(bouncer, max_prepared_statements=6)
    wait_no_backends(pg)
    cmd = [java, "-cp", f"{JDBC_JAR}{os.pathsep}{tmp_path}", "Prep", b.host, str(b.port), "app", "app", APP_PW,
           str(clients), str(iterations), "jdbc_c"]
    with BackendSampler(pg, "app", interval=0.05) as sampler:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=140)
    check_driver_output(proc, clients, iterations, "Prep.java")
    assert_pool_bound(sampler, pg)
    check_schemas(pg, schemas, "j", iterations)


@pytest.mark.timeout(150)
def test_node_pg_named_prepared_queries(pg, bouncer):
    """tests/clients/prep.js: 12 node-postgres clients with named prepared queries
    (Parse once per connection, then Bind/Execute, names shared by every client)."""
    node = tool("node")
    if not (CLIENTS_DIR / "node_modules" / "pg" / "package.json").exists():
        pytest.fail(f"node-postgres not installed in {CLIENTS_DIR / 'node_modules'}; {INSTALL_HINT}",
                    pytrace=False)
    clients, iterations = 12, 20
    schemas = make_schemas(pg, "node_c", clients)
    b = tx_bouncer(bouncer, max_prepared_statements=6)
    wait_no_backends(pg)
    cmd = [node, str(CLIENTS_DIR / "prep.js"), b.host, str(b.port), "app", "app", APP_PW, str(clients),
           str(iterations), "node_c"]
    with BackendSampler(pg, "app", interval=0.05) as sampler:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=140, cwd=CLIENTS_DIR)
    check_driver_output(proc, clients, iterations, "prep.js")
    assert_pool_bound(sampler, pg)
    check_schemas(pg, schemas, "n", iterations)
