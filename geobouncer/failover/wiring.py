"""How the pooler uses clusters and replica sets: node and replica database
keys, credentials for the pooler's own checks, what to close when a writer
fails or changes, and where host trouble is reported. Owned by the Bouncer
(app.py: ``app.failover``); clusters and replica sets reach it from there."""

from __future__ import annotations

import gevent

from . import probe
from .replicas import ReplicaSet
from .switchover import WRITER_LOST_CODES, Cluster


class FailoverWiring:
    __slots__ = ("app",)

    def __init__(self, app):
        self.app = app    # the Bouncer: config, pools, clusters, replica sets

    def setup(self) -> None:
        for name, entry in self.app.cfg.databases.items():
            if entry.topology_query and name not in self.app.clusters:
                cluster = self.app.clusters[name] = Cluster(self.app, entry)
                cluster.start()
            if entry.replicas and name not in self.app.replica_sets:
                replicas = self.app.replica_sets[name] = ReplicaSet(self.app, entry)
                for replica in replicas.replicas:
                    self.app.extra_entries[replica.key] = replica.entry
                replicas.start()
        for pool in self.app.pools.values():
            pool.cluster = self.app.clusters.get(pool.db.name)

    def reload(self, new) -> None:
        """RELOAD: clusters and replica sets whose entry changed start afresh;
        unchanged clusters run their topology query again."""
        for registry in (self.app.clusters, self.app.replica_sets):
            for name, item in list(registry.items()):
                entry = new.databases.get(name)
                if entry is None or entry != item.entry:
                    item.stop()
                    del registry[name]
                elif registry is self.app.clusters:
                    gevent.spawn(item.discover_quietly)
        self.app.extra_entries = {k: v for k, v in self.app.extra_entries.items()
                              if any(k in (n.key for n in c.nodes.values()) for c in self.app.clusters.values())
                              or any(k == r.key for rs in self.app.replica_sets.values() for r in rs.replicas)}
        self.setup()

    def probe_credentials(self, entry):
        """(user, password, scram_keys) the pooler's own checks log in with: the
        entry's forced user, else a user whose pool for this database exists."""
        if entry.user:
            return entry.user, entry.password or self.app.auth_file.get(entry.user), None
        for pool in self.app.pools.values():
            if pool.db.name == entry.name or pool.db.dbname == (entry.dbname or entry.name):
                if pool.server_password or pool.scram_keys:
                    return pool.user, pool.server_password, pool.scram_keys
        auth_user = entry.auth_user or self.app.settings.auth_user
        if auth_user and auth_user in self.app.auth_file:
            return auth_user, self.app.auth_file[auth_user], None
        return None

    def register_cluster_nodes(self, cluster) -> None:
        """Each node of a cluster is a database key of its own, with pools kept
        open ahead of need for the users the cluster's database already has."""
        users = {p.user for p in self.app.pools.values() if p.db.name == cluster.name}
        for node in cluster.nodes.values():
            entry = probe.node_entry(cluster.entry, node.key, node.host, node.port)
            self.app.extra_entries[node.key] = entry
            for user in users:
                pool = self.app.get_pool(entry, user, None)
                if pool.server_count() == 0 and node.role != "down":
                    gevent.spawn(self.app.janitor.fill_pool, pool, 1)

    def cluster_of(self, pool):
        return self.app.clusters.get(pool.db.name)

    def writer_lost(self, cluster, node) -> None:
        """Close what we hold on the failed writer; active links die on their own."""
        for pool in list(self.app.pools.values()):
            for server in list(pool.idle):
                if (server.host, server.port) == (node.host, node.port):
                    server.close("writer lost: switchover")
            for server in pool.active:
                if (server.host, server.port) == (node.host, node.port):
                    server.stale = True

    def writer_changed(self, cluster, old, new) -> None:
        for pool in self.app.pools.values():
            if pool.db.name == cluster.name:
                pool.last_login_error = None
                for server in list(pool.idle):
                    if (server.host, server.port) != (new.host, new.port):
                        server.close("not the writer any more")
                for server in pool.active:
                    if (server.host, server.port) != (new.host, new.port):
                        server.stale = True

    def server_trouble(self, server, reason: str, sqlstate: str | None) -> None:
        """A server connection failed or reported an error that may mean its
        host is gone or demoted: tell the cluster or the replica set."""
        if sqlstate is not None and sqlstate not in WRITER_LOST_CODES:
            return
        name = server.pool.db.name
        cluster = self.app.clusters.get(name)
        if cluster is None:
            cluster = next((c for c in self.app.clusters.values()
                            if any(n.key == name for n in c.nodes.values())), None)
        if cluster is not None:
            cluster.writer_failed(server.host, server.port, reason)
            return
        if sqlstate == "25006":
            return      # read-only transaction: the client's own error on a replica
        for replicas in self.app.replica_sets.values():
            if any(r.key == name for r in replicas.replicas):
                replicas.ban(name, reason)

    def announce(self, event: str, *fields) -> None:
        """Tell the other workers what this one found (admin/worker_events.py)."""
        if self.app.cfg.peers:
            from ..admin import worker_events
            worker_events.send(self.app, event, *fields)

    def active_servers_for(self, replica) -> int:
        return sum(len(p.active) for p in self.app.pools.values() if p.db.name == replica.key)

    def pick_replica(self, dbname: str) -> str | None:
        """The database key of a replica for a read on ``dbname``, or None."""
        replicas = self.app.replica_sets.get(dbname)
        if replicas is None:
            return None
        replica = replicas.pick()
        return replica.key if replica is not None else None
