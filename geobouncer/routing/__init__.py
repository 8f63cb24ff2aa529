"""Query routing and rewrite hooks, pgbouncer-rr compatible.

Theory of operation
-------------------
Two settings name Python files (``not_enabled`` or empty: off):

- ``routing_rules_py_module_file`` defines ``routing_rules``, which returns the
  ``[databases]`` key whose pool should serve a query, or ``None`` for no change;
- ``rewrite_query_py_module_file`` defines ``rewrite_query``, which returns the
  query text to send.

Each function takes ``(username, query)`` as in pgbouncer-rr, or
``(username, query, in_transaction)`` as in pgbouncer-fast-switchover; the form is
read from its signature when the file loads.  ``in_transaction`` is true when the
query arrives inside an explicit transaction block, where the pooler will not move
the client to another server anyway.

``Hooks`` loads the files (``from_settings`` at start-up, ``reload`` on RELOAD),
calls the functions (``rewrite``, ``route``) and keeps their counters (``stats``,
for SHOW ROUTING).  A hook that misbehaves never disturbs the query beyond "no
change": see ``hooks.py``.  The hooks run inline in the client's greenlet; the
standard library is monkey-patched before they are imported, so network calls in
a hook yield, but CPU spent in a hook delays that client's queries — slow calls are
counted and logged (``hook_slow_call_ms``).

This package imports nothing from geobouncer and nothing but the standard library.
"""

from .hooks import NOT_ENABLED, STATS_COLUMNS, Hooks, RewriteFailed
from .loader import HookLoadError

__all__ = ["NOT_ENABLED", "STATS_COLUMNS", "HookLoadError", "Hooks", "RewriteFailed"]
