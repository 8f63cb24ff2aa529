"""Sharding beyond placement and merging: Execute with a row limit (portals
suspended and resumed, compared with PostgreSQL's own answer), the routing and
rewrite hooks on a sharded database, its row in SHOW STATS, and the client
timeouts (query_timeout, idle_transaction_timeout) for a client linked to
several shards. Three shards are three databases of one cluster (see
test_sharding.py for the fixtures)."""

from __future__ import annotations

import asyncio
import io
import struct
import time

import asyncpg
import psycopg2
import pytest
from _util_pool import RawClient, message, query_message
from fixtures.ports import wait_until
from test_sharding import expected_shards, placement, shard_pg, sharded, shards  # noqa: F401,F811 (fixtures)

pytestmark = pytest.mark.geobouncer_only("sharding (PgDog style)")


def _fill(b, count=10):
    conn = b.connect("app", autocommit=True)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO users (id, name) VALUES " + ",".join(f"({i}, 'u{i}')"
                                                                     for i in range(1, count + 1)))
    conn.close()
    ref = b.connect("ref", autocommit=True)
    with ref.cursor() as cur:
        cur.execute("INSERT INTO users (id, name) SELECT g, 'u' || g FROM generate_series(1, %s) g",
                    (count,))
    ref.close()


def _raw(b, database):
    raw = RawClient(b.host, b.port, timeout=15)
    replies = raw.login("app", "app_pw", database)
    assert replies[-1][0] == b"Z", replies
    return raw


def _limited_exchange(raw, sql: str, limits, sync_between: bool) -> list[tuple[bytes, bytes]]:
    """Parse + Bind a named portal, then one Execute per limit; inside a
    transaction when Syncs separate them (a portal lives until its end)."""
    out = []
    if sync_between:
        raw.send(query_message("BEGIN"))
        out += raw.read_until(b"Z")
    raw.send(message(b"P", b"\x00" + sql.encode() + b"\x00\x00\x00")
             + message(b"B", b"p1\x00\x00" + struct.pack("!HHH", 0, 0, 0))
             + message(b"D", b"Pp1\x00"))
    for limit in limits:
        raw.send(message(b"E", b"p1\x00" + struct.pack("!i", limit)))
        if sync_between:
            raw.send(message(b"S"))
            out += raw.read_until(b"Z")
    if sync_between:
        raw.send(query_message("COMMIT"))
    else:
        raw.send(message(b"S"))
    out += raw.read_until(b"Z")
    return out


def _normal(replies):
    """Table OIDs in RowDescription differ between databases: left out."""
    out = []
    for mtype, body in replies:
        if mtype == b"T":
            count, pos, fields = struct.unpack_from("!H", body)[0], 2, []
            for _ in range(count):
                end = body.index(b"\x00", pos)
                fields.append(body[pos:end] + body[end + 5:end + 19])   # name, then past the table OID
                pos = end + 19
            body = b"|".join(fields)
        out.append((mtype, body))
    return out


@pytest.mark.parametrize("sync_between", [False, True], ids=["one-sync", "sync-each"])
@pytest.mark.parametrize("sql", ["SELECT id, name FROM users ORDER BY id",
                                 "SELECT count(*) FROM users"])
def test_row_limited_execute_answers_as_postgresql_does(sharded, sql, sync_between):
    b = sharded()
    _fill(b)
    answers = {}
    for database in ("ref", "app"):               # PostgreSQL itself, then the sharded database
        with _raw(b, database) as raw:
            # 10 rows 3 at a time; 1 row 1 at a time (suspended at exactly its end, as PostgreSQL does)
            limits = [3, 3, 3, 3, 3] if "ORDER" in sql else [1, 1, 1]
            answers[database] = _limited_exchange(raw, sql, limits, sync_between)
    assert _normal(answers["app"]) == _normal(answers["ref"])
    kinds = [t for t, _ in answers["app"]]
    rows = [body for t, body in answers["app"] if t == b"D"]
    assert len(rows) == (10 if "ORDER" in sql else 1)
    assert kinds.count(b"s") == (3 if "ORDER" in sql else 1)   # 3 + 3 + 3 suspended, then 1


