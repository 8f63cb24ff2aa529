"""Hostile review of transaction pooling: raw protocol sequences by which one
client could hold a server, starve a small pool, get a server pooled in an
unknown state, or shift the replies of other clients.

Each case runs against PostgreSQL directly first (what a client sees there is
the expectation), then through the pooler with a pool of one: the same replies,
and once the client idles between requests, another client is served and the
first one still gets right answers.
"""

from __future__ import annotations

import time

import pytest
from _util_pool import RawClient, another_client_gets, errors_in, query_message, query_one, run_in_thread
from fixtures.pooler import TARGET
from fixtures.ports import wait_until
from test_red_team import (
    FLUSH,
    SYNC,
    _query_ok,
    bind,
    close_msg,
    describe_msgs,
    execute,
    finish,
    kinds,
    message,
    parse,
    raw_login,
    read_n_ready,
    rows_of,
)

ROW = b"7\tx\n"


def _quiet(raw: RawClient, wait: float = 0.4) -> list:
    """What arrives within ``wait`` seconds (PostgreSQL answers nothing, say)."""
    raw.sock.settimeout(wait)
    out = []
    try:
        while True:
            msg = raw.read_message()
            if msg is None:
                break
            out.append(msg)
    except TimeoutError:
        pass
    finally:
        raw.sock.settimeout(15)
    return out


def _sqlstates(msgs) -> list:
    return [e.get("C") for e in errors_in(msgs)]


# Each case: the client's sequence and the replies it must see, ending between
# requests (nothing owed, nothing unsynced) as far as PostgreSQL is concerned.

def _extended_then_query(raw):
    # A Query ends the implicit transaction of the extended messages before it.
    raw.sock.sendall(parse("", "SELECT 1") + bind("") + execute() + query_message("SELECT 2"))
    replies = read_n_ready(raw, 1)
    assert rows_of(replies) == [["1"], ["2"]] and replies[-1] == (b"Z", b"I"), describe_msgs(replies)


def _error_then_query_then_sync(raw):
    # After an error in an extended message, PostgreSQL skips everything up to
    # the next Sync, a Query included: no reply to it at all.
    raw.sock.sendall(parse("", "SELEC 1") + query_message("SELECT 2"))
    replies = raw.read_until(b"E")
    assert _sqlstates(replies) == ["42601"], describe_msgs(replies)
    assert _quiet(raw) == []
    raw.sock.sendall(SYNC)
    replies = read_n_ready(raw, 1)
    assert replies == [(b"Z", b"I")], describe_msgs(replies)


def _error_then_later_query_then_sync(raw):
    # The same with the Query sent after the error came back.
    raw.sock.sendall(parse("", "SELEC 1") + FLUSH)
    assert _sqlstates(raw.read_until(b"E")) == ["42601"]
    raw.sock.sendall(query_message("SELECT 2"))
    assert _quiet(raw) == []
    raw.sock.sendall(SYNC)
    replies = read_n_ready(raw, 1)
    assert replies == [(b"Z", b"I")], describe_msgs(replies)


def _copy_in_extended_with_sync(raw):
    # libpq's PQexecParams / tokio-postgres: Bind, Execute, Sync, then the data,
    # CopyDone and a second Sync. PostgreSQL swallows the Sync sent during COPY.
    raw.sock.sendall(parse("", "COPY hold_copy FROM STDIN") + bind("") + execute() + SYNC)
    assert kinds(raw.read_until(b"G"))[-1:] == b"G"
    raw.sock.sendall(message(b"d", ROW) + message(b"c") + SYNC)
    replies = read_n_ready(raw, 1)
    assert [body for t, body in replies if t == b"C"] == [b"COPY 1\x00"], describe_msgs(replies)
    assert replies[-1] == (b"Z", b"I"), describe_msgs(replies)
    assert _quiet(raw) == []


BAD_ROW = b"not a number\tx\n"


def _copy_in_extended_bad_row(raw):
    # The same COPY failing on its data: PostgreSQL swallowed the first Sync
    # (read in COPY mode) and skips to the second; one ReadyForQuery.
    raw.sock.sendall(parse("", "COPY hold_copy FROM STDIN") + bind("") + execute() + SYNC)
    assert kinds(raw.read_until(b"G"))[-1:] == b"G"
    raw.sock.sendall(message(b"d", ROW) + message(b"d", BAD_ROW) + message(b"c") + SYNC)
    replies = read_n_ready(raw, 1)
    assert _sqlstates(replies) == ["22P02"] and replies[-1] == (b"Z", b"I"), describe_msgs(replies)
    assert _quiet(raw) == []


