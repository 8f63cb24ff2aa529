"""Fast switchover (``topology_query``) against real streaming clusters.

Every cluster here is a throw-away primary (``make_pg``) and streaming replicas
made with ``pg_basebackup -R`` (``make_replica``), all on 127.0.0.1. A table on
the primary names the nodes (``topo``: one ``host:port`` text column, or
``topo2``: endpoint and port columns) and the [databases] entry says
``topology_query='select endpoint from topo'``.

- every node is a database key of its own (``127.0.0.1:<port>``), with pools
  opened ahead of need; two clustered databases live side by side;
- a switchover under a steady write load from many clients (primary stopped
  ``immediate``, a replica promoted with ``pg_ctl promote``): clients between
  transactions see no error, a client whose statement was in flight sees at most
  one error and retries on the same connection, writes land on the new primary.
  The "switch back" is a second switchover: the old primary cannot follow the
  new timeline after an immediate stop (that needs pg_rewind), so a fresh
  replica of the new primary is made (``make_replica(new_primary)``), added to
  the topology table, picked up by a RELOAD, and promoted after the new primary
  is stopped too;
- a client idle in a transaction on the dying writer gets 08006 at its next
  statement, stays connected, and its next transaction commits on the new
  writer; clients that send work during the switchover are held, not failed;
- no writer within ``switchover_timeout``: the waiting clients get a clear
  error, not a hang, and the pooler serves again once a writer appears;
- the old writer, stopped cleanly and restarted as a standby of the new one,
  is retried after ``server_failed_delay`` and rejoins as a reader; a second
  switchover then goes back to it.

No timings are asserted here (see scripts/bench-failover).
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
from fixtures.ports import wait_until

pytestmark = pytest.mark.geobouncer_only("fast switchover (topology_query, switchover_timeout)")

TOPOLOGY_QUERY = "select endpoint from topo"
LOST = "08006"   # the pooler's "server connection lost (switchover in progress)"


# -- helpers ----------------------------------------------------------------------------

# Polls here may wait for a switchover: a longer default than wait_until's.
wait_for = partial(wait_until, timeout=20.0)


def ep(cluster) -> str:
    return f"127.0.0.1:{cluster.port}"


def make_topology(primary, nodes, two_columns: bool = False) -> None:
    """The topology table on ``primary`` (database app), naming ``nodes``."""
    if two_columns:
        primary.psql("CREATE TABLE topo2 (endpoint text, port int)", dbname="app")
        primary.psql("GRANT SELECT ON topo2 TO PUBLIC", dbname="app")
        for node in nodes:
            primary.psql("INSERT INTO topo2 VALUES (%s, %s)", (node.host, node.port), dbname="app")
    else:
        primary.psql("CREATE TABLE topo (endpoint text)", dbname="app")
        primary.psql("GRANT SELECT ON topo TO PUBLIC", dbname="app")
        for node in nodes:
            primary.psql("INSERT INTO topo VALUES (%s)", (ep(node),), dbname="app")
    primary.psql("CREATE TABLE IF NOT EXISTS t (client int, n int, PRIMARY KEY (client, n))",
                 dbname="app", user="app")


def wait_replayed(primary, replicas, table: str = "topo") -> None:
    """Every replica has what the primary has in ``table`` (streaming caught up)."""
    want = primary.psql(f"SELECT count(*) FROM {table}", dbname="app")[0][0]
    for replica in replicas:
        wait_for(lambda r=replica: r.psql(f"SELECT count(*) FROM {table}", dbname="app")[0][0] == want,
                 message=f"{replica.name} replayed {table}")


def cluster_entry(primary, **extra) -> dict:
    return {"host": "127.0.0.1", "port": primary.port, "dbname": "app",
            "topology_query": TOPOLOGY_QUERY, **extra}


def topology(b, db: str = "app") -> dict:
    return {row.node: row for row in b.admin("SHOW TOPOLOGY") if row.database == db}


def roles(b, db: str = "app") -> dict:
    return {node: row.role for node, row in topology(b, db).items()}


def wait_roles(b, expected: dict, db: str = "app", timeout: float = 20.0) -> dict:
    return wait_for(lambda: roles(b, db) == expected and topology(b, db),
                    timeout=timeout, message=f"SHOW TOPOLOGY of {db} == {expected}")


def sqlstate(exc: BaseException) -> str | None:
    return getattr(exc, "pgcode", None) or getattr(exc, "sqlstate", None)


def run_thread(fn, *args):
    """Run ``fn`` in a daemon thread; ``.result(timeout)`` returns or raises its outcome."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    class Outcome:
        @staticmethod
        def result(timeout: float = 30.0):
            thread.join(timeout)
            assert not thread.is_alive(), f"{fn} did not finish within {timeout}s"
            if "error" in box:
                raise box["error"]
            return box.get("value")

        @staticmethod
        def done() -> bool:
            return not thread.is_alive()

    return Outcome


