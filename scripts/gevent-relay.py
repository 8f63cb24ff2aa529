"""The floor under geobouncer's CPU figures: a bare gevent byte relay.

    python scripts/gevent-relay.py LISTEN_PORT PG_HOST PG_PORT

One greenlet per direction per client, relaying bytes to its own PostgreSQL
connection with geobouncer's socket fast paths (geobouncer/net/fastio.py):
no protocol scan, no pooling, no authentication of its own. scripts/bench
runs it as the `gevent-relay` target, so the table shows how much of a
transaction's CPU is gevent moving bytes and how much is the pooler's logic.
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

import gevent  # noqa: E402
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


def main(listen_port: int, pg_host: str, pg_port: int) -> None:
    def handle(client, _addr) -> None:
        try:
            server = socket.create_connection((pg_host, pg_port))
        except OSError:
            return
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        back = gevent.spawn(pump, server, client)
        pump(client, server)
        back.join()
        server.close()

    StreamServer(("127.0.0.1", listen_port), handle).serve_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
