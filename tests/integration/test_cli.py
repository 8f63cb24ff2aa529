"""The command line, as PgBouncer's: geobouncer [-d] [-q] [-v] [-u user] [-V] [-h] [-c] FILE, --check.

The console script may not be installed: every test runs ``python -m geobouncer``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest
from fixtures.pooler import REPO_ROOT
from fixtures.ports import free_port, port_is_open, wait_until

GEOBOUNCER = [sys.executable, "-m", "geobouncer"]


def env() -> dict[str, str]:
    out = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), out.get("PYTHONPATH")]))
    return out


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*GEOBOUNCER, *args], env=env(), cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def write_config(tmp_path: Path, pg, *, extra_pgbouncer: str = "", databases: str | None = None,
                 port: int | None = None, **settings) -> Path:
    """A working config in ``tmp_path``; the returned path's ``.port`` is not set, read it back."""
    port = port or free_port()
    (tmp_path / "userlist.txt").write_text('"app" "app_pw"\n"postgres" "postgres_pw"\n')
    lines = ["[databases]",
             databases if databases is not None else f"app = host={pg.host} port={pg.port} dbname=app",
             "",
             "[pgbouncer]",
             "listen_addr = 127.0.0.1",
             f"listen_port = {port}",
             f"unix_socket_dir = {tmp_path}",
             "auth_file = userlist.txt",
             "admin_users = postgres"]
    lines += [f"{k} = {v}" for k, v in settings.items()]
    if extra_pgbouncer:
        lines.append(extra_pgbouncer)
    path = tmp_path / "geobouncer.ini"
    path.write_text("\n".join(lines) + "\n")
    return path


def listen_port(path: Path) -> int:
    return int(re.search(r"^listen_port = (\d+)$", path.read_text(), re.M).group(1))


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def connect_app(port: int):
    return psycopg2.connect(host="127.0.0.1", port=port, dbname="app", user="app", password="app_pw",
                            connect_timeout=10)


def select_one(port: int):
    conn = connect_app(port)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_database()")
            return cur.fetchone()
    finally:
        conn.close()


class Foreground:
    """geobouncer started by a test, stopped (and if need be killed) at the end."""

    def __init__(self, *args: str, stderr=subprocess.PIPE):
        self.proc = subprocess.Popen([*GEOBOUNCER, *args], env=env(), cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)

    def wait_listening(self, port: int) -> None:
        wait_until(lambda: self.proc.poll() is not None or port_is_open("127.0.0.1", port), timeout=15,
                   message="geobouncer listening")
        assert self.proc.poll() is None, self.communicate()

    def stop(self) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate(timeout=15)
        return self.proc.returncode, out, err

    def communicate(self) -> str:
        out, err = self.proc.communicate(timeout=15)
        return f"rc={self.proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=15)


# --- -V, -h ------------------------------------------------------------------------

def test_version():
    result = run("-V")
    assert result.returncode == 0, result.stderr
    assert re.search(r"\d+\.\d+", result.stdout)
    assert "geobouncer" in result.stdout.lower()


def test_help_lists_the_flags():
    result = run("-h")
    assert result.returncode == 0, result.stderr
    for flag in ("-d", "-q", "-v", "-u", "-V", "-c", "--check"):
        assert re.search(rf"(^|[\s,\[]){re.escape(flag)}(?![\w-])", result.stdout, re.M), flag


# --- --check --------------------------------------------------------------------------

