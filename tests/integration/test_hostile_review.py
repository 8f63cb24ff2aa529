"""Hostile review of TLS, metrics and peers: what an attacker or a bad network
does, against real processes. Each test ends by checking that the pooler is
alive, still serves a good client, and logged no traceback.

geobouncer only (metrics and peers are geobouncer's; the TLS checks read its log).
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time

import psycopg2
import pytest
from fixtures.bouncer import TARGET
from fixtures.ports import free_port, wait_until

pytestmark = pytest.mark.skipif(TARGET != "geobouncer", reason="reads geobouncer's log and features")

SSL_REQUEST = struct.pack("!II", 8, 80877103)
CANCEL_CODE = 80877102


def tls_settings(files, **extra):
    return {"client_tls_sslmode": "require", "client_tls_key_file": files.key("bouncer"),
            "client_tls_cert_file": files.cert("bouncer"), "client_tls_ca_file": files.path("ca.pem"),
            "auth_type": "trust", **extra}


def startup(user="app", db="app") -> bytes:
    body = struct.pack("!I", 196608) + f"user\0{user}\0database\0{db}\0\0".encode()
    return struct.pack("!I", len(body) + 4) + body


def query(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


def assert_healthy(b) -> None:
    assert b.is_running(), b.diagnostics()
    for text in (b.log_text(), b.output_text()):      # the logfile, and stderr (gevent's own reports)
        assert "Traceback" not in text and "internal error" not in text, text[-4000:]


def good_query(b, files=None) -> None:
    kw = dict(sslmode="require") if files else {}
    conn = psycopg2.connect(b.dsn(**kw), connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 41 + 1")
            assert cur.fetchone() == (42,)
    finally:
        conn.close()


def closed_within(sock, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except socket.timeout:
        return False
    except (OSError, ssl.SSLError):
        pass
    return True


def read_until_z(sock, limit=1 << 20) -> bytes:
    buf = b""
    while b"Z\x00\x00\x00\x05" not in buf and len(buf) < limit:
        data = sock.recv(65536)
        if not data:
            break
        buf += data
    return buf


def _client_ctx():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --- TLS -----------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_client_hello_split_byte_by_byte_still_logs_in(tls_files, bouncer):
    b = bouncer(pgbouncer=tls_settings(tls_files))
    sock = socket.create_connection((b.host, b.port), timeout=10)
    sock.sendall(SSL_REQUEST)
    assert sock.recv(1) == b"S"
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = _client_ctx().wrap_bio(incoming, outgoing)
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            for byte in outgoing.read():
                sock.sendall(bytes([byte]))
            data = sock.recv(65536)
            assert data, "closed during the handshake"
            incoming.write(data)
    pending = outgoing.read()
    if pending:
        sock.sendall(pending)
    obj.write(startup())
    sock.sendall(outgoing.read())
    got = b""
    while b"Z" not in got:
        data = sock.recv(65536)
        assert data
        incoming.write(data)
        try:
            got += obj.read(65536)
        except ssl.SSLWantReadError:
            pass
    assert got[:1] == b"R"
    sock.close()
    assert_healthy(b)


@pytest.mark.timeout(60)
def test_ssl_request_twice_garbage_after_s_and_after_login(tls_files, bouncer):
    b = bouncer(pgbouncer=tls_settings(tls_files, client_login_timeout=3))
    ctx = _client_ctx()
    # an SSLRequest inside TLS
    raw = socket.create_connection((b.host, b.port), timeout=10)
    raw.sendall(SSL_REQUEST)
    assert raw.recv(1) == b"S"
    tls = ctx.wrap_socket(raw)
    tls.sendall(SSL_REQUEST)
    assert closed_within(tls, 5)
    # garbage after 'S' (not a ClientHello)
    raw = socket.create_connection((b.host, b.port), timeout=10)
    raw.sendall(SSL_REQUEST)
    assert raw.recv(1) == b"S"
    raw.sendall(b"\x00" * 5 + b"\xff" * 4000)
    assert closed_within(raw, 5)
    # an SSLRequest after login, as a regular message stream: an error, then closed
    raw = socket.create_connection((b.host, b.port), timeout=10)
    raw.sendall(SSL_REQUEST)
    assert raw.recv(1) == b"S"
    tls = ctx.wrap_socket(raw)
    tls.sendall(startup())
    assert read_until_z(tls).startswith(b"R")
    tls.sendall(SSL_REQUEST)
    assert closed_within(tls, 5)
    # direct TLS ClientHello without ALPN, byte-wise junk record header
    raw = socket.create_connection((b.host, b.port), timeout=10)
    raw.sendall(b"\x16\x03\x01\x00\x05hello")
    assert closed_within(raw, 5)
    good_query(b, tls_files)
    assert_healthy(b)


@pytest.mark.timeout(60)
def test_half_open_handshakes_cost_only_themselves(tls_files, bouncer):
    b = bouncer(pgbouncer=tls_settings(tls_files, client_login_timeout=3, max_client_conn=1000))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = _client_ctx().wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    stalled = []
    for i in range(300):
        s = socket.create_connection((b.host, b.port), timeout=10)
        s.sendall(SSL_REQUEST + (hello[: 1 + i % (len(hello) - 1)] if i % 3 else b""))
        stalled.append(s)
    started = time.monotonic()
    for _ in range(5):
        good_query(b, tls_files)
    assert time.monotonic() - started < 10
    # all stalled ones are cut by client_login_timeout
    deadline = time.monotonic() + 15
    for s in stalled:
        assert closed_within(s, max(0.1, deadline - time.monotonic()))
        s.close()
    good_query(b, tls_files)
    assert_healthy(b)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("server_side", ["plain", "tls"])
def test_many_tls_clients_leave_mid_large_result_together(tls_files, bouncer, request, server_side):
    settings = tls_settings(tls_files, pool_mode="transaction", default_pool_size=30, max_client_conn=200)
    if server_side == "tls":         # TLS to PostgreSQL too: the server sockets are SSL sockets
        pg_tls = request.getfixturevalue("pg_tls")
        settings.update(server_tls_sslmode="verify-full", server_tls_ca_file=tls_files.path("ca.pem"))
        b = bouncer(databases={"app": pg_tls.conninfo("app")}, pgbouncer=settings)
    else:
        b = bouncer(pgbouncer=settings)
    ctx = _client_ctx()
    big = query("SELECT repeat('x', 2000) FROM generate_series(1, 20000)")
    socks = []
    for _ in range(30):
        raw = socket.create_connection((b.host, b.port), timeout=15)
        raw.sendall(SSL_REQUEST)
        assert raw.recv(1) == b"S"
        tls = ctx.wrap_socket(raw)
        tls.sendall(startup())
        assert read_until_z(tls).startswith(b"R")
        socks.append(tls)
    for s in socks:
        s.sendall(big)
    for s in socks:
        s.recv(16384)
    for i, s in enumerate(socks):
        if i % 2:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # RST
        s.close()
    time.sleep(1)
    for _ in range(5):
        good_query(b, tls_files)
    wait_until(lambda: all(r.cl_active == 0 for r in b.admin("SHOW POOLS") if r.database == "app"),
               timeout=20, message="clients gone")
    assert_healthy(b)


# --- metrics -------------------------------------------------------------------------------

def _http(port: int, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        return out


@pytest.mark.timeout(60)
def test_metrics_odd_requests(bouncer):
    port = free_port()
    b = bouncer(pgbouncer={"metrics_port": port, "metrics_listen_addr": "127.0.0.1",
                           "metrics_request_timeout": 3})
    wait_until(lambda: _http(port, b"GET /healthz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200"),
               timeout=10, message="metrics up")
    odd = [
        b"GET /../../etc/passwd HTTP/1.0\r\n\r\n",
        b"GET /metrics/../metrics HTTP/1.0\r\n\r\n",
        b"DELETE /metrics HTTP/1.0\r\n\r\n",
        b"BREW /metrics HTTP/1.0\r\n\r\n",
        b"GET /metrics?name[]=pgbouncer_up&name[]=%ff HTTP/1.0\r\n\r\n",
        b"GET /metrics HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n",
        b"GET /" + b"a" * 100000 + b" HTTP/1.0\r\n\r\n",
        b"GET /metrics HTTP/1.0\r\n" + b"X: " + b"y" * 200000 + b"\r\n\r\n",
        b"GET /metrics HTTP/1.0\r\n" + b"X: y\r\n" * 5000 + b"\r\n",
        b"POST /metrics HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\nabc",
        b"POST /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
        b"\x16\x03\x01\x00\x05hello",
        b"GET /metrics HTTP/9.9\r\n\r\n",
        b"\r\n\r\n",
    ]
    errors, done = [], []

    def send(req):
        try:
            _http(port, req)
            done.append(req)
        except Exception as exc:  # noqa: BLE001 -- reported below, as the serial loop would
            errors.append((req[:40], exc))

    threads = [threading.Thread(target=send, args=(req,), daemon=True) for req in odd]
    for t in threads:       # at once: the stalled ones each wait out the request timeout
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len(done) == len(odd)
    assert b"etc" not in _http(port, b"GET /../../etc/passwd HTTP/1.0\r\n\r\n").split(b"\r\n\r\n", 1)[-1]
    assert _http(port, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200")
    good_query(b)
    assert_healthy(b)


@pytest.mark.timeout(60)
def test_metrics_connection_flood_does_not_delay_queries(bouncer):
    port = free_port()
    b = bouncer(pgbouncer={"metrics_port": port, "metrics_listen_addr": "127.0.0.1",
                           "metrics_request_timeout": 3})
    wait_until(lambda: _http(port, b"GET /healthz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200"),
               timeout=10, message="metrics up")
    flood = []
    for i in range(150):     # more than the 32 handlers plus the backlog of 64
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=0.3)
        except OSError:
            continue
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"[: i % 30])
        flood.append(s)
    started = time.monotonic()
    for _ in range(5):
        good_query(b)
    assert time.monotonic() - started < 5
    for s in flood:
        s.close()
    wait_until(lambda: _http(port, b"GET /healthz HTTP/1.0\r\n\r\n", timeout=3).startswith(b"HTTP/1.1 200"),
               timeout=30, message="metrics back after the flood")
    assert_healthy(b)


@pytest.mark.timeout(60)
def test_scrape_while_pools_churn(pg, bouncer):
    port = free_port()
    b = bouncer(pgbouncer={"metrics_port": port, "metrics_listen_addr": "127.0.0.1",
                           "pool_mode": "transaction", "auth_type": "md5"})
    wait_until(lambda: _http(port, b"GET /healthz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200"),
               timeout=10, message="metrics up")
    stop = threading.Event()
    errors = []

    def churn():
        while not stop.is_set():
            try:
                c = b.connect("app", "app", autocommit=True)
                c.cursor().execute("SELECT 1")
                c.close()
                b.admin("RELOAD")
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

    threads = [threading.Thread(target=churn, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(30):
            assert _http(port, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors[:3]
    assert_healthy(b)


# --- peers ---------------------------------------------------------------------------------

def _cancel(port: int, pid: int, key: int, timeout: float = 20) -> float:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(struct.pack("!IIII", 16, CANCEL_CODE, pid, key))
        try:
            s.recv(1)
        except ConnectionResetError:
            pass
    return time.monotonic() - started


def _key(peer: int, ttl: int) -> tuple[int, int]:
    pid = (0x11 << 24) | ((peer & 0xFF) << 16) | (((peer >> 8) & 0xFF) << 8) | 0x22
    return pid, (0x33445500 | ttl)


@pytest.mark.timeout(60)
def test_forged_cancels_every_peer_and_ttl_and_a_black_hole_peer(bouncer):
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(1024)     # accepts (the kernel does) and never reads
    extra = f"[peers]\n2 = host=127.0.0.1 port={hole.getsockname()[1]} pool_size=2\n"
    b = bouncer(pgbouncer={"peer_id": 1, "cancel_wait_timeout": 2,
                           "client_login_timeout": 5},
                extra_ini=extra)
    port = b.port
    try:
        for peer in (0, 1, 2, 3, 255, 256, 65535):
            for ttl in range(4):
                assert _cancel(port, *_key(peer, ttl)) < 10
        # a flood for the black-hole peer: bounded by pool_size and cancel_wait_timeout
        results = []
        threads = [threading.Thread(target=lambda: results.append(_cancel(port, *_key(2, 3))))
                   for _ in range(40)]
        started = time.monotonic()
        for t in threads:
            t.start()
        good_query(b)
        assert time.monotonic() - started < 5
        for t in threads:
            t.join(30)
        assert len(results) == 40
        assert max(results) < 10, max(results)
        good_query(b)
        assert_healthy(b)
    finally:
        hole.close()


# --- cert and hba ----------------------------------------------------------------------------

def _cert_login(b, files, crt: str, key: str, user: str) -> bytes:
    sock = socket.create_connection((b.host, b.port), timeout=10)
    sock.sendall(SSL_REQUEST)
    assert sock.recv(1) == b"S"
    ctx = ssl.create_default_context(cafile=files.path("ca.pem"))
    ctx.load_cert_chain(crt, key)
    sock = ctx.wrap_socket(sock, server_hostname="localhost")
    sock.sendall(startup(user=user))
    data = read_until_z(sock)
    sock.close()
    return data


@pytest.mark.timeout(60)
def test_odd_certificate_common_names_under_auth_type_cert(tls_files, bouncer, tmp_path):
    b = bouncer(pgbouncer={"auth_type": "cert", "client_tls_sslmode": "verify-full",
                           "client_tls_key_file": tls_files.key("bouncer"),
                           "client_tls_cert_file": tls_files.cert("bouncer"),
                           "client_tls_ca_file": tls_files.path("ca.pem"), "log_pooler_errors": 1})
    forged = "app\n2026-01-01 00:00:00.000 UTC [1] LOG forged line"
    for i, cn in enumerate(["app\0evil", "app ", "ａｐｐ", forged, "%s%n%x", "x" * 64]):
        leaf = tls_files.ca.issue_cert(f"odd{i}.client.test", common_name=cn)
        crt, key = tmp_path / f"odd{i}.crt", tmp_path / f"odd{i}.key"
        crt.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        data = _cert_login(b, tls_files, str(crt), str(key), "app")
        # PgBouncer's refusal: 08P01 "certificate authentication failed", whatever the CN
        assert data[:1] == b"E" and b"C08P01\0" in data and b"Mcertificate authentication failed\0" in data, \
            (cn, data[:80])
    wait_until(lambda: b.log_text().count("TLS certificate name mismatch") >= 6 or
               b.log_text().count("is not user") >= 6, timeout=10, message="refusals logged")
    # a CN cannot write a line of its own into the log
    assert not any(line.startswith("2026-01-01") for line in b.log_text().splitlines()), b.log_text()[-2000:]
    assert_healthy(b)


@pytest.mark.timeout(60)
def test_hba_at_file_removed_before_reload_keeps_the_old_rules(bouncer, tmp_path):
    (tmp_path / "users").write_text("app\n")
    (tmp_path / "hba.conf").write_text("host all @users 0.0.0.0/0 md5\nhost all all ::/0 reject\n")
    b = bouncer(pgbouncer={"auth_type": "hba", "auth_hba_file": str(tmp_path / "hba.conf")})
    good_query(b)
    (tmp_path / "users").unlink()
    b.reload()
    wait_until(lambda: "config reload failed" in b.log_text(), timeout=10, message="reload refused")
    good_query(b)
    assert_healthy(b)


@pytest.mark.timeout(60)
def test_user_name_and_application_name_cannot_forge_log_lines(bouncer):
    b = bouncer(pgbouncer={"auth_type": "md5", "log_pooler_errors": 1})
    forged = "2026-01-01 00:00:00.000 UTC [1] LOG forged line"
    for user, db in ((f"app\n{forged}", "app"), ("app", f"nodb\r\n{forged}")):
        sock = socket.create_connection((b.host, b.port), timeout=10)
        sock.sendall(startup(user=user, db=db))
        assert sock.recv(1) in (b"R", b"E")      # a password asked for, or refused
        sock.close()
    wait_until(lambda: b.log_text().count("forged line") >= 2, timeout=10, message="attempts logged")
    assert not any(line.startswith("2026-01-01") for line in b.log_text().splitlines()), b.log_text()[-2000:]
    good_query(b)
    assert_healthy(b)


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))


@pytest.mark.timeout(60)
def test_tls_client_that_never_reads_a_large_result_does_not_grow_memory(tls_files, bouncer):
    b = bouncer(pgbouncer=tls_settings(tls_files, pool_mode="transaction"))
    good_query(b, tls_files)
    base = _rss_kb(b.pid)
    raw = socket.create_connection((b.host, b.port), timeout=15)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.sendall(SSL_REQUEST)
    assert raw.recv(1) == b"S"
    tls = _client_ctx().wrap_socket(raw)
    tls.sendall(startup())
    assert read_until_z(tls).startswith(b"R")
    tls.sendall(query("SELECT repeat('x', 10000) FROM generate_series(1, 30000)"))   # 300 MB
    time.sleep(4)
    for _ in range(3):
        good_query(b, tls_files)
    grown = _rss_kb(b.pid) - base
    assert grown < 64 * 1024, f"RSS grew by {grown} kB for one client that does not read"
    tls.close()
    good_query(b, tls_files)
    assert_healthy(b)
