"""Replicas of a database: health checks, bans, lag, and the balancer.

A database that lists ``replicas = host[:port],...`` gets a pool per replica,
each reachable as its own database key (``<db>@host:port``). Every
health_check_period each host is checked; a replica that fails (there, or when
a client's connection to it fails) is banned for replica_ban_time and taken out
of rotation, then checked again before it rejoins. A replica whose replay
position lags the primary's WAL by more than replica_max_lag bytes is skipped
until it catches up. With every replica out, reads go to the primary.
"""

from __future__ import annotations

import logging
import random
from time import monotonic

import gevent

from . import probe

log = logging.getLogger("geobouncer")

ROUND_ROBIN, RANDOM, LEAST_ACTIVE = "round_robin", "random", "least_active"


class Replica:
    __slots__ = ("host", "port", "key", "entry", "banned_until", "lag", "checked", "failures")

    def __init__(self, host: str, port: int, key: str, entry):
        self.host = host
        self.port = port
        self.key = key
        self.entry = entry
        self.banned_until = 0.0
        self.lag: int | None = None
        self.checked = False      # a health check has passed since the last ban
        self.failures = 0

    def __repr__(self) -> str:
        return f"<Replica {self.key} lag={self.lag} banned={self.banned_until > monotonic()}>"


class ReplicaSet:
    def __init__(self, app, entry):
        self.app = app
        self.entry = entry
        self.name = entry.name
        self.replicas: list[Replica] = []
        for host, port in _parse_hosts(entry.replicas, entry.port):
            key = f"{entry.name}@{host}:{port}"
            self.replicas.append(Replica(host, port, key, probe.node_entry(entry, key, host, port)))
        self._next = 0
        self._loop = None
        self._stopped = False
        self.primary_lsn: int | None = None

    # --- choosing ------------------------------------------------------------
    def available(self, now: float | None = None) -> list[Replica]:
        now = monotonic() if now is None else now
        limit = self.entry.replica_max_lag
        return [r for r in self.replicas
                if r.banned_until <= now and r.checked
                and not (limit and r.lag is not None and r.lag > limit)]

    def pick(self) -> Replica | None:
        """A replica for the next read, or None: use the primary."""
        candidates = self.available()
        if not candidates:
            return None
        how = self.entry.load_balance
        if how == RANDOM:
            return random.choice(candidates)
        if how == LEAST_ACTIVE:
            return min(candidates, key=self.app.failover.active_servers_for)
        self._next += 1
        return candidates[self._next % len(candidates)]

    def ban(self, key: str, reason: str, announce: bool = True) -> None:
        for replica in self.replicas:
            if replica.key == key and replica.banned_until <= monotonic():
                replica.banned_until = monotonic() + self.app.settings.replica_ban_time
                replica.checked = False
                replica.failures += 1
                log.warning("replica %s banned for %.0fs: %s", key, self.app.settings.replica_ban_time,
                            reason)
                if announce:
                    self.app.failover.announce("ban", self.name, key)

    # --- health checks ---------------------------------------------------------
    def start(self) -> None:
        self._loop = gevent.spawn(self._health_loop)

    def stop(self) -> None:
        self._stopped = True

    def _health_loop(self) -> None:
        while not self._stopped:
            try:
                self.check_all()
            except Exception:  # noqa: BLE001 - health checks must go on
                log.exception("health check of %s failed", self.name)
            if not any(r.checked for r in self.replicas) and self.app.failover.probe_credentials(self.entry) is None:
                gevent.sleep(0.2)    # check as soon as the first client gives credentials
            else:
                gevent.sleep(self.app.settings.health_check_period or 5.0)

    def check_all(self) -> None:
        if self.app.failover.probe_credentials(self.entry) is None:
            return      # no client has logged in yet: nothing to log in with, no ban
        timeout = self.app.settings.health_check_timeout or 2.0
        host = self.entry.hosts[0] if self.entry.hosts else "127.0.0.1"
        try:
            rows = probe.run(self.app, self.entry, host, self.entry.port,
                             "select pg_is_in_recovery(), case when pg_is_in_recovery() then null "
                             "else pg_current_wal_lsn() end", timeout)
            self.primary_lsn = probe.parse_lsn(rows[0][1]) if rows else None
        except probe.ProbeFailed as exc:
            log.debug("health check of primary %s failed: %s", self.name, exc)
            self.primary_lsn = None
        gevent.joinall([gevent.spawn(self._check, r, timeout) for r in self.replicas],
                       timeout=timeout * 2)

    def _check(self, replica: Replica, timeout: float) -> None:
        now = monotonic()
        if replica.banned_until > now:
            return              # still banned: checked again once the ban is over
        try:
            rows = probe.run(self.app, replica.entry, replica.host, replica.port,
                             "select pg_is_in_recovery(), pg_last_wal_replay_lsn()", timeout)
        except probe.ProbeFailed as exc:
            self.ban(replica.key, f"health check failed: {exc}")
            return
        replay = probe.parse_lsn(rows[0][1]) if rows else None
        if self.primary_lsn is not None and replay is not None:
            replica.lag = max(0, self.primary_lsn - replay)
        else:
            replica.lag = None if rows and rows[0][0] == "t" else 0
        if not replica.checked:
            log.info("replica %s in rotation (lag %s bytes)", replica.key, replica.lag)
        replica.checked = True

    def rows(self) -> list[list]:
        """For SHOW REPLICAS."""
        now = monotonic()
        rotation = set(map(id, self.available(now)))
        return [[self.name, r.key, r.host, r.port, int(r.banned_until > now), int(id(r) in rotation),
                 r.lag, r.failures, self.entry.load_balance] for r in self.replicas]


def _parse_hosts(text: str | None, default_port: int) -> list[tuple[str, int]]:
    out = []
    for part in (text or "").replace(" ", ",").split(","):
        part = part.strip()
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if sep and port.isdigit() and host:
            out.append((host, int(port)))
        else:
            out.append((part, default_port))
    return out
