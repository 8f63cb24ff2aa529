"""The routing_rules and rewrite_query hooks of a running geobouncer.

``Hooks.from_settings`` loads the modules named by the ``[pgbouncer]`` settings at
start-up and refuses a bad one (``HookLoadError``); ``Hooks.reload`` loads them
again on RELOAD and keeps the running version of any that fails.  The client path
calls ``rewrite`` and ``route`` once per query, and only when ``has_rewrite`` /
``has_routing`` says the hook is there: with no hook configured, no query text is
ever decoded for them.

A call costs one ``perf_counter`` pair, one ``try`` around the user's function and
one histogram bucket bump (``bisect_left``).
Whatever the function does wrong — raise, return junk, name a database that does
not exist, take too long — costs the query nothing more than "no change": it is
counted (``stats``) and logged once, never raised to the caller, except that
``rewrite_query_disconnect_on_failure`` turns a failed rewrite into
``RewriteFailed`` (pgbouncer-rr's option of the same name).
"""

from __future__ import annotations

import logging
import os
from bisect import bisect_left
from collections.abc import Callable
from time import perf_counter

from .hook import DURATION_BOUNDS, Hook
from .loader import (
    HookLoadError,
    forget_helpers,
    hook_function,
    load_module,
    unregister,
)

log = logging.getLogger("geobouncer")

NOT_ENABLED = "not_enabled"  # pgbouncer-rr's spelling of "no hook module"
DEFAULT_SLOW_CALL_MS = 10.0

#: The hooks, as (hook name, setting naming its file).
HOOK_SETTINGS = (
    ("routing_rules", "routing_rules_py_module_file"),
    ("rewrite_query", "rewrite_query_py_module_file"),
)

#: Columns of ``Hooks.stats()`` rows, for SHOW ROUTING.
STATS_COLUMNS = (
    "kind",
    "name",
    "calls",
    "errors",
    "slow_calls",
    "total_us",
    "last_error",
)


class RewriteFailed(Exception):
    """rewrite_query failed and rewrite_query_disconnect_on_failure is on."""


