"""The pidfile, as PgBouncer keeps it: a pidfile naming a live process means
another instance runs, and start-up stops there; one naming a dead process
is stale and removed; the new one is created exclusively, and removed at exit
only while it still names this process."""

from __future__ import annotations

import errno
import logging
import os

log = logging.getLogger("geobouncer")


class PidfileBusy(OSError):
    """Another instance runs (its pid is in the pidfile)."""


def check(path: str | None) -> None:
    """Before listening: PidfileBusy when the pidfile names a running process;
    a stale one is removed."""
    if not path:
        return
    try:
        with open(path) as f:
            text = f.read(128)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OSError(exc.errno, f"could not open pidfile '{path}': {exc.strerror}") from None
    try:
        pid = int(text.strip())
    except ValueError:
        pid = 0
    if pid <= 0 or _running(pid):
        raise PidfileBusy(errno.EEXIST, "pidfile exists, another instance running?")
    log.info("stale pidfile, removing")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise OSError(exc.errno, f"could not remove stale pidfile: {exc.strerror}") from None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True        # someone else's live process
    return True


def write(path: str | None) -> None:
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise OSError(exc.errno, f"could not open pidfile '{path}': {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")


def remove(path: str | None) -> None:
    if not path:
        return
    try:
        with open(path) as f:
            ours = f.read(128).strip() == str(os.getpid())
        if ours:
            os.unlink(path)
    except OSError:
        pass
