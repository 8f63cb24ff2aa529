"""A deterministic guard on the hot path: Python function calls per
transaction in the pooler, counted with sys.setprofile on a scripted exchange
against real PostgreSQL (tests/tools/count_calls.py). A regression that adds
work per transaction fails here without any timing; speed itself is measured
by scripts/bench.

The ceilings sit a little above today's counts (simple 18, extended 19,
prepared 32 in transaction pooling, with requests and replies served from
the hub: net/inline.py, net/server_reader.py; contended 21.3: plain queries
from four connections on a pool of two, where about half of them queue for
a server and are handed over by the releasing reader): lower them when the
path gets cheaper.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.cluster import ROLE_PASSWORDS
from fixtures.ports import free_port

TOOL = Path(__file__).resolve().parents[1] / "tools" / "count_calls.py"
CEILINGS = {"simple": 20, "extended": 21, "prepared": 35, "contended": 24}


@pytest.mark.geobouncer_only("geobouncer's own Python call counts")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", sorted(CEILINGS))
def test_python_calls_per_transaction(pg, tmp_path, mode):
    port = free_port()
    (tmp_path / "userlist.txt").write_text(f'"app" "{ROLE_PASSWORDS["app"]}"\n')
    ini = tmp_path / "geobouncer.ini"
    ini.write_text(f"""[databases]
app = host={pg.host} port={pg.port} dbname=app
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = md5
auth_file = {tmp_path / 'userlist.txt'}
pool_mode = transaction
default_pool_size = 2
logfile = {tmp_path / 'geobouncer.log'}
""")
    proc = subprocess.run([sys.executable, str(TOOL), str(ini), str(port), mode, "2000",
                           ROLE_PASSWORDS["app"]],
                          capture_output=True, text=True, timeout=100,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    calls = result["calls_per_tx"]
    assert calls > 5, result            # the counter saw the pooler at work
    if mode == "contended":             # and this run measured the queued hand-off
        assert result["handed_over_per_tx"] > 0.2, result
    assert calls <= CEILINGS[mode], (
        f"{mode}: {calls:.1f} Python calls per transaction (ceiling {CEILINGS[mode]}); "
        f"the most frequent: {result['top']}")
