"""Fuzz: hundreds of hostile connections interleaved with good clients, against real PostgreSQL.

Per pool mode (transaction, session) one pooler with a small pool (3 servers;
4 in session mode, where a keeper connection holds one throughout) and
``max_packet_size`` 1 MB takes a storm of raw-socket connections, 8 at a time:
at least ``FUZZ_COUNT`` (300) and at least ``STORM_MIN`` (10) seconds' worth,
at most ``FUZZ_MAX`` (2000), none started after ``STORM_BUDGET`` (55 s). Each
runs one attack picked by a seeded generator (``ATTACKS``): most log in first
(md5) and then misbehave -- random bytes, well-framed random bodies, truncated
messages, lengths that lie (more than sent, under 4, over the limit), malformed
Parse / Bind / Describe / Close / Execute / Sync / Query bodies, startup packets
and SSL / GSS / Cancel requests and PasswordMessages after login, unknown types,
a valid request split into pieces with pauses (it must get its normal answer),
a query then garbage, CopyData outside COPY claiming 50 MB, an open transaction
then garbage or a disappearance, half a Parse, pipelined queries abandoned
mid-reply; the rest misbehave before login (garbage startup, huge or tiny
startup length, startup cut short, random CancelRequest, login abandoned, wrong
or garbage password, a query instead of a password). "Disappearing" is a
half-close (then we read until the pooler closes), a close, or a reset.

Meanwhile good clients -- three psycopg2 threads and one psycopg 3 thread using
the extended protocol with ``prepare=True`` and ``conn.transaction()`` -- run
checked queries in a loop, reconnecting now and then (every 5 / 10 queries in
session mode, so servers change hands): every answer is verified, every
connection has its own application_name and checks ``SHOW application_name``,
every autocommit query checks it is not inside somebody else's transaction
(``now() = statement_timestamp()``, no transaction id), and the transaction
checks both its statements ran on one backend in one transaction.

Assertions: no good client ever fails or gets a wrong answer; every hostile
connection ends with the pooler closing the socket (unless we closed it), and
every ErrorResponse it got is the pooler's 08P01 or one PostgreSQL itself sent
for what reached it (never XX000 / "internal error"; the pooler's "server conn
crashed?" must be 08P01 as PgBouncer's); afterwards no client is left (SHOW
CLIENTS, SHOW LISTS), no server is active (SHOW POOLS, SHOW SERVERS), at most
the pool's size of backends remain and none idles in a transaction, pooled
servers are clean, the pooler is alive (``check_pooler_alive``), its log has no
Traceback / internal error and its RSS stays under 200 MB.

Reproduce: the seed is in every failure message and in the printed summary (-s).
``GEOBOUNCER_FUZZ_SEED=<seed>`` replays the same attacks (attack #i is the same
whatever the timing), ``GEOBOUNCER_FUZZ_ATTACKS=a,b`` runs only those (same
per-attack seeds), ``GEOBOUNCER_FUZZ_COUNT=N`` / ``GEOBOUNCER_FUZZ_MIN_SECONDS=S``
size the storm, ``GEOBOUNCER_FUZZ_VERBOSE=1`` prints every attack's outcome.

``GEOBOUNCER_TEST_TARGET=pgbouncer`` (PgBouncer 1.18) differs where 1.18 is known
to hand a dirty server to the next client or to behave otherwise by design; each
place says why (grep ``TARGET``): no named prepared statements for psycopg 3 in
transaction mode, no pipelined requests before a disappearance, no complete
batch before a half Parse, and at login a query instead of a password may be
closed without an ErrorResponse (a garbage password is closed only at
client_login_timeout, hence 5 s here).
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import psycopg
import psycopg2
import pytest
from _util_pool import (
    PROTOCOL_3_0,
    SSL_REQUEST,
    RawClient,
    check_pooler_alive,
    close_quietly,
    message,
    parse_error_fields,
    pool_row,
    query_message,
    query_one,
    run_in_thread,
    startup_packet,
    wait_no_backends,
)
from fixtures.pooler import TARGET
from fixtures.ports import wait_until

SEED = int(os.environ.get("GEOBOUNCER_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))
FUZZ_COUNT = int(os.environ.get("GEOBOUNCER_FUZZ_COUNT", "300"))
ONLY = {a for a in os.environ.get("GEOBOUNCER_FUZZ_ATTACKS", "").split(",") if a}
CONCURRENCY = 8
MAX_PACKET = 1 << 20
IO_TIMEOUT = 10.0        # one recv on a hostile socket
EOF_TIMEOUT = 10.0       # the pooler must have closed a hostile socket by then
FUZZ_MAX = 2000
STORM_MIN = float(os.environ.get("GEOBOUNCER_FUZZ_MIN_SECONDS", "10"))  # the storm lasts at least this
STORM_BUDGET = 55.0      # no attack starts later; fewer than FUZZ_COUNT by then fails the test
GOOD_MAX_QUERIES = 20000
RSS_LIMIT_KB = 200 * 1024
READ_CAP = 16 << 20      # bytes of one hostile reply kept for checking

VALID_TYPES = b"QSFXPBDECHdcf"
BAD_TYPES = bytes(t for t in range(1, 256) if t not in VALID_TYPES and t != ord("p"))
SYNC = message(b"S")
FLUSH = message(b"H")
TERMINATE = message(b"X")
CANCEL_CODE = 80877102
GSSENC_CODE = 80877104


# -- protocol helpers -------------------------------------------------------------------

def parse_msg(sql: str, name: bytes = b"", types: tuple[int, ...] = ()) -> bytes:
    body = name + b"\x00" + sql.encode() + b"\x00" + struct.pack("!H", len(types))
    body += b"".join(struct.pack("!I", t) for t in types)
    return message(b"P", body)


def bind_msg(params: list[bytes | None], portal: bytes = b"", stmt: bytes = b"") -> bytes:
    body = portal + b"\x00" + stmt + b"\x00" + struct.pack("!HH", 0, len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    return message(b"B", body + struct.pack("!H", 0))


def execute_msg(portal: bytes = b"", max_rows: int = 0) -> bytes:
    return message(b"E", portal + b"\x00" + struct.pack("!i", max_rows))


def describe_msg(kind: bytes = b"P", name: bytes = b"") -> bytes:
    return message(b"D", kind + name + b"\x00")


def extended_query(sql: str, params: list[bytes | None]) -> bytes:
    return parse_msg(sql) + bind_msg(params) + describe_msg() + execute_msg() + SYNC


def split_messages(data: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
    """Backend messages in ``data`` and the number of bytes left over (a partial one)."""
    out = []
    pos = 0
    while len(data) - pos >= 5:
        length = struct.unpack_from("!I", data, pos + 1)[0]
        if length < 4 or length > (1 << 26):
            raise Bad(f"unparseable reply from the pooler at byte {pos}: type {data[pos:pos + 1]!r} "
                      f"length {length}")
        if len(data) - pos < 1 + length:
            break
        out.append((data[pos:pos + 1], data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out, len(data) - pos


def datarow_values(body: bytes) -> list[bytes | None]:
    (n,) = struct.unpack_from("!H", body)
    pos, out = 2, []
    for _ in range(n):
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length < 0:
            out.append(None)
        else:
            out.append(body[pos:pos + length])
            pos += length
    return out


def summarize(msgs: list[tuple[bytes, bytes]], limit: int = 12) -> str:
    parts = []
    for mtype, body in msgs[:limit]:
        if mtype == b"E":
            f = parse_error_fields(body)
            parts.append(f"E[{f.get('S')} {f.get('C')} {f.get('M')!r}]")
        elif mtype == b"Z":
            parts.append(f"Z[{body.decode(errors='replace')}]")
        else:
            parts.append(mtype.decode(errors="replace"))
    if len(msgs) > limit:
        parts.append(f"... +{len(msgs) - limit}")
    return " ".join(parts)


# -- what an attack may get back ------------------------------------------------------------

POOLER = frozenset({"08P01"})                    # the pooler's own protocol-violation error
PRELOGIN = frozenset({"08P01", "28000", "28P01"})
# Errors only the pooler sends (PostgreSQL never says these), whatever the attack.
POOLER_TEXTS = frozenset({"server conn crashed?"})


def pg_any(code: str) -> bool:
    """Anything PostgreSQL may answer to a bad message, but never an internal error."""
    return bool(code) and not code.startswith("XX")


class Bad(AssertionError):
    """An attack saw something the pooler must never do."""


@dataclass
class Record:
    index: int
    attack: str
    seed: int
    notes: list[str] = field(default_factory=list)
    ending: str = ""                # eof / reset / closed-by-us / (failure)
    codes: list[str] = field(default_factory=list)
    failure: str = ""
    elapsed: float = 0.0

    def describe(self) -> str:
        return (f"#{self.index} {self.attack} (attack seed {self.seed}) [{'; '.join(self.notes)}] "
                f"ending={self.ending or '-'} codes={self.codes} elapsed={self.elapsed:.1f}s: {self.failure}")


class Hostile:
    """One hostile connection: a RawClient plus the bookkeeping of its attack."""

    def __init__(self, b, rng: random.Random, rec: Record):
        self.b = b
        self.rng = rng
        self.rec = rec
        self.raw = RawClient(b.host, b.port, timeout=IO_TIMEOUT)
        self.seen: list[tuple[bytes, bytes]] = []

    def note(self, text: str) -> None:
        self.rec.notes.append(text)

    # -- sending ----------------------------------------------------------------------
    def login(self) -> None:
        replies = self.raw.login("app", "app_pw", "app")
        if not replies or replies[-1][0] != b"Z":
            raise Bad(f"hostile login failed: {summarize(replies)}")

    def send(self, data: bytes) -> bool:
        return self.raw.send(data)

    def send_pieces(self, data: bytes, max_pieces: int = 8, max_sleep: float = 0.02) -> None:
        cuts = sorted(self.rng.sample(range(1, len(data)), min(len(data) - 1, self.rng.randint(1, max_pieces - 1))))
        self.note(f"cuts={cuts}")
        start = 0
        for cut in [*cuts, len(data)]:
            if not self.send(data[start:cut]):
                raise Bad(f"the pooler closed while a valid message was being sent (at byte {start})")
            start = cut
            time.sleep(self.rng.uniform(0, max_sleep))

    # -- reading ----------------------------------------------------------------------
    def read_until_ready(self, count: int = 1) -> list[tuple[bytes, bytes]]:
        """Messages up to the ``count``-th ReadyForQuery; Bad if the pooler closes or stalls."""
        out = []
        deadline = time.monotonic() + EOF_TIMEOUT
        while count:
            if time.monotonic() > deadline:
                raise Bad(f"no ReadyForQuery within {EOF_TIMEOUT}s: {summarize(out)}")
            try:
                msg = self.raw.read_message()
            except (TimeoutError, socket.timeout):
                raise Bad(f"no ReadyForQuery within {IO_TIMEOUT}s: {summarize(out)}") from None
            if msg is None:
                raise Bad(f"the pooler closed before ReadyForQuery: {summarize(out)}")
            out.append(msg)
            if msg[0] == b"Z":
                count -= 1
        self.seen += out
        return out

    def drain(self, timeout: float = EOF_TIMEOUT) -> list[tuple[bytes, bytes]]:
        """Everything until the pooler closes; Bad if it keeps the socket open."""
        data = bytearray(self.raw.buf)
        self.raw.buf.clear()
        kept = len(data)
        deadline = time.monotonic() + timeout
        ending = None
        while ending is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.raw.sock.settimeout(left)
            try:
                chunk = self.raw.sock.recv(1 << 16)
            except (TimeoutError, socket.timeout):
                break
            except (ConnectionResetError, BrokenPipeError):
                ending = "reset"
                break
            if not chunk:
                ending = "eof"
                break
            if kept < READ_CAP:
                data += chunk
                kept += len(chunk)
        msgs, partial = split_messages(bytes(data[:READ_CAP]))
        self.seen += msgs
        if ending is None:
            raise Bad(f"the pooler left the socket open for {timeout:.0f}s; got {summarize(msgs)}")
        self.rec.ending = ending
        if partial and kept < READ_CAP:
            self.note(f"{partial} bytes of a partial reply")
        return msgs

    def shut_and_drain(self) -> list[tuple[bytes, bytes]]:
        """Half-close (the pooler sees EOF) and read until it closes its side."""
        try:
            self.raw.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return self.drain()

    def vanish(self) -> list[tuple[bytes, bytes]]:
        """The client goes away: half-close and wait for the pooler's close, or close / reset now."""
        how = self.rng.choices(["shut", "close", "rst"], weights=[3, 1, 1])[0]
        self.note(f"vanish={how}")
        if how == "shut":
            return self.shut_and_drain()
        if how == "rst":
            try:
                self.raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.raw.close()
        self.rec.ending = "closed-by-us"
        return []

    def close(self) -> None:
        self.raw.close()

    # -- checking ---------------------------------------------------------------------
    def check_errors(self, msgs, allowed, require: bool = False) -> list[dict[str, str]]:
        errs = [parse_error_fields(body) for mtype, body in msgs if mtype == b"E"]
        for err in errs:
            code = err.get("C", "")
            self.rec.codes.append(code)
            ok = allowed(code) if callable(allowed) else code in allowed
            if not ok or "internal error" in err.get("M", ""):
                raise Bad(f"unexpected ErrorResponse {err} in {summarize(msgs)}")
            if err.get("M") in POOLER_TEXTS and code not in POOLER:
                raise Bad(f"the pooler's own error must be 08P01 (as PgBouncer's): {err} in {summarize(msgs)}")
        if require and not errs:
            raise Bad(f"expected an ErrorResponse before the close, got {summarize(msgs)}")
        return errs

    def check_nothing_ran(self, msgs) -> None:
        ran = [m for m in msgs if m[0] in (b"T", b"D", b"C", b"Z", b"1", b"2")]
        if ran:
            raise Bad(f"garbage was answered as if it were a query: {summarize(msgs)}")

    def check_values(self, msgs, expected: bytes) -> None:
        for mtype, body in msgs:
            if mtype == b"D":
                vals = datarow_values(body)
                if vals[:1] != [expected]:
                    raise Bad(f"wrong answer {vals!r}, expected {expected!r}: {summarize(msgs)}")

    def terminate(self) -> None:
        """A clean goodbye; the pooler must close and say nothing more."""
        self.send(TERMINATE)
        msgs = self.drain()
        self.check_errors(msgs, POOLER)
        if msgs:
            raise Bad(f"replies after Terminate: {summarize(msgs)}")