class WriteLoad:
    """``clients`` threads, each on its own connection through the pooler, doing
    short autocommit INSERTs into t(client, n) in a loop. Every attempt is kept
    as (started, ended, ok, port-or-sqlstate, n) per client."""

    def __init__(self, b, clients: int, pause: float = 0.003):
        self.conns = [b.connect(autocommit=True) for _ in range(clients)]
        self.log: dict[int, list[tuple]] = defaultdict(list)
        self.closed: list[tuple[int, str]] = []
        self.pause = pause
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(cid,), daemon=True)
                         for cid in range(clients)]

    def __enter__(self) -> WriteLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self._threads), "a load client hung"
        close_quietly(*self.conns)

    def _run(self, cid: int) -> None:
        conn = self.conns[cid]
        n = 0
        deadline = time.monotonic() + 110      # bounded whatever happens
        while not self._stop.is_set() and time.monotonic() < deadline:
            n += 1
            started = time.monotonic()
            try:
                with conn.cursor() as cur:
                    cur.execute("INSERT INTO t VALUES (%s, %s) RETURNING inet_server_port()", (cid, n))
                    port = cur.fetchone()[0]
                entry = (started, time.monotonic(), True, port, n)
            except psycopg2.Error as exc:
                entry = (started, time.monotonic(), False, sqlstate(exc) or f"closed: {exc}".strip(), n)
                if conn.closed:
                    with self._lock:
                        self.closed.append((cid, str(exc)))
                    return
            with self._lock:
                self.log[cid].append(entry)
            time.sleep(self.pause)

    def successes_on(self, port: int, since: float = 0.0) -> dict[int, int]:
        with self._lock:
            return {cid: sum(1 for s, _, ok, p, _ in entries if ok and p == port and s >= since)
                    for cid, entries in self.log.items()}

    def every_client_wrote_on(self, port: int, times: int = 3) -> bool:
        counts = self.successes_on(port)
        return len(counts) == len(self.conns) and all(c >= times for c in counts.values())

    def errors_between(self, t0: float, t1: float) -> dict[int, list[tuple]]:
        """Failed attempts that ended in [t0, t1), by client."""
        with self._lock:
            return {cid: [e for e in entries if not e[2] and t0 <= e[1] < t1]
                    for cid, entries in self.log.items()}

    def written(self, port: int) -> set[tuple[int, int]]:
        with self._lock:
            return {(cid, e[4]) for cid, entries in self.log.items() for e in entries
                    if e[2] and e[3] == port}


def check_switchover_errors(load: WriteLoad, stopped_at: float, t0: float, t1: float, what: str) -> int:
    """The error contract for one switchover: a client sees at most one error,
    08006, and only for a statement sent before the writer was gone (in flight);
    a client between transactions (statement sent after) sees none."""
    errors = load.errors_between(t0, t1)
    for cid, errs in errors.items():
        assert len(errs) <= 1, f"{what}: client {cid} saw {len(errs)} errors: {errs}"
        for started, _, _, code, n in errs:
            assert code == LOST, f"{what}: client {cid} statement {n} failed with {code!r}, want {LOST}"
            assert started < stopped_at, (
                f"{what}: client {cid} statement {n} was sent {started - stopped_at:.3f}s after the "
                "writer was already stopped (between transactions) and still failed")
    return sum(len(e) for e in errors.values())


