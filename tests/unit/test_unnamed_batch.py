"""ClientScanner.unnamed_batch, the one-pass fast path for extended batches
that name nothing, against the general path it stands in for: ``messages``
plus the conditions net/forward.py applied to its result before. Whatever
the stream, it accepts exactly what that pair accepted, with the same
boundary and counts, and never raises where ``messages`` would (it declines
and leaves the error to it)."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geobouncer.net.params import INSPECT_FIRST, INSPECT_SPELLINGS, needs_inspection
from geobouncer.proto import messages as m
from geobouncer.proto.framing import ProtocolError
from geobouncer.proto.scan import ClientScanner

LIMIT = 1 << 16
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def batch(buf, limit=LIMIT):
    return ClientScanner(limit).unnamed_batch(buf, INSPECT_FIRST, INSPECT_SPELLINGS)


def model(buf, limit=LIMIT):
    """What messages() and the old per-message checks of _forward_unnamed said."""
    try:
        msgs = ClientScanner(limit).messages(buf)
    except ProtocolError:
        return "error"
    if not msgs or msgs[-1][0] != ord("S"):
        return None
    syncs = parses = binds = 0
    for mtype, start, end in msgs:
        if mtype not in b"PBDES":
            return None
        if mtype == ord("P"):
            if buf[start + 5] != 0 or needs_inspection(bytes(buf[start + 6:start + 9])):
                return None
            parses += 1
        elif mtype == ord("B"):
            if buf[start + 5] != 0 or buf[start + 6] != 0:
                return None
            binds += 1
        elif mtype == ord("D") and buf[start + 6] != 0:
            return None
        elif mtype == ord("S"):
            syncs += 1
    return msgs[-1][2], syncs, parses, binds


texts = st.sampled_from(["select 1", "SELECT $1::int", " select 1", "set x = 1", "Discard all", "",
                         "/* c */ select", "(select 1)", "selecT 2", "deallocate all", "res"])
names = st.sampled_from(["", "", "", "s1", "p"])
unnamed_message = st.one_of(
    st.builds(m.parse_message, texts, names),
    st.builds(m.bind_text, st.lists(st.one_of(st.none(), st.just("7")), max_size=3), names, names),
    st.builds(lambda kind, name: m.message(b"D", kind + m.cstr(name)), st.sampled_from([b"S", b"P", b"X"]),
              names),
    st.builds(m.execute, names, st.integers(0, 5)),
    st.just(m.SYNC), st.just(m.SYNC),
    st.just(m.FLUSH),
    st.builds(m.query, texts),
    st.just(m.message(b"C", b"S\x00")),
    st.just(m.TERMINATE),
)
damage = st.one_of(
    st.just(b""), st.just(b""), st.binary(max_size=6),
    st.just(b"P\x00\x00\x00\x02"),              # a length under 4
    st.just(b"B\x7f\x00\x00\x00"),              # over max_packet_size
    st.just(b"P\x00\x00\x00\x04"),              # an empty Parse
    st.just(b"B\x00\x00\x00\x05\x00"),          # a Bind too short for its names
    st.just(b"\x00\x00\x00\x08\x04\xd2\x16/"),  # an SSLRequest after login
)


@SETTINGS
@given(st.lists(unnamed_message, max_size=8), damage, st.integers(0, 40), st.booleans())
def test_accepts_exactly_what_the_general_path_did(msgs, tail, cut, as_bytearray):
    data = b"".join(msgs) + tail
    data = data[:len(data) - cut] if cut < len(data) else data
    buf = bytearray(data) if as_bytearray else data
    assert_as_general_path(buf, batch(buf))


def assert_as_general_path(buf, got):
    """``got`` (unnamed_batch's answer for ``buf``) is what the general path says."""
    want = model(buf)
    if want == "error":
        assert got is None
    elif got is None and want is not None:
        # The one decline it may make of a batch the general path took: the
        # complete header of a message it does not handle follows the batch
        # (the general path then forwards it, more slowly).
        end = want[0]
        assert len(buf) >= end + 5 and buf[end] not in b"PBDES", (bytes(buf), want)
    else:
        assert got == want, (bytes(buf), got, want)


def test_a_plain_batch_and_a_partial_one_after_it():
    one = m.extended_query("select $1::int", ["1"])
    got = batch(bytearray(one + one + one[:7]))
    assert got == (2 * len(one), 2, 2, 2)


def test_declines_named_unread_or_unfinished_batches():
    assert batch(m.parse_message("select 1", "s1") + m.SYNC) is None
    assert batch(m.parse_message("SET x = 1") + m.SYNC) is None
    assert batch(m.parse_message("select 1") + m.bind_text([])) is None          # no Sync yet
    assert batch(m.parse_message("select 1") + m.SYNC + b"Q\x00\x00\x00\x05") is None
    assert batch(b"") is None and batch(m.SYNC[:3]) is None
    assert batch(m.SYNC, limit=3) is None                                        # messages() raises


binds = st.builds(m.bind_text, st.lists(st.one_of(st.none(), st.just("7"), st.just("12345")), max_size=3),
                  names, names)


@SETTINGS
@given(st.lists(unnamed_message, min_size=1, max_size=6), st.data(), damage, st.integers(0, 40))
def test_a_repeated_batch_shape_accepts_exactly_what_the_general_path_did(msgs, data, tail, cut):
    """The second batch of a scanner that learned a shape from the first
    (the bytes around its one Bind): the same Bind replaced, or not, then
    damaged or cut; the answer is still the general path's."""
    scanner = ClientScanner(LIMIT)
    first = b"".join(msgs)
    scanner.unnamed_batch(first, INSPECT_FIRST, INSPECT_SPELLINGS)
    again = [data.draw(binds) if msg[:1] == b"B" and data.draw(st.booleans()) else msg for msg in msgs]
    second = b"".join(again) + tail
    second = second[:len(second) - cut] if cut < len(second) else second
    assert_as_general_path(second, scanner.unnamed_batch(second, INSPECT_FIRST, INSPECT_SPELLINGS))


def test_a_repeated_batch_is_recognised_by_its_shape_and_only_then():
    scanner = ClientScanner(LIMIT)
    first = m.extended_query("select $1::int", ["1"])
    assert scanner.unnamed_batch(first, INSPECT_FIRST, INSPECT_SPELLINGS) == (len(first), 1, 1, 1)
    assert scanner.batch_shape is not None
    other = m.extended_query("select $1::int", ["12345678"])
    assert scanner.unnamed_batch(bytearray(other), INSPECT_FIRST, INSPECT_SPELLINGS) == (len(other), 1, 1, 1)
    # A Bind whose length lies (says one byte less, the last byte then a stray
    # header byte): declined, and the general path refuses it too.
    at = other.index(b"B\x00")
    length = int.from_bytes(other[at + 1:at + 5], "big")
    lying = other[:at + 1] + (length - 1).to_bytes(4, "big") + other[at + 5:]
    assert scanner.unnamed_batch(lying, INSPECT_FIRST, INSPECT_SPELLINGS) is None
    assert model(lying) in ("error", None)
    # The same length after the Bind, other bytes: a Flush for the Sync, a
    # Query's header for the Parse's: the shape does not apply.
    assert scanner.unnamed_batch(other[:-5] + m.FLUSH, INSPECT_FIRST, INSPECT_SPELLINGS) is None
    assert scanner.unnamed_batch(b"Q" + other[1:], INSPECT_FIRST, INSPECT_SPELLINGS) is None
    # Bytes after the batch: not the shape; the general path splits them off.
    assert scanner.unnamed_batch(other + m.SYNC[:2], INSPECT_FIRST, INSPECT_SPELLINGS) == (len(other), 1, 1, 1)
    # A lower max_packet_size (RELOAD) is applied to the Bind even on the shape.
    scanner.limit = 20
    assert scanner.unnamed_batch(other, INSPECT_FIRST, INSPECT_SPELLINGS) is None
