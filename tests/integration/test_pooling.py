"""Pool sizing, limits and timeouts through geobouncer against real PostgreSQL.

Each test counts server connections on the PostgreSQL side (pg_stat_activity)
and on the admin console, and polls with a bound instead of sleeping blindly.
"""

from __future__ import annotations

import os
import socket
import time

import psycopg2
import pytest
from _util_pool import (
    BackendSampler,
    RawClient,
    close_quietly,
    errors_in,
    pool_row,
    query_message,
    query_one,
    run_in_thread,
    server_rows,
    terminate_backends,
    wait_no_backends,
)
from fixtures.pooler import pooler_sqlstate
from fixtures.ports import wait_until


def start(bouncer, pg, **settings):
    conf = {"pool_mode": "transaction", "auth_type": "md5", **settings}
    b = bouncer(pgbouncer=conf)
    wait_no_backends(pg)
    return b


def hold_transaction(b, user: str = "app", dbname: str = "app"):
    """A client inside an open transaction (its server stays linked); returns (conn, backend pid)."""
    conn = b.connect(dbname, user)
    pid = query_one(conn, "SELECT pg_backend_pid()")[0]
    return conn, pid


def pids_alive(pg, *pids) -> set:
    rows = pg.psql("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (list(pids),))
    return {r[0] for r in rows}


def make_app_table(pg, name: str, columns: str, rows_sql: str = "") -> None:
    pg.psql(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} ({columns}); {rows_sql}", dbname="app")
    pg.psql(f"ALTER TABLE {name} OWNER TO app", dbname="app")


# -- sizes ---------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_pool_size_respected(pg, bouncer):
    b = start(bouncer, pg, default_pool_size=3)

    def worker(i):
        conn = b.connect()
        try:
            seen = []
            for k in range(5):
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_backend_pid(), %s::int FROM pg_sleep(0.05)", (i * 10 + k,))
                    pid, echo = cur.fetchone()
                conn.commit()
                assert echo == i * 10 + k
                seen.append(pid)
            return seen
        finally:
            conn.close()

    with BackendSampler(pg, "app") as sampler:
        outcomes = [run_in_thread(worker, i) for i in range(8)]
        pids = set()
        for out in outcomes:
            pids.update(out.get(45))
    assert not sampler.errors
    assert sampler.max == 3, sampler.max
    assert len(pids) == 3, pids
    row = pool_row(b)
    assert row.sv_active + row.sv_idle + row.sv_used + row.sv_login == 3
    assert len(server_rows(b)) == 3


@pytest.mark.timeout(60)
def test_min_pool_size_fills_the_pool(pg, bouncer, request):
    # Transaction mode and one connected client: PgBouncer keeps min_pool_size for pools with clients.
    b = start(bouncer, pg, default_pool_size=10, min_pool_size=4)
    conn = b.connect(autocommit=True)
    request.addfinalizer(conn.close)
    assert query_one(conn, "SELECT 1") == (1,)
    wait_until(lambda: pg.backends("app") == 4, timeout=15, message="min_pool_size servers opened")
    # Filled, not overfilled: two more janitor rounds change nothing.
    time.sleep(2.5)
    assert pg.backends("app") == 4
    row = pool_row(b)
    assert (row.sv_idle + row.sv_used, row.sv_active) == (4, 0)
    # A server that dies is replaced.
    victim = pg.psql("SELECT pid FROM pg_stat_activity WHERE datname = 'app' LIMIT 1")[0][0]
    pg.psql("SELECT pg_terminate_backend(%s)", (victim,))
    wait_until(lambda: pg.backends("app") == 4 and victim not in pids_alive(pg, victim)
               and len(server_rows(b)) == 4, timeout=15, message="pool refilled to min_pool_size")
    assert query_one(conn, "SELECT 2") == (2,)


@pytest.mark.timeout(60)
def test_reserve_pool_used_after_timeout(pg, bouncer):
    b = start(bouncer, pg, default_pool_size=2, reserve_pool_size=2, reserve_pool_timeout=1,
              query_wait_timeout=4)
    holders = []
    try:
        with BackendSampler(pg, "app") as sampler:
            for _ in range(2):
                holders.append(hold_transaction(b))
            assert pg.backends("app") == 2
            # The pool is exhausted: the next two clients get reserve servers after reserve_pool_timeout.
            for n in (3, 4):
                conn = b.connect()
                holders.append((conn, None))
                out = run_in_thread(query_one, conn, "SELECT pg_backend_pid(), %s::int", (n,))
                pid, echo = out.get(15)
                assert echo == n
                holders[-1] = (conn, pid)
                assert pg.backends("app") == n
            # Pool + reserve exhausted: the fifth waits and hits query_wait_timeout.
            with RawClient(b.host, b.port, timeout=20) as raw:
                assert raw.login("app", "app_pw", "app")[-1][0] == b"Z"
                raw.send(query_message("SELECT 5"))
                replies = raw.read_until_close()
            assert [(e["C"], e["M"]) for e in errors_in(replies)] == [("08P01", "query_wait_timeout")], replies
        assert not sampler.errors
        assert sampler.max == 4, sampler.max
        assert len({pid for _, pid in holders}) == 4
        assert "taking connection from reserve_pool" in b.log_text()
        for conn, _ in holders:   # every holder is still in its transaction, unaffected
            assert query_one(conn, "SELECT 'still here'") == ("still here",)
            conn.commit()
    finally:
        close_quietly(*(c for c, _ in holders))


@pytest.mark.timeout(60)
def test_max_db_connections(pg, bouncer):
    b = start(bouncer, pg, default_pool_size=5, max_db_connections=2, query_wait_timeout=30)
    a, pid_a = hold_transaction(b, "app")
    m, _ = hold_transaction(b, "md5_user")
    c = b.connect("app", "app")
    try:
        with BackendSampler(pg, "app") as sampler:
            assert pg.backends("app") == 2
            out = run_in_thread(query_one, c, "SELECT 'third', pg_backend_pid()")
            wait_until(lambda: pool_row(b, "app", "app").cl_waiting == 1, timeout=10,
                       message="third client waiting for max_db_connections")
            assert pg.backends("app") == 2
            assert not out.done.is_set()
            a.commit()   # releases a server of the app pool: the waiter gets it
            assert out.get(15) == ("third", pid_a)
            c.commit()
            m.commit()
        assert not sampler.errors
        assert sampler.max == 2, sampler.max
    finally:
        close_quietly(a, m, c)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", ["query", "login"])
def test_max_db_connections_evicts_idle_server_of_other_pool(pg, bouncer, path):
    """PgBouncer closes an idle server of another pool of the same database when a
    client needs a server and max_db_connections is reached (evict_connection)."""
    b = start(bouncer, pg, default_pool_size=5, max_db_connections=2, query_wait_timeout=15)
    conns = []
    try:
        if path == "query":
            # md5_user's pool exists and has learned the server's defaults: its server is idle.
            m = b.connect("app", "md5_user")
            conns.append(m)
            assert query_one(m, "SELECT current_user") == ("md5_user",)
            m.commit()
            a1, _ = hold_transaction(b, "app")   # the database is now at its limit (1 active + 1 idle)
            conns.append(a1)
            needy = b.connect("app", "app")
            conns.append(needy)
            user = "app"
        else:
            a1, _ = hold_transaction(b, "app")
            a2, _ = hold_transaction(b, "app")
            conns += [a1, a2]
            a2.commit()   # the app pool: 1 active + 1 idle, the database at its limit
            user = "md5_user"
        with BackendSampler(pg, "app") as sampler:
            assert pg.backends("app") == 2
            if path == "login":
                try:
                    needy = b.connect("app", user)   # the first login of a pool needs a server too
                except psycopg2.OperationalError as exc:
                    pytest.fail(f"{user} could not log in while another pool of the database held an idle "
                                f"server at max_db_connections=2 (no idle server evicted): {exc}")
                conns.append(needy)
            out = run_in_thread(query_one, needy, "SELECT current_user")
            try:
                result = out.get(10)
            except TimeoutError:
                pytest.fail(f"{user}'s query still waits while another pool of the database holds an idle "
                            f"server at max_db_connections=2 (no idle server evicted)")
            assert result == (user,)
            needy.commit()
        assert not sampler.errors
        assert sampler.max <= 2, sampler.max
        assert query_one(a1, "SELECT 1") == (1,)   # the client in a transaction was not disturbed
        a1.commit()
    finally:
        close_quietly(*conns)


@pytest.mark.timeout(60)
def test_max_user_connections(pg, bouncer):
    b = start(bouncer, pg, default_pool_size=5, max_user_connections=2, query_wait_timeout=30)
    wait_no_backends(pg, "postgres", "app")
    a, pid_a = hold_transaction(b, "app", "app")
    p, _ = hold_transaction(b, "app", "postgres")
    c = b.connect("app", "app")
    try:
        with BackendSampler(pg, None, "app") as sampler:
            assert pg.backends(None, "app") == 2
            out = run_in_thread(query_one, c, "SELECT 'third', pg_backend_pid()")
            wait_until(lambda: pool_row(b, "app", "app").cl_waiting == 1, timeout=10,
                       message="third client waiting for max_user_connections")
            assert pg.backends(None, "app") == 2
            assert not out.done.is_set()
            a.commit()
            assert out.get(15) == ("third", pid_a)
            c.commit()
            assert query_one(p, "SELECT current_database()") == ("postgres",)
            p.commit()
        assert not sampler.errors
        assert sampler.max == 2, sampler.max
    finally:
        close_quietly(a, p, c)


@pytest.mark.timeout(60)
def test_max_client_conn(pg, bouncer):
    b = start(bouncer, pg, max_client_conn=3)
    conns = [b.connect(autocommit=True) for _ in range(3)]
    try:
        with RawClient(b.host, b.port) as raw:
            replies = raw.login("app", "app_pw", "app")
            more = raw.read_until_close()
        errs = errors_in(replies + more)
        assert errs, replies
        assert errs[0]["C"] == pooler_sqlstate("53300"), errs
        assert errs[0]["M"] == "no more connections allowed (max_client_conn)", errs
        assert errs[0]["S"] == "FATAL"
        with pytest.raises(psycopg2.OperationalError, match=r"no more connections allowed \(max_client_conn\)"):
            b.connect()
        for i, conn in enumerate(conns):
            assert query_one(conn, "SELECT %s::int", (i,)) == (i,)
        conns.pop().close()

        def connects():
            conn = b.connect(autocommit=True)
            conns.append(conn)
            return query_one(conn, "SELECT 'in'") == ("in",)

        wait_until(connects, timeout=10, message="a slot freed by a closed client is reused")
    finally:
        close_quietly(*conns)


# -- waiting and timeouts ------------------------------------------------------------

@pytest.mark.timeout(60)
def test_query_wait_timeout(pg, bouncer):
    b = start(bouncer, pg, default_pool_size=1, query_wait_timeout=2)
    a, pid_a = hold_transaction(b)
    try:
        waiter = b.connect()
        with pytest.raises(psycopg2.OperationalError):   # libpq drops the text of this FATAL
            run_in_thread(query_one, waiter, "SELECT 1").get(20)
        close_quietly(waiter)
        # On the wire: SQLSTATE 08P01.
        with RawClient(b.host, b.port, timeout=20) as raw:
            assert raw.login("app", "app_pw", "app")[-1][0] == b"Z"
            raw.send(query_message("SELECT 1"))
            replies = raw.read_until_close()
        errs = errors_in(replies)
        assert [(e["C"], e["M"]) for e in errs] == [("08P01", "query_wait_timeout")], replies
        # The client holding the server was not disturbed.
        assert query_one(a, "SELECT pg_backend_pid(), 2") == (pid_a, 2)
        a.commit()
        fresh = b.connect(autocommit=True)
        assert query_one(fresh, "SELECT pg_backend_pid()") == (pid_a,)
        fresh.close()
    finally:
        close_quietly(a)


@pytest.mark.timeout(60)
def test_server_idle_timeout(pg, bouncer):
    b = start(bouncer, pg, pool_mode="session", server_idle_timeout=2)
    conn = b.connect(autocommit=True)
    pid = query_one(conn, "SELECT pg_backend_pid()")[0]
    assert pg.backends("app") == 1
    conn.close()
    wait_until(lambda: pg.backends("app") == 0, timeout=15, message="idle server closed")
    assert not pids_alive(pg, pid)
    assert server_rows(b) == []
    assert "server idle timeout" in b.log_text()
    again = b.connect(autocommit=True)
    assert query_one(again, "SELECT 1") == (1,)
    again.close()


@pytest.mark.timeout(60)
def test_server_lifetime(pg, bouncer):
    b = start(bouncer, pg, server_lifetime=2, default_pool_size=2)
    conn = b.connect(autocommit=True)
    try:
        first = query_one(conn, "SELECT pg_backend_pid()")[0]

        def replaced():
            pid = query_one(conn, "SELECT pg_backend_pid()")[0]
            time.sleep(0.2)
            return pid != first and pid

        second = wait_until(replaced, timeout=15, interval=0.1, message="server replaced after server_lifetime")
        wait_until(lambda: not pids_alive(pg, first), timeout=10, message="old server closed")
        # An idle server past its lifetime is closed by the janitor.
        wait_until(lambda: pg.backends("app") == 0, timeout=15, message="idle server past lifetime closed")
        assert not pids_alive(pg, second)
        assert query_one(conn, "SELECT 'alive'") == ("alive",)
    finally:
        conn.close()


@pytest.mark.timeout(60)
def test_client_idle_timeout(pg, bouncer):
    b = start(bouncer, pg, client_idle_timeout=2)
    idle = b.connect(autocommit=True)
    busy = b.connect(autocommit=True)
    raw = RawClient(b.host, b.port, timeout=20)
    try:
        assert query_one(idle, "SELECT 1") == (1,)
        assert raw.login("app", "app_pw", "app")[-1][0] == b"Z"
        deadline = time.monotonic() + 6
        n = 0
        while time.monotonic() < deadline:   # the busy client never idles for 2 s
            assert query_one(busy, "SELECT %s::int", (n,)) == (n,)
            n += 1
            time.sleep(0.3)
        replies = raw.read_until_close()
        errs = errors_in(replies)
        assert [e["M"] for e in errs] == ["client_idle_timeout"], replies
        with pytest.raises(psycopg2.OperationalError):
            query_one(idle, "SELECT 1")
        assert query_one(busy, "SELECT 'busy'") == ("busy",)
    finally:
        raw.close()
        close_quietly(idle, busy)


@pytest.mark.timeout(60)
def test_idle_transaction_timeout(pg, bouncer):
    b = start(bouncer, pg, idle_transaction_timeout=2, default_pool_size=3)
    idle_tx, pid = hold_transaction(b)
    busy = b.connect(autocommit=True)
    raw = RawClient(b.host, b.port, timeout=20)
    try:
        assert raw.login("app", "app_pw", "app")[-1][0] == b"Z"
        raw.send(query_message("BEGIN"))
        assert raw.read_until(b"Z")[-1] == (b"Z", b"T")
        wait_until(lambda: not pids_alive(pg, pid), timeout=15, interval=0.2,
                   message="server of the idle transaction closed")
        replies = raw.read_until_close()
        errs = errors_in(replies)
        assert [e["M"] for e in errs] == ["idle transaction timeout"], replies
        with pytest.raises(psycopg2.OperationalError):
            query_one(idle_tx, "SELECT 1")
        for i in range(5):
            assert query_one(busy, "SELECT %s::int", (i,)) == (i,)
        wait_until(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' "
                                   "AND state LIKE 'idle in transaction%'")[0][0] == 0,
                   timeout=10, message="no idle-in-transaction backend left")
    finally:
        raw.close()
        close_quietly(idle_tx, busy)


