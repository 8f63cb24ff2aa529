"""TLS on live connections, on the standard library's ``ssl`` (gevent's
cooperative ``SSLSocket``): the handshakes on both sides and what a TLS socket
tells about itself. The contexts come from PgBouncer's settings
(net/tls_config.py).

Client side: an SSLRequest is answered ``S`` and the handshake done inside
client_login_timeout (net/login.py). Server side: every server connection
(pools, auth_query, health checks, the topology poller, cancel requests)
goes through ``server_handshake``: SSLRequest, then ``S`` -> handshake,
``N`` -> plaintext unless the mode is require or stricter.
"""

from __future__ import annotations

import hashlib
import ssl as _stdlib_ssl
import struct

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from gevent.ssl import SSLSocket

from ..proto.framing import SSL_REQUEST_CODE
from . import tls_native
from .internal import ServerError
from .tls_config import TlsSide, rank

SSL_REQUEST = struct.pack("!II", 8, SSL_REQUEST_CODE)
SSL_YES = b"S"
TLS_HANDSHAKE_RECORD = b"\x16"     # the first byte of a ClientHello: direct TLS


def describe(sock) -> str:
    """PgBouncer's ``tls`` column: ``TLSv1.3/TLS_AES_256_GCM_SHA384/ECDH=X25519``;
    empty for a plain connection."""
    version = getattr(sock, "version", None)
    if version is None:
        return ""
    try:
        proto = version()
        cipher = sock.cipher()
    except (OSError, ValueError, AttributeError):
        return ""
    if not proto or not cipher:
        return ""
    text = f"{proto}/{cipher[0]}"
    group = tls_native.key_exchange_group(sock)
    if group:
        text += f"/ECDH={group}"
    return text


def server_end_point(sock) -> bytes | None:
    """tls-server-end-point channel binding data (RFC 5929) for a client's TLS
    connection: the hash of the certificate we presented, with its signature's
    hash algorithm (SHA-256 for MD5 and SHA-1). None when it cannot be known
    (then SCRAM-SHA-256-PLUS is not offered, as PostgreSQL does)."""
    der = tls_native.own_certificate(sock)
    if der is None:
        return None
    try:
        algorithm = x509.load_der_x509_certificate(der).signature_hash_algorithm
    except (ValueError, UnsupportedAlgorithm):
        return None
    if algorithm is None:
        return None
    name = "sha256" if algorithm.name in ("md5", "sha1") else algorithm.name
    try:
        return hashlib.new(name, der).digest()
    except ValueError:
        return None


def is_tls(sock) -> bool:
    return isinstance(sock, SSLSocket)


def handshake_done(sock) -> bool:
    try:
        return sock.version() is not None
    except (OSError, ValueError, AttributeError):
        return False


def peer_common_name(sock) -> str | None:
    """The CN of a verified client certificate, else None."""
    try:
        cert = sock.getpeercert()
    except (OSError, ValueError, AttributeError):
        return None
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return value
    return None


def server_handshake(sock, side: TlsSide | None, host: str):
    """SSLRequest to a server and, on ``S``, the TLS handshake (as libpq does);
    returns the socket to go on with: the TLS one, or ``sock`` itself when TLS
    is off, the server is on a Unix socket, or it said ``N`` and the mode
    allows plaintext. Raises ServerError."""
    if side is None or side.context is None or host.startswith("/"):
        return sock
    sock.sendall(SSL_REQUEST)
    answer = sock.recv(1)
    if answer == b"N":
        if rank(side.mode) >= rank("require"):
            raise ServerError("08006", "server refused SSL")
        return sock
    if answer != b"S":
        if not answer:
            raise ServerError("08006", "server closed the connection during SSL negotiation")
        raise ServerError("08P01", "bad sslreq answer")
    tls = side.context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    try:
        tls.do_handshake()
    except _stdlib_ssl.SSLCertVerificationError as exc:
        tls.close()
        raise ServerError("08006", f"server certificate verification failed: {exc.verify_message}") from None
    except (_stdlib_ssl.SSLError, OSError) as exc:
        tls.close()
        raise ServerError("08006", f"TLS handshake with server failed: {reason(exc)}") from None
    except BaseException:
        tls.close()
        raise
    return tls


def client_handshake(sock, side: TlsSide):
    """After ``S`` to a client's SSLRequest: the TLS socket, handshake done.
    Raises OSError (ssl.SSLError) when the handshake fails; the socket is closed then."""
    tls = side.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    try:
        tls.do_handshake()
    except BaseException:
        tls.close()
        raise
    return tls


def send_now(sock, data) -> None:
    """One non-blocking TLS write of ``data`` (an error before a close): all
    of it, or nothing useful, never a wait. Raises OSError."""
    sslobj = getattr(sock, "_sslobj", None)
    if sslobj is None or not handshake_done(sock):
        return
    try:
        sslobj.write(data)
    except (_stdlib_ssl.SSLWantWriteError, _stdlib_ssl.SSLWantReadError):
        pass
    except (ValueError, AttributeError):
        raise OSError("socket closed") from None


def reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
