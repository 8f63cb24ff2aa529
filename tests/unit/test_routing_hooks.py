"""geobouncer.routing.Hooks: loading, calling, failures, reload, stats.

Hook modules are written to temp files and loaded through the real settings
table (``Settings``), as the pooler does; nothing here needs a database.
"""

from __future__ import annotations

import logging
import sys
import textwrap

import pytest

from geobouncer.config import Settings
from geobouncer.routing import (
    STATS_COLUMNS,
    HookLoadError,
    Hooks,
    RewriteFailed,
)
from geobouncer.routing import hook as hook_module

KNOWN = frozenset({"dev", "dev.1", "dev.2"}).__contains__


def settings(routing=None, rewrite=None, **extra) -> Settings:
    values = dict(extra)
    if routing is not None:
        values["routing_rules_py_module_file"] = str(routing)
    if rewrite is not None:
        values["rewrite_query_py_module_file"] = str(rewrite)
    return Settings(values)


def write(path, text: str):
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path, routing=None, rewrite=None, **extra) -> Hooks:
    return Hooks.from_settings(
        settings(routing, rewrite, **extra), lambda p: str(tmp_path / p)
    )


def reload(hooks: Hooks, tmp_path, routing=None, rewrite=None, **extra) -> list[str]:
    return hooks.reload(
        settings(routing, rewrite, **extra), lambda p: str(tmp_path / p)
    )


@pytest.fixture
def logs(caplog):
    """Records of the "geobouncer" logger, whether or not it propagates."""
    logger = logging.getLogger("geobouncer")
    saved = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(saved[0])
    logger.propagate = saved[1]


