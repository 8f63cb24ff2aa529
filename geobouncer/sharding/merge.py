"""Combining one statement's replies from several shards into one reply (sans-IO).

Each stream yields (message type as int, body) for ONE statement: RowDescription
or NoData, DataRows, then CommandComplete / EmptyQueryResponse / ErrorResponse,
with NoticeResponses anywhere. ``merge_results`` yields whole encoded backend
messages for the client. Every stream is consumed to its end, whatever happens
(LIMIT reached, an error), so each server finishes its reply; the first
ErrorResponse wins and nothing follows it. Concatenation and ORDER BY stream
(one pending row per shard); GROUP BY / aggregates keep one row per group and
DISTINCT keeps the keys it has seen.
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ..proto.messages import command_complete, data_row, error_response, message
from . import values as V
from .aggregate import group_rows
from .rows import COPY_OUT, C, I, NODATA, T, Shard, cut_short, Sink, parse_data_row, parse_row_description, row_description_body



@dataclass(frozen=True)
class SortKey:
    column: int
    descending: bool = False
    nulls_first: bool | None = None      # None: PostgreSQL's default (NULLS LAST for ASC)
    bytewise: bool = False               # COLLATE "C" (or POSIX, ucs_basic): byte order asked for


@dataclass(frozen=True)
class Agg:
    column: int
    func: str                            # count | sum | min | max | avg
    count_column: int | None = None      # avg: `column` holds sum(x), this one count(x)


@dataclass(frozen=True)
class MergeSpec:
    order_by: tuple[SortKey, ...] = ()
    limit: int | None = None
    offset: int = 0
    group_by: tuple[int, ...] = ()
    aggregates: tuple[Agg, ...] = ()
    distinct: bool = False
    visible: int | None = None
    copy_header: bool = False            # COPY TO STDOUT (CSV HEADER): the first shard's header only


class MergeError(Exception):
    def __init__(self, sqlstate: str, text: str):
        super().__init__(text)
        self.sqlstate, self.text = sqlstate, text


_COUNTED = ("INSERT", "UPDATE", "DELETE", "COPY", "MERGE", "SELECT")


def sum_tags(tags: list[bytes]) -> bytes:
    """CommandComplete bodies (without NUL) -> one: counts of row tags summed."""
    words = tags[0].split(b" ")
    if words[0].decode(errors="replace") not in _COUNTED or not words[-1].isdigit():
        return tags[0]
    total = 0
    for tag in tags:
        last = tag.rsplit(b" ", 1)[-1]
        total += int(last) if last.isdigit() else 0
    return b" ".join(words[:-1] + [str(total).encode()])


class _Desc:
    __slots__ = ("v",)

    def __init__(self, v):
        self.v = v

    def __lt__(self, other):
        return other.v < self.v

    def __eq__(self, other):
        return self.v == other.v


def sort_key(keys: tuple[SortKey, ...], oids: list[int]):
    """row (list of bytes | None) -> comparable tuple following PostgreSQL's ORDER BY."""
    parts = []
    for k in keys:
        conv = V.key_func(oids[k.column])
        nulls_first = k.descending if k.nulls_first is None else k.nulls_first
        parts.append((k.column, conv, k.descending, 0 if nulls_first else 2))

    def key(row):
        out = []
        for col, conv, desc, null_rank in parts:
            raw = row[col]
            if raw is None:
                out.append((null_rank, None))
            else:
                v = conv(raw)
                out.append((1, _Desc(v) if desc else v))
        return tuple(out)
    return key


def merge_results(spec: MergeSpec | None, streams: list[Iterator[tuple[int, bytes]]],
                  bytewise_text: bool = True) -> Iterator[bytes]:
    """``bytewise_text``: the shards' collation orders text as its bytes (C,
    POSIX, C.UTF-8). When it does not, text cannot be ordered or compared
    across shards here (the merge compares bytes): refused, unless the query
    asks for COLLATE "C"."""
    sink = Sink()
    shards = [Shard(s, sink) for s in streams]
    try:
        yield from _merge(spec, shards, sink, bytewise_text)
    finally:                       # also when the caller closes us: the servers finish
        for shard in shards:
            shard.drain()
    yield from sink.flush()
    if sink.error is not None:
        yield sink.error
    elif sink.complete is not None:
        yield sink.complete


