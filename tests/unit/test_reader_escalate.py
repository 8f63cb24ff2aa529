"""The read callback's hand-over of a reply's rest to a greenlet
(net/server_reader.py, _escalate) with the client's write lock taken for
it: a greenlet killed before it ever ran (its server closed from outside in
the same loop iteration: gevent then never runs its function, so no
``finally`` of it) must not leave the lock held, or nothing could be
written to that client again and its FATAL would never come. Real gevent
sockets; the server is a stand-in holding what _escalate touches."""

import socket as pysocket
from types import SimpleNamespace

import gevent
from gevent import socket
from gevent.lock import Semaphore

from geobouncer.net import server_reader


class Watch:
    def stop(self) -> None:
        pass


def pair():
    ours, theirs = socket.socketpair(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    client = SimpleNamespace(sock=ours, wlock=Semaphore())
    server = SimpleNamespace(watch=Watch(), client=client, reader=None, sock=None)
    return server, client, theirs


def test_killed_before_it_ran_the_lock_is_released_and_the_stream_ended():
    server, client, peer = pair()
    try:
        client.wlock.acquire(blocking=False)     # as the callback takes it
        server_reader._escalate(server, (b"the rest", True))
        server.reader.kill(block=False)          # ServerConnection.close, same iteration
        gevent.sleep(0.01)
        assert server.reader.dead
        assert not client.wlock.locked()
        peer.settimeout(1)
        assert peer.recv(100) == b""             # shut: its stream ended inside the reply
    finally:
        client.sock.close()
        peer.close()


def test_a_greenlet_that_ran_releases_the_lock_once():
    server, client, peer = pair()
    try:
        client.wlock.acquire(blocking=False)
        server.scanner = SimpleNamespace(ready=False)
        server.outstanding = 1
        server.pool = SimpleNamespace(stats=SimpleNamespace(bytes_sent=0))
        server.sock, quiet = socket.socketpair(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
        server_reader._escalate(server, (b"the rest", True))
        server.watch = None                      # stays a greenlet: it reads the (quiet) server next
        gevent.sleep(0.01)
        assert peer.recv(100) == b"the rest"
        assert not client.wlock.locked()
        server.reader.kill()
        assert client.wlock.counter == 1         # not released a second time by the link
        server.sock.close()
        quiet.close()
    finally:
        client.sock.close()
        peer.close()
