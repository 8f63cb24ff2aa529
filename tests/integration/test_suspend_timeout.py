"""SUSPEND's suspend_timeout: a server still busy when it runs out is closed,
and its client is told with PgBouncer's FATAL (08P01 ``suspend_timeout``),
never left with a bare EOF.

PgBouncer 1.18 closes such a client at once, writing the error after whatever
of the reply its socket had taken, inside a message if need be (when the
socket has room for it at all). geobouncer writes it at the next message
boundary: the message under way is let through first, then the server closes
(net/last_words.py).
"""

from __future__ import annotations

import threading
import time

import pytest
from _util_pool import RawClient, errors_in, parse_error_fields, query_message
from test_reader_hostile import ROW, TINY, read_all, split_messages, tiny_client, unix_databases
from test_red_team import finish

APP = ("app", "app_pw", "app")


def suspend_error(messages) -> dict:
    errors = errors_in(messages)
    assert len(errors) == 1, messages[-3:]
    return errors[0]


def stuff_the_server(raw: RawClient) -> None:
    """A long query, then megabytes of requests behind it until every buffer on
    the way is full: the client's greenlet in the pooler is left blocked
    writing to the server's socket."""
    raw.send(query_message("SELECT pg_sleep(3)"))
    big = query_message("SELECT '" + "y" * (1 << 20) + "'")
    raw.sock.settimeout(0.5)
    try:
        for _ in range(64):
            raw.sock.sendall(big)
    except (TimeoutError, OSError):
        pass
    raw.sock.settimeout(20)


@pytest.mark.timeout(60)
def test_suspend_timeout_tells_a_client_whose_requests_the_server_is_not_reading(pg, bouncer):
    """SUSPEND cannot flush such a server: at suspend_timeout the client gets
    the FATAL and EOF (its socket has room: it is the one sending). Closing
    that server must not write a Terminate to its full socket (the SUSPEND
    failed with gevent's concurrent-use error when it did)."""
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "suspend_timeout": 1})
    raw = RawClient(b.host, b.port, timeout=20)
    try:
        assert raw.login(*APP)[-1][0] == b"Z"
        stuff_the_server(raw)
        started = time.monotonic()
        b.admin("SUSPEND")
        assert time.monotonic() - started >= 0.9, "SUSPEND did not wait for the busy server"
        messages, tail = split_messages(read_all(raw))
    finally:
        raw.close()
    assert tail == b"" and [t for t, _ in messages] == [b"E"], (messages, tail[:40])
    error = suspend_error(messages)
    assert (error["S"], error["C"], error["M"]) == ("FATAL", "08P01", "suspend_timeout"), error
    finish(b)


@pytest.mark.timeout(60)
def test_query_timeout_closes_a_server_whose_socket_is_full(pg, bouncer):
    """The same stuffed server, closed by the janitor's query_timeout: the
    client gets its FATAL, and the janitor is not left writing a Terminate
    to the full socket (nor failing on it)."""
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "query_timeout": 1})
    raw = RawClient(b.host, b.port, timeout=20)
    try:
        assert raw.login(*APP)[-1][0] == b"Z"
        stuff_the_server(raw)
        messages, tail = split_messages(read_all(raw))
    finally:
        raw.close()
    assert tail == b"" and [t for t, _ in messages] == [b"E"], (messages, tail[:40])
    error = suspend_error(messages)
    assert (error["S"], error["C"], error["M"]) == ("FATAL", "08P01", "query timeout"), error
    finish(b)


@pytest.mark.timeout(60)
@pytest.mark.geobouncer_only("PgBouncer 1.18 writes the suspend_timeout error inside the message under way")
def test_suspend_timeout_lets_a_slow_reader_end_the_message_then_sends_the_fatal(pg, bouncer):
    """A NOTICE is half written to a client that is not reading when
    suspend_timeout runs out; it reads a little later. It gets the whole
    NOTICE, then the FATAL, then EOF, and the server is closed (it was busy:
    its DO block still sleeps). The server used to be closed at once: the
    client saw the NOTICE cut short and EOF."""
    b = bouncer(databases=unix_databases(pg), pgbouncer={**TINY, "suspend_timeout": 1})
    raw = tiny_client(b)
    got: dict = {}

    def slow_reader():
        time.sleep(1.6)                   # SUSPEND at 0.5 s, its timeout at 1.5 s
        got["data"] = read_all(raw)

    try:
        raw.send(query_message(f"DO $$ BEGIN RAISE NOTICE '%', repeat('n', {ROW}); "
                               "PERFORM pg_sleep(4); END $$"))
        reader = threading.Thread(target=slow_reader)
        reader.start()
        time.sleep(0.5)                   # the NOTICE is read, the client took part of it
        b.admin("SUSPEND")                # RESUME as the console leaves
        reader.join(30)
    finally:
        raw.close()
    messages, tail = split_messages(got["data"])
    assert [t for t, _ in messages] == [b"N", b"E"] and tail == b"", (messages[-2:], tail[:60])
    assert parse_error_fields(messages[0][1])["M"] == "n" * ROW
    error = suspend_error(messages[1:])
    assert (error["S"], error["C"], error["M"]) == ("FATAL", "08P01", "suspend_timeout"), error
    assert "closing because: suspend_timeout" in b.log_text()
    finish(b)
