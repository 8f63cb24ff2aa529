"""Listening sockets: TCP on listen_addr:listen_port and the unix socket
``unix_socket_dir/.s.PGSQL.<port>``, as PgBouncer does."""

from __future__ import annotations

import grp
import logging
import os
import socket as pysocket

from gevent.server import StreamServer

from .sockopts import defer_accept, tune_socket

log = logging.getLogger("geobouncer")


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise OSError(f"unix_socket_group: no group named {name}") from None


class Listeners:
    def __init__(self, app):
        self.app = app
        self.servers: list[StreamServer] = []
        self.unix_path: str | None = None
        self.defer = False          # TCP_DEFER_ACCEPT on the TCP listeners (tcp_defer_accept)

    def start(self, shared=()) -> None:
        """Bind and listen; ``shared``: sockets already listening (a workers supervisor's),
        served instead of binding TCP ones; the unix socket is still this process's."""
        s = self.app.settings
        backlog = s.listen_backlog or 128
        self.defer = bool(s.tcp_defer_accept)   # the supervisor set it on shared sockets
        for sock in shared:
            self._serve(sock, unix=sock.family == pysocket.AF_UNIX)
            log.info("accepting on the supervisor's %s", _name(sock))
        for addr in [] if shared else _listen_addrs(s.listen_addr):
            family = pysocket.AF_INET6 if ":" in addr else pysocket.AF_INET
            sock = pysocket.socket(family, pysocket.SOCK_STREAM)
            sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_REUSEADDR, 1)
            if s.so_reuseport:   # several processes on one port; the kernel spreads connections
                sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_REUSEPORT, 1)
            if family == pysocket.AF_INET6:
                sock.setsockopt(pysocket.IPPROTO_IPV6, pysocket.IPV6_V6ONLY, 1)
            _bind(sock, (addr, s.listen_port), f"{addr}:{s.listen_port}")
            sock.listen(backlog)
            if s.tcp_defer_accept:
                defer_accept(sock)
            self._serve(sock, unix=False)
            log.info("listening on %s:%d", addr, s.listen_port)
        if s.unix_socket_dir:
            path = os.path.join(self.app.cfg.resolve_path(s.unix_socket_dir), f".s.PGSQL.{s.listen_port}")
            if os.path.exists(path):
                os.unlink(path)
            sock = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
            _bind(sock, path, f"unix:{path}")
            os.chmod(path, s.unix_socket_mode)
            if s.unix_socket_group:
                os.chown(path, -1, _group_id(s.unix_socket_group))
            sock.listen(backlog)
            self.unix_path = path
            self._serve(sock, unix=True)
            log.info("listening on unix:%s", path)

    def retune(self, settings) -> None:
        """RELOAD / SET: tcp_defer_accept turned on or off reaches the TCP
        listeners already open, as in PgBouncer (its set_defer_accept); the
        other tcp_* settings apply to each connection as it is made."""
        on = bool(settings.tcp_defer_accept)
        if on == self.defer:
            return
        self.defer = on
        for server in self.servers:
            sock = server.socket
            if sock is not None and sock.family != pysocket.AF_UNIX:
                defer_accept(sock, on)

    def _serve(self, sock, unix: bool) -> None:
        app = self.app

        def handle(client_sock, addr):
            try:
                if not unix:
                    tune_socket(client_sock, app.settings)
            except OSError:          # gone before we got to it
                client_sock.close()
                return
            app.accept(client_sock, addr, unix)

        server = _ClientServer(sock, handle)
        server.start()
        self.servers.append(server)

    def stop(self) -> None:
        for server in self.servers:
            _take_queued(server)
            server.close()
        self.servers.clear()
        if self.unix_path:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass
            self.unix_path = None


def _take_queued(server) -> None:
    """Accept what the kernel has queued already before closing: closing a listening
    socket resets the connections still in its queue, and with so_reuseport they are
    no other process's either (refused connections during a rolling restart)."""
    while True:
        try:
            accepted = server.do_read()
        except OSError:
            return
        if not accepted:
            return
        server.do_handle(*accepted)


class _ClientServer(StreamServer):
    """The client owns its socket and closes it itself: a parked idle client
    (net/client.py) outlives the greenlet that accepted it."""

    def do_close(self, sock, *args) -> None:
        pass


def _name(sock) -> str:
    name = sock.getsockname()
    return f"unix:{name}" if isinstance(name, str) else f"{name[0]}:{name[1]}"
def _bind(sock, address, name: str) -> None:
    """bind(), failing with PgBouncer's words: 'cannot listen on ADDR:PORT: bind(): ...'."""
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {name}: bind(): {exc.strerror}") from None


def _listen_addrs(value) -> list[str]:
    if not value:
        return []
    addrs = [a.strip() for a in str(value).replace(" ", ",").split(",") if a.strip()]
    out = []
    for addr in addrs:
        if addr == "*":
            out.extend(["0.0.0.0", "::"] if pysocket.has_ipv6 else ["0.0.0.0"])
        else:
            out.append(addr)
    return out
