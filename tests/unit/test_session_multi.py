"""What stays of the SETs in a query text of several statements
(pool/session_multi.py through net/params.py's query_change), and which texts
the hot path must read (MAY_SET_LATER). PostgreSQL's own behaviour for these
shapes is checked in tests/integration/test_multi_sets.py."""

from __future__ import annotations

import pytest

from geobouncer.net.params import MAY_SET_LATER, needs_inspection, query_change
from geobouncer.pool import session_multi, session_state
from geobouncer.pool.session_multi import Script


def script(text: str):
    change = query_change(text.encode())
    assert change is None or type(change) is Script, change
    return None if change is None else (change.changes, change.status)


@pytest.mark.parametrize("text, want", [
    ("SET search_path = s1; SELECT 1", ((("set", "search_path", "'s1'"),), b"I")),
    ("SELECT 1; SET app.x = 'v'", ((("set", "app.x", "'v'"),), b"I")),
    ("SET a.b = '1'; SET a.c = 2", ((("set", "a.b", "'1'"), ("set", "a.c", "2")), b"I")),
    ("BEGIN; SET x.y = 1; COMMIT", ((("set", "x.y", "1"),), b"I")),
    ("START TRANSACTION; SET x.y = -1.5; END", ((("set", "x.y", "-1.5"),), b"I")),
    # the last change of a name wins; RESET ALL first drops what came before
    ("SET x.y = 1; SET x.y = 2; RESET x.z", ((("set", "x.y", "2"), ("reset", "x.z")), b"I")),
    ("SET x.y = 1; RESET ALL; SET x.z TO DEFAULT", ((("reset_all",), ("reset", "x.z")), b"I")),
    ("SELECT 1; DISCARD ALL", ((("reset_all",),), b"I")),
    # committed before a block that is left open: that block is the server's status T
    ("SET x.y = 1; COMMIT; SET x.z = 2; BEGIN; SET x.w = 3", ((("set", "x.y", "1"),), b"T")),
    ("BEGIN; SAVEPOINT p; SET x.y = 1; ROLLBACK TO p; SET x.z = 2; RELEASE p; COMMIT",
     ((("set", "x.z", "2"),), b"I")),
    ("BEGIN; SAVEPOINT p; SAVEPOINT q; SET x.y = 1; RELEASE p; COMMIT", ((("set", "x.y", "1"),), b"I")),
    ("SELECT 1; SET search_path = $$a;b$$, \"My S\", 'it''s'",
     ((("set", "search_path", "'a;b', 'My S', 'it''s'"),), b"I")),
    ("SELECT 1; SET x.y = E'a\\\\b'", ((("set", "x.y", "E'a\\\\b'"),), b"I")),
    # comments never reach the replayed value
    ("SET x.y = 1 -- why", ((("set", "x.y", "1"),), b"I")),
    ("/* c */ SET x.y = 1", ((("set", "x.y", "1"),), b"I")),
    ("SELECT 1; /* c */ SET x.y = 'v' -- d", ((("set", "x.y", "'v'"),), b"I")),
])
def test_what_stays(text, want):
    assert script(text) == want


@pytest.mark.parametrize("text", [
    "SET x.y = 1; ROLLBACK",                          # the implicit transaction is rolled back
    "BEGIN; SET x.y = 1",                             # left to a later COMMIT: not followed
    "SET x.y = 1; BEGIN",                             # BEGIN takes the SET into its block
    "SET LOCAL x.y = 1; SELECT 1",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; SELECT 1",
    "SET x.y FROM CURRENT; SELECT 1",
    "BEGIN; SAVEPOINT p; SET x.y = 1; ROLLBACK TO p; COMMIT",
    "SAVEPOINT p; SET x.y = 1",                       # fails outside a block
    "BEGIN; SET x.y = 1; RELEASE nope; COMMIT",       # fails: no such savepoint
    "SELECT 1; SET x.y = (",                          # does not parse
    "SELECT ';set x.y = 1'",
    "SELECT 1; SELECT 2",
])
def test_nothing_stays(text):
    assert script(text) is None


