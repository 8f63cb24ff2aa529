"""SHOW STATS_TOTALS, STATS_AVERAGES and TOTALS, with PgBouncer 1.25's columns.

Totals are since start; averages are those of the last ``stats_period`` (the
same figures SHOW STATS prints, kept by stats.py).
"""

from __future__ import annotations

from .show import _cols

# (SHOW STATS_TOTALS column, counter in pool.stats) in PgBouncer's order.
_TOTALS = (("server_assignment_count", "server_assignment_count"), ("xact_count", "xact_count"),
           ("query_count", "query_count"), ("bytes_received", "bytes_received"),
           ("bytes_sent", "bytes_sent"), ("xact_time", "xact_time"), ("query_time", "query_time"),
           ("wait_time", "wait_time"), ("client_parse_count", "client_parse_count"),
           ("server_parse_count", "server_parse_count"), ("bind_count", "bind_count"))
# PgBouncer names the last three averages avg_* (and not the others).
_AVERAGE_NAMES = [name for name, _ in _TOTALS[:8]] + ["avg_client_parse_count",
                                                      "avg_server_parse_count", "avg_bind_count"]
# SHOW TOTALS row names, in PgBouncer's order.
_TOTALS_ROWS = ("server_assignment_count", "xact_count", "query_count", "client_bytes", "server_bytes",
                "xact_time", "query_time", "wait_time", "ps_client_parse_count",
                "ps_server_parse_count", "ps_bind_count")


def show_stats_totals(app):
    cols = _cols("database:t " + " ".join(f"{name}:i" for name, _ in _TOTALS))
    rows = [[db] + [tot[key] for _, key in _TOTALS] for db, tot in app.stats.totals_by_db().items()]
    return cols, rows


def show_stats_averages(app):
    cols = _cols("database:t " + " ".join(f"{name}:i" for name in _AVERAGE_NAMES))
    rows = []
    for db in app.stats.totals_by_db():
        avg = app.stats.averages.get(db, {})
        rows.append([db] + [int(avg.get(key, 0)) for _, key in _TOTALS])
    return cols, rows


def show_totals(app):
    totals = dict.fromkeys((key for _, key in _TOTALS), 0)
    for tot in app.stats.totals_by_db().values():
        for key in totals:
            totals[key] += tot.get(key, 0)
    averages = _overall_averages(app)
    rows = [[f"total_{name}", totals[key]] for name, (_, key) in zip(_TOTALS_ROWS, _TOTALS)]
    rows += [[f"avg_{name}", int(averages.get(key, 0))] for name, (_, key) in zip(_TOTALS_ROWS, _TOTALS)]
    return _cols("name:t value:i"), rows


def _overall_averages(app) -> dict:
    """Across databases: rates add up; times are weighted by their counts."""
    per_db = list(app.stats.averages.values())
    out = {}
    for key in ("server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent",
                "client_parse_count", "server_parse_count", "bind_count"):
        out[key] = sum(a.get(key, 0) for a in per_db)
    for key, weight in (("xact_time", "xact_count"), ("query_time", "query_count"),
                        ("wait_time", "xact_count")):
        count = sum(a.get(weight, 0) for a in per_db)
        out[key] = sum(a.get(key, 0) * a.get(weight, 0) for a in per_db) / count if count else 0
    return out


BUILDERS = {"stats_totals": show_stats_totals, "stats_averages": show_stats_averages,
            "totals": show_totals}
