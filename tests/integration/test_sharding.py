"""Sharding (issue 12) through the pooler against real PostgreSQL.

Three shards are three databases of one cluster (sh_0, sh_1, sh_2); a fourth,
sh_ref, holds the same data unsharded and the PARTITION BY HASH (modulus 3)
reference tables that say where each row belongs. Rows are written through
the pooler (psycopg2 simple protocol, psycopg 3 extended protocol with
parameters, COPY), then read back from each shard directly; a corpus of queries
runs through the pooler and against sh_ref and must give the same rows.
"""

from __future__ import annotations

import io
import time
import uuid
from decimal import Decimal

import psycopg
import psycopg2
import psycopg2.errors
import pytest
from fixtures.ports import wait_until
from shardfix import (SHARDS, _keys_on_two_shards, _shard_of, direct, expected_shards, placement,  # noqa: F401
                      shard_pg, shard_rows, sharded, shards)

pytestmark = pytest.mark.geobouncer_only("sharding (PgDog style)")


# --- placement -------------------------------------------------------------------------
def test_rows_written_with_psycopg2_land_on_postgres_hash_shard(sharded, shards):
    b = sharded()
    conn = b.connect("app", autocommit=True)
    ids = list(range(-150, 150)) + [2**63 - 1, -2**63, 2**31, -2**31 - 1]
    with conn.cursor() as cur:
        for i in ids[:100]:
            cur.execute("INSERT INTO users (id, name, score) VALUES (%s, %s, %s)", (i, f"u{i}", i % 7))
        # multi-row inserts split per shard
        for chunk in range(100, len(ids), 25):
            rows = ids[chunk:chunk + 25]
            cur.execute("INSERT INTO users (id, name, score) VALUES "
                        + ",".join(cur.mogrify("(%s,%s,%s)", (i, f"u{i}", i % 7)).decode() for i in rows))
            assert cur.rowcount == len(rows)
        keys = ["", "a", "hello", "ünïcødé", "日本語", "x" * 300] + [f"k{i}" for i in range(60)]
        for k in keys:
            cur.execute("INSERT INTO docs (key, body) VALUES (%s, %s)", (k, "body"))
        uuids = [uuid.uuid4() for _ in range(60)] + [uuid.UUID(int=0), uuid.UUID(int=2**128 - 1)]
        for u in uuids:
            cur.execute("INSERT INTO things (id, n) VALUES (%s, 1)", (str(u),))
    want = expected_shards(shards, "users", "id", ids, "bigint")
    assert placement(shards, "users", "id") == want
    assert len(set(want.values())) == 3
    assert placement(shards, "docs", "key") == expected_shards(shards, "docs", "key", keys, "text")
    assert placement(shards, "things", "id") == expected_shards(shards, "things", "id", uuids, "uuid")
    # and keyed reads find them again, one shard each
    with conn.cursor() as cur:
        for i in (ids[0], ids[57], ids[-1]):
            cur.execute("SELECT id, name FROM users WHERE id = %s", (i,))
            assert cur.fetchall() == [(i, f"u{i}")]
        cur.execute("SELECT count(*) FROM users")
        assert cur.fetchone() == (len(ids),)


@pytest.mark.parametrize("prepare_threshold", [None, 0])
def test_rows_written_with_psycopg3_parameters_land_on_hash_shard(sharded, shards, prepare_threshold):
    b = sharded()
    ids = list(range(1000, 1120))
    with psycopg.connect(b.dsn("app"), autocommit=True, prepare_threshold=prepare_threshold) as conn:
        for i in ids:
            conn.execute("INSERT INTO users (id, name) VALUES (%s, %s)", (i, f"n{i}"))
        for i in ids[::10]:
            assert conn.execute("SELECT name FROM users WHERE id = %s", (i,)).fetchall() == [(f"n{i}",)]
        # binary parameters
        cur = conn.cursor(binary=True)
        assert cur.execute("SELECT name FROM users WHERE id = %b", (ids[3],)).fetchall() == [(f"n{ids[3]}",)]
        assert conn.execute("SELECT count(*), sum(id) FROM users WHERE id = ANY(%s)",
                            (ids[:30],)).fetchone() == (30, sum(ids[:30]))
    assert placement(shards, "users", "id") == expected_shards(shards, "users", "id", ids, "bigint")


