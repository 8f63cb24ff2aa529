"""scripts/demo end to end: three real PostgreSQL servers and geobouncer, the
guided tour's answers (reads on the replicas, writes on the primary, the routing
and rewrite hooks, the admin console), the README's psycopg2 example of
per-transaction routing, `scripts/demo switchover` under load, then SIGTERM stops
and removes everything."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from fixtures.ports import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "scripts" / "demo"


def demo_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DEMO_DIR=str(tmp_path / "demo"),
        DEMO_PORT=str(free_port()),
        DEMO_SWITCHOVER_SECONDS="3",
        # This interpreter already has everything: no .venv, no pip.
        GEOBOUNCER_NO_INSTALL="1",
        PYTHON=sys.executable,
    )
    return env


def answers(out: str, label: str) -> list[str]:
    """The `=> ...` lines printed under a tour step's label."""
    block = out.split(f"  {label}\n", 1)[1]
    lines = block.splitlines()[1:]     # skip the psql line
    found = []
    for line in lines:
        if not line.startswith("      => "):
            break
        found.append(line[len("      => "):])
    return found


def test_demo_tour_switchover_and_cleanup(tmp_path):
    env = demo_env(tmp_path)
    demo_dir = Path(env["DEMO_DIR"])
    log = tmp_path / "demo.out"
    with log.open("w") as out:
        proc = subprocess.Popen([str(DEMO)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    pids = []
    try:
        wait_until(lambda: (demo_dir / "ready").exists() or proc.poll() is not None,
                   timeout=90, message="the demo's tour")
        text = log.read_text()
        assert proc.poll() is None, text
        state = dict(re.findall(r"(\w+)=(\S+)", (demo_dir / "state").read_text()))
        primary, r1, r2 = (state[k] for k in ("PRIMARY_PORT", "REPLICA1_PORT", "REPLICA2_PORT"))
        pgroot = Path(state["PGROOT"])
        pids = [int((pgroot / n / "data" / "postmaster.pid").read_text().split()[0])
                for n in ("primary", "replica1", "replica2")]

        # 1. the read/write split: reads on the replicas in turn, writes on the primary
        reads = answers(text, "a read:") + answers(text, "the next read:")
        assert sorted(reads) == sorted([f"{r1} | t", f"{r2} | t"]), text
        assert answers(text, "a write:") == [f"{primary} | f"]
        assert answers(text, "a transaction (its reads too):") == [f"{primary} | f"]
        assert answers(text, "a read forced to the primary:") == [f"{primary} | f"]
        # 2. conf/routing_rules.py: tablea -> dev.1 (primary), tableb -> dev.2 (replica 2)
        assert answers(text, "tablea:")[0].startswith(f"{primary} | ")
        assert answers(text, "tableb:")[0].startswith(f"{r2} | ")
        # 3. conf/rewrite_query.py: the pre-aggregated table answers through geobouncer
        assert answers(text, "through geobouncer:") == ["Berlin | 15", "Lisbon | 10"]
        assert "      => Berlin | 115" in text
        # 4. the admin console
        assert len(answers(text, "SHOW REPLICAS:")) == 2
        roles = [row.split(" | ")[4] for row in answers(text, "SHOW TOPOLOGY:")]
        assert sorted(roles) == ["reader", "reader", "writer"]
        routing = answers(text, "SHOW ROUTING:")
        assert any(row.startswith("rewrite_query | ") for row in routing)
        assert any(row.startswith("route | dev.2 | ") for row in routing)

        # The README's psycopg2 example: routing is per transaction.
        _psycopg2_routes_per_transaction(state, primary, r1, r2)

        # 5. the switchover under load
        switch = subprocess.run([str(DEMO), "switchover"], env=env, capture_output=True, text=True,
                                timeout=60)
        report = switch.stdout
        assert switch.returncode == 0, report + switch.stderr
        assert "connections lost (client reconnected): 0" in report, report
        after = re.search(r"writes from the stop on: \d+, on (.*)", report).group(1)
        assert re.search(r"replica 1 \((\d+)\)", after), report
        errors = re.findall(r"(\d+) x SQLSTATE (\w+)", report)
        assert all(code == "08006" for _, code in errors), report   # only in-flight writes
        topology = dict(re.findall(r"^  demo \| 127\.0\.0\.1:(\d+) \| [^|]+ \| \d+ \| (\w+) \|", report, re.M))
        assert topology == {primary: "down", r1: "writer", r2: "reader"}, report
        again = subprocess.run([str(DEMO), "switchover"], env=env, capture_output=True, text=True,
                               timeout=60)
        assert again.returncode != 0 and "switched over already" in again.stderr
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)   # what Ctrl-C does for a terminal's group
        proc.wait(timeout=60)
    # Everything stopped and removed.
    assert not demo_dir.exists()
    for pid in pids:
        wait_until(lambda pid=pid: not _alive(pid), timeout=30, message=f"postgres {pid} gone")
    assert "demo stopped" in log.read_text()


def _psycopg2_routes_per_transaction(state, primary, r1, r2):
    import psycopg2

    dsn = f"host=127.0.0.1 port={state['LISTEN_PORT']} dbname=demo user=demo password=demo"
    tableb = "select inet_server_port(), note from tableb"
    where = "select inet_server_port(), pg_is_in_recovery()"
    conn = psycopg2.connect(dsn)
    try:
        cur = conn.cursor()
        cur.execute(tableb)           # psycopg2's BEGIN waits for it: the transaction goes to dev.2
        assert str(cur.fetchone()[0]) == r2
        cur.execute(where)            # and stays there
        assert str(cur.fetchone()[0]) == r2
        conn.commit()
        conn.autocommit = True
        cur.execute(tableb)           # each statement routed: dev.2
        assert str(cur.fetchone()[0]) == r2
        cur.execute(where)            # a read: a replica
        assert str(cur.fetchone()[0]) in (r1, r2)
    finally:
        conn.close()
    ro = psycopg2.connect(dsn)
    try:
        ro.set_session(readonly=True)  # BEGIN READ ONLY: one replica for the transaction
        cur = ro.cursor()
        cur.execute(where)
        first = str(cur.fetchone()[0])
        cur.execute(where)
        assert first in (r1, r2) and str(cur.fetchone()[0]) == first
        ro.commit()
    finally:
        ro.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sharded_demo_tour_and_cleanup(tmp_path):
    """scripts/demo --sharded with DEMO_SETUP_ONLY=1: rows written through the
    sharded entry are on the shards, keyed lookups answer from the key's shard,
    cross-shard queries are merged, SHOW SHARDS lists the three; then everything
    is stopped and removed."""
    env = demo_env(tmp_path)
    env["DEMO_SETUP_ONLY"] = "1"
    done = subprocess.run([str(DEMO), "--sharded"], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)
    text = done.stdout
    assert done.returncode == 0, text + done.stderr
    port, pgroot = re.search(r"databases of one PostgreSQL on 127\.0\.0\.1:(\d+) \(data in (\S+)\)",
                             text).groups()

    # 1. where the rows are, asked of each shard directly: every user once, 30 payments
    on_shard = {}
    payments = 0
    for shard in ("demo_0", "demo_1", "demo_2"):
        [row] = answers(text, f"{shard}:")
        ids, count = row.split(" | ")
        on_shard[shard] = [int(i) for i in ids.split()]
        payments += int(count)
    assert sorted(i for ids in on_shard.values() for i in ids) == list(range(1, 13)), text
    assert all(on_shard.values()) and payments == 30, text     # 12 keys: no shard left empty
    shard_of = {i: shard for shard, ids in on_shard.items() for i in ids}

    # 2. keyed lookups: the key's shard answers; a user's payments are on that shard
    assert answers(text, "user 7:") == [f"{shard_of[7]} | 7 | frances"], text
    assert answers(text, "user 8:") == [f"{shard_of[8]} | 8 | ken"], text
    [mine] = answers(text, "user 7's payments:")
    assert mine.split(" | ")[:2] == [shard_of[7], "3"], text        # payments 6, 18 and 30

    # 3. merged across shards
    assert answers(text, "count across shards:") == ["12"], text
    assert answers(text, "rows per shard (GROUP BY):") == [
        f"{shard} | {len(ids)}" for shard, ids in sorted(on_shard.items())], text
    assert answers(text, "ORDER BY ... LIMIT:") == ["1 | ada", "3 | alan", "5 | barbara", "10 | dennis"]
    totals = answers(text, "totals per user (GROUP BY, ORDER BY):")
    assert [row.split(" | ")[:2] for row in totals] == [["1", "2"], ["2", "3"], ["3", "2"]], text
    [refused] = answers(text, "refused (string_agg cannot be merged):")
    assert refused.startswith("ERROR:") and "string_agg" in refused, text

    # 4. the admin console
    shards = [row.split(" | ") for row in answers(text, "SHOW SHARDS:")]
    assert [(r[0], r[1], r[2], r[4], r[6]) for r in shards] == [
        ("demo", str(n), f"demo_{n}", port, "up") for n in range(3)], text
    assert all(int(r[10]) == 3 for r in shards), text     # single-shard: the three lookups

    # Torn down: the directories, the listeners, the processes.
    assert "demo stopped" in done.stderr
    assert not Path(env["DEMO_DIR"]).exists() and not Path(pgroot).exists()
    for listening in (port, env["DEMO_PORT"]):
        wait_until(lambda p=listening: not _accepts(int(p)), timeout=10, message=f"port {listening} closed")
    assert not _pids_mentioning(pgroot, env["DEMO_DIR"]), "processes left behind"


def _accepts(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pids_mentioning(*paths: str) -> list[int]:
    """Processes whose command line names one of paths (the postmaster's -D, geobouncer's -c)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(path in cmdline for path in paths):
            found.append(int(proc.name))
    return found
