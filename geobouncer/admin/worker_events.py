"""``workers = N``: one worker detects, every worker acts.

Each worker runs its own topology polling, switchover and replica health
checks, and each notices trouble through its own clients' traffic. So that a
worker with no traffic on a failing writer does not lag behind, a worker that
confirms an event tells the others, over the console channel the workers use
for PAUSE and RELOAD (``fanout``: their unix sockets, marked as a worker's):

    WORKER_EVENT "writer_failed <database> <host> <port>"
    WORKER_EVENT "writer <database> <host> <port>"
    WORKER_EVENT "ban <database> <replica key>"

A receiving worker acts as if it had seen the event itself, but checks before
it believes: ``writer_failed`` starts its own verification of that writer
(which then switches over, or finds the writer fine), ``writer`` makes it
verify its own writer (and switch if it is no longer one), ``ban`` bans the
replica for replica_ban_time. Events are sent in the background and never
sent on by the receiver; a worker that does not answer is logged.
"""

from __future__ import annotations

import logging
import os

import gevent

from . import fanout

log = logging.getLogger("geobouncer")

__all__ = ["EVENTS", "receive", "send"]

EVENTS = ("writer_failed", "writer", "ban")


def send(app, event: str, *fields) -> None:
    """Tell every other worker (nothing outside workers mode)."""
    if not app.cfg.peers or not fanout.supervisor_pid():
        return
    text = " ".join([event, *(str(f) for f in fields)])
    if '"' in text or "\n" in text:
        return                      # not expressible in the console's grammar: let peers see for themselves
    gevent.spawn(fanout.forward, app, f'WORKER_EVENT "{text}"')


def on_private_socket(app, client) -> bool:
    """Did ``client`` come over this worker's private unix socket (the one the
    workers reach one another on, in the supervisor's private directory)?
    A name alone (application_name) proves nothing: any admin can choose it."""
    if not getattr(client, "unix", False) or not fanout.supervisor_pid():
        return False
    try:
        name = client.sock.getsockname()
    except OSError:
        return False
    s = app.settings
    own = os.path.join(app.cfg.resolve_path(s.unix_socket_dir), f".s.PGSQL.{s.listen_port}")
    return isinstance(name, str) and os.path.abspath(name) == os.path.abspath(own)


def receive(app, arg: str) -> str | None:
    """Act on one event from another worker; the reason it was refused, or None."""
    parts = arg.split()
    if not parts or parts[0] not in EVENTS:
        return f"unknown worker event: {arg}"
    event, fields = parts[0], parts[1:]
    if event == "ban":
        if len(fields) != 2 or fields[0] not in app.replica_sets:
            return f"bad ban event: {arg}"
        app.replica_sets[fields[0]].ban(fields[1], "banned by another worker", announce=False)
        return None
    if len(fields) != 3 or not (fields[2].isascii() and fields[2].isdigit()) or not 0 < int(fields[2]) < 65536:
        return f"bad {event} event: {arg}"
    cluster = app.clusters.get(fields[0])
    if cluster is None:
        return f"no clustered database {fields[0]}"
    host, port = fields[1], int(fields[2])
    if event == "writer_failed":
        cluster.writer_failed(host, port, "another worker found the writer failing")
    else:
        cluster.peer_found_writer(host, port)
    return None
