"""A server's error that arrives after the ReadyForQuery that ended its
client's transaction, in the same read (PostgreSQL terminating the idle
backend, idle_session_timeout): it belongs to no client. The client got its
whole answer and goes on; the error is not forwarded to it, and the server is
closed, never pooled (transaction pooling, where the server is released at
that ReadyForQuery).

To get the ReadyForQuery and the FATAL into one read, the pooler is stopped
(SIGSTOP) while the query runs and continued after the backend has answered
and then ended the session (idle_session_timeout set by the query itself,
through set_config, which the pooler does not track).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from _util_pool import another_client_gets, errors_in, query_message
from fixtures.pooler import TARGET
from fixtures.ports import wait_until
from test_hold_review import _quiet
from test_red_team import describe_msgs, raw_login, read_n_ready, rows_of

QUERY = "SELECT set_config('idle_session_timeout', '300', false) IS NOT NULL, pg_sleep(0.5)"


def _stopped_while(b, seconds: float) -> None:
    os.kill(b.pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(b.pid, signal.SIGCONT)


@pytest.mark.timeout(60)
@pytest.mark.xfail(TARGET == "pgbouncer", strict=True, reason=(
    "PgBouncer 1.18 forwards the error and then closes the client (server conn crashed?) when it came in "
    "the same read as the ReadyForQuery; a moment later it would have closed only the idle server"))
@pytest.mark.parametrize("protocol", ["simple", "pipelined"])
def test_fatal_after_the_last_ready_for_query_is_not_the_clients(pg, bouncer, protocol):
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "default_pool_size": 1})
    with raw_login(b) as raw:
        raw.sock.sendall(query_message("SELECT 1"))
        assert rows_of(read_n_ready(raw, 1)) == [["1"]]
        if protocol == "simple":
            raw.sock.sendall(query_message(QUERY))
        else:               # two queries in one write: the FATAL follows the second's ReadyForQuery
            raw.sock.sendall(query_message("SELECT 2") + query_message(QUERY))
        time.sleep(0.15)                     # both forwarded; pg_sleep runs
        _stopped_while(b, 1.3)               # answered at 0.5 s, FATAL 57P05 at 0.8 s
        replies = read_n_ready(raw, 1 if protocol == "simple" else 2)
        assert errors_in(replies) == [] and replies[-1] == (b"Z", b"I"), describe_msgs(replies)
        assert _quiet(raw, 0.5) == []         # nothing after it: the FATAL was not the client's
        raw.sock.sendall(query_message("SELECT 3"))
        replies = read_n_ready(raw, 1)
        assert rows_of(replies) == [["3"]] and errors_in(replies) == [], describe_msgs(replies)
        assert another_client_gets(b) == ("served",)
    if TARGET == "geobouncer":
        log = b.log_text()
        assert "closing because: server error while idle: terminating connection due to idle-session " \
               "timeout" in log, log[-3000:]
        assert "Traceback" not in log


@pytest.mark.timeout(60)
def test_fatal_while_idle_in_transaction_is_the_clients(pg, bouncer):
    """The same FATAL while the client is in a transaction (the server stays
    its own): forwarded, and the client closed, as PostgreSQL would."""
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "default_pool_size": 1})
    with raw_login(b) as raw:
        raw.sock.sendall(query_message(
            "BEGIN; SELECT set_config('idle_in_transaction_session_timeout', '300', true) IS NOT NULL, "
            "pg_sleep(0.5)"))
        time.sleep(0.15)
        _stopped_while(b, 1.3)
        replies = read_n_ready(raw, 1)
        assert replies[-1] == (b"Z", b"T"), describe_msgs(replies)
        raw.sock.settimeout(10)
        rest = raw.read_until_close()
        errors = errors_in(rest)
        assert errors and errors[0].get("S") == "FATAL", describe_msgs(rest)
    wait_until(lambda: another_client_gets(b) == ("served",), timeout=10, message="the pool serves again")
