"""``-d``: run in the background, but never fail silently.

The launching process forks twice (the daemon gets its own session) and then
waits on a pipe: the daemon writes ``OK`` once it listens, or the reason it
could not start (a busy port, an unreadable auth_file ...). The launcher prints
that reason on its stderr and exits non-zero, so a failure after forking is
seen by whoever started it, and is in the log too (cli.py logs it).
"""

from __future__ import annotations

import os
import sys

import gevent
from gevent import monkey

_OK = b"OK\n"
# The plain fork: gevent's patched one sets up child watching in the launcher,
# which only waits on a pipe and exits.
_fork = monkey.get_original("os", "fork")


class Detach:
    def __init__(self):
        self._pipe: int | None = None   # write end, in the daemon until it is up

    def fork(self) -> None:
        """Return in the daemon; the launcher exits with the daemon's verdict."""
        read_end, write_end = os.pipe()
        if _fork() > 0:
            os.close(write_end)
            os._exit(self._wait(read_end))
        os.close(read_end)
        os.setsid()
        if _fork() > 0:
            os._exit(0)
        self._pipe = write_end
        gevent.reinit()     # the plain fork: let gevent's loop know it is in a new process
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):
            os.dup2(devnull, fd)
        os.close(devnull)   # stderr stays until the daemon is up: early tracebacks are seen

    @staticmethod
    def _wait(read_end: int) -> int:
        chunks = []
        while True:
            data = os.read(read_end, 4096)
            if not data:
                break
            chunks.append(data)
        message = b"".join(chunks)
        if message == _OK:
            return 0
        text = message.decode("utf-8", "replace").strip() or \
            "geobouncer: the daemon exited before it was listening (see the logfile)"
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
        return 1

    def ready(self) -> None:
        """The daemon listens: release the launcher and let go of the terminal."""
        if self._pipe is None:
            return
        os.write(self._pipe, _OK)
        os.close(self._pipe)
        self._pipe = None
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 2)
        os.close(devnull)

    def failed(self, text: str) -> None:
        """The daemon cannot start: tell the launcher why, then exit 1."""
        if self._pipe is not None:
            os.write(self._pipe, text.encode("utf-8", "replace") + b"\n")
            os.close(self._pipe)
            self._pipe = None
        os._exit(1)
