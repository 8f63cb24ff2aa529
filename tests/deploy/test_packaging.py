"""setup.py, requirements.txt, LICENSE, .gitignore and the README kept in step:
install_requires is exactly what the package imports, every dependency is pinned
in requirements.txt at a version its range admits, and nothing test-only ships."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from unittest import mock

import setuptools

ROOT = Path(__file__).resolve().parents[2]
#: import name -> distribution name, where they differ
DISTRIBUTIONS = {"yaml": "pyyaml", "psycopg2": "psycopg2-binary", "OpenSSL": "pyopenssl",
                 "prometheus_client": "prometheus-client"}
TEST_ONLY = {"pytest", "hypothesis", "psycopg", "psycopg-binary", "psycopg2-binary",
             "asyncpg", "sqlalchemy", "kubernetes-validate", "pyyaml"}


def setup_kwargs() -> dict:
    with mock.patch.object(setuptools, "setup") as fake:
        source = (ROOT / "setup.py").read_text(encoding="utf-8")
        exec(compile(source, str(ROOT / "setup.py"), "exec"), {"__name__": "__main__"})
    return fake.call_args.kwargs


def requirement(text: str) -> tuple[str, str, str]:
    """("name", "op", "version") of ``name[extra]>=1.2``; the name normalised."""
    match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*(==|>=)\s*([0-9][^\s#;]*)\s*", text)
    assert match, f"unexpected requirement: {text!r}"
    name, op, version = match.groups()
    return re.sub(r"[-_.]+", "-", name).lower(), op, version


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def pins() -> dict[str, str]:
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    out = {}
    for line in lines:
        if line.strip() and not line.startswith("#"):
            name, op, version = requirement(line)
            assert op == "==", f"requirements.txt pins exactly: {line}"
            assert name not in out, f"pinned twice: {name}"
            out[name] = version
    return out


def third_party_imports() -> set[str]:
    """Top-level modules imported anywhere in geobouncer/ that are not the stdlib's."""
    found = set()
    for path in (ROOT / "geobouncer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {name for name in found
            if name not in sys.stdlib_module_names and name not in ("geobouncer", "__future__")}


def test_install_requires_is_what_the_package_imports():
    runtime = {requirement(r)[0] for r in setup_kwargs()["install_requires"]}
    imported = {DISTRIBUTIONS.get(name, name) for name in third_party_imports()}
    assert runtime == imported
    assert "pglast" in runtime
    assert not runtime & TEST_ONLY


def test_every_dependency_is_pinned_within_its_range():
    kwargs = setup_kwargs()
    pinned = pins()
    declared = kwargs["install_requires"] + kwargs["extras_require"]["test"]
    for text in declared:
        name, op, minimum = requirement(text)
        assert name in pinned, f"{name} is not pinned in requirements.txt"
        assert op == ">="
        assert version_tuple(pinned[name]) >= version_tuple(minimum), name
    # psycopg[binary] in the extra is pinned as psycopg + psycopg-binary, so that
    # requirements.txt also works as a constraints file (`pip install -c`).
    assert "psycopg-binary" in pinned and pinned["psycopg-binary"] == pinned["psycopg"]
    assert {requirement(t)[0] for t in kwargs["extras_require"]["test"]} <= TEST_ONLY


def test_python_and_license_metadata():
    kwargs = setup_kwargs()
    assert kwargs["python_requires"] == ">=3.11"
    assert kwargs["license"] == "ISC"
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("ISC License")
    assert "Permission to use, copy, modify, and/or distribute this software" in text


def test_the_virtual_environment_is_ignored():
    ignored = (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert ".venv/" in ignored and ".demo/" in ignored


def test_the_readme_stands_on_its_own():
    """No link or path that leaves the repository; every repository path it names exists."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert re.search(r"(?<!\.)\.\./", readme) is None     # "../x" (not "...")
    assert "shared/" not in readme
    for path in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme):
        assert (ROOT / path).exists(), f"README links to missing {path}"
    for path in re.findall(r"`((?:docs|deploy|scripts|conf)/[\w./-]+)`", readme):
        assert (ROOT / path).exists(), f"README names missing {path}"
