"""Query routing and rewrite hooks (pgbouncer-rr compatible) against real servers.

The main scenario is pgbouncer-rr's own: two PostgreSQL servers, ``tablea`` only
on the first and ``tableb`` only on the second, and ``conf/routing_rules.py``
sending each query to the one that has its table:

    [databases]
    dev   = server 1          (the client's own database)
    dev.1 = server 1
    dev.2 = server 2

One client on ``dev`` reads and writes both tables, in simple and extended
protocol (unnamed and named statements), in transaction and session pooling.
A route takes effect only at a transaction boundary, so a transaction touching
tablea then tableb stays on one server and fails there; the hook sees
``in_transaction`` as the pooler does (recorded by a hook written into tmp_path,
which imports the example as a helper from its own folder).

Also: ``conf/rewrite_query.py``'s star-schema rewrite (the server log shows the
rewritten text), parse messages keep their statement name and parameter types, a
200 kB query through a rewrite hook, hooks that raise or return junk or an unknown
key (the query still runs, the error is logged once and counted in SHOW ROUTING),
``rewrite_query_disconnect_on_failure``, reload of a changed module (SIGHUP and
admin RELOAD, helpers re-imported) and of a broken one (the previous version
keeps running), and a routed pool logging in with its entry's user=/password=.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import struct
import textwrap
from pathlib import Path

import asyncpg
import psycopg
import psycopg2
import psycopg2.errors
import pytest
from fixtures.ports import wait_until
from psycopg.types.numeric import Int8

pytestmark = pytest.mark.geobouncer_only("routing and rewrite hooks (pgbouncer-rr)")

CONF = Path(__file__).resolve().parents[2] / "conf"
DB = "rr_dev"  # the dbname behind dev / dev.1 / dev.2 on both servers

SCHEMA_1 = """
DROP TABLE IF EXISTS tablea, sales, store, product, store_sales, product_sales;
CREATE TABLE tablea (id int PRIMARY KEY, v text);
CREATE TABLE store (storeid int PRIMARY KEY, storename text);
CREATE TABLE product (productid int PRIMARY KEY, prodname text);
CREATE TABLE sales (storeid int, productid int, total numeric);
INSERT INTO store VALUES (1, 'north'), (2, 'south');
INSERT INTO product VALUES (1, 'apple'), (2, 'pear');
INSERT INTO sales VALUES (1, 1, 1), (2, 2, 2);
-- The pre-aggregated tables deliberately disagree with the join, so the rows
-- returned say which query ran.
CREATE TABLE store_sales (storename text, total numeric);
INSERT INTO store_sales VALUES ('north', 1000), ('south', 2000), ('west', 3000);
CREATE TABLE product_sales (prodname text, total numeric);
INSERT INTO product_sales VALUES ('apple', 10), ('fig', 30), ('pear', 20);
"""
SCHEMA_2 = """
DROP TABLE IF EXISTS tableb;
CREATE TABLE tableb (id int PRIMARY KEY, v text);
"""

# Writes down every routing_rules call, then answers as conf/routing_rules.py does
# (copied next to it as a helper module: the hook's own folder is importable).
RECORDING_ROUTER = '''
import json
import os

import example_routing

CALLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "route_calls.jsonl")


def routing_rules(username, query, in_transaction):
    key = example_routing.routing_rules(username, query, in_transaction)
    with open(CALLS, "a") as f:
        f.write(json.dumps([username, query, in_transaction, key]) + "\\n")
    return key
'''

STORE_REPORT = (
    "select   storename, sum(total)\n FROM sales JOIN store USING (storeid)\n"
    "  GROUP BY storename\n ORDER BY storename ;"
)
PRODUCT_REPORT = (
    "SELECT prodname, SUM(total) FROM sales JOIN product USING (productid) "
    "GROUP BY prodname ORDER BY prodname"
)
STORE_ROWS = [("north", 1000), ("south", 2000), ("west", 3000)]
PRODUCT_ROWS = [("apple", 10), ("fig", 30), ("pear", 20)]


# -- helpers -----------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def one(conn, sql, params=None):
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()


def rows(conn, sql, params=None):
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def pg3(b, dbname="dev", **kw):
    """psycopg 3 through the pooler (extended protocol); unnamed statements by default."""
    kw.setdefault("autocommit", True)
    kw.setdefault("prepare_threshold", None)
    return psycopg.connect(b.dsn(dbname), **kw)


def numeric_rows(result):
    return [(name, int(total)) for name, total in result]


def routing_rows(b) -> dict:
    """SHOW ROUTING: {hook name: row} and {("route", key): count}."""
    out = {}
    for row in b.admin("SHOW ROUTING"):
        values = tuple(row)
        if values[0] == "route":
            out[("route", values[1])] = values[2]
        else:
            out[values[0]] = row
    return out


def reloaded(b, how: str) -> None:
    """Reload (SIGHUP or admin RELOAD) and return once it is done. RELOAD answers after
    the reload; SIGHUP's line is logged as the reload starts (as PgBouncer logs it), and
    the reload runs to its end before the hub serves a console round trip after it."""
    if how != "sighup":
        b.admin("RELOAD")
        return
    mark = b.log_offset()
    b.reload()
    wait_until(lambda: "got SIGHUP, re-reading config" in b.log_text(mark), timeout=15,
               message="SIGHUP handled")
    b.admin("SHOW VERSION")


def recorder(hook_dir: Path) -> Path:
    """The recording router in ``hook_dir`` (with the example as its helper)."""
    hook_dir.mkdir(exist_ok=True)
    shutil.copy(CONF / "routing_rules.py", hook_dir / "example_routing.py")
    return write(hook_dir / "recording_router.py", RECORDING_ROUTER)


def recorded(hook_dir: Path) -> list[tuple]:
    path = hook_dir / "route_calls.jsonl"
    if not path.exists():
        return []
    return [tuple(json.loads(line)) for line in path.read_text().splitlines() if line]


def calls_for(hook_dir: Path, marker: str) -> list[tuple]:
    """(query, in_transaction, key) of the recorded calls whose query contains ``marker``."""
    return [(q, tx, key) for _, q, tx, key in recorded(hook_dir) if marker in q]


# -- the clusters -----------------------------------------------------------------


@pytest.fixture(scope="module")
def server1(pg):
    """The session server: database rr_dev with tablea and the star schema (owner app)."""
    if not pg.psql("SELECT 1 FROM pg_database WHERE datname = %s", (DB,)):
        pg.psql(f"CREATE DATABASE {DB} OWNER app")
    pg.psql(SCHEMA_1, dbname=DB, user="app")
    return pg


@pytest.fixture
def two_servers(server1, make_pg):
    """(server 1, server 2): tablea only on the first, tableb only on the second; both empty."""
    server1.psql("TRUNCATE tablea", dbname=DB, user="app")
    server2 = make_pg(name="rr-b")
    server2.psql(f"CREATE DATABASE {DB} OWNER app")
    server2.psql(SCHEMA_2, dbname=DB, user="app")
    return server1, server2


def dev_databases(s1, s2) -> dict:
    return {"dev": s1.conninfo(DB), "dev.1": s1.conninfo(DB), "dev.2": s2.conninfo(DB)}


def rr_bouncer(bouncer, s1, s2, pool_mode, hook_dir, **settings):
    router = recorder(hook_dir)
    return bouncer(databases=dev_databases(s1, s2), pgbouncer={
        "pool_mode": pool_mode,
        "routing_rules_py_module_file": str(router),
        "rewrite_query_py_module_file": str(CONF / "rewrite_query.py"),
        **settings,
    })


# -- two servers, one client -----------------------------------------------------


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_one_client_reads_and_writes_both_servers(two_servers, bouncer, tmp_path, pool_mode):
    s1, s2 = two_servers
    hook_dir = tmp_path / "hooks"
    b = rr_bouncer(bouncer, s1, s2, pool_mode, hook_dir)

    # Simple protocol (psycopg2), autocommit: each statement goes to the server of its table.
    conn = b.connect("dev", autocommit=True)
    try:
        assert one(conn, "SELECT inet_server_port()") == (s1.port,)  # dev itself: server 1
        with conn.cursor() as cur:
            cur.execute("INSERT INTO tablea VALUES (1, 'a-simple')")
            cur.execute("INSERT INTO tableb VALUES (1, 'b-simple')")
            cur.execute("UPDATE tablea SET v = v || '!' WHERE id = 1")
            cur.execute("UPDATE tableb SET v = v || '?' WHERE id = 1")
        assert one(conn, "SELECT v, inet_server_port() FROM tablea WHERE id = 1") == ("a-simple!", s1.port)
        assert one(conn, "SELECT v, inet_server_port() FROM tableb WHERE id = 1") == ("b-simple?", s2.port)
        # None keeps the current choice: an unrouted query stays where the last route went.
        assert one(conn, "SELECT inet_server_port()") == (s2.port,)
        assert one(conn, "SELECT count(*) FROM TableA") == (1,)
        assert one(conn, "SELECT inet_server_port()") == (s1.port,)
        if pool_mode == "session":
            # One server per routed pool, kept for the whole session.
            pid_a = one(conn, "SELECT pg_backend_pid() FROM tablea")
            pid_b = one(conn, "SELECT pg_backend_pid() FROM tableb")
            for _ in range(3):
                assert one(conn, "SELECT pg_backend_pid() FROM tablea") == pid_a
                assert one(conn, "SELECT pg_backend_pid() FROM tableb") == pid_b
    finally:
        conn.close()

    # Extended protocol, unnamed statements (psycopg 3).
    with pg3(b) as c3:
        c3.execute("INSERT INTO tablea VALUES (%s, %s)", (2, "a-ext"))
        c3.execute("INSERT INTO tableb VALUES (%s, %s)", (2, "b-ext"))
        assert c3.execute("SELECT v, inet_server_port() FROM tablea WHERE id = %s", (2,)).fetchone() \
            == ("a-ext", s1.port)
        assert c3.execute("SELECT v, inet_server_port() FROM tableb WHERE id = %s", (2,)).fetchone() \
            == ("b-ext", s2.port)

    # Extended protocol, named statements: later Binds go where their Parse was routed.
    with pg3(b, prepare_threshold=0) as c3:
        for i in range(3, 7):
            c3.execute("INSERT INTO tablea VALUES (%s, %s)", (i, f"a{i}"), prepare=True)
            c3.execute("INSERT INTO tableb VALUES (%s, %s)", (i, f"b{i}"), prepare=True)
            assert c3.execute("SELECT v, inet_server_port() FROM tablea WHERE id = %s", (i,),
                              prepare=True).fetchone() == (f"a{i}", s1.port)
            assert c3.execute("SELECT v, inet_server_port() FROM tableb WHERE id = %s", (i,),
                              prepare=True).fetchone() == (f"b{i}", s2.port)

    # asyncpg: named statements from its statement cache, Parse/Describe then Bind/Execute.
    async def with_asyncpg():
        conn = await asyncpg.connect(host=b.host, port=b.port, user="app", password="app_pw",
                                     database="dev")
        try:
            got = []
            for i in range(7, 10):
                await conn.execute("INSERT INTO tablea VALUES ($1, $2)", i, f"a{i}")
                await conn.execute("INSERT INTO tableb VALUES ($1, $2)", i, f"b{i}")
                got.append(tuple(await conn.fetchrow(
                    "SELECT v, inet_server_port() FROM tablea WHERE id = $1", i)))
                got.append(tuple(await conn.fetchrow(
                    "SELECT v, inet_server_port() FROM tableb WHERE id = $1", i)))
            return got
        finally:
            await conn.close()

    got = asyncio.run(with_asyncpg())
    assert got == [row for i in range(7, 10) for row in ((f"a{i}", s1.port), (f"b{i}", s2.port))]

    # Every row landed on the server that has its table.
    assert s1.psql("SELECT id, v FROM tablea ORDER BY id", dbname=DB, user="app") == \
        [(1, "a-simple!"), (2, "a-ext")] + [(i, f"a{i}") for i in range(3, 10)]
    assert s2.psql("SELECT id, v FROM tableb ORDER BY id", dbname=DB, user="app") == \
        [(1, "b-simple?"), (2, "b-ext")] + [(i, f"b{i}") for i in range(3, 10)]

    # Every call was made outside a transaction, and routed by the example's table.
    calls = [c for c in calls_for(hook_dir, "") if re.search(r"\btable[ab]\b", c[0], re.IGNORECASE)]
    assert calls and all(tx is False for _, tx, _ in calls), calls
    for query, _, key in calls:
        assert key == ("dev.1" if "tablea" in query.lower() else "dev.2"), query
    stats = routing_rows(b)
    assert stats["routing_rules"].calls >= len(calls)
    assert stats["routing_rules"].errors == 0
    assert stats[("route", "dev.1")] > 0 and stats[("route", "dev.2")] > 0
    assert stats["rewrite_query"].name == str(CONF / "rewrite_query.py")
    assert "Traceback" not in b.log_text()


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_transaction_stays_on_one_server(two_servers, bouncer, tmp_path, pool_mode):
    s1, s2 = two_servers
    hook_dir = tmp_path / "hooks"
    b = rr_bouncer(bouncer, s1, s2, pool_mode, hook_dir)
    s1.psql("INSERT INTO tablea VALUES (1, 'a')", dbname=DB, user="app")
    s2.psql("INSERT INTO tableb VALUES (1, 'b')", dbname=DB, user="app")

    conn = b.connect("dev", autocommit=True)
    try:
        assert one(conn, "SELECT v FROM tablea /* t0 */") == ("a",)  # now on dev.1
        conn.autocommit = False
        for attempt in range(2):
            # psycopg2 sends BEGIN (no table: stays on dev.1), then the statements.
            assert one(conn, f"SELECT v, inet_server_port() FROM tablea /* t1-{attempt} */") \
                == ("a", s1.port)
            with pytest.raises(psycopg2.errors.UndefinedTable, match='"tableb" does not exist'):
                one(conn, f"SELECT v FROM tableb /* t2-{attempt} */")
            conn.rollback()
        # Outside the transaction again, tableb is routed to server 2.
        conn.autocommit = True
        assert one(conn, "SELECT v, inet_server_port() FROM tableb /* t3 */") == ("b", s2.port)

        # One simple Query holding a whole transaction: routed by its first table, fails whole.
        with pytest.raises(psycopg2.errors.UndefinedTable, match='"tableb" does not exist'):
            one(conn, "BEGIN; INSERT INTO tablea VALUES (2, 'lost'); SELECT * FROM tableb; COMMIT")
        with conn.cursor() as cur:  # the BEGIN left an aborted transaction block open, as on a direct connection
            cur.execute("ROLLBACK")
        assert one(conn, "SELECT count(*), inet_server_port() FROM tablea /* t4 */") == (1, s1.port)
    finally:
        conn.close()

    for attempt in range(2):
        assert calls_for(hook_dir, f"t1-{attempt}") == [
            (f"SELECT v, inet_server_port() FROM tablea /* t1-{attempt} */", True, "dev.1")]
        assert calls_for(hook_dir, f"t2-{attempt}") == [
            (f"SELECT v FROM tableb /* t2-{attempt} */", True, "dev.2")]
    assert [tx for _, tx, _ in calls_for(hook_dir, "t3")] == [False]
    # The BEGINs psycopg2 sent came outside a transaction, the ROLLBACKs (its two and
    # the one after the failed one-message transaction) inside one.
    begins = [(q, tx) for _, q, tx, _ in recorded(hook_dir) if q == "BEGIN"]
    rollbacks = [(q, tx) for _, q, tx, _ in recorded(hook_dir) if q == "ROLLBACK"]
    assert begins == [("BEGIN", False)] * 2
    assert rollbacks == [("ROLLBACK", True)] * 3

    # Logged once for this client and target, though refused twice.
    refused = [line for line in b.log_text().splitlines()
               if "routing_rules chose dev.2 in the middle of a transaction on dev.1" in line]
    assert len(refused) == 1, refused

    # Extended protocol (psycopg 3, not autocommit): same story, in_transaction as it should be.
    with pg3(b, autocommit=False) as c3:
        assert c3.execute("SELECT v FROM tablea WHERE id = %s /* x1 */", (1,)).fetchone() == ("a",)
        with pytest.raises(psycopg.errors.UndefinedTable):
            c3.execute("SELECT v FROM tableb WHERE id = %s /* x2 */", (1,))
        c3.rollback()
        c3.autocommit = True
        assert c3.execute("SELECT v, inet_server_port() FROM tableb WHERE id = %s /* x3 */",
                          (1,)).fetchone() == ("b", s2.port)
    assert [tx for _, tx, _ in calls_for(hook_dir, "x1")] == [True]  # after psycopg's BEGIN
    assert [tx for _, tx, _ in calls_for(hook_dir, "x2")] == [True]
    assert [tx for _, tx, _ in calls_for(hook_dir, "x3")] == [False]
    # Nothing was written by the failed transactions.
    assert s1.psql("SELECT id FROM tablea", dbname=DB, user="app") == [(1,)]


# -- rewrite ------------------------------------------------------------------------


def test_star_schema_rewrite(server1, bouncer):
    """conf/rewrite_query.py: the reports read the pre-aggregated tables."""
    assert numeric_rows(server1.psql(STORE_REPORT, dbname=DB, user="app")) == [("north", 1), ("south", 2)]
    b = bouncer(databases={"dev": server1.conninfo(DB)}, pgbouncer={
        "pool_mode": "transaction",
        "rewrite_query_py_module_file": str(CONF / "rewrite_query.py"),
    })
    offset = server1.log_offset()
    with server1.log_statements("all"):
        conn = b.connect("dev", autocommit=True)
        try:
            assert numeric_rows(rows(conn, STORE_REPORT)) == STORE_ROWS
            assert numeric_rows(rows(conn, PRODUCT_REPORT)) == PRODUCT_ROWS
            assert one(conn, "SELECT count(*) FROM sales") == (2,)  # other queries untouched
        finally:
            conn.close()
        with pg3(b) as c3:  # extended protocol: unnamed, then named statements
            assert numeric_rows(c3.execute(STORE_REPORT).fetchall()) == STORE_ROWS  # simple
            binary = c3.cursor(binary=True)  # extended, unnamed statement
            assert numeric_rows(binary.execute(STORE_REPORT).fetchall()) == STORE_ROWS
            for _ in range(3):
                assert numeric_rows(c3.execute(PRODUCT_REPORT, prepare=True).fetchall()) == PRODUCT_ROWS
        log = server1.log_text(offset)
    statements = [line for line in log.splitlines() if "statement:" in line or "execute" in line]
    assert any("FROM store_sales" in line for line in statements), log[-3000:]
    assert any("FROM product_sales" in line for line in statements), log[-3000:]
    assert not any("JOIN store USING" in line or "JOIN product USING" in line
                   for line in statements), statements
    row = routing_rows(b)["rewrite_query"]
    assert row.calls >= 6 and row.errors == 0


def test_parse_keeps_statement_name_and_parameter_types(server1, bouncer, tmp_path):
    hook = write(tmp_path / "rw.py", """
        def rewrite_query(username, query, in_transaction):
            return query.replace("'original'", "'rewritten'")
    """)
    b = bouncer(databases={"dev": server1.conninfo(DB)}, pgbouncer={
        "pool_mode": "transaction", "rewrite_query_py_module_file": str(hook)})
    sql = "SELECT pg_typeof(%s)::text, pg_typeof(%s)::text, %s::text || 'original'"
    with pg3(b) as c3:
        for i in range(4):  # Parse with the name once, then Binds of that name
            got = c3.execute(sql, (Int8(i), 1.5, f"n{i}-"), prepare=True).fetchone()
            assert got == ("bigint", "double precision", f"n{i}-rewritten")
        assert c3.execute(sql, (Int8(9), 2.5, "u-")).fetchone() == \
            ("bigint", "double precision", "u-rewritten")

    async def with_asyncpg():
        conn = await asyncpg.connect(host=b.host, port=b.port, user="app", password="app_pw",
                                     database="dev")
        try:
            stmt = await conn.prepare("SELECT $1::int8 + 1, 'original'")
            return [tuple(await stmt.fetchrow(i)) for i in range(3)]
        finally:
            await conn.close()

    assert asyncio.run(with_asyncpg()) == [(i + 1, "rewritten") for i in range(3)]


def test_200kb_query_through_rewrite(server1, bouncer, tmp_path):
    """The hook sees the whole message and its answer, larger still, goes out whole."""
    hook = write(tmp_path / "rw_big.py", """
        import os
        SEEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lengths.txt")

        def rewrite_query(username, query):
            if "'tail-original'" not in query:
                return query
            with open(SEEN, "a") as f:
                f.write(f"{len(query)}\\n")
            return query.replace("'tail-original'", "'tail-' || repeat('y', 3) || '" + "z" * 100000 + "'")
    """)
    b = bouncer(databases={"dev": server1.conninfo(DB)}, pgbouncer={
        "pool_mode": "transaction", "rewrite_query_py_module_file": str(hook)})
    big = "x" * 200_000
    simple = f"SELECT length('{big}'), 'tail-original'"
    extended = f"SELECT length('{big}') + %s, 'tail-original'"
    expected_tail = "tail-yyy" + "z" * 100000
    conn = b.connect("dev", autocommit=True)
    try:
        for _ in range(2):
            assert one(conn, simple) == (200_000, expected_tail)
    finally:
        conn.close()
    with pg3(b) as c3:
        assert c3.execute(extended, (1,)).fetchone() == (200_001, expected_tail)
        assert c3.execute(extended, (2,), prepare=True).fetchone() == (200_002, expected_tail)
    lengths = [int(n) for n in (tmp_path / "lengths.txt").read_text().split()]
    assert lengths == [len(simple)] * 2 + [len(extended.replace("%s", "$1"))] * 2


# -- hooks that misbehave -------------------------------------------------------------


BAD_ROUTER = """
def routing_rules(username, query):
    if "route:raise" in query:
        raise ValueError("routing boom")
    if "route:junk" in query:
        return 42
    if "route:unknown" in query:
        return "no_such_db"
    return None
