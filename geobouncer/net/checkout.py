"""Getting a server for a client: take an idle one, open a new one, or wait.

The pool decides (geobouncer.pool.pool); this module does the waiting and the
I/O those decisions need: connecting, server_check_query, connect_query.
"""

from __future__ import annotations

import logging
from time import monotonic

from ..pool.pool import CHECK, OPEN, RETIRE, TAKE, WAIT
from ..proto.framing import ProtocolError
from .handoff import Waiter
from .server import ServerConnection, ServerError

log = logging.getLogger("geobouncer")


class ClientError(Exception):
    """An error to send to the client; ``close`` says whether to disconnect it."""

    def __init__(self, sqlstate: str, text: str, close: bool = True):
        super().__init__(text)
        self.sqlstate = sqlstate
        self.text = text
        self.close = close


def no_server_now(pool) -> bool:
    """Every server busy and no room for another: only then is a Parse-only
    batch answered without a server (a server, when there is one, checks the
    text against the database as it is now; net/unlinked.py)."""
    return not pool.idle and not pool.may_open(False)


def acquire_server(app, pool, client) -> ServerConnection:
    """Return an active server for ``client``, or raise ClientError. The pool
    decides (Pool.checkout); this carries the decision out."""
    settings = app.settings
    check_delay = settings.server_check_delay if settings.server_check_query else None
    cluster = pool.cluster
    start = None
    wait_limit = settings.query_wait_timeout
    if not (app.paused or pool.paused) and cluster is None:
        # The common cases first: an idle server, no deadline to compute; or
        # a full pool with nothing to try but waiting.
        decision, server = pool.checkout(monotonic(), settings.server_lifetime, check_delay)
        if decision is TAKE:
            return server
        if decision is WAIT:
            if pool.full():
                start = monotonic()
                server = _wait(app, pool, client, start + wait_limit if wait_limit > 0 else None, start)
                if server is not None:
                    return server
        elif decision is not OPEN and _carry_out(app, decision, server):
            return server
    if start is None:
        start = monotonic()
    deadline = start + wait_limit if wait_limit > 0 else None
    reserve_after = start + settings.reserve_pool_timeout
    while True:
        if cluster is not None and (cluster.switching or cluster.verifying):
            _wait_for_writer(app, cluster, client, start)
        if app.paused or pool.paused:
            client.set_waiting(True)
            try:
                app.wait_resumed(pool, _remaining(deadline))
            finally:
                client.set_waiting(False)
            if deadline is not None and monotonic() >= deadline:
                raise ClientError("08P01", "query_wait_timeout")
        now = monotonic()
        use_reserve = pool.limits.reserve_pool_size > 0 and now >= reserve_after
        decision, server = pool.checkout(now, settings.server_lifetime, check_delay, use_reserve)
        if decision is TAKE:
            return server
        if decision is CHECK or decision is RETIRE:
            if _carry_out(app, decision, server):
                return server
            continue
        # A failing login fails the client only when no server of the pool can
        # serve it: otherwise it queues for the ones that work (as PgBouncer).
        serving = pool.server_count() - pool.connecting > 0
        if decision is OPEN and (cluster is not None or not _login_failing(app, pool, serving)):
            if use_reserve and pool.server_count() >= pool.limits.pool_size:
                log.warning("taking connection from reserve_pool for %s/%s", pool.db.name, pool.user)
            try:
                return open_server(app, pool)
            except ClientError:
                if cluster is not None and (cluster.switching or cluster.verifying):
                    continue      # the writer just failed: wait for the new one
                if not (pool.server_count() - pool.connecting > 0):
                    raise
        own_limit = pool.limits.pool_size + (pool.limits.reserve_pool_size if use_reserve else 0)
        if pool.server_count() < own_limit and app.releaser.evict_idle_for(pool):
            continue              # a server of another pool made room (PgBouncer's eviction)
        server = _wait(app, pool, client, deadline, reserve_after)
        if server is not None:
            return server


def _carry_out(app, decision, server) -> bool:
    """RETIRE: close the server (False: ask again). CHECK: server_check_query
    (PgBouncer's default "<empty>" sends an empty query, the cheapest round
    trip); True when it answered."""
    if decision is RETIRE:
        server.close("database configuration changed" if server.stale else "server lifetime over")
        return False
    settings = app.settings
    sql = "" if settings.server_check_query == "<empty>" else settings.server_check_query
    try:
        server.query(sql, timeout=settings.server_connect_timeout or None)
    except ServerError as exc:
        server.close(f"server check query failed: {exc.text}")
        return False
    return True


def _wait_for_writer(app, cluster, client, start: float) -> None:
    """Hold the client while the cluster finds its new writer (bounded)."""
    limit = app.settings.switchover_timeout or app.settings.query_wait_timeout
    deadline = start + limit if limit else None
    client.set_waiting(True)
    try:
        # Loop: the event may be set and cleared again (a false alarm, then a
        # real failure) before this greenlet runs; only the deadline ends the wait.
        while cluster.switching or cluster.verifying:
            remaining = None if deadline is None else deadline - monotonic()
            if remaining is not None and remaining <= 0:
                break
            cluster.wait_for_writer(remaining)
    finally:
        client.set_waiting(False)
    if cluster.switching or cluster.verifying:
        # An ERROR, not FATAL: the client stays connected and may retry.
        raise ClientError("08006", f"no writer available for database {cluster.name}: "
                          f"switchover did not finish within {limit:g}s", close=False)


