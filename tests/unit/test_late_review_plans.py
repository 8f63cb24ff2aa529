"""Late review of the shared simple-protocol plans (sharding/template.py,
Planner.plan_text): a text's template plan, evaluated with the constants read
back from the text, must route exactly as the text's own plan, for many query
shapes and constants, under the test mapping (ModMapping) and under PostgreSQL's
hash partitioning. Also the values the planner routes by when a constant is
cast: PostgreSQL routes the row by the value after the cast. Pure: no database.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_shard_plan import make_planner

from geobouncer.sharding.plan import Planner
from geobouncer.sharding.rules import (
    HashMapping,
    ShardedDatabase,
    ShardedTable,
    ShardingError,
)


def hash_planner():
    """users.id int8 and regions.region text, hash-partitioned over 3 shards."""
    sdb = ShardedDatabase("app", ("app_0", "app_1", "app_2"), (
        ShardedTable("users", "users", "app", "id", "int8", HashMapping("int8", 3)),
        ShardedTable("regions", "public.regions", "app", "region", "text", HashMapping("text", 3)),
    ))
    return Planner(sdb, cache_size=64)


PLANNERS = {"mod": make_planner, "hash": hash_planner}


def routed(plan, params):
    """What resolve_targets acts on: kind, hint, write and the shards (or the refusal)."""
    try:
        return plan.kind, plan.hint, plan.write, plan.targets(params, ())
    except ShardingError as exc:
        return plan.kind, plan.hint, plan.write, ("raises", exc.sqlstate)


def both(factory, sql):
    """(the text's own routing, the routing plan_text gives it)."""
    try:
        own = routed(factory().plan(sql), ())
    except ShardingError as exc:
        own = ("raises", exc.sqlstate)
    try:
        plan, params = factory().plan_text(sql)
        shared = routed(plan, params)
    except ShardingError as exc:
        shared = ("raises", exc.sqlstate)
    return own, shared


# --- constants the way a client writes them -------------------------------------------
_INT_FORMS = ["{n}", "-{n}", "0{n}", "00{n}", "({n})", "(({n}))", "+{n}", "- {n}", "-({n})",
              "'{n}'", "' {n}'", "'{n} '", "'+{n}'", "'0{n}'", "{n}::bigint", "{n}::int8",
              "'{n}'::bigint", "bigint '{n}'", "int8 '{n}'", "cast({n} as bigint)",
              "cast('{n}' as int8)", "{n}::int4::int8", "{n}.0", "{n}.", "{n}e0", "'{n}'::text::int8",
              "{n} + 0", "0 + {n}", "{n} - 1", "-(-{n})", "{n}::text", "E'{n}'", "U&'{n}'",
              "{n}::numeric", "{n}::smallint"]
_TEXT_FORMS = ["'{s}'", "'{s}'::text", "text '{s}'", "'{s}'::varchar", "cast('{s}' as text)",
               "E'{s}'", "'{s}' collate \"C\"", "'{s}'::char(3)", "'{s}' || ''", "lower('{s}')",
               "'{s}'::name::text", "('{s}')"]
_SHAPES = [
    "select * from users where id = {k}",
    "select * from users where {k} = id",
    "select * from users where id = {k} and name = 'a''b'",
    "select * from users where id = {k} -- it's a comment with $$ and ' inside\n",
    "select * from users /* it's a 'comment' $$ */ where id = {k}",
    "select * from users where id in ({k}, 7)",
    "select * from users where id in ({k})",
    "select * from users where id = {k} or id = 1",
    "select * from users where id = {k} and true",
    "select * from users where id = {k} and id is not null",
    "select * from users where id = {k} and name is null",
    "select * from users u where u.id = {k} limit 1",
    "update users set name = 'x' where id = {k} returning id",
    "delete from users where id = {k}",
    "insert into users (id, name) values ({k}, 'x')",
    "insert into users (name, id) values ('x', {k})",
    "select * from users where id = {k}; select 1 from users where id = 1",
    "select * from users where id = {k};",
    "/* geobouncer:shard=2 */ select * from users where id = {k}",
    "select * from users where id = {k} /* geobouncer:shard=0 */",
    "select * from users where id = {k} and name = '/* geobouncer:shard=2 */'",
    "select * from users where id = any('{{{k}, 5}}')",
    "select * from users where id = any(array[{k}, 5])",
    "select ARRAY[1, 2], 'ünï', {k} from users where id = {k}",
]
_TEXT_SHAPES = [
    "select * from regions where region = {k}",
    "select * from regions where region = {k} and 1 = 1",
    "select * from regions where region in ({k}, 'eu')",
    "insert into regions (region, n) values ({k}, 1)",
    "update regions set n = -1 where region = {k}",
]


def _text(draw_s):
    return draw_s.replace("'", "''")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.one_of(st.integers(0, 40), st.integers(0, 2**63 - 1), st.just(2**63)),
       form=st.sampled_from(_INT_FORMS), shape=st.sampled_from(_SHAPES),
       planner=st.sampled_from(sorted(PLANNERS)))
