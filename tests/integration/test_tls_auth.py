"""auth_type = cert (the client certificate's CN is the user name) and
auth_type = hba (auth_hba_file, first matching line decides; hostssl,
hostnossl, reject, cert lines; auth_ident_file maps), through real clients.
Refusals are checked on the wire too, SQLSTATE and text, the same from both
targets: a refused certificate is "certificate authentication failed" and an
hba refusal (no line, or a reject line) "login rejected", both 08P01 as
PgBouncer sends them (its login_via_cert and finish_set_pool give no code of
their own); why is in the log. A wrong password is 28P01 from geobouncer
(following PgBouncer 1.19), 08P01 from 1.18: test_auth_e2e.py."""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess

import pytest
from fixtures.bouncer import TARGET
from fixtures.ports import wait_until

SSL_REQUEST = struct.pack("!II", 8, 80877103)
CERT_FAILED = "certificate authentication failed"
LOGIN_REJECTED = "login rejected"
REFUSED = "08P01"   # PgBouncer's code for both refusals, 1.18 as later


def password_refusal() -> str:
    # PgBouncer 1.18 says "SASL authentication failed" for a SCRAM login.
    return "authentication failed" if TARGET == "pgbouncer" else "password authentication failed"


def psql(dsn: str) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", dsn, "-XAtc", "SELECT current_user"], capture_output=True, text=True,
                          timeout=30)


def tls_dsn(files, b, user, cert=None, password=None, **kw):
    params = dict(sslmode="verify-full", sslrootcert=files.path("ca.pem"), host="localhost",
                  hostaddr="127.0.0.1", user=user, password=password)
    if cert:
        params.update(sslcert=files.cert(cert), sslkey=files.client_key(cert))
    params.update(kw)
    return b.dsn(**params)


def raw_login(b, user: str, files=None, cert: str | None = None) -> tuple[str, str]:
    """Log in by hand (TLS when ``files`` is given) -> (SQLSTATE, message) of the
    ErrorResponse the pooler answers with."""
    sock = socket.create_connection((b.host, b.port), timeout=10)
    if files is not None:
        sock.sendall(SSL_REQUEST)
        assert sock.recv(1) == b"S"
        ctx = ssl.create_default_context(cafile=files.path("ca.pem"))
        if cert:
            ctx.load_cert_chain(files.cert(cert), files.key(cert))
        sock = ctx.wrap_socket(sock, server_hostname="localhost")
    body = struct.pack("!I", 196608) + b"user\0" + user.encode() + b"\0database\0app\0\0"
    sock.sendall(struct.pack("!I", len(body) + 4) + body)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    assert data[:1] == b"E", data[:40]
    fields = dict((f[:1].decode(), f[1:].decode()) for f in data[5:].split(b"\0") if f)
    return fields["C"], fields["M"]


def cert_settings(files, **extra):
    return {"auth_type": "cert", "client_tls_sslmode": "verify-full",
            "client_tls_key_file": files.key("bouncer"), "client_tls_cert_file": files.cert("bouncer"),
            "client_tls_ca_file": files.path("ca.pem"), **extra}


def test_auth_type_cert(tls_files, bouncer):
    b = bouncer(pgbouncer=cert_settings(tls_files))
    out = psql(tls_dsn(tls_files, b, "app", cert="client_app"))
    assert out.returncode == 0 and out.stdout.strip() == "app", out.stderr
    # Another user's name with this certificate: refused, 08P01, PgBouncer's text; the log says why.
    out = psql(tls_dsn(tls_files, b, "md5_user", cert="client_app"))
    assert out.returncode != 0 and CERT_FAILED in out.stderr, out.stderr
    assert raw_login(b, "md5_user", tls_files, cert="client_app") == (REFUSED, CERT_FAILED)
    assert "TLS certificate name mismatch" in b.log_text()
    # No certificate: verify-full (which auth_type = cert requires, as PgBouncer) ends it in the handshake.
    out = psql(tls_dsn(tls_files, b, "app"))
    assert out.returncode != 0 and "certificate" in out.stderr, out.stderr
    # Plaintext: refused before authentication.
    out = psql(b.dsn(sslmode="disable"))
    assert out.returncode != 0 and "SSL required" in out.stderr