class Hooks:
    """The loaded hooks; ``enabled``, ``has_routing``, ``has_rewrite`` say which.

    The flags are plain attributes (read on every query) and change only in
    ``reload``.  Each hook is swapped in whole, so a query running during a reload
    finishes on the version it started with.
    """

    def __init__(self) -> None:
        self.enabled = self.has_routing = self.has_rewrite = False
        self.disconnect_on_failure = False
        self._hooks: dict[str, Hook | None] = {name: None for name, _ in HOOK_SETTINGS}
        self._routing: Hook | None = None
        self._rewrite: Hook | None = None

    @classmethod
    def from_settings(cls, settings, resolve_path: Callable[[str], str]) -> Hooks:
        """Load the configured hooks; raises ``HookLoadError`` if one cannot be used.

        ``settings`` has the ``[pgbouncer]`` attributes (``cfg.pgbouncer``);
        ``resolve_path`` turns a relative path into one relative to the config file.
        """
        hooks = cls()
        errors = hooks._load(settings, resolve_path)
        if errors:
            hooks._drop_all()
            raise errors[0]
        return hooks

    def reload(self, settings, resolve_path: Callable[[str], str]) -> list[str]:
        """Import every configured hook afresh; a hook that fails keeps running as it was.

        Returns the errors, ``"<path>: <reason>"`` each (already logged); an empty
        list when every configured hook loaded.  A hook whose setting is now
        ``not_enabled`` (or empty) is switched off.
        """
        return [str(error) for error in self._load(settings, resolve_path, True)]

    # -- per query -----------------------------------------------------------

    def rewrite(self, username: str, query: str, in_transaction: bool) -> str | None:
        """The query text to send instead of ``query``, or ``None`` to send it as is."""
        hook = self._rewrite
        if hook is None:
            return None
        start = perf_counter()
        try:
            if hook.three:
                result = hook.function(username, query, in_transaction)
            else:
                result = hook.function(username, query)
        except Exception as exc:  # noqa: BLE001 - anything a user hook raises is handled
            self._account_failed(hook, perf_counter() - start)
            self._rewrite_failed(hook.raised(exc))
            return None
        elapsed = perf_counter() - start
        hook.calls += 1
        hook.total += elapsed
        hook.durations[bisect_left(DURATION_BOUNDS, elapsed)] += 1
        if elapsed > hook.slow_after:
            hook.slow(elapsed)
        if result is None or result is query:
            return None
        if isinstance(result, str):
            return None if result == query else str(result)
        self._rewrite_failed(hook.rejected(result, "not a str"))
        return None

    def route(
        self,
        username: str,
        query: str,
        in_transaction: bool,
        known: Callable[[str], bool],
    ) -> str | None:
        """The ``[databases]`` key that should serve ``query``, or ``None`` for no change.

        ``known(key)`` says whether a key exists; a key that does not is refused
        (counted, logged once per key) and gives ``None``.
        """
        hook = self._routing
        if hook is None:
            return None
        start = perf_counter()
        try:
            if hook.three:
                target = hook.function(username, query, in_transaction)
            else:
                target = hook.function(username, query)
        except Exception as exc:  # noqa: BLE001 - anything a user hook raises is handled
            self._account_failed(hook, perf_counter() - start)
            hook.raised(exc)
            return None
        elapsed = perf_counter() - start
        hook.calls += 1
        hook.total += elapsed
        hook.durations[bisect_left(DURATION_BOUNDS, elapsed)] += 1
        if elapsed > hook.slow_after:
            hook.slow(elapsed)
        if target is None:
            return None
        if not isinstance(target, str):
            hook.rejected(target, "not a database name (str)")
            return None
        if not known(target):
            hook.rejected(target, "no such database in [databases]")
            return None
        routes = hook.routes
        routes[target] = routes.get(target, 0) + 1
        return target

    # -- SHOW ROUTING --------------------------------------------------------

    def loaded(self) -> list[Hook]:
        """The hooks loaded now (their counters and call-time histogram, for metrics)."""
        return [hook for hook in self._hooks.values() if hook is not None]

    def stats(self) -> list[tuple]:
        """Rows of ``STATS_COLUMNS``: one per loaded hook, then one per route target.

        - ``(hook, module_path, calls, errors, slow_calls, total_us, last_error)``
          for ``routing_rules`` and ``rewrite_query`` when loaded; ``errors`` counts
          exceptions and unusable return values; ``last_error`` is ``""`` if none;
        - ``("route", database_key, queries_routed_there, None, None, None, None)``
          for each key routing_rules has returned, sorted by key.
        """
        rows = [hook.row() for hook in self._hooks.values() if hook is not None]
        if self._routing is not None:
            rows.extend(
                ("route", target, count, None, None, None, None)
                for target, count in sorted(self._routing.routes.items())
            )
        return rows

    def __repr__(self) -> str:
        parts = [
            f"{name}={hook.path} ({hook.arity} args)" if hook else f"{name}=off"
            for name, hook in self._hooks.items()
        ]
        return f"<Hooks {' '.join(parts)}>"

    # -- internals -----------------------------------------------------------

    def _account_failed(self, hook: Hook, elapsed: float) -> None:
        # The success paths above inline the same three lines.
        hook.calls += 1
        hook.total += elapsed
        hook.durations[bisect_left(DURATION_BOUNDS, elapsed)] += 1
        if elapsed > hook.slow_after:
            hook.slow(elapsed)

    def _rewrite_failed(self, text: str) -> None:
        if self.disconnect_on_failure:
            raise RewriteFailed(f"rewrite_query failed: {text}")

    def _load(self, settings, resolve_path, reloading=False) -> list[HookLoadError]:
        self.disconnect_on_failure = bool(settings.rewrite_query_disconnect_on_failure)
        slow_after = _slow_after(settings)
        paths = {
            name: _configured_path(getattr(settings, key), resolve_path)
            for name, key in HOOK_SETTINGS
        }
        # Helpers next to the hooks are re-imported too, once for both hooks.
        forget_helpers({os.path.dirname(path) for path in paths.values() if path})
        modules: dict[str, object] = {}  # path -> module or HookLoadError
        errors: list[HookLoadError] = []
        previous = dict(self._hooks)
        for name, path in paths.items():
            try:
                hook = _load_hook(name, path, modules) if path else None
            except HookLoadError as exc:
                hook = previous[name]
                if exc not in errors:  # one file holding both hooks fails once
                    errors.append(exc)
                    if reloading:
                        _log_reload_error(name, exc, hook)
            else:
                if hook is not None:
                    hook.carry_over(previous[name])
            if hook is not None:
                hook.slow_after = slow_after
            self._hooks[name] = hook
        self._publish()
        replaced = [hook.module for hook in previous.values() if hook is not None]
        imported = [m for m in modules.values() if not isinstance(m, HookLoadError)]
        self._unregister_unused(replaced + imported)
        return errors

    def _unregister_unused(self, modules: list) -> None:
        """Take hook modules that no hook runs any more out of ``sys.modules``."""
        live = {id(hook.module) for hook in self._hooks.values() if hook is not None}
        for module in modules:
            if id(module) not in live:
                unregister(module)

    def _publish(self) -> None:
        self._routing = self._hooks["routing_rules"]
        self._rewrite = self._hooks["rewrite_query"]
        self.has_routing = self._routing is not None
        self.has_rewrite = self._rewrite is not None
        self.enabled = self.has_routing or self.has_rewrite

    def _drop_all(self) -> None:
        for hook in self._hooks.values():
            if hook is not None:
                unregister(hook.module)
        self._hooks = {name: None for name in self._hooks}
        self._publish()


def _load_hook(name: str, path: str, modules: dict) -> Hook:
    """Load hook ``name`` from ``path``, importing each file once per (re)load."""
    module = modules.get(path)
    if module is None:
        try:
            module = modules[path] = load_module(path)
        except HookLoadError as exc:
            module = modules[path] = exc
    if isinstance(module, HookLoadError):
        raise module
    function, arity = hook_function(path, module, name)
    log.info("%s loaded from %s (%s arguments)", name, path, arity)
    return Hook(name, path, function, arity, module, float("inf"))


def _log_reload_error(name: str, error: HookLoadError, kept: Hook | None) -> None:
    if kept is None:
        log.error("RELOAD: %s not loaded, it stays off: %s", name, error)
    else:
        log.error("RELOAD: %s not loaded, %s keeps running: %s", name, kept.path, error)


def _configured_path(
    value: str | None, resolve_path: Callable[[str], str]
) -> str | None:
    text = (value or "").strip()
    if not text or text.lower() == NOT_ENABLED:
        return None
    return os.path.abspath(resolve_path(text))


def _slow_after(settings) -> float:
    """The slow-call threshold in seconds; infinite (never slow) when set to 0."""
    ms = getattr(settings, "hook_slow_call_ms", DEFAULT_SLOW_CALL_MS)
    return ms / 1e3 if ms and ms > 0 else float("inf")
