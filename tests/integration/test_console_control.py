"""Console process control with PgBouncer's messages and SQLSTATEs: PAUSE,
RESUME, SUSPEND (under pgbench load, no transaction lost), DISABLE/ENABLE, KILL,
KILL_CLIENT, RECONNECT, WAIT_CLOSE, the SHUTDOWN variants, and the simple-query-
only rule. Runs against PgBouncer 1.18 too where it has the command; the rest is
marked to run against geobouncer only.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import threading
import time

import asyncpg
import psycopg2
import psycopg2.extras
import pytest
from fixtures.bouncer import TARGET
from fixtures.ports import port_is_open, wait_until

geobouncer_only = pytest.mark.skipif(TARGET == "pgbouncer", reason="not in PgBouncer 1.18")


@pytest.fixture
def b(pg, bouncer):
    return bouncer(
        databases={"app": pg.conninfo("app"), "postgres": pg.conninfo("postgres")},
        pgbouncer={"pool_mode": "transaction", "admin_users": "postgres", "suspend_timeout": 5},
    )


def console(b):
    return b.connect("pgbouncer", "postgres", autocommit=True)


def run(conn, sql: str):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.statusmessage


def refusal(b, sql: str, conn=None) -> psycopg2.Error:
    own = conn is None
    conn = conn or console(b)
    try:
        with pytest.raises(psycopg2.Error) as err:
            run(conn, sql)
        assert run(conn, "SHOW VERSION") == "SHOW"        # still usable
        return err.value
    finally:
        if own:
            conn.close()


class Background(threading.Thread):
    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc

    def finish(self, timeout=15.0):
        self.join(timeout)
        assert not self.is_alive(), "background call did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def select(b, sql="SELECT 1", dbname="app"):
    conn = b.connect(dbname, "app", autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()
    finally:
        conn.close()


# --- messages -----------------------------------------------------------------------

MESSAGES = [
    ("RESUME", "pooler is not paused/suspended"),
    ("RESUME app", "database app is not paused"),
    ("RESUME nosuch", "no such database: nosuch"),
    ("PAUSE nosuch", "no such database: nosuch"),
    ("PAUSE pgbouncer", "cannot pause admin db: pgbouncer"),
    ("DISABLE", "a database is required"),
    ("DISABLE pgbouncer", "cannot disable admin db: pgbouncer"),
    ("DISABLE nosuch", "no such database: nosuch"),
    ("ENABLE", "a database is required"),
    # PgBouncer 1.18 says "disable" here (fixed later; 1.25 says "enable")
    ("ENABLE pgbouncer", f"cannot {'disable' if TARGET == 'pgbouncer' else 'enable'} admin db: pgbouncer"),
    ("KILL pgbouncer", "cannot kill admin db: pgbouncer"),
    ("KILL nosuch", "no such database: nosuch"),
    ("RECONNECT nosuch", "no such database: nosuch"),
    ("RECONNECT pgbouncer", "cannot reconnect admin db: pgbouncer"),
    ("WAIT_CLOSE nosuch", "no such database: nosuch"),
    ("WAIT_CLOSE pgbouncer", "cannot wait in admin db: pgbouncer"),
    *[(sql, f"invalid command '{sql}', use SHOW HELP;")
      for sql in ("SHUTDOWN foo", "SUSPEND x", "RELOAD x", "PAUSE app extra", "SHOW", "select 1",
                  "show nothing", "PAUSE 'app'")],
]


@pytest.mark.parametrize("sql, text", MESSAGES)
def test_refusals_carry_pgbouncers_text_and_08p01(b, sql, text):
    err = refusal(b, sql)
    assert err.pgcode == "08P01"
    assert err.pgerror.strip() == f"ERROR:  {text}"


@geobouncer_only
@pytest.mark.parametrize("sql, text", [("KILL_CLIENT abc", "invalid client pointer supplied"),
                                       ("KILL_CLIENT 999999", "client not found"),
                                       ("SHUTDOWN WAIT_FOR_NOTHING",
                                        "invalid command 'SHUTDOWN WAIT_FOR_NOTHING', use SHOW HELP;")])
def test_newer_refusals(b, sql, text):
    err = refusal(b, sql)
    assert (err.pgcode, err.pgerror.strip()) == ("08P01", f"ERROR:  {text}")


def test_already_paused_refusals(b):
    conn = console(b)
    try:
        assert run(conn, "PAUSE") == "PAUSE"
        for sql in ("PAUSE", "PAUSE app", "SUSPEND", "KILL app"):
            assert "already suspended/paused" in refusal(b, sql, conn).pgerror, sql
        assert run(conn, "RESUME") == "RESUME"                 # the same admin connection resumes
    finally:
        conn.close()
    assert select(b) == (1,)


def test_suspend_with_a_paused_database_is_refused(b):
    conn = console(b)
    try:
        run(conn, "PAUSE app")
        assert "cannot suspend with paused databases" in refusal(b, "SUSPEND", conn).pgerror
        run(conn, "RESUME app")
    finally:
        conn.close()


def test_disabled_database_login_error(b):
    b.admin("DISABLE app")
    with pytest.raises(psycopg2.OperationalError) as err:
        select(b)
    assert 'database "app" is disabled' in str(err.value)
    b.admin("ENABLE app")
    assert select(b) == (1,)


# --- SUSPEND -----------------------------------------------------------------------------

def xacts(conn) -> int:
    """Transactions so far, asked on an open console connection (SUSPEND accepts no new one)."""
    with conn.cursor(cursor_factory=psycopg2.extras.NamedTupleCursor) as cur:
        cur.execute("SHOW STATS_TOTALS")
        return sum(r.xact_count for r in cur.fetchall() if r.database == "app")


def test_suspend_holds_new_work_and_connections_until_resume(b):
    conn = console(b)
    try:
        assert run(conn, "SUSPEND") == "SUSPEND"
        before = xacts(conn)
        late = Background(lambda: select(b, "SELECT 42"))
        late.join(1.0)
        assert late.is_alive(), "a new connection was served while suspended"
        assert xacts(conn) == before
        if TARGET != "pgbouncer":
            with conn.cursor() as cur:
                cur.execute("SHOW STATE")
                assert dict(cur.fetchall())["suspended"] == "yes"
        assert run(conn, "RESUME") == "RESUME"                 # the suspending connection resumes
        assert late.finish() == (42,)
    finally:
        conn.close()


def test_admin_leaving_a_suspended_pooler_resumes_it(b):
    conn = console(b)
    run(conn, "SUSPEND")
    conn.close()
    wait_until(lambda: select(b) == (1,), timeout=10, message="served again once the admin left")
    if TARGET != "pgbouncer":
        assert "admin disappeared when suspended, doing RESUME" in b.log_text()


@pytest.mark.timeout(90)
def test_suspend_and_resume_under_pgbench_load(tmp_path, b):
    script = tmp_path / "tx.sql"
    script.write_text("BEGIN;\nSELECT pg_sleep(0.005);\nSELECT 1;\nCOMMIT;\n")
    env = {**os.environ, "PGPASSWORD": b.userlist["app"]}
    cmd = ["pgbench", "-n", "-c", "4", "-j", "4", "-T", "6", "-f", str(script), "-h", b.host,
           "-p", str(b.port), "-U", "app", "app"]
    bench = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        conn = console(b)
        try:
            wait_until(lambda: xacts(conn) > 20, timeout=20, message="pgbench running")
            for _ in range(2):
                assert run(conn, "SUSPEND") == "SUSPEND"
                held = xacts(conn)
                time.sleep(0.6)
                assert xacts(conn) == held, "transactions ran while suspended"
                assert run(conn, "RESUME") == "RESUME"
                wait_until(lambda h=held: xacts(conn) > h + 10, timeout=10, message="work resumed")
        finally:
            conn.close()
        out, _ = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == 0, out
    assert re.search(r"^number of failed transactions: 0 \(", out, re.MULTILINE), out
    done = re.search(r"^number of transactions actually processed: (\d+)", out, re.MULTILINE)
    assert done and int(done.group(1)) > 50, out


@geobouncer_only
def test_cancel_of_a_waiting_pause_resumes(b):
    busy = b.connect("app", "app")                           # a transaction holds a server
    conn = console(b)
    try:
        with busy.cursor() as cur:
            cur.execute("SELECT 1")
        pause = Background(lambda: run(conn, "PAUSE"))
        pause.join(0.5)
        assert pause.is_alive(), "PAUSE did not wait for the open transaction"
        conn.cancel()
        with pytest.raises(psycopg2.Error) as err:
            pause.finish()
        assert err.value.pgcode == "57014"
        assert {r.key: r.value for r in b.admin("SHOW STATE")}["paused"] == "no"
        assert select(b, dbname="postgres") == (1,)
    finally:
        busy.rollback()
        busy.close()
        conn.close()


# --- KILL / KILL_CLIENT / RECONNECT / WAIT_CLOSE ----------------------------------------

@geobouncer_only
def test_kill_without_database_kills_every_pool(b):
    victims = [b.connect(db, "app", autocommit=True) for db in ("app", "postgres")]
    try:
        for v in victims:
            run(v, "SELECT 1")
        assert b.admin("KILL") == []
        for v in victims:
            with pytest.raises((psycopg2.OperationalError, psycopg2.InterfaceError)):
                run(v, "SELECT 1")
        assert {r.name: r.paused for r in b.admin("SHOW DATABASES")}["app"] == 1
        b.admin("RESUME app")
        b.admin("RESUME postgres")
        assert select(b) == (1,)
    finally:
        for v in victims:
            v.close()


@geobouncer_only
def test_kill_client_disconnects_one_client(b):
    victim = b.connect("app", "app", autocommit=True)
    bystander = b.connect("app", "app", autocommit=True)
    try:
        run(victim, "SET application_name = 'victim'")
        run(bystander, "SELECT 1")
        target = next(r.id for r in b.admin("SHOW CLIENTS") if r.application_name == "victim")
        conn = console(b)
        try:
            assert run(conn, f"KILL_CLIENT {target}") == "KILL_CLIENT"
        finally:
            conn.close()
        with pytest.raises((psycopg2.OperationalError, psycopg2.InterfaceError)) as err:
            run(victim, "SELECT 1")
        assert "admin forced disconnect" in str(err.value) or "closed" in str(err.value)
        assert run(bystander, "SELECT 2") == "SELECT 1"
    finally:
        victim.close()
        bystander.close()


def test_wait_close_waits_for_reconnected_servers(b):
    busy = b.connect("app", "app")
    conn = console(b)
    try:
        with busy.cursor() as cur:
            cur.execute("SELECT 1")                             # server held by a transaction
        assert run(conn, "RECONNECT app") == "RECONNECT"
        wait = Background(lambda: run(conn, "WAIT_CLOSE app"))
        wait.join(0.7)
        assert wait.is_alive(), "WAIT_CLOSE returned while the old server was still in use"
        busy.commit()                                           # released -> closed
        assert wait.finish() == "WAIT_CLOSE"
    finally:
        busy.close()
        conn.close()


# --- SHUTDOWN -------------------------------------------------------------------------------

@geobouncer_only
def test_shutdown_wait_for_servers(b):
    busy = b.connect("app", "app")
    with busy.cursor() as cur:
        cur.execute("SELECT 1")                                 # an open transaction
    conn = console(b)
    try:
        assert run(conn, "SHUTDOWN WAIT_FOR_SERVERS") == "SHUTDOWN"
    finally:
        conn.close()
    wait_until(lambda: not port_is_open(b.host, b.port), timeout=5, message="listener closed")
    time.sleep(0.3)
    assert b.is_running(), "exited while a transaction was still open"
    busy.commit()
    assert b.wait_exit(timeout=15) is not None
    busy.close()
    assert "SHUTDOWN WAIT_FOR_SERVERS command issued" in b.log_text()


@geobouncer_only
def test_shutdown_wait_for_clients(b):
    client = b.connect("app", "app", autocommit=True)
    run(client, "SELECT 1")
    conn = console(b)
    try:
        assert run(conn, "SHUTDOWN WAIT_FOR_CLIENTS") == "SHUTDOWN"
    finally:
        conn.close()
    wait_until(lambda: not port_is_open(b.host, b.port), timeout=5, message="listener closed")
    assert run(client, "SELECT 2") == "SELECT 1"                # existing clients keep working
    assert b.is_running()
    client.close()
    assert b.wait_exit(timeout=15) is not None
    assert "SHUTDOWN WAIT_FOR_CLIENTS command issued" in b.log_text()


# --- protocol ---------------------------------------------------------------------------------

def test_extended_protocol_gets_pgbouncers_error(b):
    async def extended():
        conn = await asyncpg.connect(host=b.host, port=b.port, user="postgres",
                                     password=b.userlist["postgres"], database="pgbouncer",
                                     ssl=False, timeout=10)
        try:
            return await asyncio.wait_for(conn.fetch("SHOW POOLS"), 10)
        finally:
            conn.terminate()

    with pytest.raises(asyncpg.PostgresError) as err:
        asyncio.run(extended())
    assert "extended query protocol not supported by admin console" in str(err.value)
    # (the SQLSTATE, 08P01, is checked on the raw wire in test_admin.py)
    assert b.admin("SHOW VERSION")
