"""The prepared-statement tracker (pool/prepared.py) over canned protocol bytes."""

import struct

from geobouncer.pool.deallocate import deallocate_locally, watch_drop
from geobouncer.pool.prepared import FAKE, Tracker
from geobouncer.pool.statements import Registry
from geobouncer.proto import messages as m
from geobouncer.proto.framing import split_messages


def parse(name: bytes, sql: bytes, types=()) -> bytes:
    body = name + b"\x00" + sql + b"\x00" + struct.pack("!H", len(types))
    body += b"".join(struct.pack("!I", t) for t in types)
    return m.message(b"P", body)


def bind(stmt: bytes, portal: bytes = b"") -> bytes:
    return m.message(b"B", portal + b"\x00" + stmt + b"\x00" + b"\x00\x00\x00\x00\x00\x00")


def describe(kind: bytes, name: bytes) -> bytes:
    return m.message(b"D", kind + name + b"\x00")


def close(kind: bytes, name: bytes) -> bytes:
    return m.message(b"C", kind + name + b"\x00")


EXECUTE = m.execute()


def send(tracker, stmts, *msgs):
    """Feed client messages; return the bytes that would go to the server."""
    wire = b"".join(msgs)
    out = []
    for mtype, body in split_messages(wire)[0]:
        scratch = []
        if tracker.client_message(mtype, body, stmts, scratch):
            out.extend(scratch)
        else:
            out.append(m.message(bytes((mtype,)), body))
    return b"".join(out)


def reply(tracker, *msgs):
    """Feed server replies; return what the client would receive."""
    out = []
    for mtype, body in split_messages(b"".join(msgs))[0]:
        keep, fakes = tracker.server_message(mtype, body)
        if keep:
            out.append(m.message(bytes((mtype,)), body))
        out.append(fakes)
    return b"".join(out)


def types_of(wire: bytes) -> str:
    return "".join(chr(t) for t, _ in split_messages(wire)[0])


PC, BC, CC = m.message(b"1"), m.message(b"2"), m.message(b"3")
DONE = m.command_complete("SELECT 1")
Z = m.READY_IDLE


def test_named_parse_is_renamed_and_reused_across_clients():
    reg = Registry()
    server = Tracker(reg, 10)
    a, b = {}, {}
    wire = send(server, a, parse(b"s1", b"select 1"), bind(b"s1"), EXECUTE, m.SYNC)
    assert b"GB_1\x00" in wire and b"s1\x00" not in wire
    assert types_of(wire) == "CPBES"      # a Close first: the server may have GB_1 after all
    assert types_of(reply(server, CC, PC, BC, DONE, Z)) == "12CZ"
    # client b prepares the same text under another name: answered locally
    wire = send(server, b, parse(b"other", b"select 1"), bind(b"other"), EXECUTE, m.SYNC)
    assert types_of(wire) == "BES"
    assert server.pending[0][0] == FAKE
    assert server.first_fakes() == PC
    assert types_of(reply(server, BC, DONE, Z)) == "2CZ"


def test_bind_on_server_without_statement_injects_parse_and_swallows_reply():
    reg = Registry()
    first, second = Tracker(reg, 10), Tracker(reg, 10)
    stmts = {}
    send(first, stmts, parse(b"s1", b"select $1", (23,)), m.SYNC)
    reply(first, PC, Z)
    wire = send(second, stmts, bind(b"s1"), EXECUTE, m.SYNC)
    assert types_of(wire) == "CPBES"
    assert b"GB_1\x00select $1\x00\x00\x01\x00\x00\x00\x17" in wire   # types kept byte for byte
    assert types_of(reply(second, CC, PC, BC, DONE, Z)) == "2CZ"     # injected replies gone


def test_close_statement_is_local_and_server_keeps_it():
    server = Tracker(Registry(), 10)
    stmts = {}
    send(server, stmts, parse(b"s1", b"select 1"), m.SYNC)
    reply(server, PC, Z)
    wire = send(server, stmts, close(b"S", b"s1"), m.SYNC)
    assert types_of(wire) == "S"
    assert b"s1" not in stmts
    assert server.first_fakes() == CC             # nothing before it: sent before the batch
    assert types_of(reply(server, Z)) == "Z"
    assert len(server.prepared) == 1


def test_error_drops_entries_until_sync_and_forgets_failed_parse():
    server = Tracker(Registry(), 10)
    stmts = {}
    send(server, stmts, parse(b"bad", b"selec oops"), bind(b"bad"), EXECUTE, m.SYNC)
    err = m.error_response("42601", "syntax error")
    assert types_of(reply(server, err, Z)) == "EZ"
    assert not server.pending
    assert len(server.prepared) == 0      # a later Bind will prepare it again


