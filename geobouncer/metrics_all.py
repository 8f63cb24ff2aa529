"""``/metrics/all`` with ``workers = N``: the whole pooler in one scrape.

Worker i serves its own metrics on ``metrics_port + i - 1``; any worker's
``/metrics/all`` fetches every other worker's ``/metrics`` (over loopback, at
once, each bounded by TIMEOUT), adds its own, and returns them combined under
the same names and labels, so a dashboard built for one PgBouncer reads the
whole pooler from one target. Counts, bytes, times and connection gauges are
summed (each worker's split limits sum to the configured ones); a few gauges
are not additive: ``pgbouncer_up``, ``geobouncer_replica_up`` and
``geobouncer_replica_in_rotation`` take the minimum (1 only if every worker
says so), ``process_start_time_seconds`` the earliest, and the flags, the
counts of databases, users and pools every worker has alike and the rest in
_MAX the maximum. ``geobouncer_workers`` and ``geobouncer_workers_scraped`` say how
many workers there are and how many answered.
"""

from __future__ import annotations

import logging
import os
import urllib.request

import gevent
from prometheus_client.parser import text_string_to_metric_families

from .workers import WORKER_ENV

log = logging.getLogger("geobouncer")

TIMEOUT = 2.0
_MIN = frozenset(("pgbouncer_up", "geobouncer_replica_up", "geobouncer_replica_in_rotation",
                  "process_start_time_seconds"))
_MAX = frozenset(("pgbouncer_version_info", "python_info", "pgbouncer_pools_client_maxwait_seconds",
                  "geobouncer_switchover_in_progress", "geobouncer_replica_lag_bytes",
                  "geobouncer_topology_node_info", "process_max_fds",
                  # flags, and counts of the configuration every worker has alike
                  "pgbouncer_databases_paused", "pgbouncer_databases_disabled",
                  "pgbouncer_databases", "pgbouncer_users", "pgbouncer_pools",
                  "pgbouncer_cached_dns_names", "pgbouncer_cached_dns_zones"))


def identity() -> tuple[int, int] | None:
    """(index, count) when this process is one of the supervisor's workers."""
    me = os.environ.get(WORKER_ENV)
    if not me:
        return None
    index, count, _ = me.split(",", 2)
    return int(index), int(count)


def _loopback(addr: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(addr, addr)


def _fetch(addr: str, port: int) -> str | None:
    host = f"[{addr}]" if ":" in addr else addr
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=TIMEOUT) as reply:
            return reply.read().decode("utf-8", "replace")
    except (OSError, ValueError) as exc:
        log.debug("metrics/all: worker on port %d: %s", port, exc)
        return None


def combined(own: str, addr: str, port: int) -> str:
    """This worker's exposition ``own`` (served on ``port``) plus every other
    worker's, combined; ``own`` alone outside workers mode."""
    me = identity()
    if me is None:
        return own + _workers(1, 1)
    index, count = me
    base = port - (index - 1)
    addr = _loopback(addr)
    jobs = [gevent.spawn(_fetch, addr, base + i - 1) for i in range(1, count + 1) if i != index]
    gevent.joinall(jobs, timeout=TIMEOUT + 1)
    texts = [own] + [job.value for job in jobs if job.value]
    return _combine(texts) + _workers(count, len(texts))


def _combine(texts: list[str]) -> str:
    families: dict[str, tuple[str, str]] = {}          # name -> (type, help), first seen
    values: dict[tuple, float] = {}                     # (family, sample name, labels) -> value
    for text in texts:
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, (family.type, family.documentation))
            for sample in family.samples:
                key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                old = values.get(key)
                values[key] = sample.value if old is None else _merge(family.name, old, sample.value)
    out = []
    for name, (kind, doc) in families.items():
        shown = f"{name}_total" if kind == "counter" else name     # as prometheus_client writes it
        out.append(f"# HELP {shown} {_escape_help(doc)}\n# TYPE {shown} {kind}\n")
        for (fam, sample, labels), value in values.items():
            if fam == name:
                label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
                out.append(f"{sample}{{{label_text}}} {value!r}\n" if labels else f"{sample} {value!r}\n")
    return "".join(out)


def _workers(count: int, answered: int) -> str:
    return ("# HELP geobouncer_workers Serving processes (workers = N)\n# TYPE geobouncer_workers gauge\n"
            f"geobouncer_workers {float(count)}\n"
            "# HELP geobouncer_workers_scraped Workers whose metrics this scrape includes\n"
            "# TYPE geobouncer_workers_scraped gauge\n"
            f"geobouncer_workers_scraped {float(answered)}\n")


def _merge(name: str, a: float, b: float) -> float:
    if name in _MIN:
        return min(a, b)
    if name in _MAX:
        return max(a, b)
    return a + b


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