def _copy_in_extended_copy_fail(raw):
    raw.sock.sendall(parse("", "COPY hold_copy FROM STDIN") + bind("") + execute() + SYNC)
    assert kinds(raw.read_until(b"G"))[-1:] == b"G"
    raw.sock.sendall(message(b"d", ROW) + message(b"f", b"client gave up\x00") + SYNC)
    replies = read_n_ready(raw, 1)
    assert _sqlstates(replies) == ["57014"] and replies[-1] == (b"Z", b"I"), describe_msgs(replies)
    assert _quiet(raw) == []


def _copy_in_fails_sync_inside(raw):
    # A simple-Query COPY failing, a Sync among its data (swallowed, as above).
    raw.sock.sendall(query_message("COPY hold_copy FROM STDIN"))
    assert kinds(raw.read_until(b"G"))[-1:] == b"G"
    raw.sock.sendall(SYNC + message(b"d", BAD_ROW) + message(b"c"))
    replies = read_n_ready(raw, 1)
    assert _sqlstates(replies) == ["22P02"] and replies[-1] == (b"Z", b"I"), describe_msgs(replies)
    assert _quiet(raw) == []


def _copy_in_sync_inside(raw):
    raw.sock.sendall(query_message("COPY hold_copy FROM STDIN"))
    assert kinds(raw.read_until(b"G"))[-1:] == b"G"
    raw.sock.sendall(SYNC + message(b"d", ROW) + message(b"c"))
    replies = read_n_ready(raw, 1)
    assert [body for t, body in replies if t == b"C"] == [b"COPY 1\x00"], describe_msgs(replies)
    assert replies[-1] == (b"Z", b"I") and _quiet(raw) == [], describe_msgs(replies)


def _copy_in_abandoned_with_query(raw):
    # A Query instead of CopyDone: PostgreSQL takes it as a protocol
    # violation, never runs it, and ends the connection (FATAL). The client
    # is closed; the server with it, never pooled.
    raw.sock.sendall(query_message("COPY hold_copy FROM STDIN"))
    assert kinds(raw.read_until(b"G"))[-1:] == b"G"
    raw.sock.sendall(query_message("SELECT 2"))
    replies = raw.read_until_close()
    assert set(_sqlstates(replies)) == {"08P01"} and rows_of(replies) == [], describe_msgs(replies)
    assert errors_in(replies)[-1].get("S") == "FATAL", describe_msgs(replies)
    return "closed"


def _sync_only(raw):
    raw.sock.sendall(SYNC + SYNC)
    replies = read_n_ready(raw, 2)
    assert replies == [(b"Z", b"I")] * 2, describe_msgs(replies)


def _execute_missing_portal_then_sync(raw):
    raw.sock.sendall(execute("nope") + FLUSH)
    assert _sqlstates(raw.read_until(b"E")) == ["34000"]
    raw.sock.sendall(SYNC)
    assert read_n_ready(raw, 1) == [(b"Z", b"I")]


def _close_flush_then_sync(raw):
    raw.sock.sendall(close_msg("S", "never_prepared") + FLUSH)
    assert kinds(raw.read_until(b"3")) == b"3"
    raw.sock.sendall(SYNC)
    assert read_n_ready(raw, 1) == [(b"Z", b"I")]


def _close_flush_then_idle(raw):
    # A driver closing a statement it prepared, with a Flush and no Sync (it
    # sends the Sync with its next request): nothing of this needs a server.
    raw.sock.sendall(parse("held_s", "SELECT 1") + SYNC)
    assert read_n_ready(raw, 1) == [(b"1", b""), (b"Z", b"I")]
    raw.sock.sendall(close_msg("S", "held_s") + FLUSH)
    assert kinds(raw.read_until(b"3")) == b"3"
    assert _quiet(raw) == []


def _pipelined_error_in_the_middle(raw):
    ok = parse("", "SELECT $1::int") + bind("", [5]) + execute() + SYNC
    bad = parse("", "SELECT 1/$1::int") + bind("", [0]) + execute() + query_message("SELECT 3") + SYNC
    raw.sock.sendall(ok + bad + ok)
    replies = read_n_ready(raw, 3)
    assert rows_of(replies) == [["5"], ["5"]] and _sqlstates(replies) == ["22012"], describe_msgs(replies)
    assert [body for t, body in replies if t == b"Z"] == [b"I"] * 3, describe_msgs(replies)


