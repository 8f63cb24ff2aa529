"""Sharding counters for SHOW SHARDS / SHOW STATS (one object per sharded database)."""


class ShardCounters:
    __slots__ = ("queries", "single_shard", "multi_shard", "two_phase_commits", "two_phase_recovered")

    def __init__(self):
        self.queries = 0              # statements planned
        self.single_shard = 0         # sent to one shard
        self.multi_shard = 0          # sent to several and merged
        self.two_phase_commits = 0    # transactions committed with PREPARE TRANSACTION
        self.two_phase_recovered = 0  # prepared transactions resolved after a crash
