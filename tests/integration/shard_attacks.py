"""Hostile connections for a sharded database (test_shard_hostile.py).

Each attack takes a test_fuzz.Hostile (a raw socket and the bookkeeping of its
attack) and raises test_fuzz.Bad when the pooler does what it must never do.
The sharded ones: malformed extended-protocol messages whose faults only the
pooler sees (statements and portals live in the pooler), a client leaving at
any byte of a cross-shard reply, in the middle of a COPY FROM split per row,
inside a transaction on one or several shards, CopyData outside COPY, a
complete query over max_packet_size, a large cross-shard result never read.
"""

from __future__ import annotations

import random
import socket
import struct
import time

import test_fuzz as fz
from _util_pool import message, query_message
from test_fuzz import SYNC, Bad, Hostile, Record, answer_or_close, bind_msg, execute_msg, parse_msg

HOSTILE_ID = 100000        # hostile writes use ids from here: none may survive
KEYED = "SELECT id, name FROM users WHERE id = $1"
BIG = "SELECT repeat('x', 2000) FROM generate_series(1, 20000)"     # every shard: 3 x 40 MB
CROSS = ["SELECT id, name FROM users ORDER BY id", "SELECT count(*), sum(id) FROM users",
         "SELECT team, count(*) FROM users GROUP BY team ORDER BY team",
         "SELECT id FROM users ORDER BY id DESC LIMIT 7 OFFSET 3",
         "SELECT repeat('y', 1000), id FROM users, generate_series(1, 20) ORDER BY id"]


def bind_fmt(params, formats, stmt=b""):
    """A Bind with explicit parameter format codes."""
    body = b"\x00" + stmt + b"\x00" + struct.pack(f"!H{len(formats)}h", len(formats), *formats)
    body += struct.pack("!H", len(params))
    for p in params:
        body += struct.pack("!i", len(p)) + p
    return message(b"B", body + struct.pack("!H", 0))


P_KEYED = parse_msg(KEYED)
P_DOCS = parse_msg("SELECT body FROM docs WHERE key = $1")
# (name, messages): each is followed by Sync and a check query; the pooler
# answers with an error (08P01 and a close for a protocol violation) or goes on.
SHARD_MALFORMED = [
    ("B-unknown-statement", bind_msg([b"1"], stmt=b"gb_nope") + execute_msg()),
    ("B-too-few-params", P_KEYED + bind_msg([]) + execute_msg()),
    ("B-too-many-params", P_KEYED + bind_msg([b"1", b"2", b"3"]) + execute_msg()),
    ("B-binary-key-3-bytes", P_KEYED + bind_fmt([b"abc"], [1]) + execute_msg()),
    ("B-binary-key-16-bytes", P_KEYED + bind_fmt([b"\x01" * 16], [1]) + execute_msg()),
    ("B-text-key-not-a-number", P_KEYED + bind_msg([b"12abc"]) + execute_msg()),
    ("B-format-count-disagrees", P_KEYED + bind_fmt([b"1"], [0, 1, 0]) + execute_msg()),
    ("B-bad-format-code", P_KEYED + bind_fmt([b"1"], [7]) + execute_msg()),
    ("B-negative-length", P_KEYED + message(b"B", b"\x00\x00" + struct.pack("!HHi", 0, 1, -5)
                                            + struct.pack("!H", 0)) + execute_msg()),
    ("B-result-formats-short", P_KEYED + message(b"B", b"\x00\x00" + struct.pack("!HHi", 0, 1, 1)
                                                 + b"1" + struct.pack("!H", 9)) + execute_msg()),
    ("P-duplicate-name", parse_msg("SELECT 1", b"s1") + parse_msg("SELECT 2", b"s1")),
    ("P-unterminated-types", message(b"P", b"\x00" + KEYED.encode() + b"\x00" + struct.pack("!H", 3))
     + bind_msg([b"1"]) + execute_msg()),
    ("D-statement-unknown", fz.describe_msg(b"S", b"gb_nope")),
    ("D-portal-unknown", fz.describe_msg(b"P", b"gb_nope")),
    ("D-bad-kind", P_KEYED + message(b"D", b"Q\x00")),
    ("E-unknown-portal", execute_msg(b"gb_nope")),
    ("C-bad-kind", parse_msg("SELECT 1", b"s2") + message(b"C", b"Zs2\x00")),
    ("C-unterminated", message(b"C", b"Ss2")),
]
# Faults in the sharding key itself (a Traceback today): see the xfail test below.
BAD_KEYS = [
    ("B-text-key-bad-utf8", P_DOCS + bind_msg([b"\xff\xfe"]) + execute_msg()),
    ("B-binary-text-key-bad-utf8", P_DOCS + bind_fmt([b"k\xff"], [1]) + execute_msg()),
    ("Q-key-bad-utf8", message(b"Q", b"SELECT body FROM docs WHERE key = '\xff'\x00")),
    ("Q-bad-utf8", message(b"Q", b"SELECT '\xff\xfe' FROM users WHERE id = 1\x00")),
]


