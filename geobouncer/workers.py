"""``workers = N``: a small supervisor and N serving processes (gunicorn-style).

The supervisor binds the listening sockets itself (TCP on listen_addr:listen_port,
and the unix socket in unix_socket_dir), writes the pidfile, and starts N ordinary
geobouncer processes that inherit those sockets and accept on them. Sharing the
sockets, rather than each worker binding its own with SO_REUSEPORT, is what makes
a rolling restart lose nothing: a worker that stops accepting closes only its copy,
and connections already queued in the kernel are taken by the others. (With
SO_REUSEPORT each process owns an accept queue, and the kernel resets whatever is
queued on a socket being closed — refused connections in the middle of a restart.)

Each worker is told who it is by the environment (``GEOBOUNCER_WORKER`` =
``index,count,rundir``; ``GEOBOUNCER_LISTEN_FDS`` = the inherited descriptors) and
then sees the configuration with these changes (``worker_view``):

- ``peer_id`` = its index, ``[peers]`` = the other workers, each on its private
  unix socket ``rundir/w<index>/.s.PGSQL.<port>``: a CancelRequest reaching the
  wrong worker is forwarded to the right one (peers.py);
- the connection limits (max_client_conn, default_pool_size, min/reserve pool
  sizes, max_db/user_connections, max_db/user_client_connections and their
  [databases] / [users] overrides) divided by N, rounded down but never below 1,
  so the workers together never open more server connections than one process
  would (a limit below N becomes 1 per worker);
- no pidfile (the supervisor's); metrics_port, when set, becomes
  metrics_port + index - 1: each worker is its own scrape target (and its
  /metrics/all the whole pooler's, metrics_all.py).

Signals to the supervisor are passed to every worker: SIGHUP (RELOAD), SIGUSR1
(PAUSE), SIGUSR2 (RESUME), SIGINT (safe shutdown), SIGTERM (shutdown once
clients are gone) and SIGQUIT (immediate shutdown); after the last three the
supervisor exits when the last worker has. (The worker must handle the signal: a
geobouncer without SIGUSR1/SIGUSR2 handling dies of them and is started again.) A worker that exits on its own (a crash, or a SIGTERM sent to it alone, which
is how a rolling restart is done: one worker at a time) is started again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import socket as pysocket
import subprocess
import sys
import tempfile
from time import monotonic
from types import MappingProxyType

import gevent

from . import pidfile
from .net.sockopts import defer_accept
from .config import Config, PeerEntry, Settings
from .config import load_config as _load_config

log = logging.getLogger("geobouncer")

WORKER_ENV = "GEOBOUNCER_WORKER"
FDS_ENV = "GEOBOUNCER_LISTEN_FDS"
FORWARDED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
RESPAWN_DELAY = 1.0   # a worker that died younger than this waits before its restart,
MAX_RESPAWN_DELAY = 30.0  # twice as long each time it dies young again, up to this

SPLIT_SETTINGS = ("max_client_conn", "default_pool_size", "min_pool_size", "reserve_pool_size",
                  "max_db_connections", "max_user_connections", "max_db_client_connections",
                  "max_user_client_connections")
SPLIT_DATABASE = ("pool_size", "min_pool_size", "reserve_pool_size", "max_db_connections",
                  "max_db_client_connections")
SPLIT_USER = ("pool_size", "reserve_pool_size", "max_user_connections", "max_user_client_connections")


# --- the worker's side ------------------------------------------------------------------

def load_config(path) -> Config:
    """The configuration as this process must see it: as written, or a worker's view."""
    cfg = _load_config(path)
    me = os.environ.get(WORKER_ENV)
    if not me:
        return cfg
    index, count, rundir = me.split(",", 2)
    return worker_view(cfg, int(index), int(count), rundir)


def worker_view(cfg: Config, index: int, count: int, rundir: str) -> Config:
    s = cfg.pgbouncer.as_dict()
    for name in SPLIT_SETTINGS:
        s[name] = _share(s[name], count)
    s.update(peer_id=index, workers=1, pidfile=None, unix_socket_dir=_worker_dir(rundir, index))
    if s["metrics_port"]:
        s["metrics_port"] += index - 1
    peers = {i: PeerEntry(peer_id=i, host=_worker_dir(rundir, i), port=s["listen_port"])
             for i in range(1, count + 1) if i != index}
    databases = {name: _split_entry(db, SPLIT_DATABASE, count) for name, db in cfg.databases.items()}
    users = {name: _split_entry(u, SPLIT_USER, count) for name, u in cfg.users.items()}
    return dataclasses.replace(cfg, pgbouncer=Settings(s), peers=MappingProxyType(peers),
                               databases=MappingProxyType(databases), users=MappingProxyType(users))