def test_lru_eviction_closes_oldest_on_server():
    server = Tracker(Registry(), 2)
    stmts = {}
    for i in range(3):
        wire = send(server, stmts, parse(b"s%d" % i, b"select %d" % i), m.SYNC)
        expected = "CPS" if i < 2 else "CCPS"
        assert types_of(wire) == expected
        got = reply(server, *([CC] if i == 2 else []), CC, PC, Z)
        assert types_of(got) == "1Z"      # the CloseCompletes (eviction, pre-Parse) are swallowed
    assert len(server.prepared) == 2


def test_unnamed_and_unknown_names_pass_through():
    server = Tracker(Registry(), 10)
    stmts = {}
    msgs = (parse(b"", b"select 1"), bind(b""), describe(b"P", b""), EXECUTE, m.SYNC)
    assert send(server, stmts, *msgs) == b"".join(msgs)
    reply(server, PC, BC, m.message(b"T", b"\x00\x00"), DONE, Z)
    unknown = bind(b"never_prepared")
    assert send(server, stmts, unknown, m.SYNC) == unknown + m.SYNC


def test_deallocate_name_answered_locally_in_order():
    server = Tracker(Registry(), 10)
    stmts = {}
    send(server, stmts, parse(b"s1", b"select 1"), m.SYNC)
    reply(server, PC, Z)
    assert deallocate_locally(server, b"DEALLOCATE s1\x00", stmts)
    assert b"s1" not in stmts
    fakes = server.first_fakes()
    assert types_of(fakes) == "CZ" and b"DEALLOCATE" in fakes


def test_discard_all_forgets_server_statements_only_on_success():
    server = Tracker(Registry(), 10)
    stmts = {}
    send(server, stmts, parse(b"s1", b"select 1"), m.SYNC)
    reply(server, PC, Z)
    send(server, stmts, m.query("DISCARD ALL"))
    reply(server, m.error_response("25001", "cannot run inside a transaction block"), m.READY_FAILED)
    assert len(server.prepared) == 1 and not server.dropped_all
    send(server, stmts, m.query("discard all;"))
    reply(server, m.command_complete("DISCARD ALL"), Z)
    assert len(server.prepared) == 0 and server.dropped_all   # the caller clears the client's names


def test_deallocate_all_by_extended_protocol_is_seen_in_the_reply():
    server = Tracker(Registry(), 10)
    stmts = {}
    send(server, stmts, parse(b"s1", b"select 1"), m.SYNC)
    reply(server, PC, Z)
    send(server, stmts, parse(b"", b"DEALLOCATE ALL"), bind(b""), EXECUTE, m.SYNC)
    reply(server, PC, BC, m.command_complete("DEALLOCATE ALL"), Z)
    assert len(server.prepared) == 0 and server.dropped_all


def test_reparse_of_taken_name_is_refused_by_the_server():
    server = Tracker(Registry(), 10)
    stmts = {}
    send(server, stmts, parse(b"s1", b"select 42"), m.SYNC)
    reply(server, PC, Z)
    wire = send(server, stmts, parse(b"s1", b"select 43"), bind(b"s1"), EXECUTE, m.SYNC)
    assert types_of(wire) == "PBES" and b"select 42" in wire and b"select 43" not in wire
    err = m.error_response("42P05", 'prepared statement "GB_1" already exists')
    got = reply(server, err, Z)
    assert types_of(got) == "EZ"
    assert b'prepared statement "s1" already exists' in got and b"GB_1" not in got
    assert stmts[b"s1"][1].startswith(b"select 42")   # the old statement stays
    assert len(server.prepared) == 1


def test_sync_effect_runs_only_without_error():
    server = Tracker(Registry(), 10)
    seen = []
    stmts = {}
    send(server, stmts, parse(b"", b"SET x = 1"), bind(b""), EXECUTE)
    server.client_message(ord("S"), None, stmts, [], seen.append)
    reply(server, PC, BC, m.command_complete("SET"), Z)
    assert seen == [b"I"]
    send(server, stmts, parse(b"", b"SET x = 1"), bind(b""), EXECUTE)
    server.client_message(ord("S"), None, stmts, [], seen.append)
    reply(server, m.error_response("42704", "unrecognized"), Z)
    assert seen == [b"I"]


def test_fake_between_real_replies_is_inserted_in_order():
    server = Tracker(Registry(), 10)
    stmts = {}
    send(server, stmts, parse(b"s1", b"select 1"), m.SYNC)
    reply(server, PC, Z)
    # Execute something, then Parse the same text under a new name (faked), then Sync
    wire = send(server, stmts, bind(b"s1"), EXECUTE, parse(b"s2", b"select 1"), m.SYNC)
    assert types_of(wire) == "BES"
    assert server.first_fakes() == b""            # a real reply comes first
    assert types_of(reply(server, BC, DONE, Z)) == "2C1Z"