def messages(caplog, level=logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


ROUTE_TABLEA = """
    def routing_rules(username, query):
        return "dev.1" if "tablea" in query else None
"""


# -- loading -----------------------------------------------------------------


def test_two_argument_routing_hook(tmp_path):
    path = write(tmp_path / "rules.py", ROUTE_TABLEA)
    hooks = load(tmp_path, routing=path)
    assert (hooks.enabled, hooks.has_routing, hooks.has_rewrite) == (True, True, False)
    assert hooks.route("u", "select * from tablea", False, KNOWN) == "dev.1"
    assert hooks.route("u", "select 1", True, KNOWN) is None
    assert repr(hooks) == f"<Hooks routing_rules={path} (2 args) rewrite_query=off>"


def test_three_argument_hooks_are_told_in_transaction(tmp_path):
    path = write(
        tmp_path / "both.py",
        """
        seen = []
        def routing_rules(username, query, in_transaction):
            seen.append((username, query, in_transaction))
            return "dev.2" if in_transaction else "dev.1"
        def rewrite_query(username, query, in_transaction):
            return f"{query} -- {username} {in_transaction}"
        """,
    )
    hooks = load(tmp_path, routing=path, rewrite=path)
    assert hooks.route("alice", "q", False, KNOWN) == "dev.1"
    assert hooks.route("alice", "q", True, KNOWN) == "dev.2"
    assert hooks.rewrite("bob", "select 1", True) == "select 1 -- bob True"
    assert "(3 args)" in repr(hooks)


def test_one_file_holding_both_hooks_is_imported_once(tmp_path):
    path = write(
        tmp_path / "once.py",
        """
        with open(__file__ + ".loads", "a") as f:
            f.write("x")
        def routing_rules(username, query):
            return None
        def rewrite_query(username, query):
            return None
        """,
    )
    hooks = load(tmp_path, routing=path, rewrite=path)
    assert (tmp_path / "once.py.loads").read_text() == "x"
    assert reload(hooks, tmp_path, routing=path, rewrite=path) == []
    assert (tmp_path / "once.py.loads").read_text() == "xx"


def test_a_relative_path_is_resolved_by_the_caller(tmp_path):
    write(tmp_path / "rules.py", ROUTE_TABLEA)
    hooks = load(tmp_path, routing="rules.py")
    assert hooks.route("u", "tablea", False, KNOWN) == "dev.1"


@pytest.mark.parametrize("value", ["not_enabled", "", "  "])
def test_not_enabled_or_empty_means_off(tmp_path, value):
    hooks = load(tmp_path, routing=value, rewrite=value)
    assert (hooks.enabled, hooks.has_routing, hooks.has_rewrite) == (False,) * 3
    assert hooks.route("u", "q", False, KNOWN) is None
    assert hooks.rewrite("u", "q", False) is None
    assert hooks.stats() == []


@pytest.mark.parametrize(
    "source, reason",
    [
        (None, "no such file"),
        (
            "def routing_rules(username, query)\n    return None\n",
            "syntax error at line 1",
        ),
        (
            "def rewrite_query(username, query):\n    return None\n",
            "defines no function",
        ),
        ("routing_rules = 'dev.1'\n", "is not callable"),
        ("def routing_rules(query):\n    return None\n", "is not callable as"),
        ("def routing_rules(a, b, c, d):\n    return None\n", "is not callable as"),
        ("def routing_rules(*args):\n    return None\n", "is not callable as"),
        ("def routing_rules(u, q, *, k):\n    return None\n", "is not callable as"),
        (
            "import no_such_module_here\n",
            "import failed at line 1: ModuleNotFoundError",
        ),
        ("x = 1\nraise SystemExit(3)\n", "import failed at line 2: SystemExit"),
    ],
)
def test_unusable_modules_are_refused_at_start_up(tmp_path, source, reason):
    path = tmp_path / "bad.py"
    if source is not None:
        path.write_text(source)
    with pytest.raises(HookLoadError) as info:
        load(tmp_path, routing=path)
    assert str(info.value).startswith(f"{path}: ")
    assert reason in str(info.value)
    assert not [name for name in sys.modules if name.startswith("_geobouncer_hook_bad")]


def test_a_good_hook_is_not_kept_when_the_other_is_refused(tmp_path):
    good = write(tmp_path / "good.py", ROUTE_TABLEA)
    with pytest.raises(HookLoadError, match="no_such.py: no such file"):
        load(tmp_path, routing=good, rewrite=tmp_path / "no_such.py")
    assert not [
        name for name in sys.modules if name.startswith("_geobouncer_hook_good")
    ]


def test_default_arguments_count_as_positional(tmp_path):
    path = write(
        tmp_path / "defaults.py",
        """
        def routing_rules(username, query, in_transaction=False):
            return "dev.2" if in_transaction else "dev.1"
        """,
    )
    hooks = load(tmp_path, routing=path)
    assert hooks.route("u", "q", True, KNOWN) == "dev.2"


# -- a hook that raises -------------------------------------------------------


RAISING = """
    def routing_rules(username, query):
        if query == "key":
            return {}["missing"]
        raise ValueError("no rule for this")

    def rewrite_query(username, query):
        if query == "other line":
            raise ValueError("no rule for this")
        raise ValueError("no rule for this")
"""


def test_an_exception_is_counted_every_time_and_logged_once(tmp_path, logs):
    path = write(tmp_path / "raising.py", RAISING)
    hooks = load(tmp_path, routing=path, rewrite=path)
    for i in range(1000):
        assert hooks.route("u", "key" if i % 2 else "q", False, KNOWN) is None
        assert hooks.rewrite("u", "q", False) is None
    errors = [r for r in logs.records if r.levelno >= logging.ERROR]
    assert len(errors) == 3  # ValueError and KeyError from routing, one from rewrite
    assert all(r.exc_info for r in errors)
    assert f"{path}:5" in errors[0].getMessage()  # the hook's line that raised
    routing, rewrite = hooks.stats()
    assert routing[2:5] == (1000, 1000, 0)  # calls, errors, slow_calls
    assert rewrite[2:4] == (1000, 1000)
    assert routing[6].startswith("KeyError: 'missing' (at ")


def test_the_same_error_from_another_line_is_logged_again(tmp_path, logs):
    path = write(tmp_path / "raising.py", RAISING)
    hooks = load(tmp_path, rewrite=path)
    for query in ("q", "other line", "q", "other line"):
        hooks.rewrite("u", query, False)
    assert len(messages(logs, logging.ERROR)) == 2


def test_distinct_errors_past_the_limit_are_summarised(tmp_path, logs, monkeypatch):
    monkeypatch.setattr(hook_module, "MAX_DISTINCT", 3)
    path = write(
        tmp_path / "varying.py",
        """
        def routing_rules(username, query):
            raise ValueError(query)
        """,
    )
    hooks = load(tmp_path, routing=path)
    for i in range(10):
        hooks.route("u", f"query {i}", False, KNOWN)
    lines = messages(logs)
    assert len(lines) == 4
    assert "more distinct problems not logged" in lines[-1]
    assert hooks.stats()[0][3] == 10


def test_base_exceptions_are_not_swallowed(tmp_path):
    """gevent.Timeout and GreenletExit derive from BaseException: they must go through."""
    path = write(
        tmp_path / "stopping.py",
        """
        class Stop(BaseException):
            pass
        def routing_rules(username, query):
            raise Stop()
        """,
    )
    hooks = load(tmp_path, routing=path)
    with pytest.raises(BaseException) as info:
        hooks.route("u", "q", False, KNOWN)
    assert type(info.value).__name__ == "Stop"


# -- unusable return values -----------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["42", "b'dev.1'", "['dev.1']", "'no_such_db'", "''"],
)
def test_route_refuses_junk_and_unknown_keys(tmp_path, logs, value):
    path = write(
        tmp_path / "junk.py",
        f"""
        def routing_rules(username, query):
            return {value}
        """,
    )
    hooks = load(tmp_path, routing=path)
    for _ in range(10):
        assert hooks.route("u", "q", False, KNOWN) is None
    assert len(messages(logs)) == 1
    assert "returned" in messages(logs)[0]
    row = hooks.stats()[0]
    assert row[2:4] == (10, 10)
    assert row[6].startswith("returned ")
    assert len(hooks.stats()) == 1  # no route row for a refused key


