"""PgBouncer-style logging: ``2026-01-01 12:00:00.123 UTC [pid] LOG message``."""

from __future__ import annotations

import logging
import os
import sys
import time

_LEVEL_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "LOG", logging.WARNING: "WARNING",
                logging.ERROR: "ERROR", logging.CRITICAL: "FATAL"}


class PgBouncerFormatter(logging.Formatter):
    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(record.created))
        level = _LEVEL_NAMES.get(record.levelno, record.levelname)
        text = f"{stamp}.{int(record.msecs):03d} UTC [{record.process}] {level} {record.getMessage()}"
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
