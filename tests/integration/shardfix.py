"""The sharding fixtures, shared by test_sharding.py and test_shard_hostile.py.

Three shards are three databases of one cluster (sh_0, sh_1, sh_2); a fourth,
sh_ref, holds the same data unsharded and the PARTITION BY HASH (modulus 3)
reference tables that say where each row belongs. ``sharded(**settings)``
starts a pooler whose ``app`` entry is ``shards=sh_0,sh_1,sh_2``.
"""

from __future__ import annotations

import psycopg2
import pytest
from fixtures.pg import make_primary

SHARDS = ("sh_0", "sh_1", "sh_2")
SCHEMA = """
DROP TABLE IF EXISTS users, payments, docs, things, countries;
CREATE TABLE users (id bigint PRIMARY KEY, name text, score int, balance numeric(12,2), team text);
CREATE TABLE payments (id bigint, user_id bigint, amount numeric(12,2));
CREATE TABLE docs (key text PRIMARY KEY, body text);
CREATE TABLE things (id uuid PRIMARY KEY, n int);
CREATE TABLE countries (code text PRIMARY KEY, name text);
"""
REFERENCE = """
DROP TABLE IF EXISTS users_part, docs_part, things_part;
CREATE TABLE users_part (id bigint) PARTITION BY HASH (id);
CREATE TABLE docs_part (key text) PARTITION BY HASH (key);
CREATE TABLE things_part (id uuid) PARTITION BY HASH (id);
""" + "".join(
    f"CREATE TABLE {t}_p{r} PARTITION OF {t}_part FOR VALUES WITH (MODULUS 3, REMAINDER {r});\n"
    for t in ("users", "docs", "things") for r in range(3))
SHARDED_TABLES = """
[sharded_tables]
users    = database=app column=id type=bigint
payments = database=app column=user_id type=bigint
docs     = database=app column=key type=text
things   = database=app column=id type=uuid
"""


@pytest.fixture(scope="module")
def shard_pg():
    cluster = make_primary("shards", {"max_prepared_transactions": 20})
    conn = cluster.connect("postgres", autocommit=True)
    with conn.cursor() as cur:
        for name in SHARDS + ("sh_ref",):
            cur.execute(f"CREATE DATABASE {name} OWNER app")
    conn.close()
    yield cluster
    cluster.destroy()


class direct:
    """An autocommit connection to one database, closed at the end of a with block."""

    def __init__(self, cluster, dbname):
        self.conn = psycopg2.connect(**cluster.conninfo(dbname, user="app", password="app_pw"))
        self.conn.autocommit = True

    def __enter__(self):
        return self.conn

    def __exit__(self, *exc):
        self.conn.close()

    def cursor(self):
        return self.conn.cursor()


@pytest.fixture
def shards(shard_pg):
    """Fresh tables on every shard and on the reference database (prepared
    transactions a test left are rolled back first: they hold locks DROP TABLE waits for)."""
    for name in SHARDS + ("sh_ref",):
        with direct(shard_pg, name) as conn, conn.cursor() as cur:
            cur.execute("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")
            for (gid,) in cur.fetchall():
                cur.execute(f"ROLLBACK PREPARED '{gid}'")
            cur.execute(SCHEMA + (REFERENCE if name == "sh_ref" else ""))
    return shard_pg


@pytest.fixture
def sharded(bouncer, shards):
    def start(**settings):
        databases = {name: shards.conninfo(name) for name in SHARDS}
        databases["app"] = "shards=" + ",".join(SHARDS)
        databases["ref"] = shards.conninfo("sh_ref")
        return bouncer(databases=databases, pgbouncer={"pool_mode": "transaction", **settings},
                       extra_ini=SHARDED_TABLES)
    return start


def shard_rows(cluster, sql):
    """{shard number: rows} read from each shard directly."""
    out = {}
    for number, name in enumerate(SHARDS):
        with direct(cluster, name) as conn, conn.cursor() as cur:
            cur.execute(sql)
            out[number] = cur.fetchall()
    return out


def expected_shards(cluster, table, column, values, cast):
    """Where PostgreSQL's own PARTITION BY HASH (modulus 3) puts each value."""
    with direct(cluster, "sh_ref") as conn, conn.cursor() as cur:
        cur.execute(f"TRUNCATE {table}_part")
        cur.execute(f"INSERT INTO {table}_part SELECT unnest(%s::{cast}[])", ([str(v) for v in values],))
        cur.execute(f"SELECT {column}::text, right(tableoid::regclass::text, 1)::int FROM {table}_part")
        return dict(cur.fetchall())


def placement(cluster, table, column):
    found = {}
    for shard, rows in shard_rows(cluster, f"SELECT {column}::text FROM {table}").items():
        for (value,) in rows:
            assert value not in found, f"{value} on shards {found[value]} and {shard}"
            found[value] = shard
    return found



def _shard_of(cluster, key):
    return expected_shards(cluster, "users", "id", [key], "bigint")[str(key)]


def _keys_on_two_shards(cluster):
    where = expected_shards(cluster, "users", "id", range(100, 120), "bigint")
    first = int(next(iter(where)))
    second = next(int(k) for k, s in where.items() if s != where[str(first)])
    return first, second