def test_asyncpg_cursor_with_prefetch_reads_every_row_in_order(sharded):
    b = sharded()
    _fill(b, 40)

    async def read():
        conn = await asyncpg.connect(host=b.host, port=b.port, user="app", password="app_pw",
                                     database="app", statement_cache_size=0)
        try:
            async with conn.transaction():
                merged = [r["id"] async for r in conn.cursor("SELECT id FROM users ORDER BY id",
                                                              prefetch=7)]
                keyed = [r["id"] async for r in conn.cursor(
                    "SELECT id FROM users WHERE id = $1", 17, prefetch=1)]
                cursor = await conn.cursor("SELECT id FROM users ORDER BY id DESC")
                first = await cursor.fetch(5)
                more = await cursor.fetch(5)
            return merged, keyed, [r["id"] for r in first + more]
        finally:
            await conn.close()

    merged, keyed, fetched = asyncio.run(asyncio.wait_for(read(), 30))
    assert merged == list(range(1, 41))
    assert keyed == [17]
    assert fetched == list(range(40, 30, -1))


ROUTING = '''
def routing_rules(username, query, in_transaction):
    if "to_shard_2" in query:
        return "sh_2"          # one of app's shard entries
    if "to_ref" in query:
        return "ref"           # a database that is not a shard of app: ignored for app
    return None
'''
REWRITE = '''
def rewrite_query(username, query, in_transaction):
    return query.replace("users_everywhere", "users")
'''


def test_routing_and_rewrite_hooks_on_a_sharded_database(sharded, shards, tmp_path):
    (tmp_path / "routing.py").write_text(ROUTING)
    (tmp_path / "rewrite.py").write_text(REWRITE)
    b = sharded(routing_rules_py_module_file=str(tmp_path / "routing.py"),
                rewrite_query_py_module_file=str(tmp_path / "rewrite.py"), admin_users="postgres")
    conn = b.connect("app", autocommit=True)
    with conn.cursor() as cur:
        # The hook sends these rows to shard 2, whatever their key hashes to.
        cur.execute("INSERT INTO users (id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c') /* to_shard_2 */")
        cur.execute("SELECT count(*) FROM users_everywhere /* to_shard_2 */")
        assert cur.fetchone() == (3,)
        # An answer that is not one of app's shards is ignored: the key routes.
        cur.execute("INSERT INTO users (id, name) VALUES (4, 'd') /* to_ref */")
        cur.execute("SELECT count(*) FROM users_everywhere")      # rewritten, then every shard
        assert cur.fetchone() == (4,)
    conn.close()
    placed = placement(shards, "users", "id")
    assert {placed["1"], placed["2"], placed["3"]} == {2}      # where the hook sent them
    assert placed["4"] == expected_shards(shards, "users", "id", [4], "bigint")["4"]   # by its key
    routes = {row[1]: row[2] for row in b.admin("SHOW ROUTING") if row[0] == "route"}
    assert routes.get("sh_2", 0) >= 2


def test_show_stats_has_a_row_for_the_sharded_database(sharded):
    b = sharded(admin_users="postgres")
    conn = b.connect("app", autocommit=True)
    with conn.cursor() as cur:
        for i in range(3):
            cur.execute("SELECT count(*) FROM users WHERE id = %s", (i,))
    conn.autocommit = False
    with conn.cursor() as cur:                   # BEGIN, INSERT, SELECT, COMMIT: one transaction
        cur.execute("INSERT INTO users (id, name) VALUES (7, 'seven')")
        cur.execute("SELECT name FROM users WHERE id = 7")
    conn.commit()
    conn.close()
    rows = {row.database: row for row in b.admin("SHOW STATS")}
    app = rows["app"]
    assert app.total_query_count == 7
    assert app.total_xact_count == 4
    assert app.total_received > 0 and app.total_sent > 0
    assert app.total_query_time > 0 and app.total_xact_time > 0
    assert sum(rows[name].total_query_count for name in ("sh_0", "sh_1", "sh_2")) >= 4


def test_query_timeout_closes_a_sharded_client_and_its_shard_servers(sharded, shards):
    b = sharded(query_timeout=1, admin_users="postgres")
    conn = b.connect("app", autocommit=True)
    started = time.monotonic()
    with pytest.raises(psycopg2.OperationalError), conn.cursor() as cur:   # libpq: "server closed"
        cur.execute("SELECT pg_sleep(30)")                      # no table: every shard
    assert time.monotonic() - started < 10
    wait_until(lambda: "closing because: query timeout" in b.log_text(), timeout=5, message="logged")
    other = b.connect("app", autocommit=True)                   # nothing else noticed
    with other.cursor() as cur:
        cur.execute("SELECT count(*) FROM users")
        assert cur.fetchone() == (0,)
    other.close()


