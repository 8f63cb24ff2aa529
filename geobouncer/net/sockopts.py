"""PgBouncer's TCP settings, on every TCP socket to a client or a server:
tcp_keepalive (with tcp_keepcnt, tcp_keepidle, tcp_keepintvl),
tcp_user_timeout and tcp_socket_buffer, with TCP_NODELAY. A value of 0 keeps
the system's default; a system that lacks an option keeps its own behaviour
(logged once)."""

from __future__ import annotations

import logging
import socket as pysocket

log = logging.getLogger("geobouncer")

# (setting, level, option name): options set only when the setting is above 0.
_TIMINGS = (
    ("tcp_keepcnt", pysocket.IPPROTO_TCP, "TCP_KEEPCNT"),
    ("tcp_keepidle", pysocket.IPPROTO_TCP, "TCP_KEEPIDLE"),
    ("tcp_keepintvl", pysocket.IPPROTO_TCP, "TCP_KEEPINTVL"),
)
_missing: set[str] = set()


def tune_socket(sock, settings) -> None:
    """Apply the settings to ``sock`` (a TCP socket; unix sockets are left
    alone). OSError when the socket is already gone."""
    if sock.family == pysocket.AF_UNIX:
        return
    sock.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY, 1)
    if settings is None:
        return
    keepalive = settings.tcp_keepalive
    sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_KEEPALIVE, 1 if keepalive else 0)
    if keepalive:
        for name, level, option in _TIMINGS:
            _set(sock, level, option, getattr(settings, name))
    _set(sock, pysocket.IPPROTO_TCP, "TCP_USER_TIMEOUT", settings.tcp_user_timeout)
    size = settings.tcp_socket_buffer
    if size > 0:
        sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_SNDBUF, size)
        sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_RCVBUF, size)


def _set(sock, level: int, option: str, value: int) -> None:
    if value <= 0:
        return
    number = getattr(pysocket, option, None)
    if number is None:
        if option not in _missing:
            _missing.add(option)
            log.warning("%s is not available on this system; its setting is ignored", option)
        return
    sock.setsockopt(level, number, value)


def defer_accept(sock, on: bool = True) -> None:
    """TCP_DEFER_ACCEPT (Linux), set after listen() with the value 1 as
    PgBouncer sets it: a connection is handed to accept() once its first
    bytes have come, or after about a second without them (the kernel then
    completes it anyway), so a client that connects and is slow to speak
    costs no greenlet meanwhile. ``on`` False clears it (0), as PgBouncer
    does when RELOAD or SET turns the setting off. Systems without the
    option ignore the setting."""
    option = getattr(pysocket, "TCP_DEFER_ACCEPT", None)
    if option is not None:
        try:
            sock.setsockopt(pysocket.IPPROTO_TCP, option, 1 if on else 0)
        except OSError:
            pass
