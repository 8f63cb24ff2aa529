"""disable_pqexec = 1: the simple Query protocol is refused, as PgBouncer
refuses it (FATAL "PQexec disallowed" and a close), in every pool mode and on
the admin console; the extended protocol still works. Runs against PgBouncer
too (GEOBOUNCER_TEST_TARGET=pgbouncer)."""

from __future__ import annotations

import psycopg
import pytest
from _util_pool import RawClient, errors_in, query_message
from fixtures.cluster import ROLE_PASSWORDS


def refused(b, user: str, password: str, dbname: str) -> None:
    """A simple Query gets FATAL 08P01 "PQexec disallowed", then the close."""
    raw = RawClient(b.host, b.port)
    try:
        replies = raw.login(user, password, dbname)
        assert replies[-1][0] == b"Z", replies
        raw.sock.sendall(query_message("SELECT 1"))
        msgs = raw.read_until_close()
    finally:
        raw.close()
    errors = errors_in(msgs)
    assert [(e.get("S"), e.get("C"), e.get("M")) for e in errors] == [("FATAL", "08P01", "PQexec disallowed")], msgs
    assert [t for t, _ in msgs] == [b"E"], msgs


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_simple_query_refused_extended_served(pg, bouncer, pool_mode):
    b = bouncer(pgbouncer={"pool_mode": pool_mode, "auth_type": "md5", "disable_pqexec": 1})
    with psycopg.connect(b.dsn(), autocommit=True, prepare_threshold=0) as conn:
        assert conn.execute("SELECT %s::int + 1", [41]).fetchone() == (42,)     # extended protocol
    with psycopg.connect(b.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.OperationalError, match="PQexec disallowed"):
            conn.execute("SELECT 1", prepare=False)     # no parameters: psycopg sends a simple Query
    refused(b, "app", "app_pw", "app")
    with psycopg.connect(b.dsn(), autocommit=True) as conn:     # the next client is served
        assert conn.execute("SELECT %s::text", ["ok"]).fetchone() == ("ok",)


def test_admin_console_refused_too(pg, bouncer):
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "disable_pqexec": 1})
    refused(b, "postgres", ROLE_PASSWORDS["postgres"], "pgbouncer")
