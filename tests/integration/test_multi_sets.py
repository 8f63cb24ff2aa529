"""SETs inside a simple Query of several statements ("SET search_path = s1;
SELECT 1", "BEGIN; SET x = 1; COMMIT", with errors, ROLLBACK, SAVEPOINTs,
SET LOCAL, RESET ALL, comments) are remembered under transaction pooling
exactly as far as PostgreSQL keeps them (pool/session_multi.py).

Each case runs on a direct connection (the oracle) and through geobouncer,
where the client is then forced onto the other of the pool's two servers:
one holder keeps the server it ran on busy, so the settings it reads there
come from what geobouncer replayed, and must equal the direct connection's.
"""

from __future__ import annotations

import psycopg
import psycopg2
import pytest

pytestmark = pytest.mark.geobouncer_only("SETs remembered per client in transaction mode")

SETTINGS = ("search_path", "work_mem", "statement_timeout", "lock_timeout", "application_name")
READ = "SELECT pg_backend_pid(), " + ", ".join(f"current_setting('{name}')" for name in SETTINGS)
APP = "gbmulti"

# (case, SETs run first one by one, the text, a follow-up query or None, settings it must leave)
CASES = [
    ("set then select", [], "SET search_path = s1; SELECT 1", None, {"search_path": "s1"}),
    ("select then set", [], "SELECT 1; SET work_mem = '3MB'", None, {"work_mem": "3MB"}),
    ("two sets", [], "SET work_mem = '5MB'; SET lock_timeout = '7s'", None,
     {"work_mem": "5MB", "lock_timeout": "7s"}),
    ("explicit block committed", [], "BEGIN; SET statement_timeout = '11s'; COMMIT", None,
     {"statement_timeout": "11s"}),
    ("an error drops every SET of the text", ["SET work_mem = '2MB'"],
     "SET work_mem = '6MB'; SET search_path = s9; SELECT 1/0", None, {"work_mem": "2MB"}),
    ("ROLLBACK in the text", [], "SET lock_timeout = '4s'; ROLLBACK", None, {"lock_timeout": "0"}),
    ("SET LOCAL", ["SET work_mem = '2MB'"], "SET LOCAL work_mem = '8MB'; SELECT 1", None,
     {"work_mem": "2MB"}),
    ("ROLLBACK TO a savepoint", [],
     "BEGIN; SAVEPOINT p; SET work_mem = '9MB'; ROLLBACK TO p; SET lock_timeout = '12s'; COMMIT", None,
     {"lock_timeout": "12s"}),
    ("committed, then a block left open and rolled back", [],
     "SET work_mem = '4MB'; COMMIT; SET lock_timeout = '5s'; BEGIN; SET statement_timeout = '6s'",
     "ROLLBACK", {"work_mem": "4MB", "lock_timeout": "0", "statement_timeout": "0"}),
    ("a failed explicit block", ["SET work_mem = '2MB'"],
     "BEGIN; SET work_mem = '9MB'; SELECT 1/0; COMMIT", "ROLLBACK", {"work_mem": "2MB"}),
    ("RESET in the text", ["SET work_mem = '2MB'", "SET search_path = s3"], "SELECT 1; RESET work_mem", None,
     {"search_path": "s3"}),
    ("RESET ALL, then SETs", ["SET work_mem = '2MB'", "SET application_name = 'changed'"],
     "RESET ALL; SET search_path = s4; SET application_name = 'after'", None,
     {"search_path": "s4", "application_name": "after"}),
    ("comments", [], "SELECT 1; -- a note; SET work_mem = '1MB'\n SET lock_timeout = '13s' /* c */", None,
     {"lock_timeout": "13s"}),
    ("quoted values", [], "SELECT 1; SET search_path = $$s5$$, \"My S\"", None,
     {"search_path": 's5, "My S"'}),
    ("one SET with a trailing comment", ["SET lock_timeout = '2s'"], "SET search_path = s6 -- why", None,
     {"search_path": "s6", "lock_timeout": "2s"}),
]


def _run(conn, text: str):
    with conn.cursor() as cur:
        try:
            cur.execute(text)
        except (psycopg2.Error, psycopg.Error):
            return "error"
        return cur.fetchall() if cur.description else None


def _begin(conn) -> int:
    """Open a transaction on whichever server the pool gives: its backend pid."""
    with conn.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("SELECT pg_backend_pid()")
        return cur.fetchone()[0]


def _case(connect, before, text, follow):
    conn = connect()
    for query in before:
        assert _run(conn, query) is None, query
    outcome = _run(conn, text)
    if follow is not None:
        _run(conn, follow)
    return conn, outcome


