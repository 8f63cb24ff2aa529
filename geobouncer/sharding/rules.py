"""Sharding rules: which shard a key value belongs to (``[sharded_tables]``).

A ShardedDatabase is one ``shards=`` entry plus the ``[sharded_tables]`` lines
naming it. Each ShardedTable maps its key column's values to shards by
PostgreSQL's hash partitioning (the default), a value list, or [start, end)
ranges, with an optional default shard.
"""

from __future__ import annotations

from . import hashing


class ShardingError(Exception):
    """A request the sharding layer refuses: ``sqlstate`` and ``text`` for the client."""

    def __init__(self, sqlstate: str, text: str):
        super().__init__(text)
        self.sqlstate = sqlstate
        self.text = text


class HashMapping:
    __slots__ = ("ctype", "modulus")

    def __init__(self, ctype: str, modulus: int):
        self.ctype = ctype
        self.modulus = modulus

    def shard_for(self, value) -> int | None:
        return hashing.hash_remainder(self.ctype, value, self.modulus)


class ListMapping:
    __slots__ = ("shards", "default")

    def __init__(self, shards: dict, default: int | None):
        self.shards = shards          # value -> shard
        self.default = default

    def shard_for(self, value) -> int | None:
        return self.shards.get(value, self.default)


class RangeMapping:
    __slots__ = ("ranges", "default")

    def __init__(self, ranges: list, default: int | None):
        self.ranges = ranges          # (start or None, end or None, shard): [start, end)
        self.default = default

    def shard_for(self, value) -> int | None:
        for start, end, shard in self.ranges:
            if (start is None or value >= start) and (end is None or value < end):
                return shard
        return self.default


class ShardedTable:
    """One ``[sharded_tables]`` line."""

    __slots__ = ("name", "table", "schema", "database", "column", "ctype", "mapping")

    def __init__(self, name: str, table: str | None, database: str, column: str, ctype: str, mapping):
        self.name = name
        self.schema, _, self.table = table.rpartition(".") if table else (None, "", None)
        self.schema = self.schema or None
        self.database = database
        self.column = column
        self.ctype = ctype
        self.mapping = mapping

    def __repr__(self) -> str:
        return f"<ShardedTable {self.name}: {self.table or '*'}.{self.column} {self.ctype}>"

    def shard_for_value(self, value) -> int:
        if value is None:
            raise ShardingError("23502", f'the sharding key "{self.column}" may not be null')
        shard = self.mapping.shard_for(value)
        if shard is None:
            raise ShardingError("22023", f'no shard for {self.column} = {value!s} (rule "{self.name}" '
                                         "has no default shard)")
        return shard

    def shard_for_text(self, text) -> int:
        try:
            value = hashing.parse_text(self.ctype, text)
        except ValueError as exc:
            raise ShardingError("22P02", str(exc)) from None
        return self.shard_for_value(value)

    def shard_for_binary(self, data: bytes) -> int:
        try:
            value = hashing.parse_binary(self.ctype, data)
        except ValueError as exc:
            raise ShardingError("22P03", str(exc)) from None
        return self.shard_for_value(value)


class ShardedDatabase:
    __slots__ = ("name", "shards", "tables")

    def __init__(self, name: str, shards, tables=()):
        self.name = name
        self.shards = tuple(shards)
        self.tables = tuple(tables)

    def columns_for(self, table: str, schema: str | None) -> tuple:
        """The rules that may apply to ``table``: its own, then the table-less ones."""
        own = tuple(t for t in self.tables if t.table == table
                    and (t.schema is None or schema is None or t.schema == schema))
        return own + tuple(t for t in self.tables if t.table is None)

    def rule_for(self, table: str, schema: str | None, column: str):
        for rule in self.columns_for(table, schema):
            if rule.column == column:
                return rule
        return None


def _values(ctype: str, text: str) -> list:
    return [hashing.parse_text(ctype, part.strip()) for part in text.split(",") if part.strip() != ""]


def parse_rule(name: str, params: dict[str, str], databases: dict) -> ShardedTable:
    """A ``[sharded_tables]`` line's parameters -> ShardedTable (ValueError with the reason)."""
    params = dict(params)
    database = params.pop("database", None)
    column = params.pop("column", None)
    if not database or not column:
        raise ValueError("database= and column= are required")
    ctype = hashing.canonical_type(params.pop("type", "bigint"))
    table = params.pop("table", name)
    if table in ("*", ""):
        table = None
    kind = params.pop("mapping", "hash")
    default = params.pop("default", None)
    entry = databases.get(database)
    if entry is None or not entry.shards:
        raise ValueError(f"database {database!r} is not a sharded [databases] entry (shards=...)")
    nshards = len(entry.shards)
    shard_values = {}
    for key in list(params):
        if key.startswith("shard_") and key[6:].isdigit():
            shard_values[int(key[6:])] = params.pop(key)
    if params:
        raise ValueError(f"unknown key {sorted(params)[0]!r}")
    if default is not None:
        if not default.isdigit() or int(default) >= nshards:
            raise ValueError(f"default={default} is not a shard of {database} (0..{nshards - 1})")
        default = int(default)
    for shard in shard_values:
        if shard >= nshards:
            raise ValueError(f"shard_{shard}: {database} has {nshards} shards")
    if kind == "hash":
        if shard_values or default is not None:
            raise ValueError("shard_N= and default= are for mapping=list or mapping=range")
        mapping = HashMapping(ctype, nshards)
    elif kind == "list":
        values = {}
        for shard, text in sorted(shard_values.items()):
            for value in _values(ctype, text):
                if value in values:
                    raise ValueError(f"value {value} is listed for shards {values[value]} and {shard}")
                values[value] = shard
        mapping = ListMapping(values, default)
    elif kind == "range":
        if ctype == "uuid":
            raise ValueError("mapping=range needs an integer or text key")
        ranges = []
        for shard, text in sorted(shard_values.items()):
            start, sep, end = text.partition(",")
            if not sep:
                raise ValueError(f"shard_{shard}='{text}': a range is 'start,end' (either may be empty)")
            low = hashing.parse_text(ctype, start.strip()) if start.strip() else None
            high = hashing.parse_text(ctype, end.strip()) if end.strip() else None
            if low is not None and high is not None and not low < high:
                raise ValueError(f"shard_{shard}='{text}': start must be below end")
            ranges.append((low, high, shard))
        ordered = sorted(ranges, key=lambda r: (r[0] is not None, r[0] if r[0] is not None else 0))
        for (a0, a1, sa), (b0, b1, sb) in zip(ordered, ordered[1:]):
            if a1 is None or (b0 is None) or a1 > b0:
                raise ValueError(f"the ranges of shard_{sa} and shard_{sb} overlap")
        mapping = RangeMapping(ranges, default)
    else:
        raise ValueError(f"mapping={kind}: hash, list or range")
    return ShardedTable(name, table, database, column, ctype, mapping)