@pytest.mark.timeout(60)
def test_query_timeout(pg, bouncer):
    b = start(bouncer, pg, query_timeout=2)
    slow = b.connect(autocommit=True)
    other = b.connect(autocommit=True)
    try:
        out = run_in_thread(query_one, slow, "SELECT pg_sleep(30)")
        with pytest.raises(psycopg2.OperationalError):
            out.get(20)
        with RawClient(b.host, b.port, timeout=20) as raw:
            assert raw.login("app", "app_pw", "app")[-1][0] == b"Z"
            raw.send(query_message("SELECT pg_sleep(30)"))
            replies = raw.read_until_close()
        errs = errors_in(replies)
        # PgBouncer says "query timeout" for a running query ("query_timeout" for a waiting one).
        assert len(errs) == 1 and errs[0]["M"] in ("query timeout", "query_timeout"), replies
        assert query_one(other, "SELECT 'other'") == ("other",)
        fresh = b.connect(autocommit=True)
        assert query_one(fresh, "SELECT 'fresh'") == ("fresh",)
        fresh.close()
        assert b.is_running()
    finally:
        close_quietly(slow, other)
        terminate_backends(pg, "app", "%pg_sleep(30)%")


# -- a client leaving mid-transaction -------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["terminate", "abrupt"])
@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_client_gone_mid_transaction_leaves_no_dirty_server(pg, bouncer, how, pool_mode):
    b = start(bouncer, pg, pool_mode=pool_mode, default_pool_size=1)
    make_app_table(pg, "pool_dirty", "id int PRIMARY KEY, v int", "INSERT INTO pool_dirty VALUES (1, 0)")
    a = b.connect()
    with a.cursor() as cur:
        cur.execute("UPDATE pool_dirty SET v = 99 WHERE id = 1")
        cur.execute("INSERT INTO pool_dirty VALUES (2, 2)")
        cur.execute("SELECT txid_current(), now()")
        xid, started = cur.fetchone()
    if how == "abrupt":   # no Terminate message: the socket just goes away
        sock = socket.socket(fileno=os.dup(a.fileno()))
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    a.close()
    nxt = b.connect(autocommit=True)
    try:
        assert query_one(nxt, "SELECT txid_current_if_assigned()") == (None,)
        assert query_one(nxt, "SELECT now() > %s", (started,)) == (True,)
        assert query_one(nxt, "SELECT count(*) FROM pool_dirty WHERE id = 2") == (0,)
        # The row lock of the abandoned transaction is gone.
        assert query_one(nxt, "SELECT v FROM pool_dirty WHERE id = 1 FOR UPDATE NOWAIT") == (0,)
        assert query_one(nxt, "SELECT txid_status(%s)", (xid,)) == ("aborted",)
    finally:
        nxt.close()
    wait_until(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' "
                               "AND state LIKE 'idle in transaction%'")[0][0] == 0,
               timeout=10, message="no idle-in-transaction backend left")


