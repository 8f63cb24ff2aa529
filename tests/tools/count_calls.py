"""Python function calls per transaction in the pooler, on a scripted exchange.

    python tests/tools/count_calls.py INI PORT MODE N PASSWORD

Runs geobouncer in this process (gevent-patched, as ``python -m geobouncer``
does), drives it from a separate client process (psycopg 3: ``simple`` runs
plain queries, ``extended`` unnamed statements with a parameter, ``prepared``
named ones; ``contended`` plain queries from 4 connections at once, so that
with a pool of 2 most of them queue for a server), and counts every Python-level call the pooler makes while the
client runs N transactions (``sys.setprofile``). Prints one JSON line:
``{"mode": ..., "calls_per_tx": ..., "top": [...]}``. A count, not a timing:
the same code path gives the same number on any machine.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import collections  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

from gevent import subprocess  # noqa: E402

from geobouncer.app import Bouncer  # noqa: E402

CLIENT = r"""
import sys, threading, psycopg
mode, n = sys.argv[2], int(sys.argv[3])
width = 4 if mode == "contended" else 1      # contended: 4 connections on a pool of 2
conns = [psycopg.connect(sys.argv[1], autocommit=True) for _ in range(width)]
def tx(conn, i):
    if mode in ("simple", "contended"):
        conn.execute("SELECT %d" % (i % 1000), prepare=False).fetchall()
    else:
        conn.execute("SELECT %s::int", (i % 1000,), prepare=(mode == "prepared")).fetchall()
def run(count):
    threads = [threading.Thread(target=lambda c=c: [tx(c, i) for i in range(count // width)]) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
run(300 * width)          # warm: servers open, statements prepared
print("ready", flush=True)
sys.stdin.readline()
run(n)
print("done", flush=True)
sys.stdin.readline()
"""


def main(ini: str, port: int, mode: str, n: int, password: str) -> None:
    bouncer = Bouncer(ini)
    bouncer.start()
    counts: collections.Counter = collections.Counter()

    def profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            counts[f"{code.co_filename.rsplit('/', 2)[-1]}:{code.co_name}"] += 1

    dsn = f"host=127.0.0.1 port={port} dbname=app user=app password={password}"
    client = subprocess.Popen([sys.executable, "-c", CLIENT, dsn, mode, str(n)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if client.stdout.readline().strip() != "ready":
            raise SystemExit("the client failed before the measured run")
        sys.setprofile(profile)
        client.stdin.write("\n")
        client.stdin.flush()
        done = client.stdout.readline().strip()
        sys.setprofile(None)
        if done != "done":
            raise SystemExit("the client failed during the measured run")
        client.stdin.write("\n")
        client.stdin.flush()
        client.wait(30)
    finally:
        sys.setprofile(None)
        if client.poll() is None:
            client.kill()
    total = sum(counts.values())
    print(json.dumps({"mode": mode, "calls_per_tx": total / n,
                      "handed_over_per_tx": counts["handoff.py:take"] / n,
                      "top": [(name, count / n) for name, count in counts.most_common(15)]}))
    bouncer.lifecycle.shutdown_now()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5])
