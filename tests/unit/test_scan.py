"""The sans-IO scanners (proto/scan.py) against a model of the byte stream.

Every test builds a stream from whole messages, so the offsets of the message
boundaries are known, then feeds it to a scanner one byte at a time, split at
every point, or in random chunks (hypothesis). After each call the state of
the scanner is compared with what the model says it must be: which bytes are
returned, what is held, which watched messages are reported, the counters.
"""

import random
import struct
from bisect import bisect_left, bisect_right

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geobouncer.proto import messages as m
from geobouncer.proto import server_scan
from geobouncer.proto.framing import CANCEL_REQUEST_CODE, SSL_REQUEST_CODE, ProtocolError
from geobouncer.proto.scan import (CLIENT_TYPES, REQUEST_REPLIES, SERVER_HOLD_LIMIT, SERVER_WATCH,
                                   ClientScanner, ServerScanner, check_names)

LIMIT = 1 << 20          # max_packet_size of the tests: the large messages below fit
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_Q, _F, _S, _X, _Z = (ord(c) for c in "QFSXZ")
_REQUESTS = frozenset((_Q, _F, _S))
_EXTENDED = frozenset(ord(c) for c in "PBDEC")
_SYNCING = frozenset((_S, _Q))     # a Query ends the extended messages before it, as a Sync does
_COPY_START = frozenset(ord(c) for c in "GHW")
TRACKED = SERVER_WATCH | REQUEST_REPLIES


# --- builders -----------------------------------------------------------------

def hdr(mtype: bytes, length: int) -> bytes:
    return mtype + struct.pack("!I", length)


def describe(kind: bytes, name: str = "") -> bytes:
    return m.message(b"D", kind + m.cstr(name))


def close(kind: bytes, name: str = "") -> bytes:
    return m.message(b"C", kind + m.cstr(name))


def function_call(oid: int, args: list) -> bytes:
    body = struct.pack("!IHH", oid, 0, len(args))
    body += b"".join(struct.pack("!i", len(a)) + a for a in args)
    return m.message(b"F", body + struct.pack("!H", 0))


def copy_data(payload: bytes) -> bytes:
    return m.message(b"d", payload)


COPY_DONE = m.message(b"c")


def copy_fail(text: str) -> bytes:
    return m.message(b"f", m.cstr(text))


def copy_response(kind: bytes, ncols: int = 1) -> bytes:
    """CopyInResponse G, CopyOutResponse H, CopyBothResponse W (text format)."""
    return m.message(kind, struct.pack("!bH", 0, ncols) + b"\x00\x00" * ncols)


