"""PgBouncer-compatible peering (PgBouncer 1.19+): cancel requests that reach the
wrong process are passed to the process that issued the key.

Several poolers behind one port (``so_reuseport``) or one load balancer each
hand out cancel keys carrying their ``peer_id`` (pool/cancel_keys.py). A
CancelRequest opens a new connection, which may land on any of them; the one it
lands on reads the peer id from the key and, when it is another's, sends the
request on to that peer as listed in ``[peers]`` (a unix socket directory or a
TCP host), after taking one from the key's forwarding TTL (the two low bits of
its last byte), so a misconfigured ring of peers cannot pass a request around
forever. Keys are compared with the TTL bits set, as they were issued.

The layout and the TTL are PgBouncer's, so geobouncer and PgBouncer 1.19+
processes can be peers of one another. At most ``pool_size`` (of the peer's
entry; default_pool_size when unset) requests are in flight to one peer; a
request that cannot be sent within cancel_wait_timeout is dropped, as PgBouncer
drops it.
"""

from __future__ import annotations

import logging

from gevent.lock import BoundedSemaphore

from .net.server_login import send_cancel
from .pool.cancel_keys import TTL_MASK, peer_of

log = logging.getLogger("geobouncer")
# Longest one forwarded cancel may take even with cancel_wait_timeout = 0 (no limit
# on waiting for a slot): a peer that accepts and never answers cannot hold it for ever.
_SEND_LIMIT = 10.0


class Peers:
    """Routing of cancel keys among peers; reads ``app.cfg.peers`` and ``app.settings``."""

    def __init__(self, app):
        self.app = app
        self._slots: dict[tuple[int, int], BoundedSemaphore] = {}
        self._busy: dict[int, int] = {}   # peer id -> requests being sent now
        self.forwarded = 0   # cancel requests sent on to a peer
        self.dropped = 0     # cancel requests for a peer that could not be sent on

    def resolve(self, pid: int, key: int) -> tuple[int, int] | None:
        """The key to look up here, or None when the request was another peer's
        (it has been forwarded, or dropped with a log line)."""
        if self.app.settings.peer_id <= 0:
            return pid, key
        owner = self.owner(pid, key)
        if owner is not None:
            self.forward(owner, pid, key)
            return None
        return self.local_key(pid, key)

    def owner(self, pid: int, key: int) -> int | None:
        """The peer id to forward this key to, or None if it is this process's to handle."""
        own = self.app.settings.peer_id
        if own <= 0:
            return None
        peer = peer_of(pid, key)
        return None if peer == own else peer

    @staticmethod
    def local_key(pid: int, key: int) -> tuple[int, int]:
        """The key as issued here: a forwarded request arrives with its TTL spent in part."""
        return pid, key | TTL_MASK

    def forward(self, peer_id: int, pid: int, key: int) -> bool:
        """Send the request on to ``peer_id``; False (logged) if it could not be."""
        if key & TTL_MASK == 0:
            self.dropped += 1
            log.warning("failed to forward cancel request because its TTL was exhausted")
            return False
        entry = self.app.cfg.peers.get(peer_id)
        if entry is None:
            self.dropped += 1
            log.warning("could not find peer %d to forward a cancel request to", peer_id)
            return False
        s = self.app.settings
        timeout = s.cancel_wait_timeout or None
        slots = self._slots_for(peer_id, entry.pool_size or s.default_pool_size)
        if not slots.acquire(timeout=timeout):
            self.dropped += 1
            log.warning("cancel request for peer %d dropped: %d already in flight",
                        peer_id, entry.pool_size or s.default_pool_size)
            return False
        log.info("forwarding cancel request to peer %d", peer_id)
        self._busy[peer_id] = self._busy.get(peer_id, 0) + 1
        try:
            send_cancel(entry.host, entry.port, pid, key - 1, timeout=timeout or _SEND_LIMIT)
        except OSError as exc:
            self.dropped += 1
            log.warning("forwarding a cancel request to peer %d (%s:%d) failed: %s",
                        peer_id, entry.host, entry.port, exc)
            return False
        finally:
            self._busy[peer_id] -= 1
            slots.release()
        self.forwarded += 1
        return True

    def in_flight(self, peer_id: int) -> int:
        """Cancel requests being sent to ``peer_id`` now (for SHOW PEER_POOLS)."""
        return self._busy.get(peer_id, 0)

    def _slots_for(self, peer_id: int, size: int) -> BoundedSemaphore:
        slots = self._slots.get((peer_id, size))
        if slots is None:
            slots = self._slots[(peer_id, size)] = BoundedSemaphore(max(1, size))
        return slots
