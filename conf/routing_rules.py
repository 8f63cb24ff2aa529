"""Example routing hook: pgbouncer-rr's routing table, for Python 3.

Queries that touch ``tablea`` go to the ``dev.1`` pool, queries that touch
``tableb`` go to ``dev.2``; anything else returns None and stays where it is.
Enable it in the [pgbouncer] section (a relative path is taken from the config
file's folder), and define every key it returns in [databases]:

    [databases]
    dev = host=redshift1 port=5439 dbname=dev
    dev.1 = host=redshift1 port=5439 dbname=dev
    dev.2 = host=redshift2 port=5439 dbname=dev

    [pgbouncer]
    routing_rules_py_module_file = routing_rules.py

geobouncer calls ``routing_rules(username, query)`` as pgbouncer-rr does, or with
a third argument, ``in_transaction``, when the function takes one (as here, with
a default so the two-argument call works too, e.g. from a test).  Inside a
transaction the pooler keeps the client where it is whatever the function says.

Table names are matched as whole words, in any letter case: ``tablea_archive``
does not route to dev.1.  The first matching rule wins; usernames are regular
expressions too, searched anywhere in the name (``.*`` or ``""`` match all).
"""

import re

# (username regex, query regex, [databases] key), tried in order.
ROUTING_TABLE = (
    (r".*", r"\btablea\b", "dev.1"),
    (r".*", r"\btableb\b", "dev.2"),
)
DEFAULT = None  # no match: the client's own database

_RULES = tuple(
    (re.compile(user), re.compile(query, re.IGNORECASE), key)
    for user, query, key in ROUTING_TABLE
)


def routing_rules(username, query, in_transaction=False):
    """The [databases] key that should serve ``query``, or None for no change."""
    for user_pattern, query_pattern, key in _RULES:
        if user_pattern.search(username) and query_pattern.search(query):
            return key
    return DEFAULT


if __name__ == "__main__":
    for sample in ("select * from tablea;", "SELECT * FROM TableB", "select 1"):
        print(f"{sample!r} -> {routing_rules('master', sample)!r}")
