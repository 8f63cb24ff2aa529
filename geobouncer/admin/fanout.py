"""``workers = N``: a process-control command on one worker's console applies to all.

RELOAD, PAUSE and RESUME (with or without a database) run here, then
are sent on to every other worker's console over its unix socket (the
``pgbouncer`` OS-user login of ``workers_view.ask_peer``), marked with
``application_name = geobouncer-worker`` so the receiving worker does not send
them on again. A peer's refusal (e.g. "already suspended/paused") is logged,
not returned: the command did what it could everywhere. SHUTDOWN in any mode
goes to the supervisor as the signal it passes on to every worker (SIGQUIT,
SIGINT for WAIT_FOR_SERVERS, SIGTERM for WAIT_FOR_CLIENTS), since a worker
exiting alone would just be started again. SUSPEND holds a console connection
to every other worker and suspends it there; the SUSPEND answers once every
worker is suspended. While this worker stays suspended the connections stay
open; when it resumes (RESUME, or its last admin leaving, as PgBouncer does)
each is sent RESUME and closed, and a worker whose connection breaks resumes
by itself (its last admin left).
"""

from __future__ import annotations

import logging
import os
import signal

import gevent
import gevent.event

from . import workers_view

log = logging.getLogger("geobouncer")

__all__ = ["FORWARDED", "MARK", "forward", "is_forwarded", "supervisor_pid", "suspend_all"]

FORWARDED = ("RELOAD", "PAUSE", "RESUME")
MARK = "geobouncer-worker"
SHUTDOWN_SIGNALS = {"": signal.SIGQUIT, "WAIT_FOR_SERVERS": signal.SIGINT,
                    "WAIT_FOR_CLIENTS": signal.SIGTERM}


def supervisor_pid() -> int | None:
    """The supervisor's pid when this process is one of its workers."""
    return os.getppid() if os.environ.get("GEOBOUNCER_WORKER") else None


def is_forwarded(client) -> bool:
    return (getattr(client, "startup", None) or {}).get("application_name") == MARK


def forward(app, sql: str) -> None:
    """Run ``sql`` on every peer's console, all at once; refusals are logged."""
    jobs = [gevent.spawn(_one, peer_id, entry, sql) for peer_id, entry in sorted(app.cfg.peers.items())]
    gevent.joinall(jobs)


def _one(peer_id: int, entry, sql: str) -> None:
    try:
        workers_view.ask_peer(entry, sql, MARK, timeout=None)
    except (OSError, workers_view.PeerUnreachable) as exc:
        log.warning("worker %d: %s: %s", peer_id, sql.strip(), exc)


def suspend_all(app, limit: float | None) -> None:
    """SUSPEND every other worker, and keep it suspended as long as this one is.
    Returns once each has answered (or failed, or ``limit`` seconds passed)."""
    answered = [gevent.event.Event() for _ in app.cfg.peers]
    for (peer_id, entry), done in zip(sorted(app.cfg.peers.items()), answered):
        gevent.spawn(_hold_suspended, app, peer_id, entry, done)
    for done in answered:
        done.wait(limit)


def _hold_suspended(app, peer_id: int, entry, answered) -> None:
    try:
        session = workers_view.PeerSession(entry, MARK)
    except (OSError, workers_view.PeerUnreachable) as exc:
        log.warning("worker %d: SUSPEND: %s", peer_id, exc)
        answered.set()
        return
    try:
        session.run("SUSPEND", timeout=None)
        answered.set()
        while app.suspended and not app.shutting_down:
            gevent.sleep(0.1)
        session.run("RESUME")
    except (OSError, workers_view.PeerUnreachable) as exc:
        # "pooler is not paused/suspended": a RESUME sent on already did it.
        log.debug("worker %d: SUSPEND/RESUME: %s", peer_id, exc)
    finally:
        answered.set()
        session.close()


def shutdown_all(mode: str) -> bool:
    """Ask the supervisor to shut every worker down; False when not a worker."""
    pid = supervisor_pid()
    if pid is None or pid <= 1:
        return False
    log.info("SHUTDOWN %s: asking the supervisor (pid %d) to stop every worker", mode, pid)
    os.kill(pid, SHUTDOWN_SIGNALS[mode])
    return True
