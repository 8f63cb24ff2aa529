"""geobouncer.sharding.merge with canned backend messages (codec-level unit tests)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from geobouncer.proto.messages import (command_complete, data_row, error_response, message, notice_response,
                                       parse_error_fields, row_description)
from geobouncer.sharding import values as V
from geobouncer.sharding.merge import Agg, MergeSpec, SortKey, merge_results
from geobouncer.sharding.rows import parse_data_row, parse_row_description


def msgs(*encoded: bytes):
    """Encoded messages -> the (type, body) pairs a stream yields."""
    return [(m[0], m[5:]) for m in encoded]


def shard(cols, rows, tag=None, extra=()):
    out = [row_description(cols)] + [data_row(r) for r in rows]
    out += list(extra)
    out.append(command_complete(tag or f"SELECT {len(rows)}"))
    return msgs(*out)


class Tracked:
    """A stream that records whether it was consumed to its end."""

    def __init__(self, items):
        self.items = list(items)
        self.pos = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos >= len(self.items):
            raise StopIteration
        self.pos += 1
        return self.items[self.pos - 1]

    @property
    def drained(self):
        return self.pos == len(self.items)


def run(spec, streams):
    tracked = [Tracked(s) for s in streams]
    out = list(merge_results(spec, tracked))
    assert all(t.drained for t in tracked)
    return out


def decode(out):
    """-> (columns [(name, oid)], rows, final (type, text))."""
    cols, rows = None, []
    for m in out:
        body = m[5:]
        if m[:1] == b"T":
            cols = [(f[0].decode(), f[3]) for f in parse_row_description(body)]
        elif m[:1] == b"D":
            rows.append([None if v is None else v.decode() for v in parse_data_row(body)])
    last = out[-1]
    if last[:1] == b"C":
        final = ("C", last[5:-1].decode())
    elif last[:1] == b"E":
        final = ("E", parse_error_fields(last[5:])["C"])
    else:
        final = (last[:1].decode(), "")
    return cols, rows, final


INT = [("id", 23)]


def test_concatenation_streams_in_shard_order_and_sums_tag():
    s = [shard(INT, [[1], [2]]), shard(INT, []), shard(INT, [[3]])]
    cols, rows, final = decode(run(None, s))
    assert cols == [("id", 23)]
    assert rows == [["1"], ["2"], ["3"]]
    assert final == ("C", "SELECT 3")


def test_concatenation_is_lazy():
    """The first row comes out before the later shards' rows are read."""
    streams = [Tracked(shard(INT, [[i]])) for i in range(3)]
    gen = merge_results(None, streams)
    assert next(gen)[:1] == b"T"
    assert next(gen)[:1] == b"D"
    assert streams[2].pos == 1        # only its RowDescription so far
    list(gen)
    assert all(t.drained for t in streams)


@pytest.mark.parametrize("tags,want", [
    (["INSERT 0 2", "INSERT 0 3", "INSERT 0 0"], "INSERT 0 5"),
    (["UPDATE 1", "UPDATE 4", "UPDATE 0"], "UPDATE 5"),
    (["DELETE 1", "DELETE 1", "DELETE 1"], "DELETE 3"),
    (["COPY 7", "COPY 0", "COPY 1"], "COPY 8"),
    (["MERGE 2", "MERGE 2", "MERGE 2"], "MERGE 6"),
    (["CREATE TABLE", "CREATE TABLE", "CREATE TABLE"], "CREATE TABLE"),
])
def test_tags_summed(tags, want):
    out = run(None, [msgs(command_complete(t)) for t in tags])
    assert out == [command_complete(want)]


def test_empty_query_and_notices():
    n = notice_response("hello")
    out = run(None, [msgs(n, b"I\x00\x00\x00\x04")] * 3)
    assert out == [n, n, n, b"I\x00\x00\x00\x04"]


