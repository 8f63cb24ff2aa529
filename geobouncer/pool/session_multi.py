"""Session SETs in a simple Query of several statements ("SET search_path = s1;
SELECT 1", "BEGIN; SET x.y = 1; COMMIT"): what stays of them, as PostgreSQL
runs such a text (pool/session_state.py has the one-statement case).

PostgreSQL runs the statements of one Query in one implicit transaction,
unless the text holds its own transaction control: BEGIN turns the implicit
transaction (the statements before it included) into an explicit one, COMMIT
or END commits whatever is open (an implicit one too, with a warning),
ROLLBACK or ABORT drops it, and a new implicit transaction starts after each
end. A SET persists when the transaction it ran in commits; SET LOCAL never
does; ROLLBACK TO a savepoint drops the SETs run after it. At the first error
the rest of the text is skipped and the transaction of the failing statement
is rolled back.

``parse`` simulates that for a text that succeeds, and gives a ``Script``:
the net changes (a RESET ALL first when one ran, then the last change of each
name, in order) and the transaction status the text must end in. The caller
applies it only at a ReadyForQuery of that status after no error (the
tracker drops the effect of a Query that got an ErrorResponse). So:

- an error anywhere drops every change of the text. Exact without
  transaction control in the text; with it ("SET a.b = 1; COMMIT; SELECT 1/0")
  a SET committed before the failing statement stays on the server, which the
  reply does not tell: such a Script is ``uncertain``, and on an error its
  server is not reused (net/params.py).
- a text that ends inside an explicit block ("BEGIN; SET x.y = 1") leaves the
  SETs of that block to a COMMIT in a later Query, which is not followed:
  they are not remembered, as a SET inside a transaction never is.
- COMMIT/ROLLBACK AND CHAIN, PREPARE TRANSACTION and SETs whose value is not
  constants (none in PostgreSQL's grammar but SET TIME ZONE INTERVAL, a
  reported parameter anyway) give ``UNKNOWN``: the server is not reused after
  the text. A text pglast cannot parse gives None: PostgreSQL refuses it
  whole, nothing of it runs.

Values are rebuilt from the parse tree as literals ('s1', 'My S', 42), not
copied from the text, so a comment in the text never reaches the replayed SET.
"""

from __future__ import annotations

import json
import re

try:
    from pglast import parser as _pglast
except ImportError:  # pragma: no cover - pglast is in requirements.txt
    _pglast = None

#: A SET / RESET / DISCARD, or a comment, after a semicolon: a query text the
#: hot path must read (net/forward.py, net/inline.py). A false hit ("SELECT
#: ';set'", "SELECT 1; -- done") only costs a parse. No repetition of a group:
#: linear in the text, whatever a client sends.
MAY_SET_LATER = re.compile(rb";\s*(?:set|reset|discard|--|/\*)", re.IGNORECASE)

#: Longer texts are not parsed, so not remembered (as PgBouncer remembers no
#: SET): the parse and its walk cost up to ~0.4 µs a character of dense
#: statements (more on a loaded machine), with the whole process waiting, so a
#: client sending distinct long texts would stall every other client that long
#: a query (64 KiB: ~25 ms). 2 KiB: about 1 ms, near what PostgreSQL spends
#: running such a text. Parsed texts are cached, up to _CACHE_SIZE.
_LONG = 2048
_CACHED = _LONG

_CACHE_SIZE = 256
_cache: dict[str, object] = {}


class Script:
    """What a multi-statement text leaves, once it succeeded with ReadyForQuery
    ``status``. ``uncertain``: an error part-way may leave some of it on the
    server (what a COMMIT in the text committed before the error), which the
    pooler cannot tell from the reply: the server is then not reused
    (net/params.py). ``UNKNOWN`` (status None): a text whose effect on the
    session is not followed at all (AND CHAIN, PREPARE TRANSACTION, a SET of a
    form not read): the server is not reused after it, whatever its reply."""

    __slots__ = ("changes", "status", "uncertain")

    def __init__(self, changes: tuple, status: bytes | None, uncertain: bool = False):
        self.changes = changes      # session_state.parse's tuples, in order
        self.status = status
        self.uncertain = uncertain

    def __repr__(self) -> str:
        return f"Script({self.changes!r}, {self.status!r}{', uncertain' if self.uncertain else ''})"


UNKNOWN = Script((), None, True)


def candidate(text: bytes) -> bool:
    """Whether a query text worth reading (a SET-like head or ``MAY_SET_LATER``)
    that the one-statement parser refused may still hold a SET: several
    statements, a comment (whose text must not become part of a replayed value), a
    dollar quote or a backslash (read differently with standard_conforming_strings off)."""
    return b";" in text or b"--" in text or b"/*" in text or b"$" in text or b"\\" in text


def parse(text: str) -> Script | None:
    """The Script of a text (cached by text), None when nothing would be remembered."""
    try:
        return _cache[text]
    except KeyError:
        pass
    if len(text) > _LONG:
        return None
    script = _simulate(_statements(text))
    if len(text) <= _CACHED:
        if len(_cache) >= _CACHE_SIZE:
            del _cache[next(iter(_cache))]
        _cache[text] = script
    return script


# --- statements -------------------------------------------------------------------

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_UNSURE = ("unsure",)
_OTHER = ("other",)
_TX_KINDS = {"TRANS_STMT_BEGIN": "begin", "TRANS_STMT_START": "begin", "TRANS_STMT_COMMIT": "commit",
             "TRANS_STMT_ROLLBACK": "rollback", "TRANS_STMT_SAVEPOINT": "savepoint",
             "TRANS_STMT_RELEASE": "release", "TRANS_STMT_ROLLBACK_TO": "rollback_to"}