@pytest.mark.parametrize("text", [
    "COMMIT AND CHAIN; SET x.y = 1",
    "BEGIN; SET search_path = s1; COMMIT AND CHAIN; COMMIT",
    "SET x.y = 1; PREPARE TRANSACTION 'g'",
])
def test_not_followed_is_unknown(text):
    """Statements whose effect on the session is not followed: UNKNOWN, so
    the server is not reused after them (net/params.py)."""
    assert query_change(text.encode()) is session_multi.UNKNOWN


@pytest.mark.parametrize("text, uncertain", [
    ("SET search_path = s1; COMMIT; SELECT 1/0", True),     # an error after the COMMIT keeps s1
    ("SET x.y = 1; COMMIT; RESET x.y; SELECT 1", True),     # nothing net, but an error keeps x.y = 1
    ("BEGIN; SET x.y = 1; COMMIT; SELECT 1", True),
    ("SET search_path = s1; SELECT 1/0", False),            # one transaction: an error keeps nothing
    ("BEGIN; SET x.y = 1; COMMIT", False),                  # the COMMIT is the last statement
    ("SELECT 1; SET x.y = 2", False),
])
def test_uncertain_when_an_error_may_keep_a_commit(text, uncertain):
    change = query_change(text.encode())
    assert type(change) is Script and change.uncertain is uncertain


def test_one_set_keeps_the_one_statement_parser():
    """The common case does not parse with pglast: its raw value is replayed as written."""
    assert query_change(b"SET search_path = s1, public") == ("set", "search_path", "s1, public")
    assert query_change(b"SET x.y TO 'a;b';") == ("set", "x.y", "'a;b'")
    assert query_change(b"RESET ALL") == ("reset_all",)
    assert session_state.parse("SET x.y = 1 -- c") is None      # a comment: the parsed way


def test_script_values_replay():
    changes = script("SELECT 1; SET search_path = 'My S', x; SET x.y = 42")[0]
    sets: dict = {}
    for change in changes:
        session_state.apply(sets, change)
    assert session_state.sync_sql(sets, {}) == "SET \"search_path\" = 'My S', 'x';SET \"x\".\"y\" = 42"


def test_parsed_texts_are_cached_and_bounded():
    session_multi._cache.clear()
    first = session_multi.parse("SELECT 0; SET x.y = 0")
    assert session_multi.parse("SELECT 0; SET x.y = 0") is first
    for i in range(session_multi._CACHE_SIZE + 10):
        session_multi.parse(f"SELECT {i}; SET x.y = 1")
    assert len(session_multi._cache) == session_multi._CACHE_SIZE
    assert "SELECT 0; SET x.y = 0" not in session_multi._cache


@pytest.mark.parametrize("text, read", [
    (b"SELECT 1; SET x.y = 1", True),
    (b"SELECT 1;\n\tset x.y = 1", True),
    (b"BEGIN;reset x.y", True),
    (b"SELECT 1; -- c\n /* d */ DISCARD ALL", True),
    (b"SELECT 1; SELECT 2", False),
    (b"UPDATE t SET a = 1;", False),
    (b"UPDATE t SET a = 1; UPDATE t SET b = 2", False),
    (b"SELECT 1", False),
])
def test_which_texts_the_hot_path_reads(text, read):
    """needs_inspection looks at the head only; MAY_SET_LATER catches a SET after it."""
    assert (needs_inspection(text[:3]) or MAY_SET_LATER.search(text) is not None) is read


def test_hostile_texts_stay_linear():
    """Semicolons and comment openers by the thousand: the hot path's test is
    one pass (a regex with a repeated group took seconds here), and a long
    text is not parsed at all."""
    import time
    started = time.perf_counter()
    for text in (b"; /*" * 25000, b"; --" * 25000, b";" * 100000, b";" + b" " * 100000):
        MAY_SET_LATER.search(text)
        query_change(b"SET x.y = 1" + text)
    assert time.perf_counter() - started < 1.0
    long_text = "SET x.y = 1; SELECT 1" + " " * session_multi._LONG
    assert session_multi.parse(long_text) is None and long_text not in session_multi._cache
