"""server_fast_close: in session pooling, a server marked for reconnect
(RECONNECT) is closed once its client is between transactions, and the client
with it (FATAL "database configuration changed"), instead of at the session's
end. Without the setting the session goes on. PgBouncer 1.18 has the setting."""

from __future__ import annotations

import time

import pytest
from _util_pool import errors_in, query_message, query_one
from fixtures.ports import wait_until
from test_red_team import raw_login, read_n_ready, rows_of


def _bouncer(bouncer, fast: int):
    return bouncer(pgbouncer={"pool_mode": "session", "auth_type": "md5", "server_fast_close": fast})


def _backend_pid(raw) -> int:
    raw.sock.sendall(query_message("SELECT pg_backend_pid()"))
    return int(rows_of(read_n_ready(raw, 1))[0][0])


@pytest.mark.timeout(60)
def test_idle_session_is_closed_after_reconnect(pg, bouncer):
    b = _bouncer(bouncer, 1)
    with raw_login(b) as raw:
        pid = _backend_pid(raw)
        b.admin("RECONNECT app")
        raw.sock.settimeout(10)
        msgs = raw.read_until_close()
        errors = errors_in(msgs)
        assert [(e.get("S"), e.get("M")) for e in errors] == [("FATAL", "database configuration changed")], msgs
    wait_until(lambda: pid not in [r[0] for r in pg.psql("SELECT pid FROM pg_stat_activity")], timeout=10,
               message="its backend ended")
    conn = b.connect(autocommit=True)
    try:
        assert query_one(conn, "SELECT pg_backend_pid()")[0] != pid
    finally:
        conn.close()


@pytest.mark.timeout(60)
def test_a_transaction_is_not_cut_short(pg, bouncer):
    b = _bouncer(bouncer, 1)
    with raw_login(b) as raw:
        raw.sock.sendall(query_message("BEGIN"))
        assert read_n_ready(raw, 1)[-1] == (b"Z", b"T")
        b.admin("RECONNECT app")
        time.sleep(2.5)                               # janitor rounds: in a transaction, kept
        raw.sock.sendall(query_message("SELECT 5"))
        replies = read_n_ready(raw, 1)
        assert rows_of(replies) == [["5"]] and replies[-1] == (b"Z", b"T"), replies
        raw.sock.sendall(query_message("COMMIT"))
        assert read_n_ready(raw, 1)[-1] == (b"Z", b"I")
        raw.sock.settimeout(10)
        errors = errors_in(raw.read_until_close())     # then closed
        assert [e.get("M") for e in errors] == ["database configuration changed"], errors


@pytest.mark.timeout(60)
def test_without_it_the_session_goes_on(pg, bouncer):
    b = _bouncer(bouncer, 0)
    with raw_login(b) as raw:
        pid = _backend_pid(raw)
        b.admin("RECONNECT app")
        time.sleep(2.5)
        assert _backend_pid(raw) == pid