def _merge(spec, shards, sink, bytewise_text: bool = True) -> Iterator[bytes]:
    heads = [shard.head() for shard in shards]
    yield from sink.flush()
    if sink.error is not None:
        return
    kinds = {h[0] for h in heads}
    if kinds == {I}:
        if any(shard.nodata for shard in shards):
            yield message(b"n")                    # the Describe's answer (extended protocol)
        sink.complete = message(b"I")
        return
    if kinds <= {NODATA, C}:
        for shard in shards:
            shard.drain()
        if sink.error is None:
            if NODATA in kinds:
                yield message(b"n")
            sink.complete = command_complete(sum_tags([s.tag for s in shards]).decode(errors="replace"))
        return
    if kinds == {COPY_OUT}:
        yield from _copy_out(spec, heads, shards, sink)
        return
    if kinds != {T}:
        sink.fail(error_response("XX000", "shards returned different kinds of results to one statement"))
        return
    try:
        fields = [parse_row_description(h[1]) for h in heads]
        plan = _Plan(spec, fields, bytewise_text)
    except MergeError as exc:
        sink.fail(error_response(exc.sqlstate, exc.text))
        return
    except V.UnsupportedType as exc:
        sink.fail(error_response("0A000", str(exc)))
        return
    except _BAD as exc:
        sink.fail(_unreadable(exc))
        return
    yield message(b"T", row_description_body(plan.out_fields))
    sent = 0
    rows = plan.rows(shards)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except _BAD as exc:
            sink.fail(_unreadable(exc))
            return
        if sink.error is not None:
            return
        yield from sink.flush()
        yield row
        sent += 1
    for shard in shards:
        shard.drain()
    yield from sink.flush()
    if sink.error is None:
        tags = [s.tag for s in shards]
        if not all(tags):
            sink.fail(cut_short())
            return
        sink.complete = command_complete(sum_tags(tags).decode(errors="replace") if spec is None
                                         else f"SELECT {sent}")


_BAD = (ValueError, ArithmeticError, IndexError, struct.error)


def _unreadable(exc: Exception) -> bytes:
    return error_response("XX000", f"a shard sent a result the merge cannot read ({type(exc).__name__})")


