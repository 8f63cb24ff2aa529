"""Good clients and after-the-storm checks for a sharded database (test_shard_hostile.py)."""

from __future__ import annotations

import io
import random
import socket
import struct
import threading

import psycopg
import test_fuzz as fz
from _util_pool import RawClient, close_quietly, query_one
from fixtures.ports import wait_until
from shard_attacks import HOSTILE_ID
from shardfix import SHARDS, direct
from test_fuzz import summarize

ROWS = 300                 # users 1..300 (load_users)
POOL_SIZE = 6


# -- good clients and the checks afterwards ------------------------------------------------------
def load_users(b) -> None:
    conn = b.connect("app", autocommit=True)
    try:
        with conn.cursor() as cur:
            data = "".join(f"{i}\tuser{i}\t{('red', 'blue', 'green')[i % 3]}\n" for i in range(1, ROWS + 1))
            cur.copy_expert("COPY users (id, name, team) FROM STDIN", io.StringIO(data))
    finally:
        conn.close()


def good_psycopg2(b, wid: int, stop: threading.Event, failures: list, done: list) -> None:
    rng = random.Random(f"{fz.SEED}:shard-good:{wid}")
    lo = (wid + 1) * 10 ** 6
    conn, n, total = None, 0, 0
    while not stop.is_set() and n < 5000:
        n += 1
        try:
            if conn is None:
                conn = b.connect("app", autocommit=True)
            with conn.cursor() as cur:
                uid = rng.randint(1, ROWS)
                cur.execute("INSERT INTO payments (id, user_id, amount) VALUES (%s, %s, %s)", (lo + n, uid, n))
                total += n
                checks = [("SELECT name FROM users WHERE id = %s", (uid,), [(f"user{uid}",)]),
                          ("SELECT count(*), sum(amount) FROM payments WHERE id > %s AND id < %s",
                           (lo, lo + 10 ** 6), [(n, total)]),
                          ("SELECT count(*), sum(id) FROM users WHERE id <= %s", (ROWS,),
                           [(ROWS, ROWS * (ROWS + 1) // 2)]),
                          ("SELECT id FROM users WHERE id <= 300 ORDER BY id LIMIT 3 OFFSET %s", (uid,),
                           [(i,) for i in range(uid + 1, min(uid + 3, ROWS) + 1)])]
                for sql, args, want in checks:
                    cur.execute(sql, args)
                    got = [tuple(int(v) if hasattr(v, "as_integer_ratio") else v for v in r) for r in cur.fetchall()]
                    if got != want:
                        failures.append(f"psycopg2-{wid}: {sql} {args}: {got!r} != {want!r}")
            done[wid] += 1
            if n % 25 == 0:
                conn.close()
                conn = None
        except Exception as exc:  # noqa: BLE001 - a good client must never fail
            failures.append(f"psycopg2-{wid}: {type(exc).__name__}: {exc}".strip())
            close_quietly(conn)
            conn = None
    close_quietly(conn)


def good_psycopg3(b, wid: int, stop: threading.Event, failures: list, done: list) -> None:
    rng = random.Random(f"{fz.SEED}:shard-good-pg3")
    conn, n = None, 0
    while not stop.is_set() and n < 5000:
        n += 1
        try:
            if conn is None:
                conn = psycopg.connect(b.dsn("app"), autocommit=True, prepare_threshold=0)
            uid = rng.randint(1, ROWS)
            checks = [("SELECT id, name FROM users WHERE id = %s", (uid,), [(uid, f"user{uid}")]),
                      ("SELECT count(*) FROM users WHERE id <= %s", (ROWS,), [(ROWS,)]),
                      ("SELECT id FROM users WHERE id <= %s ORDER BY id LIMIT 2", (uid,),
                       [(i,) for i in range(1, min(uid, 2) + 1)])]
            for sql, args, want in checks:
                got = conn.execute(sql, args).fetchall()
                if got != want:
                    failures.append(f"psycopg3: {sql} {args}: {got!r} != {want!r}")
            with conn.transaction():
                conn.execute("UPDATE users SET score = %s WHERE id = %s", (n, uid))
                got = conn.execute("SELECT score FROM users WHERE id = %s", (uid,)).fetchall()
                if got != [(n,)]:
                    failures.append(f"psycopg3: score in the transaction {got!r} != {[(n,)]!r}")
            done[wid] += 1
        except Exception as exc:  # noqa: BLE001
            failures.append(f"psycopg3: {type(exc).__name__}: {exc}".strip())
            close_quietly(conn)
            conn = None
    close_quietly(conn)


def shard_sessions(cluster, where: str) -> list:
    with direct(cluster, "postgres") as conn, conn.cursor() as cur:
        cur.execute("SELECT datname, pid, state, left(query, 60), now() - state_change FROM pg_stat_activity "
                    "WHERE datname = ANY(%s) AND pid <> pg_backend_pid() AND " + where, (list(SHARDS),))
        return cur.fetchall()


def prepared_xacts(cluster) -> list:
    with direct(cluster, "postgres") as conn, conn.cursor() as cur:
        cur.execute("SELECT database, gid, prepared FROM pg_prepared_xacts WHERE database = ANY(%s)",
                    (list(SHARDS),))
        return cur.fetchall()


def check_shards_clean(b, cluster, prepared_timeout: float = 10.0) -> None:
    """What a storm may not leave behind on the shards and in the pooler."""
    def quiet():
        return not shard_sessions(cluster, "(state LIKE 'idle in transaction%%' OR state = 'active')")
    try:
        wait_until(quiet, timeout=10)
    except TimeoutError:
        raise AssertionError(f"shard sessions still busy: {shard_sessions(cluster, 'state <> $$idle$$')}") from None
    try:
        wait_until(lambda: not prepared_xacts(cluster), timeout=prepared_timeout)
    except TimeoutError:
        raise AssertionError(f"prepared transactions left: {prepared_xacts(cluster)}") from None
    for name in SHARDS:
        with direct(cluster, name) as conn, conn.cursor() as cur:
            cur.execute("SELECT id FROM users WHERE id >= %s", (HOSTILE_ID,))
            assert cur.fetchall() == [], f"{name}: rows of a hostile client that never committed"
    active = [r for r in b.admin("SHOW SERVERS") if r.database in SHARDS and r.state == "active"]
    assert not active, f"servers still active: {active}"
    conn = b.connect("app", autocommit=True)
    try:       # every pooled server is clean: no transaction, no leftover reply
        for shard in range(len(SHARDS)):
            for _ in range(POOL_SIZE + 1):
                row = query_one(conn, f"/* geobouncer:shard={shard} */ SELECT current_database(), "
                                      "txid_current_if_assigned(), now() = statement_timestamp()")
                assert row == (SHARDS[shard], None, True), row
    finally:
        conn.close()


def check_log(b) -> None:
    log = b.log_text() + b.output_text()
    bad = [ln for ln in log.splitlines() if "Traceback" in ln or "internal error" in ln or "Error:" in ln]
    assert not bad and "Traceback" not in log, "\n".join(bad)[-4000:] + "\n" + log[-4000:]


def raw_login(b) -> RawClient:
    raw = RawClient(b.host, b.port, timeout=fz.IO_TIMEOUT)
    replies = raw.login("app", "app_pw", "app")
    assert replies and replies[-1][0] == b"Z", summarize(replies)
    return raw


def reset(raw: RawClient) -> None:
    """The network drops the connection: RST, no goodbye."""
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()


def reply_of(b, data: bytes, count: int = 1) -> list:
    raw = raw_login(b)
    try:
        raw.send(data)
        out = []
        for _ in range(count):
            out += raw.read_until(b"Z", limit=100000)
        return out
    finally:
        raw.close()
