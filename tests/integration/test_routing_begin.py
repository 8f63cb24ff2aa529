"""A lone BEGIN is deferred to the transaction's first statement (net/defer_begin.py).

psycopg2's default (not autocommit) sends ``BEGIN`` alone, then the statements.
With a routing_rules hook or the read/write split, that BEGIN is answered by the
pooler and sent, with its options, to the server the first statement is routed
to; a transaction with nothing but COMMIT/ROLLBACK never reaches a server.

Routing: one PostgreSQL server, two databases: ``dev`` (rb_one, the client's) and
``dev.2`` (rb_two); the hook sends queries marked ``to_two`` to dev.2 and records
what it is told. The split: a primary and a streaming replica.
"""

from __future__ import annotations

import json
import socket
import struct
import textwrap

import psycopg
import psycopg2
import psycopg2.errors
import psycopg2.extensions as ext
import pytest
from fixtures.pg import make_primary, make_standby
from fixtures.ports import wait_until

pytestmark = pytest.mark.geobouncer_only("routing hooks and the read/write split")

ROUTER = '''
import json, os
CALLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.jsonl")

def routing_rules(username, query, in_transaction):
    with open(CALLS, "a") as f:
        f.write(json.dumps([query, in_transaction]) + "\\n")
    return "dev.2" if "to_two" in query else "dev" if "to_one" in query else None
'''
WHERE = "SELECT current_database()"


