"""One loaded hook function, its counters, and the throttles on what it logs.

A hook runs on every query, so whatever goes wrong with it goes wrong thousands
of times a second.  Each distinct problem is therefore logged once — with its
traceback for an exception — and counted every time; slow calls are counted every
time and logged at most once per ``SLOW_LOG_INTERVAL`` with the number seen since
the previous line.  Query text never appears in these log lines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from types import ModuleType

log = logging.getLogger("geobouncer")

SLOW_LOG_INTERVAL = 10.0  # seconds between two "slow calls" lines of one hook
MAX_DISTINCT = 1000  # distinct problems remembered per hook (a bound on memory)
SUPPRESSED_LOG_INTERVAL = 60.0  # past MAX_DISTINCT, one summary line per minute
_TEXT_LIMIT = 200  # characters of an error or a returned value kept for display

_monotonic = time.monotonic  # a module global, so tests can move the clock

# Upper bounds (seconds) of the call-time histogram buckets (geobouncer_routing_hook_
# duration_seconds); a call is counted in the first bucket whose bound it does not exceed,
# past the last one in the +Inf bucket. Cumulated only when the metrics endpoint is scraped.
DURATION_BOUNDS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)


class Hook:
    """``function`` loaded from ``path`` under the hook name ``name``.

    ``calls``, ``errors``, ``slow_calls``, ``total`` (seconds) and ``last_error``
    are read by SHOW ROUTING; ``durations`` counts calls per DURATION_BOUNDS bucket
    (one more for +Inf) for the metrics endpoint; ``routes`` counts, per database
    key, the queries a routing hook sent there.  The caller (``Hooks``) updates ``calls``, ``total``
    and ``routes`` inline, and calls the methods below only when something is off.
    """

    __slots__ = (
        "_seen", "_slow_logged_at", "_slow_pending", "_slowest", "_suppressed",
        "_suppressed_logged_at", "calls", "durations", "errors", "function", "last_error",
        "module", "name", "path", "routes", "slow_after", "slow_calls", "three",
        "total",
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        path: str,
        function: Callable,
        arity: int,
        module: ModuleType,
        slow_after: float,
    ) -> None:
        self.name = name
        self.path = path
        self.function = function
        self.three = arity == 3  # also pass in_transaction
        self.module = module
        self.slow_after = slow_after  # seconds; inf when slow-call logging is off
        self.calls = self.errors = self.slow_calls = 0
        self.total = 0.0
        self.durations = [0] * (len(DURATION_BOUNDS) + 1)
        self.last_error = ""
        self.routes: dict[str, int] = {}
        self._seen: set[tuple] = set()
        self._suppressed = 0
        self._suppressed_logged_at = float("-inf")
        self._slow_pending = 0
        self._slowest = 0.0
        self._slow_logged_at = float("-inf")

    @property
    def arity(self) -> int:
        return 3 if self.three else 2

    def carry_over(self, previous: Hook | None) -> None:
        """Keep the counters of the version this one replaces, if from the same file.

        What was already logged is not carried over: after a reload, a problem
        that persists is worth one more line.
        """
        if previous is None or previous.path != self.path:
            return
        self.calls, self.errors = previous.calls, previous.errors
        self.slow_calls, self.total = previous.slow_calls, previous.total
        self.last_error, self.routes = previous.last_error, previous.routes
        self.durations = previous.durations

    def row(self) -> tuple:
        """``(hook, path, calls, errors, slow_calls, total_us, last_error)``."""
        return (
            self.name, self.path, self.calls, self.errors,
            self.slow_calls, int(self.total * 1e6), self.last_error,
        )  # fmt: skip

    # -- when something is off ------------------------------------------------

    def raised(self, exc: Exception) -> str:
        """Count an exception from the hook; log it once per distinct error.

        Distinct means: same exception type, same message, same line of the hook
        file (the innermost one in the traceback; any file if the hook file is not
        in it).  Returns ``"Type: message"``.
        """
        text = _describe(exc)
        where = _where(exc, self.path)
        self.errors += 1
        self.last_error = _clip(f"{text} (at {where})")
        if self._first_time((type(exc), text, where)):
            log.error(
                "%s (%s) raised %s at %s; logged once, counted in SHOW ROUTING",
                self.name, self.path, text, where, exc_info=exc,
            )  # fmt: skip
        return text

    def rejected(self, value: object, why: str) -> str:
        """Count a return value that cannot be used; log it once per distinct value."""
        shown = _clip(_safe_repr(value))
        text = f"returned {shown}: {why}"
        self.errors += 1
        self.last_error = text
        if self._first_time((type(value).__name__, shown, why)):
            log.warning(
                "%s (%s) %s; ignored (logged once, counted in SHOW ROUTING)",
                self.name, self.path, text,
            )  # fmt: skip
        return text

    def slow(self, elapsed: float) -> None:
        """Count a slow call; log the count at most once per SLOW_LOG_INTERVAL."""
        self.slow_calls += 1
        self._slow_pending += 1
        self._slowest = max(self._slowest, elapsed)
        now = _monotonic()
        if now - self._slow_logged_at < SLOW_LOG_INTERVAL:
            return
        log.warning(
            "%s (%s): %d call(s) slower than %g ms since the last such line, "
            "slowest %.1f ms; a slow hook delays its client's queries",
            self.name, self.path, self._slow_pending, self.slow_after * 1e3,
            self._slowest * 1e3,
        )  # fmt: skip
        self._slow_logged_at = now
        self._slow_pending = 0
        self._slowest = 0.0

    def _first_time(self, key: tuple) -> bool:
        seen = self._seen
        if key in seen:
            return False
        if len(seen) < MAX_DISTINCT:
            seen.add(key)
            return True
        self._suppressed += 1
        now = _monotonic()
        if now - self._suppressed_logged_at >= SUPPRESSED_LOG_INTERVAL:
            log.warning(
                "%s (%s): %d more distinct problems not logged (over %d kinds seen); "
                "the last: %s",
                self.name, self.path, self._suppressed, MAX_DISTINCT, self.last_error,
            )  # fmt: skip
            self._suppressed_logged_at = now
            self._suppressed = 0
        return False


def _describe(exc: BaseException) -> str:
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a hook's exception whose __str__ fails
        message = "<unprintable message>"
    return _clip(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


def _where(exc: BaseException, path: str) -> str:
    """``file:line`` of the innermost frame in ``path``, else of the innermost frame."""
    inside = innermost = None
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        innermost = (filename, tb.tb_lineno)
        if filename == path:
            inside = innermost
        tb = tb.tb_next
    found = inside or innermost
    return f"{found[0]}:{found[1]}" if found else "?"


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:  # noqa: BLE001 - a hook's return value whose __repr__ fails
        return f"<{type(value).__name__} with a failing repr>"


def _clip(text: str) -> str:
    return text if len(text) <= _TEXT_LIMIT else text[: _TEXT_LIMIT - 3] + "..."
