"""GROUP BY and aggregates across shards: count, sum, min, max, avg (sum + count).

Each shard computed the aggregate of its rows; here the partial results of a
group are combined: counts and sums added (exactly for integers and numeric),
min/max compared by type, avg = total sum / total count with PostgreSQL's
numeric division scale (or in float8 for float sums).
"""

from __future__ import annotations

from decimal import Decimal

from . import values as V
from .rows import parse_data_row


class _Acc:
    """Combines one aggregate column of one group."""

    __slots__ = ("agg", "oid", "parse", "key", "value", "count", "raw", "best", "count_parse")

    def __init__(self, agg, oids):
        self.agg, self.oid = agg, oids[agg.column]
        self.value = None        # sum so far (None: every partial was NULL)
        self.count = 0
        self.raw = None          # min/max: the winning text
        self.best = None
        if agg.func in ("min", "max"):
            self.key = V.key_func(self.oid)
        else:
            self.parse = V.sum_parser(self.oid)
        if agg.count_column is not None:
            self.count_parse = V.sum_parser(oids[agg.count_column])

    def add(self, row) -> None:
        raw = row[self.agg.column]
        func = self.agg.func
        if func == "avg":
            c = row[self.agg.count_column]
            self.count += self.count_parse(c) if c is not None else 0
        if raw is None:
            return
        if func in ("min", "max"):
            k = self.key(raw)
            if self.best is None or (k < self.best if func == "min" else self.best < k):
                self.best, self.raw = k, raw
            return
        v = self.parse(raw)
        self.value = v if self.value is None else V.add(self.value, v)

    def result(self) -> bytes | None:
        func = self.agg.func
        if func in ("min", "max"):
            return self.raw
        if func == "count":
            return V.format_value(self.oid, self.value or 0)
        if func == "sum":
            return None if self.value is None else V.format_value(self.oid, self.value)
        if self.count == 0 or self.value is None:
            return None
        if isinstance(self.value, float):
            return V.format_float8(self.value / self.count)
        total = self.value if isinstance(self.value, Decimal) else Decimal(self.value)
        return V.format_numeric(V.numeric_div(total, self.count))


def group_rows(spec, oids, shards) -> list[list]:
    """Every shard's rows combined per group (in order of first appearance)."""
    key_convs = [(col, V.key_func(oids[col])) for col in spec.group_by]
    groups: dict[tuple, tuple[list, list[_Acc]]] = {}
    for shard in shards:
        for body in shard.rows():
            row = parse_data_row(body)
            key = tuple(None if row[c] is None else conv(row[c]) for c, conv in key_convs)
            entry = groups.get(key)
            if entry is None:
                entry = groups[key] = (row, [_Acc(a, oids) for a in spec.aggregates])
            for acc in entry[1]:
                acc.add(row)
    if not groups and not spec.group_by:
        groups[()] = ([None] * len(oids), [_Acc(a, oids) for a in spec.aggregates])
    out = []
    for first, accs in groups.values():
        row = list(first)
        for acc in accs:
            row[acc.agg.column] = acc.result()
        out.append(row)
    return out