def _through_pooler_moved(b, before, text, follow, connect=None):
    """Run the case through ``b`` (2 servers), then read the settings on the
    other server: (pid it ran on, pid held, pid read on, outcome, settings)."""
    holders = [b.connect(autocommit=True) for _ in range(2)]
    try:
        busy = _begin(holders[0])                 # X: the case runs on the other one, Y
        client = connect() if connect else b.connect(autocommit=True, application_name=APP)
        _run(client, "SELECT 1")     # parked after it: what follows is read from the hub (net/inline.py)
        for query in before:
            assert _run(client, query) is None, query
        outcome = _run(client, text)
        if follow is not None:
            _run(client, follow)
        ran_on = _run(client, "SELECT pg_backend_pid()")[0][0]
        _run(holders[0], "COMMIT")
        if _begin(holders[0]) != ran_on:          # holders[0] got X back: hold Y instead, free X
            assert _begin(holders[1]) == ran_on
            _run(holders[0], "COMMIT")
        row = _run(client, READ)[0]
        client.close()
        return ran_on, busy, row[0], outcome, dict(zip(SETTINGS, row[1:]))
    finally:
        for holder in holders:
            _run(holder, "COMMIT")      # a server closed in a transaction would be dropped
            holder.close()


def test_sets_in_multi_statement_queries_follow_the_client(pg, bouncer):
    b = bouncer(pgbouncer={"pool_mode": "transaction", "default_pool_size": 2, "auth_type": "md5"})
    failures = []
    for name, before, text, follow, expected in CASES:
        direct, direct_outcome = _case(lambda: pg.connect("app", "app", application_name=APP),
                                       before, text, follow)
        with direct.cursor() as cur:
            cur.execute(READ)
            want = dict(zip(SETTINGS, cur.fetchone()[1:]))
        direct.close()
        for key, value in expected.items():      # the case shows what it means to
            assert want[key] == value, f"{name}: PostgreSQL itself gives {key} = {want[key]!r}"
        ran_on, busy, read_on, outcome, got = _through_pooler_moved(b, before, text, follow)
        assert ran_on != busy and read_on == busy, f"{name}: not moved ({ran_on}, {busy}, {read_on})"
        assert (outcome == "error") == (direct_outcome == "error"), name
        if got != want:
            failures.append(f"{name}: {text!r}: through geobouncer {got}, directly {want}")
    assert not failures, "\n".join(failures)


def test_plain_multi_statement_query_is_untouched(pg, bouncer):
    """A text that only looks like it might SET ("SELECT ';set'") runs as sent."""
    b = bouncer(pgbouncer={"pool_mode": "transaction", "default_pool_size": 2, "auth_type": "md5"})
    conn = b.connect(autocommit=True)
    try:
        assert _run(conn, "SELECT 1; SELECT ';set x = 1', '; reset'") == [(";set x = 1", "; reset")]
        assert _run(conn, "SELECT current_setting('work_mem') = setting FROM pg_settings"
                          " WHERE name = 'work_mem'; SELECT 2") == [(2,)]
    finally:
        conn.close()


def test_extended_protocol_set_with_a_comment(pg, bouncer):
    """A named prepared SET with a comment (psycopg 3, prepare_threshold=0): read
    with the parser, so the comment does not enter the replayed value; a Parse of
    two statements fails on the server and changes nothing."""
    b = bouncer(pgbouncer={"pool_mode": "transaction", "default_pool_size": 2, "auth_type": "md5",
                           "max_prepared_statements": 10})

    def connect():
        return psycopg.connect(b.dsn(), autocommit=True, prepare_threshold=0, application_name=APP)

    cases = [([], "SET lock_timeout = '4s' /* c */", {"lock_timeout": "4s"}),
             # replayed together: a comment kept in the first value would swallow the second
             (["SET work_mem = '3MB' -- why"], "SET lock_timeout = '4s'",
              {"work_mem": "3MB", "lock_timeout": "4s"}),
             ([], "SET work_mem = '5MB'; SELECT 1", {"work_mem": "4MB"})]
    for before, text, want in cases:
        ran_on, busy, read_on, outcome, got = _through_pooler_moved(b, before, text, None, connect)
        assert ran_on != busy and read_on == busy, (text, ran_on, busy, read_on)
        assert (outcome == "error") == (";" in text), (text, outcome)
        assert {key: got[key] for key in want} == want, (before, text, got)


def test_set_after_a_select_read_from_the_hub(pg, bouncer):
    """"SELECT 1; SET ..." from a parked client whose server is idle and in line
    with it: net/inline.py would send it from the hub unread; it must go to the
    greenlet, which reads it (a fresh pool, so the case runs on a server
    carrying no other client's SETs)."""
    b = bouncer(pgbouncer={"pool_mode": "transaction", "default_pool_size": 2, "auth_type": "md5"})
    ran_on, busy, read_on, outcome, got = _through_pooler_moved(
        b, [], "SELECT 1; SET work_mem = '3MB'", None)
    assert ran_on != busy and read_on == busy and outcome is None, (ran_on, busy, outcome)
    assert got["work_mem"] == "3MB", got