def one(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone() if cur.description else cur.statusmessage


def _databases(pg) -> None:
    for db in ("rb_one", "rb_two"):
        if not pg.psql("SELECT 1 FROM pg_database WHERE datname = %s", (db,)):
            pg.psql(f"CREATE DATABASE {db} OWNER app")


@pytest.fixture
def rr(pg, bouncer, tmp_path):
    _databases(pg)
    pg.psql("DROP TABLE IF EXISTS w; CREATE TABLE w (id int)", dbname="rb_one", user="app")
    (tmp_path / "router.py").write_text(textwrap.dedent(ROUTER))
    b = bouncer(databases={"dev": pg.conninfo("rb_one"), "dev.2": pg.conninfo("rb_two")},
                pgbouncer={"pool_mode": "transaction",
                           "routing_rules_py_module_file": str(tmp_path / "router.py")})
    b.calls = lambda: [tuple(json.loads(line)) for line in
                       (tmp_path / "calls.jsonl").read_text().splitlines()] \
        if (tmp_path / "calls.jsonl").exists() else []
    return b


def test_psycopg2_transaction_follows_the_route(rr):
    conn = rr.connect("dev")       # not autocommit: BEGIN, then the SELECT
    try:
        assert one(conn, WHERE + " /* to_two */") == ("rb_two",)
        assert conn.info.transaction_status == ext.TRANSACTION_STATUS_INTRANS
        # The rest of the transaction stays where it started.
        assert one(conn, WHERE) == ("rb_two",)
        conn.commit()
        assert one(conn, WHERE + " /* to_one */") == ("rb_one",)
        conn.rollback()
        # Hooks see in_transaction as without the deferral (BEGIN outside, the rest inside).
        assert rr.calls()[:3] == [("BEGIN", False), (WHERE + " /* to_two */", True), (WHERE, True)]
    finally:
        conn.close()


def test_write_transaction_stays_together(rr):
    conn = rr.connect("dev")
    try:
        assert one(conn, "INSERT INTO w VALUES (1)") == "INSERT 0 1"
        assert one(conn, "SELECT current_database(), count(*) FROM w /* to_two */") == ("rb_one", 1)
        conn.rollback()
        assert one(conn, "SELECT count(*) FROM w") == (0,)
        conn.rollback()
    finally:
        conn.close()


def test_begin_options_are_kept(rr):
    conn = rr.connect("dev", autocommit=True)
    try:
        assert one(conn, "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY") == "START TRANSACTION"
        assert one(conn, "SELECT current_setting('transaction_isolation'), "
                         "current_setting('transaction_read_only'), current_database() /* to_two */") \
            == ("serializable", "on", "rb_two")
        assert one(conn, "COMMIT") == "COMMIT"
        assert one(conn, "SELECT current_setting('transaction_isolation')") == ("read committed",)
    finally:
        conn.close()


@pytest.mark.parametrize("end, tag", [("COMMIT", "COMMIT"), ("end work", "COMMIT"),
                                      ("ROLLBACK", "ROLLBACK"), ("abort;", "ROLLBACK")])
def test_empty_transaction_answered_locally(rr, end, tag):
    conn = rr.connect("dev", autocommit=True)
    try:
        assert one(conn, "BEGIN") == "BEGIN"
        assert conn.info.transaction_status == ext.TRANSACTION_STATUS_INTRANS
        assert [row for row in rr.admin("SHOW SERVERS") if row.state == "active"] == []   # none held
        assert [row.state for row in rr.admin("SHOW CLIENTS") if row.database == "dev"] == ["active"]
        assert one(conn, end) == tag
        assert conn.info.transaction_status == ext.TRANSACTION_STATUS_IDLE
        assert rr.calls() == [("BEGIN", False), (end, True)]
        assert one(conn, WHERE) == ("rb_one",)
    finally:
        conn.close()


def test_begin_twice_warns_as_postgresql_does(rr, pg):
    conn = rr.connect("dev", autocommit=True)
    direct = psycopg2.connect(pg.dsn("rb_one", user="app"))
    direct.autocommit = True
    try:
        for c in (conn, direct):
            assert one(c, "BEGIN") == "BEGIN"
            assert one(c, "BEGIN ISOLATION LEVEL REPEATABLE READ") == "BEGIN"
            assert one(c, "SELECT current_setting('transaction_isolation')") == ("repeatable read",)
            assert one(c, "COMMIT") == "COMMIT"
        assert conn.notices == direct.notices
        assert len(conn.notices) == 1 and "already a transaction in progress" in conn.notices[0]
    finally:
        conn.close()
        direct.close()


def test_begin_flood_is_bounded(rr):
    conn = rr.connect("dev", autocommit=True)
    try:
        for _ in range(20):
            assert one(conn, "BEGIN") == "BEGIN"
        assert len(conn.notices) == 19      # 7 from geobouncer, then from the server
        assert one(conn, WHERE + " /* to_two */") == ("rb_one",)   # pinned by the server's BEGIN
        assert one(conn, "COMMIT") == "COMMIT"
    finally:
        conn.close()


def test_begin_then_garbage(rr):
    conn = rr.connect("dev", autocommit=True)
    try:
        one(conn, "BEGIN")
        with pytest.raises(psycopg2.errors.SyntaxError):
            one(conn, "SELEC garbage /* to_two */")
        assert conn.info.transaction_status == ext.TRANSACTION_STATUS_INERROR
        with pytest.raises(psycopg2.errors.InFailedSqlTransaction):
            one(conn, "SELECT 1")
        assert one(conn, "ROLLBACK") == "ROLLBACK"
        assert one(conn, WHERE + " /* to_one */") == ("rb_one",)
    finally:
        conn.close()


def _startup(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    body = struct.pack("!I", 196608) + b"user\x00app\x00database\x00dev\x00\x00"
    sock.sendall(struct.pack("!I", len(body) + 4) + body)
    return sock


def test_begin_then_disconnect(rr):
    conn = rr.connect("dev", autocommit=True)
    one(conn, "BEGIN")
    before = len(rr.admin("SHOW CLIENTS"))
    conn.close()
    wait_until(lambda: len(rr.admin("SHOW CLIENTS")) == before - 1, timeout=10, message="client gone")
    other = rr.connect("dev", autocommit=True)
    try:
        assert one(other, WHERE + " /* to_two */") == ("rb_two",)
        assert other.info.transaction_status == ext.TRANSACTION_STATUS_IDLE
    finally:
        other.close()
    assert "Traceback" not in rr.log_text()


def test_psycopg3_extended_protocol_follows_the_route(rr):
    with psycopg.connect(rr.dsn("dev"), autocommit=False) as c3:   # BEGIN, then Parse/Bind/Execute
        assert c3.execute("SELECT current_database(), %s::int /* to_two */", (7,)).fetchone() == ("rb_two", 7)
        assert c3.execute("SELECT current_database() /* to_one */").fetchone() == ("rb_two",)
        c3.rollback()


def test_idle_transaction_timeout_after_a_local_begin(pg, bouncer, tmp_path):
    _databases(pg)
    (tmp_path / "router.py").write_text(textwrap.dedent(ROUTER))
    b = bouncer(databases={"dev": pg.conninfo("rb_one"), "dev.2": pg.conninfo("rb_two")},
                pgbouncer={"pool_mode": "transaction", "idle_transaction_timeout": 1,
                           "routing_rules_py_module_file": str(tmp_path / "router.py")})
    conn = b.connect("dev", autocommit=True)
    one(conn, "BEGIN")
    wait_until(lambda: "idle transaction timeout" in b.log_text(), timeout=15, message="timed out")
    with pytest.raises(psycopg2.OperationalError):
        one(conn, "SELECT 1")
    conn.close()


# -- the read/write split --------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    made = []
    try:
        primary = make_primary("rb-primary")
        made.append(primary)
        primary.psql("CREATE TABLE t (id int)", dbname="app", user="app")
        made.append(make_standby(primary, "rb-replica"))
        yield tuple(made)
    finally:
        for cluster in reversed(made):
            cluster.destroy()


@pytest.fixture
def split(pair, bouncer):
    primary, replica = pair
    db = {"host": "127.0.0.1", "port": primary.port, "dbname": "app",
          "replicas": f"127.0.0.1:{replica.port}", "read_write_split": 1}
    return bouncer(databases={"app": db}, pgbouncer={"pool_mode": "transaction", "auth_type": "md5"})


def test_split_classes_a_transaction_by_its_begin(split, pair):
    """The split keeps its answer for the BEGIN: a plain transaction on the
    primary whole (a later statement may write or read its own write), BEGIN
    READ ONLY on a replica, each BEGIN still answered once."""
    primary, replica = pair
    conn = split.connect()
    try:
        probe = split.connect(autocommit=True)
        wait_until(lambda: one(probe, "SELECT inet_server_port()") == (replica.port,),
                   timeout=20, message="replica in rotation")
        probe.close()
        assert one(conn, "SELECT pg_is_in_recovery(), inet_server_port()") == (False, primary.port)
        assert one(conn, "INSERT INTO t VALUES (1)") == "INSERT 0 1"
        assert one(conn, "SELECT pg_is_in_recovery(), count(*) FROM t") == (False, 1)
        conn.rollback()
        assert one(conn, "INSERT INTO t VALUES (2)") == "INSERT 0 1"
        assert one(conn, "SELECT count(*), inet_server_port() FROM t") == (1, primary.port)
        conn.rollback()
        conn.autocommit = True
        for begin in ("BEGIN READ ONLY", "START TRANSACTION READ ONLY, ISOLATION LEVEL REPEATABLE READ"):
            one(conn, begin)
            assert one(conn, "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')") \
                == (True, "on")
            assert one(conn, "COMMIT") == "COMMIT"
        one(conn, "BEGIN READ ONLY")
        assert one(conn, "ROLLBACK") == "ROLLBACK"
        assert conn.info.transaction_status == ext.TRANSACTION_STATUS_IDLE
    finally:
        conn.close()
