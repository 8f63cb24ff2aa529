"""Pool decisions as values, without sockets: checkout answers take / check /
retire / open / wait; check-in answers park / hand over / reset / close; the
hand-off to a waiter that has just timed out never loses the server."""

from types import SimpleNamespace

from geobouncer.admin.show import server_state
from geobouncer.pool.pool import (
    CHECK, CLOSE, HAND_OVER, OPEN, PARK, RESET, RETIRE, TAKE, WAIT,
    ConnectionCounters, Pool, PoolLimits,
)


class Db:
    name = "app"
    server_lifetime = 0


class Server:
    def __init__(self, created_at=0.0, idle_since=0.0):
        self.created_at = created_at
        self.idle_since = idle_since
        self.client = None
        self.internal = None
        self.dirty = False
        self.stale = False

    def __repr__(self):
        return f"<Server {id(self):x}>"


class Waiter:
    """The net layer's waiter, minus gevent: ``take`` is the atomic hand-off."""

    def __init__(self):
        self.done = False
        self.got = None

    def take(self, server):
        if self.done:
            return False
        self.done = True
        self.got = server
        return True


def make_pool(size=2, max_db=0):
    pool = Pool(Db(), "app", PoolLimits(size, 0, 0, "transaction", max_db_connections=max_db),
                ConnectionCounters())
    return pool


def opened(pool, server):
    pool.opening()
    pool.opened(server)
    return server


def test_checkout_takes_the_most_recently_used_idle_server():
    pool = make_pool()
    a, b = opened(pool, Server()), opened(pool, Server())
    pool.release(a)
    pool.release(b)
    assert repr(pool) == "<Pool app/app [clients: 0, 0 waiting | servers: 0 active, 2 idle, 0 login]>"
    assert pool.checkout(10.0, 0, None) == (TAKE, b)
    assert b in pool.active and b not in pool.idle
    assert repr(pool) == "<Pool app/app [clients: 0, 0 waiting | servers: 1 active, 1 idle, 0 login]>"


def test_server_round_robin_takes_the_least_recently_used_idle_server():
    pool = Pool(Db(), "app", PoolLimits(3, 0, 0, "transaction", round_robin=True), ConnectionCounters())
    a, b, c = (opened(pool, Server()) for _ in range(3))
    for server in (a, b, c):
        pool.release(server)
    assert pool.checkout(10.0, 0, None) == (TAKE, a)
    pool.release(a)                     # back at the most recently used end
    assert pool.take_idle() is b
    assert pool.checkout(10.0, 0, None) == (TAKE, c)
    assert pool.checkout(10.0, 0, None) == (TAKE, a)


def test_checkout_opens_while_there_is_room_then_waits():
    pool = make_pool(size=1)
    assert pool.checkout(0.0, 0, None) == (OPEN, None)
    opened(pool, Server())
    assert pool.checkout(0.0, 0, None) == (WAIT, None)
    # max_db_connections counts across pools too
    pool = make_pool(size=5, max_db=1)
    opened(pool, Server())
    assert pool.checkout(0.0, 0, None) == (WAIT, None)


def test_checkout_retires_old_servers_and_checks_long_idle_ones():
    pool = make_pool()
    old = opened(pool, Server(created_at=0.0, idle_since=0.0))
    pool.release(old)
    old.idle_since = 0.0
    assert pool.checkout(100.0, 50.0, None) == (RETIRE, old)
    pool.forget(old)
    idle = opened(pool, Server(created_at=90.0))
    pool.release(idle)
    idle.idle_since = 91.0
    assert pool.checkout(100.0, 50.0, 30.0) == (TAKE, idle)      # idle 9 s < 30 s
    pool.release(idle)
    idle.idle_since = 60.0
    assert pool.checkout(100.0, 50.0, 30.0) == (CHECK, idle)     # idle 40 s > 30 s
    pool.release(idle)
    assert pool.checkout(100.0, 50.0, None)[0] == TAKE           # no check query configured


def test_checkout_retires_a_stale_idle_server():
    # A RELOAD marks servers busy at that moment (a session's reset query, say)
    # stale; one that still reaches the idle list is never handed out.
    pool = make_pool()
    server = opened(pool, Server(created_at=99.0))
    server.stale = True
    pool.release(server)
    assert pool.checkout(100.0, 0, None) == (RETIRE, server)