HBA = """\
# test rules: the first matching line decides
hostssl   app  app          127.0.0.1/32  scram-sha-256
hostssl   app  md5_user     127.0.0.1/32  cert
hostssl   app  scram_user   127.0.0.1     255.255.255.255  cert
hostnossl all  all          0.0.0.0/0     reject
host      app  @plainusers  127.0.0.1/32  md5
local     all  all                        trust
"""
# The cert line of scram_user with a user name map (PgBouncer 1.23's auth_ident_file).
MAPPED_HBA = HBA.replace("255.255.255.255  cert\n", "255.255.255.255  cert  map=certs\n")
IDENT = """\
certs   app             scram_user
certs   /^(other)$      \\1
"""


def hba_bouncer(files, bouncer, path, hba=HBA):
    """``path`` must be readable by PgBouncer as the test target (``shared_tmp``):
    it reads the files again at RELOAD, as the postgres OS user."""
    (path / "hba.conf").write_text(hba)
    (path / "plainusers").write_text("plain_user\n")
    return bouncer(pgbouncer=hba_settings(files, path))


def hba_settings(files, path):
    settings = {
        "auth_type": "hba", "auth_hba_file": str(path / "hba.conf"),
        "client_tls_sslmode": "prefer", "client_tls_key_file": files.key("bouncer"),
        "client_tls_cert_file": files.cert("bouncer"), "client_tls_ca_file": files.path("ca.pem")}
    if (path / "ident.conf").exists():
        settings["auth_ident_file"] = str(path / "ident.conf")
    return settings


def test_hba_rules(tls_files, bouncer, shared_tmp):
    b = hba_bouncer(tls_files, bouncer, shared_tmp)
    # hostssl + scram-sha-256: works over TLS with the password.
    out = psql(tls_dsn(tls_files, b, "app", password="app_pw"))
    assert out.stdout.strip() == "app", out.stderr
    # ... and the wrong password fails.
    out = psql(tls_dsn(tls_files, b, "app", password="nope"))
    assert out.returncode != 0 and password_refusal() in out.stderr, out.stderr
    # hostnossl ... reject: plaintext is refused, whoever it is.
    out = psql(b.dsn(sslmode="disable"))
    assert out.returncode != 0 and LOGIN_REJECTED in out.stderr, out.stderr
    assert raw_login(b, "app") == (REFUSED, LOGIN_REJECTED)
    assert TARGET == "pgbouncer" or "pg_hba.conf rejects connection for host" in b.log_text()
    assert TARGET == "pgbouncer" or 'user "app", database "app", no encryption' in b.log_text()
    # A cert line: the CN must be the user; no certificate is refused (08P01).
    out = psql(tls_dsn(tls_files, b, "md5_user", cert="client_md5_user"))
    assert out.stdout.strip() == "md5_user", out.stderr
    assert raw_login(b, "md5_user", tls_files, cert="client_app") == (REFUSED, CERT_FAILED)
    assert raw_login(b, "md5_user", tls_files) == (REFUSED, CERT_FAILED)
    log = b.log_text()
    assert "TLS certificate name mismatch" in log and "TLS client certificate required" in log
    # A cert line given as address and mask.
    out = psql(tls_dsn(tls_files, b, "scram_user", cert="client_scram_user"))
    assert out.stdout.strip() == "scram_user", out.stderr
    assert raw_login(b, "scram_user", tls_files, cert="client_app") == (REFUSED, CERT_FAILED)
    # No line for this user over TLS.
    assert raw_login(b, "trust_user", tls_files) == (REFUSED, LOGIN_REJECTED)
    no_line = 'no pg_hba.conf entry for host "127.0.0.1", user "trust_user"'
    assert TARGET == "pgbouncer" or no_line in b.log_text()
    # The Unix socket matches the local line.
    out = psql(b.dsn(host=str(b.workdir), user="trust_user", password=None))
    assert out.stdout.strip() == "trust_user", out.stderr
    assert "Traceback" not in b.log_text()


@pytest.mark.geobouncer_only("user name maps in auth_ident_file (PgBouncer 1.23)")
def test_hba_cert_line_with_ident_map(tls_files, bouncer, shared_tmp):
    (shared_tmp / "ident.conf").write_text(IDENT)
    b = hba_bouncer(tls_files, bouncer, shared_tmp, hba=MAPPED_HBA)
    # CN app may log in as scram_user, CN other as "other" only.
    out = psql(tls_dsn(tls_files, b, "scram_user", cert="client_app"))
    assert out.stdout.strip() == "scram_user", out.stderr
    assert raw_login(b, "scram_user", tls_files, cert="client_other") == (REFUSED, CERT_FAILED)
    # Without the map the CN is the user: CN scram_user is no longer enough.
    assert raw_login(b, "scram_user", tls_files, cert="client_scram_user") == (REFUSED, CERT_FAILED)
    assert "Traceback" not in b.log_text()