"""
BAD_REWRITER = """
def rewrite_query(username, query, in_transaction):
    if "rewrite:raise" in query:
        raise RuntimeError("rewrite boom")
    if "rewrite:junk" in query:
        return ["not", "sql"]
    if "rewrite:none" in query:
        return None
    return query
"""


def test_misbehaving_hooks_never_cost_the_query(server1, bouncer, tmp_path):
    router = write(tmp_path / "bad_router.py", BAD_ROUTER)
    rewriter = write(tmp_path / "bad_rewriter.py", BAD_REWRITER)
    b = bouncer(databases={"dev": server1.conninfo(DB), "dev.1": server1.conninfo(DB)}, pgbouncer={
        "pool_mode": "transaction",
        "routing_rules_py_module_file": str(router),
        "rewrite_query_py_module_file": str(rewriter),
    })
    tags = ["route:raise", "route:junk", "route:unknown", "rewrite:raise", "rewrite:junk", "rewrite:none"]
    rounds = 5
    conn = b.connect("dev", autocommit=True)
    try:
        with pg3(b) as c3:
            for i in range(rounds):
                for tag in tags:
                    assert one(conn, f"SELECT '{tag}', {i}") == (tag, i)  # simple Query
                    assert c3.execute(f"SELECT '{tag}', %s::int", (i,)).fetchone() == (tag, i)  # Parse
            # Still connected, and inside a transaction too.
            conn.autocommit = False
            assert one(conn, "SELECT 'route:raise rewrite:raise', 1") == ("route:raise rewrite:raise", 1)
            conn.commit()
    finally:
        conn.close()

    stats = routing_rows(b)
    per_tag = 2 * rounds
    assert stats["routing_rules"].errors == 3 * per_tag + 1
    assert stats["rewrite_query"].errors == 2 * per_tag + 1
    assert stats["routing_rules"].calls >= len(tags) * per_tag
    assert "routing boom" in stats["routing_rules"].last_error
    assert "rewrite boom" in stats["rewrite_query"].last_error
    assert not any(key[0] == "route" for key in stats if isinstance(key, tuple))

    log = b.log_text()
    # Each distinct problem once, with the traceback for exceptions.
    assert log.count("raised ValueError: routing boom") == 1, log[-4000:]
    assert log.count("raised RuntimeError: rewrite boom") == 1, log[-4000:]
    assert log.count("Traceback (most recent call last)") == 2, log[-4000:]
    assert log.count("returned 42: not a database name (str)") == 1, log[-4000:]
    assert log.count("returned 'no_such_db': no such database in [databases]") == 1, log[-4000:]
    assert log.count("returned ['not', 'sql']: not a str") == 1, log[-4000:]
    assert str(router) in log and str(rewriter) in log


@pytest.mark.parametrize("tag", ["rewrite:raise", "rewrite:junk"])
def test_rewrite_disconnect_on_failure(server1, bouncer, tmp_path, tag):
    rewriter = write(tmp_path / "bad_rewriter.py", BAD_REWRITER)
    b = bouncer(databases={"dev": server1.conninfo(DB)}, pgbouncer={
        "pool_mode": "transaction",
        "rewrite_query_py_module_file": str(rewriter),
        "rewrite_query_disconnect_on_failure": 1,
    })
    bystander = b.connect("dev", autocommit=True)
    try:
        # psycopg 3: a simple Query (no parameters), then a Parse (parameters).
        for sql, params in ((f"SELECT '{tag}'", None), (f"SELECT '{tag}', %s::int", (1,))):
            with pg3(b) as c3:
                assert c3.execute("SELECT 'rewrite:none'").fetchone() == ("rewrite:none",)
                with pytest.raises(psycopg.Error, match="query rewrite failed") as err:
                    c3.execute(sql, params)
                assert err.value.sqlstate == "XX000"
                assert c3.broken
        # psycopg2 (its libpq reports a FATAL error followed by EOF only as the lost
        # connection, as it does for a backend terminated mid-query).
        conn = b.connect("dev", autocommit=True)
        try:
            with pytest.raises(psycopg2.OperationalError):
                one(conn, f"SELECT '{tag}'")
            assert conn.closed
        finally:
            conn.close()
        assert one(bystander, "SELECT 'still here'") == ("still here",)
    finally:
        bystander.close()
    assert routing_rows(b)["rewrite_query"].errors == 3
    assert "pooler error: query rewrite failed: rewrite_query failed: " in b.log_text()


# -- reload -------------------------------------------------------------------------


def hook_files(hook_dir: Path, value: str, route: str, rewrite_body: str) -> tuple[Path, Path]:
    hook_dir.mkdir(exist_ok=True)
    write(hook_dir / "marker.py", f"VALUE = {value!r}\nROUTE = {route!r}\n")
    router = write(hook_dir / "router.py", """
        import marker

        def routing_rules(username, query, in_transaction):
            return marker.ROUTE if "routeme" in query else None
    """)
    rewriter = write(hook_dir / "rewriter.py", f"""
        import marker

        def rewrite_query(username, query):
            {rewrite_body}
    """)
    return router, rewriter


def reload_bouncer(bouncer, pg, hook_dir):
    router, rewriter = hook_files(hook_dir, "v1", "dev.1",
                                  "return query.replace(\"'which'\", repr(marker.VALUE))")
    b = bouncer(databases={
        "dev": pg.conninfo("app"), "dev.1": pg.conninfo("postgres"), "dev.2": pg.conninfo(DB),
    }, pgbouncer={
        "pool_mode": "transaction",
        "routing_rules_py_module_file": str(router),
        "rewrite_query_py_module_file": str(rewriter),
    })
    return b, router, rewriter


PROBE = "SELECT 'which', current_database() /* routeme */"


def test_reload_changed_modules(server1, bouncer, tmp_path):
    hook_dir = tmp_path / "hooks"
    b, router, rewriter = reload_bouncer(bouncer, server1, hook_dir)
    conn = b.connect("dev", autocommit=True)
    try:
        assert one(conn, PROBE) == ("v1", "postgres")
        loads = b.log_text().count("rewrite_query loaded from")

        # A changed helper next to the hooks: both hooks import it afresh on SIGHUP.
        write(hook_dir / "marker.py", "VALUE = 'v2'\nROUTE = 'dev.2'\n")
        reloaded(b, "sighup")
        assert one(conn, PROBE) == ("v2", DB)
        assert b.log_text().count("rewrite_query loaded from") == loads + 1
        assert b.log_text().count("routing_rules loaded from") == loads + 1

        # A changed module, with admin RELOAD; the counters carry over.
        calls_before = routing_rows(b)["rewrite_query"].calls
        write(rewriter, """
            import marker

            def rewrite_query(username, query, in_transaction):
                return query.replace("'which'", repr(marker.VALUE + '-v3-' + str(in_transaction)))
        """)
        write(router, """
            def routing_rules(username, query):
                return "dev" if "routeme" in query else None
        """)
        reloaded(b, "admin")
        assert one(conn, PROBE) == ("v2-v3-False", "app")
        stats = routing_rows(b)
        assert stats["rewrite_query"].calls > calls_before
        assert stats[("route", "dev.1")] >= 1 and stats[("route", "dev.2")] >= 1
        assert stats[("route", "dev")] >= 1
    finally:
        conn.close()
    assert "3 arguments" in b.log_text() and "2 arguments" in b.log_text()


@pytest.mark.parametrize("broken, reason", [
    ("def rewrite_query(username, query):\n    return (\n", "syntax error at line"),
    ("import marker\nx = 1 / 0\n", "import failed at line 2: ZeroDivisionError"),
    ("import no_such_helper_module\n", "ModuleNotFoundError"),
    ("def something_else(username, query):\n    return query\n", "defines no function rewrite_query()"),
    ("def rewrite_query(query):\n    return query\n", "is not callable as"),
])
def test_reload_broken_module_keeps_previous(server1, bouncer, tmp_path, broken, reason):
    hook_dir = tmp_path / "hooks"
    b, _router, rewriter = reload_bouncer(bouncer, server1, hook_dir)
    conn = b.connect("dev", autocommit=True)
    try:
        assert one(conn, PROBE) == ("v1", "postgres")
        offset = b.log_offset()
        rewriter.write_text(broken)
        write(hook_dir / "marker.py", "VALUE = 'v2'\nROUTE = 'dev.2'\n")
        reloaded(b, "sighup")
        log = b.log_text(offset)
        assert f"RELOAD: rewrite_query not loaded, {rewriter} keeps running: {rewriter}: " in log, log
        assert reason in log, log
        # The old rewrite keeps running (with the helper it imported); the router loaded fine.
        assert one(conn, PROBE) == ("v1", DB)
        assert routing_rows(b)["rewrite_query"].name == str(rewriter)

        # Fixed: the next reload takes it.
        write(rewriter, """
            def rewrite_query(username, query):
                return query.replace("'which'", "'fixed'")
        """)
        reloaded(b, "admin")
        assert one(conn, PROBE) == ("fixed", DB)
    finally:
        conn.close()
    assert b.is_running()


# -- credentials of a routed pool -----------------------------------------------------


def test_routed_pool_logs_in_with_entry_credentials(server1, bouncer):
    """dev.2 forces user=/password= (not in the auth_file); dev.1 uses the client's user."""
    server1.psql("GRANT CONNECT ON DATABASE app TO scram_user")
    b = bouncer(
        databases={
            "dev": server1.conninfo(DB),
            "dev.1": server1.conninfo("postgres"),
            "dev.2": server1.conninfo("app", user="scram_user", password="scram_user_pw"),
        },
        pgbouncer={"pool_mode": "transaction",
                   "routing_rules_py_module_file": str(CONF / "routing_rules.py")},
        userlist={"app": "app_pw", "postgres": "postgres_pw"},
    )
    conn = b.connect("dev", autocommit=True)
    try:
        assert one(conn, "SELECT current_user, current_database() AS tableb") == ("scram_user", "app")
        assert one(conn, "SELECT current_user, current_database() AS tablea") == ("app", "postgres")
        assert one(conn, "SELECT current_user, current_database()") == ("app", "postgres")
    finally:
        conn.close()
    with pg3(b) as c3:
        assert c3.execute("SELECT current_user, %s::text AS tableb", ("x",)).fetchone() == ("scram_user", "x")


