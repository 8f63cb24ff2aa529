"""Hostile clients and a bad network against a sharded database (net/sharded.py).

One pooler whose ``app`` is ``shards=sh_0,sh_1,sh_2`` (shardfix.py), with
``max_packet_size`` 1 MB and ``two_phase_commit`` on, takes a bounded storm of
raw-socket connections, 6 at a time: test_fuzz.py's attacks after login (random
and truncated bytes, lying lengths, malformed bodies, CopyData claiming 50 MB,
half a Parse, pipelines abandoned...) and the sharded ones below: malformed
extended-protocol messages whose faults only the pooler sees (statements and
portals live in the pooler: unknown statements, parameter counts that disagree,
a binary key of the wrong length), a client leaving at any byte of a
cross-shard reply, in the middle of a COPY FROM split per row, inside a
transaction on one or two shards, CopyData outside COPY, a complete query over
max_packet_size, and a client that never reads a large cross-shard result.

Meanwhile good clients (psycopg2, psycopg 3 with prepared statements) run keyed
and cross-shard reads and writes and check every answer. Afterwards: no
hostile row survived on any shard, no shard has a session idling in a
transaction or a prepared transaction left, pooled servers are clean, the
pooler's log has no Traceback and its RSS stays bounded.

The attacks are in shard_attacks.py; the defects found are the xfail tests at
the end. Reproduce with ``GEOBOUNCER_FUZZ_SEED=<seed>`` (shared with test_fuzz.py).
"""

from __future__ import annotations

import io
import random
import socket
import struct
import threading
import time

import psycopg
import psycopg2
import pytest
import test_fuzz as fz
from _util_pool import RawClient, close_quietly, message, query_message, query_one, run_in_thread
from fixtures.ports import wait_until
from shard_attacks import ATTACKS, BAD_KEYS, HOSTILE_ID, KEYED, run_one
from shardfix import SHARDS, _keys_on_two_shards, direct, shard_pg, sharded, shards  # noqa: F401
from test_fuzz import SYNC, bind_msg, execute_msg, parse_msg, summarize

pytestmark = pytest.mark.geobouncer_only("sharding (PgDog style)")

ROWS = 300                 # users 1..300, loaded before the storm
STORM_COUNT = 150
STORM_SECONDS = 20.0
SETTINGS = {"max_packet_size": fz.MAX_PACKET, "two_phase_commit": 1, "default_pool_size": 6,
            "max_client_conn": 200, "query_wait_timeout": 20}


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
            for _ in range(SETTINGS["default_pool_size"] + 1):
                row = query_one(conn, f"/* geobouncer:shard={shard} */ SELECT current_database(), "
                                      "txid_current_if_assigned(), now() = statement_timestamp()")
                assert row == (SHARDS[shard], None, True), row
    finally:
        conn.close()


def check_log(b) -> None:
    log = b.log_text() + b.output_text()
    bad = [ln for ln in log.splitlines() if "Traceback" in ln or "internal error" in ln or "Error:" in ln]
    assert not bad and "Traceback" not in log, "\n".join(bad)[-4000:] + "\n" + log[-4000:]


# -- the tests ------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_hostile_storm_on_a_sharded_database_beside_good_clients(sharded, shards):
    b = sharded(**SETTINGS)
    load_users(b)
    rss_before = fz.rss_kb(b.pid)
    names = sorted(ATTACKS)
    rng = random.Random(f"{fz.SEED}:shard-storm")
    plan = [(rng.choice(names), rng.getrandbits(48)) for _ in range(STORM_COUNT)]
    records, lock, stop = [], threading.Lock(), threading.Event()
    deadline = time.monotonic() + STORM_SECONDS

    def worker():
        while time.monotonic() < deadline:
            with lock:
                if not plan:
                    return
                name, seed = plan.pop()
            records.append(run_one(b, name, seed))

    failures, done = [], [0, 0, 0]
    good = [threading.Thread(target=good_psycopg2, args=(b, i, stop, failures, done), daemon=True)
            for i in range(2)]
    good.append(threading.Thread(target=good_psycopg3, args=(b, 2, stop, failures, done), daemon=True))
    hostile = [threading.Thread(target=worker, daemon=True) for _ in range(6)]
    for t in good + hostile:
        t.start()
    for t in hostile:
        t.join(STORM_SECONDS + 2 * fz.EOF_TIMEOUT + 5)
    stop.set()
    for t in good:
        t.join(20)
    tag = f"[seed {fz.SEED}: GEOBOUNCER_FUZZ_SEED={fz.SEED}]"
    bad = [r.describe() for r in records if r.failure]
    print(f"{tag} {len(records)} attacks, good clients {done}")
    assert not [t for t in hostile + good if t.is_alive()], f"{tag} threads hung"
    assert not bad, f"{tag} {len(bad)} of {len(records)} attacks saw the pooler misbehave:\n" + "\n".join(bad[:20])
    assert not failures, f"{tag} good clients failed:\n" + "\n".join(failures[:20])
    assert min(done) > 0 and len(records) >= 60, (done, len(records))
    check_shards_clean(b, shards)
    assert fz.rss_kb(b.pid) < fz.RSS_LIMIT_KB, (rss_before, fz.rss_kb(b.pid))
    check_log(b)


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


