"""A client that leaves at hostile points of a reply (net/server.py _forward,
net/server_reader.py _write_rest): whatever the pooler does with the server
after, the next client must get a clean one: its own answer only, idle, none
of the gone client's settings.

The gone client's receive window is a few KB (tiny_client), so its last
reply is still being written when it leaves; one server in the pool, so the
next client gets that server when it was kept.
"""

from __future__ import annotations

import struct
import time

import pytest
from _util_pool import message, query_message
from test_client_gone_last_reply import leave
from test_reader_hostile import TINY, tiny_client, unix_databases

pytestmark = [pytest.mark.geobouncer_only("the pooler's reuse after a client left"), pytest.mark.timeout(120)]

BIG = "SELECT repeat('x', 7000)"


def _extended(sql: str, sync: bool) -> bytes:
    out = message(b"P", b"\x00" + sql.encode() + b"\x00\x00\x00")
    out += message(b"B", b"\x00\x00" + struct.pack("!HHH", 0, 0, 0))
    out += message(b"E", b"\x00" + struct.pack("!I", 0))
    return out + message(b"S" if sync else b"H")


SCENARIOS = [
    ("pipelined query still owed", query_message(BIG) + query_message("SELECT pg_sleep(1.5), 'late'")),
    ("pipelined, both answered", query_message(BIG) + query_message("SELECT 'second'")),
    ("COPY OUT read whole", query_message("COPY (SELECT repeat('x', 7000)) TO STDOUT")),
    ("COPY OUT unfinished", query_message("COPY (SELECT repeat('x', 1000) FROM generate_series(1, 20000)) TO STDOUT")),
    ("extended, no Sync", _extended(BIG, False)),
    ("extended, Sync then more unsynced", _extended(BIG, True) + _extended("SELECT 'unsynced'", False)),
    ("a block opened after the rows", query_message(BIG + "; BEGIN")),
    ("SET then rows", query_message("SET x.y = 'gone'; " + BIG)),
    ("one SET, then rows", query_message("SET x.y = 'gone'") + query_message(BIG)),
    ("SET as a prepared statement, then rows", _extended("SET x.y = 'gone'", True) + query_message(BIG)),
    ("an error after the rows", query_message(BIG + "; SELECT 1/0")),
]


def _fresh(b) -> tuple:
    conn = b.connect(autocommit=True)
    try:
        conn.set_isolation_level(0)
        with conn.cursor() as cur:
            cur.execute("SELECT 'fresh', current_setting('x.y', true), pg_backend_pid()")
            rows = cur.fetchall()
            status = conn.info.transaction_status
        return rows, status
    finally:
        conn.close()


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_the_next_client_gets_a_clean_server(pg, bouncer, reset):
    b = bouncer(databases=unix_databases(pg), pgbouncer={**TINY, "default_pool_size": 1})
    failures = []
    for name, data in SCENARIOS:
        raw = tiny_client(b)
        raw.send(query_message("SELECT 1"))
        raw.read_until(b"Z")
        raw.send(data)
        time.sleep(1.0)
        leave(raw, reset)
        time.sleep(0.3)
        for _ in range(2):
            rows, status = _fresh(b)
            if len(rows) != 1 or rows[0][:2] not in (("fresh", None), ("fresh", "")) or status != 0:
                failures.append(f"{name}: {rows} status {status}")
    assert not failures, "\n".join(failures)
    assert "Traceback" not in b.log_text() and "Traceback" not in b.output_text()
    # the finished replies kept their server (else this test would not exercise the reuse)
    assert b.log_text().count("new connection to server") < len(SCENARIOS)
