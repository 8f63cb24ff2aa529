"""Fast switchover for a database with a ``topology_query`` (pgbouncer-fast-switchover).

Theory of operation. At start and on RELOAD the topology query runs on the
configured host; its rows name the cluster's nodes (``endpoint``, with the port
as a column or as ``host:port``, else the configured port). Each node becomes a
database key of its own (its endpoint), so routing hooks can target a reader,
and the database itself always points at the current writer.

When the writer fails (connect failure, a broken server socket, an
admin-shutdown or read-only-transaction error), a switchover starts: new
transactions wait instead of failing, and every node that is not in its
failure delay is polled with ``select pg_is_in_recovery()`` each
polling_frequency; the first to answer false becomes the writer and the waiting
clients resume on it. The failed node is retried after server_failed_delay and
rejoins as a reader if it is in recovery. State is per node, so a second and a
third switchover run as the first.
"""

from __future__ import annotations

import logging
from time import monotonic

import gevent
from gevent.event import Event

from . import probe

log = logging.getLogger("geobouncer")

WRITER, READER, DOWN, UNKNOWN = "writer", "reader", "down", "unknown"
# Errors that mean the node we took for the writer is not (or no longer) one.
WRITER_LOST_CODES = frozenset({"57P01", "57P02", "57P03", "25006"})


class Node:
    __slots__ = ("host", "port", "key", "role", "retry_at", "probing")

    def __init__(self, host: str, port: int, key: str):
        self.host = host
        self.port = port
        self.key = key
        self.role = UNKNOWN
        self.retry_at = 0.0      # while down: when to try again (server_failed_delay)
        self.probing = False

    def __repr__(self) -> str:
        return f"<Node {self.key} {self.role}>"


