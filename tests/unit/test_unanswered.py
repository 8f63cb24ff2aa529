"""Requests PostgreSQL never answers (pool/unanswered.py), over the tracker's
FIFO: what is dropped, what the reader is told, and what is never dropped."""

from test_prepared import EXECUTE, Z, bind, parse, reply, send

from geobouncer.pool.prepared import COPY_END, QUERY, SYNC, Tracker
from geobouncer.pool.statements import Registry
from geobouncer.proto import messages as m

QUERY_MSG = m.query("SELECT 2")
ERROR = m.error_response("42601", "syntax error")
COPY_DONE = m.message(b"c")
DONE = m.command_complete("SELECT 1")


def _tracker():
    return Tracker(Registry(), 10)


def _kinds(tracker):
    return [entry[0] for entry in tracker.pending]


def test_query_after_failed_extended_message_is_skipped():
    t = _tracker()
    send(t, {}, parse(b"", b"SELEC 1"), QUERY_MSG)
    assert t.exact          # a Query after unsynced extended messages: every reply matched
    reply(t, ERROR)
    assert t.pending == type(t.pending)() and t.settle
    assert (t.unanswered, t.needs_sync, t.skipping) == (1, True, True)


def test_query_sent_while_skipping_is_dropped_at_the_sync():
    t = _tracker()
    send(t, {}, parse(b"", b"SELEC 1"))
    t.exact = True          # net/forward.py: a batch that ends unsynced
    reply(t, ERROR)
    assert t.skipping and t.unanswered == 0
    send(t, {}, QUERY_MSG, m.SYNC)
    t.settle, t.needs_sync = False, False
    assert reply(t, Z) == Z
    assert list(t.pending) == [] and t.unanswered == 1 and not t.skipping


def test_a_querys_own_error_skips_nothing():
    t = _tracker()
    send(t, {}, parse(b"", b"SELECT 1"), bind(b""), EXECUTE, QUERY_MSG)
    reply(t, m.message(b"1"), m.message(b"2"), DONE, ERROR)
    assert _kinds(t) == [QUERY] and t.unanswered == 0 and not t.skipping
    reply(t, Z)
    assert list(t.pending) == []


def test_lean_error_never_drops_a_query():
    # Not exact: the head may be a message answered already; nothing dropped.
    t = _tracker()
    send(t, {}, parse(b"", b"SELECT 1"), bind(b""), EXECUTE)
    t.exact = False
    t.pending.append((QUERY, False, None))
    reply(t, ERROR)
    assert _kinds(t) == [QUERY] and t.unanswered == 0


def test_syncs_swallowed_by_a_copy_that_ended_well():
    t = _tracker()
    send(t, {}, parse(b"", b"COPY t FROM STDIN"), bind(b""), EXECUTE, m.SYNC)
    t.copy_in = t.irregular = True       # the reader saw CopyInResponse
    send(t, {}, m.message(b"d", b"1\n"), COPY_DONE, m.SYNC)
    assert _kinds(t)[-3:] == [SYNC, COPY_END, SYNC]
    t.ready(b"I")
    assert list(t.pending) == [] and t.unanswered == 1 and not t.irregular


def test_a_failed_copy_counts_the_syncs_before_its_end_swallowed_and_doubts():
    # A simple-Query COPY: the Syncs among its data are taken as swallowed (the
    # failing row came after them, the common case) and the server is doubted.
    t = _tracker()
    send(t, {}, m.query("COPY t FROM STDIN"))
    t.copy_in = t.irregular = True
    send(t, {}, m.SYNC, m.message(b"d", b"x\n"), m.SYNC, COPY_DONE)
    reply(t, m.error_response("22P02", "invalid input syntax"))
    assert (t.unanswered, t.doubtful, t.settle, t.copy_in) == (2, True, True, False)
    assert _kinds(t) == [QUERY, COPY_END]
    reply(t, Z)
    assert list(t.pending) == []


def test_a_failed_extended_copy_waits_for_the_sync_after_its_end():
    # libpq: Execute + Sync, the data, CopyDone + Sync. The first Sync is taken
    # as swallowed; the one after CopyDone ends the error's skip (certain).
    t = _tracker()
    send(t, {}, parse(b"", b"COPY t FROM STDIN"), bind(b""), EXECUTE, m.SYNC)
    t.copy_in = t.irregular = True
    send(t, {}, m.message(b"d", b"x\n"), COPY_DONE, m.SYNC, m.SYNC)
    reply(t, m.error_response("22P02", "invalid input syntax"))
    assert (t.unanswered, t.doubtful) == (1, True)
    assert _kinds(t) == [SYNC, SYNC]      # after the CopyDone: both answered
    reply(t, Z, Z)
    assert list(t.pending) == []


def test_a_copy_failing_before_any_sync_doubts_nothing():
    t = _tracker()
    send(t, {}, m.query("COPY t FROM STDIN"))
    t.copy_in = t.irregular = True
    send(t, {}, m.message(b"d", b"x\n"), COPY_DONE, m.SYNC)
    reply(t, m.error_response("22P02", "invalid input syntax"), Z)
    assert (t.unanswered, t.doubtful) == (0, False)
    assert _kinds(t) == [SYNC]


def test_copy_done_after_the_copy_leaves_nothing_queued():
    t = _tracker()
    send(t, {}, m.query("COPY t FROM STDIN"), COPY_DONE)
    t.ready(b"I")
    assert list(t.pending) == [] and not t.irregular


def test_a_stray_copy_done_with_nothing_queued_is_not_taken_for_a_copys_end():
    # Idle in a transaction, a CopyDone (PostgreSQL ignores it), then a COPY
    # with a Sync among its data that ends well: that Sync was swallowed.
    t = _tracker()
    send(t, {}, COPY_DONE)
    assert list(t.pending) == [] and not t.irregular
    send(t, {}, parse(b"", b"COPY t FROM STDIN"), bind(b""), EXECUTE, m.SYNC)
    t.copy_in = t.irregular = True
    send(t, {}, m.message(b"d", b"1\n"), COPY_DONE, m.SYNC)
    t.ready(b"T")
    assert list(t.pending) == [] and t.unanswered == 1


def test_a_stray_copy_done_before_a_failing_copy_leaves_its_syncs_counted_swallowed():
    t = _tracker()
    send(t, {}, COPY_DONE, m.query("COPY t FROM STDIN"))
    t.copy_in = t.irregular = True
    send(t, {}, m.SYNC, m.message(b"d", b"x\n"), COPY_DONE)
    reply(t, m.error_response("22P02", "invalid input syntax"))
    assert (t.unanswered, t.doubtful) == (1, True)
    reply(t, Z)
    assert list(t.pending) == []


def test_a_stray_copy_done_after_an_answered_execute_is_dropped():
    # Execute (no COPY), CopyDone, then a COPY with a Sync among its data: the
    # CopyDone was read outside COPY; the COPY's own Sync is swallowed.
    t = _tracker()
    send(t, {}, parse(b"", b"SELECT 1"), bind(b""), EXECUTE, COPY_DONE,
         parse(b"", b"COPY t FROM STDIN"), bind(b""), EXECUTE, m.SYNC, m.message(b"d", b"1\n"), COPY_DONE, m.SYNC)
    assert t.exact
    reply(t, m.message(b"1"), m.message(b"2"), DONE)
    assert _kinds(t)[:1] != [COPY_END]
    reply(t, m.message(b"1"), m.message(b"2"))
    t.copy_in = t.irregular = True       # CopyInResponse
    reply(t, m.command_complete("COPY 1"), Z)
    assert list(t.pending) == [] and t.unanswered == 1