def _remaining(deadline):
    return None if deadline is None else max(0.0, deadline - monotonic())


def _wait(app, pool, client, deadline, reserve_after):
    """Queue as a waiter until a server is handed over (returned) or a slot frees
    up (None: the caller loops to open one). Raises ClientError on timeout."""
    waiter = Waiter()
    pool.waiters.append(waiter)
    client.set_waiting(True)
    timeout = _remaining(deadline)
    if pool.limits.reserve_pool_size > 0 and monotonic() < reserve_after:
        until_reserve = reserve_after - monotonic()
        timeout = until_reserve if timeout is None else min(timeout, until_reserve)
    try:
        if waiter.wait(timeout):
            return waiter.server
        try:
            pool.waiters.remove(waiter)
        except ValueError:
            pass
        if deadline is not None and monotonic() >= deadline:
            raise ClientError("08P01", "query_wait_timeout")
        return None                  # reserve_pool_timeout passed: try again
    except BaseException:
        # Interrupted (a login timeout, a kill) after a server was handed over:
        # it goes back, or the pool would count it active for ever.
        if waiter.server is not None:
            app.releaser.release_idle(waiter.server)
            waiter.server = None
        try:
            pool.waiters.remove(waiter)
        except ValueError:
            pass
        raise
    finally:
        client.set_waiting(False)


def _login_failing(app, pool, serving: bool) -> bool:
    """Within server_login_retry of a failed login: True (do not try again)
    when the pool has servers to wait for; raise the cached error when not."""
    failed = pool.last_login_error
    if failed is None:
        return False
    when, sqlstate, text = failed
    if monotonic() - when >= app.settings.server_login_retry:
        pool.last_login_error = None
        return False
    if serving:
        return True
    raise ClientError(sqlstate if sqlstate.startswith("28") else "08P01",
                      f"server login has been failing, cached error: {text} (server_login_retry)")


def open_server(app, pool) -> ServerConnection:
    """Open and log in a new server connection for ``pool``; returns it active."""
    settings = app.settings
    pool.opening()
    started = monotonic()
    errors = []
    server = None
    for host, port in app.hosts_for(pool):
        attempt = ServerConnection(pool, host, port)
        try:
            attempt.connect(app.server_startup(pool), pool.server_password, pool.scram_keys,
                            settings.server_connect_timeout, pool.tracked, app.tls.server, settings)
        except ServerError as exc:
            errors.append((exc.sqlstate, exc.text))
            _close_quietly(attempt)
            if exc.sqlstate in ("08006", "57P03", "57P01"):
                _report(pool, attempt, exc.text, None)
            if exc.fatal:
                break
            continue
        except OSError as exc:
            errors.append(("08006", f"could not connect to server: {exc.strerror or exc}"))
            _close_quietly(attempt)
            _report(pool, attempt, errors[-1][1], None)
            continue
        except ProtocolError as exc:     # the "server" speaks something else (HTTP, garbage)
            errors.append(("08P01", f"server login failed: {exc}"))
            _close_quietly(attempt)
            _report(pool, attempt, errors[-1][1], None)
            continue
        except BaseException:
            # A timeout or kill of the opener: the slot must not stay counted.
            _close_quietly(attempt)
            pool.open_abandoned()
            raise
        server = attempt
        break
    if server is None:
        sqlstate, text = errors[-1] if errors else ("08006", "could not connect to server")
        pool.open_failed(sqlstate, text, started)
        if settings.log_pooler_errors:
            log.warning("S: %s/%s: server login failed: %s", pool.db.name, pool.user, text)
        raise ClientError(sqlstate if sqlstate.startswith(("28", "3D")) else "08P01",
                          f"server login failed: {text}" if sqlstate.startswith("28") else text)
    pool.opened(server)
    pool.last_login_error = None
    if pool.welcome is None:
        pool.welcome = dict(server.params)
    if settings.log_connections:
        # A unix socket's getsockname() is a str (usually empty), not (host, port).
        local = server.local_addr if isinstance(server.local_addr, tuple) else ("unix", 0)
        log.info("%r: %s new connection to server (from %s:%s)", server, server.describe(), *local[:2])
    connect_query = pool.db.connect_query
    if connect_query:
        try:
            server.query(connect_query)
        except ServerError as exc:
            server.close(f"connect_query failed: {exc.text}")
            raise ClientError("08P01", f"connect_query failed: {exc.text}") from None
    return server


def _report(pool, server, reason: str, sqlstate) -> None:
    if pool.on_failure is not None:
        pool.on_failure(server, reason, sqlstate)


def _close_quietly(server) -> None:
    if server.sock is not None:
        try:
            server.sock.close()
        except OSError:
            pass
        server.sock = None