# --- Parse answered without a server --------------------------------------------

def _batch(*raw):
    from geobouncer.proto.scan import ClientScanner
    buf = bytearray(b"".join(raw))
    return buf, ClientScanner(1 << 20).messages(buf)


def test_parse_only_batch_of_known_statements_is_answered_locally():
    from geobouncer.pool.statements import PARSE_COMPLETE, Registry, parse_locally
    from geobouncer.proto import messages as m
    registry = Registry()
    tail = b"SELECT 1\x00\x00\x00"
    sid = registry.id_for(tail)
    buf, msgs = _batch(m.parse_message("SELECT 1", "s1"), m.SYNC)
    stmts = {}
    assert parse_locally(registry, buf, msgs, stmts) is None   # never parsed anywhere yet
    registry.parsed.add(sid)
    assert parse_locally(registry, buf, msgs, stmts) == PARSE_COMPLETE + m.READY_IDLE
    assert stmts == {b"s1": (sid, tail)}
    # The name is now taken: the server must answer 42P05.
    assert parse_locally(registry, buf, msgs, stmts) is None


def test_parse_locally_needs_only_parse_sync_flush_and_named_statements():
    from geobouncer.pool.statements import Registry, parse_locally
    from geobouncer.proto import messages as m
    registry = Registry()
    registry.parsed.add(registry.id_for(b"SELECT 1\x00\x00\x00"))
    for raw in ((m.parse_message("SELECT 1", "a"), m.bind_text([], statement="a"), m.SYNC),
                (m.parse_message("SELECT 1", ""), m.SYNC),
                (m.parse_message("SELECT 2", "b"), m.SYNC),
                (m.parse_message("SELECT 1", "c"), m.parse_message("SELECT 1", "c"), m.SYNC)):
        buf, msgs = _batch(*raw)
        assert parse_locally(registry, buf, msgs, {}) is None
    buf, msgs = _batch(m.parse_message("SELECT 1", "d"), m.FLUSH)
    assert parse_locally(registry, buf, msgs, {}) == m.message(b"1")
    buf, msgs = _batch(m.parse_message("SET x = 1", "e"), m.SYNC)
    registry.parsed.add(registry.id_for(b"SET x = 1\x00\x00\x00"))
    assert parse_locally(registry, buf, msgs, {}, lambda head: head.lower() == b"set") is None


def test_a_successful_parse_on_a_server_marks_the_statement_parsed():
    from geobouncer.pool.prepared import Tracker
    from geobouncer.pool.statements import Registry
    from geobouncer.proto import messages as m
    registry = Registry()
    tracker = Tracker(registry, 10)
    out = []
    stmts = {}
    body = m.parse_message("SELECT 1", "s1")[5:]
    tracker.client_message(ord("P"), body, stmts, out)
    tracker.client_message(ord("S"), None, stmts, out)
    sid = stmts[b"s1"][0]
    assert sid not in registry.parsed
    tracker.server_message(ord("3"), b"")
    tracker.server_message(ord("1"), b"")
    assert sid in registry.parsed


def test_a_refused_parse_frees_the_clients_name():
    from geobouncer.pool.prepared import Tracker
    from geobouncer.pool.statements import Registry
    from geobouncer.proto import messages as m
    tracker = Tracker(Registry(), 10)
    stmts, out = {}, []
    tracker.client_message(ord("P"), m.parse_message("SELECT * FROM missing", "s1")[5:], stmts, out)
    tracker.client_message(ord("S"), None, stmts, out)
    assert b"s1" in stmts
    tracker.server_message(ord("E"), m.error_response("42P01", "relation does not exist")[5:])
    tracker.server_message(ord("Z"), b"I")
    assert b"s1" not in stmts and not tracker.pending     # the client may Parse s1 again


def test_an_eviction_whose_close_was_skipped_keeps_the_statement_known():
    from geobouncer.pool.prepared import Tracker
    from geobouncer.pool.statements import Registry, server_name
    from geobouncer.proto import messages as m
    tracker = Tracker(Registry(), 1)
    stmts, out = {}, []
    tracker.client_message(ord("P"), m.parse_message("SELECT 1", "a")[5:], stmts, out)
    tracker.client_message(ord("S"), None, stmts, out)
    for reply in (b"1", b"Z"):
        tracker.server_message(ord(reply), b"I" if reply == b"Z" else b"")
    first = stmts[b"a"][0]
    # An error earlier in the batch makes the server skip the eviction's Close.
    tracker.client_message(ord("E"), None, stmts, out)
    out.clear()
    tracker.client_message(ord("P"), m.parse_message("SELECT 2", "b")[5:], stmts, out)
    assert m.message(b"C", b"S" + server_name(first)) in out        # evicts "a"'s statement
    tracker.client_message(ord("S"), None, stmts, out)
    tracker.server_message(ord("E"), m.error_response("22012", "division by zero")[5:])
    tracker.server_message(ord("Z"), b"I")
    assert first in tracker.prepared                                # still on the server


