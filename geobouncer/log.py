"""PgBouncer-style logging: ``2026-01-01 12:00:00.123 UTC [pid] LOG message``."""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
import time

_LEVEL_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "LOG", logging.WARNING: "WARNING",
                logging.ERROR: "ERROR", logging.CRITICAL: "FATAL"}


# Control characters (newline, NUL, escape ...) in what a client chose (a user
# name, a certificate CN, an application_name) would let it forge log lines.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _escape(match: re.Match) -> str:
    return f"\\x{ord(match.group()):02x}"


def _clean(arg):
    return _CONTROL.sub(_escape, arg) if isinstance(arg, str) else arg


class PgBouncerFormatter(logging.Formatter):
    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(record.created))
        level = _LEVEL_NAMES.get(record.levelno, record.levelname)
        message = record.getMessage()
        if _CONTROL.search(message):      # the format string is ours: escape what was put into it
            args = record.args
            if isinstance(args, tuple):
                message = record.msg % tuple(_clean(a) for a in args) if args else _clean(message)
            else:
                message = _clean(message)
        text = f"{stamp}.{int(record.msecs):03d} UTC [{record.process}] {level} {message}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class SyslogFormatter(PgBouncerFormatter):
    """For syslog, which stamps the time and names the process itself (and
    carries the level as the priority): the message alone."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).split(" ", 5)[5]


class _Syslog(logging.handlers.SysLogHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        """The system logger is away: the line is dropped, as syslog(3) drops
        it (a traceback on stderr for every line would be worse)."""


def syslog_handler(ident: str, facility: str, address: str = "/dev/log") -> logging.Handler:
    """syslog = 1: a handler for syslog_ident / syslog_facility (as openlog
    with LOG_PID). A system logger that cannot be reached now is tried again
    line by line; a warning on stderr says so."""
    codes = logging.handlers.SysLogHandler.facility_names
    handler = _Syslog(address, codes.get(facility.lower(), codes["daemon"]))
    if handler.socket is None or handler.socket.fileno() < 0:
        print(f"geobouncer: syslog: cannot reach {address} yet", file=sys.stderr)
    handler.ident = f"{ident}[{os.getpid()}]: "
    handler.wanted = (ident, facility)
    handler.setFormatter(SyslogFormatter())
    return handler


def setup(logfile: str | None, quiet: bool, verbose: int, syslog: tuple[str, str] | None = None) -> None:
    """stderr unless ``quiet``, ``logfile``, and syslog when ``syslog`` is
    (syslog_ident, syslog_facility)."""
    logger = logging.getLogger("geobouncer")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    formatter = PgBouncerFormatter()
    if not quiet:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(formatter)
        logger.addHandler(stream)
    if logfile:
        handler = logging.FileHandler(logfile)
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    if syslog is not None:
        logger.addHandler(syslog_handler(*syslog))


def apply_syslog(syslog: tuple[str, str] | None, address: str = "/dev/log",
                 logger: logging.Logger | None = None) -> None:
    """RELOAD (or SET) of syslog / syslog_ident / syslog_facility: the syslog
    handler follows the config now, added, replaced or removed (``syslog``:
    (ident, facility), or None for syslog = 0)."""
    logger = logger or logging.getLogger("geobouncer")
    current = [h for h in logger.handlers if isinstance(h, _Syslog)]
    if [getattr(h, "wanted", None) for h in current] == ([syslog] if syslog is not None else []):
        return
    for handler in current:
        logger.removeHandler(handler)
        handler.close()
    if syslog is not None:
        logger.addHandler(syslog_handler(*syslog, address=address))


def reopen(logfile: str | None) -> None:
    """After SIGHUP or RELOAD, as PgBouncer: the logfile is opened anew (log
    rotation), at the path the config now names."""
    for handler in logging.getLogger("geobouncer").handlers:
        if not isinstance(handler, logging.FileHandler):
            continue
        with handler.lock:
            if handler.stream is not None:
                handler.stream.close()
                handler.stream = None        # the next emit() opens it again, appending
            if logfile:
                handler.baseFilename = os.path.abspath(logfile)
