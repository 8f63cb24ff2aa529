"""Hostile SET texts against the remembered-SET replay (pool/session_state.py,
pool/session_multi.py, net/params.py): a client's SET is replayed by the
pooler on the next server it lands on; the replayed text must set exactly
what PostgreSQL set on the first server, and nothing else.

Each test uses one server (default_pool_size 1) and a second client to move
the server's state between the attacker's queries, then reads what the
attacker's session really holds.
"""

from __future__ import annotations

import psycopg2
import pytest

pytestmark = [pytest.mark.geobouncer_only("SETs remembered per client in transaction mode"),
              pytest.mark.timeout(60)]

POOL = {"pool_mode": "transaction", "default_pool_size": 1, "auth_type": "md5"}


def _one(conn, sql: str):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall() if cur.description else None


def _settings(conn, *names: str) -> dict:
    row = _one(conn, "SELECT " + ", ".join(f"current_setting('{n}', true)" for n in names))[0]
    return dict(zip(names, row))


def _other_client_passes(b, *sql: str) -> None:
    """Another client takes the pool's one server (the attacker's remembered SETs
    are RESET for it), runs ``sql``, leaves."""
    other = b.connect(autocommit=True)
    try:
        for text in sql:
            _one(other, text)
    finally:
        other.close()


def test_dollar_quoted_value_replays_only_the_set(pg, bouncer):
    """"SET x.y = $$'$$; SET lock_timeout = 9000; SELECT $$'$$" is three
    statements; the one-statement reader's quote stripping took the dollar
    quotes for nothing and the quotes inside them for strings, so it kept the
    whole tail as x.y's raw value, and every replay ran the hidden SET again."""
    b = bouncer(pgbouncer=POOL)
    attacker = b.connect(autocommit=True)
    try:
        _one(attacker, "SET x.y = $$'$$; SET lock_timeout = 9000; SELECT $$'$$")
        _one(attacker, "RESET lock_timeout")
        assert _settings(attacker, "x.y", "lock_timeout") == {"x.y": "'", "lock_timeout": "0"}
        _other_client_passes(b, "SELECT 1")
        assert _settings(attacker, "x.y", "lock_timeout") == {"x.y": "'", "lock_timeout": "0"}
    finally:
        attacker.close()


def test_backslash_value_replayed_under_standard_conforming_strings_off(pg, bouncer):
    """One SET under standard_conforming_strings on, whose raw text reads as a
    SET and a second statement with it off. The replay is parsed whole by
    PostgreSQL with the server's current setting (another client's off), its
    "SET standard_conforming_strings" first only runs after that parse."""
    b = bouncer(pgbouncer=POOL)
    attacker = b.connect(autocommit=True)
    try:
        _one(attacker, "SET x.y = '\\'\n';SET lock_timeout = 9000;--'")
        want = {"x.y": "\\;SET lock_timeout = 9000;--", "lock_timeout": "0"}
        assert _settings(attacker, "x.y", "lock_timeout") == want
        _other_client_passes(b, "SET standard_conforming_strings = off")
        assert _settings(attacker, "x.y", "lock_timeout") == want
    finally:
        attacker.close()


def test_no_traceback_for_hostile_sets(pg, bouncer):
    b = bouncer(pgbouncer=POOL)
    conn = b.connect(autocommit=True)
    try:
        for text in ["SET x.y = $$'$$; SELECT $$'$$", "SET x.y = E'\\'' ; SELECT 1",
                     "SET x.y = U&'\\0027'; SELECT 1", "SET \"x.y\" = 'a'; SELECT 1",
                     "SELECT 1;" + "(" * 3000, "SET x.y = 1;" * 300, ";" * 4000 + "SET x.y = 1"]:
            try:
                _one(conn, text)
            except psycopg2.Error:
                pass
        _other_client_passes(b, "SELECT 1")
        assert _one(conn, "SELECT 1") == [(1,)]
    finally:
        conn.close()
    assert "Traceback" not in b.log_text() and "Traceback" not in b.output_text()


