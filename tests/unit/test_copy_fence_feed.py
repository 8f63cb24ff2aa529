"""The fence's reading of a server's replies (net/copy_fence.py, feed), split
into chunks at every place: what comes before the fence's replies reaches
the client byte for byte, however the chunks fall (a ParseComplete held
until what follows says whose it is, a large DataRow streamed), the
fence's own are swallowed, and what follows them is handed back. The
server is a stand-in holding what feed touches; tests/integration's
test_copy_fence.py runs the fence against PostgreSQL."""

from collections import deque
from types import SimpleNamespace

import pytest

from geobouncer.net import copy_fence
from geobouncer.pool.unanswered import FENCE
from geobouncer.proto.framing import ProtocolError
from geobouncer.proto.messages import message

NONCE = b"\x00\x02" + bytes(range(8))
Z_I, Z_E = message(b"Z", b"I"), message(b"Z", b"E")
FENCE_REPLIES = (message(b"1") + message(b"t", NONCE) + message(b"n") + message(b"3")
                 + message(b"Z", b"T"))
BIG_ROW = message(b"D", b"\x00\x01\x00\x00\x10\x00" + b"r" * 4096)


def stand_in():
    tracker = SimpleNamespace(fence=copy_fence.Fence(NONCE), pending=deque([(FENCE, False, None)]),
                              doubtful=True, copy_in=False, skipping=False, status=b"I", prepared=set())
    watched = []
    server = SimpleNamespace(tracker=tracker, tx_status=b"I", in_copy=False, scanner=SimpleNamespace(status=b"I"),
                             _watched=lambda mtype, data, start, end: watched.append(bytes(data[start:end])))
    return server, watched


def run(stream: bytes, cuts):
    """Feed ``stream`` cut at ``cuts``: (what the client got, what followed the fence or None)."""
    server, _ = stand_in()
    got, rest = b"", None
    bounds = [0, *cuts, len(stream)]
    for start, end in zip(bounds, bounds[1:]):
        if rest is not None:
            rest += stream[start:end]
            continue
        out, rest = copy_fence.feed(server, stream[start:end])
        got += out
    return server, got, rest


# What the client is owed before the fence: its own ParseComplete (held, then
# released by its BindComplete), a ParameterDescription of its own, a row streamed.
BEFORE = (message(b"E", b"SERROR\x00C22P02\x00Mbad\x00\x00") + Z_E + message(b"1") + message(b"2") + BIG_ROW
          + message(b"C", b"SELECT 1\x00") + Z_I + message(b"1") + message(b"t", b"\x00\x01\x00\x00\x00\x17")
          + message(b"n") + Z_I + message(b"1"))
AFTER = message(b"T", b"\x00\x00") + Z_I


def test_every_single_cut():
    stream = BEFORE + FENCE_REPLIES + AFTER
    for cut in range(1, len(stream)):
        server, got, rest = run(stream, [cut])
        assert got == BEFORE, cut
        assert rest == AFTER, cut
        assert server.tracker.fence is None and not server.tracker.doubtful and not server.tracker.pending
        assert server.tx_status == server.tracker.status == b"T"


def test_byte_by_byte():
    stream = BEFORE + FENCE_REPLIES + AFTER
    _, got, rest = run(stream, list(range(1, len(stream))))
    assert (got, rest) == (BEFORE, AFTER)


def test_a_notice_inside_the_fence_goes_to_the_client():
    notice = message(b"N", b"SNOTICE\x00Mhello\x00\x00")
    fence = FENCE_REPLIES.replace(message(b"t", NONCE), notice + message(b"t", NONCE))
    server, got, rest = run(Z_I + fence, [])
    assert (got, rest) == (Z_I + notice, b"")


def test_not_answered_yet():
    server, got, rest = run(BEFORE + message(b"1") + message(b"t", NONCE), [])
    assert (got, rest) == (BEFORE, None)
    assert server.tracker.fence is not None and server.tracker.doubtful


def test_a_copy_starting_before_the_fence_breaks_the_stream():
    server, _ = stand_in()
    with pytest.raises(ProtocolError):
        copy_fence.feed(server, Z_I + message(b"G", b"\x00\x00\x00"))