def _share(value, count: int):
    """One worker's part of a limit: 0 / None (no limit, not set) stay as they are."""
    return value if not value else max(1, value // count)


def _split_entry(entry, fields, count: int):
    return dataclasses.replace(entry, **{f: _share(getattr(entry, f), count) for f in fields})


def _worker_dir(rundir: str, index: int) -> str:
    return os.path.join(rundir, f"w{index}")


def inherited_sockets() -> list[pysocket.socket]:
    """The listening sockets the supervisor passed down (none outside workers mode)."""
    fds = os.environ.get(FDS_ENV)
    if not fds or not os.environ.get(WORKER_ENV):
        return []
    return [pysocket.socket(fileno=int(fd)) for fd in fds.split(",") if fd]


# --- the supervisor ---------------------------------------------------------------------

class Supervisor:
    """Runs ``cfg.pgbouncer.workers`` geobouncer processes on shared listening sockets."""

    def __init__(self, path: str, cfg: Config, quiet: bool = False, verbose: int = 0):
        self.path = os.path.abspath(path)
        self.cfg = cfg
        self.count = cfg.pgbouncer.workers
        self.flags = (["-q"] if quiet else []) + ["-v"] * verbose
        self.sockets: list[pysocket.socket] = []
        self.unix_path: str | None = None
        self.rundir = ""
        self.procs: dict[int, subprocess.Popen] = {}
        self.started: dict[int, float] = {}
        self.delays: dict[int, float] = {}
        self.stopping = False

    def run(self) -> int:
        s = self.cfg.pgbouncer
        pidfile.check(self._pidfile())
        self._bind()
        base = self.cfg.resolve_path(s.unix_socket_dir) if s.unix_socket_dir else None
        self.rundir = tempfile.mkdtemp(prefix="geobouncer-workers-", dir=base if base and len(base) < 60
                                       else None)
        for i in range(1, self.count + 1):
            os.mkdir(_worker_dir(self.rundir, i), 0o700)
        pidfile.write(self._pidfile())
        for sig in FORWARDED:
            gevent.signal_handler(sig, self._forward, sig)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            gevent.signal_handler(sig, self._stop, sig)
        log.info("supervisor up: pid=%d, %d workers", os.getpid(), self.count)
        try:
            for i in range(1, self.count + 1):
                self._spawn(i)
            self._watch()
        finally:
            self._cleanup()
        log.info("supervisor: all workers gone, exiting")
        return 0

    def _bind(self) -> None:
        s = self.cfg.pgbouncer
        backlog = s.listen_backlog or 128
        for addr in _listen_addrs(s.listen_addr):
            family = pysocket.AF_INET6 if ":" in addr else pysocket.AF_INET
            sock = pysocket.socket(family, pysocket.SOCK_STREAM)
            sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_REUSEADDR, 1)
            if family == pysocket.AF_INET6:
                sock.setsockopt(pysocket.IPPROTO_IPV6, pysocket.IPV6_V6ONLY, 1)
            sock.bind((addr, s.listen_port))
            sock.listen(backlog)
            if s.tcp_defer_accept:
                defer_accept(sock)
            self.sockets.append(sock)
            log.info("listening on %s:%d (shared by %d workers)", addr, s.listen_port, self.count)
        if s.unix_socket_dir:
            path = os.path.join(self.cfg.resolve_path(s.unix_socket_dir), f".s.PGSQL.{s.listen_port}")
            if os.path.exists(path):
                os.unlink(path)
            sock = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
            sock.bind(path)
            os.chmod(path, s.unix_socket_mode)
            sock.listen(backlog)
            self.sockets.append(sock)
            self.unix_path = path
            log.info("listening on unix:%s (shared by %d workers)", path, self.count)

    def _spawn(self, index: int) -> None:
        fds = [sock.fileno() for sock in self.sockets]
        env = {**os.environ, WORKER_ENV: f"{index},{self.count},{self.rundir}",
               FDS_ENV: ",".join(map(str, fds))}
        cmd = [sys.executable, "-m", "geobouncer", "-c", self.path, *self.flags]
        # A session of its own: a terminal's Ctrl-C reaches the supervisor only, which passes it on once.
        self.procs[index] = subprocess.Popen(cmd, env=env, pass_fds=fds, stdin=subprocess.DEVNULL,
                                             start_new_session=True)
        self.started[index] = monotonic()
        log.info("supervisor: worker %d started, pid=%d", index, self.procs[index].pid)

    def _watch(self) -> None:
        due: dict[int, float] = {}   # worker index -> when to start it again
        while True:
            now = monotonic()
            for index, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                del self.procs[index]
                if self.stopping:
                    continue
                delay = 0.0
                if now - self.started[index] < RESPAWN_DELAY:   # dying young: back off
                    delay = self.delays[index] = min(MAX_RESPAWN_DELAY, self.delays.get(index, 0.5) * 2)
                else:
                    self.delays.pop(index, None)
                log.warning("supervisor: worker %d (pid %d) exited with %s; starting it again in %.0fs",
                            index, proc.pid, code, delay)
                due[index] = now + delay
            if self.stopping:
                due.clear()
                if not self.procs:
                    return
            for index, when in list(due.items()):
                if when <= now:
                    del due[index]
                    self._spawn(index)
            gevent.sleep(0.1)

    def _forward(self, sig: int) -> None:
        for proc in list(self.procs.values()):
            if proc.poll() is None:
                proc.send_signal(sig)

    def _stop(self, sig: int) -> None:
        self.stopping = True
        for sock in self.sockets:       # nothing new queues up for workers that are leaving
            sock.close()
        self.sockets.clear()
        self._forward(sig)

    def _pidfile(self) -> str | None:
        path = self.cfg.pgbouncer.pidfile
        return self.cfg.resolve_path(path) if path else None

    def _cleanup(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for sock in self.sockets:
            sock.close()
        if self.unix_path:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass
        pidfile.remove(self._pidfile())      # only while it names this process
        if self.rundir:
            shutil.rmtree(self.rundir, ignore_errors=True)


def _listen_addrs(value) -> list[str]:
    out: list[str] = []
    for addr in str(value or "").replace(" ", ",").split(","):
        addr = addr.strip()
        if addr == "*":
            out.extend(["0.0.0.0", "::"] if pysocket.has_ipv6 else ["0.0.0.0"])
        elif addr:
            out.append(addr)
    return out
