"""[databases] shards= and [sharded_tables]: what loads, and what is refused with file and line."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from geobouncer.config import ConfigError, load_config
from geobouncer.sharding import hashing
from geobouncer.sharding.rules import HashMapping, ListMapping, RangeMapping, ShardingError

BASE = """[databases]
app_0 = host=127.0.0.1 dbname=a0
app_1 = host=127.0.0.1 dbname=a1
app_2 = host=127.0.0.1 dbname=a2
app   = shards=app_0,app_1,app_2
[pgbouncer]
"""


def load(tmp_path: Path, text: str):
    path = tmp_path / "pgbouncer.ini"
    path.write_text(text)
    return load_config(path)


def error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value


def test_a_sharded_database_and_its_rules(tmp_path):
    cfg = load(tmp_path, BASE + """
[sharded_tables]
users    = database=app column=id type=bigint
payments = database=app column=user_id type=bigint
by_user  = database=app column=user_id type=int table=*
regions  = database=app column=region type=text mapping=list shard_0='eu,uk' shard_1='us' default=2
events   = database=app column=id type=bigint mapping=range shard_0='0,1000' shard_1='1000,2000' shard_2='2000,'
docs     = database=app column=key type=varchar table=public.documents
""")
    assert cfg.databases["app"].shards == ("app_0", "app_1", "app_2")
    sdb = cfg.sharded["app"]
    assert sdb.shards == ("app_0", "app_1", "app_2")
    names = {t.name: t for t in sdb.tables}
    assert isinstance(names["users"].mapping, HashMapping) and names["users"].table == "users"
    assert names["by_user"].table is None and names["by_user"].ctype == "int4"
    assert isinstance(names["regions"].mapping, ListMapping)
    assert [names["regions"].shard_for_text(v) for v in ("eu", "uk", "us", "mars")] == [0, 0, 1, 2]
    assert isinstance(names["events"].mapping, RangeMapping)
    assert [names["events"].shard_for_text(str(v)) for v in (0, 999, 1000, 1999, 2000, 10**12)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ShardingError) as info:
        names["events"].shard_for_text("-1")
    assert info.value.sqlstate == "22023"
    assert names["docs"].schema == "public" and names["docs"].table == "documents"
    # rules that apply to a table: its own first, then the table-less ones
    assert [t.name for t in sdb.columns_for("payments", None)] == ["payments", "by_user"]
    assert sdb.rule_for("orders", "public", "user_id").name == "by_user"
    assert sdb.rule_for("documents", "public", "key").name == "docs"
    assert sdb.rule_for("documents", "other", "key") is None
    assert names["users"].shard_for_text("12") == hashing.hash_remainder("int8", 12, 3)
    assert names["users"].shard_for_binary((12).to_bytes(8, "big", signed=True)) == names["users"].shard_for_text("12")


@pytest.mark.parametrize("extra, fragment", [
    ("bad = shards=app_0,nope\n", "shard 'nope' is not"),
    ("bad = shards=app,app_0\n", "itself sharded"),
    ("bad = shards=\n", "lists no"),
    ("bad = shards=app_0,app_0\n", "listed twice"),
    ("bad = shards=app_0 host=x\n", "no host="),
    ("bad = shards=app_0 pool_mode=statement\n", "statement pooling"),
])
def test_bad_sharded_entries(tmp_path, extra, fragment):
    text = BASE.replace("[pgbouncer]\n", extra + "[pgbouncer]\n")
    assert fragment in str(error(tmp_path, text))


@pytest.mark.parametrize("rule, fragment", [
    ("users = database=nope column=id", "not a sharded"),
    ("users = database=app_0 column=id", "not a sharded"),
    ("users = database=app", "column= are required"),
    ("users = database=app column=id type=float", "unsupported sharding key type"),
    ("users = database=app column=id mapping=modulo", "mapping=modulo"),
    ("users = database=app column=id mapping=list shard_0='1,2' shard_1='2'", "listed for shards 0 and 1"),
    ("users = database=app column=id mapping=list shard_0='x'", "invalid input syntax"),
    ("users = database=app column=id mapping=list shard_0='1' default=3", "default=3"),
    ("users = database=app column=id mapping=list shard_7='1'", "shard_7"),
    ("users = database=app column=id mapping=range shard_0='0,10' shard_1='5,20'", "overlap"),
    ("users = database=app column=id mapping=range shard_0='10,0'", "below end"),
    ("users = database=app column=id mapping=range shard_0='10'", "start,end"),
    ("users = database=app column=id shard_0='1'", "mapping=list or mapping=range"),
    ("users = database=app column=id colour=blue", "unknown key"),
])
def test_bad_rules_name_file_and_line(tmp_path, rule, fragment):
    exc = error(tmp_path, BASE + "[sharded_tables]\n" + rule + "\n")
    assert fragment in str(exc)
    assert exc.line == BASE.count("\n") + 2 and exc.file.endswith("pgbouncer.ini")


def test_a_rule_may_come_before_its_database(tmp_path):
    text = "[sharded_tables]\nusers = database=app column=id\n" + BASE
    assert [t.name for t in load(tmp_path, text).sharded["app"].tables] == ["users"]


@pytest.mark.parametrize("ctype, text, value", [
    ("int8", "-9223372036854775808", -2**63), ("int4", " 42 ", 42), ("int2", "-32768", -32768),
    ("text", "héllo", "héllo"), ("uuid", "00000000-0000-0000-0000-000000000001", uuid.UUID(int=1)),
])
def test_key_values_parse_like_postgres(ctype, text, value):
    assert hashing.parse_text(ctype, text) == value


@pytest.mark.parametrize("ctype, text", [("int4", "2147483648"), ("int2", "40000"), ("int8", "1.5"),
                                         ("uuid", "zz")])
def test_bad_key_values(ctype, text):
    with pytest.raises(ValueError):
        hashing.parse_text(ctype, text)
