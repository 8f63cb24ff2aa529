"""Which cancel keys a peer handles itself and which it passes on (peers.py), no sockets."""

from types import MappingProxyType, SimpleNamespace

from geobouncer.config import PeerEntry
from geobouncer.peers import Peers
from geobouncer.pool.cancel_keys import TTL_MASK, new_cancel_key


def peers_for(peer_id: int, table=None) -> Peers:
    app = SimpleNamespace(settings=SimpleNamespace(peer_id=peer_id, cancel_wait_timeout=1.0,
                                                   default_pool_size=2),
                          cfg=SimpleNamespace(peers=MappingProxyType(table or {})))
    return Peers(app)


def test_without_peering_every_key_is_looked_up_as_is():
    peers = peers_for(0)
    key = new_cancel_key(5)
    assert peers.resolve(*key) == key
    assert peers.forwarded == peers.dropped == 0


def test_own_keys_are_looked_up_with_the_ttl_bits_set():
    peers = peers_for(7)
    pid, key = new_cancel_key(7)
    spent = key & ~TTL_MASK | 1              # as it arrives after two hops
    assert peers.resolve(pid, spent) == (pid, key)
    assert peers.owner(pid, key) is None


def test_another_peers_key_is_not_looked_up_here():
    peers = peers_for(1)                     # no [peers] entry for 2: dropped
    pid, key = new_cancel_key(2)
    assert peers.owner(pid, key) == 2
    assert peers.resolve(pid, key) is None
    assert peers.dropped == 1 and peers.forwarded == 0


def test_a_spent_ttl_is_never_forwarded():
    peers = peers_for(1, {2: PeerEntry(peer_id=2, host="127.0.0.1", port=1)})
    pid, key = new_cancel_key(2)
    assert peers.forward(2, pid, key & ~TTL_MASK) is False
    assert peers.dropped == 1 and peers.in_flight(2) == 0
