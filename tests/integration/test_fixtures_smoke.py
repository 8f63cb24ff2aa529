"""The fixtures themselves: real PostgreSQL, its roles and auth methods, replication, the proxy.

No pooler here: these tests say whether a failure elsewhere is the pooler's or the harness's.
"""

import psycopg2
import pytest
from fixtures.pg import ROLES
from fixtures.ports import free_port, port_is_open, wait_until

PASSWORD_ROLES = ["md5_user", "scram_user", "plain_user", "app"]


def test_pg_answers(pg):
    assert pg.psql("SELECT 1") == [(1,)]
    assert pg.host == "127.0.0.1"
    assert port_is_open(pg.host, pg.port)
    assert pg.psql("SELECT current_setting('max_connections')::int")[0][0] >= 300


def test_roles_and_app_database(pg):
    roles = {
        name for (name,) in pg.psql("SELECT rolname FROM pg_roles WHERE rolcanlogin")
    }
    assert set(ROLES) <= roles
    assert pg.psql(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'app'"
    ) == [("app",)]
    assert set(pg.passwords) == set(ROLES)


def test_stored_password_formats(pg):
    stored = dict(
        pg.psql(
            "SELECT rolname, left(rolpassword, 13) FROM pg_authid WHERE rolname LIKE '%_user'"
        )
    )
    assert stored["md5_user"].startswith("md5")
    assert stored["scram_user"] == "SCRAM-SHA-256"


@pytest.mark.parametrize("user", PASSWORD_ROLES)
def test_right_password_connects(pg, user):
    assert pg.psql("SELECT current_user", dbname="app", user=user) == [(user,)]


@pytest.mark.parametrize("user", PASSWORD_ROLES)
def test_wrong_password_fails(pg, user):
    with pytest.raises(
        psycopg2.OperationalError, match="password authentication failed"
    ):
        pg.connect("app", user, password="wrong")


@pytest.mark.parametrize("user", ["trust_user", "postgres"])
def test_trust_needs_no_password(pg, user):
    assert pg.psql("SELECT current_user", user=user, password=None) == [(user,)]
    assert pg.psql("SELECT current_user", user=user, password="anything") == [(user,)]


@pytest.mark.parametrize(
    "user, method",
    [
        ("md5_user", "md5"),
        ("plain_user", "password"),
        ("scram_user", "scram-sha-256"),
        ("app", "scram-sha-256"),
    ],
)
def test_hba_methods(pg, user, method):
    rows = pg.psql(
        "SELECT auth_method FROM pg_hba_file_rules WHERE type = 'host' AND NOT 'replication' = ANY(database)"
        " AND (%s = ANY(user_name) OR 'all' = ANY(user_name)) ORDER BY line_number LIMIT 1",
        (user,),
    )
    assert rows == [(method,)]


def test_log_statements_toggle(pg):
    offset = pg.log_offset()
    with pg.log_statements("all"):
        pg.psql("SELECT 'marker-logged'")
    pg.psql("SELECT 'marker-not-logged'")
    log = pg.log_text(since=offset)
    assert "marker-logged" in log
    assert "statement: SELECT 'marker-not-logged'" not in log


def test_backends_counts_connections(pg):
    before = pg.backends("app", "app")
    conn = pg.connect("app", "app")
    try:
        assert pg.backends("app", "app") == before + 1
    finally:
        conn.close()


def test_replica_streams(pg, pg_replica):
    assert pg_replica.port != pg.port
    assert pg_replica.primary is pg
    assert pg_replica.psql("SELECT pg_is_in_recovery()") == [(True,)]
    assert pg.psql("SELECT pg_is_in_recovery()") == [(False,)]
    pg.psql("DROP TABLE IF EXISTS smoke_replication")
    pg.psql(
        "CREATE TABLE smoke_replication (v int); INSERT INTO smoke_replication VALUES (42)",
        dbname="app",
    )
    wait_until(
        lambda: (
            pg_replica.psql("SELECT v FROM smoke_replication", dbname="app") == [(42,)]
        ),
        timeout=30,
        message="row visible on the replica",
    )
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
        pg_replica.psql("INSERT INTO smoke_replication VALUES (1)", dbname="app")
    pg.psql("DROP TABLE smoke_replication", dbname="app")


def test_replica_factory_and_promote(make_pg, make_replica):
    primary = make_pg()
    replica = make_replica(primary)
    primary.psql("CREATE TABLE t (v int)", dbname="app")
    wait_until(
        lambda: (
            replica.psql("SELECT to_regclass('t') IS NOT NULL", dbname="app")
            == [(True,)]
        ),
        timeout=30,
        message="table visible on the replica",
    )
    primary.stop("immediate")
    assert not primary.is_running()
    replica.promote()
    replica.psql("INSERT INTO t VALUES (1)", dbname="app")
    assert replica.psql("SELECT count(*) FROM t", dbname="app") == [(1,)]


def test_stop_and_start(make_pg):
    cluster = make_pg()
    cluster.stop()
    assert not port_is_open(cluster.host, cluster.port)
    cluster.start()
    assert cluster.psql("SELECT 1") == [(1,)]
    cluster.restart("immediate")
    assert cluster.psql("SELECT 1") == [(1,)]


def test_proxy_forwards_cuts_and_restores(pg, proxy):
    tunnel = proxy(pg.port)
    conn = psycopg2.connect(pg.dsn("app", "app", port=tunnel.port))
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    tunnel.stop()
    with pytest.raises(psycopg2.OperationalError), conn.cursor() as cur:
        cur.execute("SELECT 1")
    assert not port_is_open(tunnel.host, tunnel.port)
    tunnel.start()
    conn = psycopg2.connect(pg.dsn("app", "app", port=tunnel.port))
    with conn.cursor() as cur:
        cur.execute("SELECT 2")
        assert cur.fetchone() == (2,)
    conn.close()


def test_free_port_is_free_and_distinct():
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    assert not any(port_is_open("127.0.0.1", p) for p in ports)