# PgBouncer 1.18 counts the Query PostgreSQL skipped after an extended-protocol
# error, and the idle client holds its server; it also links a server for a
# Close + Flush and holds it until the Sync.
PGBOUNCER_HOLDS = {"error-then-query-then-sync", "error-then-later-query-then-sync",
                   "pipelined-error-in-the-middle", "close-flush-then-idle"}

def _query_then_stray_copy_done(raw):
    # PostgreSQL ignores a CopyDone outside COPY.
    raw.sock.sendall(query_message("SELECT 2") + message(b"c"))
    replies = read_n_ready(raw, 1)
    assert rows_of(replies) == [["2"]] and replies[-1] == (b"Z", b"I"), describe_msgs(replies)
    assert _quiet(raw) == []


CASES = {
    "extended-then-query": _extended_then_query,
    "error-then-query-then-sync": _error_then_query_then_sync,
    "error-then-later-query-then-sync": _error_then_later_query_then_sync,
    "copy-in-extended-with-sync": _copy_in_extended_with_sync,
    "copy-in-sync-inside": _copy_in_sync_inside,
    "copy-in-extended-bad-row": _copy_in_extended_bad_row,
    "copy-in-extended-copy-fail": _copy_in_extended_copy_fail,
    "copy-in-fails-sync-inside": _copy_in_fails_sync_inside,
    "query-then-stray-copy-done": _query_then_stray_copy_done,
    "copy-in-abandoned-with-query": _copy_in_abandoned_with_query,
    "sync-only": _sync_only,
    "execute-missing-portal-then-sync": _execute_missing_portal_then_sync,
    "close-flush-then-sync": _close_flush_then_sync,
    "close-flush-then-idle": _close_flush_then_idle,
    "pipelined-error-in-the-middle": _pipelined_error_in_the_middle,
}


def _copy_table(pg):
    pg.psql("DROP TABLE IF EXISTS hold_copy; CREATE TABLE hold_copy (id int, t text);"
            " GRANT ALL ON hold_copy TO PUBLIC", dbname="app", user="app")


@pytest.mark.timeout(60)
@pytest.mark.geobouncer_only("PostgreSQL itself: the expectations of the cases below")
@pytest.mark.parametrize("case", sorted(CASES))
def test_postgres_answers_the_cases_so(pg, case):
    _copy_table(pg)
    with RawClient(pg.host, pg.port, timeout=15) as raw:
        assert raw.login("trust_user", "", "app")[-1][0] == b"Z"
        if CASES[case](raw) != "closed":
            _query_ok(raw, 6)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", [
    pytest.param(case, marks=pytest.mark.xfail(TARGET == "pgbouncer" and case in PGBOUNCER_HOLDS, strict=True,
                                               reason="PgBouncer 1.18 holds the server too"))
    for case in sorted(CASES)])
def test_one_client_does_not_hold_the_pool(pg, bouncer, case):
    """Pool of one, transaction pooling: after each case the client idles
    between requests; another client must be served meanwhile, and the first
    one must still get its own right answers."""
    _copy_table(pg)
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "default_pool_size": 1,
                           "query_wait_timeout": 5})
    with raw_login(b) as raw:
        closed = CASES[case](raw) == "closed"
        time.sleep(0.3)
        got = another_client_gets(b, "SELECT 'served', txid_current_if_assigned()")
        assert got == ("served", None), f"another client while {case}'s client idles: {got!r}"
        if not closed:
            _query_ok(raw, 6)
            CASES[case](raw)
            _query_ok(raw, 7)
    finish(b)



