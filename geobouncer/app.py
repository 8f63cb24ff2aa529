"""The composition root: config -> pools -> listeners -> background greenlets.

One Bouncer object owns everything live: the current config snapshot, the
auth_file contents, the pools, the clients and their cancel keys. The net layer
calls back into it for decisions that need that global view. The objects it
owns do the rest with it: net/release.py gives servers back, janitor.py keeps
the timeouts, lifecycle.py moves the run state (PAUSE, SUSPEND, shutdown).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from time import monotonic

import gevent
from gevent.event import Event

from . import log as logsetup
from . import stats
from .admin.console import AdminConsole
from .auth import AuthFileError, load_auth_file
from .config import ConfigError, diff_configs
from .failover.replicas import ReplicaSet
from .failover.switchover import Cluster
from .failover.wiring import FailoverWiring
from .janitor import Janitor
from .lifecycle import Lifecycle
from .net import params as tracked_params
from .net.client import ClientConnection
from .net.listener import Listeners
from .net.release import ServerReleaser
from .net.secrets import SecretLookup, load_auth_rules
from .net.server import send_cancel
from .net.tls import is_tls
from .net.tls_config import TlsConfig
from .peers import Peers
from .pool.cancel_keys import new_cancel_key
from .pool.pool import ConnectionCounters, Pool, PoolLimits
from .pool.statements import Registry
from .routing import HookLoadError, Hooks
from .routing.classify import Classifier
from .signals import Signals
from .workers import inherited_sockets, load_config

log = logging.getLogger("geobouncer")



class Bouncer:
    def __init__(self, config_path: str):
        self.config_path = config_path
        self.cfg = load_config(config_path)
        self.settings = self.cfg.pgbouncer
        self._check_supported(self.settings)
        self.tls = TlsConfig.from_config(self.cfg)
        self.hba, self.ident_maps = load_auth_rules(self.cfg)
        self.auth_file = self._load_auth_file(self.cfg)
        self.tracked = tracked_params.tracked_names(self.settings)
        self.pools: dict[tuple[str, str], Pool] = {}
        self.counters = ConnectionCounters()
        self.clients: set[ClientConnection] = set()
        self.cancel_keys: dict[tuple[int, int], ClientConnection] = {}
        self.paused = False               # PAUSE / SUSPEND: no server assignments
        self.paused_dbs: set[str] = set()  # PAUSE db, KILL db
        self.suspended = False
        self.resumed = Event()
        self.resumed.set()
        self.disabled: set[str] = set()
        self.started = monotonic()
        self.listeners = Listeners(self)
        self.releaser = ServerReleaser(self)
        self.secrets = SecretLookup(self)
        self.janitor = Janitor(self)
        self.admin = AdminConsole(self)
        self.signals = Signals(self)
        self.lifecycle = Lifecycle(self)   # PAUSE, RESUME, SUSPEND, the shutdowns, the pidfile
        self.stats = stats.Stats(self)
        self.peers = Peers(self)
        self.shutting_down = False
        self.stopped = Event()
        self._ids = 0
        self._rr: dict[str, int] = {}
        self.max_packet_size = self.settings.max_packet_size
        self.registry = Registry()
        self.clusters: dict[str, Cluster] = {}          # databases with a topology_query
        self.replica_sets: dict[str, ReplicaSet] = {}   # databases that list replicas
        self.extra_entries: dict = {}                   # node and replica keys -> entries
        self.failover = FailoverWiring(self)            # clusters and replica sets <-> pools
        self.shard_stats: dict = {}                     # sharded database -> ShardCounters
        self.classifier = Classifier(self.settings.write_functions)
        try:
            self.hooks = Hooks.from_settings(self.settings, self.cfg.resolve_path)
        except HookLoadError as exc:
            raise ConfigError(str(exc), file=self.cfg.path) from None

    # --- start / stop ----------------------------------------------------------
    def start(self) -> None:
        self.lifecycle.check_pidfile()   # another instance running: stop before listening
        self.signals.install()        # before listening: a signal must never find the default action
        self.listeners.start(inherited_sockets())
        self.failover.setup()
        gevent.spawn(self.janitor.run)
        if self.cfg.sharded:
            from .net.two_phase import recovery_loop
            gevent.spawn(recovery_loop, self)
        gevent.spawn(self.stats.report_loop)
        if self.settings.metrics_port:
            from .metrics import MetricsServer  # prometheus_client only when asked for
            self.metrics = MetricsServer(self)
            self.metrics.start()
        self.lifecycle.write_pidfile()
        log.info("process up: geobouncer, pid=%d", os.getpid())

    def serve_forever(self, on_ready=None) -> None:
        self.start()
        if on_ready is not None:
            on_ready()            # -d: the waiting parent may exit now (cli.py)
        self.stopped.wait()
        self.lifecycle.remove_pidfile()
        log.info("shutting down")

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    # --- config ------------------------------------------------------------------
    @staticmethod
    def _check_supported(settings) -> None:
        """Refuse settings geobouncer cannot honour yet, rather than ignore them:
        a config asking for TLS must never run unencrypted."""
        if settings.auth_type in ("pam", "ldap"):
            raise ConfigError(f"auth_type {settings.auth_type} is not supported by geobouncer yet",
                              key="auth_type")

    def _load_auth_file(self, cfg) -> dict[str, str]:
        path = cfg.pgbouncer.auth_file
        if not path:
            return {}
        return load_auth_file(cfg.resolve_path(path))

    def reload(self) -> None:
        """SIGHUP / RELOAD: re-read the config and the auth_file; apply what can change live."""
        step = "config"
        try:
            new = load_config(self.config_path)
            self._check_supported(new.pgbouncer)
            step = "tls"
            tls = TlsConfig.from_config(new)
            step = "auth"
            hba, ident_maps = load_auth_rules(new)
            auth_file = self._load_auth_file(new)
        except (ConfigError, AuthFileError) as exc:
            log.error("config reload failed, keeping the old config: %s", exc)
            if step == "tls":   # PgBouncer's line for this case, which its users' log alerts know
                log.error("TLS configuration could not be reloaded, keeping old configuration")
            return False
        server_tls_changed = tls.server.identity != self.tls.server.identity
        self.tls, self.hba, self.ident_maps = tls, hba, ident_maps
        _, restart_only = diff_configs(self.cfg, new)
        for key in sorted(restart_only):
            log.warning("%s changed in the config but needs a restart to apply", key)
        self._apply_config(new, auth_file, server_tls_changed)
        logsetup.reopen(new.resolve_path(self.settings.logfile))   # log rotation, as PgBouncer
        return True

    def set_setting(self, name: str, value) -> str | None:
        """Console SET of one reloadable key: applied like a RELOAD that changes
        only it. Returns the reason it was refused, or None."""
        values = self.settings.as_dict()
        values[name] = value
        new = dataclasses.replace(self.cfg, pgbouncer=type(self.settings)(values))
        try:
            self._check_supported(new.pgbouncer)
            auth_file = self._load_auth_file(new) if name == "auth_file" else self.auth_file
            tls = TlsConfig.from_config(new) if "tls" in name else self.tls
            rules = load_auth_rules(new) if name.startswith("auth_") else (self.hba, self.ident_maps)
        except (ConfigError, AuthFileError) as exc:
            return str(exc)
        server_tls_changed = tls.server.identity != self.tls.server.identity
        self.tls, (self.hba, self.ident_maps) = tls, rules
        self._apply_config(new, auth_file, server_tls_changed)
        return None

    def _apply_config(self, new, auth_file, server_tls_changed: bool = False) -> None:
        self.cfg = new
        self.settings = new.pgbouncer
        self.auth_file = auth_file
        self.tracked = tracked_params.tracked_names(self.settings)
        self.max_packet_size = self.settings.max_packet_size
        for (dbname, user), pool in list(self.pools.items()):
            entry = new.database_for(dbname)
            if entry is None:
                continue   # PgBouncer keeps serving existing clients of a removed database
            old_entry = pool.db
            pool.db = entry
            pool.limits = self._limits(entry, user)
            pool.tracked = frozenset(self.tracked.values())
            self._refresh_password(pool)
            if (self._set_tracking(pool) or _server_identity(entry) != _server_identity(old_entry)
                    or server_tls_changed):
                self.releaser.reconnect_pool(pool)
        for error in self.hooks.reload(self.settings, new.resolve_path):
            log.debug("hook reload: %s", error)
        self.classifier = Classifier(self.settings.write_functions)
        self.failover.reload(new)
        self.listeners.retune(self.settings)
        s = self.settings
        logsetup.apply_syslog((s.syslog_ident, s.syslog_facility) if s.syslog else None)

    def database_for(self, name: str):
        if name not in self.cfg.databases and name in self.extra_entries:
            return self.extra_entries[name]
        return self.cfg.database_for(name)

    def is_database_key(self, key: str) -> bool:
        """A [databases] entry (or a cluster node / replica key) a routing hook may name."""
        return key in self.cfg.databases or key in self.extra_entries

    # --- pools ---------------------------------------------------------------------
    def _limits(self, db, user: str) -> PoolLimits:
        s = self.settings
        user_entry = self.cfg.users.get(user)

        def pick(attr, default):
            for source in (user_entry, db):
                value = getattr(source, attr, None) if source is not None else None
                if value is not None:
                    return value
            return default

        return PoolLimits(
            pool_size=pick("pool_size", s.default_pool_size),
            min_pool_size=db.min_pool_size if db.min_pool_size is not None else s.min_pool_size,
            reserve_pool_size=pick("reserve_pool_size", s.reserve_pool_size),
            pool_mode=pick("pool_mode", s.pool_mode),
            max_db_connections=db.max_db_connections if db.max_db_connections is not None else s.max_db_connections,
            max_user_connections=(user_entry.max_user_connections if user_entry is not None
                                  and user_entry.max_user_connections is not None else s.max_user_connections),
            round_robin=s.server_round_robin,
        )

    def get_pool(self, db, user: str, auth_result, forced_user: str | None = None,
                 secret: str | None = None) -> Pool:
        server_user = forced_user or db.user or user
        key = (db.name, server_user)
        pool = self.pools.get(key)
        if pool is None:
            pool = Pool(db, server_user, self._limits(db, server_user), self.counters)
            pool.registry = self.registry
            pool.parsed = self.registry.parsed_set()
            pool.on_failure = self.failover.server_trouble
            pool.cluster = self.clusters.get(db.name)
            self._set_tracking(pool)
            pool.tracked = frozenset(self.tracked.values())
            pool.on_server_closed = self._server_closed
            pool.paused = self.paused or db.name in self.paused_dbs
            self._refresh_password(pool)
            self.pools[key] = pool
        pool.unused_since = None          # not freed under a client logging in (autodb_idle_timeout)
        if auth_result is not None and server_user == user:
            client_key = getattr(auth_result, "scram_client_key", None)
            if client_key and (pool.scram_keys is None or pool.scram_keys[0] != client_key):
                pool.scram_keys = (client_key, auth_result.scram_server_key)
            password = getattr(auth_result, "password", None)
            if pool.server_password is None and password:
                pool.server_password = password
        if secret and server_user == user and not db.user and user not in self.auth_file:
            # Found by auth_query: PgBouncer logs in to the server with that secret.
            pool.server_password = secret
        return pool

    def _set_tracking(self, pool: Pool) -> bool:
        """Whether the pool renames prepared statements; True if that changed."""
        limit = self.settings.max_prepared_statements
        # With routing a client's statements must follow it across pools, in every mode.
        tracking = (pool.limits.pool_mode != "session" or self.hooks.enabled) and limit > 0
        changed = (tracking, limit) != (pool.tracking, pool.max_prepared)
        pool.tracking, pool.max_prepared = tracking, limit
        # Texts remembered pooler-wide: well beyond what the servers keep.
        self.registry.capacity = max(2000, 10 * limit)
        return changed

    def _refresh_password(self, pool: Pool) -> None:
        db = pool.db
        if db.user and db.user == pool.user and db.password:
            pool.server_password = db.password
        else:
            pool.server_password = self.auth_file.get(pool.user, pool.server_password)

    def hosts_for(self, pool: Pool):
        """Hosts to try for a new server connection, in order."""
        db = pool.db
        cluster = self.clusters.get(db.name)
        if cluster is not None:
            writer = cluster.writer_address()
            if writer is not None:
                return [writer]
        hosts = list(db.hosts) if db.hosts else [self.settings.unix_socket_dir or "/tmp"]
        ports = list(db.ports) if db.ports else [db.port]
        pairs = [(h, ports[i] if i < len(ports) else ports[-1]) for i, h in enumerate(hosts)]
        if len(pairs) > 1 and (db.load_balance_hosts or "round-robin") == "round-robin":
            start = self._rr.get(db.name, 0)
            self._rr[db.name] = start + 1
            start %= len(pairs)
            pairs = pairs[start:] + pairs[:start]
        return pairs

    def server_startup(self, pool: Pool) -> dict[str, str]:
        db = pool.db
        params = {"user": pool.user, "database": db.dbname or db.name}
        params.update(db.startup_params())
        return params

    def _server_closed(self, server, reason: str) -> None:
        if self.settings.log_disconnections:
            age = monotonic() - server.created_at
            log.info("%r: %s closing because: %s (age=%ds)", server, server.describe(), reason, age)

    # --- clients --------------------------------------------------------------------
    def accept(self, sock, addr, unix: bool) -> None:
        client = ClientConnection(self, sock, addr, unix)
        if self.shutting_down and self.shutting_down != "wait_for_clients":
            # (draining for clients: one accepted just before the listeners closed is served)
            client.send_error("57P01", "pgbouncer is shutting down", fatal=True)  # PgBouncer's text
            sock.close()
            return
        if len(self.clients) >= self.settings.max_client_conn:
            client.pending_error = ("53300", "no more connections allowed (max_client_conn)")
        self.clients.add(client)
        client.run()

    def register_client(self, client) -> tuple[int, int]:
        while True:
            key = new_cancel_key(self.settings.peer_id)
            if key not in self.cancel_keys:
                break
        self.cancel_keys[key] = client
        if client.pool is not None:
            client.pool.clients.add(client)
        return key

    def forget_client(self, client) -> None:
        self.clients.discard(client)
        self.cancel_keys.pop(client.cancel_key, None)
        if client.pool is not None:
            client.pool.clients.discard(client)
        if self.shutting_down:
            self.lifecycle.check_shutdown()

    def client_count_for_db(self, dbname: str) -> int:
        return sum(1 for c in self.clients if c.dbname == dbname and c.pool is not None)

    def client_count_for_user(self, user: str) -> int:
        return sum(1 for c in self.clients if c.user == user and c.pool is not None)

    def forward_cancel(self, pid: int, key: int) -> None:
        """A CancelRequest: reach the server running that client's query, and only it.
        Under peering a key another process issued is passed on to it (peers.py)."""
        local = self.peers.resolve(pid, key)
        if local is None:
            return              # another peer's key: forwarded to it, or dropped (logged)
        client = self.cancel_keys.get(local)
        if client is None:
            log.debug("cancel request for unknown key")
            return
        if client.admin:
            self.admin.cancel(client)
            return
        servers = [client.server] if client.shard_session is None else client.shard_session.linked_servers()
        for server in servers:
            if server is None or server.closed or server.outstanding <= 0:
                continue
            server.cancelling = True
            try:
                send_cancel(server.host, server.port, server.pid, server.key,
                            tls=self.tls.server if is_tls(server.sock) else None)
            except OSError as exc:
                log.warning("cancel request to %s failed: %s", server.describe(), exc)
            finally:
                server.cancelling = False

    # --- pause / resume (the transitions: lifecycle.py) ---------------------------
    def wait_resumed(self, pool, timeout) -> None:
        while self.paused or pool.paused:
            if not self.resumed.wait(timeout):
                return


def _server_identity(entry):
    return (entry.host, entry.port, entry.dbname, entry.user, entry.password)
