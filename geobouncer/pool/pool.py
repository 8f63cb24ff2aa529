"""A pool of server connections for one (database, user) pair.

Decisions only: which idle server to hand out, whether a new one may be opened,
who waits, who gets a released server. The net layer does the I/O and calls
these methods; nothing here blocks or touches a socket, so the logic is testable
without PostgreSQL. Servers and waiters are opaque objects with a few attributes
(``server.created_at``, ``server.idle_since``; waiters are gevent-free
callables). A server's state is the list it is in, as in PgBouncer: ``active``,
``idle``; SHOW SERVERS and SHOW POOLS tell idle from used by ``idle_since``
(admin/show.py's server_state).
"""

from __future__ import annotations

from collections import deque
from time import monotonic

# Checkout decisions (Pool.checkout): the net layer carries them out.
TAKE = "take"      # an idle server, ready: use it
CHECK = "check"    # an idle server, idle past server_check_delay: run server_check_query first
RETIRE = "retire"  # an idle server past server_lifetime or stale: close it and ask again
OPEN = "open"      # no idle server, and a new one may be opened
WAIT = "wait"      # no idle server and no room: queue as a waiter
# Check-in decisions (Pool.checkin).
PARK = "park"            # parked idle
HAND_OVER = "hand_over"  # given to the first waiter that still wants it
RESET = "reset"          # run server_reset_query first, then check in again
CLOSE = "close"          # dirty, stale or too old: close it


class PoolLimits:
    """Sizing for one pool, resolved from [databases], [users] and [pgbouncer]."""

    __slots__ = (
        "max_db_connections",
        "max_user_connections",
        "min_pool_size",
        "pool_mode",
        "pool_size",
        "reserve_pool_size",
        "round_robin",
    )

    def __init__(self, pool_size, min_pool_size, reserve_pool_size, pool_mode,
                 max_db_connections=0, max_user_connections=0, round_robin=False):
        self.pool_size = pool_size
        self.round_robin = round_robin      # server_round_robin: the least recently used idle server first
        self.min_pool_size = min_pool_size
        self.reserve_pool_size = reserve_pool_size
        self.pool_mode = pool_mode
        self.max_db_connections = max_db_connections
        self.max_user_connections = max_user_connections


