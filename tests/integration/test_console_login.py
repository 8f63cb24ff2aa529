"""Who may log in to the console: user ``pgbouncer`` over the unix socket without a
password when the peer's OS user (SO_PEERCRED) is the pooler's own, as PgBouncer
allows; anyone else as usual. With ``auth_type = any``, admin_users and
stats_users get their rights and other names get in as stats users.

psql runs as the pooler's OS user and as another one (``runuser``). Also run
against PgBouncer (``GEOBOUNCER_TEST_TARGET=pgbouncer``), which the fixture runs
as ``postgres``: then the roles of the two OS users swap.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess

import psycopg2
import pytest
from fixtures.bouncer import TARGET

ME = pwd.getpwuid(os.getuid()).pw_name
POOLER_USER = "postgres" if TARGET == "pgbouncer" and os.geteuid() == 0 else ME
OTHER_USER = "root" if POOLER_USER != "root" else "postgres"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run psql as two OS users")


def psql(b, os_user: str, sql: str, user: str = "pgbouncer", host: str | None = None):
    """psql as ``os_user`` over the pooler's unix socket, never asking for a password."""
    cmd = [shutil.which("psql") or "psql", "-X", "-w", "-At", "-h", host or str(b.workdir),
           "-p", str(b.port), "-U", user, "-d", "pgbouncer", "-c", sql]
    if os_user != ME:
        cmd = ["runuser", "-u", os_user, "--", *cmd]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSFILE"] = "/dev/null"
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env, cwd="/")


def reachable(b) -> None:
    """Let any OS user reach the socket, so a refusal is the pooler's, not the file system's."""
    for path in (b.workdir.parent, b.workdir):
        path.chmod(0o755)


@pytest.fixture
def b(pg, bouncer):
    made = bouncer(pgbouncer={"auth_type": "md5", "admin_users": "postgres"})
    reachable(made)
    return made


def test_same_os_user_logs_in_as_pgbouncer_without_password(b):
    done = psql(b, POOLER_USER, "SHOW VERSION")
    assert done.returncode == 0, done.stderr
    assert "bouncer" in done.stdout.lower()
    # an admin: it may run what needs admin rights
    fds = psql(b, POOLER_USER, "SHOW FDS")
    assert fds.returncode == 0 and "pooler" in fds.stdout, fds.stderr
    if TARGET != "pgbouncer":
        assert "pgbouncer access from unix socket" in b.log_text()


def test_other_os_user_is_refused(b):
    done = psql(b, OTHER_USER, "SHOW VERSION")
    assert done.returncode != 0, done.stdout
    assert "Permission denied" not in done.stderr and "No such file" not in done.stderr, done.stderr
    assert "bouncer" not in done.stdout.lower()


def test_pgbouncer_over_tcp_needs_a_password(b):
    done = psql(b, POOLER_USER, "SHOW VERSION", host="127.0.0.1")
    assert done.returncode != 0, done.stdout
    assert "bouncer" not in done.stdout.lower()


def test_auth_type_any_gives_admin_and_stats_rights(pg, bouncer):
    b = bouncer(databases={"app": pg.conninfo("app", user="app")},
                pgbouncer={"auth_type": "any", "admin_users": "postgres", "stats_users": "md5_user"})

    def run(user: str, sql: str):
        conn = psycopg2.connect(host=b.host, port=b.port, dbname="pgbouncer", user=user,
                                connect_timeout=10)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.statusmessage
        finally:
            conn.close()

    assert run("postgres", "SHOW FDS") == "SHOW"           # admin, no password asked
    assert run("postgres", "PAUSE") == "PAUSE"
    assert run("postgres", "RESUME") == "RESUME"
    for user in ("md5_user", "nobody_in_any_list"):        # stats rights only
        assert run(user, "SHOW POOLS") == "SHOW"
        with pytest.raises(psycopg2.Error) as err:
            run(user, "PAUSE")
        assert "admin access needed" in str(err.value)