def test_idle_transaction_timeout_ends_a_sharded_transaction(sharded):
    b = sharded(idle_transaction_timeout=1)
    conn = b.connect("app")
    with conn.cursor() as cur:
        cur.execute("INSERT INTO users (id, name) VALUES (5, 'five')")   # a transaction stays open
    time.sleep(2.5)
    with pytest.raises(psycopg2.Error), conn.cursor() as cur:
        cur.execute("SELECT 1")
    conn.close()
    check = b.connect("app", autocommit=True)
    with check.cursor() as cur:
        cur.execute("SELECT count(*) FROM users WHERE id = 5")
        assert cur.fetchone() == (0,)                                   # rolled back
    check.close()


def test_big_values_cross_the_sharded_path_whole(sharded):
    """A row of many megabytes reaches the pooler in many chunks: reassembled
    whole, on the one-shard path and through the merge."""
    b = sharded()
    big = "x" * (12 << 20) + "end"
    conn = b.connect("app", autocommit=True)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO docs (key, body) VALUES ('big', %s), ('small', 'y')", (big,))
        cur.execute("SELECT body FROM docs WHERE key = 'big'")           # one shard
        assert cur.fetchone()[0] == big
        cur.execute("SELECT key, length(body), body FROM docs ORDER BY key")   # merged
        rows = cur.fetchall()
        assert [(k, n) for k, n, _ in rows] == [("big", len(big)), ("small", 1)]
        assert rows[0][2] == big
    conn.close()


def test_copy_to_stdout_concatenates_every_shard(sharded):
    b = sharded()
    _fill(b, 12)
    conn = b.connect("app", autocommit=True)
    try:
        with conn.cursor() as cur:
            out = io.StringIO()
            cur.copy_expert("COPY users (id, name) TO STDOUT", out)
            assert sorted(out.getvalue().splitlines(), key=lambda r: int(r.split("\t")[0])) == \
                [f"{i}\tu{i}" for i in range(1, 13)]
            assert cur.rowcount == 12                              # COPY 12: the tags summed
            out = io.StringIO()
            cur.copy_expert("COPY (SELECT id FROM users WHERE id > 6) TO STDOUT WITH (FORMAT csv, HEADER)",
                            out)
            lines = out.getvalue().splitlines()
            assert lines[0] == "id" and sorted(map(int, lines[1:])) == list(range(7, 13))   # one header
            with pytest.raises(psycopg2.Error) as info:
                cur.copy_expert("COPY (SELECT count(*) FROM users) TO STDOUT", io.StringIO())
            assert info.value.pgcode == "0A000"                    # a sum of counts, never three counts
            cur.execute("SELECT count(*) FROM users")
            assert cur.fetchone() == (12,)
    finally:
        conn.close()


def test_auth_query_of_a_sharded_database_asks_its_first_shard(shards, bouncer):
    from fixtures.cluster import ROLE_PASSWORDS
    databases = {name: shards.conninfo(name) for name in ("sh_0", "sh_1", "sh_2")}
    databases["app"] = "shards=sh_0,sh_1,sh_2 auth_user=postgres"
    b = bouncer(databases=databases, userlist={"postgres": ROLE_PASSWORDS["postgres"]},
                pgbouncer={"pool_mode": "transaction", "auth_type": "md5"},
                extra_ini="[sharded_tables]\nusers = database=app column=id type=bigint\n")
    conn = b.connect("app", "app", password=ROLE_PASSWORDS["app"], autocommit=True)   # not in auth_file
    with conn.cursor() as cur:
        cur.execute("SELECT current_user")
        assert cur.fetchone() == ("app",)
    conn.close()
    with pytest.raises(psycopg2.OperationalError):
        b.connect("app", "app", password="wrong")