# -- tests ------------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_nodes_are_database_keys_and_two_clustered_databases(make_pg, make_replica, bouncer):
    primary = make_pg()
    replica = make_replica(primary)
    make_topology(primary, [primary, replica])
    other = make_pg(name="other")                       # a second, one-node cluster
    make_topology(other, [other], two_columns=True)
    wait_replayed(primary, [replica])

    b = bouncer(
        databases={
            "app": cluster_entry(primary),   # no user=: probes use the first client's login
            "app_b": {"host": "127.0.0.1", "port": other.port, "dbname": "app", "user": "app",
                      "password": "app_pw", "topology_query": "select endpoint, port from topo2"},
        },
        pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "server_failed_delay": 30},
    )
    first = b.connect(autocommit=True)   # its login gives the cluster its credentials
    try:
        with first.cursor() as cur:
            cur.execute("SELECT inet_server_port(), pg_is_in_recovery()")
            assert cur.fetchone() == (primary.port, False)
        wait_roles(b, {ep(primary): "writer", ep(replica): "reader"})
        wait_roles(b, {ep(other): "writer"}, db="app_b")
        rows = topology(b)
        assert rows[ep(replica)].host == "127.0.0.1" and rows[ep(replica)].port == replica.port

        # Pools to the nodes were opened ahead of need, for the user the database has.
        def node_pool_ready():
            pools = {(p.database, p.user): p for p in b.admin("SHOW POOLS")}
            return all((key, "app") in pools and pools[(key, "app")].sv_idle
                       + pools[(key, "app")].sv_used + pools[(key, "app")].sv_active >= 1
                       for key in (ep(primary), ep(replica)))
        wait_for(node_pool_ready, message="pools to every node opened ahead of need")

        # Each node is a database key of its own.
        node_r = b.connect(dbname=ep(replica), autocommit=True)
        node_p = b.connect(dbname=ep(primary), autocommit=True)
        node_o = b.connect(dbname=ep(other), autocommit=True)
        via_b = b.connect(dbname="app_b", autocommit=True)
        try:
            with node_r.cursor() as cur:
                cur.execute("SELECT pg_is_in_recovery(), inet_server_port(), count(*) FROM topo")
                assert cur.fetchone() == (True, replica.port, 2)
                # A write on the reader's key fails there (25006) and is no writer failure.
                with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
                    cur.execute("INSERT INTO t VALUES (-1, -1)")
            with node_p.cursor() as cur:
                cur.execute("SELECT pg_is_in_recovery(), inet_server_port()")
                assert cur.fetchone() == (False, primary.port)
            with node_o.cursor() as cur:
                cur.execute("SELECT pg_is_in_recovery(), inet_server_port()")
                assert cur.fetchone() == (False, other.port)
            # Both clustered databases write to their own writer.
            with first.cursor() as cur:
                cur.execute("INSERT INTO t VALUES (1, 1) RETURNING inet_server_port()")
                assert cur.fetchone() == (primary.port,)
            with via_b.cursor() as cur:
                cur.execute("INSERT INTO t VALUES (2, 2) RETURNING inet_server_port()")
                assert cur.fetchone() == (other.port,)
            assert primary.psql("SELECT client FROM t", dbname="app") == [(1,)]
            assert other.psql("SELECT client FROM t", dbname="app") == [(2,)]
            # The reader's read-only error changed nothing.
            rows = topology(b)
            assert rows[ep(primary)].role == "writer" and rows[ep(replica)].role == "reader"
            assert all(r.switching == 0 and r.switchovers == 0 for r in rows.values())
            with node_r.cursor() as cur:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
        finally:
            close_quietly(node_r, node_p, node_o, via_b)
    finally:
        close_quietly(first)