class Cluster:
    """The nodes behind one clustered database, and which one is the writer."""

    def __init__(self, app, entry):
        self.app = app
        self.entry = entry
        self.name = entry.name
        host = entry.hosts[0] if entry.hosts else "127.0.0.1"
        self.nodes: dict[tuple[str, int], Node] = {}
        first = self._add_node(host, entry.port, f"{host}:{entry.port}")
        self.writer: Node | None = first          # trusted until proven otherwise
        first.role = WRITER
        self.switching = False
        self.verifying = False      # a failure was reported: checking the writer first
        self.switch_started = 0.0
        self.next_reader_check = 0.0
        self.ready = Event()
        self.ready.set()
        self.discovered = False
        self.switchovers = 0
        self._poller = None
        self._stopped = False

    # --- topology ------------------------------------------------------------
    def _add_node(self, host: str, port: int, key: str) -> Node:
        node = self.nodes.get((host, port))
        if node is None:
            node = self.nodes[(host, port)] = Node(host, port, key)
        return node

    def start(self) -> None:
        gevent.spawn(self._discover_loop)

    def stop(self) -> None:
        self._stopped = True
        self.ready.set()

    def _discover_loop(self) -> None:
        """Run the topology query until it works (the writer may be down at start)."""
        delay = max(self.app.settings.polling_frequency, 0.5)
        while not self._stopped and not self.discovered:
            if self.app.failover.probe_credentials(self.entry) is None:
                # Without user= in the entry, the first client's login gives us one.
                gevent.sleep(0.2)
                continue
            try:
                self.discover()
            except probe.ProbeFailed as exc:
                log.warning("topology query for %s failed: %s", self.name, exc)
                gevent.sleep(delay)
                delay = min(delay * 2, self.app.settings.server_failed_delay or 30)

    def discover_quietly(self) -> None:
        try:
            self.discover()
        except probe.ProbeFailed as exc:
            log.warning("topology query for %s failed: %s", self.name, exc)

    def discover(self) -> None:
        writer = self.writer or next(iter(self.nodes.values()))
        rows = probe.run(self.app, self.entry, writer.host, writer.port, self.entry.topology_query,
                         self._timeout())
        for row in rows:
            host, port = _endpoint(row, self.entry.port)
            if host:
                self._add_node(host, port, f"{host}:{port}")
        self.discovered = True
        self.app.failover.register_cluster_nodes(self)
        log.info("topology of %s: %s", self.name, ", ".join(n.key for n in self.nodes.values()))
        if self._in_recovery(writer) is True:
            # The configured host is a reader now (an earlier switchover): find the writer.
            self.writer_failed(writer.host, writer.port, "configured host is in recovery")
            writer.role = READER
            return
        self._check_roles()

    def _check_roles(self) -> None:
        """Ask every node whether it is in recovery (at start, and for late joiners)."""
        for node in list(self.nodes.values()):
            if node.role == UNKNOWN or node.role == READER:
                in_recovery = self._in_recovery(node)
                if in_recovery is False and self.writer is not node and not self.switching:
                    if self.writer is not None and self.writer.role == WRITER and self.writer is not node:
                        log.warning("%s: %s is not in recovery but %s is the writer: ignoring it",
                                    self.name, node.key, self.writer.key)
                        node.role = DOWN
                        node.retry_at = monotonic() + self.app.settings.server_failed_delay
                        continue
                    self._promote(node)
                elif in_recovery is True:
                    node.role = READER

    # --- the writer ------------------------------------------------------------
    def writer_address(self) -> tuple[str, int] | None:
        node = self.writer
        return (node.host, node.port) if node is not None and not self.switching else None

    def is_writer(self, host: str, port: int) -> bool:
        node = self.writer
        return node is not None and node.host == host and node.port == port

    def writer_failed(self, host: str, port: int, reason: str) -> None:
        """Something went wrong with host:port; if it is the writer, check it
        (a client's own error, a terminated backend are no reason to switch)
        and switch over if it is unreachable or in recovery. New transactions
        wait meanwhile."""
        if self.switching or self.verifying or not self.is_writer(host, port) or self._stopped:
            return
        self.verifying = True
        self.switch_started = monotonic()
        self.ready.clear()
        gevent.spawn(self._verify, self.writer, reason)

    def _verify(self, node: Node, reason: str) -> None:
        try:
            in_recovery = self._in_recovery(node)
        finally:
            self.verifying = False
        if in_recovery is False and self.writer is node:
            log.info("%s: writer %s is fine after: %s", self.name, node.key, reason)
            self.ready.set()
            return
        self._start_switchover(node, reason if in_recovery is None else "writer is in recovery")

    def _start_switchover(self, node: Node, reason: str) -> None:
        if self.switching:
            return
        if self.writer is not node:       # someone promoted meanwhile
            self.ready.set()
            return
        node.role = DOWN
        node.retry_at = monotonic() + self.app.settings.server_failed_delay
        self.switching = True
        self.ready.clear()
        log.warning("%s: writer %s failed (%s): switchover started", self.name, node.key, reason)
        self.app.failover.writer_lost(self, node)
        self.app.failover.announce("writer_failed", self.name, node.host, node.port)
        if self._poller is None or self._poller.dead:
            self._poller = gevent.spawn(self._poll_for_writer)

    def _poll_for_writer(self) -> None:
        # A down node (the old writer, say) is still polled, but at most once a
        # second, so a quick restart is noticed without storming a dead host.
        last_try: dict[Node, float] = {}
        while self.switching and not self._stopped:
            now = monotonic()
            for node in list(self.nodes.values()):
                if node.probing:
                    continue
                if node.role == DOWN and now < node.retry_at and now - last_try.get(node, 0.0) < 1.0:
                    continue
                last_try[node] = now
                gevent.spawn(self._poll_node, node)
            gevent.sleep(self.app.settings.polling_frequency or 0.1)

    def _poll_node(self, node: Node) -> None:
        node.probing = True
        try:
            in_recovery = self._in_recovery(node)
        finally:
            node.probing = False
        if in_recovery is False and self.switching:
            self._promote(node)
        elif in_recovery is True and node.role != READER:
            node.role = READER
            node.retry_at = 0.0

    def _promote(self, node: Node) -> None:
        old = self.writer
        self.writer = node
        node.role = WRITER
        if self.switching:
            took = (monotonic() - self.switch_started) * 1000
            self.switchovers += 1
            log.warning("%s: %s is the new writer (switchover took %.0f ms)", self.name, node.key, took)
        elif old is not node:
            log.info("%s: writer is %s", self.name, node.key)
        announce = self.switching or old is not node
        self.switching = False
        self.app.failover.writer_changed(self, old, node)
        self.ready.set()
        if announce and old is not None:
            self.app.failover.announce("writer", self.name, node.host, node.port)

    def peer_found_writer(self, host: str, port: int) -> None:
        """Another worker has a new writer at host:port: check ours (workers = N)."""
        if self.is_writer(host, port) or self._stopped:
            return
        node = next((n for n in self.nodes.values() if (n.host, n.port) == (host, port)), None)
        if self.switching:
            if node is not None and not node.probing:
                gevent.spawn(self._poll_node, node)       # promoted if it is not in recovery
        elif self.writer is not None:
            self.writer_failed(self.writer.host, self.writer.port, "another worker found a new writer")

    def _in_recovery(self, node: Node) -> bool | None:
        try:
            rows = probe.run(self.app, self.entry, node.host, node.port,
                             "select pg_is_in_recovery()", self._timeout())
        except probe.ProbeFailed as exc:
            if node.role != DOWN:
                log.info("%s: node %s unreachable: %s", self.name, node.key, exc)
            if node is not self.writer or self.switching:
                node.role = DOWN
                node.retry_at = monotonic() + self.app.settings.server_failed_delay
            return None
        return bool(rows) and rows[0][0] == "t"

    def _timeout(self) -> float:
        return self.app.settings.health_check_timeout or self.app.settings.server_connect_timeout or 2.0

    # --- periodic ------------------------------------------------------------
    def maintain(self) -> None:
        """From the janitor: retry down nodes whose failure delay passed, so an
        old writer rejoins as a reader; check readers every health_check_period."""
        if self.switching or self.verifying or self._stopped:
            return
        now = monotonic()
        check_readers = now >= self.next_reader_check
        if check_readers:
            self.next_reader_check = now + (self.app.settings.health_check_period or 5.0)
        for node in list(self.nodes.values()):
            if node.probing:
                continue
            if (node.role == DOWN and now >= node.retry_at) or (check_readers and node.role == READER):
                gevent.spawn(self._recheck, node)

    def _recheck(self, node: Node) -> None:
        node.probing = True
        try:
            in_recovery = self._in_recovery(node)
        finally:
            node.probing = False
        if in_recovery is None:
            if node.role == READER:
                node.role = DOWN
                node.retry_at = monotonic() + self.app.settings.server_failed_delay
            return
        if in_recovery is True:
            if node.role != READER:
                log.info("%s: %s is back, as a reader", self.name, node.key)
            node.role = READER
        elif in_recovery is False and node is not self.writer:
            log.warning("%s: %s is up and not in recovery while %s is the writer (split brain?)",
                        self.name, node.key, self.writer.key if self.writer else "none")
            node.role = DOWN
            node.retry_at = monotonic() + self.app.settings.server_failed_delay

    def wait_for_writer(self, timeout: float | None) -> bool:
        return self.ready.wait(timeout)

    def rows(self) -> list[list]:
        """For SHOW TOPOLOGY."""
        return [[self.name, n.key, n.host, n.port, n.role, int(self.switching), self.switchovers]
                for n in self.nodes.values()]


def _endpoint(row: list, default_port: int) -> tuple[str | None, int]:
    """A topology row: endpoint [, port] or 'host:port'."""
    if not row or not row[0]:
        return None, default_port
    text = row[0].strip()
    port = default_port
    if len(row) > 1 and row[1] and row[1].strip().isdigit():
        port = int(row[1])
    elif text.count(":") == 1:
        text, _, port_text = text.partition(":")
        if port_text.isdigit():
            port = int(port_text)
    return text, port
