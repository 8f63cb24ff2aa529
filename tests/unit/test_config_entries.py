"""geobouncer.config: connection strings, [databases], [users] and [peers] entries."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from geobouncer.config import ConfigError, DatabaseEntry, load_config, parse_connstr


def load(tmp_path: Path, text: str):
    path = tmp_path / "pgbouncer.ini"
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return load_config(path)


def database(tmp_path: Path, connstr: str, name: str = "db") -> DatabaseEntry:
    return load(tmp_path, f"[databases]\n{name} = {connstr}\n[pgbouncer]\n").databases[
        name
    ]


def entry_error(tmp_path: Path, section: str, line: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, f"[pgbouncer]\n[{section}]\n{line}\n")
    return info.value


# -- the tokenizer -----------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", []),
        ("   ", []),
        ("host=a port=5", [("host", "a"), ("port", "5")]),
        ("host = a   port =5", [("host", "a"), ("port", "5")]),
        ("HOST=a", [("host", "a")]),
        ("password='two words'", [("password", "two words")]),
        ("password='it''s'", [("password", "it's")]),
        (r"password='it\'s'", [("password", "it's")]),
        (r"password='back\\slash'", [("password", "back\\slash")]),
        (r"password=two\ words", [("password", "two words")]),
        ("password='' user=u", [("password", ""), ("user", "u")]),
        ("a='x'b=y", [("a", "x"), ("b", "y")]),
        (
            "auth_query='SELECT p FROM t WHERE u=$1'",
            [("auth_query", "SELECT p FROM t WHERE u=$1")],
        ),
        ("host=a\tport=5", [("host", "a"), ("port", "5")]),
    ],
)
def test_parse_connstr(text, expected):
    assert parse_connstr(text) == expected


@pytest.mark.parametrize(
    "text, fragment, key",
    [
        ("password='open", "unterminated quoted string", "password"),
        ("host", "missing '=' after 'host'", "host"),
        ("host a=b", "missing '=' after 'host'", "host"),
        ("=value", "missing parameter name", None),
    ],
)
def test_parse_connstr_errors(text, fragment, key):
    with pytest.raises(ConfigError, match=fragment) as info:
        parse_connstr(text)
    assert info.value.key == key


# -- [databases] ---------------------------------------------------------------


def test_every_database_key(tmp_path):
    entry = database(
        tmp_path,
        (
            "host=db.example port=5433 dbname=real user=app password='p w' auth_user=au "
            "auth_query='SELECT usename, passwd FROM pg_shadow WHERE usename=$1' "
            "auth_dbname=authdb pool_size=10 min_pool_size=2 reserve_pool_size=3 "
            "connect_query='SET x = 1' pool_mode=transaction max_db_connections=40 "
            "max_db_client_connections=400 server_lifetime=1800 client_encoding=UTF8 "
            "datestyle=ISO timezone=UTC application_name=app load_balance_hosts=disable "
            "target_session_attrs=read-write query_wait_timeout=30 "
            "topology_query='select endpoint from nodes'"
        ),
    )
    assert entry == DatabaseEntry(
        name="db",
        host="db.example",
        port=5433,
        dbname="real",
        user="app",
        password="p w",
        auth_user="au",
        auth_query="SELECT usename, passwd FROM pg_shadow WHERE usename=$1",
        auth_dbname="authdb",
        pool_size=10,
        min_pool_size=2,
        reserve_pool_size=3,
        connect_query="SET x = 1",
        pool_mode="transaction",
        max_db_connections=40,
        max_db_client_connections=400,
        server_lifetime=1800.0,
        client_encoding="UTF8",
        datestyle="ISO",
        timezone="UTC",
        application_name="app",
        load_balance_hosts="disable",
        target_session_attrs="read-write",
        query_wait_timeout=30.0,
        topology_query="select endpoint from nodes",
    )
    assert entry.hosts == ("db.example",)
    assert entry.ports == (5433,)


def test_unset_database_fields_are_none(tmp_path):
    entry = database(tmp_path, "host=h")
    assert entry.dbname == "db"
    assert entry.port == 5432
    for name in (
        "user",
        "password",
        "pool_size",
        "min_pool_size",
        "reserve_pool_size",
        "pool_mode",
        "max_db_connections",
        "server_lifetime",
        "client_encoding",
        "auth_user",
        "auth_query",
        "auth_dbname",
        "topology_query",
        "query_wait_timeout",
    ):
        assert getattr(entry, name) is None, name
    assert entry.load_balance_hosts == "round-robin"
    assert entry.target_session_attrs == "any"


def test_empty_connstr_means_unix_socket(tmp_path):
    entry = database(tmp_path, "", name="foodb")
    assert (entry.host, entry.hosts, entry.port, entry.ports, entry.dbname) == (
        None,
        (),
        5432,
        (5432,),
        "foodb",
    )


def test_reserve_pool_is_an_alias(tmp_path):
    assert database(tmp_path, "host=h reserve_pool=4").reserve_pool_size == 4


def test_query_wait_timeout_minus_one_means_unset(tmp_path):
    assert database(tmp_path, "query_wait_timeout=-1").query_wait_timeout is None


def test_host_list_and_ports(tmp_path):
    listed = database(tmp_path, "host=a,b,c port=6000")
    assert (listed.hosts, listed.port, listed.ports) == (
        ("a", "b", "c"),
        6000,
        (6000,) * 3,
    )
    per_host = database(tmp_path, "host='a, b' port=6001,6002")
    assert (per_host.hosts, per_host.port, per_host.ports) == (
        ("a", "b"),
        6001,
        (6001, 6002),
    )


def test_password_is_not_in_repr(tmp_path):
    assert "hunter2" not in repr(database(tmp_path, "password=hunter2"))


def test_startup_params(tmp_path):
    entry = database(tmp_path, "client_encoding=UTF8 datestyle='ISO, MDY' timezone=UTC")
    assert entry.startup_params() == {
        "client_encoding": "UTF8",
        "DateStyle": "ISO, MDY",
        "TimeZone": "UTC",
    }
    assert database(tmp_path, "application_name=x").startup_params() == {
        "application_name": "x"
    }
    assert database(tmp_path, "host=h").startup_params() == {}


def test_quoted_database_name(tmp_path):
    cfg = load(tmp_path, '[databases]\n"my ""odd"" db" = host=h\n[pgbouncer]\n')
    entry = cfg.database_for('my "odd" db')
    assert (entry.name, entry.dbname) == ('my "odd" db', 'my "odd" db')


def test_direct_construction_derives_hosts_and_ports():
    entry = DatabaseEntry(name="x", host="a,b", port=5000)
    assert (entry.hosts, entry.ports) == (("a", "b"), (5000, 5000))


@pytest.mark.parametrize(
    "connstr, key, fragment",
    [
        ("host=h sslmode=require", "sslmode", "unknown parameter in connection string"),
        ("host=h pool_size=ten", "pool_size", "invalid integer"),
        ("host=h pool_size=-1", "pool_size", "below the minimum"),
        ("host=h pool_mode=sometimes", "pool_mode", "expected one of"),
        ("host=h port=0", "port", "below the minimum"),
        ("host=h port=70000", "port", "above the maximum"),
        ("host=h port=x", "port", "invalid integer"),
        ("host=a,b port=1,2,3", "port", "3 ports given for 2 hosts"),
        ("host=a,,b", "host", "empty name in host list"),
        ("host=a, b", "b", "missing '=' after 'b'"),  # a blank ends a plain value
        ("host=h server_lifetime=soon", "server_lifetime", "invalid time"),
        ("host=h load_balance_hosts=random", "load_balance_hosts", "expected one of"),
        ("host=h password='open", "password", "unterminated"),
    ],
)
def test_database_errors_name_file_line_and_key(tmp_path, connstr, key, fragment):
    error = entry_error(tmp_path, "databases", f"mydb = {connstr}")
    assert str(error).startswith(f"{tmp_path / 'pgbouncer.ini'}:3: {key}: ")
    assert fragment in str(error)
    if key != "password" and key != "b":
        assert "database 'mydb'" in str(error)


def test_admin_database_name_is_reserved(tmp_path):
    error = entry_error(tmp_path, "databases", "pgbouncer = host=h")
    assert "reserved" in str(error) and error.line == 3


# -- [users] -----------------------------------------------------------------


def test_user_entries(tmp_path):
    cfg = load(
        tmp_path,
        """
        [users]
        app = pool_mode=transaction pool_size=7 reserve_pool_size=2 max_user_connections=9 max_user_client_connections=90
        slow = query_timeout=30 query_wait_timeout=-1 idle_transaction_timeout=5 transaction_timeout=60 client_idle_timeout=600
        Plain =
        [pgbouncer]
    """,
    )
    app = cfg.users["app"]
    assert (
        app.pool_mode,
        app.pool_size,
        app.reserve_pool_size,
        app.max_user_connections,
        app.max_user_client_connections,
    ) == ("transaction", 7, 2, 9, 90)
    assert app.query_timeout is None
    slow = cfg.users["slow"]
    assert (
        slow.query_timeout,
        slow.query_wait_timeout,
        slow.idle_transaction_timeout,
        slow.transaction_timeout,
        slow.client_idle_timeout,
    ) == (30.0, None, 5.0, 60.0, 600.0)
    assert cfg.users["Plain"].pool_mode is None
    assert "plain" not in cfg.users


@pytest.mark.parametrize(
    "line, key, fragment",
    [
        ("app = max_db_connections=3", "max_db_connections", "unknown parameter"),
        ("app = pool_mode=never", "pool_mode", "expected one of"),
        ("app = pool_size=many", "pool_size", "invalid integer"),
    ],
)
def test_user_errors(tmp_path, line, key, fragment):
    error = entry_error(tmp_path, "users", line)
    assert str(error).startswith(f"{tmp_path / 'pgbouncer.ini'}:3: {key}: user 'app': ")
    assert fragment in str(error)


# -- [peers] -----------------------------------------------------------------


def test_peer_entries(tmp_path):
    cfg = load(
        tmp_path,
        """
        [peers]
        1 = host=/tmp/pgbouncer1
        2 = host=10.0.0.2 port=6433 pool_size=4
        [pgbouncer]
        peer_id = 1
    """,
    )
    assert cfg.peers[1].host == "/tmp/pgbouncer1" and cfg.peers[1].port == 6432
    assert (cfg.peers[2].port, cfg.peers[2].pool_size) == (6433, 4)


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("zero = host=h", "peer id must be a number"),
        ("0 = host=h", "peer id must be"),
        ("16384 = host=h", "from 1 to 16383"),       # more than a cancel key's 14 bits
        ("3 = port=1", "host is required"),
        ("3 = host=h user=x", "unknown parameter"),
    ],
)
def test_peer_errors(tmp_path, line, fragment):
    error = entry_error(tmp_path, "peers", line)
    assert error.line == 3 and fragment in str(error)