@pytest.mark.timeout(90)
@pytest.mark.geobouncer_only("DEALLOCATE answered by the pooler (PgBouncer 1.18 has no prepared-statement support)")
def test_large_parse_then_local_answer_does_not_pool_the_open_transaction(pg, bouncer):
    """A Parse large enough to be streamed (over 1 MiB) opens PostgreSQL's
    implicit transaction like any other and owes a Sync. A DEALLOCATE of a
    protocol-level statement, answered by the pooler, must not hand the
    server to another client meanwhile: that client would run inside the
    first one's transaction (now() from long before its statement)."""
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "default_pool_size": 1,
                           "query_wait_timeout": 20})
    big = parse("", "SELECT 'big' /* " + "x" * (3 << 19) + " */")
    with raw_login(b) as raw:
        # The named statement before it keeps every reply matched, so the
        # large Parse's ParseComplete leaves nothing queued.
        raw.sock.sendall(parse("s1", "SELECT 1") + bind("s1") + execute() + SYNC + big + FLUSH)
        replies = read_n_ready(raw, 1)
        assert rows_of(replies) == [["1"]], describe_msgs(replies)
        assert kinds(raw.read_until(b"1"))[-1:] == b"1"
        raw.sock.sendall(query_message("DEALLOCATE s1"))
        replies = read_n_ready(raw, 1)
        assert replies[-1] == (b"Z", b"I") and not errors_in(replies), describe_msgs(replies)
        time.sleep(1.0)
        other = run_in_thread(lambda: query_one(b.connect(autocommit=True, connect_timeout=10),
                                                "SELECT statement_timestamp() - now() > interval '0.5 second'"))
        time.sleep(0.5)
        raw.sock.sendall(SYNC)
        assert read_n_ready(raw, 1) == [(b"Z", b"I")]
        assert other.get(20) == (False,), "another client ran inside the first one's implicit transaction"
        _query_ok(raw, 6)
    finish(b)


SET_PATH = parse("", "SET search_path = hold_other, public") + bind("") + execute()
SET_SEQUENCES = {
    # The SET's Execute and the Sync that commits it in separate batches.
    "execute-flush-then-sync": [SET_PATH + FLUSH, SYNC],
    # A Query ends the implicit transaction, and the SET with it.
    "execute-then-query": [SET_PATH + query_message("SELECT 1")],
    "execute-flush-then-query": [SET_PATH + FLUSH, query_message("SELECT 1")],
}


@pytest.mark.timeout(60)
@pytest.mark.xfail(TARGET == "pgbouncer", strict=True, reason="PgBouncer 1.18 does not track SETs: "
                   "every SET reaches the next client in transaction pooling")
@pytest.mark.parametrize("sequence", sorted(SET_SEQUENCES))
def test_extended_set_is_not_pooled_with_the_server(pg, bouncer, sequence):
    """A SET run through the extended protocol takes effect when its implicit
    transaction ends (a Sync or a Query, maybe in a later batch). The server
    then goes back to the pool: the next client must not inherit the
    search_path, and the first one keeps it on its next transaction."""
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "default_pool_size": 1,
                           "query_wait_timeout": 5})
    with raw_login(b) as raw:
        for part in SET_SEQUENCES[sequence]:
            raw.sock.sendall(part)
            if part.endswith(FLUSH):
                assert kinds(raw.read_until(b"C"))[-3:] == b"12C"
        replies = read_n_ready(raw, 1)
        assert replies[-1] == (b"Z", b"I") and not errors_in(replies), describe_msgs(replies)
        time.sleep(0.3)
        other = run_in_thread(lambda: query_one(b.connect(autocommit=True, connect_timeout=10),
                                                "SHOW search_path"))
        assert other.get(15) == ('"$user", public',), "the next client inherited the SET"
        raw.sock.sendall(query_message("SHOW search_path"))
        replies = read_n_ready(raw, 1)
        assert rows_of(replies) == [["hold_other, public"]], describe_msgs(replies)
    finish(b)


@pytest.mark.timeout(60)
@pytest.mark.geobouncer_only("which server a session-mode client gets next (PgBouncer 1.18 does the same; "
                             "its log lines differ)")
def test_session_extended_then_query_leaves_a_reusable_server(pg, bouncer):
    """Session pooling: Parse/Bind/Execute without a Sync, then a Query, which
    ends them as a Sync would. When the client leaves, its server is reset
    and given to the next client, not closed as if it were unsynced."""
    b = bouncer(pgbouncer={"pool_mode": "session", "auth_type": "md5", "default_pool_size": 1})
    with raw_login(b) as raw:
        raw.sock.sendall(query_message("SELECT pg_backend_pid()"))
        pid = rows_of(read_n_ready(raw, 1))[0][0]
        _extended_then_query(raw)
    wait_until(lambda: "closing because: client close request" in b.log_text(), timeout=10,
               message="the client left")
    with raw_login(b) as raw:
        raw.sock.sendall(query_message("SELECT pg_backend_pid()"))
        assert rows_of(read_n_ready(raw, 1))[0][0] == pid, b.log_text()[-2000:]