def test_notices_pass_through_mid_stream():
    n = notice_response("mid")
    s = [msgs(row_description(INT), data_row([1]), n, data_row([2]), command_complete("SELECT 2")),
         shard(INT, [[3]])]
    out = run(None, s)
    assert n in out and out[-1] == command_complete("SELECT 3")


@pytest.mark.parametrize("bad", [0, 1, 2])
@pytest.mark.parametrize("spec", [None, MergeSpec(order_by=(SortKey(0),)),
                                  MergeSpec(aggregates=(Agg(0, "sum"),))])
def test_error_on_each_shard_position_wins_and_others_drain(bad, spec):
    err = error_response("22012", "division by zero")
    streams = []
    for i in range(3):
        if i == bad:
            streams.append(msgs(row_description(INT), data_row([5]), err))
        else:
            streams.append(shard(INT, [[i]]))
    out = run(spec, streams)
    assert out[-1] == err
    assert not any(m[:1] == b"C" for m in out)


def test_error_before_row_description():
    err = error_response("42P01", "no such table")
    out = run(None, [shard(INT, [[1]]), msgs(err), shard(INT, [[2]])])
    assert out == [err]


def test_first_error_wins():
    e1, e2 = error_response("42P01", "first"), error_response("42703", "second")
    out = run(None, [msgs(e1), msgs(e2)])
    assert out == [e1]


@pytest.mark.parametrize("cols", [[("id", 20)], [("other", 23)], [("id", 23), ("x", 23)]])
def test_mismatched_row_descriptions(cols):
    _, rows, final = decode(run(None, [shard(INT, [[1]]), shard(cols, [[2]] if len(cols) == 1 else [[2, 3]])]))
    assert rows == [] and final == ("E", "42804")


def binary_shard(cols, rows, tag=None):
    """A shard's result in binary format (asyncpg's): every column's format code 1."""
    rd = bytearray(row_description([(name, oid) for name, oid, _ in cols]))
    pos = 7
    for name, _, _ in cols:
        pos += len(name) + 1 + 16
        rd[pos:pos + 2] = b"\x00\x01"
        pos += 2
    enc = [encode for _, _, encode in cols]
    out = [bytes(rd)] + [data_row([None if v is None else e(v) for e, v in zip(enc, r)]) for r in rows]
    out.append(command_complete(tag or f"SELECT {len(rows)}"))
    return msgs(*out)


def i4(v):
    return v.to_bytes(4, "big", signed=True)


def i8(v):
    return v.to_bytes(8, "big", signed=True)


def test_binary_columns_sort_by_value_not_by_bytes():
    # As bytes, -1 (ff ff ff ff) would sort after 2; by value it comes first.
    cols = [("id", 23, i4), ("t", 25, str.encode)]
    a = binary_shard(cols, [[-5, "x"], [2, "b"]])
    b = binary_shard(cols, [[-1, "a"], [7, "c"]])
    out = run(MergeSpec(order_by=(SortKey(0),)), [a, b])
    rows = [parse_data_row(m[5:]) for m in out if m[:1] == b"D"]
    assert [int.from_bytes(r[0], "big", signed=True) for r in rows] == [-5, -1, 2, 7]
    fields = parse_row_description(out[0][5:])
    assert [f[6] for f in fields] == [1, 1]            # still binary for the client


def test_binary_count_sum_min_max_combined_in_binary():
    cols = [("count", 20, i8), ("sum", 20, i8), ("min", 23, i4), ("max", 23, i4)]
    spec = MergeSpec(aggregates=(Agg(0, "count"), Agg(1, "sum"), Agg(2, "min"), Agg(3, "max")))
    out = run(spec, [binary_shard(cols, [[2, 10, -3, 4]]), binary_shard(cols, [[3, -4, 1, 9]])])
    (row,) = [parse_data_row(m[5:]) for m in out if m[:1] == b"D"]
    assert row == [i8(5), i8(6), i4(-3), i4(9)]


