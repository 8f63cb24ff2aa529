"""syslog = 1 (geobouncer/log.py): what reaches a system logger, read from a
real Unix datagram socket standing in for /dev/log."""

from __future__ import annotations

import logging
import os
import socket

from geobouncer.log import syslog_handler


def test_lines_reach_syslog_with_ident_pid_facility_and_priority(tmp_path):
    path = str(tmp_path / "log")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)
    sink.settimeout(5)
    handler = syslog_handler("geobouncer-test", "local3", address=path)
    assert handler is not None
    logger = logging.getLogger("geobouncer.test-syslog")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        logger.info("C-0x1: app/app@127.0.0.1:5000 login attempt: db=%s", "app\nforged")
        logger.error("pooler error: %s", "boom")
        first, second = sink.recv(4096), sink.recv(4096)
    finally:
        logger.removeHandler(handler)
        handler.close()
        sink.close()
    pid = os.getpid()
    local3 = 19 << 3
    assert first == f"<{local3 | 6}>geobouncer-test[{pid}]: C-0x1: app/app@127.0.0.1:5000 login attempt: " \
                    "db=app\\x0aforged\x00".encode()
    assert second == f"<{local3 | 3}>geobouncer-test[{pid}]: pooler error: boom\x00".encode()


def test_no_system_logger_drops_lines_quietly_then_reaches_it(tmp_path, capsys):
    path = str(tmp_path / "log")
    handler = syslog_handler("pgbouncer", "daemon", address=path)
    assert "syslog: cannot reach" in capsys.readouterr().err
    logger = logging.getLogger("geobouncer.test-syslog-away")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("dropped")                      # no traceback on stderr
        assert capsys.readouterr().err == ""
        sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sink.bind(path)                                # the system logger starts
        sink.settimeout(5)
        logger.warning("delivered")
        assert sink.recv(4096).endswith(b"]: delivered\x00")
        sink.close()
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_reload_adds_changes_and_removes_the_syslog_handler(tmp_path):
    """RELOAD of syslog settings (apply_syslog): lines follow the new ident and
    facility, stop after syslog = 0, and an unchanged config keeps the handler."""
    from geobouncer.log import _Syslog, apply_syslog
    path = str(tmp_path / "log")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)
    sink.settimeout(5)
    logger = logging.getLogger("geobouncer.test-syslog-reload")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    pid = os.getpid()
    try:
        apply_syslog(("first", "local3"), address=path, logger=logger)
        logger.info("one")
        assert sink.recv(4096) == f"<{19 << 3 | 6}>first[{pid}]: one\x00".encode()
        kept = [h for h in logger.handlers if isinstance(h, _Syslog)]
        apply_syslog(("first", "local3"), address=path, logger=logger)
        assert [h for h in logger.handlers if isinstance(h, _Syslog)] == kept
        apply_syslog(("second", "local4"), address=path, logger=logger)
        logger.info("two")
        assert sink.recv(4096) == f"<{20 << 3 | 6}>second[{pid}]: two\x00".encode()
        apply_syslog(None, address=path, logger=logger)
        assert not [h for h in logger.handlers if isinstance(h, _Syslog)]
        logger.info("three")
        sink.settimeout(0.3)
        try:
            got = sink.recv(4096)
        except TimeoutError:
            got = None
        assert got is None, got
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        sink.close()