def test_drop_all_forgets_only_what_existed_before_it():
    """DEALLOCATE ALL then, in the same batch, a new Parse: the new statement
    survives the drop; the old one goes, on the server and for the client."""
    server = Tracker(Registry(), 10)
    stmts = {}
    send(server, stmts, parse(b"old", b"select 1"), m.SYNC)
    reply(server, CC, PC, Z)
    old_sid = stmts[b"old"][0]
    watch_drop(server, stmts)            # the pooler saw 'DEALLOCATE ALL' in the next Query
    assert old_sid not in server.prepared
    wire = send(server, stmts, m.query("DEALLOCATE ALL"), parse(b"new", b"select 2"), bind(b"new"), EXECUTE, m.SYNC)
    assert types_of(wire) == "QCPBES"
    new_sid = stmts[b"new"][0]
    got = reply(server, m.command_complete("DEALLOCATE ALL"), Z, CC, PC, BC, DONE, Z)
    assert types_of(got) == "CZ12CZ"
    assert server.dropped_all and set(server.dropped_names) == {b"old"}
    assert new_sid in server.prepared and old_sid not in server.prepared


def test_no_drop_after_all_restores_what_the_server_has():
    server = Tracker(Registry(), 10)
    stmts = {}
    send(server, stmts, parse(b"s", b"select 1"), m.SYNC)
    reply(server, CC, PC, Z)
    sid = stmts[b"s"][0]
    watch_drop(server, stmts)            # "SELECT 'discard all'": looked like one
    send(server, stmts, m.query("SELECT 'discard all'"))
    reply(server, m.command_complete("SELECT 1"), Z)
    assert sid in server.prepared and not server.dropped_all and server.drop_watch is None


def test_stale_plan_error_makes_the_next_use_prepare_afresh():
    server = Tracker(Registry(), 10)
    stmts = {}
    send(server, stmts, parse(b"s", b"select * from t"), m.SYNC)
    reply(server, CC, PC, Z)
    sid = stmts[b"s"][0]
    wire = send(server, stmts, bind(b"s"), EXECUTE, m.SYNC)
    assert types_of(wire) == "BES"
    stale = m.error_response("0A000", "cached plan must not change result type")
    assert types_of(reply(server, stale, Z)) == "EZ"
    assert sid not in server.prepared
    wire = send(server, stmts, bind(b"s"), EXECUTE, m.SYNC)
    assert types_of(wire) == "CPBES"    # Close the stale copy, Parse again


def test_registry_forgets_old_texts_and_never_reuses_an_id():
    reg = Registry(capacity=3)
    parsed = reg.parsed_set()
    ids = []
    for i in range(5):
        ids.append(reg.id_for(b"q%d" % i))
        parsed.add(ids[-1])
    assert ids == [1, 2, 3, 4, 5] and len(reg.ids) == 3
    assert parsed == {3, 4, 5}
    reg.id_for(b"q9")
    assert parsed == {4, 5}
    assert reg.id_for(b"q0") == 7           # seen again: a new id, a new server name
    assert reg.id_for(b"q4") == 5           # still remembered


def test_close_only_batch_of_named_statements_is_answered_locally():
    from geobouncer.pool.statements import close_locally
    from geobouncer.proto import messages as m
    close = lambda body: m.message(b"C", body)     # noqa: E731
    stmts = {b"s1": (1, b"x"), b"s2": (2, b"y")}
    buf, msgs = _batch(close(b"Ss1\x00"), m.FLUSH)
    assert close_locally(buf, msgs, stmts) == m.message(b"3")
    assert stmts == {b"s2": (2, b"y")}
    buf, msgs = _batch(close(b"Snever\x00"), close(b"Ss2\x00"), m.SYNC)
    assert close_locally(buf, msgs, stmts) == m.message(b"3") * 2 + m.READY_IDLE
    assert stmts == {}
    # the server's to answer: a portal, the unnamed statement, other messages
    # (a malformed Close never gets here: the scanner refuses it, 08P01)
    for batch in ([close(b"Pp1\x00"), m.SYNC], [close(b"S\x00"), m.SYNC],
                  [close(b"Ss1\x00"), m.message(b"D", b"Ss1\x00"), m.SYNC], [m.SYNC]):
        buf, msgs = _batch(*batch)
        assert close_locally(buf, msgs, {b"a": 1}) is None, batch