class Pool:
    """Server connections for (database, user); see module docstring."""

    def __init__(self, db, user: str, limits: PoolLimits, counters):
        self.db = db                # DatabaseEntry (resolved for this name)
        self.user = user            # the login user on the server side
        self.limits = limits
        self.counters = counters    # shared per-db/per-user open-connection counts
        self.idle: deque = deque()  # SV_IDLE / SV_USED, most recently used at the right
        self.active: set = set()
        self.connecting = 0         # SV_LOGIN
        self.waiters: deque = deque()
        self.clients: set = set()   # every logged-in client of this pool
        self.welcome: dict[str, str] | None = None   # ParameterStatus of the first server
        self.last_login_error: tuple[float, str, str] | None = None  # (when, sqlstate, text)
        self.stats = PoolStats()
        self.paused = False
        self.tracked: frozenset = frozenset()   # canonical names of tracked parameters
        self.server_password = None             # password or secret for the server login
        self.scram_keys = None                  # (client_key, server_key) from a client's SCRAM
        self.on_server_closed = None            # callback(server, reason) set by the net layer
        self.tracking = False                   # rename prepared statements (transaction/statement)
        self.max_prepared = 0                   # per-server LRU bound (max_prepared_statements)
        self.registry = None                    # pooler-wide statement ids (pool/statements.Registry)
        self.parsed: set[int] = set()           # ids a server of this pool parsed successfully
        self.on_failure = None                  # callback(server, reason, sqlstate): host trouble
        self.cluster = None                     # the switchover cluster this database belongs to
        self.unused_since: float | None = None  # no client, no busy server since (the janitor)

    @property
    def mode(self) -> str:
        return self.limits.pool_mode

    def __repr__(self) -> str:
        return (f"<Pool {self.db.name}/{self.user} [clients: {len(self.clients)}, "
                f"{len(self.waiters)} waiting | servers: {len(self.active)} active, "
                f"{len(self.idle)} idle, {self.connecting} login]>")

    # --- counting ------------------------------------------------------------
    def server_count(self) -> int:
        return len(self.idle) + len(self.active) + self.connecting

    def full(self) -> bool:
        """No idle server and no room of the pool's own (its reserve aside):
        a checkout would WAIT, and no other pool's idle server would help."""
        return not self.idle and len(self.active) + self.connecting >= self.limits.pool_size \
            and not self.limits.reserve_pool_size

    def may_open(self, use_reserve: bool) -> bool:
        """May a new server connection be opened now?"""
        limit = self.limits.pool_size + (self.limits.reserve_pool_size if use_reserve else 0)
        if self.server_count() >= limit:
            return False
        return self.counters.may_open(self.db.name, self.user, self.limits)

    # --- decisions -------------------------------------------------------------
    def checkout(self, now: float, lifetime: float, check_delay: float | None,
                 use_reserve: bool = False):
        """What a client that needs a server should do: ``(decision, server)``.
        TAKE, CHECK and RETIRE come with an idle server, now counted active;
        OPEN and WAIT change nothing (``check_delay`` None: no check query)."""
        idle = self.idle
        if idle:
            # LIFO keeps the working set warm; server_round_robin spreads the load
            server = idle.popleft() if self.limits.round_robin else idle.pop()
            self.active.add(server)
            life = self.db.server_lifetime or lifetime
            if server.stale or (life > 0 and now - server.created_at > life):
                return RETIRE, server
            if check_delay is not None and now - server.idle_since > check_delay:
                return CHECK, server
            return TAKE, server
        return (OPEN if self.may_open(use_reserve) else WAIT), None

    def untake(self, server) -> None:
        """Undo a checkout whose server is not used now after all (net/inline.py
        leaves a check, a retirement or a parameter sync to the client's
        greenlet, which checks out again): idle where it was, its idle time
        kept (so it is still "used" past server_check_delay)."""
        if server is None:
            return
        self.active.discard(server)
        if self.limits.round_robin:
            self.idle.appendleft(server)
        else:
            self.idle.append(server)

    def checkin(self, server, now: float, lifetime: float, reset=False):
        """A server the client is done with: ``(decision, waiter)``. A waiter
        takes it atomically (``waiter.take``): one that has just timed out
        refuses, and the next one, or the idle list, gets it — never lost."""
        life = self.db.server_lifetime or lifetime
        if server.dirty or server.stale or (life > 0 and now - server.created_at > life):
            return CLOSE, None
        if reset:       # truthy: a reset query to run
            return RESET, None
        waiter = self.release(server, now)
        return (PARK, None) if waiter is None else (HAND_OVER, waiter)

    # --- checkout / release ----------------------------------------------------
    def take_idle(self):
        """Pop the most recently used idle server (LIFO keeps the working set
        warm), or with server_round_robin the least recently used."""
        if self.idle:
            server = self.idle.popleft() if self.limits.round_robin else self.idle.pop()
            self.active.add(server)
            return server
        return None

    def opening(self) -> None:
        self.connecting += 1
        self.counters.opened(self.db.name, self.user)

    def opened(self, server) -> None:
        """A connection finished logging in; it starts active (owned by its opener)."""
        self.connecting -= 1
        self.active.add(server)

    def open_failed(self, sqlstate: str, text: str, started: float | None = None) -> None:
        """A login failed. server_login_retry counts from when the attempt
        started, as PgBouncer does: after a connect timeout as long as the
        retry delay, the next client may try again at once."""
        self.connecting -= 1
        self.counters.closed(self.db.name, self.user)
        self.last_login_error = (monotonic() if started is None else started, sqlstate, text)

    def open_abandoned(self) -> None:
        """The opener went away mid-login (a timeout, a kill): not the server's fault."""
        self.connecting -= 1
        self.counters.closed(self.db.name, self.user)

    def release(self, server, now: float | None = None):
        """Return an active server: hand it to the first waiter if any (returned),
        else park it idle (returns None). The server stays counted active while
        a waiter takes it: a waiter may write its request to it at once, and
        a write that blocks lets other greenlets look at the pool."""
        waiters = self.waiters
        while waiters and not self.paused:    # PAUSE: waiters get no server until RESUME
            waiter = waiters.popleft()
            if waiter.take(server):
                return waiter
        self.active.discard(server)
        server.idle_since = monotonic() if now is None else now
        self.idle.append(server)
        return None

    def hand_idle_to_waiters(self) -> None:
        """After a pause: the idle servers go to the clients that waited meanwhile."""
        while self.waiters and self.idle and not self.paused:
            if self.release(self.take_idle()) is None:
                return

    def forget(self, server) -> None:
        """A server connection closed, whatever its state."""
        if server in self.active:
            self.active.discard(server)
        else:
            try:
                self.idle.remove(server)
            except ValueError:
                return
        self.counters.closed(self.db.name, self.user)

    def server_closed(self, server, reason: str) -> None:
        was_counted = server in self.active or server in self.idle
        self.forget(server)
        if was_counted:
            self.wake_one_waiter()
        if self.on_server_closed is not None:
            self.on_server_closed(server, reason)

    def wake_one_waiter(self):
        """A slot freed up (a server closed): let the first waiter try to open one."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if waiter.take(None):
                return waiter
        return None

    def idle_servers_to_close(self, now: float, idle_timeout: float, lifetime: float) -> list:
        """Idle servers past server_idle_timeout (keeping min_pool_size) or server_lifetime."""
        doomed = []
        keep = self.limits.min_pool_size
        total = self.server_count()
        for server in list(self.idle):
            too_old = lifetime > 0 and now - server.created_at > server.lifetime_limit(lifetime)
            too_idle = idle_timeout > 0 and now - server.idle_since > idle_timeout and total > keep
            if too_old or too_idle:
                self.idle.remove(server)
                self.counters.closed(self.db.name, self.user)
                doomed.append(server)
                total -= 1
        return doomed


class PoolStats:
    """Counters for SHOW STATS (totals since start; averages are computed per period)."""

    __slots__ = (
        "bind_count",
        "bytes_received",
        "bytes_sent",
        "client_parse_count",
        "query_count",
        "query_time",
        "server_assignment_count",
        "server_parse_count",
        "wait_time",
        "xact_count",
        "xact_time",
    )

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def snapshot(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class ConnectionCounters:
    """Open server connections per database and per user, for max_db_connections
    and max_user_connections (which span pools)."""

    def __init__(self):
        self.per_db: dict[str, int] = {}
        self.per_user: dict[str, int] = {}

    def may_open(self, db: str, user: str, limits: PoolLimits) -> bool:
        if limits.max_db_connections and self.per_db.get(db, 0) >= limits.max_db_connections:
            return False
        return not (limits.max_user_connections and self.per_user.get(user, 0) >= limits.max_user_connections)

    def opened(self, db: str, user: str) -> None:
        self.per_db[db] = self.per_db.get(db, 0) + 1
        self.per_user[user] = self.per_user.get(user, 0) + 1

    def closed(self, db: str, user: str) -> None:
        self.per_db[db] = self.per_db.get(db, 1) - 1
        self.per_user[user] = self.per_user.get(user, 1) - 1