def test_check_good_config(pg, tmp_path):
    path = write_config(tmp_path, pg)
    result = run("--check", "-c", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert not port_is_open("127.0.0.1", listen_port(path))  # checked, not started


@pytest.mark.parametrize("case, bad_line, key", [
    ("unknown key", "no_such_setting = 1", "no_such_setting"),
    ("bad value type", "default_pool_size = lots", "default_pool_size"),
    ("bad connection string key", "broken = host=127.0.0.1 dbnmae=app", "dbnmae"),
])
def test_check_bad_config_names_file_line_and_key(pg, tmp_path, case, bad_line, key):
    if case == "bad connection string key":
        path = write_config(tmp_path, pg, databases=f"app = host={pg.host} port={pg.port} dbname=app\n{bad_line}")
    else:
        path = write_config(tmp_path, pg, extra_pgbouncer=bad_line)
    line = line_of(path, bad_line)
    result = run("--check", "-c", str(path))
    message = result.stdout + result.stderr
    assert result.returncode != 0, message
    assert str(path) in message
    assert re.search(rf"(:|line ){line}\b", message), (line, message)
    assert key in message


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nowhere" / "geobouncer.ini"
    for args in (("-c", str(missing)), (str(missing),), ("--check", str(missing))):
        result = run(*args)
        assert result.returncode != 0, args
        assert str(missing) in result.stdout + result.stderr, args


# --- running -----------------------------------------------------------------------------

def test_positional_config_file(pg, tmp_path):
    path = write_config(tmp_path, pg, logfile="geobouncer.log")
    port = listen_port(path)
    proc = Foreground(str(path))
    try:
        proc.wait_listening(port)
        assert select_one(port) == ("app",)
        rc, _, _ = proc.stop()
        assert rc is not None
        wait_until(lambda: not port_is_open("127.0.0.1", port), timeout=10, message="port closed")
    finally:
        proc.kill()


def test_daemon_mode_with_pidfile(pg, tmp_path):
    pidfile = tmp_path / "geobouncer.pid"
    logfile = tmp_path / "geobouncer.log"
    path = write_config(tmp_path, pg, pidfile=str(pidfile), logfile=str(logfile))
    port = listen_port(path)
    pid = None
    try:
        launcher = run("-d", str(path), timeout=30)  # returns once the daemon has detached
        assert launcher.returncode == 0, launcher.stdout + launcher.stderr
        pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=15,
                             message="pidfile written"))
        assert pid_alive(pid)
        assert os.getsid(pid) != os.getsid(0)  # detached into its own session
        wait_until(lambda: port_is_open("127.0.0.1", port), timeout=15, message="daemon listening")
        assert select_one(port) == ("app",)
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not pid_alive(pid), timeout=15, message="daemon exited")
        wait_until(lambda: not pidfile.exists(), timeout=5, message="pidfile removed")
        assert logfile.read_text().strip()  # the daemon logs to its logfile
    finally:
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_pidfile_of_a_running_instance_stops_the_start(pg, tmp_path):
    """As PgBouncer: a pidfile naming a live process means another instance
    runs; geobouncer stops before listening and leaves that pidfile alone."""
    pidfile = tmp_path / "geobouncer.pid"
    pidfile.write_text(f"{os.getpid()}\n")          # this test process: alive
    path = write_config(tmp_path, pg, pidfile=str(pidfile))
    result = run("-c", str(path), timeout=30)
    message = result.stdout + result.stderr
    assert result.returncode == 1, message
    assert "pidfile exists, another instance running?" in message
    assert pidfile.read_text() == f"{os.getpid()}\n"
    assert not port_is_open("127.0.0.1", listen_port(path))


