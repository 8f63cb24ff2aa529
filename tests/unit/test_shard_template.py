"""Plans shared by texts that differ only in their constants (sharding/template.py):
the constants read back from the text are exactly the values the text's own
plan would route by, and whatever the template cannot cover falls back to the
text's own plan. Pure: no database."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_shard_plan import KINDS, TARGETS, make_planner

from geobouncer.sharding.rules import ShardingError
from geobouncer.sharding.template import constants


def outcome(plan, params):
    try:
        return plan.kind, plan.targets(params, ())
    except ShardingError as exc:
        return "raises", exc.sqlstate


@pytest.mark.parametrize("sql", [s for s, _ in TARGETS] + [s for s, _ in KINDS])
def test_template_routes_as_the_text_itself(sql):
    own = make_planner().plan(sql)
    plan, params = make_planner().plan_text(sql)
    assert outcome(plan, params) == outcome(own, ())
    if plan.sql != sql:                           # shared: only when it names the shards
        assert plan.targets(params, ()) is not None


def test_constants_read_back():
    assert constants("select * from users where id = 17") == ("select * from users where id = $1", [b"17"])
    assert constants("select 1 from users where id = -5 and name = 'it''s' limit 3")[1] == \
        [b"1", b"-5", b"it's", b"3"]
    for text in ("select * from users where id = $1",          # parameters already
                 "select * from regions where region = E'u\\x73'",   # an escape string
                 "select * from regions where region = $$us$$"):
        assert constants(text) is None
    plan, params = make_planner().plan_text("select 'ünï' from users where id = 1")
    assert plan.sql == "select 'ünï' from users where id = 1" and params == ()   # not ASCII: itself


def test_many_keys_share_one_parse():
    planner = make_planner()
    for key in range(200):
        plan, params = planner.plan_text(f"SELECT abalance FROM users WHERE id = {key}")
        assert plan.targets(params, ()) == frozenset((key % 3,))
    assert len(planner._cache) == 1


@settings(max_examples=200, deadline=None)
@given(key=st.integers(min_value=-2**63, max_value=2**63 - 1),
       region=st.text(alphabet="abcdefghijklmnopqrstuvwxyz' ", max_size=8),
       shape=st.sampled_from([
           "select * from users where id = {k}",
           "select * from users where id = {k} and name = '{r}'",
           "update users set name = '{r}' where id = {k}",
           "delete from users where id in ({k}, 7)",
           "select * from regions where region = '{r}' and {k} > 0",
           "insert into users (id, name) values ({k}, '{r}')",
       ]))
def test_template_and_text_agree_on_random_constants(key, region, shape):
    sql = shape.format(k=key, r=region.replace("'", "''"))
    own = make_planner().plan(sql)
    plan, params = make_planner().plan_text(sql)
    assert outcome(plan, params) == outcome(own, ())