def test_startup_search_path_with_a_backslash(pg, bouncer):
    """A tracked startup parameter the server does not report (x.y here) is
    replayed with set_config and a literal: a plain '...' with a backslash reads
    differently when the replaying server has standard_conforming_strings off."""
    from _util_pool import RawClient, query_message
    b = bouncer(pgbouncer={**POOL, "track_extra_parameters": "x.y"})
    value = "\\';SET lock_timeout = 9000;--"
    raw = RawClient(b.host, b.port)
    try:
        assert raw.login("app", b.userlist["app"], "app", {"x.y": value})[-1][0] == b"Z"
        _other_client_passes(b, "SET standard_conforming_strings = off")
        raw.send(query_message("SELECT current_setting('x.y'), current_setting('lock_timeout')"))
        rows = [body for mtype, body in raw.read_until(b"Z") if mtype == b"D"]
        assert len(rows) == 1 and b"9s" not in rows[0] and value.encode() in rows[0], rows
    finally:
        raw.close()


def test_quoted_names_replay_as_the_same_parameter(pg, bouncer):
    """x."select" is a valid parameter name only quoted; "x.Ä" and "x.ä" are two
    parameters (PostgreSQL folds ASCII only). The replay must name the same
    parameter, else it fails on every server the client moves to (each one closed)."""
    b = bouncer(pgbouncer=POOL)
    attacker = b.connect(autocommit=True)
    try:
        _one(attacker, "SET x.\"select\" = 'k'; SET \"x.Ä\" = 'upper'; SET \"x.ä\" = 'lower'; SELECT 1")
        want = {"x.select": "k", "x.Ä": "upper", "x.ä": "lower"}
        assert _settings(attacker, *want) == want
        _other_client_passes(b, "SELECT 1")
        assert _settings(attacker, *want) == want
    finally:
        attacker.close()
    assert "parameter sync failed" not in b.log_text()


def test_backslash_literal_under_standard_conforming_strings_off(pg, bouncer):
    """With standard_conforming_strings off, 'a\\\\b' is a\\b to PostgreSQL, but
    a\\\\b to pglast (always on): the replay must not give the client a value it
    never set. Such a text is not remembered (the setting is lost on a move and
    stays on its server, as any SET the pooler cannot read), never misread."""
    from test_multi_sets import _through_pooler_moved
    for text in ["SET search_path = 'a\\\\b'; SELECT 1", "SET search_path = 'a\\\\b'",
                 "SET application_name = 'x\\'; SET work_mem = 9000; --'"]:
        b = bouncer(pgbouncer={**POOL, "default_pool_size": 2})    # a SET not remembered stays on its server
        ran_on, busy, read_on, outcome, got = _through_pooler_moved(
            b, ["SET standard_conforming_strings = off"], text, None)
        assert ran_on != busy and read_on == busy and outcome != "error", (text, outcome)
        direct = pg.connect("app", "app")
        direct.autocommit = True
        _one(direct, "SET standard_conforming_strings = off")
        _one(direct, text)
        want = _settings(direct, "search_path", "work_mem")
        direct.close()
        assert (got["search_path"], got["work_mem"]) in (
            (want["search_path"], want["work_mem"]), ('"$user", public', "4MB")), (text, got, want)


@pytest.mark.parametrize("text", ["SET search_path = 'caf\xe9'; SELECT 1", "SET search_path = 'caf\xe9'"])
def test_latin1_value_follows_the_client(pg, bouncer, text):
    """A client with client_encoding LATIN1: its bytes are LATIN1, not UTF-8."""
    from test_multi_sets import _through_pooler_moved
    b = bouncer(pgbouncer={**POOL, "default_pool_size": 2})

    def connect():
        conn = psycopg2.connect(b.dsn(application_name="gbmulti", client_encoding="LATIN1"))
        conn.autocommit = True
        return conn
    ran_on, busy, read_on, outcome, got = _through_pooler_moved(b, [], text, None, connect)
    assert ran_on != busy and read_on == busy and outcome != "error", (text, outcome)
    assert got["search_path"] in ('"caf\xe9"', '"$user", public'), got


