"""/readyz of the metrics endpoint: is this pooler ready to take clients?

Ready means listening (not shutting down) and at least one database able to get a
server now, as a Kubernetes readiness probe wants it: a pooler whose only server
is down should be taken out of the Service, and put back once it is up.
"""

from __future__ import annotations

import math
import os
import socket as pysocket
from time import monotonic

import gevent
from gevent import socket

READY_PROBE_TIMEOUT = 1.0  # seconds for the connect that tells /readyz a server is there
READY_CACHE = 1.0          # seconds a /readyz answer is reused (probes hit no server more often)


class Readiness:
    """/readyz: listening, and at least one database can get a server now.

    "Can get a server": a pool holds a live server connection, or a connect to
    one of the hosts behind [databases] (a cluster's writer when it has one)
    succeeds within READY_PROBE_TIMEOUT. The answer is kept READY_CACHE seconds,
    so probes, however frequent, never storm a server.
    """

    def __init__(self, app):
        self.app = app
        self._at = -math.inf
        self._answer = (False, "not checked")

    def check(self) -> tuple[bool, str]:
        app = self.app
        if app.shutting_down:
            return False, "shutting down"
        if not app.listeners.servers:
            return False, "not listening"
        now = monotonic()
        if now - self._at >= READY_CACHE:
            self._answer = self._probe()
            self._at = monotonic()
        return self._answer

    def _probe(self) -> tuple[bool, str]:
        for pool in list(self.app.pools.values()):
            if any(not getattr(s, "closed", False) for s in list(pool.idle) + list(pool.active)):
                return True, f"pool {pool.db.name}/{pool.user} has a server connection"
        targets = self._targets()
        if not targets:
            return False, "no database to serve"
        probes = [gevent.spawn(_reachable, host, port) for host, port in targets]
        gevent.joinall(probes, timeout=READY_PROBE_TIMEOUT + 0.5)
        for (host, port), probe in zip(targets, probes):
            if probe.value:
                gevent.killall([p for p in probes if not p.ready()], block=False)
                return True, f"server {host}:{port} accepts connections"
        gevent.killall(probes, block=False)
        return False, "no server reachable"

    def _targets(self) -> list[tuple[str, int]]:
        app = self.app
        default_host = app.settings.unix_socket_dir or "/tmp"
        seen: list[tuple[str, int]] = []
        for name, db in app.cfg.databases.items():
            if db.shards:
                continue            # its shards are entries of their own
            cluster = app.clusters.get(name)
            writer = cluster.writer_address() if cluster is not None else None
            if writer is not None:
                pairs = [writer]
            else:
                hosts = list(db.hosts) if db.hosts else [default_host]
                ports = list(db.ports) if db.ports else [db.port]
                pairs = [(h, ports[i] if i < len(ports) else ports[-1]) for i, h in enumerate(hosts)]
            for pair in pairs:
                if pair not in seen:
                    seen.append(pair)
        return seen


def _reachable(host: str, port: int) -> bool:
    try:
        with gevent.Timeout(READY_PROBE_TIMEOUT):
            if host.startswith("/"):
                sock = socket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
                try:
                    sock.connect(os.path.join(host, f".s.PGSQL.{port}"))
                finally:
                    sock.close()
            else:
                socket.create_connection((host, port)).close()
        return True
    except (OSError, gevent.Timeout):
        return False
