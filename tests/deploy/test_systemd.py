"""deploy/systemd/geobouncer.service: its ExecStart, ExecReload and KillSignal run
as systemd would run them (Type=forking: the command exits, the pidfile names the
daemon), against deploy/systemd/geobouncer.ini with its paths moved to a temp dir."""

from __future__ import annotations

import configparser
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from fixtures.ports import free_port, port_is_open, wait_until

from geobouncer.config import load_config

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "geobouncer.service"
INI = ROOT / "deploy" / "systemd" / "geobouncer.ini"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str   # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    return parser


def test_unit_is_forking_with_the_pidfile_the_config_writes():
    service = unit()["Service"]
    assert service["Type"] == "forking"
    cfg = load_config(INI)
    assert service["PIDFile"] == cfg.pgbouncer.pidfile
    assert cfg.pgbouncer.logfile      # -d needs both
    # The directories the config writes to are the ones systemd makes for the user.
    assert Path(cfg.pgbouncer.pidfile).parent == Path("/run") / service["RuntimeDirectory"]
    assert Path(cfg.pgbouncer.logfile).parent == Path("/var/log") / service["LogsDirectory"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "geobouncer" and "-d" in argv
    assert argv[-1] == "/etc/geobouncer/geobouncer.ini"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGINT"
    assert service["User"] != "root"
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_unit_commands_start_reload_and_stop_the_daemon(tmp_path):
    service = unit()["Service"]
    port = free_port()
    pidfile, logfile = tmp_path / "geobouncer.pid", tmp_path / "geobouncer.log"
    text = INI.read_text(encoding="utf-8")
    for key, value in {"pidfile": pidfile, "logfile": logfile, "unix_socket_dir": tmp_path,
                       "listen_port": port, "auth_file": tmp_path / "userlist.txt"}.items():
        old = next(line for line in text.splitlines() if line.startswith(f"{key} ="))
        text = text.replace(old, f"{key} = {value}")
    (tmp_path / "userlist.txt").write_text('"postgres" "postgres"\n', encoding="utf-8")
    ini = tmp_path / "geobouncer.ini"
    ini.write_text(text, encoding="utf-8")

    argv = shlex.split(service["ExecStart"])
    argv = [sys.executable, "-m", "geobouncer", *argv[1:-1], str(ini)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # Type=forking: the command returns 0 once the daemon runs in the background.
    started = subprocess.run(argv, env=env, cwd=tmp_path, timeout=30, capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=20)
    pid = int(pidfile.read_text())
    try:
        wait_until(lambda: port_is_open("127.0.0.1", port), timeout=20)
        os.kill(pid, 0)

        # ExecReload, with systemd's $MAINPID: the config is read again.
        reload_cmd = shlex.split(service["ExecReload"].replace("$MAINPID", str(pid)))
        subprocess.run(reload_cmd, check=True, timeout=10)
        wait_until(lambda: "got SIGHUP, re-reading config" in logfile.read_text(), timeout=20)

        # systemctl stop: KillSignal; the daemon exits and removes its pidfile.
        os.kill(pid, getattr(signal, service["KillSignal"]))
        wait_until(lambda: not _alive(pid), timeout=20)
        assert not pidfile.exists()
        assert "shutting down" in logfile.read_text()
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of ours would still answer; the daemon is not our child (double fork).
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())
