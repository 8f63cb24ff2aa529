"""Example routing hook: send reads to a replica, everything else to the primary.

A query goes to REPLICA only when it is sure to be a read: one SELECT (or WITH,
VALUES, TABLE) statement, outside a transaction, with no locking clause
(FOR UPDATE / FOR NO KEY UPDATE / FOR SHARE / FOR KEY SHARE), no SELECT ... INTO
(which creates a table), no data-modifying WITH, and no call to a function known
to write (WRITE_FUNCTIONS).  Everything else — writes, DDL, SET, BEGIN, several
statements in one query, anything inside a transaction — goes to PRIMARY.  The
statement that opens a transaction (BEGIN) arrives with in_transaction false and
goes to the primary like any non-read; what follows it arrives with
in_transaction true and stays there.

When unsure it picks the primary.  A write that is mistaken for a read (a user
function that writes, say) fails on the replica with "cannot execute ... in a
read-only transaction" rather than being lost; add such functions to
WRITE_FUNCTIONS.  Mind what a replica cannot give: rows written a moment ago may
not have arrived yet (replication lag), and temporary tables live on the server
that created them.

Configuration (the keys below must exist in [databases]):

    [databases]
    app = host=10.0.0.1 port=5432 dbname=app
    app_replica = host=10.0.0.2,10.0.0.3 port=5432 dbname=app

    [pgbouncer]
    pool_mode = transaction
    routing_rules_py_module_file = rw_split.py
"""

import re

PRIMARY = "app"
REPLICA = "app_replica"

#: Functions whose call makes a SELECT a write (or need the primary).
WRITE_FUNCTIONS = (
    "nextval",
    "setval",
    "set_config",
    "pg_notify",
    "txid_current",
    "pg_current_xact_id",
    r"pg_advisory\w*",
    r"pg_try_advisory\w*",
    r"lo_\w+",
)

READ_STATEMENTS = frozenset({"select", "with", "values", "table"})

# Comments and quoted text are blanked out before looking for keywords, so that
# 'for update' in a string literal does not count.  (E'...' escapes and
# $$-quoting are not understood; at worst that sends a read to the primary.)
_NOISE = re.compile(r"--[^\n]*|/\*.*?\*/|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"", re.DOTALL)
_FIRST_WORD = re.compile(r"[\s(]*(\w+)")
_WRITES = re.compile(
    r"\bfor\s+(?:key\s+)?share\b"  # FOR [NO KEY] UPDATE is caught by "update"
    r"|\b(?:into|insert|update|delete|merge)\b"
    rf"|\b(?:{'|'.join(WRITE_FUNCTIONS)})\s*\(",
    re.IGNORECASE,
)


def is_read_only(query):
    """True when ``query`` is one statement that only reads."""
    text = _NOISE.sub(" ", query)
    statements = [part for part in text.split(";") if part.strip()]
    if len(statements) != 1:
        return False
    first = _FIRST_WORD.match(statements[0])
    if first is None or first.group(1).lower() not in READ_STATEMENTS:
        return False
    return _WRITES.search(statements[0]) is None


def routing_rules(username, query, in_transaction):
    """REPLICA for a read outside a transaction, PRIMARY for everything else."""
    if not in_transaction and is_read_only(query):
        return REPLICA
    return PRIMARY