@pytest.mark.timeout(150)
def test_switchover_under_write_load_then_second_switchover(make_pg, make_replica, bouncer):
    primary = make_pg()
    r1 = make_replica(primary)
    r2 = make_replica(primary)
    make_topology(primary, [primary, r1, r2])
    wait_replayed(primary, [r1, r2])
    b = bouncer(
        databases={"app": cluster_entry(primary)},
        pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "default_pool_size": 30,
                   "server_failed_delay": 60, "switchover_timeout": 30, "query_wait_timeout": 60},
    )
    clients = 12
    with WriteLoad(b, clients) as load:
        wait_roles(b, {ep(primary): "writer", ep(r1): "reader", ep(r2): "reader"})
        wait_for(lambda: load.every_client_wrote_on(primary.port, 5), message="load running on the primary")

        # -- switchover 1: primary stopped (immediate), r1 promoted --------------------------
        t0 = time.monotonic()
        primary.stop("immediate")
        stopped_1 = time.monotonic()
        wait_for(lambda: topology(b)[ep(primary)].role == "down", message="old writer marked down")
        r1.promote()
        wait_for(lambda: load.every_client_wrote_on(r1.port, 5), timeout=40,
                 message="every client writing on the new primary r1")
        t1 = time.monotonic()
        rows = wait_roles(b, {ep(primary): "down", ep(r1): "writer", ep(r2): "reader"})
        assert all(r.switchovers == 1 and r.switching == 0 for r in rows.values()), rows

        # -- a replica of the new primary joins the topology (RELOAD) -------------------------
        r3 = make_replica(r1)
        r1.psql("INSERT INTO topo VALUES (%s)", (ep(r3),), dbname="app")
        b.reload()
        wait_roles(b, {ep(primary): "down", ep(r1): "writer", ep(r2): "reader", ep(r3): "reader"})
        wait_for(lambda: load.every_client_wrote_on(r1.port, 10), message="load still running on r1")
        # Writes acknowledged through the pooler after switchover 1 are on r1 (and,
        # replication being asynchronous, wait until r3 has them too).
        on_r1_before = load.written(r1.port)
        assert on_r1_before <= set(r1.psql("SELECT client, n FROM t", dbname="app"))
        wait_for(lambda: on_r1_before <= set(r3.psql("SELECT client, n FROM t", dbname="app")),
                 message="r3 replayed r1's writes")

        # -- switchover 2: r1 stopped (immediate), r3 promoted; r2 (still following
        # the dead primary, in recovery) must not be taken for a writer ------------------
        t2 = time.monotonic()
        r1.stop("immediate")
        stopped_2 = time.monotonic()
        wait_for(lambda: topology(b)[ep(r1)].role == "down", message="r1 marked down")
        r3.promote()
        wait_for(lambda: load.every_client_wrote_on(r3.port, 5), timeout=40,
                 message="every client writing on the new primary r3")
        t3 = time.monotonic()
    rows = wait_roles(b, {ep(primary): "down", ep(r1): "down", ep(r2): "reader", ep(r3): "writer"})
    assert all(r.switchovers == 2 and r.switching == 0 for r in rows.values()), rows

    # No client lost its connection; the error contract held for both switchovers.
    assert load.closed == [], f"clients disconnected: {load.closed}"
    check_switchover_errors(load, stopped_1, t0, t1, "switchover 1")
    check_switchover_errors(load, stopped_2, t2, t3, "switchover 2")
    # After each switchover a client's errors (if any) were followed by successes on the new writer.
    for cid in range(clients):
        assert load.successes_on(r1.port, since=t0)[cid] >= 5
        assert load.successes_on(r3.port, since=t2)[cid] >= 5
        assert load.successes_on(primary.port, since=stopped_1)[cid] == 0
    # Writes acknowledged by the new primary are there (with r1's history up to
    # the point r3 was known to have it: writes r1 acknowledged just before its
    # immediate stop may not have reached r3, as with any asynchronous replica).
    on_r3 = set(r3.psql("SELECT client, n FROM t", dbname="app"))
    assert load.written(r3.port) <= on_r3
    assert on_r1_before <= on_r3
    # And the pooler keeps serving new clients.
    late = b.connect(autocommit=True)
    try:
        with late.cursor() as cur:
            cur.execute("INSERT INTO t VALUES (999, 1) RETURNING inet_server_port()")
            assert cur.fetchone() == (r3.port,)
    finally:
        close_quietly(late)