def expect_rejected(h: Hostile, allowed=POOLER, require_error: bool = True) -> list:
    """The pooler must answer with an error (08P01) and close the socket by itself."""
    msgs = h.drain()
    h.check_errors(msgs, allowed, require=require_error)
    return msgs


def pick_valid_message(rng: random.Random) -> tuple[str, bytes]:
    n = rng.randint(0, 10 ** 6)
    choices = [
        ("query", query_message(f"SELECT {n}::int + 1 AS v /* gb-fuzz */")),
        ("parse", parse_msg("SELECT $1::int + 1 /* gb-fuzz */", types=(23,))),
        ("bind", bind_msg([str(n).encode()])),
        ("execute", execute_msg()),
        ("batch", extended_query("SELECT $1::int + 1", [str(n).encode()])),
        ("big-query", query_message("SELECT '" + "x" * rng.randint(100, 200000) + "'")),
    ]
    return rng.choice(choices)


# -- attacks after login ----------------------------------------------------------------------

def attack_random_bytes(h: Hostile) -> None:
    data = h.rng.randbytes(h.rng.randint(1, 8192))
    h.note(f"{len(data)} bytes, first {data[:5].hex()}")
    h.login()
    h.send(data)
    msgs = h.shut_and_drain()
    h.check_errors(msgs, pg_any)


