"""Planner/Plan of geobouncer.sharding.plan (pure: no database)."""
import struct

import pytest

from geobouncer.sharding.merge import Agg, MergeSpec, SortKey
from geobouncer.sharding.plan import Planner
from geobouncer.sharding.rules import ShardedDatabase, ShardedTable, ShardingError


class ModMapping:
    """value % 3 for ints, a fixed dict for text (rules' real mappings are tested by s1)."""

    def shard_for(self, value):
        if isinstance(value, int):
            return value % 3
        return {"eu": 0, "us": 1}.get(value)


def make_planner():
    m = ModMapping()
    sdb = ShardedDatabase("app", ("app_0", "app_1", "app_2"), (
        ShardedTable("users", "users", "app", "id", "int8", m),
        ShardedTable("by_user", None, "app", "user_id", "int8", m),
        ShardedTable("regions", "public.regions", "app", "region", "text", m),
    ))
    return Planner(sdb, cache_size=64)


@pytest.fixture(scope="module")
def planner():
    return make_planner()


KINDS = [
    ("BEGIN", "begin"), ("begin isolation level serializable", "begin"),
    ("START TRANSACTION READ ONLY", "begin"), ("COMMIT", "commit"), ("END", "commit"),
    ("ROLLBACK", "rollback"), ("ABORT", "rollback"), ("COMMIT AND CHAIN", "error"),
    ("SET geobouncer.shard = 2", "set_shard"), ("set geobouncer.shard to 0", "set_shard"),
    ("SET geobouncer.shard = -1", "error"), ("SET geobouncer.sharding_key = 'abc'", "set_key"),
    ("SET geobouncer.sharding_key = 17", "set_key"), ("RESET geobouncer.shard", "reset_shard"),
    ("SET geobouncer.shard TO DEFAULT", "reset_shard"), ("SET search_path = x", "all"),
    ("CREATE TABLE t (a int)", "all"), ("VACUUM", "all"), ("SAVEPOINT a", "all"),
    ("", "all"), ("-- only a comment", "all"), ("/* c */", "all"), ("selekt 1 frm", "all"),
    ("\x00\xff garbage ' unterminated", "all"), ("SELECT 1", "route"),
    ("select * from users where id = 1", "route"), ("SELECT 'ünïcødé ☃'", "route"),
    ("select 1; select 2", "all"), ("select 1 from users where id=1; select 2 from users where id=4", "route"),
    ("select 1 from users where id=1; select 2 from users where id=2", "error"),
    ("BEGIN; select 1", "error"), ("update users set id = 5 where id = 1", "error"),
    ("update orders set user_id = 5", "error"), ("update orders set n = 5", "route"),
    ("insert into users values (3, 'a')", "error"), ("insert into users (id) select 1", "error"),
    ("insert into users (id) values (default)", "error"),
    ("insert into users (id) values (1), (null)", "error"),
    ("/* geobouncer:shard=1 */ insert into users (name) values ('x')", "route"),
    ("insert into orders (n) values (1)", "route"), ("insert into other values (1)", "route"),
    ("COPY users (id, name) FROM STDIN", "route"), ("select 1 into t2 from users", "all"),
    ("RESET ALL", "all"), ("SET geobouncer.shard = '1'", "set_shard"), ("COPY users TO STDOUT", "all"),
    ("insert into users (id, name) values (1, 'a') on conflict (id) do update set id = 2", "error"),
    ("insert into orders (user_id, n) values (1, 2) on conflict do update set user_id = excluded.user_id",
     "error"),
    ("insert into users (id, name) values (1, 'a') on conflict (id) do update set name = 'b'", "route"),
    ("insert into users (id, name) values (1, 'a') on conflict do nothing", "route"),
]


@pytest.mark.parametrize("sql,kind", KINDS)
def test_kind(planner, sql, kind):
    p = planner.plan(sql)
    assert p.kind == kind, p
    if kind == "error":
        assert p.error[0] in ("0A000", "22023")