@pytest.mark.parametrize("cols, spec", [
    ([("n", 1700, bytes)], MergeSpec(order_by=(SortKey(0),))),              # binary numeric
    ([("a", 1700, bytes), ("c", 20, i8)], MergeSpec(aggregates=(Agg(0, "avg", count_column=1),),
                                                    visible=1)),
])
def test_binary_columns_the_merge_cannot_read_are_refused(cols, spec):
    s = binary_shard(cols, [[b"\x00\x00\x00\x00\x00\x00\x00\x00"] + ([1] if len(cols) > 1 else [])])
    _, _, final = decode(run(spec, [s, s]))
    assert final == ("E", "0A000")


def test_order_by_merge_nulls_and_desc():
    cols = [("k", 23), ("t", 25)]
    a = [[1, "a"], [3, "c"], [None, "n1"]]
    b = [[2, "b"], [None, "n2"]]
    _, rows, final = decode(run(MergeSpec(order_by=(SortKey(0),)), [shard(cols, a), shard(cols, b), shard(cols, [])]))
    assert [r[0] for r in rows] == ["1", "2", "3", None, None] and final == ("C", "SELECT 5")
    a.reverse()
    b.reverse()
    _, rows, _ = decode(run(MergeSpec(order_by=(SortKey(0, descending=True),)), [shard(cols, a), shard(cols, b)]))
    assert [r[0] for r in rows] == [None, None, "3", "2", "1"]
    spec = MergeSpec(order_by=(SortKey(0, nulls_first=True),))
    a = [[None, "x"], [1, "a"], [3, "c"]]
    _, rows, _ = decode(run(spec, [shard(cols, a), shard(cols, [[2, "b"]])]))
    assert [r[0] for r in rows] == [None, "1", "2", "3"]


def test_order_by_typed_not_textual_and_second_key():
    cols = [("n", 1700), ("f", 701), ("t", 25)]
    a = [["9", "NaN", "b"], ["10", "Infinity", "a"]]
    b = [["9.5", "-Infinity", "c"], ["10", "1e300", "b"]]
    spec = MergeSpec(order_by=(SortKey(0), SortKey(2, descending=True)))
    _, rows, _ = decode(run(spec, [shard(cols, a), shard(cols, b)]))
    assert [(r[0], r[2]) for r in rows] == [("9", "b"), ("9.5", "c"), ("10", "b"), ("10", "a")]
    spec = MergeSpec(order_by=(SortKey(1),))      # each shard sorted by f, as PostgreSQL sends it
    _, rows, _ = decode(run(spec, [shard(cols, [a[1], a[0]]), shard(cols, b)]))
    assert [r[1] for r in rows] == ["-Infinity", "1e300", "Infinity", "NaN"]


def test_limit_offset_after_merge_and_hidden_columns_trimmed():
    cols = [("v", 23), ("hidden", 23)]
    spec = MergeSpec(order_by=(SortKey(1),), limit=2, offset=1, visible=1)
    s = [shard(cols, [[10, 1], [30, 3]]), shard(cols, [[20, 2], [40, 4]])]
    c, rows, final = decode(run(spec, s))
    assert c == [("v", 23)] and rows == [["20"], ["30"]] and final == ("C", "SELECT 2")


def test_limit_zero_drains():
    spec = MergeSpec(order_by=(SortKey(0),), limit=0)
    _, rows, final = decode(run(spec, [shard(INT, [[1]]), shard(INT, [[2]])]))
    assert rows == [] and final == ("C", "SELECT 0")


def test_distinct():
    spec = MergeSpec(distinct=True, order_by=(SortKey(0),))
    _, rows, _ = decode(run(spec, [shard(INT, [[1], [2], [2]]), shard(INT, [[1], [3]])]))
    assert rows == [["1"], ["2"], ["3"]]


