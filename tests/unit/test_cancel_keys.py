"""Cancel keys: unpredictable (the OS CSPRNG, not a Mersenne Twister that a
client could reconstruct from ~700 keys) and in PgBouncer's peer layout."""

import random

from geobouncer.pool import cancel_keys
from geobouncer.pool.cancel_keys import TTL_MASK, new_cancel_key, peer_of


def test_keys_come_from_secrets_not_the_random_module(monkeypatch):
    # Seeding the random module must not make keys repeat.
    random.seed(1234)
    first = [new_cancel_key() for _ in range(50)]
    random.seed(1234)
    second = [new_cancel_key() for _ in range(50)]
    assert first != second
    calls = []
    monkeypatch.setattr(cancel_keys.secrets, "token_bytes", lambda n: calls.append(n) or b"\xff" * n)
    assert new_cancel_key() == (0x7FFFFFFF, 0xFFFFFFFF)
    assert calls == [8]


def test_pid_part_is_positive_and_keys_are_distinct():
    keys = {new_cancel_key() for _ in range(5000)}
    assert len(keys) == 5000
    assert all(0 <= pid < 2 ** 31 and 0 <= key < 2 ** 32 for pid, key in keys)


def test_peer_id_and_ttl_in_pgbouncer_layout(monkeypatch):
    monkeypatch.setattr(cancel_keys.secrets, "token_bytes", lambda n: bytes(n))
    pid, key = new_cancel_key(peer_id=0x1234)
    assert pid.to_bytes(4, "big") == b"\x00\x34\x12\x00"
    assert key & TTL_MASK == TTL_MASK
    assert peer_of(pid, key) == 0x1234
    for peer in (1, 255, 256, 16383):
        assert peer_of(*new_cancel_key(peer)) == peer
