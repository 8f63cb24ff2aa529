"""Two-phase commit for a transaction that touched several shards
(``two_phase_commit = 1``), and the recovery of what a crash left prepared.

COMMIT of such a transaction: the first shard it touched (the decider) is asked
for its transaction id (``pg_current_xact_id()``), then every shard runs
``PREPARE TRANSACTION 'geobouncer:<token>:<decider shard>:<decider xid>:<shard>'``,
the decider first among the COMMIT PREPAREDs. If any PREPARE fails, every
prepared shard is rolled back and the client gets the error.

Recovery needs no log of the pooler's own: the global id names the decider
and its transaction id. A transaction prepared on a shard longer than
RECOVER_AFTER seconds is committed if the decider's transaction committed
(``pg_xact_status``), and rolled back otherwise (still prepared on the
decider: nobody committed yet, so rolling back everywhere is safe).
"""

from __future__ import annotations

import logging
import secrets

import gevent

from ..proto import messages as m
from .shard_link import ShardLost

log = logging.getLogger("geobouncer")

_Z, _E, _D = ord("Z"), ord("E"), ord("D")
PREFIX = "geobouncer:"
RECOVER_AFTER = 5.0       # seconds a prepared transaction may wait for its commit
RECOVER_EVERY = 10.0
_LOST = {"C": "08006", "M": "server connection lost on a shard during COMMIT: the transaction was rolled back"}


def _run(session, shard_link, sql: str):
    """One statement on a held shard: (rows, error fields or None)."""
    shard_link.send_request(m.query(sql), 1, session.client.request_time)
    rows, error = [], None
    for mtype, body in shard_link.messages():
        if mtype == _D:
            rows.append(_first_value(body))
        elif mtype == _E:
            error = m.parse_error_fields(body)
    return rows, error


def _first_value(body: bytes):
    size = int.from_bytes(body[2:6], "big", signed=True)
    return None if size < 0 else body[6:6 + size].decode()


def commit(session, links) -> bytes:
    """COMMIT on several shards. Returns the reply (without ReadyForQuery)."""
    decider = links[0]
    try:
        rows, error = _run(session, decider, "SELECT pg_current_xact_id()")
    except ShardLost:
        rows, error = [], _LOST
    if error is not None:
        return _abort(session, links, [], error, {})
    # Unique per shard too: two shards may be databases of one cluster.
    base = f"{PREFIX}{secrets.token_hex(8)}:{decider.shard}:{rows[0]}"
    gids = {lk.shard: f"{base}:{lk.shard}" for lk in links}
    prepared = []
    for shard_link in links:
        gid = gids[shard_link.shard]
        try:
            _, error = _run(session, shard_link, f"PREPARE TRANSACTION '{gid}'")
        except ShardLost:
            # Lost before it said: whatever it did, it never committed; the
            # others are rolled back now (recovery finishes a prepared one left there).
            error = _LOST
        if error is not None:
            return _abort(session, links, prepared, error, gids)
        prepared.append(shard_link)
    for shard_link in links:                  # the decider first: its commit is the decision
        try:
            gid = gids[shard_link.shard]
            _, error = _run(session, shard_link, f"COMMIT PREPARED '{gid}'")
        except ShardLost:
            error = {"M": "server lost"}
        if error is not None:
            log.warning("COMMIT PREPARED '%s' on shard %d failed (%s): recovery will finish it",
                        gid, shard_link.shard, error.get("M"))
    session.counters.two_phase_commits += 1
    return m.command_complete("COMMIT")


def _abort(session, links, prepared, error, gids: dict) -> bytes:
    for shard_link in links:
        gid = gids.get(shard_link.shard)
        try:
            if shard_link.lost:
                raise ShardLost()
            if shard_link in prepared:
                _run(session, shard_link, f"ROLLBACK PREPARED '{gid}'")
            else:
                _run(session, shard_link, "ROLLBACK")
        except ShardLost:
            if shard_link in prepared:
                _rollback_on_another_server(session, shard_link.shard, gid)
    return m.error_response(error.get("C", "XX000"), error.get("M", "PREPARE TRANSACTION failed"))


def _rollback_on_another_server(session, shard: int, gid: str) -> None:
    """The server that prepared ``gid`` is gone; the prepared transaction is
    not: roll it back from a fresh server now, not 5 s later in recovery."""
    from .checkout import ClientError
    from .shard_link import link, unlink
    try:
        fresh = link(session.app, session.client, shard, session.pool(shard))
    except ClientError:
        return                          # the shard is down: recovery rolls it back later
    try:
        _run(session, fresh, f"ROLLBACK PREPARED '{gid}'")
    except ShardLost:
        pass
    finally:
        unlink(session.app, fresh, session.client.request_time)


# --- recovery ------------------------------------------------------------------------
def recover_database(app, sdb, user: str) -> int:
    """Resolve the old prepared transactions of ``sdb``'s shards. Returns how many."""
    from .checkout import acquire_server

    class _Nobody:
        def set_waiting(self, waiting):
            pass

    servers = []
    resolved = 0
    try:
        for shard, entry_name in enumerate(sdb.shards):
            entry = app.database_for(entry_name)
            pool = app.get_pool(entry, user, None)
            servers.append(acquire_server(app, pool, _Nobody()))
        for shard, server in enumerate(servers):
            rows = server.query(
                f"SELECT gid FROM pg_prepared_xacts WHERE gid LIKE '{PREFIX}%' "
                "AND database = current_database() "
                f"AND prepared < now() - interval '{RECOVER_AFTER} seconds'")
            for (gid,) in rows:
                try:
                    _, _, decider, xid, _ = gid.split(":")
                    decider = int(decider)
                    int(xid)
                except ValueError:
                    continue
                status = servers[decider].query(f"SELECT pg_xact_status('{xid}'::xid8)")[0][0]
                verb = "COMMIT" if status == "committed" else "ROLLBACK"
                server.query(f"{verb} PREPARED '{gid}'")
                log.warning("two-phase recovery: %s PREPARED '%s' on shard %d", verb, gid, shard)
                resolved += 1
    finally:
        for server in servers:
            if server.reusable():
                app.releaser.release_idle(server)
            else:
                server.close("two-phase recovery")
    return resolved


def recovery_loop(app) -> None:
    """Background: every RECOVER_EVERY seconds, for every sharded database."""
    from ..sharding.counters import ShardCounters
    while not app.shutting_down:
        if app.settings.two_phase_commit:
            for name, sdb in list(app.cfg.sharded.items()):
                user = _recovery_user(app, sdb)
                if user is None:
                    continue
                try:
                    count = recover_database(app, sdb, user)
                except Exception as exc:    # a shard down: next round
                    log.debug("two-phase recovery of %s: %s", name, exc)
                    continue
                if count:
                    app.shard_stats.setdefault(name, ShardCounters()).two_phase_recovered += count
        gevent.sleep(RECOVER_EVERY)


def _recovery_user(app, sdb):
    """A user the pooler can log in to the shards as: a shard's forced user, else
    any user with a pool to the first shard."""
    for entry_name in sdb.shards:
        entry = app.database_for(entry_name)
        if entry is not None and entry.user:
            return entry.user
    for (dbname, user) in list(app.pools):
        if dbname in sdb.shards:
            return user
    return None