def test_aggregates_without_group_by():
    cols = [("count", 20), ("sum", 20), ("min", 23), ("max", 23), ("avg", 20), ("c", 20)]
    spec = MergeSpec(aggregates=(Agg(0, "count"), Agg(1, "sum"), Agg(2, "min"), Agg(3, "max"),
                                 Agg(4, "avg", count_column=5)), visible=5)
    s = [shard(cols, [[2, 3, 1, 2, 3, 2]]), shard(cols, [[0, None, None, None, None, 0]]),
         shard(cols, [[1, 7, 7, 7, 7, 1]])]
    c, rows, final = decode(run(spec, s))
    assert c == [("count", 20), ("sum", 20), ("min", 23), ("max", 23), ("avg", 1700)]
    assert rows == [["3", "10", "1", "7", "3.3333333333333333"]] and final == ("C", "SELECT 1")


def test_all_null_aggregates():
    cols = [("count", 20), ("sum", 1700), ("avg", 1700), ("c", 20), ("max", 25)]
    spec = MergeSpec(aggregates=(Agg(0, "count"), Agg(1, "sum"), Agg(2, "avg", count_column=3),
                                 Agg(4, "max")), visible=3)
    row = [0, None, None, 0, None]
    c, rows, _ = decode(run(spec, [shard(cols, [row])] * 3))
    assert rows == [["0", None, None]]


def test_group_by_one_row_at_a_time_streams():
    cols = [("g", 25), ("n", 20)]
    spec = MergeSpec(group_by=(0,), aggregates=(Agg(1, "count"),), order_by=(SortKey(0),))
    s = [shard(cols, [["b", 1]]), shard(cols, [["a", 2]]), shard(cols, [["b", 3], [None, 1]])]
    _, rows, final = decode(run(spec, s))
    assert rows == [["a", "2"], ["b", "4"], [None, "1"]] and final == ("C", "SELECT 3")


def test_float_sum_and_avg():
    cols = [("s", 701), ("a", 701), ("c", 20)]
    spec = MergeSpec(aggregates=(Agg(0, "sum"), Agg(1, "avg", count_column=2)), visible=2)
    s = [shard(cols, [["0.5", "0.5", 1]]), shard(cols, [["Infinity", "1e300", 1]])]
    c, rows, _ = decode(run(spec, s))
    assert c == [("s", 701), ("a", 701)] and rows == [["Infinity", "5e+299"]]


@pytest.mark.parametrize("f,text", [(1.0, "1"), (0.1, "0.1"), (1e15, "1e+15"), (1e14, "100000000000000"),
                                    (1.5e-5, "1.5e-05"), (-0.0, "-0"), (float("nan"), "NaN"),
                                    (float("-inf"), "-Infinity"), (1 / 3, "0.3333333333333333")])
def test_float8_text(f, text):
    assert V.format_float8(f) == text.encode()


@pytest.mark.parametrize("num,count,text", [
    ("10", 3, "3.3333333333333333"), ("0", 5, "0.00000000000000000000"),
    ("-7", 2, "-3.5000000000000000"), ("1.000000000000000000001", 1, "1.000000000000000000001"),
    ("123456789012345678", 7, "17636684144620811"), ("NaN", 2, "NaN"), ("0.0001", 3, "0.000033333333333333333333")])
def test_numeric_div(num, count, text):
    assert V.format_numeric(V.numeric_div(Decimal(num), count)) == text.encode()


def test_closing_the_merge_early_still_drains():
    streams = [Tracked(shard(INT, [[1], [2]])), Tracked(shard(INT, [[3]]))]
    gen = merge_results(MergeSpec(order_by=(SortKey(0),)), streams)
    assert next(gen)[:1] == b"T"
    gen.close()
    assert all(t.drained for t in streams)


def test_stream_cut_short_is_an_error():
    s = msgs(row_description(INT), data_row([1]))
    _, _, final = decode(run(None, [shard(INT, [[2]]), s]))
    assert final == ("E", "08006")


