"""tcp_defer_accept (on by default, as in PgBouncer on Linux): the listening
socket has TCP_DEFER_ACCEPT, so a TCP connection that has sent nothing yet
waits in the kernel (SYN-RECV on the server side, as ``ss`` shows) instead
of being accepted; with the setting off it is accepted at once. A client
that does send is served either way, and RELOAD or SET changes it on the
listening socket already open. PgBouncer 1.18 behaves the same."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
from _util_pool import another_client_gets


def server_side_states(port: int, client_port: int) -> set[str]:
    """The TCP states of the pooler's end of the connection from ``client_port``."""
    out = subprocess.run(["ss", "-Htan", f"( sport = :{port} and dport = :{client_port} )"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("defer", [1, 0])
def test_silent_connection_waits_in_the_kernel_with_tcp_defer_accept(pg, bouncer, defer):
    b = bouncer(pgbouncer={"tcp_defer_accept": defer})
    silent = socket.create_connection((b.host, b.port))
    try:
        time.sleep(0.3)
        states = server_side_states(b.port, silent.getsockname()[1])
        assert states == ({"SYN-RECV"} if defer else {"ESTAB"}), states
        assert another_client_gets(b, "SELECT 'served'") == ("served",)
    finally:
        silent.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["RELOAD", "SET"])
@pytest.mark.parametrize("before, after", [(0, 1), (1, 0)])
def test_reload_and_set_turn_tcp_defer_accept_on_the_open_listener(pg, bouncer, before, after, how):
    """PgBouncer applies a changed tcp_defer_accept to its listening sockets
    at once (RELOAD or SET); they used to keep the value they started with."""
    b = bouncer(pgbouncer={"tcp_defer_accept": before})
    if how == "RELOAD":
        b.rewrite(pgbouncer={"tcp_defer_accept": after}, reload=False)
        b.admin("RELOAD")
    else:
        b.admin(f"SET tcp_defer_accept = {after}")
    silent = socket.create_connection((b.host, b.port))
    try:
        time.sleep(0.3)
        states = server_side_states(b.port, silent.getsockname()[1])
        assert states == ({"SYN-RECV"} if after else {"ESTAB"}), states
        assert another_client_gets(b, "SELECT 'served'") == ("served",)
    finally:
        silent.close()
