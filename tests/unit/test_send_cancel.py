"""A cancel request to a server or peer that accepts and never answers is not silent."""

import socket
import time

import pytest

from geobouncer.net.server_login import send_cancel


def test_a_cancel_that_gets_no_answer_fails_after_its_timeout():
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(8)            # accepts (the kernel does), never reads nor closes
    port = black_hole.getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(OSError, match="timed out"):
            send_cancel("127.0.0.1", port, 1234, 5678, timeout=0.3)
        assert time.monotonic() - started < 3
    finally:
        black_hole.close()