@pytest.mark.timeout(90)
def test_transaction_on_failed_writer_gets_error_and_client_retries(make_pg, make_replica, bouncer):
    primary = make_pg()
    replica = make_replica(primary)
    make_topology(primary, [primary, replica])
    wait_replayed(primary, [replica])
    b = bouncer(
        databases={"app": cluster_entry(primary)},
        pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "server_failed_delay": 60,
                   "switchover_timeout": 30},
    )
    in_tx = b.connect()                          # psycopg2, not autocommit
    idle = b.connect(autocommit=True)            # between transactions
    ext = psycopg.connect(b.dsn(), autocommit=True)   # extended protocol, prepared statements
    try:
        wait_roles(b, {ep(primary): "writer", ep(replica): "reader"})
        for _ in range(3):   # psycopg 3 prepares after the first executions
            assert ext.execute("SELECT inet_server_port() + %s", [0], prepare=True).fetchone() == (primary.port,)
        with in_tx.cursor() as cur:
            cur.execute("INSERT INTO t VALUES (1, 1) RETURNING inet_server_port()")
            assert cur.fetchone() == (primary.port,)
        # in_tx is now idle in transaction on the primary.
        primary.stop("immediate")
        wait_for(lambda: topology(b)[ep(primary)].role == "down", message="writer marked down")
        wait_for(lambda: primary.port not in
                 {s.port for s in b.admin("SHOW SERVERS") if s.database == "app"},
                 message="the pooler dropped its connections to the dead writer")

        # The transaction is gone: the next statement says so, 08006, and nothing else.
        with pytest.raises(psycopg2.OperationalError) as lost:
            with in_tx.cursor() as cur:
                cur.execute("INSERT INTO t VALUES (1, 2)")
        assert lost.value.pgcode == LOST, lost.value
        assert not in_tx.closed

        # Work sent now is held until the new writer is there, then runs, no error.
        def retry_transaction():
            in_tx.rollback()
            with in_tx.cursor() as cur:
                cur.execute("INSERT INTO t VALUES (1, 3)")
                cur.execute("SELECT inet_server_port(), pg_is_in_recovery()")
                row = cur.fetchone()
            in_tx.commit()
            return row

        def idle_write():
            with idle.cursor() as cur:
                cur.execute("INSERT INTO t VALUES (2, 1) RETURNING inet_server_port()")
                return cur.fetchone()

        def ext_read():
            return ext.execute("SELECT inet_server_port() + %s", [0], prepare=True).fetchone()

        waiting = [run_thread(fn) for fn in (retry_transaction, idle_write, ext_read)]
        wait_for(lambda: sum(1 for c in b.admin("SHOW CLIENTS") if c.database == "app"
                             and c.state == "waiting") == 3, message="three clients held")
        assert not any(w.done() for w in waiting)
        replica.promote()
        assert waiting[0].result(30) == (replica.port, False)
        assert waiting[1].result(30) == (replica.port,)
        assert waiting[2].result(30) == (replica.port,)
        # Only the committed work is on the new primary.
        assert sorted(replica.psql("SELECT client, n FROM t", dbname="app")) == [(1, 3), (2, 1)]
        rows = wait_roles(b, {ep(primary): "down", ep(replica): "writer"})
        assert all(r.switchovers == 1 for r in rows.values())
        # The same connections go on working.
        with in_tx.cursor() as cur:
            cur.execute("SELECT count(*) FROM t")
            assert cur.fetchone() == (2,)
        in_tx.commit()
        assert ext.execute("SELECT inet_server_port() + %s", [1], prepare=True).fetchone() == (replica.port + 1,)
    finally:
        close_quietly(in_tx, idle, ext)


@pytest.mark.timeout(90)
def test_no_writer_within_switchover_timeout_is_a_clear_error(make_pg, make_replica, bouncer):
    primary = make_pg()
    replica = make_replica(primary)
    make_topology(primary, [primary, replica])
    wait_replayed(primary, [replica])
    b = bouncer(
        databases={"app": cluster_entry(primary)},
        pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "server_failed_delay": 60,
                   "switchover_timeout": 2, "query_wait_timeout": 60},
    )
    # psycopg 3: psycopg2 drops the text of a FATAL error that is followed by the
    # connection closing (it does so against PostgreSQL itself too).
    conns = [psycopg.connect(b.dsn(), autocommit=True) for _ in range(3)]
    try:
        wait_roles(b, {ep(primary): "writer", ep(replica): "reader"})
        for conn in conns:
            conn.execute("SELECT 1")
        primary.stop("immediate")
        wait_for(lambda: topology(b)[ep(primary)].role == "down", message="writer marked down")

        def attempt(conn):
            try:
                conn.execute("INSERT INTO t VALUES (1, 1)")
            except psycopg.Error as exc:
                return exc
            return None

        outcomes = [run_thread(attempt, conn) for conn in conns]
        errors = [o.result(20) for o in outcomes]   # bounded: a hang fails here
        for exc in errors:
            assert exc is not None, "a write succeeded with no writer"
            assert exc.sqlstate == LOST, exc
            assert "no writer available for database app" in str(exc), str(exc)
        rows = topology(b)
        assert rows[ep(primary)].switching == 1 and rows[ep(replica)].role == "reader", rows

        # Once a writer appears, the pooler serves again.
        replica.promote()
        wait_roles(b, {ep(primary): "down", ep(replica): "writer"})
        fresh = b.connect(autocommit=True)
        try:
            with fresh.cursor() as cur:
                cur.execute("INSERT INTO t VALUES (1, 1) RETURNING inet_server_port()")
                assert cur.fetchone() == (replica.port,)
        finally:
            close_quietly(fresh)
    finally:
        close_quietly(*conns)