def test_route_counts_queries_per_target(tmp_path):
    path = write(
        tmp_path / "split.py",
        """
        def routing_rules(username, query):
            return {"a": "dev.1", "b": "dev.2"}.get(query)
        """,
    )
    hooks = load(tmp_path, routing=path)
    for query in "aababz":
        hooks.route("u", query, False, KNOWN)
    assert hooks.stats()[1:] == [
        ("route", "dev.1", 3, None, None, None, None),
        ("route", "dev.2", 2, None, None, None, None),
    ]


REWRITES = """
    def rewrite_query(username, query):
        if query == "none":
            return None
        if query == "same":
            return "".join(["sa", "me"])  # equal, not identical
        if query == "int":
            return 7
        if query == "bytes":
            return b"select 2"
        return query.replace("sales", "store_sales")
"""


def test_rewrite_returns_none_unless_the_text_changes(tmp_path, logs):
    path = write(tmp_path / "rw.py", REWRITES)
    hooks = load(tmp_path, rewrite=path)
    assert hooks.rewrite("u", "none", False) is None
    assert hooks.rewrite("u", "same", False) is None
    assert hooks.rewrite("u", "select 1", False) is None
    assert hooks.rewrite("u", "from sales", False) == "from store_sales"
    assert messages(logs) == []
    for _ in range(5):
        assert hooks.rewrite("u", "int", False) is None
        assert hooks.rewrite("u", "bytes", False) is None
    assert len(messages(logs)) == 2
    assert hooks.stats()[0][2:4] == (14, 10)


def test_disconnect_on_failure_raises_rewrite_failed(tmp_path):
    path = write(tmp_path / "rw.py", REWRITES)
    raising = write(tmp_path / "raising.py", RAISING)
    hooks = load(
        tmp_path,
        routing=raising,
        rewrite=path,
        rewrite_query_disconnect_on_failure=True,
    )
    assert hooks.rewrite("u", "none", False) is None
    assert hooks.rewrite("u", "from sales", False) == "from store_sales"
    with pytest.raises(RewriteFailed, match="rewrite_query failed: returned 7"):
        hooks.rewrite("u", "int", False)
    assert hooks.route("u", "q", False, KNOWN) is None  # routing is not concerned
    assert reload(hooks, tmp_path, routing=raising, rewrite=raising,
                  rewrite_query_disconnect_on_failure=True) == []  # fmt: skip
    with pytest.raises(RewriteFailed, match="ValueError: no rule for this"):
        hooks.rewrite("u", "q", False)


# -- reload ---------------------------------------------------------------------


def test_reload_picks_up_changed_code_at_the_same_path(tmp_path):
    path = write(
        tmp_path / "rules.py", 'def routing_rules(u, q):\n    return "dev.1"\n'
    )
    hooks = load(tmp_path, routing=path)
    assert hooks.route("u", "q", False, KNOWN) == "dev.1"
    # Same size, same second: a bytecode cache keyed on mtime and size would miss it.
    path.write_text('def routing_rules(u, q):\n    return "dev.2"\n')
    assert reload(hooks, tmp_path, routing=path) == []
    assert hooks.route("u", "q", False, KNOWN) == "dev.2"
    row = hooks.stats()[0]
    assert row[2] == 2  # counters survive a reload of the same file
    assert [r[1] for r in hooks.stats()[1:]] == ["dev.1", "dev.2"]


def test_reload_of_a_broken_module_keeps_the_old_one(tmp_path, logs):
    path = write(tmp_path / "rules.py", ROUTE_TABLEA)
    hooks = load(tmp_path, routing=path)
    path.write_text("def routing_rules(username, query)\n")
    errors = reload(hooks, tmp_path, routing=path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}: syntax error at line 1")
    assert errors[0] in messages(logs, logging.ERROR)[0]
    assert hooks.route("u", "tablea", False, KNOWN) == "dev.1"
    assert hooks.has_routing
    write(path, 'def routing_rules(u, q, t):\n    return "dev.2"\n')
    assert reload(hooks, tmp_path, routing=path) == []
    assert hooks.route("u", "tablea", False, KNOWN) == "dev.2"