# test_fuzz.py's malformed bodies, but those with a bug of their own (xfail tests below)
KNOWN_BAD = {"Q-unterminated", "Q-bad-utf8"}
FUZZ_MALFORMED = [(name, before + bad) for name, before, bad in fz.MALFORMED if name not in KNOWN_BAD]


def attack_shard_malformed(h: Hostile, table=SHARD_MALFORMED) -> None:
    name, msgs = h.rng.choice(table)
    with_sync = h.rng.random() < 0.8
    h.note(f"{name} {'+Sync' if with_sync else 'then vanish'}")
    h.login()
    if with_sync:
        h.send(msgs + SYNC + query_message("SELECT 42 AS check_query"))
        answer_or_close(h, b"42")
    else:
        h.send(msgs + (fz.FLUSH if h.rng.random() < 0.5 else b""))
        time.sleep(h.rng.uniform(0, 0.05))
        h.check_errors(h.vanish(), fz.pg_any)


def attack_fuzz_malformed(h: Hostile) -> None:
    attack_shard_malformed(h, FUZZ_MALFORMED)


def read_bytes(h: Hostile, limit: int) -> int:
    """Read up to ``limit`` bytes of replies (kept for h.drain, which checks them); returns how many."""
    got = 0
    while got < limit:
        try:
            chunk = h.raw.sock.recv(min(65536, limit - got))
        except (ConnectionResetError, socket.timeout, TimeoutError):
            break
        if not chunk:
            break
        got += len(chunk)
        h.raw.buf += chunk
    return got


def attack_query_vanish(h: Hostile) -> None:
    """A cross-shard query (simple or extended, maybe pipelined), left at any byte of its reply."""
    sql = h.rng.choice(CROSS)
    extended = h.rng.random() < 0.4
    one = fz.extended_query(sql, []) if extended else query_message(sql)
    count = h.rng.randint(1, 3)
    read = h.rng.choice([0, 1, 6, 40, 200, 5000, 100000, 1 << 20])
    h.note(f"{count}x {sql[:30]!r} {'ext' if extended else 'simple'} read {read}")
    h.login()
    h.send(one * count)
    h.note(f"got {read_bytes(h, read)}")
    h.check_errors(h.vanish(), fz.POOLER)


def attack_copy_vanish(h: Hostile) -> None:
    """COPY users FROM STDIN, some hostile rows, then a cut, garbage or a disappearance."""
    csv = h.rng.random() < 0.5
    h.login()
    h.send(query_message("COPY users (id, name) FROM STDIN" + (" WITH (FORMAT csv)" if csv else "")))
    msgs = h.raw.read_until(b"GEZ")
    if not msgs or msgs[-1][0] != b"G":
        raise Bad(f"no CopyInResponse: {fz.summarize(msgs)}")
    sep = "," if csv else "\t"
    data = "".join(f"{HOSTILE_ID + h.rng.randrange(10 ** 6)}{sep}hostile\n"
                   for _ in range(h.rng.randint(0, 200))).encode()
    cut = h.rng.randint(0, len(data))
    h.send(message(b"d", data[:cut]))
    end = h.rng.choice(["vanish", "cut-message", "garbage-type", "query", "terminate"])
    h.note(f"{'csv' if csv else 'text'} {cut}/{len(data)} bytes, then {end}")
    if end == "cut-message":
        h.send(message(b"d", data[cut:] or b"1")[:-1])
    elif end == "garbage-type":
        h.send(message(b"~", b"junk"))
    elif end == "query":
        h.send(query_message("SELECT 1"))
    elif end == "terminate":
        h.send(fz.TERMINATE)
    time.sleep(h.rng.uniform(0, 0.05))
    h.check_errors(h.vanish(), fz.pg_any)


