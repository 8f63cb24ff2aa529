"""Authentication end to end: real clients -> geobouncer -> real PostgreSQL.

Client-facing: every ``auth_type`` against auth_file secrets stored as plain
text, md5 and SCRAM, with psycopg2, psql and (for the SQLSTATE) asyncpg.
Server-facing: the pooler logs in to PostgreSQL roles whose pg_hba methods are
md5, scram-sha-256, password (cleartext) and trust, with the auth_file
password, a forced ``user=/password=`` in ``[databases]``, SCRAM pass-through
(only the SCRAM secret stored), and auth_query through auth_user.
Then database lookup (unknown name, ``*`` fallback) and startup parameters.

Roles of the ``pg`` fixture: md5_user (md5), scram_user (scram-sha-256),
plain_user (password), trust_user and postgres (trust); password = name + "_pw".
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import subprocess

import asyncpg
import psycopg2
import pytest
from fixtures.bouncer import TARGET
from fixtures.pooler import pooler_sqlstate

PSQL = "psql"
WRONG = "definitely-not-the-password"
PASSWORD_AUTH_TYPES = ["plain", "md5", "scram-sha-256"]
SECRET_KINDS = ["plain", "md5", "scram"]
# The role whose server secret has each kind (pg_authid), used as client users.
ROLE_FOR_KIND = {"plain": "plain_user", "md5": "md5_user", "scram": "scram_user"}


# --- helpers -------------------------------------------------------------------

def md5_secret(user: str, password: str) -> str:
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def server_secret(pg, role: str) -> str:
    """The role's secret exactly as PostgreSQL stores it (pg_authid.rolpassword)."""
    return pg.psql("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,))[0][0]


def secret_of_kind(pg, kind: str, role: str) -> str:
    if kind == "plain":
        return pg.passwords[role]
    if kind == "md5":
        secret = md5_secret(role, pg.passwords[role])
        if role == "md5_user":
            assert secret == server_secret(pg, role)
        return secret
    secret = server_secret(pg, role)
    assert secret.startswith("SCRAM-SHA-256$"), secret
    return secret


def query_one(conn, sql: str):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()


def login_psycopg2(b, user: str, password, dbname: str = "app") -> tuple:
    conn = b.connect(dbname, user, password=password)
    try:
        return query_one(conn, "SELECT current_user::text, current_database()::text")
    finally:
        conn.close()


def psql(b, user: str, password, sql: str = "SELECT current_user", dbname: str = "app"):
    """Run psql through the pooler; password through PGPASSWORD (None: none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password is not None:
        env["PGPASSWORD"] = password
    env["PGCONNECT_TIMEOUT"] = "10"
    cmd = [PSQL, "-X", "-w", "-tA", "-h", b.host, "-p", str(b.port), "-U", user, "-d", dbname, "-c", sql]
    return subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)


def asyncpg_sqlstate(b, user: str, password, dbname: str = "app", server_settings=None) -> str | None:
    """Log in with asyncpg: None on success, else the SQLSTATE of the refusal."""

    async def attempt():
        conn = await asyncpg.connect(host=b.host, port=b.port, user=user, password=password,
                                     database=dbname, ssl=False, timeout=10,
                                     server_settings=server_settings)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    try:
        asyncio.run(attempt())
    except asyncpg.PostgresError as exc:
        return exc.sqlstate
    return None


def password_failed(user: str) -> str:
    if TARGET == "pgbouncer":  # the system PgBouncer 1.18 leaves the user name out
        return "authentication failed"
    return f'password authentication failed for user "{user}"'


def assert_refused_wrong_password(b, user: str, password=WRONG, dbname: str = "app") -> None:
    with pytest.raises(psycopg2.OperationalError) as err:
        login_psycopg2(b, user, password, dbname)
    assert password_failed(user) in str(err.value)
    result = psql(b, user, password, dbname=dbname)
    assert result.returncode != 0, result.stdout
    assert password_failed(user) in result.stderr
    assert asyncpg_sqlstate(b, user, password, dbname) == pooler_sqlstate("28P01")


def raw_startup(b, params: dict[str, str]) -> tuple[bytes, bytes]:
    """Send a v3 StartupMessage; return the type and body of the first answer."""
    body = struct.pack("!I", 196608)
    for key, value in params.items():
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    with socket.create_connection((b.host, b.port), timeout=10) as sock:
        sock.sendall(struct.pack("!I", len(body) + 4) + body)
        buf = b""
        while True:
            if len(buf) >= 5:
                length = struct.unpack_from("!I", buf, 1)[0]
                if len(buf) >= 1 + length:
                    return buf[:1], buf[5:1 + length]
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {buf!r}")
            buf += chunk


def error_fields(body: bytes) -> dict[str, str]:
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode()
    return fields


# --- client-facing auth_type x auth_file secret ------------------------------------

def forced_trust_databases(pg) -> dict:
    # The server side logs in as trust_user whoever the client is: only the
    # client-facing exchange is under test here.
    return {"app": pg.conninfo("app", user="trust_user")}


@pytest.mark.parametrize("auth_type", PASSWORD_AUTH_TYPES)
@pytest.mark.parametrize("kind", SECRET_KINDS)
def test_client_auth_type_with_secret_kind(pg, bouncer, auth_type, kind):
    role = ROLE_FOR_KIND[kind]
    secret = secret_of_kind(pg, kind, role)
    b = bouncer(databases=forced_trust_databases(pg), userlist={role: secret},
                pgbouncer={"auth_type": auth_type})
    right = pg.passwords[role]
    if auth_type == "scram-sha-256" and kind == "md5":
        # An md5 hash cannot answer a SCRAM exchange: even the right password fails.
        with pytest.raises(psycopg2.OperationalError):
            login_psycopg2(b, role, right)
        assert psql(b, role, right).returncode != 0
        assert asyncpg_sqlstate(b, role, right) is not None
        return
    assert login_psycopg2(b, role, right) == ("trust_user", "app")
    result = psql(b, role, right)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "trust_user"
    assert asyncpg_sqlstate(b, role, right) is None
    assert_refused_wrong_password(b, role)


@pytest.mark.parametrize("auth_type", ["trust", "any"])
def test_trust_and_any_accept_any_password(pg, bouncer, auth_type):
    userlist = {role: secret_of_kind(pg, kind, role) for kind, role in ROLE_FOR_KIND.items()}
    b = bouncer(databases=forced_trust_databases(pg), userlist=userlist,
                pgbouncer={"auth_type": auth_type})
    for role in userlist:
        for password in (pg.passwords[role], WRONG, None):
            assert login_psycopg2(b, role, password) == ("trust_user", "app"), (role, password)
            result = psql(b, role, password)
            assert result.returncode == 0, (role, password, result.stderr)
            assert result.stdout.strip() == "trust_user"
        assert asyncpg_sqlstate(b, role, WRONG) is None


def test_trust_refuses_user_missing_from_auth_file(pg, bouncer):
    # PgBouncer: "trust: no authentication is done. The user name must still
    # exist in auth_file" (finish_set_pool: '"trust" authentication failed').
    b = bouncer(databases=forced_trust_databases(pg), userlist={"md5_user": "md5_user_pw"},
                pgbouncer={"auth_type": "trust"})
    assert login_psycopg2(b, "md5_user", None) == ("trust_user", "app")
    with pytest.raises(psycopg2.OperationalError):
        login_psycopg2(b, "nobody_in_auth_file", None)
    assert psql(b, "nobody_in_auth_file", None).returncode != 0


def test_any_requires_forced_user(pg, bouncer):
    # PgBouncer: auth_type=any ignores the user name, so a database without a
    # forced user is a config error for the client ("bouncer config error").
    b = bouncer(userlist={"app": "app_pw"}, pgbouncer={"auth_type": "any"},
                databases={"app": pg.conninfo("app"), "forced": pg.conninfo("app", user="trust_user")})
    assert login_psycopg2(b, "whoever", WRONG, dbname="forced") == ("trust_user", "app")
    with pytest.raises(psycopg2.OperationalError):
        login_psycopg2(b, "app", "app_pw", dbname="app")


def test_unknown_user_fails_like_a_wrong_password(pg, bouncer):
    b = bouncer(databases=forced_trust_databases(pg), userlist={"md5_user": "md5_user_pw"},
                pgbouncer={"auth_type": "scram-sha-256"})
    assert_refused_wrong_password(b, "ghost_user", password="ghost_user_pw")


# --- server-facing logins ------------------------------------------------------------

@pytest.mark.parametrize("role", ["md5_user", "scram_user", "plain_user", "trust_user"])
def test_server_login_with_auth_file_password(pg, bouncer, role):
    b = bouncer(pgbouncer={"auth_type": "md5"})  # default userlist: every role's plain password
    assert login_psycopg2(b, role, pg.passwords[role]) == (role, "app")
    result = psql(b, role, pg.passwords[role], sql="SELECT current_user || '@' || current_database()")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{role}@app"
    # The server really saw that role log in through its hba method.
    assert pg.backends("app", role) >= 1


def test_server_login_with_md5_secret_in_auth_file(pg, bouncer):
    b = bouncer(userlist={"md5_user": server_secret(pg, "md5_user")}, pgbouncer={"auth_type": "md5"})
    assert login_psycopg2(b, "md5_user", "md5_user_pw") == ("md5_user", "app")
    assert_refused_wrong_password(b, "md5_user")


def test_server_login_failure_is_reported(pg, bouncer):
    # The client passes the pooler's check (same wrong password on both sides),
    # PostgreSQL refuses the pooler: the client gets the server's 28P01.
    b = bouncer(userlist={"md5_user": "stale_pw"}, pgbouncer={"auth_type": "plain"})
    with pytest.raises(psycopg2.OperationalError) as err:
        login_psycopg2(b, "md5_user", "stale_pw")
    assert password_failed("md5_user") in str(err.value)


@pytest.mark.parametrize("role", ["md5_user", "scram_user", "plain_user", "trust_user"])
def test_forced_user_in_database_entry(pg, bouncer, role):
    databases = {"app": pg.conninfo("app", user=role, password=pg.passwords[role])}
    b = bouncer(databases=databases, userlist={"app": "app_pw", "md5_user": "md5_user_pw"},
                pgbouncer={"auth_type": "md5"})
    for client in ("app", "md5_user"):
        assert login_psycopg2(b, client, b.userlist[client]) == (role, "app"), client
        result = psql(b, client, b.userlist[client])
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == role
    # Client authentication still applies to the client's own user.
    with pytest.raises(psycopg2.OperationalError):
        login_psycopg2(b, "app", WRONG)


def test_forced_user_password_taken_from_auth_file(pg, bouncer):
    databases = {"app": pg.conninfo("app", user="scram_user")}
    b = bouncer(databases=databases, userlist={"app": "app_pw", "scram_user": "scram_user_pw"})
    assert login_psycopg2(b, "app", "app_pw") == ("scram_user", "app")


@pytest.mark.parametrize("auth_type", ["scram-sha-256", "md5"])
def test_scram_pass_through(pg, bouncer, auth_type):
    secret = server_secret(pg, "scram_user")
    b = bouncer(userlist={"scram_user": secret}, pgbouncer={"auth_type": auth_type})
    # No cleartext password anywhere in the pooler's files.
    assert "scram_user_pw" not in b.ini_path.read_text() + b.userlist_path.read_text()
    assert login_psycopg2(b, "scram_user", "scram_user_pw") == ("scram_user", "app")
    # A second client, new server connection: the keys of the new proof work too.
    held = b.connect("app", "scram_user", password="scram_user_pw")
    try:
        assert query_one(held, "SELECT current_user::text") == ("scram_user",)
        result = psql(b, "scram_user", "scram_user_pw", sql="SELECT count(*) FROM pg_stat_activity"
                      " WHERE usename = 'scram_user' AND backend_type = 'client backend'")
        assert result.returncode == 0, result.stderr
        assert int(result.stdout.strip()) >= 2
    finally:
        held.close()
    assert asyncpg_sqlstate(b, "scram_user", "scram_user_pw") is None
    assert_refused_wrong_password(b, "scram_user")


# --- auth_query -----------------------------------------------------------------------

@pytest.mark.parametrize("role", ["md5_user", "scram_user"])
def test_auth_query_through_auth_user(pg, bouncer, role):
    # Only the auth_user is in auth_file (postgres is trust on the server).
    b = bouncer(userlist={"postgres": "postgres_pw"},
                pgbouncer={"auth_type": "md5", "auth_user": "postgres"})
    assert login_psycopg2(b, role, pg.passwords[role]) == (role, "app")
    result = psql(b, role, pg.passwords[role])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == role
    assert_refused_wrong_password(b, role)


def test_auth_query_unknown_user_fails(pg, bouncer):
    b = bouncer(userlist={"postgres": "postgres_pw"},
                pgbouncer={"auth_type": "md5", "auth_user": "postgres"})
    with pytest.raises(psycopg2.OperationalError):
        login_psycopg2(b, "no_such_role", "whatever")
    assert psql(b, "no_such_role", "whatever").returncode != 0
    assert asyncpg_sqlstate(b, "no_such_role", "whatever") is not None
    # ... and a known one still works afterwards.
    assert login_psycopg2(b, "scram_user", "scram_user_pw") == ("scram_user", "app")


def test_auth_user_per_database(pg, bouncer):
    databases = {"app": pg.conninfo("app", auth_user="postgres")}
    b = bouncer(databases=databases, userlist={"postgres": "postgres_pw"})
    assert login_psycopg2(b, "scram_user", "scram_user_pw") == ("scram_user", "app")
    with pytest.raises(psycopg2.OperationalError):
        login_psycopg2(b, "scram_user", WRONG)


# --- databases --------------------------------------------------------------------------

def test_unknown_database(pg, bouncer):
    b = bouncer()
    with pytest.raises(psycopg2.OperationalError) as err:
        login_psycopg2(b, "app", "app_pw", dbname="nosuchdb")
    assert "no such database: nosuchdb" in str(err.value)
    result = psql(b, "app", "app_pw", dbname="nosuchdb")
    assert result.returncode != 0
    assert "no such database: nosuchdb" in result.stderr
    assert asyncpg_sqlstate(b, "app", "app_pw", dbname="nosuchdb") == pooler_sqlstate("3D000")


def test_fallback_database_entry(pg, bouncer):
    b = bouncer(databases={"*": f"host={pg.host} port={pg.port}"})
    for dbname in ("app", "postgres"):
        assert login_psycopg2(b, "app", "app_pw", dbname=dbname) == ("app", dbname)
    result = psql(b, "md5_user", "md5_user_pw", sql="SELECT current_database()", dbname="postgres")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "postgres"
    # A name PostgreSQL does not know gets PostgreSQL's own answer (PgBouncer 1.18: 08P01).
    assert asyncpg_sqlstate(b, "app", "app_pw", dbname="nosuchdb_either") == pooler_sqlstate("3D000")


# --- startup parameters --------------------------------------------------------------

def test_unlisted_startup_parameter_is_refused(pg, bouncer):
    b = bouncer()
    mtype, body = raw_startup(b, {"user": "app", "database": "app", "extra_float_digits": "2"})
    assert mtype == b"E"
    fields = error_fields(body)
    assert fields["C"] == "08P01"
    assert "unsupported startup parameter" in fields["M"]
    assert "extra_float_digits" in fields["M"]
    assert asyncpg_sqlstate(b, "app", "app_pw", server_settings={"geo_unknown_param": "1"}) == "08P01"


def test_ignored_startup_parameter_is_accepted(pg, bouncer):
    b = bouncer(pgbouncer={"ignore_startup_parameters": "extra_float_digits, geo_unknown_param"})
    mtype, body = raw_startup(b, {"user": "app", "database": "app", "extra_float_digits": "2"})
    assert mtype == b"R", error_fields(body) if mtype == b"E" else mtype
    assert asyncpg_sqlstate(b, "app", "app_pw",
                            server_settings={"extra_float_digits": "2", "geo_unknown_param": "1"}) is None
    # Not listed: still refused.
    assert asyncpg_sqlstate(b, "app", "app_pw", server_settings={"other_param": "1"}) == "08P01"


@pytest.mark.geobouncer_only("the options startup parameter (PgBouncer 1.20+)")
def test_ignored_parameter_inside_options(pg, bouncer):
    # PgBouncer 1.25 (set_startup_options): a "-c name=value" in options whose
    # name is in ignore_startup_parameters is ignored, not refused.
    b = bouncer(pgbouncer={"ignore_startup_parameters": "extra_float_digits"})
    conn = b.connect("app", "app", options="-c extra_float_digits=2")
    try:
        assert query_one(conn, "SELECT current_user::text") == ("app",)
    finally:
        conn.close()


@pytest.mark.geobouncer_only("the options startup parameter (PgBouncer 1.20+)")
def test_tracked_parameter_in_options_reaches_the_server(pg, bouncer):
    b = bouncer(pgbouncer={"pool_mode": "transaction"})
    conn = b.connect("app", "app", options="-c TimeZone=Asia/Tokyo", autocommit=True)
    try:
        assert query_one(conn, "SHOW TimeZone") == ("Asia/Tokyo",)
    finally:
        conn.close()
    with pytest.raises(psycopg2.OperationalError) as err:
        b.connect("app", "app", options="-c work_mem=64MB")
    assert "work_mem" in str(err.value)