def test_leaving_at_every_point_of_a_cross_shard_request_and_reply(sharded, shards):
    b = sharded(**SETTINGS)
    load_users(b)
    sql = "SELECT id, name FROM users ORDER BY id"
    requests = {"simple": query_message(sql) * 2,
                "extended": parse_msg(sql) + bind_msg([]) + fz.describe_msg() + execute_msg() + SYNC}
    for kind, data in requests.items():
        msgs = reply_of(b, data, 2 if kind == "simple" else 1)
        want = b"TCZTCZ" if kind == "simple" else b"12TCZ"
        assert bytes(m[0][0] for m in msgs if m[0] != b"D") == want, summarize(msgs)
        assert [int(fz.datarow_values(m[1])[0]) for m in msgs if m[0] == b"D"][:ROWS] == list(range(1, ROWS + 1))
        total = sum(5 + len(body) for _, body in msgs)
        ends, pos = [], 0
        for _, body in msgs:
            pos += 5 + len(body)
            ends.append(pos)
        points = sorted({0, 1, 4, 5, 6, total - 1} | set(ends[:3] + ends[-4:-1]) | set(ends[5::40]))
        for cut in range(1, len(data)):         # the request cut at every byte
            raw = raw_login(b)
            raw.send(data[:cut])
            reset(raw)
        for point in points:                    # the reply left at these bytes
            raw = raw_login(b)
            raw.send(data)
            got = 0
            while got < point:
                chunk = raw.sock.recv(point - got)
                assert chunk, f"{kind}: the pooler closed at byte {got} of {total}"
                got += len(chunk)
            reset(raw) if point % 2 else raw.close()
        assert query_one(b.connect("app", autocommit=True), "SELECT count(*) FROM users") == (ROWS,)
    check_shards_clean(b, shards)
    check_log(b)


def test_a_shard_server_lost_mid_request_fails_that_request_only(sharded, shards):
    b = sharded(**SETTINGS)
    load_users(b)

    def kill_soon():
        time.sleep(0.4)
        with direct(shards, "postgres") as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'sh_1' "
                        "AND query LIKE '%%pg_sleep(1.5)%%' AND pid <> pg_backend_pid()")
            return cur.fetchall()

    conn = b.connect("app")
    for in_tx in (False, True):
        conn.autocommit = not in_tx
        with conn.cursor() as cur:
            if in_tx:
                cur.execute("INSERT INTO users (id, name) VALUES (%s, 'lost')", (HOSTILE_ID,))
            killer = run_in_thread(kill_soon)
            with pytest.raises(psycopg2.OperationalError) as info:
                cur.execute("SELECT id FROM users, pg_sleep(1.5) ORDER BY id")
            assert info.value.pgcode == "08006", info.value
            assert killer.get(10) == [(True,)]
        if in_tx:
            conn.rollback()
        assert query_one(conn, "SELECT count(*) FROM users") == (ROWS,)
        conn.rollback()
    conn.close()
    check_shards_clean(b, shards)
    check_log(b)


def test_copy_in_the_extended_protocol_is_refused_not_hung(sharded, shards):
    """A COPY FROM STDIN sent with Parse/Bind/Execute hung the client and left
    every shard's server in COPY, active forever, even after the client left."""
    b = sharded(**SETTINGS)
    raw = raw_login(b)
    raw.send(parse_msg("COPY users (id, name) FROM STDIN") + bind_msg([]) + execute_msg() + SYNC)
    msgs = raw.read_until(b"Z")
    errors = [fz.parse_error_fields(body) for t, body in msgs if t == b"E"]
    assert [e["C"] for e in errors] == ["0A000"], summarize(msgs)
    raw.send(query_message("SELECT count(*) FROM users"))
    assert [m[0] for m in raw.read_until(b"Z")] == [b"T", b"D", b"C", b"Z"]
    reset(raw)
    check_shards_clean(b, shards)
    check_log(b)