def attack_tx_vanish(h: Hostile) -> None:
    """BEGIN, writes on one or two shards (two_phase_commit), maybe a cross-shard read, then gone."""
    keys = [HOSTILE_ID + h.rng.randrange(10 ** 6) for _ in range(h.rng.randint(1, 3))]
    steps = ["BEGIN"] + [f"INSERT INTO users (id, name) VALUES ({k}, 'hostile-tx')" for k in keys]
    if h.rng.random() < 0.5:
        steps.insert(h.rng.randint(1, len(steps)), "SELECT count(*) FROM users")
    h.login()
    h.send(b"".join(query_message(sql) for sql in steps))
    msgs = h.read_until_ready(len(steps))
    if msgs[-1] != (b"Z", b"T") or [m for m in msgs if m[0] == b"E"]:
        raise Bad(f"the transaction is not open: {fz.summarize(msgs)}")
    end = h.rng.choice(["vanish", "garbage", "half-commit", "commit-unread", "unknown-type"])
    h.note(f"{len(keys)} keys, then {end}; ready={msgs[-1][1]!r}")
    if end == "garbage":
        h.send(h.rng.randbytes(h.rng.randint(1, 300)))
    elif end == "half-commit":
        h.send(query_message("ROLLBACK")[:-3])
    elif end == "commit-unread":
        h.send(query_message("SELECT pg_sleep(0.05); ROLLBACK"))
    elif end == "unknown-type":
        h.send(message(b"~", b"junk"))
    h.check_errors(h.vanish(), fz.pg_any)


def attack_copydata_outside(h: Hostile) -> None:
    """CopyData / CopyDone / CopyFail outside COPY are ignored (as PostgreSQL does)."""
    strays = message(b"d", h.rng.randbytes(h.rng.randint(0, 2000))) + message(b"c") + message(b"f", b"x\x00")
    h.login()
    h.send(strays + query_message("SELECT 42"))
    answer_or_close(h, b"42")


def attack_huge_query(h: Hostile) -> None:
    """A complete, valid query of more than max_packet_size: 08P01 and a close."""
    size = fz.MAX_PACKET + h.rng.choice([1, 1000, fz.MAX_PACKET])
    h.login()
    h.send(query_message("SELECT '" + "x" * size + "' FROM users"))
    fz.expect_rejected(h)


def attack_unread_big(h: Hostile) -> None:
    """A large cross-shard result nobody reads, then the client leaves."""
    h.login()
    h.send(query_message(BIG))
    time.sleep(h.rng.uniform(0.2, 1.0))
    h.note(f"read {read_bytes(h, h.rng.choice([0, 100, 1 << 20]))}")
    h.check_errors(h.vanish(), fz.POOLER)


# Not begin_then_garbage: its text spans shards (refused by design).
REUSED = ["random_bytes", "truncated", "lie_more", "lie_short", "huge_length",
          "unknown_type", "query_then_garbage", "copydata_50mb",
          "half_parse", "pipeline_vanish", "random_frames"]
ATTACKS = {**{name: fz.ATTACKS[name][0] for name in REUSED},
           "shard_malformed": attack_shard_malformed, "fuzz_malformed": attack_fuzz_malformed,
           "query_vanish": attack_query_vanish, "query_vanish2": attack_query_vanish,
           "copy_vanish": attack_copy_vanish, "tx_vanish": attack_tx_vanish,
           "copydata_outside": attack_copydata_outside, "huge_query": attack_huge_query,
           "unread_big": attack_unread_big}


def run_one(b, name: str, seed: int, fn=None) -> Record:
    rec = Record(0, name, seed)
    h = Hostile(b, random.Random(seed), rec)
    try:
        (fn or ATTACKS[name])(h)
    except Bad as exc:
        rec.failure = str(exc)
    except Exception as exc:  # noqa: BLE001 - any surprise is a finding
        rec.failure = f"{type(exc).__name__}: {exc}"
    finally:
        h.close()
    return rec
