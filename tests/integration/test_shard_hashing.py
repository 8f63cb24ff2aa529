"""geobouncer's shard of a key is the partition PostgreSQL's own PARTITION BY
HASH puts it in, for every supported key type and several moduli — checked
against a real server, not against a copy of the formula."""

from __future__ import annotations

import random
import uuid

import pytest

from geobouncer.sharding import hashing

pytestmark = pytest.mark.geobouncer_only("sharding (PgDog style)")

rng = random.Random(12)
INTS = list(range(-300, 300)) + [rng.randint(-2**63, 2**63 - 1) for _ in range(400)]
VALUES = {
    "bigint": INTS + [2**63 - 1, -2**63, 2**32, -2**32, 2**31, -2**31 - 1],
    "integer": [v for v in INTS if -2**31 <= v < 2**31] + [2**31 - 1, -2**31]
               + [rng.randint(-2**31, 2**31 - 1) for _ in range(300)],
    "smallint": list(range(-400, 400)) + [32767, -32768],
    "text": ["", "a", "ab", "abc", "hello world", "ünïcødé", "日本語のテキスト", "🙂" * 7, "x" * 1000]
            + ["".join(chr(rng.randint(32, 0x2FFF)) for _ in range(n)) for n in range(60)]
            + [f"user-{i}" for i in range(200)],
    "varchar": [f"key{i}" * (i % 13) for i in range(120)],
    "uuid": [uuid.UUID(int=0), uuid.UUID(int=2**128 - 1)] + [uuid.UUID(int=rng.getrandbits(128)) for _ in range(300)],
}


@pytest.mark.parametrize("modulus", [2, 3, 5])
@pytest.mark.parametrize("sqltype", list(VALUES))
def test_remainder_is_postgres_partition(pg, sqltype, modulus):
    ctype = hashing.canonical_type(sqltype)
    values = VALUES[sqltype]
    conn = pg.connect("app", user="postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE hp (k %s) PARTITION BY HASH (k)" % sqltype)
            for r in range(modulus):
                cur.execute(f"CREATE TEMP TABLE hp{r} PARTITION OF hp FOR VALUES WITH (MODULUS {modulus}, "
                            f"REMAINDER {r})")
            cur.execute(f"INSERT INTO hp SELECT DISTINCT unnest(%s::{sqltype}[])", ([str(v) for v in values],))
            cur.execute("SELECT k::text, substring(tableoid::regclass::text from '[0-9]+$')::int FROM hp")
            placed = dict(cur.fetchall())
    finally:
        conn.close()
    assert len(placed) == len({str(v) for v in values})
    wrong = {text: (where, hashing.hash_remainder(ctype, hashing.parse_text(ctype, text), modulus))
             for text, where in placed.items()
             if hashing.hash_remainder(ctype, hashing.parse_text(ctype, text), modulus) != where}
    assert not wrong
    assert set(placed.values()) == set(range(modulus))
