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