def _statements(text: str) -> list | None:
    """Each statement as ('change', change) | ('begin',) | ('commit',) | ('rollback',)
    | ('savepoint' / 'release' / 'rollback_to', name) | ('other',) | ('unsure',);
    None when the text does not parse."""
    if _pglast is None:
        return None
    try:
        tree = json.loads(_pglast.parse_sql_json(text))
        if "\\" in text and _reads_with_backslashes(text):
            return None
    except Exception:  # noqa: BLE001 - pglast's ParseError and anything else: not understood
        return None
    return [_statement(entry.get("stmt", {})) for entry in tree.get("stmts", ())]


def _reads_with_backslashes(text: str) -> bool:
    """Whether a plain '...' literal holds a backslash: pglast reads it with
    standard_conforming_strings on, PostgreSQL with the session's setting, which
    may be off (then the literal, and where statements end, read otherwise)."""
    raw = text.encode("utf-8")
    for token in _pglast.scan(text):
        if token.name == "SCONST" and raw[token.start:token.start + 1] in (b"'", b"N", b"n") \
                and b"\\" in raw[token.start:token.end + 1]:
            return True
    return False


def _statement(node: dict) -> tuple:
    if "VariableSetStmt" in node:
        return _set_statement(node["VariableSetStmt"])
    if "DiscardStmt" in node:
        return ("change", ("reset_all",)) if node["DiscardStmt"].get("target") == "DISCARD_ALL" else _OTHER
    if "TransactionStmt" in node:
        stmt = node["TransactionStmt"]
        kind = _TX_KINDS.get(stmt.get("kind"))
        if kind is None or stmt.get("chain"):
            return _UNSURE      # PREPARE TRANSACTION, COMMIT PREPARED, ... AND CHAIN
        if kind in ("savepoint", "release", "rollback_to"):
            return (kind, stmt.get("savepoint_name", ""))
        return (kind,)
    return _OTHER


def _set_statement(stmt: dict) -> tuple:
    kind = stmt.get("kind")
    if stmt.get("is_local") or kind in ("VAR_SET_MULTI", "VAR_SET_CURRENT"):
        return _OTHER           # SET LOCAL, SET TRANSACTION ...; FROM CURRENT keeps the value
    if kind == "VAR_RESET_ALL":
        return ("change", ("reset_all",))
    name = stmt.get("name", "").translate(_ASCII_LOWER)   # PostgreSQL folds ASCII letters only
    if kind in ("VAR_RESET", "VAR_SET_DEFAULT"):
        return ("change", ("reset", name))
    if kind != "VAR_SET_VALUE":
        return _UNSURE
    values = [_literal(arg) for arg in stmt.get("args", ())]
    if not values or None in values:
        return _UNSURE
    return ("change", ("set", name, ", ".join(values)))


def _literal(arg: dict) -> str | None:
    const = arg.get("A_Const")
    if const is None:
        return None
    if "sval" in const:
        value = const["sval"].get("sval", "")
        if "\\" in value:
            return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
        return "'" + value.replace("'", "''") + "'"
    if "ival" in const:
        return str(const["ival"].get("ival", 0))
    if "fval" in const:
        return const["fval"].get("fval", "0")
    return None


# --- transactions -----------------------------------------------------------------

def _simulate(statements: list | None) -> Script | None:
    if statements is None:
        return None     # does not parse: PostgreSQL refuses it whole, nothing runs
    if _UNSURE in statements:
        return UNKNOWN
    committed: list = []     # changes of the transactions committed so far
    current: list = []       # changes of the open transaction (implicit or explicit)
    explicit = False
    savepoints: list = []    # (name, len(current)) in an explicit block
    uncertain = False       # a statement after a COMMIT that kept changes: an error there keeps them
    for statement in statements:
        if committed:
            uncertain = True
        kind = statement[0]
        if kind == "change":
            current.append(statement[1])
        elif kind == "begin":
            explicit = True     # an implicit transaction becomes this block; a second BEGIN: a warning
        elif kind == "commit":
            committed += current
            current, explicit, savepoints = [], False, []
        elif kind == "rollback":
            current, explicit, savepoints = [], False, []
        elif kind == "other":
            continue
        else:
            names = [name for name, _ in savepoints]
            if not explicit or (kind != "savepoint" and statement[1] not in names):
                return None     # fails on the server: nothing of the text stays
            if kind == "savepoint":
                savepoints.append((statement[1], len(current)))
                continue
            at = len(names) - 1 - names[::-1].index(statement[1])
            if kind == "rollback_to":
                del current[savepoints[at][1]:]
                del savepoints[at + 1:]
            else:
                del savepoints[at:]
    if not explicit:
        committed += current
    changes = _net(committed)
    return Script(changes, b"T" if explicit else b"I", uncertain) if changes or uncertain else None


def _net(changes: list) -> tuple:
    """The same end state in fewer steps: from the last RESET ALL on, the last change of each name."""
    net: dict = {}
    reset_all = False
    for change in changes:
        if change[0] == "reset_all":
            net.clear()
            reset_all = True
        else:
            net.pop(change[1], None)
            net[change[1]] = change
    return (("reset_all",),) * reset_all + tuple(net.values())