def test_values_and_sql(planner):
    assert planner.plan("SET geobouncer.shard = 2").value == 2
    assert planner.plan("SET geobouncer.sharding_key = 'abc'").value == "abc"
    p = planner.plan("START TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    assert p.sql == "START TRANSACTION ISOLATION LEVEL REPEATABLE READ"


@pytest.mark.parametrize("sql,hint", [
    ("/* geobouncer:shard=2 */ select 1", 2), ("select 1 /*geobouncer:shard = 0*/", 0),
    ("select 1", None), ("/* geobouncer:shard=x */ select 1", None),
    ("/* geobouncer:shard=1 */ garbage(", 1), ("select '/* geobouncer:shard=1 */'", None),
    ("select 'ünï☃' /* geobouncer:shard=2 */", 2), ("select 1 /* geobouncer:shard=1", None),
    ("select 1 -- geobouncer:shard=1", None),
])
def test_hint(planner, sql, hint):
    assert planner.plan(sql).hint == hint


@pytest.mark.parametrize("sql", ["/* geobouncer:shard=x */ select 1", "/* geobouncer:shard=-1 */ select 1",
                                 "/* geobouncer:shard=1e9 */ select * from users where id = 1",
                                 "/* geobouncer:shard= */ select 1"])
def test_a_hint_that_cannot_be_read_is_an_error_not_ignored(planner, sql):
    p = planner.plan(sql)
    assert p.kind == "error" and p.error[0] == "22023", p


@pytest.mark.parametrize("sql,write", [
    ("insert into users (id) values (1)", True), ("update users set a=1 where id=1", True),
    ("delete from users where id=1", True), ("select 1 from users", False),
    ("create table x (a int)", True), ("select * from users where id=1 for update", True),
    ("COPY users FROM STDIN", True), ("explain select 1 from users", False),
    ("with d as (delete from users where id = 1 returning *) select * from d", True),
    ("with d as (select 1) select * from d", False),
    ("explain analyze delete from users where id = 1", True),
])
def test_write(planner, sql, write):
    assert planner.plan(sql).write is write


TARGETS = [
    ("select * from users where id = 4", {1}),
    ("select * from users where id = '5'", {2}),
    ("select * from users where 6 = id", {0}),
    ("select * from users where id = 4::bigint", {1}),
    ("select * from users u where u.id = 7", {1}),
    ("select * from public.users where users.id = 7", {1}),
    ("select * from users where id in (1, 2, 4)", {1, 2}),
    ("select * from users where id = 1 or id = 3", {0, 1}),
    ("select * from users where id = 1 and name = 'x'", {1}),
    ("select * from users where (id = 1 or id = 2) and id = 2", {2}),
    ("select * from users where id = 1 or name = 'x'", None),
    ("select * from users where id = 2 and id = 1", {2}),
    ("select * from users where id = 1 and id = 4", {1}),
    ("select * from users where id > 1", None),
    ("select * from users where id <> 1", None),
    ("select * from users where not id = 1", None),
    ("select * from users", None),
    ("select * from users where id = any('{1,4}')", {1}),
    ("select * from users where id = any('{1,\"4\"}')", None),
    ("select * from users where id is null", None),
    ("select * from users where id = null", None),
    ("select * from other where id = 1", None),
    ("select * from orders where user_id = 5", {2}),
    ("select * from orders o join items i on i.oid = o.id where o.user_id = 3", {0}),
    ("select * from users u join orders o on o.user_id = u.id where u.id = 2", {2}),
    ("select * from users u, orders o where o.user_id = 4 and u.id = o.user_id", {1}),
    ("select * from x where user_id = 1", {1}),
    ("select * from regions where region = 'us'", {1}),
    ("select * from other.regions where region = 'us'", None),
    ("select * from users where id = (select 1)", None),
    ("select * from users where id in (select id from users where id = 1)", None),
    ("select * from (select * from users where id = 1) s", None),
    ("update users set name = 'x' where id = 8", {2}),
    ("delete from users where id = 9", {0}),
    ("delete from orders o using users u where u.id = 1", {1}),
    ("insert into users (id, name) values (3, 'a')", {0}),
    ("insert into users (name, id) values ('a', 3), ('b', 6)", {0}),
    ("insert into users (name, id) values ('a', 3), ('b', 4)", {0, 1}),
    ("insert into orders (user_id, n) values (2, 1)", {2}),
    ("select 1 union all select 2 from users where id = 1", None),
    ("explain select * from users where id = 1", {1}),
    ("with a as (select 1) select * from users where id = 1", {1}),
]


@pytest.mark.parametrize("sql,expected", TARGETS)
def test_targets(planner, sql, expected):
    p = planner.plan(sql)
    assert p.kind == "route", p
    got = p.targets()
    assert got == (None if expected is None else frozenset(expected))


@pytest.mark.parametrize("params,formats,expected", [
    ((b"4",), (), {1}), ((b"4",), (0,), {1}), ((struct.pack(">q", 5),), (1,), {2}),
    ((struct.pack(">q", 6),), (1, 1), {0}),
])
def test_param_targets(planner, params, formats, expected):
    assert planner.plan("select * from users where id = $1").targets(params, formats) \
        == frozenset(expected)


def test_param_two_and_formats(planner):
    p = planner.plan("select * from users where name = $1 and id = $2")
    assert p.targets((b"x", struct.pack(">q", 7)), (0, 1)) == frozenset({1})
    p = planner.plan("insert into users (id, name) values ($1, $2), ($3, 'z')")
    assert p.targets((b"1", b"a", b"4")) == frozenset({1})


@pytest.mark.parametrize("sql,params", [
    ("select * from users where id = 'abc'", ()),
    ("select * from users where id = $1", (b"nope",)),
    ("select * from users where id = $1", (None,)),
    ("select * from users where id = $2", (b"1",)),
    ("select * from regions where region = 'mars'", ()),
])
def test_bad_keys_raise_sharding_error(planner, sql, params):
    with pytest.raises(ShardingError):
        planner.plan(sql).targets(params)


def test_split(planner):
    p = planner.plan("insert into users (id, name) values (1, 'a'), (2, 'b'), (4, 'c') "
                     "returning id")
    parts = p.split()
    assert set(parts) == {1, 2}
    assert "(1, 'a'), (4, 'c')" in parts[1] and "RETURNING" in parts[1].upper()
    assert "(2, 'b')" in parts[2] and "'a'" not in parts[2]
    assert planner.plan("insert into users (id) values (1), (4)").split() is None
    assert planner.plan("insert into users (id) values (1)").split() is None
    # the cached plan's tree is left intact by split
    assert p.split() == parts


def test_split_params(planner):
    p = planner.plan("insert into users (id) values ($1), ($2)")
    assert p.split((b"1", b"4")) is None
    with pytest.raises(ShardingError) as e:
        p.split((b"1", b"2"))
    assert e.value.sqlstate == "0A000"


MERGES = [
    ("select id, name from users", None, None),
    ("select id, name from users order by 2 desc", MergeSpec(order_by=(SortKey(1, True),)),
     None),
    ("select id as k from users order by k nulls first",
     MergeSpec(order_by=(SortKey(0, False, True),)), None),
    ("select id, lower(name) from users order by lower(name)",
     MergeSpec(order_by=(SortKey(1),)), None),
    ("select * from users order by 1", MergeSpec(order_by=(SortKey(0),)), None),
    ("explain select id from users order by 1", None, None),
    ("select id from users order by id limit 10", MergeSpec(order_by=(SortKey(0),), limit=10),
     None),
    ("select id from users order by id limit 10 offset 5",
     MergeSpec(order_by=(SortKey(0),), limit=10, offset=5), "LIMIT 15"),
    ("select count(*), sum(a), min(a), max(a) from users",
     MergeSpec(aggregates=(Agg(0, "count"), Agg(1, "sum"), Agg(2, "min"), Agg(3, "max"))),
     None),
    ("select g, avg(a) from users group by g",
     MergeSpec(group_by=(0,), aggregates=(Agg(1, "avg", 2),), visible=2), "sum(a)"),
    ("select distinct a from users", MergeSpec(distinct=True), None),
    ("select g, count(*) from users group by 1 order by 2 desc limit 3",
     MergeSpec(order_by=(SortKey(1, True),), limit=3, group_by=(0,),
               aggregates=(Agg(1, "count"),)), "FROM users GROUP BY 1 ORDER BY 2 DESC"),
]


@pytest.mark.parametrize("sql,spec,shard_sql", MERGES)
def test_merge(planner, sql, spec, shard_sql):
    p = planner.plan(sql)
    assert p.merge_error is None
    assert p.merge == spec
    if shard_sql is None:
        assert p.shard_sql is None
    else:
        assert shard_sql in p.shard_sql
        assert "OFFSET" not in p.shard_sql.upper()


def test_merge_avg_shard_sql(planner):
    p = planner.plan("select g, avg(a) from users group by g")
    assert p.shard_sql.replace(" ", "") == "SELECTg,sum(a),count(a)FROMusersGROUPBYg"


@pytest.mark.parametrize("sql,word", [
    ("select id, row_number() over () from users", "window"),
    ("select id from users order by name", "ORDER BY"),
    ("select * from users order by id", "ORDER BY"),
    ("select * from users order by 2", "position 2"),
    ("select distinct on (a) a from users", "DISTINCT ON"),
    ("select g, count(*) from users group by g having count(*) > 1", "HAVING"),
    ("select array_agg(a) from users", "array_agg"),
    ("select count(distinct a) from users", "count"),
    ("select id from users limit $1", "LIMIT"),
    ("select g, count(*) from users", "neither grouped"),
    ("select count(*) + 1 from users", "aggregates inside"),
    ("with c as (select count(*) n from users) select n from c", "aggregates inside"),
    ("select a from users union select a from users", "UNION"),
    ("select a, count(*) from users group by rollup(a)", "GROUP"),
    ("select a from users order by a fetch first 2 rows with ties", "WITH TIES"),
])
def test_merge_errors(planner, sql, word):
    p = planner.plan(sql)
    assert p.kind == "route"  # the error only applies when several shards answer
    assert p.merge_error[0] == "0A000" and word in p.merge_error[1]
    assert p.merge is None


def test_copy(planner):
    p = planner.plan("COPY public.users (name, id) FROM STDIN WITH (FORMAT csv, HEADER true, "
                     "DELIMITER ';', NULL 'x')")
    c = p.copy
    assert (c.table, c.schema, c.columns, c.format, c.delimiter, c.null, c.header) == \
        ("users", "public", ("name", "id"), "csv", ";", "x", True)
    assert c.quote == '"' and c.key_rule.column == "id"
    c = planner.plan("COPY other FROM STDIN").copy
    assert c.key_rule is None and [r.name for r in c.key_candidates] == ["by_user"]
    assert c.format == "text" and c.delimiter == "\t" \
        and c.null == "\\N" and c.columns is None
    assert planner.plan("COPY orders (user_id) FROM STDIN (FORMAT binary)").copy.key_rule.name \
        == "by_user"
    c = planner.plan("COPY users FROM STDIN").copy
    assert c.key_rule.name == "users" and c.key_candidates == ()


@pytest.mark.parametrize("sql", [
    "select * from users where id in (%s)" % ",".join(str(i) for i in range(20000)),
    "select " + "(" * 500 + "1" + ")" * 500,
    "select * from users where " + " or ".join("id = %d" % i for i in range(2000)),
    "select (select (select (select id from users where id = 1)))",
    "\u202e\ufeff select 1",
    "select * from users where " + "id = 1 or (" * 300 + "id = 2" + ")" * 300,
    "select * from users where " + "id = 1 and (" * 300 + "id = 2" + ")" * 300,
    "select 1 /* unterminated",
    ";;;",
    "select $99999999999",
    "x" * 100000,
])
def test_hostile(planner, sql):
    p = planner.plan(sql)
    assert p.kind in ("route", "all", "error")
    if p.kind == "route":
        p.targets()


def test_cache_bounded_and_reused(planner):
    p = planner.plan("select 42")
    assert planner.plan("select 42") is p
    for i in range(200):
        planner.plan("select %d" % i)
    assert len(planner._cache) <= 64
    big = "select 1 from users where id = 1 " + " " * 20000
    assert planner.plan(big).targets() == frozenset({1})
    assert big not in planner._cache


def test_plan_immutable(planner):
    with pytest.raises(AttributeError):
        planner.plan("select 1").kind = "all"
