"""merge_results against real PostgreSQL arithmetic: a table's rows split into
3 subsets (plus an empty one) stand for shards; each subset's result, as text
with the real type OIDs, is merged and compared with the whole table's result.
"""

from __future__ import annotations

import psycopg2
import psycopg2.extensions as ext
import pytest

from geobouncer.proto.messages import command_complete, data_row, row_description
from geobouncer.sharding.merge import Agg, MergeSpec, SortKey, merge_results
from geobouncer.sharding.rows import parse_data_row, parse_row_description

SUBSETS = ["id % 3 = 0", "id % 3 = 1", "false", "id % 3 = 2"]
_OIDS = (16, 20, 21, 23, 25, 700, 701, 1043, 1700, 1082, 1114)
_RAW = ext.new_type(_OIDS, "RAW_TEXT", lambda s, cur: s)


@pytest.fixture(scope="module")
def cur(pg):
    conn = psycopg2.connect(host=pg.host, port=pg.port, dbname="app", user="app", password="app_pw")
    conn.autocommit = True
    ext.register_type(_RAW, conn)
    c = conn.cursor()
    c.execute("CREATE TEMP TABLE m (id int PRIMARY KEY, i int4, b int8, n numeric, f float8, g text, r real)")
    rows = []
    for k in range(1, 200):
        sign = -1 if k % 4 == 0 else 1
        n = None if k % 11 == 0 else f"{sign * ((k * 7919) % 100003)}e-{k % 7}"
        i = None if k % 13 == 0 else sign * (k * 37 % 1000)
        b = 9_000_000_000_000_000 + k * 12345 if k % 5 else -k
        f = None if k % 17 == 0 else sign * k * 0.25
        g = None if k % 19 == 0 else "grp" + chr(65 + k % 5)
        rows.append((k, i, b, n, f, g, None if f is None else f * 1000))
    c.executemany("INSERT INTO m VALUES (%s, %s, %s, %s::numeric, %s, %s, %s)", rows)
    c.execute("INSERT INTO m VALUES (1000, NULL, NULL, 'NaN', 'Infinity', 'grpZ', '1e30'),"
              " (1001, 5, NULL, '-Infinity', 'NaN', 'grpZ', NULL),"
              " (1002, 6, 7, '0.000', '-Infinity', '', '-1.5e-7')")
    yield c
    conn.close()


def reply(cur, sql):
    cur.execute(sql)
    cols = [(d.name, d.type_code) for d in cur.description]
    rows = cur.fetchall()
    msgs = [row_description(cols)] + [data_row(list(r)) for r in rows]
    msgs.append(command_complete(f"SELECT {len(rows)}"))
    return [(m[0], m[5:]) for m in msgs], cols, [list(r) for r in rows]


def merged(cur, spec, shard_sql):
    streams = [reply(cur, shard_sql.format(where=w))[0] for w in SUBSETS]
    out = list(merge_results(spec, [iter(s) for s in streams]))
    assert out[-1][:1] == b"C", out[-1]
    cols = [(f[0].decode(), f[3]) for f in parse_row_description(out[0][5:])]
    rows = [[None if v is None else v.decode() for v in parse_data_row(m[5:])] for m in out if m[:1] == b"D"]
    assert out[-1] == command_complete(f"SELECT {len(rows)}")
    return cols, rows


AGGS = [("count", "*"), ("count", "n"), ("sum", "i"), ("min", "i"), ("max", "i"), ("avg", "i"),
        ("sum", "n"), ("avg", "n"), ("min", "n"), ("max", "n"), ("sum", "b"), ("avg", "b"),
        ("max", "g"), ("min", "g"), ("sum", "f"), ("avg", "f"), ("min", "f"), ("max", "f"),
        ("sum", "r"), ("avg", "r"), ("max", "r"), ("count", "r")]


def agg_queries(where_whole="true", group=None):
    whole, shard, aggs, hidden = [], [], [], []
    offset = 1 if group else 0
    for pos, (func, arg) in enumerate(AGGS, offset):
        whole.append(f"{func}({arg}) AS c{pos}")
        if func == "avg":
            # avg(real) adds in float8: the shards must too (the planner's rewrite)
            shard.append(f"sum({arg}{'::float8' if arg == 'r' else ''}) AS c{pos}")
            hidden.append(f"count({arg}) AS h{pos}")
            aggs.append(Agg(pos, "avg", count_column=offset + len(AGGS) + len(hidden) - 1))
        else:
            shard.append(f"{func}({arg}) AS c{pos}")
            aggs.append(Agg(pos, func))
    head = [f"{group} AS c0"] if group else []
    tail = f" GROUP BY {group} ORDER BY {group}" if group else ""
    whole_sql = f"SELECT {', '.join(head + whole)} FROM m WHERE {where_whole}{tail}"
    shard_sql = f"SELECT {', '.join(head + shard + hidden)} FROM m WHERE ({where_whole}) AND {{where}}{tail}"
    spec = MergeSpec(aggregates=tuple(aggs), group_by=(0,) if group else (),
                     order_by=(SortKey(0),) if group else (), visible=offset + len(AGGS))
    return whole_sql, shard_sql, spec


