"""Shared pytest configuration: the fixtures live in tests/fixtures/ as plugins.

- ``pg``, ``pg_replica``, ``make_pg``, ``make_replica``: real PostgreSQL (fixtures/pg.py)
- ``bouncer``: geobouncer as a subprocess; ``shared_tmp``: a temp dir it can read (fixtures/bouncer.py)
- ``proxy``: a TCP tunnel to cut the network (fixtures/proxy.py)
- a per-test time limit (fixtures/watchdog.py)

Helpers for tests: ``from fixtures.ports import free_port, wait_until``.

``@pytest.mark.geobouncer_only("feature")`` (or a module's ``pytestmark``) marks a
test of something the system PgBouncer 1.18 lacks — a geobouncer extra (routing
hooks, switchover, replicas...) or a newer PgBouncer's feature geobouncer follows.
It runs as usual; only ``GEOBOUNCER_TEST_TARGET=pgbouncer`` skips it, naming the
feature.
"""

import sys
from pathlib import Path

import pytest

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


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "geobouncer_only(feature): needs a feature the system PgBouncer 1.18 lacks; "
        "skipped only with GEOBOUNCER_TEST_TARGET=pgbouncer",
    )


def pytest_collection_modifyitems(config, items):
    # Imported here: an import at the top would load fixtures.ports before pytest can rewrite it.
    from fixtures.pooler import TARGET

    for item in items:
        marker = item.get_closest_marker("geobouncer_only")
        if marker is None:
            continue
        if not marker.args or not str(marker.args[0]).strip():
            raise pytest.UsageError(f"{item.nodeid}: geobouncer_only needs the feature as its argument")
        if TARGET == "pgbouncer":
            item.add_marker(pytest.mark.skip(reason=f"not in PgBouncer 1.18: {marker.args[0]}"))
