"""One-shot connections the pooler opens for itself: health checks, writer
polls, the topology query. Logged in with the same credentials as the pools."""

from __future__ import annotations

import dataclasses

from ..net.server import ServerConnection, ServerError
from ..pool.pool import ConnectionCounters, Pool, PoolLimits

_LIMITS = PoolLimits(1, 0, 0, "session")


class ProbeFailed(Exception):
    pass


def node_entry(entry, name: str, host: str, port: int):
    """A [databases] entry for one host of ``entry`` (same dbname and credentials)."""
    return dataclasses.replace(entry, name=name, host=host, hosts=(host,), port=port, ports=(port,),
                               topology_query=None, replicas=None, read_write_split=False,
                               dbname=entry.dbname or entry.name)


def run(app, entry, host: str, port: int, sql: str, timeout: float) -> list[list[str | None]]:
    """Connect to host:port as the database's pool user, run ``sql``, close.
    Raises ProbeFailed with the reason."""
    creds = app.failover.probe_credentials(entry)
    if creds is None:
        raise ProbeFailed(f"no credentials yet to reach {entry.name} (no client has logged in)")
    user, password, scram_keys = creds
    pool = Pool(node_entry(entry, entry.name, host, port), user, _LIMITS, ConnectionCounters())
    server = ServerConnection(pool, host, port)
    startup = {"user": user, "database": entry.dbname or entry.name,
               "application_name": "geobouncer health check"}
    try:
        server.connect(startup, password, scram_keys, timeout, frozenset(), app.tls.server, app.settings)
        return server.query(sql, timeout=timeout)
    except (OSError, ServerError) as exc:
        raise ProbeFailed(getattr(exc, "text", None) or str(exc) or type(exc).__name__) from None
    finally:
        if server.sock is not None:
            server.close("probe done")


def parse_lsn(text: str | None) -> int | None:
    """'16/B374D848' -> a byte position."""
    if not text or "/" not in text:
        return None
    high, low = text.split("/", 1)
    return (int(high, 16) << 32) + int(low, 16)
