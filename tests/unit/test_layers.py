"""The import direction of DESIGN.md: the sans-IO layers import nothing above them."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "geobouncer"

# layer -> the geobouncer layers it may import
ALLOWED = {
    "proto": set(),
    "config": {"sharding"},    # [sharded_tables] rules are built by the pure sharding layer
    "sharding": {"proto"},     # hashing, rules, planning, merging: no sockets
    "auth": {"proto"},
    "pool": {"proto", "auth", "config"},
    "routing": set(),          # hooks and the classifier are pure
}


def _geobouncer_imports(path: Path) -> set[str]:
    """Top-level geobouncer sub-packages a module imports."""
    layer = path.relative_to(PACKAGE).parts[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("geobouncer."):
                found.add(node.module.split(".")[1])
            elif node.level == 1:
                found.add(layer)
            elif node.level >= 2:
                target = (node.module or "").split(".")[0]
                found.add(target or layer)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("geobouncer."):
                    found.add(alias.name.split(".")[1])
    found.discard(layer)
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports(layer):
    offenders = {}
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        extra = _geobouncer_imports(path) - ALLOWED[layer]
        if extra:
            offenders[str(path.relative_to(PACKAGE))] = sorted(extra)
    assert not offenders, f"{layer} imports layers above it: {offenders}"


def test_no_module_imports_app_or_cli():
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("app.py", "cli.py", "__main__.py"):
            continue
        imported = _geobouncer_imports(path)
        assert not imported & {"app", "cli"}, path
