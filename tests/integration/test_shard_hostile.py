"""Hostile clients and a bad network against a sharded database (net/sharded.py).

One pooler whose ``app`` is ``shards=sh_0,sh_1,sh_2`` (shardfix.py), with
``max_packet_size`` 1 MB and ``two_phase_commit`` on, takes a bounded storm of
raw-socket connections, 6 at a time: test_fuzz.py's attacks after login (random
and truncated bytes, lying lengths, malformed bodies, CopyData claiming 50 MB,
half a Parse, pipelines abandoned...) and the sharded ones of shard_attacks.py: malformed
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

Then one test per way of going away or breaking: leaving at every byte of a
cross-shard request and of its reply; a shard's server killed mid-request
(08006 for that request only); the client or a shard lost during PREPARE
TRANSACTION (two_phase_commit); COPY through Parse/Bind/Execute (refused, it
hung); CSV COPY rows too long, broken, or a quote that never closes; and
the defects these tests found, each fixed, at the end. Good clients and the
checks are in shardcheck.py. Reproduce with ``GEOBOUNCER_FUZZ_SEED=<seed>`` (shared with test_fuzz.py);
``GEOBOUNCER_SHARD_FUZZ_COUNT=N`` sizes the storm.
"""

from __future__ import annotations

import os
import random
import threading
import time

import psycopg2
import pytest
import test_fuzz as fz
from _util_pool import errors_in, message, query_message, query_one, run_in_thread
from fixtures.ports import wait_until
from shard_attacks import ATTACKS, BAD_KEYS, HOSTILE_ID, KEYED, run_one
from shardcheck import (POOL_SIZE, ROWS, check_log, check_shards_clean, good_psycopg2, good_psycopg3, load_users,
                        prepared_xacts, raw_login, reply_of, reset, shard_sessions)
from shardfix import SHARDS, _keys_on_two_shards, _shard_of, direct, shard_pg, sharded, shards  # noqa: F401
from test_fuzz import SYNC, bind_msg, execute_msg, parse_msg, summarize

pytestmark = pytest.mark.geobouncer_only("sharding (PgDog style)")

