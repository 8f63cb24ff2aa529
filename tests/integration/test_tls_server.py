"""TLS towards servers: server_tls_sslmode against a PostgreSQL with ``ssl = on``
whose pg_hba.conf rejects plaintext TCP (``pg_tls``), so every query that works
proves the pooler used TLS; certificate checks (wrong CA, expired, wrong host
name), the pooler's client certificate, cancel requests over TLS, pgbench over
TLS on both sides, and RELOAD reconnecting servers only when their TLS changed.

Against PgBouncer 1.18 the same, but: its TLS library words the certificate
errors otherwise, it sends cancel requests in plaintext, it reconnects every
server at each RELOAD while server TLS is on, and a missing key file is no
start-up error.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time

import psycopg2
import pytest
from fixtures.bouncer import TARGET
from fixtures.pg import TLS_ONLY_HBA, enable_tls
from fixtures.ports import wait_until

SSL_REQUEST = struct.pack("!II", 8, 80877103)
CANCEL_REQUEST_HEAD = struct.pack("!II", 16, 80877102)
SSL_CHECK = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


def server_tls(files, mode="verify-full", **extra):
    return {"server_tls_sslmode": mode, "server_tls_ca_file": files.path("ca.pem"), "auth_type": "md5",
            **extra}


def idle_servers(b) -> int:
    return sum(int(r.sv_idle) for r in b.admin("SHOW POOLS") if r.database == "app")


def one(b, sql, **kw):
    conn = b.connect(autocommit=True, **kw)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()[0]
    finally:
        conn.close()


def fails(b, **kw) -> str:
    with pytest.raises(psycopg2.Error) as err:
        one(b, "SELECT 1", **kw)
    return str(err.value)


def test_verify_full_against_tls_only_server(pg_tls, tls_files, bouncer):
    b = bouncer(databases={"app": pg_tls.conninfo("app")}, pgbouncer=server_tls(tls_files))
    assert one(b, SSL_CHECK) is True
    shown = [r.tls for r in b.admin("SHOW SERVERS") if r.database == "app"]
    assert shown and shown[0].startswith("TLSv1.3/TLS_"), shown
    assert "SSL established: TLSv1.3/" in b.log_text()


@pytest.mark.geobouncer_only("server_tls_sslmode defaulting to prefer (PgBouncer 1.20, #866; 1.18: disable)")
def test_default_prefer_uses_tls_when_offered_and_plain_otherwise(pg, pg_tls, bouncer):
    b = bouncer(databases={"app": pg_tls.conninfo("app"), "plain": pg.conninfo("app")},
                pgbouncer={"auth_type": "md5"})
    assert one(b, SSL_CHECK) is True
    assert one(b, SSL_CHECK, dbname="plain") is False
    tls_col = {r.database: r.tls for r in b.admin("SHOW SERVERS")}
    assert tls_col["app"].startswith("TLSv1.") and tls_col["plain"] == ""   # as PgBouncer


def test_require_never_falls_back(pg, tls_files, bouncer):
    b = bouncer(pgbouncer=server_tls(tls_files, mode="require"))
    fails(b)
    wait_until(lambda: "server refused SSL" in b.log_text() or "server refused SSL" in b.output_text(),
               timeout=5, message="refusal logged")
    assert pg.backends(dbname="app", user="app") == 0


def test_server_certificate_checks(make_pg, tls_files, bouncer):
    pg = make_pg(name="tlscheck")
    enable_tls(pg, tls_files, cert="wrongname")
    entry = {"app": pg.conninfo("app")}
    # The name is checked under verify-full only; the chain under verify-ca too.
    full = bouncer(databases=entry, pgbouncer=server_tls(tls_files, mode="verify-full"))
    fails(full)
    if TARGET == "pgbouncer":      # libtls's words
        wait_until(lambda: "name `127.0.0.1' not present in server certificate" in full.log_text(),
                   timeout=5, message="verify-full failure logged")
    else:
        wait_until(lambda: "certificate verify failed" in full.log_text() or "mismatch" in full.log_text(),
                   timeout=5, message="verify-full failure logged")
        assert "Hostname mismatch" in full.log_text() or "IP address mismatch" in full.log_text()
    ca_only = bouncer(databases=entry, pgbouncer=server_tls(tls_files, mode="verify-ca"))
    assert one(ca_only, SSL_CHECK) is True
    # Another CA.
    other = bouncer(databases=entry, pgbouncer=server_tls(
        tls_files, mode="verify-ca", server_tls_ca_file=tls_files.path("other_ca.pem")))
    fails(other)
    # An expired certificate.
    enable_tls(pg, tls_files, cert="expired")
    expired = bouncer(databases=entry, pgbouncer=server_tls(tls_files, mode="verify-ca"))
    fails(expired)
    reason = "certificate verify failed" if TARGET == "pgbouncer" else "certificate has expired"
    wait_until(lambda: reason in expired.log_text(), timeout=5, message="expiry logged")
    # require checks nothing: it still works, and over TLS.
    plain_check = bouncer(databases=entry, pgbouncer=server_tls(tls_files, mode="require"))
    assert one(plain_check, SSL_CHECK) is True


def test_pooler_presents_its_client_certificate(make_pg, tls_files, bouncer):
    pg = make_pg(name="tlscert")
    enable_tls(pg, tls_files)
    pg._write_owned(pg.datadir / "pg_hba.conf", "hostssl all app 127.0.0.1/32 cert\n" + TLS_ONLY_HBA)
    pg.reload()
    entry = {"app": pg.conninfo("app")}
    without = bouncer(databases=entry, pgbouncer=server_tls(tls_files))
    assert "certificate" in fails(without)
    b = bouncer(databases=entry, pgbouncer=server_tls(
        tls_files, server_tls_cert_file=tls_files.cert("client_app"),
        server_tls_key_file=tls_files.key("client_app")))
    assert one(b, "SELECT current_user") == "app"


class SniffingTunnel:
    """A TCP tunnel to ``target_port`` that records the first bytes each
    connection sends (threads: the test process is plain blocking Python)."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.firsts: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if record:
                    self.firsts.append(data[:8])
                    record = False
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self.listener.close()


