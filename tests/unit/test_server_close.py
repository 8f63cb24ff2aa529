"""ServerConnection.close (net/server.py) never blocks nor switches: it runs
in the hub too (a read callback releasing a server past its lifetime, an
idle server's stray bytes, the shutdown the last released server ends). Its
Terminate is one non-blocking try, as PgBouncer's: with the socket's buffer
full (the backend not reading) gevent's ``sendall`` raised in the hub
("Impossible to call blocking function in the event loop callback") and the
close stopped before the descriptor was closed. Real gevent sockets (a
socketpair standing for PostgreSQL); the pool is a stand-in that records
the close."""

import socket as pysocket
from types import SimpleNamespace

import gevent
from gevent import get_hub, socket

from geobouncer.net.server import ServerConnection
from geobouncer.proto import messages as m


def _server():
    closed = []
    pool = SimpleNamespace(tracking=False, server_closed=lambda server, reason: closed.append(reason))
    server = ServerConnection(pool, "stand-in", 5432)
    ours, theirs = socket.socketpair(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    ours.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_SNDBUF, 4096)
    server.sock = ours
    return server, theirs, closed


def _fill(sock) -> int:
    """Write to ``sock`` until its buffer takes nothing more (the peer does not read)."""
    total = 0
    while True:
        try:
            total += sock._sock.send(b"q" * 65536)
        except BlockingIOError:
            return total


def _drain(peer) -> bytes:
    """Everything the peer gets until EOF (bounded: no EOF fails the test)."""
    peer.settimeout(2)
    out = bytearray()
    while True:
        data = peer.recv(65536)
        if not data:
            return bytes(out)
        out += data


def _close_in_hub(server) -> list:
    errors = []

    def callback():
        try:
            server.close("server lifetime over")
        except BaseException as exc:   # noqa: BLE001 - in the hub anything is a defect
            errors.append(exc)

    get_hub().loop.run_callback(callback)
    gevent.sleep(0.01)
    return errors


def test_closed_in_the_hub_with_a_full_buffer_the_descriptor_is_closed():
    server, peer, closed = _server()
    try:
        written = _fill(server.sock)
        assert _close_in_hub(server) == []
        assert server.closed and closed == ["server lifetime over"]
        rest = _drain(peer)                     # EOF: the descriptor was closed
        assert len(rest) >= written
        assert not rest[written:] or rest[written:] == m.TERMINATE[:len(rest) - written]
    finally:
        server.sock.close()
        peer.close()


def test_closed_in_the_hub_with_room_the_terminate_goes():
    server, peer, _ = _server()
    try:
        assert _close_in_hub(server) == []
        assert _drain(peer) == m.TERMINATE
    finally:
        peer.close()


def test_closed_by_a_greenlet_while_another_waits_to_write_nothing_raises():
    """The janitor (query_timeout) closing a server its client's greenlet is
    blocked writing a large message to: gevent's sendall raised
    ConcurrentObjectUseError there. The writer's wait ends with EBADF, and no
    Terminate lands inside its message (the write lock is held)."""
    server, peer, _ = _server()
    outcome = []

    def writer():
        with server.wlock:          # as fastio.sender holds it for a write that did not complete at once
            try:
                server.sock.sendall(b"m" * (1 << 20))
            except OSError as exc:
                outcome.append(exc)

    try:
        _fill(server.sock)
        blocked = gevent.spawn(writer)
        gevent.sleep(0.01)
        assert server.wlock.locked()
        server.close("query timeout")           # no exception
        blocked.join(2)
        assert blocked.dead and len(outcome) == 1
        assert not _drain(peer).endswith(m.TERMINATE)
    finally:
        peer.close()


def test_no_terminate_inside_a_write_under_way():
    """A write that did not complete at once holds the write lock, its message
    half sent: over TCP some room comes back as data is acknowledged, and a
    Terminate would fit there, inside that message."""
    server, peer, _ = _server()
    try:
        server.sock._sock.send(b"Q\x00\x01\x00\x00part of a large query")
        server.wlock.acquire()
        server.close("query timeout")
        assert _drain(peer) == b"Q\x00\x01\x00\x00part of a large query"
    finally:
        peer.close()


def test_a_dirty_or_linked_server_gets_no_terminate():
    for dirty in (True, False):
        server, peer, _ = _server()
        try:
            server.dirty = dirty
            server.client = None if dirty else object()
            server.close("client disconnect while server was not ready")
            assert _drain(peer) == b""
        finally:
            peer.close()
