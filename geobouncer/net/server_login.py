"""Opening a server connection and logging in to PostgreSQL (TLS as
server_tls_sslmode says, startup, authentication, ParameterStatus,
BackendKeyData); cancel requests. Functions over a ServerConnection
(net/server.py)."""

from __future__ import annotations

import logging
import os
import socket as pysocket
import sys

import gevent
from gevent import socket

from ..auth import AuthFailed, ServerAuthenticator
from ..proto import messages as m
from ..proto.framing import message_at
from . import server_reader, tls as tls_
from .fastio import sender
from .internal import ServerError
from .sockopts import tune_socket

log = logging.getLogger("geobouncer")

RECV_SIZE = 65536
_E, _S, _Z = (ord(c) for c in "ESZ")


def connect(server, startup: dict[str, str], password, scram_keys, timeout: float,
            tracked: frozenset, tls=None, tcp=None) -> None:
    """Open the socket (``tcp``: the settings for net/sockopts.py), start TLS
    (``tls``: the server side's net.tls_config.TlsSide) and log in. Raises
    ServerError or OSError."""
    with gevent.Timeout(timeout or None, ServerError("08006", "server connect timeout")):
        server.sock = _open_socket(server.host, server.port, tcp)
        server.sock = tls_.server_handshake(server.sock, tls, server.host)
        if tls_.is_tls(server.sock):
            log.info("%r: %s SSL established: %s", server, server.describe(), tls_.describe(server.sock))
        try:
            server.local_addr = server.sock.getsockname()
        except OSError:
            server.local_addr = ("unix", 0)
        server.sock.sendall(m.startup_message(startup))
        _login(server, ServerAuthenticator(startup["user"], password, scram_keys), tracked)
    server.send = sender(server.sock, server.wlock, shut_if_cut=False)   # see net/handoff.py
    server_reader.start(server)


def _login(server, auth, tracked) -> None:
    buf = bytearray()
    while True:
        found = message_at(buf, 0, 1 << 24)
        if found is None:
            data = server.sock.recv(RECV_SIZE)
            if not data:
                raise ServerError("08006", "server closed the connection during login")
            buf += data
            continue
        mtype, start, end = found
        body = bytes(buf[start:end])
        del buf[:end]
        if mtype == ord("R"):
            code, data = m.parse_authentication(body)
            try:
                reply = auth.respond(code, data)
            except AuthFailed as exc:
                raise ServerError("28000", exc.message, fatal=True) from exc
            if reply:
                server.sock.sendall(reply)
        elif mtype == _E:
            fields = m.parse_error_fields(body)
            raise ServerError(fields.get("C", "08006"), fields.get("M", "server login failed"), fatal=True)
        elif mtype == _S:
            name, value = m.parse_parameter_status(body)
            server.params[name] = value
            if name in tracked:
                server.tparams[name] = value
        elif mtype == ord("K"):
            server.pid, server.key = m.parse_backend_key_data(body)
        elif mtype == _Z:
            server.tx_status = body[:1]
            if buf:
                raise ServerError("08P01", "unexpected data after login")
            return


def _open_socket(host: str, port: int, tcp=None):
    if host.startswith("/"):
        sock = socket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
        sock.connect(os.path.join(host, f".s.PGSQL.{port}"))
        return sock
    error: OSError | None = None
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, 0, pysocket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            # Before connect, as PgBouncer does: a tcp_socket_buffer receive buffer
            # set after it keeps the window under one MSS on loopback, and the
            # server's replies crawl at tens of KB/s (a 200 ms timer per window).
            tune_socket(sock, tcp)
            sock.connect(addr)
            return sock
        except OSError as exc:
            error = exc
            sock.close()
    raise error or OSError(f"could not resolve {host}")


def send_cancel(host: str, port: int, pid: int, key: int, timeout: float = 5.0, tls=None) -> None:
    """Forward a cancel request to a server (a fresh connection, as libpq
    does: over TLS when ``tls`` is given, i.e. the server connection is TLS)."""
    timer = gevent.Timeout(timeout)
    timer.start()
    try:
        sock = _open_socket(host, port)
        try:
            sock = tls_.server_handshake(sock, tls, host)
        except ServerError:
            sock.close()
            raise OSError(f"cancel request: {sys.exc_info()[1].text}") from None
        try:
            sock.sendall(m.cancel_request(pid, key))
            sock.recv(1)   # the server closes when done
        finally:
            sock.close()
    except gevent.Timeout as exc:
        if exc is not timer:
            raise
        # Not silent: the callers log it (and a peer forward counts as dropped).
        raise OSError(f"cancel request to {host}:{port} timed out after {timeout:g} s") from None
    finally:
        timer.close()
