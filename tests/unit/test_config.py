"""geobouncer.config: the ini loader, the settings table, %include, diffs, the sample."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from geobouncer.config import (
    SETTINGS,
    SETTINGS_BY_NAME,
    Config,
    ConfigError,
    diff_configs,
    diff_entries,
    load_config,
    render_default_ini,
)
from geobouncer.config.values import KINDS

ROOT = Path(__file__).resolve().parents[2]


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, "pgbouncer.ini", text))


def load_error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value


def setting_error(tmp_path: Path, key: str, raw: str) -> ConfigError:
    return load_error(tmp_path, f"[pgbouncer]\n{key} = {raw}\n")


# -- ConfigError -------------------------------------------------------------


def test_error_str_has_every_part():
    assert str(ConfigError("bad", file="/a.ini", line=3, key="k")) == "/a.ini:3: k: bad"


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, "bad"),
        ({"file": "/a.ini"}, "/a.ini: bad"),
        ({"file": "/a.ini", "key": "k"}, "/a.ini: k: bad"),
        ({"key": "k"}, "k: bad"),
        ({"file": "/a.ini", "line": 7}, "/a.ini:7: bad"),
    ],
)
def test_error_str_omits_missing_parts(kwargs, expected):
    assert str(ConfigError("bad", **kwargs)) == expected


# -- defaults ----------------------------------------------------------------

DEFAULTS = {
    "listen_addr": None,
    "listen_port": 6432,
    "unix_socket_dir": "/tmp",
    "unix_socket_mode": 0o777,
    "logfile": None,
    "pidfile": None,
    "auth_type": "md5",
    "auth_file": None,
    "pool_mode": "session",
    "max_client_conn": 100,
    "default_pool_size": 20,
    "min_pool_size": 0,
    "reserve_pool_size": 0,
    "reserve_pool_timeout": 5.0,
    "server_reset_query": "DISCARD ALL",
    "server_reset_query_always": False,
    "server_check_query": "<empty>",
    "server_check_delay": 30.0,
    "server_lifetime": 3600.0,
    "server_idle_timeout": 600.0,
    "server_connect_timeout": 15.0,
    "server_login_retry": 15.0,
    "query_timeout": 0.0,
    "query_wait_timeout": 120.0,
    "cancel_wait_timeout": 10.0,
    "client_idle_timeout": 0.0,
    "client_login_timeout": 60.0,
    "idle_transaction_timeout": 0.0,
    "transaction_timeout": 0.0,
    "autodb_idle_timeout": 3600.0,
    "pkt_buf": 4096,
    "max_packet_size": 2147483647,
    "listen_backlog": 128,
    "log_connections": True,
    "log_disconnections": True,
    "log_pooler_errors": True,
    "log_stats": True,
    "stats_period": 60,
    "max_prepared_statements": 200,
    "track_extra_parameters": ("IntervalStyle",),
    "ignore_startup_parameters": (),
    "admin_users": (),
    "stats_users": (),
    "client_tls_sslmode": "disable",
    "client_tls_protocols": "secure",
    "client_tls_ciphers": "default",
    "client_tls_dheparams": "auto",
    "client_tls_ecdhcurve": "auto",
    "server_tls_sslmode": "prefer",
    "server_tls_protocols": "secure",
    "tcp_keepalive": True,
    "scram_iterations": 4096,
    "routing_rules_py_module_file": "not_enabled",
    "rewrite_query_py_module_file": "not_enabled",
    "rewrite_query_disconnect_on_failure": False,
    "polling_frequency": 0.1,
    "server_failed_delay": 30.0,
    "recreate_disconnected_pools": True,
}


@pytest.fixture
def minimal(tmp_path) -> Config:
    return load(tmp_path, "[pgbouncer]\n")


@pytest.mark.parametrize("name, expected", sorted(DEFAULTS.items()))
def test_default(minimal, name, expected):
    value = getattr(minimal.pgbouncer, name)
    assert value == expected
    assert type(value) is type(expected)


def test_an_empty_config_has_no_entries(minimal):
    assert dict(minimal.databases) == {}
    assert dict(minimal.users) == {}
    assert minimal.database_for("anything") is None


def test_get_by_name_is_case_insensitive(minimal):
    assert minimal.pgbouncer.get("pool_mode") == "session"
    assert minimal.pgbouncer.get("LISTEN_PORT") == 6432
    with pytest.raises(KeyError):
        minimal.pgbouncer.get("no_such_key")


def test_settings_are_immutable(minimal):
    with pytest.raises(AttributeError):
        minimal.pgbouncer.listen_port = 1
    with pytest.raises(TypeError):
        minimal.databases["x"] = None  # type: ignore[index]
    with pytest.raises(AttributeError):
        minimal.path = "/elsewhere"  # type: ignore[misc]


def test_settings_formatted_for_show_config(tmp_path):
    cfg = load(tmp_path, "[pgbouncer]\nadmin_users = a b\nlog_stats = off\n")
    assert cfg.pgbouncer.formatted("admin_users") == "a, b"
    assert cfg.pgbouncer.formatted("log_stats") == "0"
    assert cfg.pgbouncer.formatted("unix_socket_mode") == "0777"
    assert cfg.pgbouncer.formatted("query_wait_timeout") == "120"


# -- the table ---------------------------------------------------------------


def test_table_rows_are_well_formed():
    assert len(SETTINGS_BY_NAME) == len(SETTINGS)
    for setting in SETTINGS:
        assert setting.name == setting.name.lower(), setting.name
        assert setting.type in KINDS, setting.name
        assert setting.doc.strip(), setting.name
        if setting.default is not None:
            assert setting.parse(setting.format(setting.default)) == setting.default


@pytest.mark.parametrize(
    "name",
    [
        "listen_addr",
        "listen_port",
        "unix_socket_dir",
        "unix_socket_mode",
        "user",
        "pidfile",
        "pkt_buf",
        "so_reuseport",
        "track_extra_parameters",
        "listen_backlog",
    ],
)
def test_restart_only_settings(name):
    assert SETTINGS_BY_NAME[name].reloadable is False


@pytest.mark.parametrize(
    "name",
    [
        "logfile",
        "pool_mode",
        "default_pool_size",
        "query_wait_timeout",
        "auth_file",
        "admin_users",
        "server_tls_sslmode",
        "polling_frequency",
    ],
)
def test_reloadable_settings(name):
    assert SETTINGS_BY_NAME[name].reloadable is True


def test_extension_keys_are_marked():
    extensions = {s.name for s in SETTINGS if s.extension}
    assert extensions == {
        "routing_rules_py_module_file",
        "rewrite_query_py_module_file",
        "rewrite_query_disconnect_on_failure",
        "polling_frequency",
        "server_failed_delay",
        "recreate_disconnected_pools",
        "hook_slow_call_ms",
        "switchover_timeout",
        "health_check_period",
        "health_check_timeout",
        "replica_ban_time",
        "write_functions",
        "metrics_port",
        "metrics_listen_addr",
        "workers",
        "shutdown_timeout",
        "metrics_request_timeout",
        "two_phase_commit",
    }


# -- value types -------------------------------------------------------------


@pytest.mark.parametrize(
    "key, raw, expected",
    [
        ("max_client_conn", "500", 500),
        ("max_client_conn", "0x20", 32),  # C strtol base 0, as PgBouncer
        ("max_client_conn", "010", 8),
        ("max_client_conn", "+7", 7),
        ("listen_port", "0", 0),
        ("listen_port", "65535", 65535),
        ("max_packet_size", "4294967295", 4294967295),
        ("query_wait_timeout", "15", 15.0),
        ("query_wait_timeout", "0.5", 0.5),
        ("query_wait_timeout", ".25", 0.25),
        ("query_wait_timeout", "1e2", 100.0),
        ("query_wait_timeout", "0", 0.0),
        ("pool_mode", "Transaction", "transaction"),
        ("pool_mode", "statement", "statement"),
        ("auth_type", "SCRAM-SHA-256", "scram-sha-256"),
        ("auth_type", "hba", "hba"),
        ("server_tls_sslmode", "verify-full", "verify-full"),
        ("admin_users", "alice, bob  carol,,dave", ("alice", "bob", "carol", "dave")),
        ("admin_users", "", ()),
        (
            "ignore_startup_parameters",
            "extra_float_digits,options",
            ("extra_float_digits", "options"),
        ),
        ("unix_socket_mode", "0700", 0o700),
        ("unix_socket_mode", "755", 0o755),
        (
            "server_reset_query",
            "DEALLOCATE ALL; -- keep ; and # as text",
            "DEALLOCATE ALL; -- keep ; and # as text",
        ),
        ("syslog_ident", '"quoted"', '"quoted"'),  # [pgbouncer] values are not unquoted
        ("server_reset_query", "", ""),
        ("logfile", "", None),
        ("logfile", "/var/log/geobouncer.log", "/var/log/geobouncer.log"),
        ("polling_frequency", "0.05", 0.05),
    ],
)
def test_valid_values(tmp_path, key, raw, expected):
    cfg = load(tmp_path, f"[pgbouncer]\n{key} = {raw}\n")
    assert cfg.pgbouncer.get(key) == expected


@pytest.mark.parametrize(
    "spelling, expected",
    [
        ("1", True),
        ("0", False),
        ("on", True),
        ("off", False),
        ("yes", True),
        ("no", False),
        ("true", True),
        ("false", False),
        ("TRUE", True),
        ("Off", False),
        ("2", True),
    ],
)
def test_bool_spellings(tmp_path, spelling, expected):
    cfg = load(tmp_path, f"[pgbouncer]\nlog_connections = {spelling}\n")
    assert cfg.pgbouncer.log_connections is expected


@pytest.mark.parametrize(
    "key, raw, message",
    [
        ("max_client_conn", "abc", "invalid integer"),
        ("max_client_conn", "1.5", "invalid integer"),
        ("max_client_conn", "", "invalid integer"),
        ("max_client_conn", "08", "invalid integer"),
        (
            "max_client_conn",
            "100 ; inline comments are not comments",
            "invalid integer",
        ),
        ("max_client_conn", "0", "below the minimum"),
        ("listen_port", "70000", "above the maximum"),
        ("listen_port", "-1", "below the minimum"),
        ("default_pool_size", "-5", "below the minimum"),
        ("pkt_buf", "0", "below the minimum"),
        ("peer_id", "20000", "above the maximum"),
        ("query_wait_timeout", "10s", "invalid time"),
        ("query_wait_timeout", "-1", "invalid time"),
        ("query_wait_timeout", "abc", "invalid time"),
        ("query_wait_timeout", "inf", "invalid time"),
        ("query_wait_timeout", "nan", "invalid time"),
        ("query_wait_timeout", "1e999", "out of range"),
        ("log_connections", "maybe", "invalid boolean"),
        ("log_connections", "", "invalid boolean"),
        ("pool_mode", "sessions", "expected one of: session, transaction, statement"),
        ("auth_type", "password", "invalid value"),
        ("client_tls_sslmode", "on", "invalid value"),
        ("unix_socket_mode", "0800", "invalid octal"),
        ("unix_socket_mode", "77777", "above the maximum"),
    ],
)
def test_invalid_values_name_file_line_and_key(tmp_path, key, raw, message):
    error = setting_error(tmp_path, key, raw)
    path = tmp_path / "pgbouncer.ini"
    assert str(error).startswith(f"{path}:2: {key}: ")
    assert message in str(error)
    assert (error.file, error.line, error.key) == (str(path), 2, key)


# -- ini syntax --------------------------------------------------------------


def test_unknown_setting_is_an_error(tmp_path):
    error = load_error(
        tmp_path,
        """
        [pgbouncer]
        listen_port = 6432
        listen_prot = 6432
    """,
    )
    assert str(error) == f"{tmp_path / 'pgbouncer.ini'}:3: listen_prot: unknown setting"


def test_keys_are_case_insensitive(tmp_path):
    cfg = load(tmp_path, "[pgbouncer]\nLISTEN_PORT = 7000\nPool_Mode = transaction\n")
    assert cfg.pgbouncer.listen_port == 7000
    assert cfg.pgbouncer.pool_mode == "transaction"


def test_error_key_is_the_canonical_name(tmp_path):
    error = setting_error(tmp_path, "Listen_Port", "x")
    assert error.key == "listen_port"


@pytest.mark.parametrize(
    "line",
    [
        "listen_port=7000",
        "listen_port   =   7000",
        "listen_port\t=\t7000",
        "   listen_port = 7000   ",
        "listen_port = 7000\r",
    ],
)
def test_whitespace_around_equals(tmp_path, line):
    cfg = load(tmp_path, f"[pgbouncer]\n{line}\n")
    assert cfg.pgbouncer.listen_port == 7000


def test_comments_and_blank_lines(tmp_path):
    cfg = load(
        tmp_path,
        """
        ; a comment
        # another comment
        [pgbouncer]   ; trailing comment after a section header

           ; indented comment
        ;listen_port = 1
        #listen_port = 2
        listen_port = 7000
    """,
    )
    assert cfg.pgbouncer.listen_port == 7000


def test_duplicate_key_last_wins(tmp_path):
    cfg = load(
        tmp_path,
        """
        [pgbouncer]
        pool_mode = session
        [databases]
        db = host=a
        [pgbouncer]
        pool_mode = statement
        [databases]
        db = host=b
    """,
    )
    assert cfg.pgbouncer.pool_mode == "statement"
    assert cfg.databases["db"].host == "b"


def test_crlf_line_endings(tmp_path):
    path = tmp_path / "crlf.ini"
    path.write_bytes(b"[pgbouncer]\r\nlisten_port = 7001\r\nadmin_users = a\r\n")
    cfg = load_config(path)
    assert cfg.pgbouncer.listen_port == 7001
    assert cfg.pgbouncer.admin_users == ("a",)


def test_section_names_are_case_insensitive(tmp_path):
    cfg = load(tmp_path, "[PgBouncer]\nlisten_port = 7002\n[DATABASES]\nx = host=h\n")
    assert cfg.pgbouncer.listen_port == 7002
    assert "x" in cfg.databases


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("[pgbouncer]\nthis is not a setting\n", 2, "expected 'key = value'"),
        ("[pgbouncer]\nlisten_port\n", 2, "expected 'key = value'"),
        ("[pgbouncer\n", 1, "malformed section header"),
        ("[pgbouncer] junk\n", 1, "malformed section header"),
        ("[pgbouncer]\n[bogus]\n", 2, "unknown section [bogus]"),
        ("listen_port = 1\n[pgbouncer]\n", 1, "outside of any section"),
        ("[pgbouncer]\n%include\n", 2, "missing file name after %include"),
    ],
)
def test_syntax_errors_name_the_line(tmp_path, text, line, fragment):
    error = load_error(tmp_path, text)
    assert error.file == str(tmp_path / "pgbouncer.ini")
    assert error.line == line
    assert fragment in str(error)


def test_missing_main_section(tmp_path):
    error = load_error(tmp_path, "[databases]\nx = host=h\n")
    assert str(error) == f"{tmp_path / 'pgbouncer.ini'}: missing [pgbouncer] section"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.ini"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path)
    assert str(info.value).startswith(f"{path}: cannot read config file")


def test_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)


def test_invalid_utf8(tmp_path):
    path = tmp_path / "latin1.ini"
    path.write_bytes(b"[pgbouncer]\nlogfile = /tmp/\xe9\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(path)


def test_path_is_absolute(tmp_path, monkeypatch):
    write(tmp_path, "rel.ini", "[pgbouncer]\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("rel.ini")
    assert cfg.path == str(tmp_path / "rel.ini")
    assert cfg.files == (str(tmp_path / "rel.ini"),)


# -- %include ----------------------------------------------------------------


def test_include_relative_to_including_file(tmp_path, monkeypatch):
    write(tmp_path, "conf.d/pool.ini", "[pgbouncer]\nlisten_port = 7100\n")
    main = write(
        tmp_path,
        "main.ini",
        """
        [pgbouncer]
        pool_mode = transaction
        %include conf.d/pool.ini
    """,
    )
    monkeypatch.chdir("/")
    cfg = load_config(main)
    assert cfg.pgbouncer.listen_port == 7100
    assert cfg.pgbouncer.pool_mode == "transaction"
    assert cfg.files == (str(main), str(tmp_path / "conf.d" / "pool.ini"))


def test_nested_includes_resolve_from_each_file(tmp_path):
    write(tmp_path, "a/b/c.ini", "admin_users = carol\n")
    write(tmp_path, "a/b.ini", "%include b/c.ini\nstats_users = bob\n")
    main = write(
        tmp_path, "main.ini", "[pgbouncer]\n%include a/b.ini\nlisten_port = 7200\n"
    )
    cfg = load_config(main)
    assert cfg.pgbouncer.admin_users == ("carol",)
    assert cfg.pgbouncer.stats_users == ("bob",)
    assert cfg.pgbouncer.listen_port == 7200
    assert len(cfg.files) == 3


def test_include_carries_the_current_section_both_ways(tmp_path):
    write(tmp_path, "dbs.ini", "db2 = host=h2\n[pgbouncer]\n")
    main = write(
        tmp_path,
        "main.ini",
        """
        [databases]
        db1 = host=h1
        %include dbs.ini
        listen_port = 7300
    """,
    )
    cfg = load_config(main)
    assert list(cfg.databases) == ["db1", "db2"]
    assert cfg.pgbouncer.listen_port == 7300


def test_include_absolute_path(tmp_path):
    extra = write(tmp_path, "elsewhere/extra.ini", "listen_port = 7400\n")
    main = write(tmp_path, "main.ini", f"[pgbouncer]\n%include {extra}\n")
    assert load_config(main).pgbouncer.listen_port == 7400


def test_missing_include_names_the_including_line(tmp_path):
    main = write(tmp_path, "main.ini", "[pgbouncer]\n\n%include missing.ini\n")
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert (info.value.file, info.value.line) == (str(main), 3)
    assert str(tmp_path / "missing.ini") in str(info.value)


def test_error_in_included_file_names_that_file_and_line(tmp_path):
    inc = write(
        tmp_path,
        "inc/bad.ini",
        "; header\nlisten_port = 6432\nmax_client_conn = lots\n",
    )
    main = write(tmp_path, "main.ini", "[pgbouncer]\n%include inc/bad.ini\n")
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert str(info.value).startswith(f"{inc}:3: max_client_conn: invalid integer")


def test_unknown_key_in_included_file(tmp_path):
    inc = write(tmp_path, "inc.ini", "bogus_key = 1\n")
    main = write(tmp_path, "main.ini", "[pgbouncer]\n%include inc.ini\n")
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert (info.value.file, info.value.line, info.value.key) == (
        str(inc),
        1,
        "bogus_key",
    )


def test_include_cycle(tmp_path):
    write(tmp_path, "a.ini", "%include b.ini\n")
    write(tmp_path, "b.ini", "%include a.ini\n")
    main = write(tmp_path, "main.ini", "[pgbouncer]\n%include a.ini\n")
    with pytest.raises(ConfigError, match="includes itself") as info:
        load_config(main)
    assert info.value.file == str(tmp_path / "b.ini")


def _include_chain(tmp_path: Path, length: int) -> Path:
    for i in range(1, length):
        write(tmp_path, f"f{i}.ini", f"%include f{i + 1}.ini\n")
    write(tmp_path, f"f{length}.ini", "listen_port = 7500\n")
    return write(tmp_path, "main.ini", "[pgbouncer]\n%include f1.ini\n")


def test_include_depth_ten_is_allowed(tmp_path):
    assert load_config(_include_chain(tmp_path, 10)).pgbouncer.listen_port == 7500


def test_include_depth_is_limited(tmp_path):
    with pytest.raises(ConfigError, match="nesting deeper than 10"):
        load_config(_include_chain(tmp_path, 11))


# -- databases, fallback, paths ----------------------------------------------


def test_databases_keep_file_order_and_the_fallback(tmp_path):
    cfg = load(
        tmp_path,
        """
        [databases]
        zeta = host=z
        * = host=fallback port=5433
        alpha = host=a
        [pgbouncer]
    """,
    )
    assert list(cfg.databases) == ["zeta", "*", "alpha"]


def test_database_for_uses_the_fallback(tmp_path):
    cfg = load(
        tmp_path,
        """
        [databases]
        known = host=k dbname=real
        * = host=fallback port=5433 pool_size=3
        [pgbouncer]
    """,
    )
    assert cfg.database_for("known").dbname == "real"
    other = cfg.database_for("other")
    assert (other.name, other.dbname, other.host, other.port, other.pool_size) == (
        "other",
        "other",
        "fallback",
        5433,
        3,
    )
    assert cfg.databases["*"].dbname is None


def test_database_for_keeps_a_dbname_set_on_the_fallback(tmp_path):
    cfg = load(tmp_path, "[databases]\n* = host=f dbname=shared\n[pgbouncer]\n")
    entry = cfg.database_for("whatever")
    assert (entry.name, entry.dbname) == ("whatever", "shared")


def test_database_names_are_case_sensitive(tmp_path):
    cfg = load(tmp_path, "[databases]\nMyDb = host=h\n[pgbouncer]\n")
    assert cfg.database_for("MyDb") is not None
    assert cfg.database_for("mydb") is None


def test_resolve_path(tmp_path):
    cfg = load(tmp_path, "[pgbouncer]\nauth_file = users/list.txt\n")
    assert cfg.resolve_path(cfg.pgbouncer.auth_file) == str(
        tmp_path / "users" / "list.txt"
    )
    assert cfg.resolve_path("/etc/x.txt") == "/etc/x.txt"
    assert cfg.resolve_path(None) is None
    assert cfg.resolve_path("") is None


# -- reload diff ---------------------------------------------------------------


def test_diff_configs_sorts_changes_by_reloadability(tmp_path):
    old = load_config(write(tmp_path, "old.ini", "[pgbouncer]\nlisten_port = 6432\n"))
    new = load_config(
        write(
            tmp_path,
            "new.ini",
            """
        [pgbouncer]
        listen_port = 6433
        pool_mode = transaction
        logfile = /tmp/x.log
        unix_socket_dir = /run
        query_wait_timeout = 120
    """,
        )
    )
    assert diff_configs(old, new) == (
        {"pool_mode", "logfile"},
        {"listen_port", "unix_socket_dir"},
    )


def test_diff_configs_of_equal_configs_is_empty(tmp_path):
    text = "[pgbouncer]\nlisten_port = 7000\nadmin_users = a,b\n"
    old = load_config(write(tmp_path, "a.ini", text))
    new = load_config(write(tmp_path, "b.ini", text))
    assert diff_configs(old, new) == (set(), set())
    assert old.pgbouncer == new.pgbouncer


def test_diff_entries(tmp_path):
    old = load(
        tmp_path, "[databases]\na = host=1\nb = host=2\nc = host=3\n[pgbouncer]\n"
    )
    new = load(
        tmp_path, "[databases]\na = host=1\nb = host=9\nd = host=4\n[pgbouncer]\n"
    )
    assert diff_entries(old.databases, new.databases) == ({"d"}, {"c"}, {"b"})


# -- the generated sample ----------------------------------------------------


def test_sample_ini_matches_the_table():
    sample = (ROOT / "conf" / "geobouncer.ini").read_text(encoding="utf-8")
    assert sample == render_default_ini(), (
        "conf/geobouncer.ini is stale: run scripts/gen-conf"
    )


def test_sample_ini_loads():
    cfg = load_config(ROOT / "conf" / "geobouncer.ini")
    assert cfg.pgbouncer.listen_addr == "127.0.0.1"
    assert cfg.pgbouncer.auth_file == "userlist.txt"
    assert Path(cfg.resolve_path(cfg.pgbouncer.auth_file)).is_file()
    assert cfg.databases["postgres"].host == "127.0.0.1"
    assert diff_configs(cfg, cfg) == (set(), set())


def test_rendered_ini_lists_every_key_once():
    text = render_default_ini()
    for setting in SETTINGS:
        lines = re.findall(rf"^;?{setting.name} =", text, flags=re.MULTILINE)
        assert len(lines) == 1, setting.name


def test_rendered_defaults_read_back_as_the_defaults(tmp_path):
    """Uncomment every default line: the loaded values must equal the table."""
    lines = []
    for line in render_default_ini(active={}).splitlines():
        match = re.match(r";(\w+) = ?(.*)$", line)
        if match and SETTINGS_BY_NAME[match.group(1)].default is not None:
            line = line[1:]
        lines.append(line)
    path = tmp_path / "all.ini"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.pgbouncer.as_dict() == {s.name: s.default for s in SETTINGS}


def test_render_rejects_unknown_active_keys():
    with pytest.raises(KeyError):
        render_default_ini(active={"no_such_key": "1"})
