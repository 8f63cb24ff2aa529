"""Sharding: pure parts (hashing, rules, planning, merging results); no sockets."""