# -- pipelines -------------------------------------------------------------------------


def _msg(mtype: bytes, body: bytes) -> bytes:
    return mtype + struct.pack("!I", 4 + len(body)) + body


def _extended(sql: str) -> bytes:
    """Parse (unnamed, no parameters), Bind, Describe portal, Execute, Sync."""
    return (_msg(b"P", b"\0" + sql.encode() + b"\0" + struct.pack("!h", 0))
            + _msg(b"B", b"\0\0" + struct.pack("!hhh", 0, 0, 0))
            + _msg(b"D", b"P\0")
            + _msg(b"E", b"\0" + struct.pack("!i", 0))
            + _msg(b"S", b""))


def _read_until_ready(sock, buf: bytearray, count: int) -> list[tuple[bytes, bytes]]:
    """Messages up to the ``count``-th ReadyForQuery (bounded by the socket timeout)."""
    out = []
    while sum(1 for t, _ in out if t == b"Z") < count:
        while len(buf) < 5 or len(buf) < 1 + struct.unpack_from("!I", buf, 1)[0]:
            data = sock.recv(65536)
            assert data, f"the pooler closed the connection; got {out}"
            buf += data
        end = 1 + struct.unpack_from("!I", buf, 1)[0]
        out.append((bytes(buf[:1]), bytes(buf[5:end])))
        del buf[:end]
    return out


