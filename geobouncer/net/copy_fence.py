"""A fence after a failed COPY FROM STDIN that left the replies still owed in
doubt (pool/unanswered.py, copy_failed: ``doubtful``).

Theory of operation. A COPY that fails before PostgreSQL read the Syncs the
client pipelined into its data (a BEFORE STATEMENT trigger, a bad row before
them, a statement_timeout) has them answered; one failing after them has
them swallowed. The pooler cannot tell which: it counts the fewest replies
(all swallowed), so the server looks answered no later than it is, and
doubts it. When the client's requests look answered (``start``, from
ClientConnection.on_server_idle) the pooler sends a fence, which PostgreSQL
answers after everything sent before it:

  Parse("geobouncer_fence", "", two random type OIDs), Describe(statement),
  Close(statement), Sync

  -> ParseComplete, ParameterDescription(the two OIDs), NoData,
     CloseComplete, ReadyForQuery

An empty statement is accepted in every transaction state (a failed one
too), starts nothing and changes nothing; its ParameterDescription carries
64 random bits no reply of the client's can (its own statements are renamed,
pool/prepared.py). Until that ParameterDescription comes, the server's
replies go to the client as they are (``feed``): they are what PostgreSQL
sent it, however many. Only a ParseComplete is held, until what follows says
whether it is the fence's. The fence's replies are swallowed; from its
ReadyForQuery on the count is certain again (what the client sent meanwhile
queued behind the FENCE entry), and the server is pooled as any other.

Limits. A COPY the client pipelined after the failed one, still running when
the fence comes, would read the fence as a protocol violation: its
CopyInResponse before the fence's replies closes the server and the client
(a ProtocolError, as for a server that breaks the protocol). Statements the
doubtful matching took for skipped may be prepared after all: the tracker
forgets this server's statements (the next use prepares them again, a Close
first: pool/prepared.py, _send_parse).
"""

from __future__ import annotations

import os

import gevent

from ..pool.unanswered import FENCE
from ..proto import messages as m
from ..proto.framing import ProtocolError
from ..proto.server_scan import ServerScanner
from .handoff import send_from_hub

_NAME = b"geobouncer_fence\x00"
_TAIL = m.message(b"D", b"S" + _NAME) + m.message(b"C", b"S" + _NAME) + m.message(b"S")
_Z, _ONE, _T, _G, _S = (ord(c) for c in "Z1tGS")
# Held until complete and looked at; everything else streams through.
_HOLD = frozenset(b"Z1tn3GEHWSAN")
_ASYNC = frozenset(b"SAN")      # ParameterStatus, notification, notice: may come between two replies
_WATCHED = frozenset(b"EHW")    # for the connection (server._watched): errors, COPY OUT/BOTH
_ENTRY = (FENCE, False, None)


class Fence:
    """Where the reply stream stands while a fence is awaited."""

    __slots__ = ("held", "nonce", "scanner", "stage")

    def __init__(self, nonce: bytes):
        self.nonce = nonce      # the body of the fence's ParameterDescription
        # The boundaries, for this stream alone: the types in _HOLD whole, the rest streamed.
        self.scanner = ServerScanner(_HOLD)
        self.held = []          # a ParseComplete that may be the fence's, and notices after it
        self.stage = 0          # 1: a ParseComplete held; 2: the fence's own replies, up to its ReadyForQuery


def start(server) -> None:
    """The doubtful server's client looks answered: send the fence, unless one
    is on its way. The fence goes between two writes of the client's, never
    inside one: the server's write lock is free (no write under way), or it
    is waited for and the server looked at again (``_start_locked``)."""
    if server.tracker.fence is not None or server.closed:
        return
    if server.wlock.locked():
        gevent.spawn(_start_locked, server, server.client)
        return
    _send(server, False)


def _start_locked(server, client) -> None:
    with server.wlock:
        # What the client sent meanwhile is before the fence: its replies say
        # when the client looks answered again, and that calls start again.
        if server.client is client and not server.closed and server.tracker.doubtful \
                and server.tracker.fence is None and server.answered():
            _send(server, True)


def _send(server, locked: bool) -> None:
    tracker = server.tracker
    nonce = b"\x00\x02" + os.urandom(8)
    tracker.fence = Fence(nonce)
    tracker.pending.append(_ENTRY)      # before any write: the client's next requests queue behind it
    server.outstanding = 0              # what ReadyForQuery messages come before the fence's is not counted
    data = m.message(b"P", _NAME + b"\x00" + nonce) + _TAIL
    try:
        if locked:
            server.sock.sendall(data)
        else:
            send_from_hub(server, data)
    except (OSError, ValueError, AttributeError):
        server.dirty = True             # gone: its reader tells the client


def feed(server, data):
    """A chunk from the server while the fence is awaited. Returns (bytes for
    the client, what follows the fence's ReadyForQuery: None while it has
    not come). The boundaries come from the fence's own ServerScanner."""
    fence = server.tracker.fence
    buf, end, found = fence.scanner.feed(data)
    out = []
    run = 0
    for mtype, start, stop in found:
        if start > run:                 # streamed messages (or the rest of one) between
            _flush(fence, out)
            out.append(buf[run:start])
        run = stop
        if _message(server, fence, mtype, buf[start:stop], out):
            return b"".join(out), buf[stop:]    # from a message boundary: the connection's scanner reads on
    if end > run:
        _flush(fence, out)
        out.append(buf[run:end])
    return b"".join(out), None


def _message(server, fence, mtype: int, msg: bytes, out: list) -> bool:
    """One whole held-type message; True at the fence's ReadyForQuery."""
    if mtype in _ASYNC:
        if mtype == _S:
            server._watched(mtype, msg, 5, len(msg))
        (fence.held if fence.stage == 1 else out).append(msg)
        return False
    if fence.stage == 2:
        if mtype == _Z:
            _done(server, msg[5:6])
            return True
        return False                    # NoData, CloseComplete: the fence's
    if mtype == _T and fence.stage == 1 and msg[5:] == fence.nonce:
        out.extend(fence.held[1:])      # the fence's ParseComplete goes; notices after it do not
        fence.held = []
        fence.stage = 2
        return False
    _flush(fence, out)
    if mtype == _ONE:
        fence.held.append(msg)
        fence.stage = 1
        return False
    if mtype == _Z:
        server.tx_status = msg[5:6]
        server.in_copy = False
    elif mtype == _G:
        raise ProtocolError("a COPY FROM STDIN started before the pooler's fence after a failed COPY")
    elif mtype in _WATCHED:
        server._watched(mtype, msg, 5, len(msg))
    out.append(msg)
    return False


def _flush(fence, out: list) -> None:
    if fence.held:
        out.extend(fence.held)
        fence.held = []
    fence.stage = 0


def _done(server, status: bytes) -> None:
    """The fence's ReadyForQuery: nothing sent before it is owed any more."""
    tracker = server.tracker
    tracker.fence = None
    tracker.doubtful = tracker.copy_in = tracker.skipping = False
    pending = tracker.pending
    if pending and pending[0][0] == FENCE:
        pending.popleft()
    tracker.status = status
    tracker.prepared.clear()
    server.tx_status = server.scanner.status = status
    server.in_copy = False