def test_reload_turns_hooks_on_and_off(tmp_path):
    path = write(tmp_path / "on_and_off.py", ROUTE_TABLEA)  # a name no other test uses
    hooks = load(tmp_path)
    assert not hooks.enabled
    assert reload(hooks, tmp_path, routing=path) == []
    assert hooks.has_routing and hooks.enabled
    stem = f"_geobouncer_hook_{path.stem}_"
    assert len([n for n in sys.modules if n.startswith(stem)]) == 1
    assert reload(hooks, tmp_path, routing=path) == []
    assert len([n for n in sys.modules if n.startswith(stem)]) == 1  # old one dropped
    assert reload(hooks, tmp_path, routing="not_enabled") == []
    assert not hooks.has_routing and not hooks.enabled
    assert hooks.route("u", "tablea", False, KNOWN) is None
    assert not [n for n in sys.modules if n.startswith(stem)]


def test_reload_rereads_the_disconnect_and_slow_settings(tmp_path):
    path = write(tmp_path / "rw.py", REWRITES)
    hooks = load(tmp_path, rewrite=path)
    assert hooks.rewrite("u", "int", False) is None
    reload(hooks, tmp_path, rewrite=path, rewrite_query_disconnect_on_failure=True)
    with pytest.raises(RewriteFailed):
        hooks.rewrite("u", "int", False)


# -- helper modules next to the hook ---------------------------------------------


def test_a_helper_module_next_to_the_hook_is_imported_and_reloaded(tmp_path):
    helper = f"routing_helper_{tmp_path.name.replace('-', '_')}"
    write(tmp_path / f"{helper}.py", 'TARGET = "dev.1"\n')
    path = write(
        tmp_path / "rules.py",
        f"""
        import {helper}
        def routing_rules(username, query):
            return {helper}.TARGET
        """,
    )
    try:
        hooks = load(tmp_path, routing=path)
        assert hooks.route("u", "q", False, KNOWN) == "dev.1"
        assert str(tmp_path) not in sys.path  # only while importing
        write(tmp_path / f"{helper}.py", 'TARGET = "dev.2"  # changed\n')
        assert reload(hooks, tmp_path, routing=path) == []
        assert hooks.route("u", "q", False, KNOWN) == "dev.2"
    finally:
        sys.modules.pop(helper, None)


# -- slow calls -------------------------------------------------------------------


SLEEPING = """
    import time
    def routing_rules(username, query):
        time.sleep(0.02)
        return None
"""


def test_slow_calls_are_counted_and_logged_at_most_once_per_interval(
    tmp_path, logs, monkeypatch
):
    clock = [1000.0]
    monkeypatch.setattr(hook_module, "_monotonic", lambda: clock[0])
    path = write(tmp_path / "sleepy.py", SLEEPING)
    hooks = load(tmp_path, routing=path, hook_slow_call_ms=10.0)
    for _ in range(3):
        hooks.route("u", "q", False, KNOWN)
    assert hooks.stats()[0][4] == 3
    lines = messages(logs)
    assert len(lines) == 1
    assert "1 call(s) slower than 10 ms" in lines[0]
    clock[0] += hook_module.SLOW_LOG_INTERVAL
    hooks.route("u", "q", False, KNOWN)
    lines = messages(logs)
    assert len(lines) == 2
    assert "3 call(s) slower than 10 ms" in lines[1]  # two held back, plus this one
    assert hooks.stats()[0][4] == 4


def test_a_zero_threshold_turns_slow_call_counting_off(tmp_path, logs):
    path = write(tmp_path / "sleepy.py", SLEEPING)
    hooks = load(tmp_path, routing=path, hook_slow_call_ms=0.0)
    hooks.route("u", "q", False, KNOWN)
    assert hooks.stats()[0][4] == 0
    assert messages(logs) == []


# -- stats ---------------------------------------------------------------------------


def test_stats_rows_have_one_shape(tmp_path):
    routing = write(tmp_path / "rules.py", ROUTE_TABLEA)
    rewrite = write(tmp_path / "rw.py", REWRITES)
    hooks = load(tmp_path, routing=routing, rewrite=rewrite)
    hooks.route("u", "tablea", False, KNOWN)
    hooks.rewrite("u", "q", False)
    rows = hooks.stats()
    assert all(len(row) == len(STATS_COLUMNS) for row in rows)
    assert [row[:4] for row in rows] == [
        ("routing_rules", str(routing), 1, 0),
        ("rewrite_query", str(rewrite), 1, 0),
        ("route", "dev.1", 1, None),
    ]
    assert rows[0][6] == ""
    assert isinstance(rows[0][5], int) and rows[0][5] >= 0
