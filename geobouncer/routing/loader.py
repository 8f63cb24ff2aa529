"""Import a hook module from a file and find its function.

Every load is a fresh import: the module gets a name never used before
(``_geobouncer_hook_routing_rules_3``), so a RELOAD runs the file's current code
even when the path is unchanged, and the version that was running stays intact
until the new one has loaded.  The source is compiled from the file on each load
rather than read from ``__pycache__``: a file rewritten twice within one second
with the same size would otherwise look unchanged to the bytecode cache.

While the module executes, its folder is first on ``sys.path``, so it can
``import helper`` from a file next to it (the folder is removed afterwards, so
an import run later, inside the function, does not see it — import helpers at
the top of the module).  ``forget_helpers`` drops such helpers from
``sys.modules`` before a reload so that they are re-imported fresh too.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import inspect
import itertools
import os
import sys
from collections.abc import Callable, Iterable
from types import ModuleType

_serial = itertools.count(1)

_POSITIONAL = (
    inspect.Parameter.POSITIONAL_ONLY,
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
)
ARITIES = {
    2: "(username, query)",
    3: "(username, query, in_transaction)",
}


class HookLoadError(Exception):
    """A hook module that cannot be used; ``str()`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class _FreshSourceLoader(importlib.machinery.SourceFileLoader):
    """Compiles the file's current text every time; never reads or writes bytecode."""

    def get_code(self, fullname):
        path = self.get_filename(fullname)
        return self.source_to_code(self.get_data(path), path)


def load_module(path: str) -> ModuleType:
    """Import the file at ``path`` (absolute) afresh, under a name never used before.

    Raises ``HookLoadError`` when the file is missing, does not compile, or fails
    while importing.  The module stays registered in ``sys.modules`` (some
    libraries, dataclasses for one, look a class's module up there) until
    ``unregister`` removes it.
    """
    if not os.path.isfile(path):
        raise HookLoadError(path, "no such file")
    stem = os.path.splitext(os.path.basename(path))[0]
    safe = "".join(c if c.isalnum() else "_" for c in stem)
    return _execute(path, f"_geobouncer_hook_{safe}_{next(_serial)}")


def hook_function(path: str, module: ModuleType, name: str) -> tuple[Callable, int]:
    """``(function, arity)`` of the hook ``name`` in ``module``, or ``HookLoadError``."""
    function = getattr(module, name, None)
    if function is None:
        raise HookLoadError(path, f"defines no function {name}()")
    return function, arity_of(path, name, function)


def unregister(module: ModuleType) -> None:
    """Forget a hook module that has been replaced (or failed to load)."""
    if sys.modules.get(module.__name__) is module:
        del sys.modules[module.__name__]


def arity_of(path: str, name: str, function: object) -> int:
    """2 or 3: how many positional arguments the hook takes."""
    if not callable(function):
        raise HookLoadError(path, f"{name} is not callable")
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError) as exc:
        raise HookLoadError(
            path, f"cannot read the signature of {name}(): {exc}"
        ) from None
    params = signature.parameters.values()
    positional = [p for p in params if p.kind in _POSITIONAL]
    required_keywords = [
        p.name
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY
        and p.default is inspect.Parameter.empty
    ]
    starred = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    if len(positional) in ARITIES and not starred and not required_keywords:
        return len(positional)
    expected = " or ".join(f"{name}{spelling}" for spelling in ARITIES.values())
    raise HookLoadError(path, f"{name}{signature} is not callable as {expected}")


def forget_helpers(folders: Iterable[str]) -> list[str]:
    """Drop top-level modules imported from ``folders`` out of ``sys.modules``.

    Only plain modules that are files directly in one of the folders go (not
    packages below them, and never geobouncer's own modules), so that the next
    import of the hook re-imports its helpers from their current text.  Code that
    already holds the old helper keeps it.  Returns the names dropped.
    """
    wanted = {os.path.normcase(os.path.abspath(folder)) for folder in folders}
    if not wanted:
        return []
    dropped = []
    for module_name, module in list(sys.modules.items()):
        filename = getattr(module, "__file__", None)
        if (
            not filename
            or "." in module_name
            or module_name.startswith("geobouncer")
            or module_name in sys.stdlib_module_names
        ):
            continue
        if os.path.normcase(os.path.dirname(os.path.abspath(filename))) in wanted:
            del sys.modules[module_name]
            dropped.append(module_name)
    importlib.invalidate_caches()  # a helper created since the last import is found
    return dropped


def _execute(path: str, module_name: str) -> ModuleType:
    loader = _FreshSourceLoader(module_name, path)
    spec = importlib.util.spec_from_file_location(module_name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    folder = os.path.dirname(path)
    sys.modules[module_name] = module
    sys.path.insert(0, folder)
    try:
        loader.exec_module(module)
    except SyntaxError as exc:
        unregister(module)
        raise HookLoadError(path, _syntax_error(exc, path)) from None
    except (Exception, SystemExit) as exc:
        unregister(module)
        where = _line_in(exc, path)
        raise HookLoadError(
            path, f"import failed{where}: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        _remove_first(sys.path, folder)
    return module


def _syntax_error(exc: SyntaxError, path: str) -> str:
    if exc.filename and os.path.abspath(exc.filename) != path:  # in a helper it imports
        return f"syntax error in {exc.filename} at line {exc.lineno}: {exc.msg}"
    return f"syntax error at line {exc.lineno}: {exc.msg}"


def _line_in(exc: BaseException, path: str) -> str:
    """`` at line N``: the innermost line of ``path`` in the traceback, if any."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" at line {line}" if line is not None else ""


def _remove_first(items: list, value: str) -> None:
    try:
        items.remove(value)
    except ValueError:  # the module took it off itself
        pass
