"""Counters for SHOW STATS and the periodic stats log line (stats_period)."""

from __future__ import annotations

import logging

import gevent

log = logging.getLogger("geobouncer")


class Stats:
    def __init__(self, app):
        self.app = app
        self.last: dict[str, dict] = {}
        self.averages: dict[str, dict] = {}

    def totals_by_db(self) -> dict[str, dict]:
        totals: dict[str, dict] = {}
        for pool in self.app.pools.values():
            snap = pool.stats.snapshot()
            acc = totals.setdefault(pool.db.name, dict.fromkeys(snap, 0))
            for key, value in snap.items():
                acc[key] += value
        return totals

    def report_loop(self) -> None:
        while not self.app.stopped.is_set():
            period = max(1.0, float(self.app.settings.stats_period or 60))
            gevent.sleep(period)
            self.report(period)

    def report(self, period: float) -> None:
        totals = self.totals_by_db()
        for db, now in totals.items():
            before = self.last.get(db, dict.fromkeys(now, 0))
            delta = {k: now[k] - before.get(k, 0) for k in now}
            xacts = delta["xact_count"]
            queries = delta["query_count"]
            avg = {
                "server_assignment_count": delta["server_assignment_count"] / period,
                "xact_count": xacts / period,
                "query_count": queries / period,
                "client_parse_count": delta["client_parse_count"] / period,
                "server_parse_count": delta["server_parse_count"] / period,
                "bind_count": delta["bind_count"] / period,
                "bytes_received": delta["bytes_received"] / period,
                "bytes_sent": delta["bytes_sent"] / period,
                "xact_time": delta["xact_time"] / xacts if xacts else 0,
                "query_time": delta["query_time"] / queries if queries else 0,
                "wait_time": delta["wait_time"] / xacts if xacts else 0,
            }
            self.averages[db] = avg
            if self.app.settings.log_stats:
                log.info("[%s] stats: %d xacts/s, %d queries/s, %d client parses/s, %d server parses/s, "
                         "%d binds/s, in %d B/s, out %d B/s, xact %d us, query %d us, wait %d us",
                         db, avg["xact_count"], avg["query_count"], avg["client_parse_count"],
                         avg["server_parse_count"], avg["bind_count"], avg["bytes_received"],
                         avg["bytes_sent"], avg["xact_time"], avg["query_time"], avg["wait_time"])
        self.last = totals
