"""The floor under geobouncer's CPU figures: a bare gevent byte relay.

    python scripts/gevent-relay.py [--replies-in-callbacks] LISTEN_PORT PG_HOST PG_PORT

One greenlet per direction per client, relaying bytes to its own PostgreSQL
connection with geobouncer's socket fast paths (geobouncer/net/fastio.py):
no protocol scan, no pooling, no authentication of its own. scripts/bench
runs it as the `gevent-relay` target, so the table shows how much of a
transaction's CPU is gevent moving bytes and how much is the pooler's logic.

``--replies-in-callbacks`` (the `gevent-relay-cb` target) moves the
server-to-client direction out of a greenlet into a libev read-watcher
callback that receives and sends without a greenlet switch (a partial send
stops the watcher and lets a greenlet finish the write): the measure of what
a reader without its own greenlet would save.
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from gevent import socket  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

from geobouncer.net.fastio import receiver, sender  # noqa: E402


def pump(src, dst) -> None:
    recv, send = receiver(src, 65536), sender(dst)
    try:
        while True:
            data = recv()
            if not data:
                break
            send(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class CallbackPump:
    """Relay ``src`` to ``dst`` (plain gevent sockets) from the hub's read
    callback on ``src``: no greenlet switch per message."""

    __slots__ = ("src", "dst", "watcher", "done")

    def __init__(self, src, dst):
        self.src, self.dst = src, dst
        self.done = gevent.event.Event()
        self.watcher = gevent.get_hub().loop.io(src.fileno(), 1)
        self.watcher.start(self.readable)

    def readable(self) -> None:
        try:
            data = self.src._sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.stop()
            return
        try:
            sent = self.dst._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.stop()
            return
        if sent < len(data):
            self.watcher.stop()            # back-pressure: a greenlet finishes the write
            gevent.spawn(self.finish, data[sent:])

    def finish(self, rest: bytes) -> None:
        try:
            self.dst.sendall(rest)
        except OSError:
            self.stop()
            return
        self.watcher.start(self.readable)

    def stop(self) -> None:
        self.watcher.stop()
        try:
            self.dst.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.done.set()


def main(listen_port: int, pg_host: str, pg_port: int, callbacks: bool = False) -> None:
    def handle(client, _addr) -> None:
        try:
            server = socket.create_connection((pg_host, pg_port))
        except OSError:
            return
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if callbacks:
            back = CallbackPump(server, client)
            pump(client, server)
            back.done.wait()
        else:
            back = gevent.spawn(pump, server, client)
            pump(client, server)
            back.join()
        server.close()

    StreamServer(("127.0.0.1", listen_port), handle).serve_forever()


if __name__ == "__main__":
    args = sys.argv[1:]
    replies_in_callbacks = args[:1] == ["--replies-in-callbacks"]
    if replies_in_callbacks:
        args = args[1:]
    main(int(args[0]), args[1], int(args[2]), replies_in_callbacks)
