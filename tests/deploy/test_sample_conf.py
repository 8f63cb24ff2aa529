"""conf/geobouncer.ini and the README show only examples that work: every
commented-out [databases] / [users] example and every ini block of the README
loads with geobouncer's own loader, and every [databases] key is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from geobouncer.config import load_config
from geobouncer.config.entries import DATABASE_KEYS

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "conf" / "geobouncer.ini"


def test_every_commented_entry_example_loads(tmp_path):
    lines, section, examples = [], None, 0
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        if line.startswith("["):
            section = line
        match = re.match(r"; (\S+ = .*)$", line)
        if match and section in ("[databases]", "[users]"):
            line, examples = match.group(1), examples + 1
        lines.append(line)
    assert examples >= 7
    path = tmp_path / "geobouncer.ini"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "userlist.txt").write_text('"postgres" "postgres"\n', encoding="utf-8")
    cfg = load_config(path)
    app = cfg.databases["app"]
    assert app.read_write_split and app.replicas and app.replica_max_lag == 16000000
    assert cfg.databases["ha"].topology_query == "select endpoint from topology"
    assert cfg.databases["spread"].hosts == ("10.0.0.2", "10.0.0.3")


def test_every_databases_key_is_documented():
    head = SAMPLE.read_text(encoding="utf-8").split("[users]")[0]
    words = set(re.findall(r"[\w]+", head))
    assert set(DATABASE_KEYS) <= words
    for key in ("replicas", "load_balance", "read_write_split", "replica_max_lag", "topology_query"):
        assert re.search(rf"^;;   {key}: ", head, re.MULTILINE), key


def readme_ini_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```ini\n(.*?)```", text, re.DOTALL)


@pytest.mark.parametrize("index", range(len(readme_ini_blocks())))
def test_readme_ini_examples_load(index, tmp_path):
    block = readme_ini_blocks()[index]
    if "[pgbouncer]" not in block:
        block += "\n[pgbouncer]\n"
    # Hook paths in the examples point at /etc/geobouncer: take conf/'s files.
    block = block.replace("/etc/geobouncer/", str(ROOT / "conf") + "/")
    path = tmp_path / "geobouncer.ini"
    path.write_text(block, encoding="utf-8")
    load_config(path)