def test_checkin_parks_hands_over_resets_or_closes():
    pool = make_pool()
    s = opened(pool, Server(created_at=0.0))
    assert pool.checkin(s, 1.0, 0) == (PARK, None)
    assert list(pool.idle) == [s]
    assert pool.checkout(1.0, 0, None) == (TAKE, s)
    waiter = Waiter()
    pool.waiters.append(waiter)
    assert pool.checkin(s, 2.0, 0) == (HAND_OVER, waiter)
    assert waiter.got is s and s in pool.active and not pool.idle
    assert pool.checkin(s, 2.0, 0, reset=True) == (RESET, None)
    assert pool.checkin(s, 100.0, 50.0) == (CLOSE, None)        # past server_lifetime
    s.dirty = True
    assert pool.checkin(s, 2.0, 0) == (CLOSE, None)
    s.dirty, s.stale = False, True
    assert pool.checkin(s, 2.0, 0) == (CLOSE, None)


def test_a_waiter_that_just_timed_out_refuses_and_the_server_is_not_lost():
    pool = make_pool()
    s = opened(pool, Server())
    gone, next_in_line = Waiter(), Waiter()
    pool.waiters.extend([gone, next_in_line])
    gone.done = True          # its timer fired; it has not yet removed itself
    assert pool.checkin(s, 1.0, 0) == (HAND_OVER, next_in_line)
    assert next_in_line.got is s and gone.got is None
    # Nobody left who wants it: parked, still counted.
    pool.waiters.append(gone)
    assert pool.checkin(s, 1.0, 0) == (PARK, None)
    assert list(pool.idle) == [s] and pool.server_count() == 1 and not pool.waiters


def test_a_waiter_takes_a_server_still_counted_active():
    """A queued query is written to the server inside ``take``; a write that
    blocks lets other greenlets look at the pool, which must count it then."""
    pool = make_pool(size=1)
    s = opened(pool, Server())
    seen = []

    class Writing(Waiter):
        def take(self, server):
            seen.append((server in pool.active, list(pool.idle), pool.server_count(), pool.full()))
            return super().take(server)

    waiter = Writing()
    pool.waiters.append(waiter)
    assert pool.checkin(s, 1.0, 0) == (HAND_OVER, waiter)
    assert seen == [(True, [], 1, True)]
    assert s in pool.active and s not in pool.idle


def test_full_means_no_idle_server_and_no_room_of_its_own():
    pool = make_pool(size=2)
    assert not pool.full()
    opened(pool, Server())
    assert not pool.full()
    b = opened(pool, Server())
    assert pool.full()
    pool.release(b)
    assert not pool.full()                       # an idle server to take
    assert pool.checkout(1.0, 0, None) == (TAKE, b)
    assert pool.full() and pool.checkout(1.0, 0, None) == (WAIT, None)
    reserve = Pool(Db(), "app", PoolLimits(2, 0, 1, "transaction"), ConnectionCounters())
    opened(reserve, Server())
    opened(reserve, Server())
    assert not reserve.full()                    # its reserve may still open one


def test_untake_keeps_a_used_server_used():
    """net/inline.py puts back a server it will not use now (a check, a
    retirement, a parameter sync for the greenlet): where it was in the idle
    list, its idle time kept, so SHOW still lists it "used" when idle past
    server_check_delay, not "idle" as if it had just been released."""
    pool = make_pool(size=3)
    a, used, b = (opened(pool, Server(created_at=90.0)) for _ in range(3))
    for server in (a, used, b):
        server.pool = pool
        pool.release(server, 95.0)
    used.idle_since = 60.0
    app = SimpleNamespace(settings=SimpleNamespace(server_check_query="select 1", server_check_delay=30.0))
    assert [server_state(app, s, 100.0) for s in (a, used, b)] == ["idle", "used", "idle"]
    pool.idle.remove(used)
    pool.idle.append(used)                  # the most recently used: checkout's pick
    assert pool.checkout(100.0, 0, 30.0) == (CHECK, used)
    assert server_state(app, used, 100.0) == "active"
    pool.untake(used)
    assert server_state(app, used, 100.0) == "used" and used.idle_since == 60.0
    assert list(pool.idle) == [a, b, used] and used not in pool.active
    assert pool.checkout(100.0, 0, 30.0) == (CHECK, used)
    pool.untake(used)
    app.settings.server_check_query = ""    # no server_check_query: never "used"
    assert server_state(app, used, 100.0) == "idle"
    assert pool.checkout(100.0, 0, 30.0) == (CHECK, used)
    pool.forget(used)
    assert pool.checkout(100.0, 0, 30.0) == (TAKE, b)
    pool.untake(b)                          # idle 5 s: idle, as it was
    assert server_state(app, b, 100.0) == "idle" and list(pool.idle) == [a, b]
