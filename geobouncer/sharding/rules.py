# stand-in: replaced by branch s1/s3
"""Minimal stand-in for the s1 rules module (interfaces of docs sharding.md only)."""


class ShardingError(Exception):
    def __init__(self, sqlstate, text):
        super().__init__(text)
        self.sqlstate = sqlstate
        self.text = text


class HashMapping:
    __slots__ = ("n",)

    def __init__(self, n):
        self.n = n

    def shard_for(self, value):
        return hash(value) % self.n if not isinstance(value, int) else value % self.n


class ShardedTable:
    __slots__ = ("name", "table", "database", "column", "ctype", "mapping")

    def __init__(self, name, table, database, column, ctype, mapping):
        self.name, self.table, self.database = name, table, database
        self.column, self.ctype, self.mapping = column, ctype, mapping

    def shard_for_value(self, value):
        s = self.mapping.shard_for(value)
        if s is None:
            raise ShardingError("22023", "no shard for %r" % (value,))
        return s

    def shard_for_text(self, text):
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if self.ctype.startswith("int"):
            try:
                value = int(text)
            except ValueError:
                raise ShardingError("22P02", "invalid key %r" % (text,)) from None
        else:
            value = text
        return self.shard_for_value(value)

    def shard_for_binary(self, data):
        if self.ctype.startswith("int"):
            if len(data) not in (2, 4, 8):
                raise ShardingError("22P03", "bad binary key")
            return self.shard_for_value(int.from_bytes(data, "big", signed=True))
        return self.shard_for_value(data.decode("utf-8", "replace"))


class ShardedDatabase:
    __slots__ = ("name", "shards", "tables")

    def __init__(self, name, shards, tables):
        self.name, self.shards, self.tables = name, tuple(shards), tuple(tables)

    def columns_for(self, table, schema):
        out = []
        for t in self.tables:
            if t.table is None:
                out.append(t)
                continue
            s, _, n = t.table.rpartition(".")
            if n == table and (not s or s == schema or schema is None):
                out.append(t)
        return tuple(out)

    def rule_for(self, table, schema, column):
        for t in self.columns_for(table, schema):
            if t.column == column:
                return t
        return None