def test_template_and_text_agree_on_integer_keys(n, form, shape, planner):
    sql = shape.format(k=form.format(n=n))
    own, shared = both(PLANNERS[planner], sql)
    assert shared == own, sql


@settings(max_examples=300, deadline=None)
@given(s=st.text(alphabet="euszA' $;-/*\\\"x0", max_size=6), form=st.sampled_from(_TEXT_FORMS),
       shape=st.sampled_from(_TEXT_SHAPES), planner=st.sampled_from(sorted(PLANNERS)))
def test_template_and_text_agree_on_text_keys(s, form, shape, planner):
    sql = shape.format(k=form.format(s=_text(s)))
    own, shared = both(PLANNERS[planner], sql)
    assert shared == own, sql


@pytest.mark.parametrize("sql", [
    "select * from users where id = 3 - 1", "select * from users where id = -(-5)",
    "select * from users where id = 5.5", "select * from users where id = 1e1",
    "select * from users where id = 9223372036854775808", "select * from users where id = 0x10",
    "select * from users where id = 1_000", "select * from users where id = null",
    "select * from users where id = true", "select * from users where id = DATE '2020-01-01'",
    "select * from users where id = '5'::bigint", "select * from regions where region = E'u\\'s'",
    "select * from regions where region = $$us$$", "select * from regions where region = 'u' 's'",
    "select * from regions where region = 'ünï'",
    "select * from regions where region = B'101'", "select * from regions where region = X'1F'",
    "select * from users where id = 1; select * from users where id = 2",
    "select * from users where id = 1; select * from users where id = 4",
    "select * from users where id = 4 /* geobouncer:shard=x */",
])
def test_template_and_text_agree_on_odd_constants(sql):
    for factory in PLANNERS.values():
        own, shared = both(factory, sql)
        assert shared == own, sql


# --- found --------------------------------------------------------------------------
@pytest.mark.parametrize("sql", [
    "select * from regions where region = '0'\n'x'",
    "insert into regions (region, n) values ('e'\n'u', 1)",
])
def test_a_continued_string_shares_the_texts_route(sql):
    for factory in PLANNERS.values():
        own, shared = both(factory, sql)
        assert shared == own, sql


@pytest.mark.parametrize("sql", [
    "select * from regions where region = cast(010 as text)",
    "insert into regions (region, n) values (010::text, 1)",
    "select * from regions where region = cast(-0 as text)",          # PostgreSQL's '0'
    "insert into regions (region, n) values (cast(-00 as text), 1)",
])
def test_cast_integer_with_leading_zeros_shares_the_texts_route(sql):
    own, shared = both(hash_planner, sql)
    assert shared == own


def _route_of(planner, sql):
    return planner.plan(sql).targets(())


@pytest.mark.parametrize("cast, value", [
    ("1e1::text", "10"), (".5::text", "0.5"), ("'010'::int::text", "10"),
    ("'us '::char(3)::text", "us"), ("1.0e0::text", "1.0"),
])
def test_a_cast_constant_routes_by_the_value_after_the_cast(cast, value):
    """PostgreSQL stores the value after the casts (1e1::text is '10'): the
    planner routes by that value or refuses the text (it does not compute
    casts); never the shard of the text before them."""
    planner = hash_planner()
    insert = planner.plan(f"insert into regions (region, n) values ({cast}, 1)")
    if insert.kind == "error":
        assert insert.error[0] == "0A000"
    else:
        assert insert.targets(()) == _route_of(planner, f"select * from regions where region = '{value}'")
    lookup = planner.plan(f"select * from regions where region = {cast}")
    assert lookup.targets(()) in (None, _route_of(planner, f"select * from regions where region = '{value}'"))
