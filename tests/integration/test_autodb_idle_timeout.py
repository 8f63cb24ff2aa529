"""autodb_idle_timeout: a pool made from the ``*`` entry, unused that long,
is freed with its idle servers (SHOW POOLS / SHOW DATABASES forget it), so
clients naming ever new databases cannot grow the pooler for good; a named
entry's pool stays. Runs against PgBouncer too
(GEOBOUNCER_TEST_TARGET=pgbouncer)."""

from __future__ import annotations

from _util_pool import query_one
from fixtures.ports import wait_until


def _pool_dbs(b) -> set[str]:
    return {row.database for row in b.admin("SHOW POOLS")} - {"pgbouncer"}


def test_unused_automatic_pool_is_freed(pg, bouncer):
    b = bouncer(databases={"named": f"host={pg.host} port={pg.port} dbname=app",
                           "*": f"host={pg.host} port={pg.port}"},
                pgbouncer={"pool_mode": "session", "auth_type": "md5", "autodb_idle_timeout": 2,
                           "server_idle_timeout": 600})
    for dbname in ("app", "named"):
        conn = b.connect(dbname)
        assert query_one(conn, "SELECT current_database()") == ("app",)
        conn.close()
    assert _pool_dbs(b) == {"app", "named"}
    held = b.connect("named")            # a named entry is never freed
    try:
        assert query_one(held, "SELECT 1") == (1,)
        wait_until(lambda: _pool_dbs(b) == {"named"}, timeout=15, message="automatic pool freed")
        assert {row.database for row in b.admin("SHOW SERVERS")} == {"named"}
        assert "app" not in {row.name for row in b.admin("SHOW DATABASES")}
        conn = b.connect("app")          # made again on demand
        assert query_one(conn, "SELECT 1") == (1,)
        conn.close()
    finally:
        held.close()