class _Plan:
    """The checked RowDescriptions and what to do with the rows."""

    __slots__ = ("spec", "oids", "out_oids", "out_fields", "ncols", "visible")

    def __init__(self, spec: MergeSpec | None, fields: list[list[tuple]], bytewise_text: bool = True):
        first = fields[0]
        for i, other in enumerate(fields[1:], 1):
            if len(other) != len(first) or any(a[0] != b[0] or a[3] != b[3] for a, b in zip(first, other)):
                raise MergeError("42804", f"shard {i} returned columns that differ from shard 0's"
                                 " (names, number or types)")
        self.spec = spec
        self.oids = [f[3] if f[6] == 0 else -f[3] for f in first]   # -oid: binary format
        self.ncols = len(first)
        self.visible = self.ncols if spec is None or spec.visible is None else min(spec.visible, self.ncols)
        out = list(first)
        if spec is not None:
            self._check(spec, first)
            if not bytewise_text:
                self._check_collation(spec)
            for agg in spec.aggregates:
                if agg.func == "avg":
                    oid = V.FLOAT8 if abs(self.oids[agg.column]) in (V.FLOAT4, V.FLOAT8) else V.NUMERIC
                    f = out[agg.column]
                    out[agg.column] = (f[0], 0, 0, oid, 8 if oid == V.FLOAT8 else -1, -1, 0)
        self.out_oids = [f[3] if f[6] == 0 else -f[3] for f in out]   # avg columns: numeric or float8
        self.out_fields = out[:self.visible]

    def _check(self, spec: MergeSpec, fields):
        used = {k.column for k in spec.order_by} | set(spec.group_by)
        for agg in spec.aggregates:
            used.add(agg.column)
            if agg.count_column is not None:
                used.add(agg.count_column)
            if agg.func not in ("count", "sum", "min", "max", "avg"):
                raise MergeError("0A000", f"aggregate {agg.func} cannot be combined across shards")
            if agg.func == "avg" and agg.count_column is None:
                raise MergeError("XX000", "avg across shards needs its count column")
        if spec.distinct:
            used |= set(range(self.visible))
        for col in used:
            if col >= self.ncols:
                raise MergeError("XX000", f"merge column {col} is not in the shards' result")
        for agg in spec.aggregates:
            if agg.func == "avg" and fields[agg.column][6] != 0:
                raise MergeError("0A000", "avg across shards cannot be returned in binary format")
        for col in {k.column for k in spec.order_by} | set(spec.group_by) | (
                set(range(self.visible)) if spec.distinct else set()):
            V.key_func(self.oids[col])
        for agg in spec.aggregates:
            if agg.func in ("min", "max"):
                V.key_func(self.oids[agg.column])
            else:
                V.sum_parser(self.oids[agg.column])
            if agg.count_column is not None:
                V.sum_parser(self.oids[agg.count_column])

    def _check_collation(self, spec: MergeSpec) -> None:
        text = [abs(oid) in V.TEXT_OIDS for oid in self.oids]
        if any(text[k.column] and not k.bytewise for k in spec.order_by) or any(
                text[a.column] for a in spec.aggregates if a.func in ("min", "max")):
            raise MergeError("0A000", "the shards' collation does not order text by its bytes, and "
                                      "the pooler merges text in byte order: ORDER BY (or min/max of) "
                                      'text across shards needs COLLATE "C"')

    def _out(self, body: bytes) -> bytes:
        """A DataRow passed on as it came, or trimmed to the visible columns."""
        if self.visible == self.ncols:
            return message(b"D", body)
        return data_row(parse_data_row(body)[:self.visible])

    def rows(self, shards) -> Iterator[bytes]:
        spec = self.spec
        if spec is None or not (spec.order_by or spec.group_by or spec.aggregates or spec.distinct):
            it = (self._out(body) for shard in shards for body in shard.rows())
        elif spec.group_by or spec.aggregates:
            groups = group_rows(spec, self.oids, shards)
            if spec.order_by:
                groups.sort(key=sort_key(spec.order_by, self.out_oids))
            it = (data_row(row[:self.visible]) for row in groups)
        else:
            per_shard = [(parse_data_row(b) for b in shard.rows()) for shard in shards]
            if spec.order_by:
                merged = heapq.merge(*per_shard, key=sort_key(spec.order_by, self.oids))
            else:
                merged = (row for rows in per_shard for row in rows)
            if spec.distinct:
                merged = _distinct(merged, self.oids, self.visible)
            it = (data_row(row[:self.visible]) for row in merged)
        yield from _window(it, 0 if spec is None else spec.offset, None if spec is None else spec.limit)


def _copy_out(spec, heads, shards, sink) -> Iterator[bytes]:
    """COPY TO STDOUT on every shard: one CopyOutResponse, every shard's
    CopyData in shard order, one CopyDone; the COPY counts summed."""
    if any(bytes(h[1]) != bytes(heads[0][1]) for h in heads):
        sink.fail(error_response("42804", "shards answered COPY with different formats or columns"))
        return
    if any(shard.nodata for shard in shards):
        yield message(b"n")                    # the Describe's answer (extended protocol)
    yield message(b"H", heads[0][1])
    skip_header = spec is not None and spec.copy_header
    for number, shard in enumerate(shards):
        first = True
        for body in shard.copy_data():
            if first and number and skip_header:
                first = False
                continue
            first = False
            yield message(b"d", body)
    if sink.error is None:
        yield message(b"c")
        sink.complete = command_complete(sum_tags([s.tag for s in shards]).decode(errors="replace"))


def _distinct(rows, oids, visible):
    convs = [V.key_func(o) for o in oids[:visible]]
    seen = set()
    for row in rows:
        k = tuple(None if v is None else c(v) for c, v in zip(convs, row))
        if k not in seen:
            seen.add(k)
            yield row


def _window(it, offset: int, limit: int | None):
    n = 0
    for i, row in enumerate(it):
        if i < offset:
            continue
        if limit is not None and n >= limit:
            return
        n += 1
        yield row