def _first_column(body: bytes) -> str:
    (size,) = struct.unpack_from("!i", body, 2)
    return body[6:6 + size].decode()


def test_rewrite_in_a_pipelined_batch(server1, bouncer, tmp_path):
    """Several statements in one batch, the first rewritten: every message goes out
    once, in order (one write from the client, so one batch at the pooler)."""
    hook = write(tmp_path / "rw.py", """
        def rewrite_query(username, query):
            return query.replace("'original'", "'rewritten'")
    """)
    b = bouncer(databases={"dev": server1.conninfo(DB)}, pgbouncer={
        "pool_mode": "transaction", "auth_type": "trust",
        "rewrite_query_py_module_file": str(hook)})
    with socket.create_connection((b.host, b.port), timeout=10) as sock:
        params = b"user\0app\0database\0dev\0\0"
        sock.sendall(struct.pack("!II", 8 + len(params), 196608) + params)
        buf = bytearray()
        assert _read_until_ready(sock, buf, 1)[0] == (b"R", struct.pack("!I", 0))
        sock.sendall(_extended("SELECT 'original'") + _extended("SELECT 'second'")
                     + _extended("SELECT 'original'"))
        replies = _read_until_ready(sock, buf, 3)
        assert [t for t, _ in replies] == [b"1", b"2", b"T", b"D", b"C", b"Z"] * 3, replies
        assert [_first_column(body) for t, body in replies if t == b"D"] == \
            ["rewritten", "second", "rewritten"]
    # The same through psycopg 3's pipeline mode (batched as libpq flushes it).
    with pg3(b) as c3:
        for _ in range(3):
            with c3.pipeline():
                cur1 = c3.execute("SELECT %s::int, 'original'", (1,))
                cur2 = c3.execute("SELECT %s::int, 'second'", (2,))
                cur3 = c3.execute("SELECT %s::int, 'original'", (3,))
            assert cur1.fetchone() == (1, "rewritten")
            assert cur2.fetchone() == (2, "second")
            assert cur3.fetchone() == (3, "rewritten")
        assert c3.execute("SELECT 1").fetchone() == (1,)