@pytest.mark.parametrize("fmt", ["text", "csv"])
def test_copy_from_stdin_splits_rows_per_shard(sharded, shards, fmt):
    b = sharded()
    ids = list(range(500, 800))
    if fmt == "text":
        data = "".join(f"{i}\tname {i}\\twith tab\t{i % 5}\n" for i in ids)
        sql = "COPY users (id, name, score) FROM STDIN"
    else:
        data = "id,name,score\n" + "".join(f'{i},"line\nbreak, {i}",{i % 5}\n' for i in ids)
        sql = "COPY users (id, name, score) FROM STDIN WITH (FORMAT csv, HEADER true)"
    conn = b.connect("app", autocommit=True)
    with conn.cursor() as cur:
        cur.copy_expert(sql, io.StringIO(data), size=777)    # CopyData cut anywhere
        assert cur.rowcount == len(ids)
    assert placement(shards, "users", "id") == expected_shards(shards, "users", "id", ids, "bigint")
    with conn.cursor() as cur:
        cur.execute("SELECT name FROM users WHERE id = 612")
        assert cur.fetchone() == ("name 612\twith tab" if fmt == "text" else "line\nbreak, 612",)
        # COPY without a column list: the table's order, looked up on a shard
        cur.copy_expert("COPY users FROM STDIN", io.StringIO("9001\tx\t1\t2.50\tred\n9002\ty\t2\t\\N\tblue\n"))
        cur.execute("SELECT id, balance FROM users WHERE id IN (9001, 9002) ORDER BY id")
        assert cur.fetchall() == [(9001, Decimal("2.50")), (9002, None)]


# --- the differential corpus ---------------------------------------------------------------
def _load(conn_through_pooler, ref):
    users = [(i, f"user{i % 37}", (i * 7) % 23 if i % 11 else None, Decimal(i * 3) / 4, ("red", "blue", "green")[i % 3])
             for i in range(1, 301)]
    payments = [(j, (j * 13) % 300 + 1, Decimal(j % 50) + Decimal("0.25")) for j in range(1, 601)]
    for conn in (conn_through_pooler, ref):
        with conn.cursor() as cur:
            for chunk in range(0, len(users), 50):
                cur.execute("INSERT INTO users (id, name, score, balance, team) VALUES " + ",".join(
                    cur.mogrify("(%s,%s,%s,%s,%s)", u).decode() for u in users[chunk:chunk + 50]))
            for chunk in range(0, len(payments), 100):
                cur.execute("INSERT INTO payments (id, user_id, amount) VALUES " + ",".join(
                    cur.mogrify("(%s,%s,%s)", p).decode() for p in payments[chunk:chunk + 100]))


