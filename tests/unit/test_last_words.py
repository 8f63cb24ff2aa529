"""The reader's part of a close at a message boundary (net/last_words.py):
once ``to_boundary`` is set, what is forwarded ends exactly at the end of the
message under way, whatever the chunks. The scanner is the real one; the
server and client are stand-ins holding what forward_rest touches."""

import struct
from itertools import pairwise
from types import SimpleNamespace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geobouncer.net import last_words
from geobouncer.proto import messages as m
from geobouncer.proto.scan import ServerScanner

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def data_row(*values: bytes) -> bytes:
    body = struct.pack("!h", len(values)) + b"".join(struct.pack("!i", len(v)) + v for v in values)
    return b"D" + struct.pack("!I", 4 + len(body)) + body


def stream_and_ends(sizes: list[int]) -> tuple[bytes, list[int]]:
    msgs = [b"T" + struct.pack("!I", 6) + b"\x00\x01"]
    msgs += [data_row(b"x" * size, b"y" * (size % 7)) for size in sizes]
    msgs += [b"C" + struct.pack("!I", 13) + b"SELECT 9\x00", m.READY_IDLE]
    ends, pos = [], 0
    for msg in msgs:
        pos += len(msg)
        ends.append(pos)
    return b"".join(msgs), ends


class Client:
    def __init__(self, fail: bool = False):
        self.out = bytearray()
        self.fail = fail

    def send(self, data) -> None:
        if self.fail:
            raise OSError("gone")
        self.out += data


def server_for(client) -> SimpleNamespace:
    return SimpleNamespace(scanner=ServerScanner(), client=client, to_boundary=False,
                           pool=SimpleNamespace(stats=SimpleNamespace(bytes_sent=0)))


def chunks_of(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted({c for c in cuts if 0 < c < len(stream)}), len(stream)]
    return [stream[a:b] for a, b in pairwise(points)]


def run(stream: bytes, cuts: list[int], closed_after: int) -> tuple[bytes, int]:
    """Forward chunks as the reader does; after ``closed_after`` chunks the
    client is being closed. Returns (what the client got, what it had then)."""
    client = Client()
    server = server_for(client)
    chunks = chunks_of(stream, cuts)
    had = None
    for i, chunk in enumerate(chunks):
        if i == closed_after:
            server.to_boundary = True
            had = len(client.out)
        if server.to_boundary:
            if not last_words.forward_rest(server, chunk):
                break
            continue
        data, end, _ = server.scanner.feed(chunk)
        client.send(data[:end])
    assert server.scanner.skip == 0 or had is None
    return bytes(client.out), len(client.out) if had is None else had


@SETTINGS
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=12),
       cuts=st.lists(st.integers(0, 40000), max_size=30), closed_after=st.integers(0, 31))
def test_forwarded_bytes_end_at_the_first_boundary_after_the_cut(sizes, cuts, closed_after):
    stream, ends = stream_and_ends(sizes)
    out, had = run(stream, cuts, closed_after)
    assert stream.startswith(out)
    boundary = next(end for end in [0, *ends] if end >= had)
    assert len(out) == boundary, (len(out), had, boundary)


def test_a_row_cut_in_its_header_and_in_a_value():
    stream, ends = stream_and_ends([100, 5000, 7])
    for cut in (ends[0] + 3, ends[1] + 1234, ends[2] + 2):
        out, had = run(stream, [cut, cut + 10, cut + 6000], closed_after=1)
        assert had <= cut                       # a held header is not forwarded
        assert len(out) in ends


def test_at_a_boundary_nothing_more_goes_out():
    client = Client()
    server = server_for(client)
    stream, ends = stream_and_ends([10])
    server.scanner.feed(stream[:ends[1]])
    assert not last_words.forward_rest(server, stream[ends[1]:])
    assert client.out == b""


def test_a_failed_write_stops_the_reader():
    client = Client(fail=True)
    server = server_for(client)
    stream, ends = stream_and_ends([500])
    server.scanner.feed(stream[:ends[0] + 20])
    assert server.scanner.skip > 0
    assert not last_words.forward_rest(server, stream[ends[0] + 20:])


def test_at_boundary_needs_no_write_under_way_and_no_message_half_out():
    lock = SimpleNamespace(locked=lambda: False)
    busy = SimpleNamespace(locked=lambda: True)
    server = server_for(Client())
    assert last_words.at_boundary(SimpleNamespace(wlock=lock), server)
    assert last_words.at_boundary(SimpleNamespace(wlock=lock), None)
    assert not last_words.at_boundary(SimpleNamespace(wlock=busy), server)
    server.scanner.feed(data_row(b"x" * 100)[:50])
    assert not last_words.at_boundary(SimpleNamespace(wlock=lock), server)