def test_stale_pidfile_is_replaced(pg, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    pidfile = tmp_path / "geobouncer.pid"
    pidfile.write_text(f"{dead.pid}\n")
    logfile = tmp_path / "geobouncer.log"
    path = write_config(tmp_path, pg, pidfile=str(pidfile), logfile=str(logfile))
    proc = Foreground("-c", str(path))
    try:
        proc.wait_listening(listen_port(path))
        assert pidfile.read_text() == f"{proc.proc.pid}\n"
        assert "stale pidfile, removing" in logfile.read_text()
        rc, _, _ = proc.stop()
        assert rc is not None
        assert not pidfile.exists()
    finally:
        proc.kill()


def test_unix_socket_group(pg, tmp_path):
    import grp
    group = grp.getgrnam("nogroup")
    path = write_config(tmp_path, pg, unix_socket_group="nogroup")
    port = listen_port(path)
    proc = Foreground("-c", str(path))
    try:
        proc.wait_listening(port)
        assert os.stat(tmp_path / f".s.PGSQL.{port}").st_gid == group.gr_gid
    finally:
        proc.stop()
        proc.kill()
    path = write_config(tmp_path, pg, unix_socket_group="no-such-group-here")
    result = run("-c", str(path), timeout=30)
    assert result.returncode == 1
    assert "unix_socket_group: no group named no-such-group-here" in result.stdout + result.stderr


def test_daemon_mode_needs_pidfile(pg, tmp_path):
    path = write_config(tmp_path, pg, logfile="geobouncer.log")
    result = run("-d", str(path), timeout=30)
    assert result.returncode != 0
    assert "pidfile" in result.stdout + result.stderr
    assert not port_is_open("127.0.0.1", listen_port(path))


def test_quiet_writes_nothing_to_stderr(pg, tmp_path):
    logfile = tmp_path / "geobouncer.log"
    path = write_config(tmp_path, pg, logfile=str(logfile))
    port = listen_port(path)
    proc = Foreground("-q", "-c", str(path))
    try:
        proc.wait_listening(port)
        assert select_one(port) == ("app",)
        with pytest.raises(psycopg2.OperationalError):  # an error worth logging
            psycopg2.connect(host="127.0.0.1", port=port, dbname="app", user="app", password="wrong",
                             connect_timeout=10)
        wait_until(lambda: "login attempt" in logfile.read_text(), timeout=10, message="logfile written")
        _, out, err = proc.stop()
        assert err == ""
        assert "app" in logfile.read_text()
    finally:
        proc.kill()


def test_without_quiet_logs_to_stderr(pg, tmp_path):
    path = write_config(tmp_path, pg)
    port = listen_port(path)
    proc = Foreground("-c", str(path))
    try:
        proc.wait_listening(port)
        assert select_one(port) == ("app",)
        _, _, err = proc.stop()
        assert "login attempt" in err
    finally:
        proc.kill()


def test_verbose_flag_accepted(pg, tmp_path):
    path = write_config(tmp_path, pg)
    port = listen_port(path)
    proc = Foreground("-v", "-v", "-c", str(path))
    try:
        proc.wait_listening(port)
        assert select_one(port) == ("app",)
        rc, _, err = proc.stop()
        assert "LOG" in err
    finally:
        proc.kill()


# --- -d failures are never silent; -R is refused -----------------------------------

def busy_port():
    """A port held by a plain listening socket (the caller closes it)."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", free_port()))
    sock.listen(1)
    return sock, sock.getsockname()[1]


def test_daemon_on_a_busy_port_fails_loudly(pg, tmp_path):
    sock, port = busy_port()
    try:
        logfile, pidfile = tmp_path / "geobouncer.log", tmp_path / "geobouncer.pid"
        path = write_config(tmp_path, pg, port=port, logfile=str(logfile), pidfile=str(pidfile))
        result = run("-d", str(path), timeout=30)
        text = f"cannot listen on 127.0.0.1:{port}: bind(): Address already in use"
        assert result.returncode != 0, result
        assert text in result.stderr, result.stderr
        assert f"FATAL {text}" in logfile.read_text()
        assert not pidfile.exists()
    finally:
        sock.close()


def test_daemon_with_an_unreadable_auth_file_fails_loudly(pg, tmp_path):
    logfile = tmp_path / "geobouncer.log"
    path = write_config(tmp_path, pg, logfile=str(logfile), pidfile=str(tmp_path / "geobouncer.pid"))
    path.write_text(path.read_text().replace("auth_file = userlist.txt", "auth_file = missing.txt"))
    result = run("-d", str(path), timeout=30)
    assert result.returncode != 0, result
    assert "could not open auth_file" in result.stderr and "missing.txt" in result.stderr, result.stderr
    assert "could not open auth_file" in logfile.read_text()
    assert not port_is_open("127.0.0.1", listen_port(path))


def test_daemon_launcher_returns_once_listening(pg, tmp_path):
    pidfile = tmp_path / "geobouncer.pid"
    path = write_config(tmp_path, pg, logfile=str(tmp_path / "geobouncer.log"), pidfile=str(pidfile))
    result = run("-d", str(path), timeout=30)
    pid = int(pidfile.read_text()) if pidfile.exists() else None
    try:
        assert result.returncode == 0, result
        assert result.stderr == ""
        assert pid is not None and port_is_open("127.0.0.1", listen_port(path))   # no waiting
    finally:
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not pid_alive(pid), timeout=15, message="daemon exited")


def test_foreground_on_a_busy_port_names_address_and_port(pg, tmp_path):
    sock, port = busy_port()
    try:
        path = write_config(tmp_path, pg, port=port)
        result = run("-q", str(path), timeout=30)
        assert result.returncode != 0
        assert f"cannot listen on 127.0.0.1:{port}: bind(): Address already in use" in result.stderr
    finally:
        sock.close()


@pytest.mark.parametrize("flag", ["-R", "--reboot"])
def test_reboot_is_refused_as_pgbouncer_1_26(pg, tmp_path, flag):
    path = write_config(tmp_path, pg)
    result = run(flag, str(path), timeout=30)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    first = "geobouncer: unrecognized option '--reboot'" if flag == "--reboot" else \
        "geobouncer: invalid option -- 'R'"                    # getopt's words, as PgBouncer prints them
    assert lines[:2] == [first, 'Try "geobouncer --help" for more information.']
    assert "rolling restart" in result.stderr
    assert not port_is_open("127.0.0.1", listen_port(path))