CORPUS = [
    # keyed
    ("SELECT * FROM users WHERE id = 17", False),
    ("SELECT name, score FROM users WHERE id = 299", False),
    ("SELECT * FROM payments WHERE user_id = 40 ORDER BY id", True),
    ("SELECT count(*) FROM payments WHERE user_id = 41", False),
    ("SELECT id FROM users WHERE id IN (1, 2, 3, 150, 299) ORDER BY id", True),
    ("SELECT id FROM users WHERE id IN (5, 6)", False),
    ("SELECT id FROM users WHERE id = 5 OR id = 6 ORDER BY id", True),
    ("SELECT id, name FROM users WHERE id = 10 AND score IS NOT NULL", False),
    ("SELECT u.id, p.amount FROM users u JOIN payments p ON p.user_id = u.id WHERE u.id = 14 AND p.user_id = 14 ORDER BY p.amount, u.id", True),
    ("SELECT * FROM users WHERE id = 100000", False),
    # unkeyed, concatenated
    ("SELECT id, name FROM users", False),
    ("SELECT * FROM payments", False),
    ("SELECT id FROM users WHERE score > 20", False),
    ("SELECT id FROM users WHERE name LIKE 'user1%'", False),
    ("SELECT id, team FROM users WHERE team = 'red'", False),
    # ORDER BY, LIMIT, OFFSET
    ("SELECT id, name FROM users ORDER BY id", True),
    ("SELECT id, name FROM users ORDER BY id DESC", True),
    ("SELECT id, score FROM users ORDER BY score, id", True),
    ("SELECT id, score FROM users ORDER BY score DESC, id", True),
    ("SELECT id, score FROM users ORDER BY score NULLS FIRST, id", True),
    ("SELECT id, score FROM users ORDER BY score DESC NULLS LAST, id DESC", True),
    ("SELECT id, name FROM users ORDER BY name, id LIMIT 10", True),
    ("SELECT id FROM users ORDER BY id LIMIT 5", True),
    ("SELECT id FROM users ORDER BY id DESC LIMIT 7 OFFSET 3", True),
    ("SELECT id FROM users ORDER BY id OFFSET 290", True),
    ("SELECT id, balance FROM users ORDER BY balance DESC, id LIMIT 12", True),
    ("SELECT id AS ident FROM users ORDER BY ident LIMIT 4", True),
    ("SELECT id, name FROM users ORDER BY 2, 1 LIMIT 20", True),
    ("SELECT amount, id FROM payments ORDER BY amount, id LIMIT 30", True),
    ("SELECT team, id FROM users ORDER BY team DESC, id LIMIT 15", True),
    # aggregates
    ("SELECT count(*) FROM users", False),
    ("SELECT count(score) FROM users", False),
    ("SELECT sum(score) FROM users", False),
    ("SELECT sum(balance) FROM users", False),
    ("SELECT min(id), max(id) FROM users", False),
    ("SELECT min(name), max(name) FROM users", False),
    ("SELECT avg(score) FROM users", False),
    ("SELECT avg(balance) FROM users", False),
    ("SELECT avg(id) FROM users", False),
    ("SELECT count(*), sum(amount), avg(amount) FROM payments", False),
    ("SELECT count(*) FROM users WHERE id > 1000", False),
    ("SELECT sum(score), avg(score) FROM users WHERE id > 1000", False),
    ("SELECT max(balance) FROM users WHERE team = 'blue'", False),
    # GROUP BY
    ("SELECT team, count(*) FROM users GROUP BY team ORDER BY team", True),
    ("SELECT team, sum(score), min(id), max(id) FROM users GROUP BY team ORDER BY team", True),
    ("SELECT name, count(*) FROM users GROUP BY name ORDER BY name", True),
    ("SELECT team, avg(balance) FROM users GROUP BY team ORDER BY team", True),
    ("SELECT score, count(*) FROM users GROUP BY score ORDER BY score", True),
    ("SELECT team, count(*) FROM users GROUP BY team", False),
    ("SELECT user_id % 5 AS bucket, count(*) FROM payments GROUP BY user_id % 5 ORDER BY bucket", True),
    # DISTINCT
    ("SELECT DISTINCT team FROM users", False),
    ("SELECT DISTINCT team FROM users ORDER BY team", True),
    ("SELECT DISTINCT name FROM users ORDER BY name LIMIT 5", True),
    ("SELECT DISTINCT score FROM users", False),
]


def test_differential_corpus_against_an_unsharded_reference(sharded, shards):
    assert len(CORPUS) >= 50
    b = sharded()
    conn = b.connect("app", autocommit=True)
    ref = direct(shards, "sh_ref").conn
    _load(conn, ref)
    failures = []
    for sql, ordered in CORPUS:
        got = _rows(conn, sql)
        want = _rows(ref, sql)
        if not ordered:
            got, want = sorted(got, key=repr), sorted(want, key=repr)
        if got != want:
            failures.append((sql, got[:5], want[:5]))
    assert not failures, failures
    # each keyed query touched one shard, the rest were merged
    row = next(r for r in b.admin("SHOW SHARDS") if r.shard == 0)
    assert row.single_shard > 0 and row.multi_shard > 0


