"""`scripts/demo switchover`: a switchover under load, as the clients see it.

Run by scripts/demo (which passes the demo's ports in the environment) against a
running demo: writer threads insert into `ticks` through geobouncer (autocommit,
each row records the port of the server that wrote it), reader threads run
`select inet_server_port(), pg_is_in_recovery()`; then the primary is stopped
(pg_ctl -m fast), replica 1 promoted half a second later, replica 2 repointed at
it, and the load goes on for SWITCH_SECONDS. Prints where writes and reads
landed, how long writes waited, and every error a client saw.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections import Counter

import psycopg2

env = os.environ
GB = int(env["LISTEN_PORT"])
PRIMARY, REPLICA1, REPLICA2 = (int(env[k]) for k in ("PRIMARY_PORT", "REPLICA1_PORT", "REPLICA2_PORT"))
PGROOT, PG_BIN = env["PGROOT"], env["PG_BIN"]
AFTER = float(env.get("SWITCH_SECONDS", "3"))
WRITERS, READERS, WARMUP, PROMOTE_DELAY = 6, 2, 1.5, 0.5
NAMES = {PRIMARY: "primary", REPLICA1: "replica 1", REPLICA2: "replica 2"}
now = time.monotonic


def dsn(db: str = "demo") -> str:
    return f"host=127.0.0.1 port={GB} dbname={db} user=demo password=demo connect_timeout=10"


def pg_ctl(*args: str) -> None:
    cmd = [f"{PG_BIN}/pg_ctl", *args]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    subprocess.run(cmd, cwd="/", check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                   timeout=120)


class Load:
    def __init__(self) -> None:
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.writes: list[tuple[float, int]] = []      # (time, port that wrote it)
        self.reads: list[tuple[float, int]] = []
        self.errors: list[tuple[float, str, str, str]] = []   # (time, who, sqlstate, text)
        self.reconnects = 0

    def _connect(self):
        conn = psycopg2.connect(dsn())
        conn.autocommit = True
        return conn

    def writer(self, client: int) -> None:
        conn, n = self._connect(), 0
        while not self.stop.is_set():
            n += 1
            try:
                with conn.cursor() as cur:
                    cur.execute("insert into ticks values (%s, %s, inet_server_port()) returning written_on",
                                (client, n))
                    port = cur.fetchone()[0]
                with self.lock:
                    self.writes.append((now(), port))
            except psycopg2.Error as exc:
                self._failed(f"writer {client}", exc)
                if conn.closed:
                    conn = self._reconnect()
                time.sleep(0.01)
        conn.close()

    def reader(self, client: int) -> None:
        conn = self._connect()
        while not self.stop.is_set():
            try:
                with conn.cursor() as cur:
                    cur.execute("select inet_server_port(), pg_is_in_recovery()")
                    port = cur.fetchone()[0]
                with self.lock:
                    self.reads.append((now(), port))
            except psycopg2.Error as exc:
                self._failed(f"reader {client}", exc)
                if conn.closed:
                    conn = self._reconnect()
            time.sleep(0.005)
        conn.close()

    def _failed(self, who: str, exc: psycopg2.Error) -> None:
        text = (getattr(exc.diag, "message_primary", None) or str(exc)).strip().splitlines()[0]
        with self.lock:
            self.errors.append((now(), who, exc.pgcode or "-", text))

    def _reconnect(self):
        with self.lock:
            self.reconnects += 1
        while not self.stop.is_set():
            try:
                return self._connect()
            except psycopg2.Error:
                time.sleep(0.1)
        return self._connect()


def admin(command: str) -> list[tuple]:
    conn = psycopg2.connect(dsn("pgbouncer"))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(command)
            return cur.fetchall()
    finally:
        conn.close()


def main() -> None:
    load = Load()
    threads = [threading.Thread(target=load.writer, args=(i,), daemon=True) for i in range(WRITERS)]
    threads += [threading.Thread(target=load.reader, args=(i,), daemon=True) for i in range(READERS)]
    print(f"{WRITERS} clients writing (autocommit INSERTs) and {READERS} reading through geobouncer "
          f"on 127.0.0.1:{GB}")
    for thread in threads:
        thread.start()
    time.sleep(WARMUP)

    t_stop = now()
    print(f"  stopping the primary (127.0.0.1:{PRIMARY}, pg_ctl stop -m fast) ...")
    pg_ctl("-D", f"{PGROOT}/primary/data", "-m", "fast", "-w", "stop")
    time.sleep(PROMOTE_DELAY)
    t_promote = now()
    print(f"  promoting replica 1 (127.0.0.1:{REPLICA1}, pg_ctl promote) ...")
    pg_ctl("-D", f"{PGROOT}/replica1/data", "-w", "promote")
    t_promoted = now()
    conn = psycopg2.connect(host="127.0.0.1", port=REPLICA2, dbname="demo", user="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:   # replica 2 follows the new primary's timeline
        cur.execute(f"ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port={REPLICA1} user=postgres'")
        cur.execute("SELECT pg_reload_conf()")
    conn.close()
    print(f"  replica 2 now streams from replica 1; load goes on for {AFTER:g} s")
    time.sleep(AFTER)
    load.stop.set()
    for thread in threads:
        thread.join(15)

    before = [p for t, p in load.writes if t < t_stop]
    after = [(t, p) for t, p in load.writes if t >= t_stop]
    last_old = max((t for t, p in load.writes if p == PRIMARY), default=None)
    first_new = min((t for t, p in after if p == REPLICA1), default=None)

    def ms(t: float | None) -> str:
        return "never" if t is None else f"{(t - t_stop) * 1000:+.0f} ms"

    print()
    print("what the clients saw")
    print(f"  writes before the stop: {len(before)}, on "
          + ", ".join(f"{NAMES.get(p, p)} ({n})" for p, n in Counter(before).most_common()))
    print(f"  writes from the stop on: {len(after)}, on "
          + (", ".join(f"{NAMES.get(p, p)} ({n})" for p, n in Counter(p for _, p in after).most_common())
             or "nothing"))
    print(f"  timeline: primary stop issued 0 ms, last write on it {ms(last_old)}, promotion issued "
          f"{ms(t_promote)} (pg_ctl promote returned {ms(t_promoted)}), first write on replica 1 "
          f"{ms(first_new)}")
    if first_new is not None:
        print(f"  writes resumed {(first_new - t_promote) * 1000:.0f} ms after the promotion was issued")
    reads_after = Counter(p for t, p in load.reads if t >= t_stop)
    print(f"  reads after the stop:   {sum(reads_after.values())}, on "
          + ", ".join(f"{NAMES.get(p, p)} ({n})" for p, n in reads_after.most_common()))
    by_code = Counter((code, text) for _, _, code, text in load.errors)
    print(f"  errors: {len(load.errors)}" + ("" if load.errors else " (none)"))
    for (code, text), n in by_code.most_common():
        print(f"    {n} x SQLSTATE {code}: {text}")
    print(f"  connections lost (client reconnected): {load.reconnects}")
    print("  (a write in flight on the primary when it stopped is rolled back and its client is told"
          " so, 08006, and stays connected; clients between transactions wait and go on)")
    print()
    print("SHOW TOPOLOGY")
    for row in admin("SHOW TOPOLOGY"):
        print("  " + " | ".join(str(v) for v in row))
    print()
    print("The demo keeps running on the new primary; restart scripts/demo to switch over again.")


if __name__ == "__main__":
    main()