STORM_COUNT = int(os.environ.get("GEOBOUNCER_SHARD_FUZZ_COUNT", "150"))    # attacks at most
STORM_SECONDS = 20.0 * max(1, STORM_COUNT // 150)                           # none starts later
SETTINGS = {"max_packet_size": fz.MAX_PACKET, "two_phase_commit": 1, "default_pool_size": POOL_SIZE,
            "max_client_conn": 200, "query_wait_timeout": 20}


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


SLOW_PREPARE = """
CREATE OR REPLACE FUNCTION slow_prepare() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN PERFORM pg_sleep(1.5); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER slow_prepare AFTER INSERT ON users DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION slow_prepare();
"""


def two_shard_commit(b, shards, lose: str):
    """BEGIN, a row on each of two shards, COMMIT; the second shard's PREPARE
    TRANSACTION takes 1.5 s (a deferred trigger), and in the middle of it
    ``lose`` goes away: the client (reset) or that shard's server."""
    a, c = _keys_on_two_shards(shards)
    with direct(shards, SHARDS[_shard_of(shards, c)]) as conn, conn.cursor() as cur:
        cur.execute(SLOW_PREPARE)
    raw = raw_login(b)
    steps = ["BEGIN", f"INSERT INTO users (id, name) VALUES ({a}, 'a')",
             f"INSERT INTO users (id, name) VALUES ({c}, 'c')"]
    raw.send(b"".join(query_message(s) for s in steps))
    for _ in steps:
        assert not errors_in(raw.read_until(b"Z"))
    raw.send(query_message("COMMIT"))
    wait_until(lambda: shard_sessions(shards, "query LIKE 'PREPARE TRANSACTION%%'"), timeout=5)
    if lose == "client":
        reset(raw)
        return a, c, None
    with direct(shards, "postgres") as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE query LIKE 'PREPARE TRANSACTION%%' AND pid <> pg_backend_pid()")
    msgs = raw.read_until(b"Z")
    raw.close()
    return a, c, msgs


def committed(cluster, keys) -> set:
    found = set()
    for name in SHARDS:
        with direct(cluster, name) as conn, conn.cursor() as cur:
            cur.execute("SELECT id FROM users WHERE id = ANY(%s)", (list(keys),))
            found |= {i for (i,) in cur.fetchall()}
    return found


def test_client_gone_during_two_phase_commit_the_pooler_finishes_it(sharded, shards):
    b = sharded(**SETTINGS)
    a, c, _ = two_shard_commit(b, shards, "client")
    # Finished by the pooler itself, well before the recovery's 5 s grace period.
    wait_until(lambda: not prepared_xacts(shards) and not shard_sessions(shards, "state <> 'idle'"),
               timeout=4, message="the two-phase commit finished")
    assert committed(shards, [a, c]) == {a, c}
    check_shards_clean(b, shards)
    check_log(b)


def test_shard_lost_during_two_phase_commit_rolls_back_the_prepared_shards_at_once(sharded, shards):
    b = sharded(**SETTINGS)
    a, c, msgs = two_shard_commit(b, shards, "server")
    errors = errors_in(msgs)
    assert errors and errors[0]["C"].startswith("08"), summarize(msgs)
    assert b"COMMIT" not in b"".join(body for t, body in msgs if t == b"C"), summarize(msgs)
    check_shards_clean(b, shards, prepared_timeout=3)    # not left for the recovery (5 to 15 s later)
    assert committed(shards, [a, c]) == set()



def copy_csv(b, chunks) -> list:
    """COPY users (id, name) FROM STDIN as CSV: the CopyData ``chunks``, then CopyDone."""
    raw = raw_login(b)
    raw.send(query_message("COPY users (id, name) FROM STDIN WITH (FORMAT csv)"))
    assert raw.read_until(b"GEZ")[-1][0] == b"G"
    for chunk in chunks:
        raw.send(message(b"d", chunk))
    raw.send(message(b"c"))
    msgs = raw.read_until(b"Z")
    raw.close()
    return msgs


def test_long_or_broken_csv_copy_rows_get_an_error_or_go_through(sharded, shards):
    """A CSV field over 128 kB (the csv module's default limit), an empty line
    or a NUL were a Traceback; a quote that never closes was rescanned from
    its start at every CopyData and held without bound."""
    b = sharded(**SETTINGS)
    big = "x" * 300000
    msgs = copy_csv(b, [b'1,"' + big[:1000].encode(), big[1000:].encode() + b'"\n2,small\n'])
    assert (b"C", b"COPY 2\x00") in msgs, summarize(msgs)
    assert query_one(b.connect("app", autocommit=True), "SELECT length(name) FROM users WHERE id = 1") == (300000,)
    for broken in (b"3,a\n\n4,b\n", b"5,a\x00b\n"):
        codes = [e["C"] for e in errors_in(copy_csv(b, [broken]))]
        assert codes and not codes[0].startswith("XX"), codes
    never_closed = [b'9,"'] + [b"y" * 1000000] * 68            # 68 MB, over MAX_ROW (64 MiB)
    codes = [e["C"] for e in errors_in(copy_csv(b, never_closed))]
    assert codes == ["54000"], codes
    assert fz.rss_kb(b.pid) < fz.RSS_LIMIT_KB
    check_shards_clean(b, shards)
    check_log(b)



def test_a_malformed_extended_message_is_08P01_and_a_close(sharded, shards):
    """Statements and portals live in the pooler: it checks what PostgreSQL would."""
    b = sharded(**SETTINGS)
    for name in ("C-bad-kind", "E-no-max-rows", "E-unterminated", "P-count-no-types", "P-huge-count",
                 "P-trailing-garbage", "B-format-count-no-codes"):
        before, bad = next((before, bad) for n, before, bad in fz.MALFORMED if n == name)
        raw = raw_login(b)
        raw.send(before + bad + SYNC)
        msgs = raw.read_until_close()
        raw.close()
        assert [e["C"] for e in errors_in(msgs)] == ["08P01"], f"{name}: {summarize(msgs)}"
    check_log(b)


# -- defects found by these tests, fixed since -------------------------------------------------
def error_then_alive(b, data: bytes) -> list:
    """``data`` gets an ErrorResponse (never XX000), and then either a close or a
    working connection; no Traceback in the log."""
    raw = raw_login(b)
    raw.send(data)
    msgs = raw.read_until(b"Z")
    raw.send(query_message("SELECT 42 AS check_query"))
    after = raw.read_until(b"Z")
    raw.close()
    errors = errors_in(msgs)
    assert errors and not errors[0]["C"].startswith("XX"), summarize(msgs)
    assert not after or fz.datarow_values(after[1][1]) == [b"42"], summarize(after)
    check_log(b)
    return msgs


def test_an_unterminated_query_is_a_protocol_violation_not_a_shorter_query(sharded, shards):
    b = sharded(**SETTINGS)
    load_users(b)
    raw = raw_login(b)
    raw.send(message(b"Q", b"DELETE FROM users WHERE id = 12"))   # runs as "... id = 1"
    msgs = raw.read_until(b"Z")     # the whole answer, or the error and the close
    assert query_one(b.connect("app", autocommit=True), "SELECT count(*) FROM users") == (ROWS,)
    assert [e["C"] for e in errors_in(msgs)] == ["08P01"], summarize(msgs)
    assert not [m for m in msgs if m[0] in (b"T", b"D", b"C")], summarize(msgs)


@pytest.mark.parametrize("name", [name for name, _ in BAD_KEYS])
def test_bytes_that_are_not_utf8_get_an_error_not_a_traceback(sharded, shards, name):
    b = sharded(**SETTINGS)
    data = dict(BAD_KEYS)[name]
    error_then_alive(b, data + (b"" if name.startswith("Q") else SYNC))


@pytest.mark.parametrize("sql", [KEYED, "SELECT id FROM users WHERE id <= $1 ORDER BY id"])
def test_execute_max_rows_is_honoured_or_refused(sharded, shards, sql):
    b = sharded(**SETTINGS)
    load_users(b)
    raw = raw_login(b)
    raw.send(parse_msg(sql) + bind_msg([b"5"]) + execute_msg(max_rows=1) + SYNC)
    msgs = raw.read_until(b"Z")
    raw.close()
    if errors_in(msgs):
        assert errors_in(msgs)[0]["C"] == "0A000", summarize(msgs)
    else:
        assert b"".join(m[0] for m in msgs) == b"12DsZ", summarize(msgs)


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_copy_to_stdout_across_shards_gives_every_row_or_a_clear_refusal(sharded, shards, protocol):
    b = sharded(**SETTINGS)
    load_users(b)
    sql = "COPY users (id) TO STDOUT"
    msgs = reply_of(b, query_message(sql) if protocol == "simple"
                    else parse_msg(sql) + bind_msg([]) + execute_msg() + SYNC)
    errors = errors_in(msgs)
    if errors:
        assert errors[0]["C"] == "0A000", summarize(msgs)
    else:
        rows = sorted(int(body) for t, body in msgs if t == b"d")
        assert rows == list(range(1, ROWS + 1)) and (b"C", b"COPY 300\x00") in msgs, summarize(msgs)


def test_a_query_of_many_tokens_does_not_stall_every_other_client(sharded, shards):
    b = sharded(**SETTINGS)
    bystander = b.connect("ref", autocommit=True)         # not even a sharded database
    assert query_one(bystander, "SELECT 1") == (1,)
    raw = raw_login(b)
    raw.send(query_message("SELECT 1" + ",1" * 150000 + " FROM users"))
    time.sleep(0.3)
    started = time.monotonic()
    assert query_one(bystander, "SELECT 2") == (2,)
    took = time.monotonic() - started
    raw.close()
    bystander.close()
    assert took < 3, f"a bystander's SELECT took {took:.1f} s"


def test_a_notification_from_a_shard_is_not_an_internal_error(sharded, shards):
    b = sharded(**SETTINGS)
    msgs = reply_of(b, query_message("LISTEN gb_hostile") + query_message("NOTIFY gb_hostile"), 2)
    codes = [e["C"] for e in errors_in(msgs)]
    assert not [c for c in codes if c.startswith("XX")], summarize(msgs)