def _rows(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        return [tuple(str(v) if v is not None else None for v in row) for row in cur.fetchall()]


@pytest.mark.parametrize("sql, fragment", [
    ("SELECT id, row_number() OVER () FROM users", "window"),
    ("SELECT id FROM users ORDER BY score", "ORDER BY"),
    ("SELECT DISTINCT ON (team) team, id FROM users", "DISTINCT ON"),
    ("SELECT string_agg(name, ',') FROM users", "string_agg"),
])
def test_what_cannot_be_merged_is_refused_not_answered_wrong(sharded, sql, fragment):
    b = sharded()
    conn = b.connect("app", autocommit=True)
    with conn.cursor() as cur:
        with pytest.raises(psycopg2.Error) as info:
            cur.execute(sql)
        assert info.value.pgcode == "0A000"
        assert fragment.lower() in str(info.value).lower()
        cur.execute("SELECT 1")      # the connection goes on
        assert cur.fetchone() == (1,)


# --- transactions --------------------------------------------------------------------------
def test_transactions_follow_their_first_statement(sharded, shards):
    b = sharded()
    conn = b.connect("app")           # psycopg2: BEGIN before the first statement
    with conn.cursor() as cur:
        cur.execute("INSERT INTO users (id, name) VALUES (1, 'one')")
        cur.execute("UPDATE users SET name = 'uno' WHERE id = 1")
        conn.commit()
        cur.execute("INSERT INTO users (id, name) VALUES (2, 'two')")
        conn.rollback()
        cur.execute("SELECT id, name FROM users WHERE id IN (1, 2)")
        assert cur.fetchall() == [(1, "uno")]
        conn.commit()
        # a transaction with nothing in it: BEGIN and COMMIT answered by the pooler
        conn.commit()
    by_shard = shard_rows(shards, "SELECT id FROM users")
    assert sorted(i for rows in by_shard.values() for (i,) in rows) == [1]
    # another shard in the same transaction: refused, the transaction fails, nothing lands
    two_keys = _keys_on_two_shards(shards)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO users (id, name) VALUES (%s, 'a')", (two_keys[0],))
        with pytest.raises(psycopg2.Error) as info:
            cur.execute("INSERT INTO users (id, name) VALUES (%s, 'b')", (two_keys[1],))
        assert info.value.pgcode == "0A000" and "shard" in str(info.value)
        with pytest.raises(psycopg2.errors.InFailedSqlTransaction):
            cur.execute("SELECT 1")
    conn.rollback()
    assert placement(shards, "users", "id") == {"1": _shard_of(shards, 1)}
    # isolation options of the deferred BEGIN reach the shard
    conn.set_session(isolation_level="SERIALIZABLE")
    with conn.cursor() as cur:
        cur.execute("SELECT current_setting('transaction_isolation') FROM users WHERE id = 1")
        assert cur.fetchone() == ("serializable",)
    conn.rollback()


def test_two_phase_commit_spans_shards(sharded, shards):
    b = sharded(two_phase_commit=1)
    a, c = _keys_on_two_shards(shards)
    conn = b.connect("app")
    with conn.cursor() as cur:
        cur.execute("INSERT INTO users (id, name) VALUES (%s, 'a')", (a,))
        cur.execute("INSERT INTO users (id, name) VALUES (%s, 'c')", (c,))
    conn.commit()
    assert placement(shards, "users", "id") == {str(a): _shard_of(shards, a), str(c): _shard_of(shards, c)}
    with conn.cursor() as cur:
        cur.execute("UPDATE users SET name = 'x' WHERE id = %s", (a,))
        cur.execute("UPDATE users SET name = 'x' WHERE id = %s", (c,))
    conn.rollback()
    with conn.cursor() as cur:
        cur.execute("SELECT name FROM users WHERE id IN (%s, %s)", (a, c))
        assert sorted(cur.fetchall()) == [("a",), ("c",)]
    conn.commit()
    assert all(not rows for rows in shard_rows(shards, "SELECT gid FROM pg_prepared_xacts").values())
    row = next(r for r in b.admin("SHOW SHARDS") if r.shard == 0)
    assert row.two_phase_commits == 1


def test_two_phase_recovery_after_a_crash_between_prepare_and_commit(sharded, shards):
    """A crash after PREPARE everywhere and COMMIT PREPARED on the decider only:
    the pooler finishes the commit; one where the decider never committed is
    rolled back everywhere."""
    a, c = _keys_on_two_shards(shards)
    sa, sc = _shard_of(shards, a), _shard_of(shards, c)
    decider = direct(shards, SHARDS[sa]).conn
    other = direct(shards, SHARDS[sc]).conn
    plans = [("committed", a, c, True), ("undecided", a + 1000, c + 1000, False)]
    for tag, ka, kc, commit_decider in plans:
        with decider.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("INSERT INTO users (id, name) VALUES (%s, %s)", (ka, tag))
            cur.execute("SELECT pg_current_xact_id()")
            xid = cur.fetchone()[0]
            gid = f"geobouncer:{tag}:{sa}:{xid}"
            cur.execute(f"PREPARE TRANSACTION '{gid}:{sa}'")
            if commit_decider:
                cur.execute(f"COMMIT PREPARED '{gid}:{sa}'")
        with other.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("INSERT INTO users (id, name) VALUES (%s, %s)", (kc, tag))
            cur.execute(f"PREPARE TRANSACTION '{gid}:{sc}'")
    time.sleep(5.5)    # older than the recovery's grace period
    b = sharded(two_phase_commit=1)
    b.connect("app", autocommit=True).close()    # a pool the recovery can use
    assert wait_until(lambda: not any(shard_rows(shards, "SELECT gid FROM pg_prepared_xacts").values()),
                      timeout=25)
    names = {name for rows in shard_rows(shards, "SELECT name FROM users").values() for (name,) in rows}
    counts = shard_rows(shards, "SELECT count(*) FROM users WHERE name = 'committed'")
    assert names == {"committed"} and sum(n for rows in counts.values() for (n,) in rows) == 2


# --- forcing a shard, the console, bad input ---------------------------------------------------
def test_hint_and_set_force_a_shard(sharded, shards):
    b = sharded()
    conn = b.connect("app", autocommit=True)
    with conn.cursor() as cur:
        cur.execute("/* geobouncer:shard=2 */ SELECT current_database()")
        assert cur.fetchall() == [("sh_2",)]
        cur.execute("SET geobouncer.shard = 1")
        cur.execute("SELECT current_database()")
        assert cur.fetchall() == [("sh_1",)]
        key = 77
        cur.execute("SET geobouncer.sharding_key = %s", (str(key),))
        cur.execute("SELECT current_database()")
        assert cur.fetchall() == [(SHARDS[_shard_of(shards, key)],)]
        cur.execute("RESET geobouncer.shard")
        cur.execute("SELECT current_database()")
        assert sorted(cur.fetchall()) == [(s,) for s in SHARDS]
        cur.execute("CREATE TABLE made_everywhere (x int)")     # DDL: every shard
    assert all(rows == [(0,)] for rows in shard_rows(shards, "SELECT count(*) FROM made_everywhere").values())
    rows = b.admin("SHOW SHARDS")
    assert [(r.database, r.shard, r.entry, r.state) for r in rows] == [
        ("app", i, name, "up") for i, name in enumerate(SHARDS)]


def test_bad_keys_and_hostile_input_fail_that_request_only(sharded, shards):
    b = sharded()
    conn = b.connect("app", autocommit=True)
    other = b.connect("app", autocommit=True)
    with conn.cursor() as cur:
        for sql in ("SELECT * FROM users WHERE id = 'not a number'",
                    "SET geobouncer.shard = 7",
                    "SELEC broken syntax",
                    "INSERT INTO users (id) VALUES (NULL)"):
            with pytest.raises(psycopg2.Error):
                cur.execute(sql)
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    with other.cursor() as cur:
        cur.execute("SELECT count(*) FROM users")
        assert cur.fetchone() == (0,)
    log = b.log_text()
    assert "Traceback" not in log and "internal error" not in log
