"""Framing and message codec: bytes one at a time, random chunks, trailing bytes left alone."""

import random
import struct

import pytest

from geobouncer.proto import messages as m
from geobouncer.proto.framing import (CANCEL_REQUEST_CODE, SSL_REQUEST_CODE, ProtocolError,
                                      header_at, message_at, parse_startup_params, split_messages,
                                      startup_packet_at)

STREAM = [
    m.query("select 1"),
    m.parse_message("select $1::int", "s1"),
    m.bind_text(["42"], statement="s1"),
    m.execute(),
    m.SYNC,
    m.message(b"d", b"x" * 70000),   # larger than one recv
    m.TERMINATE,
]


def _drain(buf: bytearray, limit: int = 1 << 20):
    """Consume complete messages from buf, as a reader loop would."""
    out = []
    while True:
        found = message_at(buf, 0, limit)
        if found is None:
            return out
        mtype, start, end = found
        out.append((mtype, bytes(buf[start:end])))
        del buf[:end]


def _expected():
    return [(msg[0], msg[5:]) for msg in STREAM]


def test_one_byte_at_a_time():
    data = b"".join(STREAM)
    buf = bytearray()
    got = []
    for i in range(len(data)):
        buf.append(data[i])
        got.extend(_drain(buf))
    assert got == _expected()
    assert buf == b""


@pytest.mark.parametrize("seed", range(20))
def test_random_chunks(seed):
    rnd = random.Random(seed)
    data = b"".join(STREAM)
    buf = bytearray()
    got = []
    pos = 0
    while pos < len(data):
        step = rnd.randint(1, 9000)
        buf += data[pos:pos + step]
        pos += step
        got.extend(_drain(buf))
    assert got == _expected()


def test_trailing_bytes_left_alone():
    data = m.query("select 1") + b"Q\x00\x00"
    msgs, used = split_messages(data)
    assert msgs == [(ord("Q"), b"select 1\x00")]
    assert data[used:] == b"Q\x00\x00"


def test_incomplete_header_needs_more():
    assert message_at(b"Q\x00\x00", 0, 100) is None
    assert header_at(b"Q\x00\x00\x00", 0, 100) is None


def test_header_of_partial_body():
    msg = m.query("select 1")
    assert header_at(msg[:7], 0, 100) == (ord("Q"), len(msg))
    assert message_at(msg[:7], 0, 100) is None


@pytest.mark.parametrize("length", [0, 3, 1 << 31])
def test_bad_lengths_rejected_before_allocation(length):
    bad = b"Q" + struct.pack("!I", length)
    with pytest.raises(ProtocolError):
        message_at(bad, 0, 1 << 30)


def test_limit_applies():
    with pytest.raises(ProtocolError):
        message_at(m.query("x" * 100), 0, 50)


def test_startup_packets():
    startup = m.startup_message({"user": "u", "database": "d", "application_name": "a b"})
    ssl = struct.pack("!II", 8, SSL_REQUEST_CODE)
    data = ssl + startup
    for cut in range(len(data)):
        partial = data[:cut]
        found = startup_packet_at(partial)
        if cut < 8:
            assert found is None
    code, end = startup_packet_at(data)
    assert (code, end) == (SSL_REQUEST_CODE, 8)
    code, end2 = startup_packet_at(data, end)
    assert code == 196608 and end2 == len(data)
    params = parse_startup_params(data[end + 8:end2])
    assert params == {"user": "u", "database": "d", "application_name": "a b"}
    assert startup_packet_at(m.cancel_request(1, 2))[0] == CANCEL_REQUEST_CODE


@pytest.mark.parametrize("raw", [struct.pack("!II", 4, 0), struct.pack("!II", 1 << 20, 196608)])
def test_hostile_startup_lengths(raw):
    with pytest.raises(ProtocolError):
        startup_packet_at(raw)


@pytest.mark.parametrize("body", [b"user\x00u", b"user\x00\x00", b"\xff\xfe\x00x\x00\x00"])
def test_bad_startup_params(body):
    with pytest.raises(ProtocolError):
        parse_startup_params(body)


def test_error_response_roundtrip():
    err = m.error_response("53300", "no more connections allowed (max_client_conn)", "FATAL")
    (mtype, body), = split_messages(err)[0]
    fields = m.parse_error_fields(body)
    assert chr(mtype) == "E"
    assert fields["C"] == "53300" and fields["S"] == "FATAL"
    assert fields["M"] == "no more connections allowed (max_client_conn)"


def test_data_row_and_description():
    row = m.data_row(["a", None, 3, True])
    (mtype, body), = split_messages(row)[0]
    assert chr(mtype) == "D"
    assert body == struct.pack("!H", 4) + struct.pack("!i", 1) + b"a" + struct.pack("!i", -1) \
        + struct.pack("!i", 1) + b"3" + struct.pack("!i", 1) + b"t"
    desc = m.row_description([("name", 25), ("n", 20)])
    assert desc[0:1] == b"T" and b"name\x00" in desc


def test_sasl_initial_response():
    msg = m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc")
    (mtype, body), = split_messages(msg)[0]
    assert m.parse_sasl_initial_response(body) == ("SCRAM-SHA-256", b"n,,n=,r=abc")


def test_text_decoded_with_surrogateescape_goes_back_out_byte_for_byte():
    raw = b"SELECT '\xff\xfe caf\xc3\xa9'"
    text = raw.decode("utf-8", "surrogateescape")
    assert m.query(text) == b"Q" + (len(raw) + 5).to_bytes(4, "big") + raw + b"\x00"
