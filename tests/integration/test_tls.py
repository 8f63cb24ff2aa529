"""TLS towards clients: the SSLRequest answered and the handshake done,
client_tls_sslmode, client certificates, PgBouncer's refusals, and hostile
handshakes that cost only the client that makes them.

Clients connect with ``sslmode=verify-full`` against the test CA (certificates
made by fixtures/certs.py); ``host=localhost hostaddr=127.0.0.1`` makes libpq
check the name while connecting to the loopback address the pooler listens on.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

import asyncpg
import psycopg
import psycopg2
import pytest
from fixtures.bouncer import TARGET
from fixtures.ports import wait_until

SSL_REQUEST = struct.pack("!II", 8, 80877103)


def tls_settings(files, mode="require", cert="bouncer", **extra):
    return {
        "client_tls_sslmode": mode,
        "client_tls_key_file": files.key(cert),
        "client_tls_cert_file": files.cert(cert),
        "client_tls_ca_file": files.path("ca.pem"),
        "auth_type": "md5",
        **extra,
    }


def verify_full(files, b, **kw):
    """libpq parameters for a verify-full connection to bouncer ``b``."""
    params = dict(sslmode="verify-full", sslrootcert=files.path("ca.pem"), host="localhost",
                  hostaddr="127.0.0.1")
    params.update(kw)
    return params


def psql(dsn: str, sql: str) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", dsn, "-XAtc", sql], capture_output=True, text=True, timeout=30)


def client_tls(b) -> list:
    return [r.tls for r in b.admin("SHOW CLIENTS") if r.database == "app"]


def assert_quiet_log(b) -> None:
    text = b.log_text()
    assert "Traceback" not in text and "internal error" not in text, text[-3000:]


# --- the clients, with sslmode=verify-full -----------------------------------------

def test_psql_verify_full(tls_files, bouncer):
    b = bouncer(pgbouncer=tls_settings(tls_files))
    out = psql(b.dsn(**verify_full(tls_files, b)), "SELECT 40 + 2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "42"
    assert "tls=TLSv1." in b.log_text()


def test_psycopg2_psycopg3_asyncpg_verify_full(tls_files, bouncer):
    b = bouncer(pgbouncer=tls_settings(tls_files))
    conn = psycopg2.connect(b.dsn(**verify_full(tls_files, b)))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_user")
            assert cur.fetchone() == ("app",)
        # SHOW CLIENTS names the protocol, the cipher and the key exchange, as PgBouncer does.
        (shown,) = client_tls(b)
        assert shown.startswith("TLSv1.3/TLS_"), shown
        if TARGET != "pgbouncer":    # PgBouncer 1.18 leaves the group out on the client side
            assert "/ECDH=X25519" in shown, shown
    finally:
        conn.close()

    with psycopg.connect(b.dsn(**verify_full(tls_files, b))) as conn3:
        assert conn3.execute("SELECT 1").fetchone() == (1,)
        assert conn3.pgconn.ssl_in_use

    async def run_asyncpg():
        ctx = ssl.create_default_context(cafile=tls_files.path("ca.pem"))   # verifies name and chain
        conn = await asyncpg.connect(host="localhost", port=b.port, user="app", password="app_pw",
                                     database="app", ssl=ctx)
        try:
            assert await conn.fetchval("SELECT 7") == 7
            return conn._transport.get_extra_info("ssl_object").version()
        finally:
            await conn.close()

    assert asyncio.run(run_asyncpg()).startswith("TLSv1.")


def test_allow_and_prefer_take_both(tls_files, bouncer):
    b = bouncer(pgbouncer=tls_settings(tls_files, mode="prefer"))
    assert psql(b.dsn(sslmode="disable"), "SELECT 1").stdout.strip() == "1"
    assert psql(b.dsn(**verify_full(tls_files, b)), "SELECT 1").stdout.strip() == "1"


def test_disable_answers_n(tls_files, bouncer):
    b = bouncer(pgbouncer=tls_settings(tls_files, mode="disable"))
    out = psql(b.dsn(sslmode="require"), "SELECT 1")
    assert out.returncode != 0 and "does not support SSL" in out.stderr
    assert psql(b.dsn(sslmode="prefer"), "SELECT 1").stdout.strip() == "1"


# --- refusals -----------------------------------------------------------------------

def test_plaintext_refused_under_require(tls_files, bouncer):
    b = bouncer(pgbouncer=tls_settings(tls_files, mode="require"))
    with pytest.raises(psycopg2.OperationalError) as err:
        psycopg2.connect(b.dsn(sslmode="disable"))
    assert "SSL required" in str(err.value)
    # The Unix socket is not encrypted, and not refused (as PgBouncer).
    out = psql(b.dsn(host=str(b.workdir)), "SELECT 1")
    assert out.stdout.strip() == "1", out.stderr


def test_client_rejects_wrong_ca_expired_and_wrong_name(tls_files, bouncer):
    b = bouncer(pgbouncer=tls_settings(tls_files))
    out = psql(b.dsn(**verify_full(tls_files, b, sslrootcert=tls_files.path("other_ca.pem"))), "SELECT 1")
    assert out.returncode != 0 and "certificate verify failed" in out.stderr, out.stderr
    wait_until(lambda: re.search("unknown.ca", b.log_text(), re.I), timeout=5, message="the client's alert logged")

    expired = bouncer(pgbouncer=tls_settings(tls_files, cert="expired"))
    out = psql(expired.dsn(**verify_full(tls_files, expired)), "SELECT 1")
    assert out.returncode != 0 and "certificate verify failed" in out.stderr, out.stderr
    wait_until(lambda: re.search("certificate.expired", expired.log_text(), re.I), timeout=5, message="alert logged")

    wrong = bouncer(pgbouncer=tls_settings(tls_files, cert="wrongname"))
    out = psql(wrong.dsn(**verify_full(tls_files, wrong)), "SELECT 1")
    assert out.returncode != 0 and "does not match host name" in out.stderr, out.stderr
    # verify-ca does not check the name: the same certificate is fine then.
    out = psql(wrong.dsn(**verify_full(tls_files, wrong, sslmode="verify-ca")), "SELECT 1")
    assert out.stdout.strip() == "1", out.stderr


def test_verify_ca_requires_a_client_certificate(tls_files, bouncer):
    b = bouncer(pgbouncer=tls_settings(tls_files, mode="verify-ca"))
    out = psql(b.dsn(**verify_full(tls_files, b)), "SELECT 1")
    assert out.returncode != 0, out.stdout
    good = verify_full(tls_files, b, sslcert=tls_files.cert("client_app"),
                       sslkey=tls_files.client_key("client_app"))
    assert psql(b.dsn(**good), "SELECT 1").stdout.strip() == "1"
    # A certificate from another CA is refused.
    bad = verify_full(tls_files, b, sslcert=tls_files.cert("other_client_app"),
                      sslkey=tls_files.client_key("other_client_app"))
    out = psql(b.dsn(**bad), "SELECT 1")
    assert out.returncode != 0
    assert_quiet_log(b)


# --- hostile handshakes ----------------------------------------------------------------

def _ssl_request(b) -> socket.socket:
    sock = socket.create_connection((b.host, b.port), timeout=10)
    sock.sendall(SSL_REQUEST)
    assert sock.recv(1) == b"S"
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except socket.timeout:
        return False
    except OSError:
        pass
    return True


def test_bad_handshakes_cost_only_themselves(tls_files, bouncer):
    b = bouncer(pgbouncer=tls_settings(tls_files, client_login_timeout=2))
    good = psycopg2.connect(b.dsn(**verify_full(tls_files, b)))
    good.autocommit = True
    cur = good.cursor()
    # Garbage instead of a ClientHello: closed at once.
    garbage = _ssl_request(b)
    garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 20)
    # Gone in the middle of the handshake: a ClientHello cut short.
    cut = _ssl_request(b)
    hello = ssl.create_default_context()
    hello.check_hostname = False
    hello.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = hello.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    cut.sendall(outgoing.read()[:40])
    cut.close()
    # Silent after the SSLRequest: closed by client_login_timeout.
    stalled = _ssl_request(b)
    plaintext_after = socket.create_connection((b.host, b.port), timeout=10)
    plaintext_after.sendall(SSL_REQUEST + b"\x00\x00\x00\x08junk")   # bytes sent before the 'S'
    started = time.monotonic()
    assert _closed_within(garbage, 5)
    cur.execute("SELECT 1")
    assert cur.fetchone() == (1,)
    assert _closed_within(plaintext_after, 5)
    assert _closed_within(stalled, 10)
    assert 1.5 < time.monotonic() - started < 10
    cur.execute("SELECT 2")
    assert cur.fetchone() == (2,)
    good.close()
    wait_until(lambda: "TLS handshake error" in b.log_text(), timeout=5, message="handshake errors logged")
    assert_quiet_log(b)
    assert b.is_running()


# --- RELOAD ------------------------------------------------------------------------------

def test_reload_new_certificate_for_new_handshakes(tls_files, bouncer, shared_tmp):
    cert, key = shared_tmp / "live.crt", shared_tmp / "live.key"
    shutil.copy(tls_files.cert("bouncer"), cert)
    shutil.copy(tls_files.key("bouncer"), key)
    settings = tls_settings(tls_files, client_tls_cert_file=str(cert), client_tls_key_file=str(key))
    b = bouncer(pgbouncer=settings)
    kept = psycopg2.connect(b.dsn(**verify_full(tls_files, b)))
    kept.autocommit = True
    # A broken key at RELOAD: refused (PgBouncer's line), the old files keep serving.
    key.write_text("not a key\n")
    b.reload()
    wait_until(lambda: "TLS configuration could not be reloaded, keeping old configuration" in b.log_text(),
               timeout=10, message="reload refused")
    if TARGET == "pgbouncer":
        assert f'failed to load private key file "{key}"' in b.log_text()
    else:
        assert "config reload failed" in b.log_text() and "client_tls_key_file" in b.log_text()
    assert psql(b.dsn(**verify_full(tls_files, b)), "SELECT 1").stdout.strip() == "1"
    # A new certificate (for another name): new handshakes get it, the open connection goes on.
    shutil.copy(tls_files.cert("wrongname"), cert)
    shutil.copy(tls_files.key("wrongname"), key)
    b.admin("RELOAD")      # answers once reloaded (PgBouncer logs nothing when a SIGHUP reload is done)
    out = psql(b.dsn(**verify_full(tls_files, b)), "SELECT 1")
    assert out.returncode != 0 and "does not match host name" in out.stderr, out.stderr
    with kept.cursor() as cur:
        cur.execute("SELECT 5")
        assert cur.fetchone() == (5,)
    kept.close()


# --- direct TLS (PostgreSQL 17's sslnegotiation=direct) ------------------------------------

@pytest.mark.geobouncer_only("direct TLS (PostgreSQL 17's sslnegotiation=direct; PgBouncer 1.25)")
def test_direct_tls_with_alpn(tls_files, bouncer):
    b = bouncer(pgbouncer=tls_settings(tls_files))
    assert psycopg.pq.version() >= 170000, "libpq 17+ needed for sslnegotiation=direct"
    with psycopg.connect(b.dsn(**verify_full(tls_files, b, sslnegotiation="direct"))) as conn:
        assert conn.execute("SELECT 3").fetchone() == (3,)
        assert conn.pgconn.ssl_in_use
    # Direct TLS without ALPN postgresql is refused, as PostgreSQL does.
    ctx = ssl.create_default_context(cafile=tls_files.path("ca.pem"))
    raw = ctx.wrap_socket(socket.create_connection((b.host, b.port), timeout=10), server_hostname="localhost")
    assert _closed_within(raw, 5)
    wait_until(lambda: "without ALPN" in b.log_text(), timeout=5, message="refusal logged")
    # ... and an ALPN client goes on to the startup packet.
    ctx.set_alpn_protocols(["postgresql"])
    raw = ctx.wrap_socket(socket.create_connection((b.host, b.port), timeout=10), server_hostname="localhost")
    body = struct.pack("!I", 196608) + b"user\0app\0database\0app\0\0"
    raw.sendall(struct.pack("!I", len(body) + 4) + body)
    assert raw.recv(1) == b"R"          # an authentication request
    raw.close()
    assert_quiet_log(b)


# --- pgjdbc and node-postgres ---------------------------------------------------------------

NODE_CHECK = """
const { Client } = require(process.argv[2]);
const fs = require('fs');
const client = new Client({host: '127.0.0.1', port: Number(process.argv[3]), user: 'app',
  password: 'app_pw', database: 'app',
  ssl: {ca: fs.readFileSync(process.argv[4]), servername: 'localhost'}});   // name and chain checked