HOSTILE_CASES = [
    ("SET before BEGIN joins the block", [], "SET work_mem = '5MB'; BEGIN; COMMIT", None),
    ("RELEASE keeps the SET", [], "BEGIN; SAVEPOINT a; SET work_mem = '5MB'; RELEASE a; COMMIT", None),
    ("a repeated savepoint name", [],
     "BEGIN; SAVEPOINT a; SET lock_timeout = '3s'; SAVEPOINT a; SET work_mem = '5MB'; ROLLBACK TO a; COMMIT", None),
    ("RELEASE of an outer savepoint drops the inner", [],
     "BEGIN; SAVEPOINT a; SET work_mem = '5MB'; SAVEPOINT b; RELEASE a; ROLLBACK TO b", "ROLLBACK"),
    ("a quoted savepoint name", [], "BEGIN; SAVEPOINT \"A\"; SET work_mem = '5MB'; ROLLBACK TO a; COMMIT", "ROLLBACK"),
    ("COMMIT, then an implicit transaction rolled back", [],
     "SET work_mem = '5MB'; COMMIT; SET lock_timeout = '3s'; ROLLBACK", None),
    ("DISCARD ALL among statements fails", ["SET work_mem = '2MB'"], "SELECT 1; DISCARD ALL", None),
    ("SET TO DEFAULT", ["SET work_mem = '2MB'"], "SELECT 1; SET work_mem TO DEFAULT", None),
    ("SET SESSION", [], "SELECT 1; SET SESSION work_mem = '6MB'", None),
    ("RESET ALL rolled back", ["SET work_mem = '2MB'"], "BEGIN; RESET ALL; ROLLBACK", None),
    ("a backslash in an E'' value", [], "SELECT 1; SET search_path = E'a\\\\b', \"c\"\"d\"", None),
    ("a Unicode escape", [], "SELECT 1; SET search_path = U&'d\\0061t\\+000061'", None),
    ("a quote in a dollar quote", [], "SELECT 1; SET search_path = $q$it's$q$", None),
    ("a long name truncated", [], "SELECT 1; SET search_path = " + "s" * 70, None),
]


@pytest.mark.parametrize("name,before,text,follow", HOSTILE_CASES, ids=[c[0] for c in HOSTILE_CASES])
def test_hostile_texts_follow_the_client(pg, bouncer, name, before, text, follow):
    """As test_multi_sets: PostgreSQL on a direct connection is the oracle."""
    from test_multi_sets import APP, READ, SETTINGS, _case, _through_pooler_moved
    direct, direct_outcome = _case(lambda: pg.connect("app", "app", application_name=APP), before, text, follow)
    want = dict(zip(SETTINGS, _one(direct, READ)[0][1:]))
    direct.close()
    b = bouncer(pgbouncer={**POOL, "default_pool_size": 2})
    ran_on, busy, read_on, outcome, got = _through_pooler_moved(b, before, text, follow)
    assert ran_on != busy and read_on == busy, (ran_on, busy, read_on)
    assert (outcome == "error") == (direct_outcome == "error")
    assert got == want


@pytest.mark.parametrize("text,expected_error", [
    ("SET search_path = s1; SELECT 1", False),
    ("SET search_path = s1; SELECT 1/0", True),
    ("SET search_path = s1; COMMIT; SELECT 1/0", True),        # PostgreSQL keeps s1: the server goes
    ("BEGIN; SET search_path = s1; COMMIT AND CHAIN; COMMIT", False),    # not followed: the server goes
])
def test_one_clients_set_never_reaches_the_next(pg, bouncer, text, expected_error):
    b = bouncer(pgbouncer=POOL)
    first = b.connect(autocommit=True)
    try:
        try:
            _one(first, text)
            failed = False
        except psycopg2.Error:
            failed = True
        assert failed == expected_error
        second = b.connect(autocommit=True)
        try:
            assert _settings(second, "search_path")["search_path"] == '"$user", public'
        finally:
            second.close()
    finally:
        first.close()


def test_a_text_that_may_keep_part_of_itself_costs_its_server_only_when_it_fails(pg, bouncer):
    """SET; COMMIT; then a statement: when that statement fails, PostgreSQL keeps
    the committed SET and the pooler cannot tell from the reply, so the server
    is closed, not handed on; when the text succeeds the server stays."""
    b = bouncer(pgbouncer=POOL)
    first = b.connect(autocommit=True)
    try:
        pid = _one(first, "SELECT pg_backend_pid()")[0][0]
        _one(first, "SET search_path = s1; COMMIT; SELECT 1")
        assert _one(first, "SELECT pg_backend_pid()")[0][0] == pid          # kept
        assert _settings(first, "search_path")["search_path"] == "s1"
        with pytest.raises(psycopg2.Error):
            _one(first, "SET search_path = s2; COMMIT; SELECT 1/0")
        other = b.connect(autocommit=True)
        try:
            assert _one(other, "SELECT pg_backend_pid()")[0][0] != pid      # closed, not reused
            assert _settings(other, "search_path")["search_path"] == '"$user", public'
        finally:
            other.close()
    finally:
        first.close()
