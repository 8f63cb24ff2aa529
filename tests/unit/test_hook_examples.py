"""The example hooks in conf/: their functions called directly, and loaded as hooks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from geobouncer.config import Settings
from geobouncer.routing import Hooks

CONF = Path(__file__).resolve().parents[2] / "conf"


def module(name: str):
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", CONF / f"{name}.py"
    )
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def hooks_for(setting: str, filename: str) -> Hooks:
    return Hooks.from_settings(Settings({setting: filename}), lambda p: str(CONF / p))


# -- conf/routing_rules.py: pgbouncer-rr's routing table -------------------------

routing = module("routing_rules")


@pytest.mark.parametrize(
    "query, target",
    [
        ("select * from tablea;", "dev.1"),
        ("SELECT * FROM TableA WHERE id = 1", "dev.1"),
        ("insert into tablea values (1)", "dev.1"),
        ("select * from tableb", "dev.2"),
        ("select * from tablea join tableb using (id)", "dev.1"),  # first rule wins
        ("select * from tablea_archive", None),  # whole words only
        ("select * from mytableb", None),
        ("select 1", None),
        ("", None),
    ],
)
def test_routing_table(query, target):
    assert routing.routing_rules("master", query) == target
    assert routing.routing_rules("master", query, True) == target


def test_routing_table_loads_as_a_three_argument_hook():
    hooks = hooks_for("routing_rules_py_module_file", "routing_rules.py")
    assert "(3 args)" in repr(hooks)
    known = {"dev", "dev.1", "dev.2"}.__contains__
    assert hooks.route("u", "select * from tableb", False, known) == "dev.2"
    assert hooks.route("u", "select 1", False, known) is None
    assert hooks.route("u", "select * from tablea", False, {"dev"}.__contains__) is None


# -- conf/rewrite_query.py: the star-schema rewrite --------------------------------

rewrite = module("rewrite_query")

STORE = (
    "SELECT storename, SUM(total) FROM sales JOIN store USING (storeid) "
    "GROUP BY storename ORDER BY storename"
)
PRODUCT = (
    "SELECT prodname, SUM(total) FROM sales JOIN product USING (productid) "
    "GROUP BY prodname ORDER BY prodname"
)
STORE_FAST = (
    "SELECT storename, SUM(total) FROM store_sales "
    "GROUP BY storename ORDER BY storename"
)
PRODUCT_FAST = (
    "SELECT prodname, SUM(total) FROM product_sales GROUP BY prodname ORDER BY prodname"
)


@pytest.mark.parametrize(
    "query, expected",
    [
        (STORE, STORE_FAST),
        (STORE + ";", STORE_FAST),
        (PRODUCT, PRODUCT_FAST),
        (PRODUCT + " ;\n", PRODUCT_FAST),
        (PRODUCT.lower(), PRODUCT_FAST),
        (
            (
                "select prodname,sum( total )\n  from sales\n"
                "  join product using(productid)\n  group by prodname\n  order by prodname"
            ),
            PRODUCT_FAST,
        ),
    ],
)
def test_star_schema_reports_read_the_pre_aggregated_tables(query, expected):
    assert rewrite.rewrite_query("report", query) == expected


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM sales",
        STORE.replace("GROUP BY", "WHERE storeid > 3 GROUP BY"),
        STORE.replace("storename ORDER BY storename", "storename"),
        STORE + "; DELETE FROM sales",
        "SELECT storename, SUM(total) FROM salesJOIN store USING (storeid)",
    ],
)
def test_other_queries_are_returned_unchanged(query):
    assert rewrite.rewrite_query("report", query) is query


def test_star_schema_rewrite_loads_as_a_two_argument_hook():
    hooks = hooks_for("rewrite_query_py_module_file", "rewrite_query.py")
    assert "rewrite_query=" in repr(hooks) and "(2 args)" in repr(hooks)
    assert hooks.rewrite("u", STORE, False) == STORE_FAST
    assert hooks.rewrite("u", "select 1", False) is None


# -- conf/rw_split.py: read/write split ----------------------------------------------

rw = module("rw_split")

READS = [
    "select 1",
    "SELECT * FROM accounts WHERE id = 7;",
    "  -- a comment first\n  select now()",
    "/* hint */ SELECT count(*) FROM t",
    "(select 1) union (select 2)",
    "with recent as (select * from t) select * from recent",
    "values (1), (2)",
    "table accounts",
    "select 'for update', \"into\" from t",  # keywords inside quotes do not count
    "select update_count, last_insert from stats",
]
WRITES = [
    "insert into t values (1)",
    "UPDATE t SET x = 1",
    "delete from t",
    "select * from t for update",
    "SELECT * FROM t FOR NO KEY UPDATE",
    "select * from t for share",
    "select * from t for key share skip locked",
    "select * into t2 from t",
    "with gone as (delete from t returning *) select * from gone",
    "select nextval('ids')",
    "select pg_advisory_lock(1)",
    "select set_config('x.y', '1', false)",
    "select 1; delete from t",
    "begin",
    "SET search_path = app",
    "create table t (x int)",
    "explain analyze delete from t",
    "vacuum",
    "",
    "; ;",
]


@pytest.mark.parametrize("query", READS)
def test_reads_outside_a_transaction_go_to_the_replica(query):
    assert rw.routing_rules("app", query, False) == rw.REPLICA == "app_replica"


@pytest.mark.parametrize("query", READS)
def test_reads_inside_a_transaction_stay_on_the_primary(query):
    assert rw.routing_rules("app", query, True) == rw.PRIMARY == "app"


@pytest.mark.parametrize("query", WRITES)
def test_everything_else_goes_to_the_primary(query):
    assert rw.routing_rules("app", query, False) == rw.PRIMARY
    assert not rw.is_read_only(query)


def test_rw_split_loads_as_a_three_argument_hook():
    hooks = hooks_for("routing_rules_py_module_file", "rw_split.py")
    known = {"app", "app_replica"}.__contains__
    assert hooks.route("u", "select 1", False, known) == "app_replica"
    assert hooks.route("u", "select 1", True, known) == "app"
    assert hooks.route("u", "update t set x = 1", False, known) == "app"