def test_group_by_float_nan_and_numeric_scales_group_together():
    cols = [("f", 701), ("n", 1700), ("c", 20)]
    spec = MergeSpec(group_by=(0, 1), aggregates=(Agg(2, "count"),))
    s = [shard(cols, [["NaN", "1.0", 1]]), shard(cols, [["NaN", "1.00", 2]])]
    _, rows, _ = decode(run(spec, s))
    assert rows == [["NaN", "1.0", "3"]]


def test_unsupported_sort_type_refused():
    cols = [("iv", 1186)]
    _, _, final = decode(run(MergeSpec(order_by=(SortKey(0),)), [shard(cols, [["1 day"]])] * 2))
    assert final == ("E", "0A000")


@pytest.mark.parametrize("spec", [MergeSpec(order_by=(SortKey(0),)), MergeSpec(aggregates=(Agg(0, "sum"),))])
def test_unreadable_values_are_an_error_not_a_traceback(spec):
    good = shard(INT, [[1]])
    bad = msgs(row_description(INT), data_row(["x1"]), command_complete("SELECT 1"))
    _, _, final = decode(run(spec, [good, bad]))
    assert final == ("E", "XX000")
    short = msgs(row_description(INT), b"D\x00\x00\x00\x08\x00\x01\x00\x00", command_complete("SELECT 1"))
    _, _, final = decode(run(spec, [good, short]))
    assert final == ("E", "XX000")


def test_group_by_ordered_by_an_avg_column():
    cols = [("g", 25), ("avg", 20), ("c", 20)]
    spec = MergeSpec(group_by=(0,), aggregates=(Agg(1, "avg", count_column=2),),
                     order_by=(SortKey(1, descending=True),), visible=2)
    s = [shard(cols, [["a", 1, 2], ["b", 9, 2]]), shard(cols, [["a", 2, 1], ["c", None, 0]])]
    c, rows, _ = decode(run(spec, s))
    assert c == [("g", 25), ("avg", 1700)]
    assert rows == [["c", None], ["b", "4.5000000000000000"], ["a", "1.00000000000000000000"]]


def test_concatenation_with_hidden_columns_trims_them():
    cols = [("v", 23), ("hidden", 23)]
    c, rows, final = decode(run(MergeSpec(visible=1), [shard(cols, [[1, 9]]), shard(cols, [[2, 8]])]))
    assert c == [("v", 23)] and rows == [["1"], ["2"]] and final == ("C", "SELECT 2")


def test_no_data_statements():
    out = run(None, [msgs(b"n\x00\x00\x00\x04", command_complete("SET"))] * 2)
    assert out == [b"n\x00\x00\x00\x04", command_complete("SET")]


def test_mixed_result_kinds_are_an_error():
    _, _, final = decode(run(None, [shard(INT, [[1]]), msgs(command_complete("UPDATE 1"))]))
    assert final == ("E", "XX000")


def copy_out(rows, header=None, fmt=b"\x00\x00\x01\x00\x00"):
    out = [message(b"H", fmt)] + ([message(b"d", header)] if header else [])
    out += [message(b"d", r) for r in rows] + [message(b"c"), command_complete(f"COPY {len(rows)}")]
    return msgs(*out)


def test_copy_out_concatenated_with_one_header_and_summed_count():
    spec = MergeSpec(copy_header=True)
    out = run(spec, [copy_out([b"1\n", b"4\n"], b"id\n"), copy_out([], b"id\n"), copy_out([b"2\n"], b"id\n")])
    assert [m[:1] for m in out] == [b"H", b"d", b"d", b"d", b"d", b"c", b"C"]
    assert [m[5:] for m in out if m[:1] == b"d"] == [b"id\n", b"1\n", b"4\n", b"2\n"]
    assert out[-1] == command_complete("COPY 3")


def test_copy_out_with_different_formats_is_an_error():
    out = run(None, [copy_out([b"1\n"]), copy_out([b"2\n"], fmt=b"\x01\x00\x01\x00\x01")])
    assert decode(out)[2] == ("E", "42804")