def test_cancel_request_goes_over_tls(pg_tls, tls_files, bouncer):
    tunnel = SniffingTunnel(pg_tls.port)
    try:
        b = bouncer(databases={"app": dict(host="127.0.0.1", port=tunnel.port, dbname="app")},
                    pgbouncer=server_tls(tls_files, mode="verify-ca"))
        assert one(b, SSL_CHECK) is True
        # psql in its own process sends the CancelRequest on SIGINT (the tunnel's
        # threads need this process's GIL, which a blocked in-process client may hold).
        started = time.monotonic()
        sleeper = subprocess.Popen(["psql", b.dsn(), "-XAtc", "SELECT pg_sleep(20)"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: pg_tls.psql("SELECT count(*) FROM pg_stat_activity WHERE query = "
                                       "'SELECT pg_sleep(20)' AND state = 'active'")[0][0] == 1,
                   timeout=10, message="the query runs")
        sleeper.send_signal(signal.SIGINT)
        _, err = sleeper.communicate(timeout=15)
        assert "canceling statement due to user request" in err, err
        assert time.monotonic() - started < 15
        # Every connection the pooler opened, the cancel one included, began with an SSLRequest;
        # PgBouncer (1.18, and its current source) sends the CancelRequest in plaintext at once.
        firsts = list(tunnel.firsts)
        assert len(firsts) >= 2, firsts
        if TARGET == "pgbouncer":
            assert CANCEL_REQUEST_HEAD in firsts, firsts
            firsts.remove(CANCEL_REQUEST_HEAD)
        assert all(first == SSL_REQUEST for first in firsts), tunnel.firsts
    finally:
        tunnel.stop()


def test_pgbench_tls_both_sides_transaction_pooling(pg_tls, tls_files, bouncer):
    settings = {
        **server_tls(tls_files),
        "client_tls_sslmode": "require", "client_tls_key_file": tls_files.key("bouncer"),
        "client_tls_cert_file": tls_files.cert("bouncer"),
        "pool_mode": "transaction", "default_pool_size": 4, "max_client_conn": 50,
        "ignore_startup_parameters": "extra_float_digits",
    }
    b = bouncer(databases={"app": pg_tls.conninfo("app")}, pgbouncer=settings)
    env = {**os.environ, "PGPASSWORD": "postgres_pw", "PGSSLMODE": "verify-full",
           "PGSSLROOTCERT": tls_files.path("ca.pem")}
    init = subprocess.run(["pgbench", "-i", "-s", "1", "-q", "-h", "127.0.0.1", "-p", str(pg_tls.port),
                           "-U", "postgres", "app"], env={**env, "PGSSLMODE": "require"},
                          capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    pg_tls.psql("GRANT ALL ON ALL TABLES IN SCHEMA public TO app", dbname="app")
    run = subprocess.run(["pgbench", "-n", "-c", "8", "-j", "2", "-t", "100",
                          f"host=localhost hostaddr=127.0.0.1 port={b.port} dbname=app user=app"],
                         env={**env, "PGPASSWORD": "app_pw"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"number of transactions actually processed: 800/800", run.stdout), run.stdout
    assert re.search(r"number of failed transactions: 0 ", run.stdout), run.stdout
    assert "Traceback" not in b.log_text()


def test_reload_reconnects_servers_only_when_their_tls_changed(pg_tls, tls_files, bouncer):
    settings = server_tls(tls_files, mode="verify-ca")
    b = bouncer(databases={"app": pg_tls.conninfo("app")}, pgbouncer=settings)
    first = one(b, "SELECT pg_backend_pid()")
    # Session pooling: the server comes back after its reset query; a client
    # arriving before that would get a new server, TLS settings or not.
    wait_until(lambda: idle_servers(b) == 1, timeout=10, message="the server back in the pool")
    b.rewrite(pgbouncer={**settings, "server_check_delay": 31}, reload=False)       # not a TLS setting
    b.admin("RELOAD")                                                               # answers once reloaded
    kept = one(b, "SELECT pg_backend_pid()")
    # PgBouncer 1.18 reconnects every server at each RELOAD while server TLS is on (1.24 no longer, #1157).
    assert (kept == first) is (TARGET != "pgbouncer")
    wait_until(lambda: idle_servers(b) == 1, timeout=10, message="the server back in the pool")
    b.rewrite(pgbouncer={**settings, "server_tls_sslmode": "verify-full"}, reload=False)
    b.admin("RELOAD")
    assert one(b, "SELECT pg_backend_pid()") != kept
    assert one(b, SSL_CHECK) is True


def test_bad_tls_reload_keeps_the_old_config(pg_tls, tls_files, bouncer, tmp_path):
    settings = server_tls(tls_files, mode="verify-ca")
    b = bouncer(databases={"app": pg_tls.conninfo("app")}, pgbouncer=settings)
    assert one(b, SSL_CHECK) is True
    b.rewrite(pgbouncer={**settings, "server_tls_protocols": "tlsv9"})
    wait_until(lambda: "TLS configuration could not be reloaded, keeping old configuration" in b.log_text(),
               timeout=10, message="reload refused")
    line = next(i for i, text in enumerate(b.ini_path.read_text().splitlines(), 1)
                if text.startswith("server_tls_protocols"))
    if TARGET == "pgbouncer":
        assert "invalid server_tls_protocols: tlsv9" in b.log_text()
    else:
        assert f"{b.ini_path}:{line}: server_tls_protocols: invalid server_tls_protocols" in b.log_text()
    assert one(b, SSL_CHECK) is True
    if TARGET == "pgbouncer":
        return      # 1.18 starts with a missing key file, and fails each server login with it instead
    # At start: a config error naming the file, the line and the key; the process exits.
    missing = str(tmp_path / "nope.key")
    with pytest.raises(RuntimeError) as err:
        bouncer(databases={"app": pg_tls.conninfo("app")}, pgbouncer={
            **settings, "server_tls_cert_file": tls_files.cert("client_app"), "server_tls_key_file": missing})
    assert re.search(r"geobouncer\.ini:\d+: server_tls_key_file: cannot read", str(err.value)), str(err.value)


@pytest.mark.geobouncer_only("replicas, the read/write split and their health checks")
def test_replicas_and_health_checks_over_tls(pg_tls, make_replica, tls_files, bouncer):
    replica = make_replica(pg_tls, name="tlsreplica")     # same certificate, same TLS-only pg_hba.conf
    entry = (f"host=127.0.0.1 port={pg_tls.port} dbname=app read_write_split=1 "
             f"replicas=127.0.0.1:{replica.port}")
    b = bouncer(databases={"app": entry}, pgbouncer={**server_tls(tls_files), "pool_mode": "transaction",
                                                     "health_check_period": 0.5})
    conn = b.connect(autocommit=True)
    seen = set()
    try:
        with conn.cursor() as cur:
            for _ in range(40):
                cur.execute("SELECT pg_is_in_recovery(), ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                seen.add(cur.fetchone())
                if (True, True) in seen:
                    break
                time.sleep(0.1)
            cur.execute("CREATE TEMP TABLE IF NOT EXISTS w (x int)")
    finally:
        conn.close()
    assert (True, True) in seen, seen       # a read ran on the replica, over TLS
    # The health checks (probe connections) log in over TLS too: a plaintext one would be
    # rejected by pg_hba.conf and ban the replica.
    wait_until(lambda: f"replica app@127.0.0.1:{replica.port} in rotation" in b.log_text() or
               b.log_text().count("SSL established") >= 3, timeout=10, message="health checks ran")
    assert "banned" not in b.log_text(), b.log_text()[-3000:]
