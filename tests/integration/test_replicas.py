"""Replica load balancing and the automatic read/write split, against a real
primary and two streaming replicas (``pg_basebackup -R``) on 127.0.0.1.

The three servers are made once for the module (replicas cost ~2 s each) and
every test leaves them running, streaming and replaying (an autouse fixture
puts back what a test stopped or paused). Each test runs its own geobouncer:

    app = host=127.0.0.1 port=<primary> dbname=app read_write_split=1
          replicas=127.0.0.1:<r1>,127.0.0.1:<r2> load_balance=round_robin|random|least_active

Where a statement ran is read from the server itself: ``inet_server_port()`` and
``pg_is_in_recovery()``.

- reads (simple and extended protocol) reach the replicas, round_robin uses
  both; writes, plain transactions, ``SELECT ... FOR UPDATE``, ``nextval``, a
  function listed in ``write_functions``, a writing CTE and the
  ``/* geobouncer:primary */`` hint reach the primary; ``BEGIN READ ONLY`` a replica;
- a ``routing_rules`` hook has the last word;
- least_active avoids the replica holding a transaction; random uses both;
- a replica stopped under read load: reads go on on the other one (a read in
  flight on it may fail once, 08006, on a connection that stays usable), and it
  rejoins after replica_ban_time once it is back;
- with every replica down reads go to the primary;
- a replica lagging more than replica_max_lag (replay paused) is out of rotation
  until it catches up;
- a read-only-transaction error a client earns on a replica is the client's own
  and does not ban the replica.

No timings are asserted here.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from functools import partial

import psycopg
import psycopg2
import psycopg2.errors
import pytest
from _util_pool import close_quietly
from fixtures.pg import make_primary, make_standby
from fixtures.ports import wait_until

pytestmark = pytest.mark.geobouncer_only("replica balancing and the read/write split")

WHERE = "SELECT pg_is_in_recovery(), inet_server_port()"


# -- helpers ------------------------------------------------------------------------------

# Polls here may wait for a switchover: a longer default than wait_until's.
wait_for = partial(wait_until, timeout=20.0)


def key(replica) -> str:
    return f"app@127.0.0.1:{replica.port}"


def one(conn, sql: str, params=None):
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()


def replicas_view(b) -> dict:
    return {row.replica: row for row in b.admin("SHOW REPLICAS")}


def in_rotation(b, *replicas) -> bool:
    rows = replicas_view(b)
    return all(rows[key(r)].in_rotation == 1 and rows[key(r)].banned == 0 for r in replicas)


def ports_of_reads(conn, count: int = 10) -> list[int]:
    return [one(conn, WHERE)[1] for _ in range(count)]


@pytest.fixture(scope="module")
def trio():
    """A primary and two streaming replicas, for the whole module."""
    made = []
    try:
        primary = make_primary("rw-primary")
        made.append(primary)
        primary.psql("CREATE TABLE t (id int PRIMARY KEY, v text)", dbname="app", user="app")
        primary.psql("INSERT INTO t VALUES (1, 'one')", dbname="app", user="app")
        primary.psql("CREATE SEQUENCE s", dbname="app", user="app")
        primary.psql("CREATE TABLE big (id int, pad text)", dbname="app", user="app")
        primary.psql("CREATE FUNCTION my_write_fn() RETURNS int LANGUAGE sql AS 'SELECT 1'",
                     dbname="app", user="app")
        for name in ("rw-replica1", "rw-replica2"):
            made.append(make_standby(primary, name))
        yield tuple(made)
    finally:
        for cluster in reversed(made):
            cluster.destroy()


@pytest.fixture(autouse=True)
def healthy_trio(trio):
    """Each test starts with all three running and the replicas replaying."""
    _restore(trio)
    yield
    _restore(trio)


def _restore(trio) -> None:
    for cluster in trio:
        if not cluster.is_running():
            cluster.start()
    for replica in trio[1:]:
        if replica.psql("SELECT pg_is_wal_replay_paused()")[0][0]:
            replica.psql("SELECT pg_wal_replay_resume()")
    primary = trio[0]
    lsn = primary.psql("SELECT pg_current_wal_lsn()")[0][0]
    for replica in trio[1:]:
        wait_for(lambda r=replica: r.psql("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,))[0][0],
                 timeout=30, message=f"{replica.name} caught up")


def split_bouncer(bouncer, trio, load_balance: str = "round_robin", entry: dict | None = None,
                  **settings):
    primary, r1, r2 = trio
    db = {"host": "127.0.0.1", "port": primary.port, "dbname": "app",
          "replicas": f"127.0.0.1:{r1.port},127.0.0.1:{r2.port}",
          "load_balance": load_balance, "read_write_split": 1, **(entry or {})}
    pgbouncer = {"pool_mode": "transaction", "auth_type": "md5", "health_check_period": 0.5,
                 "health_check_timeout": 1, "replica_ban_time": 2, **settings}
    return bouncer(databases={"app": db}, pgbouncer=pgbouncer)


class ReadLoad:
    """Threads doing autocommit reads through the pooler; every attempt kept as
    (started, ended, ok, port-or-sqlstate) per client."""

    def __init__(self, b, clients: int = 6, pause: float = 0.003):
        self.conns = [b.connect(autocommit=True) for _ in range(clients)]
        self.log: dict[int, list[tuple]] = defaultdict(list)
        self.closed: list[tuple[int, str]] = []
        self.pause = pause
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> ReadLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self._threads), "a read client hung"
        close_quietly(*self.conns)

    def _run(self, cid: int) -> None:
        conn = self.conns[cid]
        deadline = time.monotonic() + 100
        while not self._stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            try:
                with conn.cursor() as cur:
                    cur.execute(WHERE)
                    port = cur.fetchone()[1]
                entry = (started, time.monotonic(), True, port)
            except psycopg2.Error as exc:
                entry = (started, time.monotonic(), False, exc.pgcode or str(exc).strip())
                if conn.closed:
                    with self._lock:
                        self.closed.append((cid, str(exc)))
                    return
            with self._lock:
                self.log[cid].append(entry)
            time.sleep(self.pause)

    def ports_since(self, since: float) -> set:
        with self._lock:
            return {e[3] for entries in self.log.values() for e in entries if e[2] and e[0] >= since}

    def count_on(self, port: int, since: float) -> int:
        with self._lock:
            return sum(1 for entries in self.log.values() for e in entries
                       if e[2] and e[3] == port and e[0] >= since)

    def errors(self) -> dict[int, list[tuple]]:
        with self._lock:
            return {cid: [e for e in entries if not e[2]] for cid, entries in self.log.items()}


# -- tests --------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_split_sends_reads_to_replicas_and_writes_to_primary(trio, bouncer):
    primary, r1, r2 = trio
    b = split_bouncer(bouncer, trio, write_functions="my_write_fn")
    conn = b.connect(autocommit=True)     # its login gives the health checks credentials
    tx = b.connect()                      # psycopg2 transactions
    ext = psycopg.connect(b.dsn(), autocommit=True)
    try:
        wait_for(lambda: in_rotation(b, r1, r2), message="both replicas in rotation")
        rows = replicas_view(b)
        failures_before = {k: r.failures for k, r in rows.items()}
        assert set(rows) == {key(r1), key(r2)}
        for r in (r1, r2):
            row = rows[key(r)]
            assert (row.database, row.host, row.port, row.load_balance) == ("app", "127.0.0.1", r.port,
                                                                            "round_robin")
        # Reads: on the replicas, both of them (round robin).
        reads = [one(conn, WHERE) for _ in range(10)]
        assert all(recovery for recovery, _ in reads), reads
        assert {port for _, port in reads} == {r1.port, r2.port}
        # Writes and everything that must run on the primary.
        assert one(conn, "INSERT INTO t VALUES (2, 'two') RETURNING inet_server_port()") == (primary.port,)
        assert one(conn, "SELECT inet_server_port(), pg_is_in_recovery() FROM t WHERE id = 1 FOR UPDATE") \
            == (primary.port, False)
        assert one(conn, "SELECT nextval('s') > 0, inet_server_port()") == (True, primary.port)
        assert one(conn, "SELECT my_write_fn(), inet_server_port()") == (1, primary.port)
        assert one(conn, "/* geobouncer:primary */ SELECT inet_server_port(), pg_is_in_recovery()") \
            == (primary.port, False)
        assert one(conn, "WITH w AS (UPDATE t SET v = 'uno' WHERE id = 1 RETURNING id) "
                         "SELECT inet_server_port() FROM w") == (primary.port,)
        # A plain transaction (psycopg2 sends BEGIN first) stays on the primary, reads included.
        assert one(tx, WHERE) == (False, primary.port)
        assert one(tx, "SELECT v FROM t WHERE id = 2") == ("two",)   # read your own write
        tx.commit()
        # BEGIN READ ONLY goes to a replica, for the whole transaction.
        with conn.cursor() as cur:
            cur.execute("BEGIN READ ONLY")
            cur.execute(WHERE)
            recovery, port = cur.fetchone()
            cur.execute("SELECT inet_server_port()")
            assert cur.fetchone() == (port,)
            cur.execute("COMMIT")
        assert recovery is True and port in (r1.port, r2.port)
        # Extended protocol, prepared statements: reads spread, writes to the primary.
        ext_reads = [ext.execute(WHERE + " WHERE %s = %s", [1, 1], prepare=True).fetchone()
                     for _ in range(10)]
        assert all(rec for rec, _ in ext_reads) and {p for _, p in ext_reads} == {r1.port, r2.port}, ext_reads
        for i in range(3):
            assert ext.execute("INSERT INTO t VALUES (%s, 'x') RETURNING inet_server_port()", [100 + i],
                               prepare=True).fetchone() == (primary.port,)
        # The writes are on the primary, and replicated.
        assert primary.psql("SELECT count(*) FROM t", dbname="app") == [(5,)]
        # Nothing above banned a replica.
        rows = replicas_view(b)
        assert {k: r.failures for k, r in rows.items()} == failures_before, rows
        assert all(r.banned == 0 for r in rows.values()), rows
    finally:
        close_quietly(conn, tx, ext)
        primary.psql("DELETE FROM t WHERE id <> 1", dbname="app")


@pytest.mark.timeout(60)
def test_routing_hook_has_the_last_word(trio, bouncer, tmp_path):
    primary, r1, r2 = trio
    hook = tmp_path / "route_split.py"
    hook.write_text(
        "def routing_rules(username, query):\n"
        "    if 'to_replica_one' in query:\n"
        f"        return {key(r1)!r}\n"
        "    if 'to_primary' in query:\n"
        "        return 'app'\n"
        "    return None\n")
    b = split_bouncer(bouncer, trio, routing_rules_py_module_file=str(hook))
    conn = b.connect(autocommit=True)
    try:
        wait_for(lambda: in_rotation(b, r1, r2), message="both replicas in rotation")
        # The split alone: reads spread over both replicas.
        assert set(ports_of_reads(conn)) == {r1.port, r2.port}
        # The hook overrides the split: a read pinned to one replica, or to the primary.
        assert {one(conn, WHERE + " /* to_replica_one */") for _ in range(6)} == {(True, r1.port)}
        assert {one(conn, WHERE + " /* to_primary */") for _ in range(4)} == {(False, primary.port)}
    finally:
        close_quietly(conn)


@pytest.mark.timeout(60)
def test_least_active_and_random(trio, bouncer):
    _, r1, r2 = trio
    b = split_bouncer(bouncer, trio, load_balance="least_active")
    holder = b.connect(autocommit=True)
    reader = b.connect(autocommit=True)
    try:
        wait_for(lambda: in_rotation(b, r1, r2), message="both replicas in rotation")
        assert {row.load_balance for row in replicas_view(b).values()} == {"least_active"}
        # A read-only transaction holds a server on one replica ...
        with holder.cursor() as cur:
            cur.execute("BEGIN READ ONLY")
            cur.execute(WHERE)
            recovery, busy = cur.fetchone()
        assert recovery is True
        idle = r2.port if busy == r1.port else r1.port
        # ... so every read goes to the other one.
        assert set(ports_of_reads(reader, 8)) == {idle}
        with holder.cursor() as cur:
            cur.execute("COMMIT")
        # Nothing active anywhere: reads still land on replicas only.
        assert all(rec for rec, _ in (one(reader, WHERE) for _ in range(4)))
    finally:
        close_quietly(holder, reader)

    b2 = split_bouncer(bouncer, trio, load_balance="random")
    conn = b2.connect(autocommit=True)
    try:
        wait_for(lambda: in_rotation(b2, r1, r2), message="both replicas in rotation (random)")
        seen = [one(conn, WHERE) for _ in range(40)]
        assert all(rec for rec, _ in seen)
        assert {p for _, p in seen} == {r1.port, r2.port}   # chance of failing: 2 ** -39
    finally:
        close_quietly(conn)


@pytest.mark.timeout(90)
def test_replica_stopped_under_read_load_then_rejoins(trio, bouncer):
    _, r1, r2 = trio
    b = split_bouncer(bouncer, trio)
    with ReadLoad(b, clients=6) as load:
        wait_for(lambda: in_rotation(b, r1, r2), message="both replicas in rotation")
        start = time.monotonic()
        wait_for(lambda: load.count_on(r1.port, start) >= 20 and load.count_on(r2.port, start) >= 20,
                 message="reads on both replicas")
        r1.stop("immediate")
        stopped = time.monotonic()
        wait_for(lambda: replicas_view(b)[key(r1)].banned == 1, message="stopped replica banned")
        banned_at = time.monotonic()
        wait_for(lambda: load.count_on(r2.port, banned_at) >= 50, message="reads go on on r2")
        # While r1 is out, reads land on r2 only.
        assert load.ports_since(banned_at) == {r2.port}
        row = replicas_view(b)[key(r1)]
        assert row.in_rotation == 0 and row.failures >= 1, row

        r1.start()
        restarted = time.monotonic()
        wait_for(lambda: in_rotation(b, r1), timeout=30, message="r1 back in rotation after its ban")
        back = time.monotonic()
        wait_for(lambda: load.count_on(r1.port, back) >= 20, message="reads reach r1 again")
        assert load.ports_since(back) == {r1.port, r2.port}
    assert load.closed == [], f"read clients disconnected: {load.closed}"
    for cid, errs in load.errors().items():
        # Only a read in flight on r1 when it died may fail: once, 08006, and only
        # one sent before r1 was stopped; the client went on reading.
        assert len(errs) <= 1, f"client {cid}: {errs}"
        for started, _, _, code in errs:
            assert code == "08006" and started < stopped, (cid, errs)
        assert load.count_on(r2.port, restarted) > 0


@pytest.mark.timeout(90)
def test_every_replica_down_reads_go_to_primary(trio, bouncer):
    primary, r1, r2 = trio
    b = split_bouncer(bouncer, trio)
    conn = b.connect(autocommit=True)
    try:
        wait_for(lambda: in_rotation(b, r1, r2), message="both replicas in rotation")
        assert set(ports_of_reads(conn, 6)) == {r1.port, r2.port}
        r1.stop("fast")
        r2.stop("immediate")
        wait_for(lambda: all(r.banned == 1 for r in replicas_view(b).values()), message="both replicas banned")
        # With nothing in rotation, reads go to the primary: no error.
        for _ in range(6):
            assert one(conn, WHERE) == (False, primary.port)
        # Bans end, the replicas are still down: checked again, banned again, reads stay on the primary.
        time.sleep(2.5)
        for _ in range(6):
            assert one(conn, WHERE) == (False, primary.port)
        r1.start()
        r2.start()
        wait_for(lambda: in_rotation(b, r1, r2), timeout=30, message="both replicas back in rotation")
        assert set(ports_of_reads(conn, 10)) == {r1.port, r2.port}
    finally:
        close_quietly(conn)


@pytest.mark.timeout(90)
def test_lagging_replica_out_of_rotation_until_caught_up(trio, bouncer):
    primary, r1, r2 = trio
    limit = 256 * 1024
    b = split_bouncer(bouncer, trio, entry={"replica_max_lag": limit})
    conn = b.connect(autocommit=True)
    try:
        wait_for(lambda: in_rotation(b, r1, r2), message="both replicas in rotation")
        assert set(ports_of_reads(conn, 6)) == {r1.port, r2.port}
        r1.psql("SELECT pg_wal_replay_pause()")
        wait_for(lambda: r1.psql("SELECT pg_get_wal_replay_pause_state()")[0][0] == "paused",
                 message="replay paused on r1")
        # ~4 MB of WAL on the primary that r1 receives but does not replay.
        primary.psql("INSERT INTO big SELECT g, repeat('x', 1000) FROM generate_series(1, 4000) g",
                     dbname="app")
        def lag_seen():
            row = replicas_view(b)[key(r1)]
            return row if row.lag_bytes is not None and row.lag_bytes > limit else None
        lagging = wait_for(lag_seen, message="r1's lag seen by the health check")
        assert replicas_view(b)[key(r2)].lag_bytes <= limit
        # Out of rotation: every read goes to r2.
        assert set(ports_of_reads(conn, 10)) == {r2.port}

        r1.psql("SELECT pg_wal_replay_resume()")
        wait_for(lambda: (replicas_view(b)[key(r1)].lag_bytes or 0) <= limit, timeout=30,
                 message="r1 caught up")
        wait_for(lambda: set(ports_of_reads(conn, 10)) == {r1.port, r2.port}, message="r1 back in rotation")
        # SHOW REPLICAS said so while it lagged: not in rotation (checked last, so that
        # the rest of the scenario ran whatever this says).
        assert lagging.in_rotation == 0, f"SHOW REPLICAS while r1 lagged past replica_max_lag: {lagging}"
    finally:
        close_quietly(conn)
        primary.psql("TRUNCATE big", dbname="app")


@pytest.mark.timeout(60)
def test_read_only_error_on_a_replica_does_not_ban_it(trio, bouncer):
    """A client that writes inside BEGIN READ ONLY gets 25006 from the replica
    the split chose; that is the client's error, not the replica's trouble."""
    _, r1, r2 = trio
    # user=/password= in the entry: the health checks have credentials from the
    # start (see test_replicas_in_rotation_once_a_client_logged_in for the other case).
    b = split_bouncer(bouncer, trio, entry={"user": "app", "password": "app_pw"}, replica_ban_time=60)
    conn = b.connect(autocommit=True)
    try:
        wait_for(lambda: in_rotation(b, r1, r2), message="both replicas in rotation")
        with conn.cursor() as cur:
            cur.execute("BEGIN READ ONLY")
            cur.execute(WHERE)
            assert cur.fetchone()[0] is True
            with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
                cur.execute("INSERT INTO t VALUES (50, 'no')")
            cur.execute("ROLLBACK")
        rows = replicas_view(b)
        assert all(r.banned == 0 and r.failures == 0 for r in rows.values()), rows
        assert set(ports_of_reads(conn, 10)) == {r1.port, r2.port}
    finally:
        close_quietly(conn)


@pytest.mark.timeout(60)
def test_replicas_in_rotation_once_a_client_logged_in(trio, bouncer):
    """No user= in the entry: the health checks wait for a client's login to get
    credentials. Lacking them is not a replica failure: once a client has logged
    in, the next health checks put both replicas in rotation (no ban, default
    replica_ban_time of 30 s)."""
    _, r1, r2 = trio
    b = split_bouncer(bouncer, trio, replica_ban_time=None)   # the default, 30 s
    time.sleep(1.2)           # a couple of health_check_period (0.5 s) before any login
    conn = b.connect(autocommit=True)
    try:
        wait_for(lambda: in_rotation(b, r1, r2), timeout=10,
                 message="both replicas in rotation within 10 s of the first login")
        rows = replicas_view(b)
        assert all(r.failures == 0 for r in rows.values()), rows
        assert set(ports_of_reads(conn, 10)) == {r1.port, r2.port}
    finally:
        close_quietly(conn)