def big(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def spans_of(msgs: list) -> list:
    """(type, start, end) of each message of the concatenation of ``msgs``."""
    out, pos = [], 0
    for msg in msgs:
        out.append((msg[0], pos, pos + len(msg)))
        pos += len(msg)
    return out


def bounds(cuts, n):
    """Chunk ends for cut points ``cuts`` (duplicates make empty chunks)."""
    return [c for c in sorted(cuts) if 0 <= c <= n] + [n]


# --- the client model -------------------------------------------------------------

class ClientModel:
    """What ClientScanner.stream must have returned after the first ``c`` bytes."""

    def __init__(self, msgs: list, tail: bytes = b""):
        self.spans = spans_of(msgs)
        self.data = b"".join(msgs) + tail
        self.starts = [s for _, s, _ in self.spans]
        terms = [s for t, s, _ in self.spans if t == _X]
        self.term = terms[0] if terms else None
        self.stop = self.term if self.term is not None else len(self.data)

    def span_at(self, pos):
        i = bisect_right(self.starts, pos) - 1
        if i >= 0 and pos < self.spans[i][2]:
            return self.spans[i]
        return None

    def returned(self, c: int) -> int:
        if self.term is not None and c >= self.term:
            return self.term              # held header or Terminate: never returned
        span = self.span_at(c)
        if span is not None and span[1] < c < span[1] + 5:
            return span[1]                # an incomplete header is held
        return c

    def owed(self, r: int) -> int:
        span = self.span_at(r)
        return span[2] - r if span is not None and span[1] < r else 0

    def started(self, r0: int, r1: int) -> list:
        """Types of the messages whose first byte went out in data[r0:r1]."""
        return [t for t, _, _ in self.spans[bisect_left(self.starts, r0):bisect_left(self.starts, r1)]]


def run_client(model: ClientModel, cuts, limit: int = LIMIT, error_at=None, error=None):
    """Feed ``model.data`` in chunks ending at ``cuts``; check every call.

    With ``error_at`` (the offset of a bad header) the call that completes that
    header must raise ``error`` (a regex), and nothing of it is returned.
    Returns (everything returned, request count, last synced, scanner)."""
    sc = ClientScanner(limit)
    data = model.data
    out, requests, synced = [], 0, None
    r = c = 0
    for b in bounds(cuts, len(data)):
        chunk = data[c:b]
        if error_at is not None and b >= error_at + 5:
            with pytest.raises(ProtocolError, match=error):
                sc.stream(chunk)
            break
        got = sc.stream(chunk)
        c = b
        want = model.returned(c)
        assert got == data[r:want], (r, c, want)
        started = model.started(r, want)
        assert sc.requests == sum(t in _REQUESTS for t in started)
        ext = [t for t in started if t in _EXTENDED or t in _SYNCING]
        assert sc.synced == (ext[-1] in _SYNCING if ext else None)
        assert sc.owed == model.owed(want), (r, c, want)
        assert sc.terminate == (model.term is not None and c >= model.term + 5)
        assert len(sc.held) == c - want or sc.terminate
        out.append(got)
        requests += sc.requests
        if sc.synced is not None:
            synced = sc.synced
        r = want
        if sc.terminate:
            break
    else:
        assert error_at is None, "the bad header never raised"
    return b"".join(out), requests, synced, sc


def check_whole_run(model: ClientModel, returned, requests, synced, sc):
    """The properties of a complete run, stated plainly."""
    assert returned == model.data[:model.stop]
    before = [t for t, s, _ in model.spans if s < model.stop]
    assert requests == sum(t in _REQUESTS for t in before)
    ext = [t for t in before if t in _EXTENDED or t in _SYNCING]
    assert synced == (ext[-1] in _SYNCING if ext else None)
    assert sc.owed == 0
    assert sc.terminate == (model.term is not None)
    # no returned prefix ever ended inside a header: checked per call in run_client


# --- client stream mode -------------------------------------------------------------

CLIENT_STREAM = [
    m.query("select 1"),
    m.parse_message("select $1::int", "s1"),
    m.bind_text(["42", None], portal="p1", statement="s1"),
    describe(b"P", "p1"),
    m.execute("p1", 10),
    m.FLUSH,
    close(b"S", "s1"),
    m.SYNC,
    function_call(1598, [b"\x00\x00\x00\x07"]),
    m.query("copy t from stdin"),
    copy_data(b"1\tx\n" * 20),
    COPY_DONE,
    m.query("copy t from stdin"),
    copy_fail("boom"),
    m.query(""),
    m.parse_message("select 2"),
    describe(b"S"),
    m.execute(),
    m.TERMINATE,
]
TAIL = b"Q\x00\x00\x00\x0aselect\x00" + b"\x00\x00\x00\x00\x08"   # never returned, never checked


def test_client_stream_whole():
    model = ClientModel(CLIENT_STREAM, TAIL)
    returned, requests, synced, sc = run_client(model, [])
    check_whole_run(model, returned, requests, synced, sc)
    assert requests == 6            # 4 Query, 1 FunctionCall, 1 Sync (the one after Close)
    assert synced is False          # the last extended message is an Execute


@pytest.mark.parametrize("tail", [b"", TAIL])
def test_client_stream_one_byte_at_a_time(tail):
    msgs = CLIENT_STREAM[:-1] + [copy_data(b"x" * 70000), m.SYNC, m.TERMINATE]
    model = ClientModel(msgs, tail)
    returned, requests, synced, sc = run_client(model, range(len(model.data)))
    check_whole_run(model, returned, requests, synced, sc)
    assert synced is True


def test_client_stream_every_split_point():
    model = ClientModel(CLIENT_STREAM, TAIL)
    for i in range(len(model.data) + 1):
        check_whole_run(model, *run_client(model, [i]))


def test_client_stream_every_pair_of_split_points():
    msgs = [m.query("x"), m.parse_message("s", "n"), m.SYNC, m.execute(), m.TERMINATE]
    model = ClientModel(msgs, b"junk")
    n = len(model.data)
    for i in range(n + 1):
        for j in range(i, n + 1):
            check_whole_run(model, *run_client(model, [i, j]))


def test_client_stream_without_terminate_ends_synced():
    msgs = CLIENT_STREAM[:-2] + [m.SYNC, m.query("select 3")]
    model = ClientModel(msgs)
    for i in range(len(model.data) + 1):
        returned, requests, synced, sc = run_client(model, [i])
        check_whole_run(model, returned, requests, synced, sc)
        assert synced is True and not sc.terminate


def test_client_stream_holds_a_split_header():
    sc = ClientScanner(LIMIT)
    q = m.query("select 1")
    assert sc.stream(q[:3]) == b""
    assert sc.owed == 0 and sc.requests == 0
    assert sc.stream(q[3:7]) == q[:7]
    assert sc.owed == len(q) - 7 and sc.requests == 1
    assert sc.stream(q[7:]) == q[7:]
    assert sc.owed == 0 and sc.requests == 0 and sc.synced is None


def test_client_stream_terminate_stops_everything():
    sc = ClientScanner(LIMIT)
    data = m.SYNC + m.TERMINATE + b"\x00\x00\x00\x00\x00" + m.query("x")
    assert sc.stream(data) == m.SYNC
    assert sc.terminate and sc.requests == 1 and sc.synced is True and sc.owed == 0


def test_client_stream_terminate_split():
    sc = ClientScanner(LIMIT)
    assert sc.stream(m.query("a") + m.TERMINATE[:2]) == m.query("a")
    assert not sc.terminate
    assert sc.stream(m.TERMINATE[2:] + m.query("b")) == b""
    assert sc.terminate and sc.requests == 0


# --- hypothesis strategies ------------------------------------------------------------

idents = st.text(alphabet="abcxyz_019", max_size=10)
texts = st.text(alphabet=st.characters(exclude_characters="\x00", exclude_categories=("Cs",)),
                max_size=30)
sizes = st.one_of(st.integers(0, 64), st.integers(0, 64), st.integers(0, 64),
                  st.integers(1000, 100_000))
payloads = st.one_of(st.binary(max_size=40), st.builds(big, sizes, st.integers(0, 1 << 16)))

frontend_message = st.one_of(
    st.builds(m.query, texts),
    st.builds(lambda n: m.query("select '" + "y" * n + "'"), sizes),
    st.builds(m.parse_message, texts, idents),
    st.builds(m.bind_text, st.lists(st.one_of(st.none(), texts), max_size=4), idents, idents),
    st.builds(describe, st.sampled_from([b"S", b"P"]), idents),
    st.builds(m.execute, idents, st.integers(0, 2**31 - 1)),
    st.builds(close, st.sampled_from([b"S", b"P"]), idents),
    st.just(m.SYNC),
    st.just(m.FLUSH),
    st.builds(function_call, st.integers(0, 2**32 - 1), st.lists(st.binary(max_size=8), max_size=3)),
    st.builds(copy_data, payloads),
    st.just(COPY_DONE),
    st.builds(copy_fail, texts),
)


@st.composite
def cut_points(draw, starts, n):
    """Chunk ends: anywhere, or a few bytes around a message boundary."""
    near = st.tuples(st.sampled_from(starts + [n]), st.integers(-6, 6)).map(lambda t: t[0] + t[1])
    return draw(st.lists(st.one_of(st.integers(0, n), near), max_size=25))


@st.composite
def client_streams(draw):
    msgs = draw(st.lists(frontend_message, max_size=12))
    tail = b""
    if draw(st.booleans()):
        msgs.append(m.TERMINATE)
        tail = draw(st.binary(max_size=12))
    return ClientModel(msgs, tail)


@SETTINGS
@given(st.data())
def test_client_stream_random_chunks(data):
    model = data.draw(client_streams())
    cuts = data.draw(cut_points(model.starts, len(model.data)))
    check_whole_run(model, *run_client(model, cuts))


# --- invalid client input ---------------------------------------------------------------

BAD_TYPES = [t for t in range(256) if t not in CLIENT_TYPES]


def _type_error(t: int) -> str:
    if t == 0:
        return "startup packet after login"
    if t == ord("p"):
        return "password packet after login"
    return rf"unknown message type {t} \(0x{t:02x}\)"


@st.composite
def bad_headers(draw, limit):
    """(bytes of an invalid message, the error it must raise)."""
    kind = draw(st.sampled_from(["type", "short", "long", "packet"]))
    body = draw(st.binary(max_size=12))
    if kind == "type":
        t = draw(st.sampled_from(BAD_TYPES))
        return bytes((t,)) + struct.pack("!I", draw(st.integers(4, limit))) + body, _type_error(t)
    if kind == "short":
        t = draw(st.sampled_from(sorted(CLIENT_TYPES)))
        n = draw(st.integers(0, 3))
        return bytes((t,)) + struct.pack("!I", n) + body, f"invalid message length {n}$"
    if kind == "long":
        t = draw(st.sampled_from(sorted(CLIENT_TYPES)))
        n = draw(st.integers(limit + 1, 2**32 - 1))
        return bytes((t,)) + struct.pack("!I", n) + body, f"message of {n} bytes exceeds max_packet_size"
    packet = draw(st.sampled_from([
        m.startup_message({"user": "u", "database": "d"}),
        struct.pack("!II", 8, SSL_REQUEST_CODE),
        m.cancel_request(1234, 5678),
        m.password_message(b"secret\x00"),
        m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"),
    ]))
    return packet + body, _type_error(packet[0])


@SETTINGS
@given(st.data())
def test_client_stream_invalid_random(data):
    limit = data.draw(st.sampled_from([LIMIT, 300, 4096]))
    prefix = data.draw(st.lists(frontend_message, max_size=8))
    prefix = [msg for msg in prefix if len(msg) - 1 <= limit]
    bad, error = data.draw(bad_headers(limit))
    tail = data.draw(st.binary(max_size=8))
    model = ClientModel(prefix + [bad], tail)    # the bad "message" is a span: its header is held
    bad_at = model.spans[-1][1]
    cuts = data.draw(cut_points(model.starts, len(model.data)))
    returned, _, _, sc = run_client(model, cuts, limit, error_at=bad_at, error=error)
    assert returned == model.data[:len(returned)]
    assert len(returned) <= bad_at


@pytest.mark.parametrize("packet, error", [
    (m.startup_message({"user": "u"}), "startup packet after login"),
    (struct.pack("!II", 8, SSL_REQUEST_CODE), "startup packet after login"),
    (struct.pack("!IIII", 16, CANCEL_REQUEST_CODE, 1, 2), "startup packet after login"),
    (m.password_message(b"pw\x00"), "password packet after login"),
    (b"A\x00\x00\x00\x04", r"unknown message type 65 \(0x41\)"),
    (b"\xff\x00\x00\x00\x04", r"unknown message type 255 \(0xff\)"),
    (b"Q\x00\x00\x00\x03", "invalid message length 3"),
    (b"S\x00\x00\x00\x00", "invalid message length 0"),
    (hdr(b"d", 1001), "message of 1001 bytes exceeds max_packet_size"),
    (hdr(b"Q", 0xFFFFFFFF), "message of 4294967295 bytes exceeds max_packet_size"),
])
def test_client_invalid_header(packet, error):
    for mode in ("stream", "messages"):
        sc = ClientScanner(1000)
        if mode == "stream":
            assert sc.stream(m.query("ok") + packet[:4]) == m.query("ok")
            with pytest.raises(ProtocolError, match=error):
                sc.stream(packet[4:])
        else:
            assert sc.messages(m.query("ok") + packet[:4]) == [(_Q, 0, len(m.query("ok")))]
            with pytest.raises(ProtocolError, match=error):
                sc.messages(m.query("ok") + packet[:5])


def test_client_length_limit_is_inclusive():
    sc = ClientScanner(1000)
    msg = copy_data(b"x" * 996)             # length 1000
    assert sc.stream(msg) == msg
    assert sc.messages(msg) == [(ord("d"), 0, 1001)]
    with pytest.raises(ProtocolError):
        ClientScanner(999).stream(msg)


def test_client_bad_header_after_a_partial_body():
    """The header after a streamed body is validated before it is returned."""
    sc = ClientScanner(LIMIT)
    msg = copy_data(b"x" * 100)
    assert sc.stream(msg[:50]) == msg[:50]
    assert sc.stream(msg[50:90]) == msg[50:90]
    with pytest.raises(ProtocolError, match="startup packet"):
        sc.stream(msg[90:] + m.startup_message({"user": "u"}))


# --- client whole-message mode ---------------------------------------------------------

def expected_messages(model: ClientModel, c: int):
    out = []
    for t, s, e in model.spans:
        if e > c:
            break
        out.append((t, s, e))
        if t == _X:
            break
    return out or None


def test_messages_every_prefix():
    model = ClientModel(CLIENT_STREAM, TAIL)
    sc = ClientScanner(LIMIT)
    for c in range(len(model.data) + 1):
        want = expected_messages(model, c)
        assert sc.messages(model.data[:c]) == want
        assert sc.messages(bytearray(model.data[:c])) == want


def test_messages_stops_after_terminate():
    sc = ClientScanner(LIMIT)
    data = m.SYNC + m.TERMINATE + m.query("x") + b"\x00\x00\x00\x00\x00"
    assert sc.messages(data) == [(_S, 0, 5), (_X, 5, 10)]
    assert sc.messages(m.TERMINATE) == [(_X, 0, 5)]


def test_messages_none():
    sc = ClientScanner(LIMIT)
    assert sc.messages(b"") is None
    assert sc.messages(b"Q\x00\x00") is None
    assert sc.messages(m.query("select 1")[:-1]) is None


def test_messages_validates_an_incomplete_header():
    sc = ClientScanner(100)
    with pytest.raises(ProtocolError, match="exceeds max_packet_size"):
        sc.messages(m.SYNC + hdr(b"Q", 101))
    with pytest.raises(ProtocolError, match="unknown message type"):
        sc.messages(m.SYNC + hdr(b"A", 50) + b"xy")
    # a valid incomplete one is simply not reported
    assert sc.messages(m.SYNC + hdr(b"Q", 100)) == [(_S, 0, 5)]


@SETTINGS
@given(st.data())
def test_messages_random_drain(data):
    """As the forwarder uses it: a bytearray filled by chunks, consumed by messages()."""
    model = data.draw(client_streams())
    cuts = data.draw(cut_points(model.starts, len(model.data)))
    sc = ClientScanner(LIMIT)
    buf = bytearray()
    got, base, c = [], 0, 0
    for b in bounds(cuts, len(model.data)):
        buf += model.data[c:b]
        c = b
        msgs = sc.messages(buf)
        want = expected_messages(model, c)
        want = [(t, s - base, e - base) for t, s, e in want if s >= base] if want else []
        assert msgs == (want or None)
        if msgs:
            got.extend((t, s + base, e + base) for t, s, e in msgs)
            base += msgs[-1][2]
            del buf[:msgs[-1][2]]
            if msgs[-1][0] == _X:
                break
    assert got == [sp for sp in model.spans if sp[1] <= model.stop]


@SETTINGS
@given(st.data())
def test_messages_invalid_random(data):
    limit = data.draw(st.sampled_from([LIMIT, 300]))
    prefix = [msg for msg in data.draw(st.lists(frontend_message, max_size=6)) if len(msg) - 1 <= limit]
    bad, error = data.draw(bad_headers(limit))
    model = ClientModel(prefix + [bad])
    bad_at = model.spans[-1][1]
    sc = ClientScanner(limit)
    for c in set(bounds(data.draw(cut_points(model.starts, len(model.data))), len(model.data))):
        if c >= bad_at + 5:
            with pytest.raises(ProtocolError, match=error):
                sc.messages(model.data[:c])
        else:
            assert sc.messages(model.data[:c]) == expected_messages(model, c)


VALID_NAMED = [
    m.parse_message("select 1"),
    m.parse_message("select 1", "s1"),
    m.message(b"P", b"\x00\x00"),                 # empty name, empty query, no count: PG's to check
    m.bind_text([]),
    m.bind_text(["a", None], portal="p", statement="s"),
    m.message(b"B", b"\x00\x00"),
    describe(b"S"), describe(b"P", "portal"),
    close(b"S", "s1"), close(b"P"),
]
MALFORMED_NAMED = [
    m.message(b"P", b""),
    m.message(b"P", b"name"),
    m.message(b"P", b"name\x00select 1"),          # the query is not terminated
    m.message(b"B", b""),
    m.message(b"B", b"portal\x00stmt"),
    m.message(b"B", b"\x00"),
    m.message(b"D", b""),
    m.message(b"D", b"S"),                          # no name at all
    m.message(b"D", b"X\x00"),                      # neither statement nor portal
    m.message(b"D", b"s\x00"),
    m.message(b"D", b"Sname"),                      # unterminated
    m.message(b"C", b""),
    m.message(b"C", b"P"),
    m.message(b"C", b"Q\x00"),
    m.message(b"C", b"Pname"),
    m.message(b"C", b"\x00\x00"),
]


@pytest.mark.parametrize("msg", VALID_NAMED)
def test_check_names_valid(msg):
    check_names(msg[0], msg, 5, len(msg))
    sc = ClientScanner(LIMIT)
    assert sc.messages(m.SYNC + msg) == [(_S, 0, 5), (msg[0], 5, 5 + len(msg))]
    assert sc.messages(bytearray(msg)) == [(msg[0], 0, len(msg))]


@pytest.mark.parametrize("msg", MALFORMED_NAMED)
def test_check_names_malformed(msg):
    with pytest.raises(ProtocolError, match=f"malformed {chr(msg[0])} message"):
        check_names(msg[0], msg, 5, len(msg))
    sc = ClientScanner(LIMIT)
    with pytest.raises(ProtocolError, match=f"malformed {chr(msg[0])} message"):
        sc.messages(m.SYNC + msg + m.SYNC)
    with pytest.raises(ProtocolError):
        sc.messages(bytearray(msg))
    # stream mode does not read names: forwarded as is (PostgreSQL answers)
    assert ClientScanner(LIMIT).stream(msg) == msg


def test_check_names_stays_inside_the_message():
    """A NUL in the next message does not terminate a name."""
    sc = ClientScanner(LIMIT)
    for bad in (m.message(b"P", b"name"), m.message(b"D", b"Sname")):
        with pytest.raises(ProtocolError, match="malformed"):
            sc.messages(bad + m.query(""))


# --- lone_query -------------------------------------------------------------------------

@pytest.mark.parametrize("data, want", [
    (m.query("select 1"), True),
    (m.query(""), True),
    (b"Q", False),
    (b"Q\x00\x00\x00", False),
    (b"Q\x00\x00\x00\x05", False),                   # header only (len 5)
    (b"Q\x00\x00\x00\x04", False),                   # an empty body is not NUL-terminated
    (m.message(b"Q", b"select 1"), False),           # not NUL-terminated
    (m.query("select 1")[:-1], False),               # incomplete
    (m.query("select 1") + m.query("select 2"), False),
    (m.query("select 1") + m.SYNC, False),
    (m.query("select 1") + b"Q", False),
    (m.SYNC, False),
    (m.message(b"P", b"\x00select\x00"), False),
    (copy_data(b"x\x00"), False),
    (m.query("x" * 95), True),                       # length 100 == limit
    (m.query("x" * 96), False),                      # over the limit
    (b"Q\x00\x00\x00\x06a\x00" + b"\x00", False),    # length says 6, one byte more
])
def test_lone_query(data, want):
    sc = ClientScanner(100)
    assert sc.lone_query(data) is want
    assert sc.lone_query(bytearray(data)) is want


@SETTINGS
@given(st.data())
def test_lone_query_agrees_with_messages(data):
    limit = 200
    msgs = data.draw(st.lists(st.one_of(frontend_message, st.builds(m.query, texts)), min_size=1, max_size=3))
    raw = b"".join(msgs)
    cut = data.draw(st.integers(1, len(raw)))
    raw = raw[:cut]
    sc = ClientScanner(limit)
    try:
        found = sc.messages(raw)
    except ProtocolError:
        found = "error"
    want = (found not in (None, "error") and len(found) == 1 and found[0][0] == _Q
            and found[0][2] == len(raw) and raw[-1] == 0)
    assert sc.lone_query(raw) is want


# --- start_streaming / take / pending_length --------------------------------------------

def test_pending_length_and_streaming_a_large_message():
    sc = ClientScanner(LIMIT)
    msg = copy_data(b"z" * 200_000)
    buf = bytearray(msg[:70_000])
    assert sc.messages(buf) is None
    total = sc.pending_length(buf)
    assert total == len(msg)
    assert ClientScanner.pending_length(b"Q\x00\x00\x00\x05\x00") == 6
    sc.start_streaming(total, len(buf))
    assert sc.owed == len(msg) - 70_000
    sc.take(100_000)
    assert sc.owed == len(msg) - 170_000
    sc.take(len(msg) - 170_000)
    assert sc.owed == 0


def test_stream_resumes_after_start_streaming():
    """owed is shared by both modes: stream() skips the rest of a streamed message."""
    sc = ClientScanner(LIMIT)
    msg = copy_data(b"z" * 1000)
    sc.start_streaming(len(msg), 300)
    assert sc.stream(msg[300:800]) == msg[300:800]
    assert sc.owed == len(msg) - 800 and sc.requests == 0
    rest = msg[800:] + m.query("x") + m.SYNC + b"Q\x00"
    assert sc.stream(rest) == rest[:-2]
    assert sc.owed == 0 and sc.requests == 2 and sc.synced is True
    assert sc.held == b"Q\x00"


# --- the server model -----------------------------------------------------------------------

class ServerModel:
    def __init__(self, msgs: list, watch=SERVER_WATCH):
        self.watch = watch
        self.spans = spans_of(msgs)
        self.data = b"".join(msgs)
        self.starts = [s for _, s, _ in self.spans]
        self.boundaries = set(self.starts) | {len(self.data)}

    def span_at(self, pos):
        i = bisect_right(self.starts, pos) - 1
        if i >= 0 and pos < self.spans[i][2]:
            return self.spans[i]
        return None

    def forwarded(self, c: int) -> int:
        """How much may have gone out after ``c`` bytes came in."""
        span = self.span_at(c)
        if span is None or span[1] == c:
            return c
        t, s, _ = span
        if c - s < 5 or t in self.watch:
            return s              # a header, or a watched message, is held until complete
        return c

    def between(self, r0: int, r1: int) -> list:
        return self.spans[bisect_left(self.starts, r0):bisect_left(self.starts, r1)]


def run_server(model: ServerModel, cuts, error_at=None, error=None):
    sc = ServerScanner(model.watch)
    assert sc.status == b"I" and not sc.copy and not sc.mid_message
    data = model.data
    out, reported, ready = [], [], 0
    status, copy = b"I", False
    r = c = 0
    for b in bounds(cuts, len(data)):
        chunk = data[c:b]
        if error_at is not None and b >= error_at + 5:
            with pytest.raises(ProtocolError, match=error):
                sc.feed(chunk)
            return b"".join(out), sc
        buf, end, found = sc.feed(chunk)
        c = b
        want = model.forwarded(c)
        assert bytes(buf) == data[r:c]                  # held bytes come first
        assert r + end == want, (r, c, want)
        span = model.span_at(want)                       # never split a watched message
        assert not (span and span[0] in model.watch and span[1] < want)
        expected = [(t, s - r, e - r) for t, s, e in model.between(r, want) if t in model.watch]
        assert found == expected
        for t, s, e in found:
            assert e <= end and buf[s] == t
            assert struct.unpack_from("!I", buf, s + 1)[0] == e - s - 1
            if t == _Z:
                status, copy = bytes(buf[s + 5:s + 6]), False
            elif t in _COPY_START:
                copy = True
        assert sc.ready == sum(t == _Z for t, _, _ in found)
        assert sc.status == status
        assert sc.copy == copy
        assert sc.mid_message == (c not in model.boundaries)
        out.append(bytes(buf[:end]))
        reported.extend((t, s + r, e + r) for t, s, e in found)
        ready += sc.ready
        r = want
    assert error_at is None, "the bad header never raised"
    assert b"".join(out) == data
    assert reported == [sp for sp in model.spans if sp[0] in model.watch]
    assert ready == sum(t == _Z for t, _, _ in model.spans)
    assert not sc.mid_message
    return b"".join(out), sc


SERVER_STREAM = [
    m.parameter_status("application_name", "geo"),
    m.message(b"1"),
    m.message(b"2"),
    m.row_description([("a", 23), ("b", 25)]),
    m.data_row([1, "x"]),
    m.data_row([None, "y" * 300]),
    m.command_complete("SELECT 2"),
    m.ready_for_query(b"T"),
    m.notice_response("careful"),
    copy_response(b"H"),
    copy_data(b"row\n"),
    COPY_DONE,
    m.command_complete("COPY 1"),
    m.READY_IDLE,
    m.error_response("42P01", "relation does not exist", detail="d", hint="h"),
    m.READY_FAILED,
    m.message(b"n"), m.message(b"I"), m.message(b"s"), m.message(b"3"),
    m.message(b"t", b"\x00\x01\x00\x00\x00\x17"),
    m.message(b"A", struct.pack("!I", 7) + b"chan\x00payload\x00"),
    copy_response(b"G", 2),
    m.READY_IDLE,
    copy_response(b"W"),
    copy_data(b"wal"),
]


@pytest.mark.parametrize("watch", [SERVER_WATCH, TRACKED])
def test_server_feed_whole(watch):
    _, sc = run_server(ServerModel(SERVER_STREAM, watch), [])
    assert sc.status == b"I" and sc.copy


@pytest.mark.parametrize("watch", [SERVER_WATCH, TRACKED])
def test_server_feed_every_split_point(watch):
    model = ServerModel(SERVER_STREAM, watch)
    for i in range(len(model.data) + 1):
        run_server(model, [i])


@pytest.mark.parametrize("watch", [SERVER_WATCH, TRACKED])
def test_server_feed_one_byte_at_a_time(watch):
    msgs = SERVER_STREAM[:6] + [m.data_row([b"x" * 70000]), m.error_response("XX000", "e" * 500)] + SERVER_STREAM[6:]
    run_server(ServerModel(msgs, watch), range(len(b"".join(msgs))))


def test_server_feed_fast_path_of_a_large_row():
    sc = ServerScanner()
    row = m.data_row([b"x" * 100_000])
    buf, end, found = sc.feed(row[:10])
    assert (buf, end, found) == (row[:10], 10, []) and sc.mid_message
    buf, end, found = sc.feed(row[10:50_000])
    assert (buf, end, found) == (row[10:50_000], 49_990, []) and sc.mid_message
    buf, end, found = sc.feed(row[50_000:] + m.READY_IN_TX[:3])
    assert end == len(row) - 50_000 and found == [] and sc.mid_message
    buf, end, found = sc.feed(m.READY_IN_TX[3:])
    assert bytes(buf) == m.READY_IN_TX and found == [(_Z, 0, 6)]
    assert sc.status == b"T" and sc.ready == 1 and not sc.mid_message


backend_message = st.one_of(
    st.builds(m.row_description, st.lists(st.tuples(idents, st.sampled_from([16, 20, 23, 25])), max_size=4)),
    st.builds(lambda vals: m.data_row(vals), st.lists(st.one_of(st.none(), texts, payloads), max_size=4)),
    st.builds(m.data_row, st.builds(lambda n, s: [big(n, s)], sizes, st.integers(0, 99))),
    st.builds(m.command_complete, st.sampled_from(["SELECT 1", "INSERT 0 1", "BEGIN", "COPY 3"])),
    st.builds(m.ready_for_query, st.sampled_from([b"I", b"T", b"E"])),
    st.builds(m.parameter_status, idents, texts),
    st.builds(m.error_response, st.sampled_from(["42P01", "57P01", "08P01"]), texts),
    st.builds(m.notice_response, texts),
    st.builds(copy_response, st.sampled_from([b"G", b"H", b"W"]), st.integers(0, 3)),
    st.builds(copy_data, payloads),
    st.just(COPY_DONE),
    st.sampled_from([m.message(bytes((t,))) for t in b"123nIs"]),
    st.builds(lambda p: m.message(b"A", struct.pack("!I", 1) + p), st.binary(max_size=20)),
    st.builds(lambda p, k: m.message(b"K", struct.pack("!II", p, k)), st.integers(0, 2**32 - 1),
              st.integers(0, 2**32 - 1)),
)


@SETTINGS
@given(st.data())
def test_server_feed_random_chunks(data):
    watch = data.draw(st.sampled_from([SERVER_WATCH, TRACKED]))
    msgs = data.draw(st.lists(backend_message, max_size=14))
    model = ServerModel(msgs, watch)
    run_server(model, data.draw(cut_points(model.starts, len(model.data))))


# --- invalid server input --------------------------------------------------------------------

@SETTINGS
@given(st.data())
def test_server_feed_invalid_random(data):
    watch = data.draw(st.sampled_from([SERVER_WATCH, TRACKED]))
    prefix = data.draw(st.lists(backend_message, max_size=8))
    if data.draw(st.booleans()):
        n = data.draw(st.integers(0, 3))
        bad = bytes((data.draw(st.integers(0, 255)),)) + struct.pack("!I", n)
        error = f"invalid message length {n} from server"
    else:
        t = data.draw(st.sampled_from(sorted(watch)))
        bad = bytes((t,)) + struct.pack("!I", data.draw(st.integers(SERVER_HOLD_LIMIT + 1, 2**32 - 1)))
        error = "server message too large"
    model = ServerModel(prefix + [bad + data.draw(st.binary(max_size=10))], watch)
    bad_at = model.spans[-1][1]
    cuts = data.draw(cut_points(model.starts, len(model.data)))
    out, _ = run_server(model, cuts, error_at=bad_at, error=error)
    assert out == model.data[:len(out)] and len(out) <= bad_at


def test_server_short_length():
    for n in range(4):
        sc = ServerScanner()
        buf, end, found = sc.feed(m.READY_IDLE + b"D" + struct.pack("!I", n)[:2])
        assert end == 6
        with pytest.raises(ProtocolError, match=f"invalid message length {n} from server"):
            sc.feed(struct.pack("!I", n)[2:])


def test_server_hold_limit():
    sc = ServerScanner()
    buf, end, found = sc.feed(hdr(b"E", SERVER_HOLD_LIMIT) + b"S")   # at the limit: held
    assert end == 0 and found == [] and sc.mid_message
    with pytest.raises(ProtocolError, match="server message too large"):
        ServerScanner().feed(hdr(b"E", SERVER_HOLD_LIMIT + 1))
    with pytest.raises(ProtocolError, match="server message too large"):
        ServerScanner(TRACKED).feed(m.READY_IDLE + hdr(b"C", 0xFFFFFFFF) + b"SELECT")
    # a large message that is not watched streams through
    sc = ServerScanner()
    buf, end, found = sc.feed(hdr(b"D", 0xFFFFFFFF) + b"\x00\x01")
    assert end == 7 and sc.mid_message and sc.skip == 0xFFFFFFFF + 1 - 7


def test_disable_pqexec_makes_a_simple_query_a_protocol_violation():
    query = m.query("select 1")
    extended = m.extended_query("select $1::int", ["1"])
    scanner = ClientScanner(1 << 16, pqexec=False)
    assert scanner.lone_query(query) is False
    assert scanner.messages(extended) is not None
    for feed in (scanner.messages, scanner.stream):
        for data in (query, extended + query, query[:5]):      # even a lone header
            with pytest.raises(ProtocolError, match="PQexec disallowed"):
                feed(data)
    allowed = ClientScanner(1 << 16)
    assert allowed.lone_query(query) and allowed.messages(extended + query)


# --- a repeated reply, read by its shape (ServerScanner.shape) -----------------------------------

@pytest.fixture
def learn_every_reply(monkeypatch):
    """Every reply scanned in full is learned from (not one in eight): a few
    replies then exercise the shape as much as a long run would."""
    monkeypatch.setattr(server_scan, "_LEARN_SKIP", 0)


_HEAD = m.row_description([("abalance", 23)])
# A ParameterStatus (watched) exactly as long as _HEAD: only its bytes tell them apart.
_SAME_LENGTH_STATUS = m.parameter_status("a", "x" * (len(_HEAD) - len(m.parameter_status("a", ""))))
REPLY_KINDS = [
    # (before the rows, after the rows): each a list of messages
    ([_HEAD], [m.command_complete("SELECT 1"), m.READY_IDLE]),
    ([_HEAD], [m.command_complete("SELECT 1"), m.READY_IN_TX]),          # only the status differs
    ([_SAME_LENGTH_STATUS], [m.command_complete("SELECT 1"), m.READY_IDLE]),
    ([m.message(b"1"), m.message(b"2"), m.row_description([("a", 23)])],
     [m.command_complete("SELECT 1"), m.READY_IDLE]),
    ([], [m.command_complete("INSERT 0 1"), m.parameter_status("TimeZone", "UTC"), m.READY_IDLE]),
    ([m.row_description([("a", 25)])], [m.error_response("22012", "division by zero"), m.READY_FAILED]),
]


@pytest.mark.usefixtures("learn_every_reply")
@SETTINGS
@given(st.data())
def test_server_feed_repeated_replies_whole_and_cut(data):
    """Replies of a few kinds, each with its own rows, mostly one per chunk
    (so the shape of the last one is tried on the next), sometimes cut
    anywhere, a row sometimes with a lying length: the scanner still says
    exactly what the model does, and raises where it must."""
    watch = data.draw(st.sampled_from([SERVER_WATCH, TRACKED]))
    msgs, reply_ends = [], []
    for _ in range(data.draw(st.integers(1, 12))):
        before, after = data.draw(st.sampled_from(REPLY_KINDS))
        rows = data.draw(st.lists(st.builds(lambda v: m.data_row(v), st.lists(st.one_of(st.none(), texts),
                                                                              max_size=3)), max_size=3))
        msgs += before + rows + after
        reply_ends.append(len(b"".join(msgs)))
    model = ServerModel(msgs, watch)
    cuts = [e for e in reply_ends[:-1] if data.draw(st.integers(0, 4))]
    if data.draw(st.booleans()):
        cuts = sorted(set(cuts) | set(data.draw(cut_points(model.starts, len(model.data)))))
    run_server(model, cuts)


def test_server_feed_reads_a_repeated_reply_by_its_shape_and_only_then():
    sc = ServerScanner()
    head, tail = m.row_description([("abalance", 23)]), m.command_complete("SELECT 1") + m.READY_IDLE
    first = head + m.data_row(["0"]) + tail
    assert sc.feed(first)[1:] == (len(first), [(_Z, len(first) - 6, len(first))])
    assert sc.shape is not None and sc.learn == 7        # the next 7 scanned in full are not learned from
    for rows in ([m.data_row(["12345"])], [m.data_row([None]), m.data_row(["x" * 300])], []):
        reply = head + b"".join(rows) + tail
        assert sc.feed(reply)[1:] == (len(reply), [(_Z, len(reply) - 6, len(reply))])
        assert sc.ready == 1 and sc.status == b"I" and not sc.mid_message
    assert sc.learn == 7            # all three read by the shape
    # The same bytes around rows that are not rows, or whose length lies: the
    # general scan reads them (and refuses a length under 4, as always).
    notice = head + m.notice_response("n") + tail
    assert sc.feed(notice)[2] == [(_Z, len(notice) - 6, len(notice))] and sc.learn == 6
    with pytest.raises(ProtocolError, match="invalid message length 2"):
        sc.feed(head + b"D\x00\x00\x00\x02" + tail)
    # The same length before the rows, other bytes (a ParameterStatus): read in full.
    status_first = _SAME_LENGTH_STATUS + m.data_row(["1"]) + tail
    assert sc.feed(status_first)[2] == [(ord("S"), 0, len(_SAME_LENGTH_STATUS)),
                                        (_Z, len(status_first) - 6, len(status_first))]
    # The same bytes after the rows but another status: read in full.
    in_tx = head + m.data_row(["1"]) + m.command_complete("SELECT 1") + m.READY_IN_TX
    assert sc.feed(in_tx)[2] == [(_Z, len(in_tx) - 6, len(in_tx))] and sc.status == b"T"
    # A reply with a watched message before its rows gives no shape: each is read in full.
    fresh = ServerScanner()
    for row in (m.data_row(["1"]), m.data_row(["a longer row"])):
        assert fresh.feed(_SAME_LENGTH_STATUS + row + tail)[2][0] == (ord("S"), 0, len(_SAME_LENGTH_STATUS))
    # Another watch (the prepared-statement tracker needs every reply): read in full.
    sc.feed(first)
    sc.watch = TRACKED
    found = sc.feed(first)[2]
    assert [t for t, _, _ in found] == [ord("T"), ord("C"), _Z]
    # A row whose length runs into what follows: not the shape; the rest is held.
    sc = ServerScanner()
    sc.feed(first)
    long_row = head + b"D" + struct.pack("!I", 1000) + b"\x00\x01" + tail
    buf, end, found = sc.feed(long_row)
    assert found == [] and sc.mid_message and sc.learn == 7
