"""PgBouncer's TCP settings reach the pooler's sockets on both sides.

tcp_keepidle / tcp_keepintvl / tcp_keepcnt with tcp_keepalive: every TCP
socket the pooler holds, to a client and to a server, runs its keepalive
timer on the configured idle time, not the system's two hours. Read from
/proc/net/tcp (the timer kind and its expiry), for the sockets whose inodes
the pooler's processes hold. Runs against PgBouncer too
(GEOBOUNCER_TEST_TARGET=pgbouncer), which does the same.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from _util_pool import query_one

USER_HZ = os.sysconf("SC_CLK_TCK")
_KEEPALIVE_TIMER = 2


def _processes(pid: int) -> list[int]:
    """``pid`` and its descendants (PgBouncer under runuser is a child)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        for child in children:
            found += _processes(int(child))
    return found


def _socket_inodes(pids) -> set[str]:
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def _established(inodes: set[str]):
    """(local port, remote port, timer kind, seconds to expiry) of the
    established TCP sockets among ``inodes``."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, timer, inode = fields[1], fields[2], fields[3], fields[5], fields[9]
        if state != "01" or inode not in inodes:
            continue
        kind, when = timer.split(":")
        yield int(local.split(":")[1], 16), int(remote.split(":")[1], 16), int(kind, 16), int(when, 16) / USER_HZ


def test_keepalive_timings_on_client_and_server_sockets(pg, bouncer):
    b = bouncer(pgbouncer={"pool_mode": "session", "auth_type": "md5", "tcp_keepalive": 1,
                           "tcp_keepidle": 7, "tcp_keepintvl": 3, "tcp_keepcnt": 4})
    conn = b.connect(host="127.0.0.1")
    try:
        assert query_one(conn, "SELECT 1") == (1,)
        deadline = time.monotonic() + 5
        while True:       # right after a send the retransmission timer runs until the ACK
            sockets = list(_established(_socket_inodes(_processes(b.pid))))
            ours = [s for s in sockets if s[0] == b.port or s[1] == pg.port]
            if all(kind == _KEEPALIVE_TIMER for _, _, kind, _ in ours) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert any(s[0] == b.port for s in ours) and any(s[1] == pg.port for s in ours), sockets
        for local, remote, kind, seconds in ours:
            assert kind == _KEEPALIVE_TIMER and seconds <= 7, (
                f"{local} -> {remote}: timer {kind}, {seconds:.1f} s (keepalive after 7 s idle expected)")
    finally:
        conn.close()