@pytest.mark.timeout(120)
def test_old_writer_rejoins_as_reader_then_switch_back(make_pg, make_replica, bouncer):
    """The old primary, stopped cleanly (so its WAL ends where the replica's does,
    no pg_rewind needed), restarted as a standby of the promoted replica, is
    retried after server_failed_delay and shows up as a reader; then the new
    primary is stopped and the old one promoted back."""
    primary = make_pg()
    replica = make_replica(primary)
    make_topology(primary, [primary, replica])
    wait_replayed(primary, [replica])
    b = bouncer(
        databases={"app": cluster_entry(primary)},
        pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "server_failed_delay": 1,
                   "switchover_timeout": 30},
    )
    conn = b.connect(autocommit=True)

    def write(n):
        with conn.cursor() as cur:
            cur.execute("INSERT INTO t VALUES (7, %s) RETURNING inet_server_port()", (n,))
            return cur.fetchone()[0]

    try:
        wait_roles(b, {ep(primary): "writer", ep(replica): "reader"})
        assert write(1) == primary.port

        primary.stop("fast")
        wait_for(lambda: topology(b)[ep(primary)].role == "down", message="writer marked down")
        replica.promote()
        assert write(2) == replica.port        # between transactions: no error
        wait_roles(b, {ep(primary): "down", ep(replica): "writer"})

        # The old primary becomes a standby of the new one.
        primary.settings["primary_conninfo"] = f"host=127.0.0.1 port={replica.port} user=postgres"
        primary._write_settings()
        primary._write_owned(primary.datadir / "standby.signal", "")
        primary.start()
        wait_for(lambda: primary.is_in_recovery() and
                 primary.psql("SELECT status FROM pg_stat_wal_receiver") == [("streaming",)],
                 timeout=30, message="old primary streaming from the new one")
        # Retried after server_failed_delay: it rejoins as a reader, reachable by its key.
        rows = wait_roles(b, {ep(primary): "reader", ep(replica): "writer"})
        assert all(r.switchovers == 1 for r in rows.values())
        wait_for(lambda: primary.psql("SELECT count(*) FROM t", dbname="app") == [(2,)],
                 message="old primary replayed the new primary's writes")
        node = b.connect(dbname=ep(primary), autocommit=True)
        try:
            with node.cursor() as cur:
                cur.execute("SELECT pg_is_in_recovery(), inet_server_port(), count(*) FROM t")
                assert cur.fetchone() == (True, primary.port, 2)
        finally:
            close_quietly(node)

        # Switch back: the new primary goes away, the old one is promoted again.
        replica.stop("immediate")
        wait_for(lambda: topology(b)[ep(replica)].role == "down", message="second writer marked down")
        primary.promote()
        assert write(3) == primary.port
        rows = wait_roles(b, {ep(primary): "writer", ep(replica): "down"})
        assert all(r.switchovers == 2 for r in rows.values())
        assert sorted(primary.psql("SELECT n FROM t WHERE client = 7", dbname="app")) == [(1,), (2,), (3,)]
    finally:
        close_quietly(conn)


@pytest.mark.timeout(60)
def test_read_only_error_on_the_writer_is_no_switchover(make_pg, bouncer):
    """A client that writes inside BEGIN READ ONLY gets 25006 from the writer:
    its own error. The writer is still the writer (not in recovery); the pooler
    must not take it out, and the next writes go on."""
    primary = make_pg()
    make_topology(primary, [primary])
    b = bouncer(
        databases={"app": cluster_entry(primary)},
        pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "server_failed_delay": 30,
                   "switchover_timeout": 5},
    )
    conn = b.connect(autocommit=True)
    ext = psycopg.connect(b.dsn(), autocommit=True)
    try:
        wait_roles(b, {ep(primary): "writer"})
        with conn.cursor() as cur:
            cur.execute("BEGIN READ ONLY")
            with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
                cur.execute("INSERT INTO t VALUES (1, 1)")
            cur.execute("ROLLBACK")
        # Another client, and the same one, keep writing on the writer.
        assert ext.execute("INSERT INTO t VALUES (2, 1) RETURNING inet_server_port()").fetchone() \
            == (primary.port,)
        with conn.cursor() as cur:
            cur.execute("INSERT INTO t VALUES (1, 2) RETURNING inet_server_port()")
            assert cur.fetchone() == (primary.port,)
        rows = topology(b)
        assert rows[ep(primary)].role == "writer", rows
        assert rows[ep(primary)].switchovers == 0 and rows[ep(primary)].switching == 0, rows
    finally:
        close_quietly(conn, ext)