# -- admin counts ------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_show_pools_counts_known_situation(pg, bouncer):
    b = start(bouncer, pg, default_pool_size=1, query_wait_timeout=30)
    a, pid_a = hold_transaction(b)          # linked, in a transaction
    idle = b.connect(autocommit=True)       # logged in, no server
    waiter = b.connect(autocommit=True)
    try:
        out = run_in_thread(query_one, waiter, "SELECT 'waited', pg_backend_pid()")

        def counts():
            row = pool_row(b)
            return (row.cl_active, row.cl_waiting, row.sv_active, row.sv_idle, row.sv_used, row.sv_login)

        wait_until(lambda: counts()[1] == 1, timeout=10, message="one client waiting")
        assert counts() == (2, 1, 1, 0, 0, 0)
        servers = server_rows(b)
        assert len(servers) == 1 and servers[0].state == "active" and servers[0].remote_pid == pid_a
        clients = [r for r in b.admin("SHOW CLIENTS") if r.database == "app"]
        linked = [r.state for r in clients if r.link]
        unlinked = sorted(r.state for r in clients if not r.link)
        # The client in a transaction is linked; the idle one shows "active" (PgBouncer < 1.21) or "idle".
        assert linked == ["active"], clients
        assert unlinked in (["active", "waiting"], ["idle", "waiting"]), clients
        assert pool_row(b).maxwait >= 0
        assert not out.done.is_set()
        a.commit()
        assert out.get(15) == ("waited", pid_a)
        wait_until(lambda: counts() == (3, 0, 0, 1, 0, 0) or counts() == (3, 0, 0, 0, 1, 0), timeout=10,
                   message="everyone active, the server idle")
        servers = server_rows(b)
        assert len(servers) == 1 and servers[0].state in ("idle", "used") and not servers[0].link
    finally:
        close_quietly(a, idle, waiter)
    wait_until(lambda: pool_row(b).cl_active == 0, timeout=10, message="clients gone from SHOW POOLS")