def attack_random_frames(h: Hostile) -> None:
    """Well-framed messages of valid types with random bodies, then Sync and a check query."""
    rng = h.rng
    frames = []
    for _ in range(rng.randint(1, 6)):
        mtype = rng.choice(b"QSPBDECHdcf")          # no FunctionCall (a random OID), no Terminate
        frames.append(message(bytes([mtype]), rng.randbytes(rng.randint(0, 120))))
    h.note("types=" + "".join(chr(f[0]) for f in frames))
    h.login()
    h.send(b"".join(frames) + SYNC + query_message("SELECT 42"))
    answer_or_close(h, b"42")


def answer_or_close(h: Hostile, expected: bytes) -> None:
    """After a bad request followed by Sync and a check query: either the pooler
    closed (only acceptable errors) or the connection still works and answers
    the check query right; then Terminate."""
    got = []
    deadline = time.monotonic() + EOF_TIMEOUT
    while True:
        if time.monotonic() > deadline:
            raise Bad(f"neither an answer nor a close within {EOF_TIMEOUT}s: {summarize(got)}")
        try:
            msg = h.raw.read_message()
        except (TimeoutError, socket.timeout):
            raise Bad(f"neither an answer nor a close within {IO_TIMEOUT}s: {summarize(got)}") from None
        if msg is None:
            h.rec.ending = "eof"
            h.seen += got
            h.check_errors(got, pg_any)
            h.note("closed")
            return
        got.append(msg)
        if msg[0] == b"D" and datarow_values(msg[1])[:1] == [expected]:
            rest = h.read_until_ready()
            h.check_errors(got + rest, pg_any)
            h.note("survived")
            h.terminate()
            return
        if msg[0] == b"D":
            raise Bad(f"a DataRow that is not the check query's: {summarize(got)}")


def attack_truncated(h: Hostile) -> None:
    kind, msg = pick_valid_message(h.rng)
    cut = h.rng.randint(1, len(msg) - 1)
    h.note(f"{kind} cut at {cut}/{len(msg)}")
    h.login()
    h.send(msg[:cut])
    time.sleep(h.rng.uniform(0, 0.05))
    h.check_errors(h.vanish(), POOLER)


