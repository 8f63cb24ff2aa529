"""The few OpenSSL calls PgBouncer's TLS settings need and Python's ``ssl``
module does not offer: TLS 1.3 cipher suites (``*_tls13_ciphers``), a list of
ECDH groups (``client_tls_ecdhcurve`` with ``:``), automatic DH parameters
(``client_tls_dheparams``), and the key exchange group of a connection (the
``ECDH=`` part of SHOW CLIENTS' ``tls`` column).

They are called through ctypes on the very libssl the ``_ssl`` module uses,
with the ``SSL_CTX *`` / ``SSL *`` read from the ``ssl`` objects. Each pointer
is checked against what the ``ssl`` module itself reports (the context's
options and verify mode; the connection's context) before anything is called
on it: if this Python lays its objects out otherwise, ``available()`` is False
and callers refuse the setting (a config error) instead of guessing.
"""

from __future__ import annotations

import ctypes
import ssl

import _ssl

_SSL_CTRL_SET_GROUPS_LIST = 92
_SSL_CTRL_SET_DH_AUTO = 118
_SSL_CTRL_GET_NEGOTIATED_GROUP = 134
# CPython's PySSLContext and PySSLSocket: PyObject_HEAD, then SSL_CTX *ctx /
# (PyObject *Socket, SSL *ssl).
_HEAD = object.__basicsize__
_PTR = ctypes.sizeof(ctypes.c_void_p)

try:
    _lib = ctypes.CDLL(_ssl.__file__)
    _lib.SSL_CTX_set_ciphersuites.argtypes = (ctypes.c_void_p, ctypes.c_char_p)
    _lib.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
    _lib.SSL_CTX_ctrl.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p)
    _lib.SSL_CTX_ctrl.restype = ctypes.c_long
    _lib.SSL_CTX_get_options.argtypes = (ctypes.c_void_p,)
    _lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    _lib.SSL_CTX_get_verify_mode.argtypes = (ctypes.c_void_p,)
    _lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
    _lib.SSL_get_SSL_CTX.argtypes = (ctypes.c_void_p,)
    _lib.SSL_get_SSL_CTX.restype = ctypes.c_void_p
    _lib.SSL_ctrl.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p)
    _lib.SSL_ctrl.restype = ctypes.c_long
    _lib.OBJ_nid2sn.argtypes = (ctypes.c_int,)
    _lib.OBJ_nid2sn.restype = ctypes.c_char_p
    _lib.SSL_get_certificate.argtypes = (ctypes.c_void_p,)
    _lib.SSL_get_certificate.restype = ctypes.c_void_p
    _lib.i2d_X509.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p))
    _lib.i2d_X509.restype = ctypes.c_int
except (OSError, AttributeError):   # another ssl library (LibreSSL, static build without symbols)
    _lib = None


def _ctx_pointer(ctx: ssl.SSLContext) -> int | None:
    if _lib is None:
        return None
    ptr = ctypes.c_void_p.from_address(id(ctx) + _HEAD).value
    if not ptr:
        return None
    verify = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}[ctx.verify_mode]
    if _lib.SSL_CTX_get_options(ptr) != int(ctx.options) or _lib.SSL_CTX_get_verify_mode(ptr) != verify:
        return None
    return ptr


def available(ctx: ssl.SSLContext) -> bool:
    return _ctx_pointer(ctx) is not None


def set_tls13_ciphers(ctx: ssl.SSLContext, suites: str) -> None:
    """SSL_CTX_set_ciphersuites; ValueError for an unknown suite."""
    ptr = _require(ctx)
    if _lib.SSL_CTX_set_ciphersuites(ptr, suites.encode()) != 1:
        raise ValueError(f"no TLS 1.3 cipher suite in {suites!r} is known to OpenSSL")


def set_groups(ctx: ssl.SSLContext, groups: str) -> None:
    """SSL_CTX_set1_groups_list (``X25519:P-256``); ValueError if refused."""
    ptr = _require(ctx)
    raw = ctypes.c_char_p(groups.encode())
    if _lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_GROUPS_LIST, 0, ctypes.cast(raw, ctypes.c_void_p)) != 1:
        raise ValueError(f"unknown curve in {groups!r}")


def set_dh_auto(ctx: ssl.SSLContext) -> None:
    """DHE with parameters matched to the key size (SSL_CTX_set_dh_auto)."""
    ptr = _ctx_pointer(ctx)
    if ptr is not None:
        _lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_DH_AUTO, 1, None)


def _ssl_pointer(sock) -> int | None:
    sslobj = getattr(sock, "_sslobj", None)
    context = getattr(sock, "context", None)
    if _lib is None or sslobj is None or context is None:
        return None
    ctx_ptr = _ctx_pointer(context)
    ssl_ptr = ctypes.c_void_p.from_address(id(sslobj) + _HEAD + _PTR).value
    if ctx_ptr is None or not ssl_ptr or _lib.SSL_get_SSL_CTX(ssl_ptr) != ctx_ptr:
        return None
    return ssl_ptr


def own_certificate(sock) -> bytes | None:
    """DER of the certificate this end presented on a TLS socket (for
    tls-server-end-point channel binding); None if unknown."""
    ssl_ptr = _ssl_pointer(sock)
    if ssl_ptr is None:
        return None
    cert = _lib.SSL_get_certificate(ssl_ptr)
    if not cert:
        return None
    size = _lib.i2d_X509(cert, None)
    if size <= 0:
        return None
    buf = ctypes.create_string_buffer(size)
    out = ctypes.c_void_p(ctypes.addressof(buf))
    if _lib.i2d_X509(cert, ctypes.byref(out)) != size:
        return None
    return buf.raw


def key_exchange_group(sock) -> str | None:
    """The negotiated (EC)DH group of a TLS socket, e.g. ``X25519``; None if unknown."""
    ssl_ptr = _ssl_pointer(sock)
    if ssl_ptr is None:
        return None
    nid = _lib.SSL_ctrl(ssl_ptr, _SSL_CTRL_GET_NEGOTIATED_GROUP, 0, None)
    if nid <= 0 or nid & 0x1000000:     # none, or a group OpenSSL has no NID for
        return None
    name = _lib.OBJ_nid2sn(nid)
    return name.decode() if name else None


def _require(ctx: ssl.SSLContext) -> int:
    ptr = _ctx_pointer(ctx)
    if ptr is None:
        raise ValueError("not supported with this Python's ssl module")
    return ptr
