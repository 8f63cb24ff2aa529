"""PgBouncer-style logging: ``2026-01-01 12:00:00.123 UTC [pid] LOG message``."""

from __future__ import annotations

import logging
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


def setup(logfile: str | None, quiet: bool, verbose: int) -> None:
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