def attack_lie_more(h: Hostile) -> None:
    """The header claims more bytes than are ever sent, then the client goes away."""
    kind, msg = pick_valid_message(h.rng)
    extra = h.rng.choice([1, 2, 100, h.rng.randint(1, 50000), MAX_PACKET // 2])
    claimed = struct.unpack_from("!I", msg, 1)[0] + extra
    if claimed > MAX_PACKET:
        claimed = MAX_PACKET
    h.note(f"{kind} claims {claimed}, sends {len(msg) - 1}")
    h.login()
    h.send(msg[:1] + struct.pack("!I", claimed) + msg[5:])
    time.sleep(h.rng.uniform(0, 0.05))
    h.check_errors(h.vanish(), POOLER)


def attack_lie_short(h: Hostile) -> None:
    rng = h.rng
    body = b"SELECT 1\x00"
    if rng.random() < 0.6:
        length = rng.randint(0, 3)            # below the 4 bytes of the length itself
        mtype = rng.choice(b"QPBSEDCHdX")
        h.note(f"{chr(mtype)} length {length}")
        h.login()
        h.send(bytes([mtype]) + struct.pack("!I", length) + body)
        expect_rejected(h)
    else:
        length = rng.randint(4, len(body) + 3)  # shorter than the body: the rest is read as a header
        h.note(f"Q length {length} for a {len(body) + 4}-byte message")
        h.login()
        h.send(b"Q" + struct.pack("!I", length) + body)
        h.check_errors(h.shut_and_drain(), pg_any)


def attack_huge_length(h: Hostile) -> None:
    rng = h.rng
    mtype = rng.choice(b"QPBdFSE")
    length = rng.choice([MAX_PACKET + 1, 2 * MAX_PACKET, 50 << 20, 0x7FFFFFFF, 0xFFFFFFFF])
    h.note(f"{chr(mtype)} length {length}")
    h.login()
    h.send(bytes([mtype]) + struct.pack("!I", length) + rng.randbytes(rng.randint(0, 64)))
    expect_rejected(h)


MALFORMED = [
    # (name, messages before, the bad message)
    ("P-empty", b"", message(b"P", b"")),
    ("P-unterminated-name", b"", message(b"P", b"stmt_without_end")),
    ("P-unterminated-query", b"", message(b"P", b"\x00SELECT 1")),
    ("P-no-param-count", b"", message(b"P", b"\x00SELECT 1\x00")),
    ("P-count-no-types", b"", message(b"P", b"\x00SELECT $1\x00" + struct.pack("!H", 5))),
    ("P-huge-count", b"", message(b"P", b"\x00SELECT $1\x00" + struct.pack("!H", 65535) + b"\x00" * 8)),
    ("P-trailing-garbage", b"", message(b"P", b"\x00SELECT 1\x00\x00\x00garbage")),
    ("B-empty", b"", message(b"B", b"")),
    ("B-unterminated", b"", message(b"B", b"portal")),
    ("B-no-counts", b"", message(b"B", b"\x00\x00")),
    ("B-format-count-no-codes", b"", message(b"B", b"\x00\x00" + struct.pack("!H", 1000))),
    ("B-unknown-statement", b"", bind_msg([], stmt=b"gb_no_such_statement")),
    ("B-negative-length", parse_msg("SELECT $1::int"),
     message(b"B", b"\x00\x00" + struct.pack("!HH", 0, 1) + struct.pack("!i", -5) + struct.pack("!H", 0))),
    ("B-length-past-end", parse_msg("SELECT $1::int"),
     message(b"B", b"\x00\x00" + struct.pack("!HH", 0, 1) + struct.pack("!i", 100000) + b"12")),
    ("B-param-count-mismatch", parse_msg("SELECT $1::int"),
     message(b"B", b"\x00\x00" + struct.pack("!HH", 0, 3) + struct.pack("!i", 1) + b"1")),
    ("B-bad-binary-int", parse_msg("SELECT $1::int"),
     message(b"B", b"\x00\x00" + struct.pack("!HH", 1, 1) + struct.pack("!HH", 1, 1)
             + struct.pack("!i", 3) + b"abc" + struct.pack("!H", 0))),
    ("B-bad-format-code", parse_msg("SELECT $1::int"),
     message(b"B", b"\x00\x00" + struct.pack("!HH", 1, 7) + struct.pack("!H", 1)
             + struct.pack("!i", 1) + b"1" + struct.pack("!H", 0))),
    ("D-empty", b"", message(b"D", b"")),
    ("D-kind-only", b"", message(b"D", b"S")),
    ("D-bad-kind", b"", message(b"D", b"X\x00")),
    ("D-unknown-statement", b"", describe_msg(b"S", b"gb_no_such_statement")),
    ("C-empty", b"", message(b"C", b"")),
    ("C-unterminated", b"", message(b"C", b"Pportal")),
    ("C-bad-kind", b"", message(b"C", b"Z\x00")),
    ("E-empty", b"", message(b"E", b"")),
    ("E-no-max-rows", b"", message(b"E", b"\x00")),
    ("E-unterminated", b"", message(b"E", b"portal")),
    ("E-no-portal", b"", execute_msg(max_rows=-1)),
    ("E-unknown-portal", b"", execute_msg(b"gb_no_such_portal")),
    ("S-with-body", b"", message(b"S", b"xx")),
    ("S-oversized", b"", message(b"S", b"\x00" * 20000)),    # over PostgreSQL's 10000 for Sync
    ("H-oversized", b"", message(b"H", b"\x00" * 20000)),
    ("Q-empty", b"", message(b"Q", b"")),
    ("Q-unterminated", b"", message(b"Q", b"SELECT 1")),
    ("Q-nul-inside", b"", message(b"Q", b"SELECT 1\x00; SELECT 2\x00")),
    ("Q-bad-utf8", b"", message(b"Q", b"SELECT '\xff\xfe'\x00")),
]


def attack_malformed_body(h: Hostile) -> None:
    name, before, bad = h.rng.choice(MALFORMED)
    with_sync = h.rng.random() < 0.8
    h.note(f"{name} {'+Sync' if with_sync else 'then vanish'}")
    h.login()
    if with_sync:
        h.send(before + bad + SYNC + query_message("SELECT 42"))
        answer_or_close(h, b"42")
    else:
        h.send(before + bad + (FLUSH if h.rng.random() < 0.5 else b""))
        time.sleep(h.rng.uniform(0, 0.05))
        h.check_errors(h.vanish(), pg_any)


def attack_startup_after_login(h: Hostile) -> None:
    rng = h.rng
    kind, packet = rng.choice([
        ("startup", startup_packet({"user": "app", "database": "app"})),
        ("ssl", SSL_REQUEST),
        ("gssenc", struct.pack("!II", 8, GSSENC_CODE)),
        ("cancel", struct.pack("!IIII", 16, CANCEL_CODE, rng.getrandbits(31), rng.getrandbits(32))),
        ("password", message(b"p", b"app_pw\x00")),
        ("password-md5", message(b"p", b"md5" + b"0" * 32 + b"\x00")),
    ])
    h.note(kind)
    h.login()
    h.send(packet)
    expect_rejected(h, POOLER)


def attack_unknown_type(h: Hostile) -> None:
    mtype = h.rng.choice(BAD_TYPES)
    body = h.rng.randbytes(h.rng.randint(0, 40))
    h.note(f"type 0x{mtype:02x} body {len(body)}")
    h.login()
    h.send(bytes([mtype]) + struct.pack("!I", len(body) + 4) + body)
    expect_rejected(h)


def attack_split_query(h: Hostile) -> None:
    """A valid request sent in pieces with small pauses: it must get its normal answer."""
    n = h.rng.randint(-10 ** 6, 10 ** 6)
    extended = h.rng.random() < 0.4
    h.note("extended" if extended else "simple")
    h.login()
    if extended:
        data = extended_query("SELECT $1::int + 1", [str(n).encode()])
    else:
        data = query_message(f"SELECT {n}::int + 1 AS v, 'split' AS tag")
    h.send_pieces(data)
    msgs = h.read_until_ready()
    types = b"".join(m[0] for m in msgs)
    want = b"12TDCZ" if extended else b"TDCZ"
    if types != want or msgs[-1][1] != b"I":
        raise Bad(f"abnormal answer to a split request: {summarize(msgs)}")
    h.check_values(msgs, str(n + 1).encode())
    h.terminate()


def attack_query_then_garbage(h: Hostile) -> None:
    n = h.rng.randint(0, 10 ** 6)
    garbage = bytes([h.rng.choice(BAD_TYPES)]) + h.rng.randbytes(h.rng.randint(4, 60))
    h.note(f"garbage type 0x{garbage[0]:02x}")
    h.login()
    h.send(query_message(f"SELECT {n}") + garbage)
    msgs = expect_rejected(h)
    h.check_values(msgs, str(n).encode())


def attack_copydata_50mb(h: Hostile) -> None:
    sent = h.rng.choice([0, 100, 8192, 65536])
    h.note(f"sends {sent} of 50 MB")
    h.login()
    h.send(b"d" + struct.pack("!I", (50 << 20) + 4) + h.rng.randbytes(sent))
    h.check_errors(h.vanish(), POOLER)


def attack_begin_then_garbage(h: Hostile) -> None:
    n = h.rng.randint(0, 10 ** 6)
    h.login()
    h.send(query_message(f"BEGIN; SELECT txid_current(); SET LOCAL application_name = 'gb-hostile'; "
                         f"SELECT {n}"))
    msgs = h.read_until_ready()
    if msgs[-1] != (b"Z", b"T") or [m for m in msgs if m[0] == b"E"]:
        raise Bad(f"BEGIN did not leave a transaction open: {summarize(msgs)}")
    end = h.rng.choice(["garbage", "unknown-type", "vanish", "half-query"])
    h.note(end)
    if end == "garbage":
        h.send(h.rng.randbytes(h.rng.randint(1, 512)))
        h.check_errors(h.shut_and_drain(), pg_any)
    elif end == "unknown-type":
        h.send(bytes([h.rng.choice(BAD_TYPES)]) + struct.pack("!I", 8) + b"junk")
        expect_rejected(h)
    elif end == "half-query":
        q = query_message("COMMIT")
        h.send(q[:h.rng.randint(1, len(q) - 1)])
        h.check_errors(h.vanish(), POOLER)
    else:
        h.check_errors(h.vanish(), POOLER)


def attack_half_parse(h: Hostile) -> None:
    msg = parse_msg("SELECT $1::int + 1 /* gb-fuzz half parse */", types=(23,))
    cut = h.rng.randint(1, len(msg) - 1)
    prefix = b""
    if h.rng.random() < 0.5:
        prefix = extended_query("SELECT 1", [])      # a complete batch first
        if TARGET == "pgbouncer":
            # PgBouncer 1.18 returns the server to the pool on the batch's
            # ReadyForQuery with the half Parse already forwarded to it: the
            # next client gets "invalid message format" or hangs. Known there.
            prefix = b""
            h.note("pgbouncer: no batch first")
    h.note(f"cut {cut}/{len(msg)}{' after a batch' if prefix else ''}")
    h.login()
    h.send(prefix + msg[:cut])
    time.sleep(h.rng.uniform(0, 0.05))
    h.check_errors(h.vanish(), POOLER)


def attack_pipeline_vanish(h: Hostile) -> None:
    rng = h.rng
    rows = rng.choice([10, 1000, 3000])
    sql = f"SELECT repeat('x', 1000) FROM generate_series(1, {rows})"
    count = rng.randint(2, 5)
    extended = rng.random() < 0.4
    one = extended_query(sql, []) if extended else query_message(sql)
    read = rng.choice([0, 1, 5000, 100000, 1 << 20])
    if TARGET == "pgbouncer":
        # PgBouncer 1.18 takes the first ReadyForQuery for the end of the work
        # while the other pipelined requests are still being answered: when the
        # client leaves, the server goes back to the pool (after DISCARD ALL in
        # session mode) and the next client reads their rows. One request only.
        count = 1
        h.note("pgbouncer: one request")
    h.note(f"{count}x{rows} rows {'extended' if extended else 'simple'}, read {read}")
    h.login()
    h.send(one * count)
    got, ready = 0, 0
    while got < read and ready < count:
        try:
            msg = h.raw.read_message()
        except (TimeoutError, socket.timeout):
            raise Bad(f"no reply to pipelined queries within {IO_TIMEOUT}s (got {got} bytes)") from None
        if msg is None:
            raise Bad(f"the pooler closed during the replies to valid queries (after {got} bytes)")
        got += 5 + len(msg[1])
        if msg[0] == b"E":
            raise Bad(f"error for a valid query: {parse_error_fields(msg[1])}")
        ready += msg[0] == b"Z"
    h.note(f"got {got} bytes, {ready} replies")
    h.check_errors(h.vanish(), POOLER)


# -- attacks before login ----------------------------------------------------------------------

def attack_garbage_startup(h: Hostile) -> None:
    rng = h.rng
    if rng.random() < 0.3:
        h.note("after SSLRequest")
        h.send(SSL_REQUEST)
        if h.raw.read_byte() != b"N":
            raise Bad("SSLRequest not answered with N")
    data = rng.randbytes(rng.randint(1, 2000))
    h.note(f"{len(data)} bytes, first {data[:8].hex()}")
    h.send(data)
    msgs = h.shut_and_drain()
    h.check_errors(msgs, PRELOGIN)
    h.check_nothing_ran(msgs)


def attack_huge_startup(h: Hostile) -> None:
    length = h.rng.choice([MAX_PACKET + 1, 10 ** 7, 0x7FFFFFFF, 0xFFFFFFFF, 0, 3])
    h.note(f"startup length {length}")
    h.send(struct.pack("!II", length, PROTOCOL_3_0) + b"user\x00app\x00database\x00app\x00\x00")
    msgs = expect_rejected(h, PRELOGIN)
    h.check_nothing_ran(msgs)


def attack_startup_cut(h: Hostile) -> None:
    packet = startup_packet({"user": "app", "database": "app", "application_name": "gb-fuzz-cut"})
    cut = h.rng.randint(1, len(packet) - 1)
    h.note(f"cut {cut}/{len(packet)}")
    h.send(packet[:cut])
    time.sleep(h.rng.uniform(0, 0.05))
    msgs = h.vanish()
    h.check_errors(msgs, PRELOGIN)
    h.check_nothing_ran(msgs)


def attack_cancel_random(h: Hostile) -> None:
    h.send(struct.pack("!IIII", 16, CANCEL_CODE, h.rng.getrandbits(31), h.rng.getrandbits(32)))
    msgs = h.drain()
    if msgs:
        raise Bad(f"a CancelRequest was answered: {summarize(msgs)}")


def attack_login_abort(h: Hostile) -> None:
    rng = h.rng
    h.send(startup_packet({"user": "app", "database": "app"}))
    msg = h.raw.read_message()
    if msg is None or msg[0] != b"R" or struct.unpack_from("!I", msg[1])[0] != 5:
        raise Bad(f"expected an md5 request, got {msg!r}")
    how = rng.choice(["vanish", "wrong-password", "garbage-password", "query-instead"])
    h.note(how)
    if how == "vanish":
        msgs = h.vanish()
        h.check_errors(msgs, PRELOGIN)
    elif how == "wrong-password":
        h.send(message(b"p", b"md5" + b"0" * 32 + b"\x00"))
        msgs = expect_rejected(h, PRELOGIN)
        h.check_nothing_ran(msgs)
    elif how == "garbage-password":
        # PgBouncer 1.18 ignores a password packet it cannot use and closes only
        # at client_login_timeout (5 s, below EOF_TIMEOUT); geobouncer at once.
        h.send(message(b"p", rng.randbytes(rng.randint(0, 40))))
        msgs = expect_rejected(h, PRELOGIN)
        h.check_nothing_ran(msgs)
    else:
        h.send(query_message("SELECT 1"))
        # PgBouncer 1.18 closes without a word here; geobouncer says why (08P01).
        msgs = expect_rejected(h, PRELOGIN, require_error=TARGET != "pgbouncer")
        h.check_nothing_ran(msgs)


ATTACKS = {
    "random_bytes": (attack_random_bytes, 2),
    "random_frames": (attack_random_frames, 2),
    "truncated": (attack_truncated, 2),
    "lie_more": (attack_lie_more, 2),
    "lie_short": (attack_lie_short, 1),
    "huge_length": (attack_huge_length, 1),
    "malformed_body": (attack_malformed_body, 4),
    "startup_after_login": (attack_startup_after_login, 1),
    "unknown_type": (attack_unknown_type, 1),
    "split_query": (attack_split_query, 3),
    "query_then_garbage": (attack_query_then_garbage, 1),
    "copydata_50mb": (attack_copydata_50mb, 1),
    "begin_then_garbage": (attack_begin_then_garbage, 2),
    "half_parse": (attack_half_parse, 1),
    "pipeline_vanish": (attack_pipeline_vanish, 2),
    "garbage_startup": (attack_garbage_startup, 1),
    "huge_startup": (attack_huge_startup, 1),
    "startup_cut": (attack_startup_cut, 1),
    "cancel_random": (attack_cancel_random, 1),
    "login_abort": (attack_login_abort, 1),
}


class Plan:
    """The attacks, drawn one by one from the seeded generator: attack #i is the
    same for a given seed whatever the timing. The storm runs at least
    ``FUZZ_COUNT`` attacks and at least ``STORM_MIN`` seconds (at most
    ``FUZZ_MAX`` attacks), and starts none after ``STORM_BUDGET`` seconds."""

    def __init__(self, mode: str):
        self.rng = random.Random(f"{SEED}:{mode}")
        self.names = list(ATTACKS)
        self.weights = [ATTACKS[n][1] for n in self.names]
        self.records: list[Record] = []
        self.drawn = 0
        self.lock = threading.Lock()
        self.start = self.deadline = 0.0
        if ONLY:
            unknown = ONLY - set(ATTACKS)
            assert not unknown, f"GEOBOUNCER_FUZZ_ATTACKS: unknown attacks {unknown}; known: {self.names}"

    def begin(self) -> None:
        self.start = time.monotonic()
        self.deadline = self.start + STORM_BUDGET

    def next(self) -> Record | None:
        with self.lock:
            while True:
                now = time.monotonic()
                if len(self.records) >= FUZZ_MAX or now > self.deadline:
                    return None
                if len(self.records) >= FUZZ_COUNT and now - self.start >= STORM_MIN:
                    return None
                rec = Record(self.drawn, self.rng.choices(self.names, self.weights)[0], self.rng.getrandbits(48))
                self.drawn += 1
                if ONLY and rec.attack not in ONLY:
                    continue
                self.records.append(rec)
                return rec

    def worker(self, b) -> None:
        while (rec := self.next()) is not None:
            run_attack(b, rec)


def run_attack(b, rec: Record) -> Record:
    start = time.monotonic()
    h = None
    try:
        h = Hostile(b, random.Random(rec.seed), rec)
        ATTACKS[rec.attack][0](h)
    except Bad as exc:
        rec.failure = str(exc)
    except Exception as exc:  # noqa: BLE001 - any surprise is a finding
        rec.failure = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
    finally:
        if h is not None:
            h.close()
        rec.elapsed = time.monotonic() - start
    return rec


# -- good clients ------------------------------------------------------------------------------

class GoodStats:
    def __init__(self):
        self.lock = threading.Lock()
        self.queries: Counter = Counter()
        self.connections: Counter = Counter()
        self.failures: list[str] = []

    def fail(self, who: str, what: str) -> None:
        with self.lock:
            if len(self.failures) < 50:
                self.failures.append(f"{time.strftime('%H:%M:%S')} {who}: {what}")


def good_psycopg2(b, mode: str, wid: int, stop: threading.Event, deadline: float, stats: GoodStats) -> None:
    who = f"psycopg2-{wid}"
    rng = random.Random(f"{SEED}:{mode}:good:{wid}")
    per_conn = 5 if mode == "session" else 40
    conn, app, on_conn, conn_no = None, "", 0, 0
    n = 0
    try:
        while not stop.is_set() and time.monotonic() < deadline and n < GOOD_MAX_QUERIES:
            n += 1
            try:
                if conn is None or on_conn >= per_conn:
                    close_quietly(conn)
                    conn = None
                    conn_no += 1
                    app = f"gb-good-{mode[0]}{wid}-{conn_no}"
                    conn = psycopg2.connect(b.dsn(application_name=app))
                    conn.autocommit = True
                    on_conn = 0
                    stats.connections[who] += 1
                on_conn += 1
                v = rng.randint(-10 ** 6, 10 ** 6)
                row = query_one(conn, "SELECT %s::int + 1, current_setting('application_name'), "
                                      "now() = statement_timestamp(), txid_current_if_assigned()", (v,))
                if row != (v + 1, app, True, None):
                    stats.fail(who, f"wrong answer {row!r}, expected {(v + 1, app, True, None)!r}")
                if n % 3 == 0:
                    row = query_one(conn, "SHOW application_name")
                    if row != (app,):
                        stats.fail(who, f"SHOW application_name = {row!r}, expected {app!r}")
                stats.queries[who] += 1
            except Exception as exc:  # noqa: BLE001
                stats.fail(who, f"{type(exc).__name__}: {exc}".strip())
                close_quietly(conn)
                conn = None
    finally:
        close_quietly(conn)


def good_psycopg3(b, mode: str, stop: threading.Event, deadline: float, stats: GoodStats) -> None:
    who = "psycopg3"
    rng = random.Random(f"{SEED}:{mode}:good:pg3")
    # PgBouncer 1.18 has no prepared-statement tracking: named statements break in transaction mode.
    prepare = not (TARGET == "pgbouncer" and mode == "transaction")
    per_conn = 10 if mode == "session" else 100
    conn, app, on_conn, conn_no = None, "", 0, 0
    n = 0
    try:
        while not stop.is_set() and time.monotonic() < deadline and n < GOOD_MAX_QUERIES:
            n += 1
            try:
                if conn is None or on_conn >= per_conn:
                    if conn is not None:
                        conn.close()
                    conn = None
                    conn_no += 1
                    app = f"gb-good-{mode[0]}pg3-{conn_no}"
                    conn = psycopg.connect(b.dsn(application_name=app), autocommit=True)
                    if not prepare:
                        conn.prepare_threshold = None   # not even automatically after 5 runs
                    on_conn = 0
                    stats.connections[who] += 1
                on_conn += 1
                v = rng.randint(-10 ** 6, 10 ** 6)
                row = conn.execute("SELECT %s::int + 1, current_setting('application_name')", (v,),
                                   prepare=prepare).fetchone()
                if row != (v + 1, app):
                    stats.fail(who, f"wrong answer {row!r}, expected {(v + 1, app)!r}")
                if n % 4 == 0:
                    with conn.transaction():
                        p1, x1 = conn.execute("SELECT pg_backend_pid(), txid_current()",
                                              prepare=prepare).fetchone()
                        p2, x2, w = conn.execute("SELECT pg_backend_pid(), txid_current(), %s::int * 2",
                                                 (v,), prepare=prepare).fetchone()
                    if (p1, x1) != (p2, x2) or w != 2 * v:
                        stats.fail(who, f"transaction not on one server: {(p1, x1)} vs {(p2, x2)}, {w} vs {2 * v}")
                if n % 5 == 0:
                    row = conn.execute("SHOW application_name", prepare=prepare).fetchone()
                    if row != (app,):
                        stats.fail(who, f"SHOW application_name = {row!r}, expected {app!r}")
                stats.queries[who] += 1
            except Exception as exc:  # noqa: BLE001
                stats.fail(who, f"{type(exc).__name__}: {exc}".strip())
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001
                        pass
                conn = None
    finally:
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass


# -- the test ----------------------------------------------------------------------------------

def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def report(mode: str, plan: list[Record], stats: GoodStats, elapsed: float, rss: tuple[int, int]) -> str:
    by_attack = defaultdict(list)
    for rec in plan:
        by_attack[rec.attack].append(rec)
    lines = [f"fuzz seed={SEED} mode={mode} target={TARGET}: {len(plan)} hostile connections in "
             f"{elapsed:.1f}s; RSS {rss[0] // 1024} -> {rss[1] // 1024} MB; good clients: "
             f"queries {dict(stats.queries)} connections {dict(stats.connections)}"]
    for name in ATTACKS:
        recs = by_attack.get(name)
        if not recs:
            continue
        endings = Counter(r.ending or "-" for r in recs)
        codes = Counter(c for r in recs for c in r.codes)
        failed = sum(1 for r in recs if r.failure)
        lines.append(f"  {name:22} n={len(recs):3} failed={failed:3} endings={dict(endings)} "
                     f"errors={dict(codes)} max={max(r.elapsed for r in recs):.1f}s")
    return "\n".join(lines)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_fuzz_hostile_connections(pg, bouncer, pool_mode):
    wait_no_backends(pg, "app")
    pool_size = 3 if pool_mode == "transaction" else 4    # session: the keeper holds one
    b = bouncer(pgbouncer={
        "pool_mode": pool_mode,
        "auth_type": "md5",
        "default_pool_size": pool_size,
        "max_packet_size": MAX_PACKET,
        "max_client_conn": 200,
        "query_wait_timeout": 30,
        "client_login_timeout": 5,      # below EOF_TIMEOUT: see attack_login_abort
    })
    tag = f"[fuzz seed {SEED}, mode {pool_mode}; replay: GEOBOUNCER_FUZZ_SEED={SEED}]"
    keeper = b.connect(autocommit=True)
    plan = Plan(pool_mode)
    stats = GoodStats()
    try:
        assert run_in_thread(query_one, keeper, "SELECT 1").get(20) == (1,), f"keeper {tag}"
        rss_before = rss_kb(b.pid)
        plan.begin()
        start = plan.start
        stop = threading.Event()
        good_deadline = plan.deadline + 10
        good = [threading.Thread(target=good_psycopg2, args=(b, pool_mode, i, stop, good_deadline, stats),
                                 daemon=True, name=f"good-{i}") for i in range(3)]
        good.append(threading.Thread(target=good_psycopg3, args=(b, pool_mode, stop, good_deadline, stats),
                                     daemon=True, name="good-pg3"))
        for t in good:
            t.start()
        try:
            workers = [threading.Thread(target=plan.worker, args=(b,), daemon=True, name=f"hostile-{i}")
                       for i in range(CONCURRENCY)]
            for t in workers:
                t.start()
            for t in workers:   # each attack is bounded by its socket timeouts
                t.join(max(1.0, plan.deadline + 2 * EOF_TIMEOUT - time.monotonic()))
        finally:
            stop.set()
            for t in good:
                t.join(max(1.0, plan.deadline + 2 * EOF_TIMEOUT + 15 - time.monotonic()))
        elapsed = time.monotonic() - start
        rss_after = rss_kb(b.pid) if b.is_running() else 0
        summary = report(pool_mode, plan.records, stats, elapsed, (rss_before, rss_after))
        print(summary)
        if os.environ.get("GEOBOUNCER_FUZZ_VERBOSE") == "1":
            print("\n".join(r.describe() for r in plan.records))

        # Every check runs (as long as it can) and every problem is reported together.
        problems: list[str] = []

        def check(what: str, fn) -> None:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - collected, reported below
                problems.append(f"{what}: {type(exc).__name__}: {exc}")

        hung = [t.name for t in good if t.is_alive()]
        if hung:
            problems.append(f"good clients hung: {hung}")
        if stats.failures:
            problems.append("good clients failed:\n" + "\n".join(stats.failures))
        idle = [w for w in ("psycopg2-0", "psycopg2-1", "psycopg2-2", "psycopg3") if not stats.queries[w]]
        if idle:
            problems.append(f"good clients never got a query through: {idle}")
        stuck = [t.name for t in workers if t.is_alive()]
        if stuck:
            problems.append(f"hostile connections hung: {stuck}")
        failed = [r for r in plan.records if r.failure]
        if failed:
            problems.append(f"{len(failed)} hostile connections saw the pooler misbehave:\n"
                            + "\n".join(r.describe() for r in failed[:25]))
        if len(plan.records) < FUZZ_COUNT:
            problems.append(f"only {len(plan.records)} of {FUZZ_COUNT} attacks started within {STORM_BUDGET}s")

        if b.is_running():
            # The pooler survived and serves: an open connection, a new login.
            check("check_pooler_alive", lambda: run_in_thread(check_pooler_alive, b, keeper).get(30))
            keeper.close()

            def no_clients_left():
                wait_until(lambda: not [r for r in b.admin("SHOW CLIENTS") if r.database == "app"],
                           timeout=15, message="no app clients left in SHOW CLIENTS")
                wait_until(lambda: {r.list: r.items for r in b.admin("SHOW LISTS")}.get("login_clients") == 0,
                           timeout=15, message="no clients left in login (SHOW LISTS)")

            def pool_quiet():
                def quiet():
                    row = pool_row(b)
                    servers = [r for r in b.admin("SHOW SERVERS") if r.database == "app"]
                    return (row is not None and row.cl_active == 0 and row.cl_waiting == 0
                            and row.sv_active == 0 and not [s for s in servers if s.state == "active"])
                try:
                    wait_until(quiet, timeout=15, message="SHOW POOLS / SHOW SERVERS quiet")
                except TimeoutError:
                    raise AssertionError(f"not quiet after 15s: {pool_row(b)} "
                                         f"{[r for r in b.admin('SHOW SERVERS') if r.database == 'app']}") from None
                servers = [r for r in b.admin("SHOW SERVERS") if r.database == "app"]
                assert len(servers) <= pool_size, servers

            def backends_clean():
                wait_until(lambda: pg.backends("app") <= pool_size, timeout=15,
                           message=f"at most {pool_size} backends left in database app")
                in_tx = pg.psql("SELECT pid, state, query FROM pg_stat_activity WHERE datname = 'app' "
                                "AND state LIKE 'idle in transaction%'")
                assert not in_tx, f"servers left idle in a transaction: {in_tx}"
                conn = b.connect(autocommit=True)
                try:   # every pooled server left is clean
                    for _ in range(pool_size + 1):
                        row = query_one(conn, "SELECT 'clean', txid_current_if_assigned(), "
                                              "now() = statement_timestamp()")
                        assert row == ("clean", None, True), row
                finally:
                    conn.close()

            def rss_bounded():
                rss_end = rss_kb(b.pid)
                assert rss_end < RSS_LIMIT_KB, f"pooler RSS {rss_end} kB after the storm"

            check("no client left", no_clients_left)
            check("no server active", pool_quiet)
            check("backends", backends_clean)
            check("RSS", rss_bounded)
            if not b.is_running():
                problems.append("the pooler died after the storm")
        else:
            problems.append(f"the pooler died during the storm (rc={b.returncode})")
        log = b.log_text() + b.output_text()
        for bad in ("Traceback", "internal error"):
            if bad in log:
                problems.append(f"{bad!r} in the pooler's log:\n"
                                + "\n".join(ln for ln in log.splitlines() if bad in ln or "Error" in ln)[-6000:])
        assert not problems, f"{tag}\n" + "\n\n".join(problems) + f"\n\n{summary}"
    finally:
        close_quietly(keeper)
