"""Shared pytest configuration: the fixtures live in tests/fixtures/ as plugins.

- ``pg``, ``pg_replica``, ``make_pg``, ``make_replica``: real PostgreSQL (fixtures/pg.py)
- ``bouncer``: geobouncer as a subprocess (fixtures/bouncer.py)
- ``proxy``: a TCP tunnel to cut the network (fixtures/proxy.py)
- a per-test time limit (fixtures/watchdog.py)

Helpers for tests: ``from fixtures.ports import free_port, wait_until``.
"""

import sys
from pathlib import Path

# tests/ has no __init__.py; make ``fixtures`` importable however pytest was started.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

pytest_plugins = [
    "fixtures.ports",
    "fixtures.pg",
    "fixtures.bouncer",
    "fixtures.proxy",
    "fixtures.watchdog",
]