@pytest.mark.parametrize("where", ["true", "id < 1000", "id < 1001", "id < 0", "n IS NULL", "id % 5 = 0"])
def test_aggregates_match_postgres(cur, where):
    whole_sql, shard_sql, spec = agg_queries(where)
    _, want_cols, want = reply(cur, whole_sql)
    cols, rows = merged(cur, spec, shard_sql)
    assert cols == want_cols
    assert rows == want


@pytest.mark.parametrize("group", ["g", "i % 7", "b > 0"])
def test_group_by_matches_postgres(cur, group):
    whole_sql, shard_sql, spec = agg_queries("id < 1000", group)
    _, want_cols, want = reply(cur, whole_sql)
    cols, rows = merged(cur, spec, shard_sql)
    assert cols == want_cols
    assert rows == want


@pytest.mark.parametrize("order,keys", [
    ("n, id", (SortKey(1), SortKey(0))),
    ("n DESC, id", (SortKey(1, True), SortKey(0))),
    ("n NULLS FIRST, id DESC", (SortKey(1, nulls_first=True), SortKey(0, True))),
    ("n DESC NULLS LAST, id", (SortKey(1, True, False), SortKey(0))),
    ("f, id", (SortKey(2), SortKey(0))),
    ("f DESC, id", (SortKey(2, True), SortKey(0))),
    ("g DESC, b, id", (SortKey(3, True), SortKey(4), SortKey(0))),
])
@pytest.mark.parametrize("limit,offset", [(None, 0), (7, 0), (5, 20), (1000, 195)])
def test_order_by_matches_postgres(cur, order, keys, limit, offset):
    sel = "SELECT id, n, f, g, b FROM m"
    lim = "" if limit is None else f" LIMIT {limit}"
    whole = f"{sel} ORDER BY {order}{lim} OFFSET {offset}"
    shard_lim = "" if limit is None else f" LIMIT {limit + offset}"
    _, want_cols, want = reply(cur, whole)
    spec = MergeSpec(order_by=keys, limit=limit, offset=offset)
    cols, rows = merged(cur, spec, f"{sel} WHERE {{where}} ORDER BY {order}{shard_lim}")
    assert cols == want_cols and rows == want


def test_distinct_matches_postgres(cur):
    _, _, want = reply(cur, "SELECT DISTINCT g, i % 3 FROM m ORDER BY 1, 2")
    spec = MergeSpec(distinct=True, order_by=(SortKey(0), SortKey(1)))
    _, rows = merged(cur, spec, "SELECT DISTINCT g, i % 3 FROM m WHERE {where} ORDER BY 1, 2")
    assert rows == want


def test_concatenation_matches_postgres(cur):
    _, _, want = reply(cur, "SELECT id, n FROM m ORDER BY id")
    _, rows = merged(cur, None, "SELECT id, n FROM m WHERE {where} ORDER BY id")
    assert sorted(rows, key=lambda r: int(r[0])) == want


def test_float_text_output_matches_postgres(cur):
    """format_float8 / format_float4 print as PostgreSQL 15's float8out / float4out."""
    from geobouncer.sharding.values import format_float4, format_float8
    cur.execute("SELECT (v * 10 ^ e)::float8, (v * 10 ^ e)::float4 FROM"
                " (VALUES (1.0), (-1.5), (0.1), (1.0/3), (123456.789), (2.0/7), (1e-3)) AS a(v),"
                " generate_series(-30, 30) AS e")
    n = 0
    for f8, f4 in cur.fetchall():
        assert format_float8(float(f8)).decode() == f8
        assert format_float4(float(f4)).decode() == f4
        n += 1
    assert n > 100
    cur.execute("SELECT v::float8, v::float8::float4 FROM unnest(ARRAY['5e-324', '1.7976931348623157e308',"
                " '2.2250738585072014e-308', '1e-45', '3.4028235e38', '1.17549435e-38', '-0', '0'])"
                " AS v WHERE v::float8 = 0 OR abs(v::float8) BETWEEN 1e-45 AND 3.4028235e38"
                " UNION ALL SELECT (2 ^ k)::float8, (2 ^ k)::float4 FROM generate_series(-120, 120, 7) k")
    for f8, f4 in cur.fetchall():
        assert format_float8(float(f8)).decode() == f8
        assert format_float4(float(f4)).decode() == f4
    for f8 in ("5e-324", "1.7976931348623157e+308", "2.2250738585072014e-308"):
        cur.execute("SELECT %s::float8", (f8,))
        assert format_float8(float(f8)).decode() == cur.fetchone()[0]


def test_group_by_ordered_by_aggregates_matches_postgres(cur):
    whole = ("SELECT g, avg(i) AS a, count(*) AS c, sum(n) AS s FROM m WHERE id < 1000"
             " GROUP BY g ORDER BY a DESC, c, g LIMIT 4 OFFSET 1")
    shard_sql = ("SELECT g, sum(i) AS a, count(*) AS c, sum(n) AS s, count(i) AS h FROM m"
                 " WHERE id < 1000 AND {where} GROUP BY g")
    spec = MergeSpec(group_by=(0,), aggregates=(Agg(1, "avg", count_column=4), Agg(2, "count"), Agg(3, "sum")),
                     order_by=(SortKey(1, True), SortKey(2), SortKey(0)), limit=4, offset=1, visible=4)
    _, want_cols, want = reply(cur, whole)
    cols, rows = merged(cur, spec, shard_sql)
    assert cols == want_cols and rows == want and len(rows) == 4
