"""net/sockopts.py on real loopback sockets: what getsockopt reads back."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from geobouncer.net.sockopts import defer_accept, tune_socket


def settings(**kw):
    base = {"tcp_keepalive": True, "tcp_keepcnt": 0, "tcp_keepidle": 0, "tcp_keepintvl": 0,
            "tcp_user_timeout": 0, "tcp_socket_buffer": 0}
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture
def tcp_pair():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    yield client, accepted
    for s in (client, accepted, listener):
        s.close()


def opt(sock, level, name):
    return sock.getsockopt(level, name)


def test_every_setting_reaches_the_socket(tcp_pair):
    sock, _ = tcp_pair
    tune_socket(sock, settings(tcp_keepcnt=4, tcp_keepidle=7, tcp_keepintvl=3, tcp_user_timeout=12000,
                               tcp_socket_buffer=65536))
    assert opt(sock, socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert opt(sock, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert opt(sock, socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
    assert opt(sock, socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
    assert opt(sock, socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3
    assert opt(sock, socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 12000
    assert opt(sock, socket.SOL_SOCKET, socket.SO_SNDBUF) >= 65536     # Linux doubles it
    assert opt(sock, socket.SOL_SOCKET, socket.SO_RCVBUF) >= 65536


def test_zero_keeps_the_system_defaults(tcp_pair):
    sock, other = tcp_pair
    tune_socket(sock, settings())
    for name in ("TCP_KEEPCNT", "TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_USER_TIMEOUT"):
        number = getattr(socket, name)
        assert opt(sock, socket.IPPROTO_TCP, number) == opt(other, socket.IPPROTO_TCP, number), name
    assert opt(sock, socket.SOL_SOCKET, socket.SO_SNDBUF) == opt(other, socket.SOL_SOCKET, socket.SO_SNDBUF)
    assert opt(sock, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1


def test_keepalive_off_turns_it_off_and_ignores_its_timings(tcp_pair):
    sock, other = tcp_pair
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    tune_socket(sock, settings(tcp_keepalive=False, tcp_keepidle=7))
    assert opt(sock, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    assert opt(sock, socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == opt(other, socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)


def test_unix_sockets_are_left_alone():
    a, b = socket.socketpair(socket.AF_UNIX)
    try:
        tune_socket(a, settings(tcp_keepidle=7, tcp_socket_buffer=65536))     # no TCP options to set
        assert opt(a, socket.SOL_SOCKET, socket.SO_SNDBUF) == opt(b, socket.SOL_SOCKET, socket.SO_SNDBUF)
    finally:
        a.close()
        b.close()


@pytest.mark.skipif(not hasattr(socket, "TCP_DEFER_ACCEPT"), reason="Linux only")
def test_defer_accept_sets_and_clears_the_listener_option():
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        defer_accept(listener)
        assert opt(listener, socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) == 1
        defer_accept(listener, False)          # RELOAD / SET turning tcp_defer_accept off
        assert opt(listener, socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) == 0
    finally:
        listener.close()
