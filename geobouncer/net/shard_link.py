"""One client linked to servers of several shards at once (sharding, net/sharded.py).

A server's reader (net/server_reader.py; always its greenlet here: a
ShardLink is not ``direct``) hands every reply chunk to the server's
consumer; here the consumer is a ShardLink, which queues the chunks for the
client's greenlet instead of writing them to the client's socket. The queue
is bounded: a shard that answers faster than the merge consumes blocks in its
own reader greenlet (the same back-pressure a slow client socket
gives), so a large result is never held whole.

The client's greenlet reads messages back with ``messages()`` until the
ReadyForQuery that ends each request.
"""

from __future__ import annotations

from gevent.queue import Queue

from ..proto.framing import ProtocolError, message_at
from . import params as tracked_params
from .checkout import ClientError, acquire_server
from .server import ServerError

_Z, _E = ord("Z"), ord("E")
_LOST = object()
_LIMIT = 1 << 30


class ShardLost(Exception):
    """The shard's server went away in the middle of a request."""


class ShardLink:
    """Stands in for the client as one shard server's consumer."""

    direct = False     # replies go through the merge, in the client's greenlet: never from the hub
    __slots__ = ("client", "server", "shard", "queue", "buf", "pos", "tparams", "statements",
                 "stmt_sets", "stmt_routes", "stmt_class", "session_sets", "lost", "errored")

    def __init__(self, client, shard: int, server):
        self.client = client
        self.shard = shard
        self.server = server
        self.queue: Queue = Queue(maxsize=16)
        self.buf = b""
        self.pos = 0
        # What the reader may update or clear on its consumer (net/server.py).
        self.tparams = client.tparams
        self.session_sets = client.session_sets
        self.statements: dict = {}
        self.stmt_sets: dict = {}
        self.stmt_routes: dict = {}
        self.stmt_class: dict = {}
        self.lost = False
        self.errored = False          # an ErrorResponse went by in raw_until_ready

    # --- the consumer interface the server's reader uses ---------------------
    def send(self, data) -> None:
        self.queue.put(bytes(data))

    def on_client_write_failed(self) -> None:   # never: send() does not fail
        pass

    def on_server_idle(self, server) -> None:    # the client's greenlet releases servers itself
        pass

    def on_server_lost(self, server, reason: str) -> None:
        self.lost = True
        self.queue.put(_LOST)

    # --- the client's side ----------------------------------------------------
    def send_request(self, data: bytes, requests: int, request_time: float) -> None:
        server = self.server
        if server.outstanding <= 0:
            server.outstanding = requests
            server.request_started = request_time
            if server.tx_status == b"I":
                server.xact_started = request_time
        else:
            server.outstanding += requests
        server.pool.stats.bytes_received += len(data)
        try:
            server.send(data)
        except OSError:
            server.dirty = True
            raise ShardLost() from None

    def messages(self):
        """(type, body) of the server's replies, up to and including one
        ReadyForQuery. Raises ShardLost if the server goes away first."""
        while True:
            found = message_at(self.buf, self.pos, _LIMIT)
            if found is None:
                chunk = self.queue.get()
                if chunk is _LOST:
                    raise ShardLost()
                self._feed(chunk)
                continue
            mtype, start, end = found
            body = self.buf[start:end]
            if type(body) is bytearray:
                body = bytes(body)
            self.pos = end
            yield mtype, body
            if mtype == _Z:
                return

    def _feed(self, chunk: bytes) -> None:
        """Append a chunk after what is left unread. A message spread over many
        chunks grows a bytearray in place (linear), not bytes copied anew
        for every chunk (quadratic)."""
        buf, pos = self.buf, self.pos
        if pos >= len(buf):
            self.buf = chunk                      # the common case: nothing left over
        elif type(buf) is bytearray:
            if pos:
                del buf[:pos]
            buf += chunk
        else:
            grown = bytearray(buf[pos:])
            grown += chunk
            self.buf = grown
        self.pos = 0

    def peek(self) -> int:
        """The type of the next reply message (waiting for its first byte)."""
        while self.pos >= len(self.buf):
            chunk = self.queue.get()
            if chunk is _LOST:
                raise ShardLost()
            self.buf, self.pos = chunk, 0
        return self.buf[self.pos]

    def raw_until_ready(self, out, drop=None):
        """Pass the replies on as they come (one shard: no merge), calling
        ``out(bytes)`` per run of messages, up to and including the
        ReadyForQuery (with ``drop``: leaving out those types, and the
        ReadyForQuery). Returns the transaction status."""
        while True:
            pos = run = self.pos
            buf = self.buf
            status = None
            pieces = []
            while True:
                found = message_at(buf, pos, _LIMIT)
                if found is None:
                    break
                mtype, start, end = found
                if mtype == _E:
                    self.errored = True
                if drop is not None and (mtype in drop or mtype == _Z):
                    if pos > run:
                        pieces.append(buf[run:pos])
                    run = end
                pos = end
                if mtype == _Z:
                    status = buf[start:start + 1]
                    break
            if pos > run:
                pieces.append(buf[run:pos])
            if pieces:
                out(pieces[0] if len(pieces) == 1 else b"".join(pieces))
            self.pos = pos
            if status is not None:
                return status
            chunk = self.queue.get()
            if chunk is _LOST:
                raise ShardLost()
            self._feed(chunk)


def link(app, client, shard: int, pool) -> ShardLink:
    """A server of ``pool`` for this client's shard ``shard``, parameters synced."""
    server = acquire_server(app, pool, client)
    if server.tparams != client.tparams:
        try:
            tracked_params.sync(server, client.tparams)
        except ServerError as exc:
            server.close(f"parameter sync failed: {exc.text}")
            raise ClientError(exc.sqlstate, exc.text) from None
    shard_link = ShardLink(client, shard, server)
    server.client = shard_link
    server.linked_at = client.request_time
    server.pool.stats.server_assignment_count += 1
    return shard_link


def unlink(app, shard_link: ShardLink, request_time: float) -> None:
    """Give the server back if it is clean and idle; close it otherwise."""
    server = shard_link.server
    if server.client is not shard_link:
        return            # given back already
    server.client = None
    if shard_link.lost or server.closed:
        return
    if shard_link.pos < len(shard_link.buf) or not shard_link.queue.empty() or not server.reusable():
        server.close("sharded client left the server mid-request")
        return
    app.releaser.release_active(server, request_time)


__all__ = ["ShardLink", "ShardLost", "link", "unlink", "ProtocolError"]