def test_bad_hba_file_is_a_config_error(tls_files, bouncer, shared_tmp):
    """A bad line is a config error, as PostgreSQL treats pg_hba.conf: RELOAD keeps
    the old rules, start-up fails. PgBouncer (since 1.8) skips the line with a
    warning instead, and applies the others."""
    b = hba_bouncer(tls_files, bouncer, shared_tmp)
    (shared_tmp / "hba.conf").write_text(HBA + "host all all 127.0.0.1/32 kerberos\n")
    b.reload()
    if TARGET == "pgbouncer":
        wait_until(lambda: "could not parse hba config line 8" in b.log_text(), timeout=10,
                   message="line skipped")
        assert "hba line 8: unsupported method" in b.log_text()
    else:
        wait_until(lambda: "config reload failed" in b.log_text(), timeout=10, message="reload refused")
        assert f"{shared_tmp / 'hba.conf'}:8: auth_hba_file: unsupported method 'kerberos'" in b.log_text()
    # The old rules (for PgBouncer: the good lines of the new file) still apply.
    assert psql(tls_dsn(tls_files, b, "app", password="app_pw")).stdout.strip() == "app"
    if TARGET == "pgbouncer":
        started = bouncer(pgbouncer=hba_settings(tls_files, shared_tmp))    # the same file, at start
        assert psql(tls_dsn(tls_files, started, "app", password="app_pw")).stdout.strip() == "app"
        return
    with pytest.raises(RuntimeError, match=r"hba\.conf:8: auth_hba_file: unsupported method"):
        bouncer(pgbouncer=hba_settings(tls_files, shared_tmp))    # the same file, at start


@pytest.mark.geobouncer_only("SCRAM channel binding for clients (SCRAM-SHA-256-PLUS; 1.18 offers "
                             "SCRAM-SHA-256 only)")
def test_scram_channel_binding_for_tls_clients(tls_files, bouncer):
    """SCRAM-SHA-256-PLUS (tls-server-end-point) is offered to TLS clients: libpq
    with channel_binding=require logs in over TLS and refuses a plaintext session."""
    import psycopg

    b = bouncer(pgbouncer={"auth_type": "scram-sha-256", "client_tls_sslmode": "prefer",
                           "client_tls_key_file": tls_files.key("bouncer"),
                           "client_tls_cert_file": tls_files.cert("bouncer")})
    with psycopg.connect(tls_dsn(tls_files, b, "app", password="app_pw", channel_binding="require")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app",)
    out = psql(tls_dsn(tls_files, b, "app", password="wrong", channel_binding="require"))
    assert out.returncode != 0 and "password authentication failed" in out.stderr, out.stderr
    out = psql(b.dsn(sslmode="disable", channel_binding="require"))
    assert out.returncode != 0 and "channel binding" in out.stderr, out.stderr
    # Plaintext SCRAM without binding still works.
    assert psql(b.dsn(sslmode="disable")).stdout.strip() == "app"


@pytest.mark.geobouncer_only("user name maps in auth_ident_file (PgBouncer 1.23)")
def test_hba_peer_with_ident_map(bouncer, tmp_path):
    """A local peer line: the OS user at the other end of the Unix socket
    (SO_PEERCRED), mapped through auth_ident_file."""
    import getpass
    me = getpass.getuser()
    (tmp_path / "hba.conf").write_text("local all all peer map=os\nhost all all 127.0.0.1/32 reject\n")
    (tmp_path / "ident.conf").write_text(f"os {me} trust_user\n")
    b = bouncer(pgbouncer={"auth_type": "hba", "auth_hba_file": str(tmp_path / "hba.conf"),
                           "auth_ident_file": str(tmp_path / "ident.conf")})
    out = psql(b.dsn(host=str(b.workdir), user="trust_user", password=None))
    assert out.stdout.strip() == "trust_user", out.stderr
    out = psql(b.dsn(host=str(b.workdir), user="app", password=None))
    assert out.returncode != 0 and 'Peer authentication failed for user "app"' in out.stderr, out.stderr
