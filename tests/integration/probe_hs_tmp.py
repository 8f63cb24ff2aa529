import struct, time, socket, threading, io
import psycopg2
import pytest
from _util_pool import RawClient, message, query_message, parse_error_fields
from shardfix import shard_pg, shards, sharded, direct  # noqa
from test_fuzz import summarize, parse_msg, bind_msg, execute_msg, describe_msg, SYNC
import test_fuzz as fz
import test_shard_hostile as hs

def kill_when(cluster, like, delay=0.3):
    def run():
        time.sleep(delay)
        with direct(cluster, "postgres") as c, c.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid), datname FROM pg_stat_activity WHERE query LIKE %s AND datname = 'sh_1'", (like,))
            print("killed", cur.fetchall())
    t = threading.Thread(target=run); t.start(); return t

def test_probe(sharded, shards):
    b = sharded(**hs.SETTINGS)
    hs.load_users(b)
    conn = b.connect("app", autocommit=True)
    cur = conn.cursor()
    t = kill_when(shards, "%pg_sleep%")
    try:
        cur.execute("SELECT pg_sleep(1), id FROM users ORDER BY id")
        print("no error", len(cur.fetchall()))
    except psycopg2.Error as e:
        print("cross err", e.pgcode, e)
    t.join()
    cur.execute("SELECT count(*) FROM users"); print(cur.fetchall())
    conn2 = b.connect("app")
    c2 = conn2.cursor()
    c2.execute("INSERT INTO users (id, name) VALUES (100001, 'x')")
    c2.execute("SELECT count(*) FROM users")
    t = kill_when(shards, "%pg_sleep%")
    try:
        c2.execute("SELECT pg_sleep(1) FROM users WHERE id <= 3")
    except psycopg2.Error as e:
        print("tx err", e.pgcode, e)
    t.join()
    try:
        c2.execute("SELECT 1"); print(c2.fetchall())
    except psycopg2.Error as e:
        print("after", e.pgcode, e)
    conn2.rollback()
    c2.execute("SELECT count(*) FROM users"); print(c2.fetchall())
    conn2.rollback()
    # memory: named statements
    rss0 = fz.rss_kb(b.pid)
    r = RawClient(b.host, b.port, timeout=10)
    r.login("app", "app_pw", "app")
    big = "SELECT '" + "x" * 900000 + "' FROM users WHERE id = $1"
    for i in range(150):
        r.send(parse_msg(big, name=b"s%d" % i))
    r.send(SYNC)
    print(summarize(r.read_until(b"Z")), "rss", rss0, fz.rss_kb(b.pid))
    r.close()
    time.sleep(1)
    print("rss after close", fz.rss_kb(b.pid))
    print(hs.shard_sessions(shards, "state <> 'idle'"))
    print("LOG", [l for l in b.log_text().splitlines() if "Error" in l or "Traceback" in l or "internal" in l])
