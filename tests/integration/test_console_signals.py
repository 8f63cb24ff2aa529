"""Signals as PgBouncer handles them: SIGUSR1 = PAUSE, SIGUSR2 = RESUME, SIGHUP =
reload (logged as PgBouncer logs it), SIGINT = wait for servers, SIGTERM = wait
for clients (bounded by shutdown_timeout), SIGQUIT = exit at once; and all of it
when the process starts with SIGINT and SIGQUIT ignored, as a background job of
a non-interactive shell does. Against PgBouncer 1.18 where it behaves so (1.18
exits at once on SIGTERM and has no shutdown_timeout).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import pytest
from fixtures.bouncer import TARGET
from fixtures.pooler import REPO_ROOT
from fixtures.ports import port_is_open, wait_until

geobouncer_only = pytest.mark.skipif(TARGET == "pgbouncer", reason="PgBouncer 1.18 behaves otherwise")


@pytest.fixture
def b(pg, bouncer):
    return bouncer(pgbouncer={"pool_mode": "transaction", "admin_users": "postgres"})


def logged(b, text: str, since: int = 0, timeout: float = 10) -> None:
    wait_until(lambda: text in b.log_text(since), timeout=timeout, message=f"log line {text!r}")


def blocked_query(b):
    """A query in a thread: (thread, result list)."""
    out: list = []

    def run():
        try:
            conn = b.connect("app", "app", autocommit=True)
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 42")
                    out.append(cur.fetchone())
            finally:
                conn.close()
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_sigusr1_pauses_and_sigusr2_resumes(b):
    conn = b.connect("app", "app", autocommit=True)       # logged in before the pause
    try:
        mark = b.log_offset()
        b.signal(signal.SIGUSR1)
        logged(b, "got SIGUSR1, pausing all activity", mark)
        result: list = []
        t = threading.Thread(target=lambda: result.append(_one(conn, "SELECT 42")), daemon=True)
        t.start()
        t.join(0.8)
        assert t.is_alive(), "a query ran while paused by SIGUSR1"
        b.signal(signal.SIGUSR1)
        logged(b, "got SIGUSR1, but already paused/suspended", mark)
        b.signal(signal.SIGUSR2)
        logged(b, "got SIGUSR2, continuing from PAUSE", mark)
        t.join(10)
        assert result == [(42,)]
        b.signal(signal.SIGUSR2)
        logged(b, "got SIGUSR2, but not paused/suspended", mark)
    finally:
        conn.close()


def _one(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()


def test_sighup_logs_and_reloads(b):
    mark = b.log_offset()
    b.rewrite(pgbouncer={**b._overrides, "default_pool_size": 13})     # sends SIGHUP
    logged(b, "got SIGHUP, re-reading config", mark)
    wait_until(lambda: {r.key: r.value for r in b.admin("SHOW CONFIG")}["default_pool_size"] == "13",
               timeout=10, message="the new default_pool_size")


def test_sighup_and_console_reload_each_log_their_own_line(b):
    """PgBouncer logs "RELOAD command issued" for the console command only; SIGHUP has
    its own line. Log alerts and scripts tell the two apart by them."""
    mark = b.log_offset()
    b.signal(signal.SIGHUP)
    logged(b, "got SIGHUP, re-reading config", mark)
    b.admin("SHOW VERSION")              # the reload has run to its end: its lines are in the log
    after_sighup = b.log_text(mark)
    assert re.search(r"\[\d+\] LOG got SIGHUP, re-reading config$", after_sighup, re.M), after_sighup
    assert "RELOAD command issued" not in after_sighup, after_sighup

    mark = b.log_offset()
    b.admin("RELOAD")                    # answered after the reload
    after_reload = b.log_text(mark)
    assert re.search(r"\[\d+\] LOG RELOAD command issued$", after_reload, re.M), after_reload
    assert after_reload.count("RELOAD command issued") == 1, after_reload
    assert "got SIGHUP" not in after_reload, after_reload


def test_reload_during_the_reset_query_retires_the_server(pg, bouncer):
    """A RELOAD that changes a database's server while a session's server is
    still running its reset query: that server is closed, never handed to the
    next client (CI once caught it being reused; PgBouncer closes it)."""
    sb = bouncer(databases={"app": pg.conninfo("app")},
                 pgbouncer={"pool_mode": "session", "default_pool_size": 1,
                           "server_reset_query": "SELECT pg_sleep(1)"})
    conn = sb.connect("app", "app", autocommit=True)
    first = _one(conn, "SELECT pg_backend_pid()")
    conn.close()                                           # the reset query starts
    mark = sb.log_offset()
    # Another server login. PgBouncer 1.18 exits at the next login after a RELOAD that adds user= to a
    # database ("put_in_order: found existing elem", as in pgbouncer#41): another dbname for it.
    changed = pg.conninfo("postgres") if TARGET == "pgbouncer" else pg.conninfo("app", user="app")
    sb.rewrite(databases={"app": changed})
    logged(sb, "got SIGHUP, re-reading config", mark)      # both log it as they start the reload
    conn = sb.connect("app", "app", autocommit=True)
    try:
        assert _one(conn, "SELECT pg_backend_pid()") != first
    finally:
        conn.close()
    logged(sb, "closing because: database configuration changed", mark)


def test_sigquit_exits_at_once(b):
    conn = b.connect("app", "app")
    try:
        _one(conn, "SELECT 1")                              # a transaction stays open
        started = time.monotonic()
        b.signal(signal.SIGQUIT)
        code = b.wait_exit(timeout=5)
        assert time.monotonic() - started < 5
        if TARGET != "pgbouncer":
            assert code == 0 and "got SIGQUIT, fast exit" in b.log_text()
            assert not (b.workdir / f".s.PGSQL.{b.port}").exists()
    finally:
        conn.close()


def test_sigint_waits_for_servers_then_exits(b):
    busy = b.connect("app", "app")
    try:
        _one(busy, "SELECT 1")                              # holds a server in a transaction
        mark = b.log_offset()
        b.signal(signal.SIGINT)
        if TARGET != "pgbouncer":                           # 1.18 keeps listening meanwhile
            wait_until(lambda: not port_is_open(b.host, b.port), timeout=5, message="listener closed")
        time.sleep(0.5)
        assert b.is_running(), "exited while a server was still in use"
        if TARGET != "pgbouncer":
            assert "got SIGINT, shutting down, waiting for all servers connections to be released" \
                in b.log_text(mark)
        busy.commit()
        assert b.wait_exit(timeout=15) is not None
    finally:
        busy.close()


@geobouncer_only
def test_sigterm_waits_for_clients_and_logs_how_many(b):
    client = b.connect("app", "app", autocommit=True)
    _one(client, "SELECT 1")
    mark = b.log_offset()
    b.signal(signal.SIGTERM)
    logged(b, "got SIGTERM, shutting down, waiting for all clients disconnect", mark)
    logged(b, "shutdown: waiting for 1 clients to disconnect", mark)
    wait_until(lambda: not port_is_open(b.host, b.port), timeout=5, message="listener closed")
    assert _one(client, "SELECT 2") == (2,)                 # the client keeps being served
    assert b.is_running()
    client.close()
    assert b.wait_exit(timeout=15) == 0


@geobouncer_only
def test_sigterm_honours_shutdown_timeout(pg, bouncer):
    """A Kubernetes-style bounded drain: past shutdown_timeout the client still
    connected gets an ErrorResponse (psql prints it; psycopg2 reports only the
    close that follows) and the process exits 0."""
    b = bouncer(pgbouncer={"pool_mode": "transaction", "admin_users": "postgres", "shutdown_timeout": 1})
    env = {**os.environ, "PGPASSWORD": b.userlist["app"]}
    psql = subprocess.Popen(["psql", "-X", "-h", b.host, "-p", str(b.port), "-U", "app", "app",
                             "-c", "SELECT 1", "-c", "SELECT pg_sleep(8)"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: any(r.database == "app" for r in b.admin("SHOW CLIENTS")), timeout=10,
                   message="psql connected")
        time.sleep(0.5)
        started = time.monotonic()
        b.signal(signal.SIGTERM)
        assert b.wait_exit(timeout=10) == 0
        assert 0.8 <= time.monotonic() - started < 5
        out, _ = psql.communicate(timeout=10)
    finally:
        if psql.poll() is None:
            psql.kill()
            psql.wait()
    assert "shutdown_timeout (1s) reached, closing 1 remaining clients" in b.log_text()
    assert "FATAL:  server shutdown: shutdown_timeout reached" in out, out


@geobouncer_only
def test_second_sigterm_exits_at_once(b):
    client = b.connect("app", "app", autocommit=True)
    try:
        b.signal(signal.SIGTERM)
        logged(b, "got SIGTERM, shutting down")
        b.signal(signal.SIGTERM)
        assert b.wait_exit(timeout=10) == 0
        assert "got SIGTERM while shutting down, fast exit" in b.log_text()
    finally:
        client.close()


@pytest.mark.parametrize("sig, line", [
    (signal.SIGINT, "got SIGINT, shutting down"),
    (signal.SIGUSR1, "got SIGUSR1, pausing all activity"),
    pytest.param(signal.SIGQUIT, "got SIGQUIT, fast exit", marks=geobouncer_only),
])
def test_signals_work_when_started_with_sigint_ignored(b, sig, line):
    """A background job of a non-interactive shell (sh -c 'geobouncer ... &')
    starts with SIGINT and SIGQUIT ignored."""
    b.stop()

    def as_background_job():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGQUIT, signal.SIG_IGN)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                    os.environ.get("PYTHONPATH")]))}
    mark = b.log_offset()
    with open(b.stdout_path, "ab") as out:
        proc = subprocess.Popen(b._command(), cwd=b.workdir, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=as_background_job, env=env)
    try:
        wait_until(lambda: port_is_open(b.host, b.port), timeout=15, message="listening")
        proc.send_signal(sig)
        if sig == signal.SIGUSR1:
            logged(b, line, mark)
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        else:
            assert proc.wait(10) == 0
            assert line in b.log_text(mark)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "process up" in b.log_text(mark)


def test_sighup_reopens_a_rotated_logfile(b):
    rotated = b.logfile.with_name("geobouncer.log.1")
    b.logfile.rename(rotated)
    b.signal(signal.SIGHUP)
    wait_until(lambda: "got SIGHUP, re-reading config" in rotated.read_text(), timeout=10,
               message="SIGHUP handled")

    def login_logged_in_new_file() -> bool:
        _one_shot(b)
        return b.logfile.exists() and "login attempt" in b.logfile.read_text()

    wait_until(login_logged_in_new_file, timeout=10, message="logging goes to the new logfile")


def _one_shot(b) -> None:
    conn = b.connect("app", "app", autocommit=True)
    try:
        _one(conn, "SELECT 1")
    finally:
        conn.close()