def test_text_order_across_shards_with_a_collation_that_is_not_bytewise(shard_pg, bouncer):
    """Shards whose collation (ICU en-US) does not order text by its bytes: the
    merge, which compares bytes, refuses ORDER BY / min / max of text rather than
    answer in another order than PostgreSQL would; COLLATE "C" asks for byte
    order, and then the answer is the reference's."""
    from test_sharding import direct
    names = ("icu_0", "icu_1", "icu_2", "icu_ref")
    admin = shard_pg.connect("postgres", autocommit=True)
    with admin.cursor() as cur:
        for name in names:
            cur.execute(f"DROP DATABASE IF EXISTS {name}")
            cur.execute(f"CREATE DATABASE {name} OWNER app TEMPLATE template0 LOCALE_PROVIDER icu "
                        "ICU_LOCALE 'en-US' LOCALE 'C'")
    admin.close()
    rows = [(i, name) for i, name in enumerate(["b", "A", "a", "C", "c", "B", "Ä", "z", "Z"], 1)]
    for name in names:
        with direct(shard_pg, name) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE users (id bigint PRIMARY KEY, name text)")
            if name == "icu_ref":
                cur.executemany("INSERT INTO users (id, name) VALUES (%s, %s)", rows)
    databases = {name: shard_pg.conninfo(name) for name in names}
    databases["app"] = "shards=icu_0,icu_1,icu_2"
    b = bouncer(databases=databases, pgbouncer={"pool_mode": "transaction"},
                extra_ini="[sharded_tables]\nusers = database=app column=id type=bigint\n")
    conn, ref = b.connect("app", autocommit=True), b.connect("icu_ref", autocommit=True)
    try:
        with conn.cursor() as cur, ref.cursor() as rcur:
            cur.executemany("INSERT INTO users (id, name) VALUES (%s, %s)", rows)
            for sql in ("SELECT name FROM users ORDER BY name", "SELECT min(name) FROM users"):
                with pytest.raises(psycopg2.Error) as info:
                    cur.execute(sql)
                assert info.value.pgcode == "0A000" and 'COLLATE "C"' in str(info.value)
            for sql in ('SELECT name FROM users ORDER BY name COLLATE "C"',
                        'SELECT id, name FROM users ORDER BY name COLLATE "C" DESC LIMIT 4',
                        "SELECT count(*) FROM users", "SELECT id FROM users ORDER BY id"):
                cur.execute(sql)
                rcur.execute(sql)
                assert cur.fetchall() == rcur.fetchall(), sql
    finally:
        conn.close()
        ref.close()


def test_prepared_statements_of_one_client_are_bounded(sharded):
    """The pooler keeps a sharded client's statements itself: a client that
    prepares without end gets 54000 and may go on (after closing some)."""
    b = sharded()
    raw = RawClient(b.host, b.port, timeout=15)
    assert raw.login("app", "app_pw", "app")[-1][0] == b"Z"
    text = "SELECT 1 /* " + "x" * (1 << 20) + " */"          # 1 MB each, 64 MB allowed
    for i in range(70):
        raw.send(message(b"P", f"s{i}".encode() + b"\x00" + text.encode() + b"\x00\x00\x00") + message(b"S"))
        replies = raw.read_until(b"Z")
        if replies[0][0] == b"E":
            assert b"C54000" in replies[0][1]
            break
    else:
        raise AssertionError("70 MB of statements were kept")
    assert 60 <= i <= 64
    raw.send(message(b"C", b"Ss0\x00") + message(b"C", b"Ss1\x00") + message(b"S"))
    raw.read_until(b"Z")
    raw.send(message(b"P", b"again\x00" + text.encode() + b"\x00\x00\x00") + message(b"S"))
    assert raw.read_until(b"Z")[0][0] == b"1"                 # room again
    raw.close()


def test_a_shard_with_replicas_has_a_read_write_split_of_its_own(shards, make_replica, bouncer):
    """Each shard is an ordinary entry: with replicas= and read_write_split, its
    reads outside a transaction go to a replica, its writes and its
    transactions to the primary (a streaming replica of the shards' cluster)."""
    replica = make_replica(shards)
    databases = {name: shards.conninfo(name) for name in ("sh_0", "sh_1", "sh_2")}
    for name in databases:
        databases[name] = {**databases[name], "read_write_split": 1,
                           "replicas": f"127.0.0.1:{replica.port}"}
    databases["app"] = "shards=sh_0,sh_1,sh_2"
    b = bouncer(databases=databases, pgbouncer={"pool_mode": "transaction", "health_check_period": 0.5},
                extra_ini="[sharded_tables]\nusers = database=app column=id type=bigint\n")
    conn = b.connect("app", autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO users (id, name) VALUES (1, 'one') RETURNING inet_server_port()")
            assert cur.fetchone() == (shards.port,)                 # a write: the primary
            wait_until(lambda: query_port(conn, "SELECT inet_server_port() FROM users WHERE id = 1")
                       == replica.port, timeout=20, message="the read on the shard's replica")
            cur.execute("SELECT name FROM users WHERE id = 1")
            assert cur.fetchone() == ("one",)                       # replicated, read there
        conn.autocommit = False
        with conn.cursor() as cur:                                   # a transaction: the primary
            cur.execute("SELECT inet_server_port() FROM users WHERE id = 1")
            assert cur.fetchone() == (shards.port,)
        conn.rollback()
    finally:
        conn.close()


def query_port(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
        return row[0] if row else None
