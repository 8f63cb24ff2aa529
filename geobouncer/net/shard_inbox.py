"""A sharded client's input (its messages one by one, through its
ClientScanner) and the counts SHOW STATS gives for the sharded database
itself (net/sharded.py)."""

from __future__ import annotations

from collections import deque
from time import monotonic

from .fastio import receiver
from .login import ClientGone

RECV_SIZE = 65536


def count_sent(client, stats) -> None:
    """SHOW STATS: the bytes sent to this client, counted as they go."""
    send = client.send

    def counted(data) -> None:
        stats.bytes_sent += len(data)
        send(data)
    client.send = counted


def count_request(session, stats, started: float) -> None:
    """A request answered: a query; and a transaction when it left none open
    (SHOW STATS counts for the sharded database as PgBouncer does for a pool)."""
    now = monotonic()
    stats.query_count += 1
    stats.query_time += int((now - started) * 1e6)
    if session.status == b"I":
        stats.xact_count += 1
        stats.xact_time += int((now - (session.tx_started or started)) * 1e6)
        session.tx_started = None
    elif session.tx_started is None:
        session.tx_started = started


class Inbox:
    """The client's messages one by one, read through its ClientScanner."""

    __slots__ = ("recv", "buf", "queue", "scan", "stats")

    def __init__(self, client):
        self.stats = client.pool.stats
        self.recv = receiver(client.sock, RECV_SIZE, client)
        self.buf = bytearray(client.pending)
        client.pending = b""
        self.queue: deque = deque()
        self.scan = client.scanner.messages

    def next(self) -> tuple[int, bytes]:
        queue = self.queue
        while not queue:
            buf = self.buf
            msgs = self.scan(buf)
            if msgs is None:
                data = self.recv()
                if not data:
                    raise ClientGone()
                buf += data
                continue
            queue.extend((mtype, bytes(buf[start + 5:end])) for mtype, start, end in msgs)
            self.stats.bytes_received += msgs[-1][2]
            del buf[:msgs[-1][2]]
        return queue.popleft()