client.connect()
  .then(() => client.query('SELECT 8 AS n'))
  .then((res) => { console.log('OK ' + res.rows[0].n); return client.end(); })
  .catch((err) => { console.log('FAIL ' + err.message); process.exit(1); });
"""

JDBC_CHECK = """
import java.sql.*;
public class TlsCheck {
    public static void main(String[] args) throws Exception {
        try (Connection c = DriverManager.getConnection(args[0], "app", "app_pw");
             Statement s = c.createStatement(); ResultSet r = s.executeQuery("SELECT 9")) {
            r.next();
            System.out.println("OK " + r.getInt(1));
        }
    }
}
"""


def test_node_postgres_and_pgjdbc_verify_full(tls_files, bouncer, tmp_path):
    repo = Path(__file__).resolve().parents[2]
    node_pg = repo / "tests" / "clients" / "node_modules" / "pg"
    assert node_pg.exists(), "run scripts/install-client-deps to install node-postgres"
    b = bouncer(pgbouncer=tls_settings(tls_files, ignore_startup_parameters="extra_float_digits"))
    script = tmp_path / "check.js"
    script.write_text(NODE_CHECK)
    out = subprocess.run(["node", str(script), str(node_pg), str(b.port), tls_files.path("ca.pem")],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "OK 8", out.stdout + out.stderr
    java = tmp_path / "TlsCheck.java"
    java.write_text(JDBC_CHECK)
    url = (f"jdbc:postgresql://localhost:{b.port}/app?sslmode=verify-full"
           f"&sslrootcert={tls_files.path('ca.pem')}")
    out = subprocess.run(["java", "-cp", "/usr/share/java/postgresql.jar", str(java), url],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "OK 9", out.stdout + out.stderr
    assert b.log_text().count("tls=TLSv1.") >= 2


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_idle_tls_clients_park_and_resume(tls_files, bouncer, mode):
    """An idle client gives up its greenlet after a second (net/client.py); a TLS
    client's socket is woken the same way, and its session goes on."""
    # Session pooling keeps a server per client; transaction pooling shares two.
    b = bouncer(pgbouncer=tls_settings(tls_files, pool_mode=mode,
                                       default_pool_size=4 if mode == "session" else 2))
    conns = [psycopg2.connect(b.dsn(**verify_full(tls_files, b))) for _ in range(4)]
    try:
        for rnd in range(2):
            time.sleep(2.5)        # longer than the janitor's PARK_AFTER
            for i, conn in enumerate(conns):
                with conn.cursor() as cur:
                    cur.execute("SELECT %s, repeat('x', 100000)", (i + rnd,))
                    value, blob = cur.fetchone()
                    assert value == i + rnd and len(blob) == 100000
                conn.commit()
    finally:
        for conn in conns:
            conn.close()
    assert_quiet_log(b)
