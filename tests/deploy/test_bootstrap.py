"""scripts/_pglib.sh's virtual environment: built with the interpreter the user has
(the distribution's /usr/bin/python3 here, externally managed), reused while it
works, rebuilt when it breaks, and never a system interpreter for pip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def base_python() -> str:
    """The distribution's python3 when it is recent enough, else this one's base."""
    system = Path("/usr/bin/python3")
    if system.exists():
        ok = subprocess.run([str(system), "-c", "import sys; sys.exit(sys.version_info < (3, 11))"])
        if ok.returncode == 0:
            return str(system)
    return getattr(sys, "_base_executable", sys.executable)


def ensure_venv(venv: Path, python: str) -> str:
    """Run gb_ensure_venv; the PYTHON it leaves behind."""
    env = {**os.environ, "GEOBOUNCER_VENV": str(venv), "PYTHON": python}
    env.pop("GEOBOUNCER_NO_INSTALL", None)
    result = subprocess.run(
        ["bash", "-c", 'source scripts/_pglib.sh && gb_ensure_venv && echo "PYTHON=$PYTHON"'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1].removeprefix("PYTHON=")


def prefixes(python: str) -> tuple[str, str]:
    out = subprocess.run([python, "-c", "import sys; print(sys.prefix); print(sys.base_prefix)"],
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], out[1]


def test_venv_built_reused_and_rebuilt(tmp_path):
    venv = tmp_path / "venv"
    python = ensure_venv(venv, base_python())
    assert python == str(venv / "bin" / "python")
    prefix, base = prefixes(python)
    assert Path(prefix) == venv and prefix != base        # a virtual environment
    subprocess.run([python, "-m", "pip", "--version"], check=True, capture_output=True)

    marker = venv / "kept"
    marker.write_text("")
    assert ensure_venv(venv, base_python()) == python       # reused as it is
    assert marker.exists()

    (venv / "bin" / "python").unlink()                      # broken: rebuilt
    assert ensure_venv(venv, base_python()) == python
    assert not marker.exists()
    assert prefixes(python)[0] == str(venv)


def test_a_python_too_old_is_passed_over(tmp_path):
    old = tmp_path / "python2"
    old.write_text("#!/bin/sh\nexit 1\n")       # fails the version check
    old.chmod(0o755)
    python = ensure_venv(tmp_path / "venv", str(old))
    prefix, base = prefixes(python)
    assert Path(prefix) == tmp_path / "venv" and Path(base) != tmp_path
