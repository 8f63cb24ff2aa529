"""Read/write classification of query text, for the automatic read/write split.

Theory of operation
-------------------
``Classifier.classify(sql)`` names one of four classes:

- ``READ``: every statement only reads and may run on a replica: SELECT, VALUES,
  TABLE, SHOW, EXPLAIN of a read (with or without ANALYZE), COPY (read) TO STDOUT,
  CTEs that only read.  An empty query is READ.
- ``WRITE``: anything else — DML and DDL, SELECT INTO, locking clauses (FOR UPDATE /
  NO KEY UPDATE / SHARE / KEY SHARE, in any subquery), writing CTEs, calls of
  ``WRITE_FUNCTIONS`` (sequences, advisory locks, xids, pg_notify, set_config ...)
  or of a function the user lists, SET/RESET, LISTEN/NOTIFY, COPY FROM, CALL, DO,
  PREPARE/EXECUTE, LOCK, VACUUM, COMMIT ..., and any text that does not parse.
- ``BEGIN_READ_ONLY`` / ``BEGIN``: BEGIN or START TRANSACTION with / without READ
  ONLY.  A string of several statements is READ when all are, else WRITE.

When in doubt the answer is WRITE: the primary is always correct.

A comment ``/* geobouncer:primary */`` (or ``-- geobouncer:primary``, any case)
forces WRITE; the words are honoured anywhere, even inside a string literal, since
WRITE is always safe.  ``geobouncer:replica`` forces READ, but only from a real
comment, so that ``INSERT ... VALUES ('geobouncer:replica')`` stays a write.

Parsers.  pglast (libpg_query, PostgreSQL's own grammar) when it is installed: it
lexes literals, dollar quotes, nested comments and ``U&"..."`` identifiers exactly
as the server does, with standard_conforming_strings on (the default since 9.1).
Otherwise sqlparse's lexer: it is not PostgreSQL's (backslash escapes in every
string, ``#`` comments, ``[bracketed]`` and backquoted names), so a text with any
token whose extent PostgreSQL could see differently is WRITE; ``_lex`` lists them.
The fallback sees tokens, not grammar: a malformed statement it cannot tell from a
read (beyond unbalanced parentheses) fails on whichever server gets it.

Cost.  Results are cached by exact text, FIFO-evicted past ``cache_size`` entries or
``cache_chars`` characters: a hit is one dict lookup (~0.1-0.2 µs).  A miss costs
one parse: ~20 µs with pglast, ~100 µs with sqlparse for pgbench's SELECT, and it
grows with the text.  Texts over ``long_query`` characters (``LONG_QUERY``: 64 KiB
for pglast, 16 KiB for sqlparse, ~20-60 ms of parsing) are neither parsed nor
cached: ``_scan_long`` (~20 ns a character) reads the whole text as words, strings
and comments included, and says READ only for one SELECT/WITH/VALUES/TABLE, not
preceded by a comment, in which no word could write.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Iterable

from .classify_sqlparse import _WRITE_KEYWORDS, SqlparseFallback, _lex

try:
    from pglast import parser as _pglast
except ImportError:  # pragma: no cover - depends on the environment
    _pglast = None

READ, WRITE, BEGIN_READ_ONLY, BEGIN = "read", "write", "begin_read_only", "begin"

#: Texts longer than this (characters) get the keyword scan, by parser.  Parsing
#: blocks the hub: ~0.25 µs per character with pglast, ~3.5 µs with sqlparse.
LONG_QUERY = {"pglast": 64 * 1024, "sqlparse": 16 * 1024}
DEFAULT_CACHE_CHARS = 32 * 1024 * 1024

#: Functions that write, take locks, or depend on the session or on the server.
WRITE_FUNCTIONS = frozenset(
    {
        *("nextval", "setval", "currval", "lastval", "setseed", "set_config"),
        *("txid_current", "txid_current_if_assigned", "pg_current_xact_id"),
        *("pg_current_xact_id_if_assigned", "pg_export_snapshot", "pg_notify"),
        *("pg_switch_wal", "pg_create_restore_point", "pg_reload_conf", "pg_promote"),
        *("pg_cancel_backend", "pg_terminate_backend", "pg_logical_emit_message"),
        *("pg_drop_replication_slot", "pg_replication_slot_advance"),
        *("pg_wal_replay_pause", "pg_wal_replay_resume", "loread", "lowrite"),
    }
)
WRITE_FUNCTION_PREFIXES = (
    "pg_advisory_",
    "pg_try_advisory_",
    "pg_stat_reset",
    "pg_create_",
    "pg_replication_origin_",
    "lo_",
)

_PRIMARY_HINT = re.compile(r"geobouncer\s*:\s*primary")
_REPLICA_HINT = re.compile(r"geobouncer\s*:\s*replica")
_LEADING_REPLICA_HINT = re.compile(r"\s*(/\*|--)\s*geobouncer\s*:\s*replica")

# What the JSON key of a node means for a SELECT: role names are compared by identity.
_DESCEND, _WRITES, _CALL, _LEAF = "descend", "writes", "call", "leaf"
_PG_ROLES: dict[str, str] = {"FuncCall": _CALL, "A_Const": _LEAF}
# Statement nodes that may appear inside a SELECT; any other *Stmt also means write.
_PG_WRITE_NODES = frozenset(
    {
        *("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"),
        "LockingClause",
        "intoClause",
    }
)


class Classifier(SqlparseFallback):
    """Cached read/write classification; see the module docstring."""

    def __init__(
        self,
        write_functions: Iterable[str] = (),
        cache_size: int = 10000,
        *,
        cache_chars: int = DEFAULT_CACHE_CHARS,
        parser: str | None = None,
        long_query: int | None = None,
    ) -> None:
        if parser is None:
            parser = "sqlparse" if _pglast is None else "pglast"
        if parser not in ("pglast", "sqlparse"):
            raise ValueError(f"unknown parser {parser!r}")
        if parser == "pglast" and _pglast is None:
            raise ImportError("pglast is not installed")
        self.parser = parser
        self.long_query = LONG_QUERY[parser] if long_query is None else long_query
        self.cache_size = max(0, cache_size)
        self.cache_chars = max(0, cache_chars)
        self.hits = 0
        self.misses = 0
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._cache_get = self._cache.get
        self._cached_chars = 0
        # name -> schemas it counts in; empty: every schema
        self._user_functions: dict[str, frozenset[str]] = {}
        for entry in write_functions:
            *schema, name = entry.strip().replace('"', "").lower().split(".")
            known = self._user_functions.get(name)
            if not schema or known == frozenset():
                self._user_functions[name] = frozenset()
            else:
                self._user_functions[name] = (known or frozenset()) | {schema[-1]}
        self._long_words = (
            WRITE_FUNCTIONS | set(self._user_functions) | _LONG_WRITE_WORDS
        )

    def __repr__(self) -> str:
        return (
            f"<Classifier {self.parser} [cache: {len(self._cache)}/{self.cache_size}"
            f" | hits: {self.hits} misses: {self.misses}]>"
        )

    def __len__(self) -> int:
        """The number of texts in the cache."""
        return len(self._cache)

    def classify(self, sql: str) -> str:
        kind = self._cache_get(sql)
        if kind is None:
            return self._classify_miss(sql)
        self.hits += 1
        return kind

    def _classify_miss(self, sql: str) -> str:
        self.misses += 1
        if len(sql) > self.long_query:
            return self._scan_long(sql)  # a key this big would crowd out the cache
        try:
            kind = self._classify_text(sql)
        except Exception:  # noqa: BLE001 - a parser failure, even a bug: primary
            kind = WRITE
        self._remember(sql, kind)
        return kind

    def _remember(self, sql: str, kind: str) -> None:
        cache, size = self._cache, len(sql)
        if not self.cache_size or size > self.cache_chars:
            return
        while (
            len(cache) >= self.cache_size
            or self._cached_chars + size > self.cache_chars
        ):
            self._cached_chars -= len(cache.popitem(last=False)[0])
        cache[sql] = kind
        self._cached_chars += size

    def _classify_text(self, sql: str) -> str:
        if "\x00" in sql:
            sql, _, rest = sql.partition("\x00")
            if rest.strip("\x00"):
                return WRITE  # the server reads up to the first NUL, then fails
        low = sql.lower()
        if "geobouncer" in low:
            if _PRIMARY_HINT.search(low):
                return WRITE
            if _REPLICA_HINT.search(low) and self._replica_hinted(sql):
                return READ
        if self.parser == "pglast":
            kinds = self._pglast_kinds(sql)
        else:
            kinds = self._sqlparse_kinds(sql)
        if len(kinds) == 1:
            return kinds[0]
        return READ if all(kind == READ for kind in kinds) else WRITE

    def _replica_hinted(self, sql: str) -> bool:
        if self.parser == "pglast":
            comments = [comment.str for comment in _pglast.comments(sql)]
        else:
            lexed = _lex(sql)
            comments = lexed[1] if lexed else []
        return any(_REPLICA_HINT.search(comment.lower()) for comment in comments)

    def _writes(self, parts: list[str]) -> bool:
        """Whether a call of the function named by ``parts`` (schema, name) writes."""
        name = parts[-1].lower()
        if name in WRITE_FUNCTIONS or name.startswith(WRITE_FUNCTION_PREFIXES):
            return True
        schemas = self._user_functions.get(name)
        if schemas is None:
            return False
        # an unqualified call may reach the listed schema through search_path
        return not schemas or len(parts) == 1 or parts[-2].lower() in schemas

    # -- pglast -----------------------------------------------------------------

    def _pglast_kinds(self, sql: str) -> list[str]:
        tree = json.loads(_pglast.parse_sql_json(sql))
        return [self._pglast_kind(item["stmt"]) for item in tree.get("stmts", ())]

    def _pglast_kind(self, node: dict) -> str:
        ((name, stmt),) = node.items()
        if name == "SelectStmt":
            return READ if self._pglast_reads(stmt) else WRITE
        if name == "VariableShowStmt":
            return READ
        if name == "ExplainStmt":
            return READ if self._pglast_kind(stmt["query"]) == READ else WRITE
        if name == "CopyStmt":
            if stmt.get("is_from") or stmt.get("filename") or stmt.get("is_program"):
                return WRITE
            query = stmt.get("query")
            return READ if query is None or self._pglast_kind(query) == READ else WRITE
        if name == "TransactionStmt" and stmt["kind"] in (
            "TRANS_STMT_BEGIN",
            "TRANS_STMT_START",
        ):
            modes = [
                option["DefElem"]["arg"]["A_Const"]["ival"].get("ival", 0)
                for option in stmt.get("options", ())
                if option["DefElem"]["defname"] == "transaction_read_only"
            ]
            return BEGIN_READ_ONLY if modes and all(modes) else BEGIN
        return WRITE

    def _pglast_reads(self, select: dict) -> bool:
        pending: list = [select]
        while pending:
            item = pending.pop()
            if type(item) is list:
                pending.extend(item)
            elif type(item) is dict:
                for key, value in item.items():
                    role = _PG_ROLES.get(key) or _pg_role(key)
                    if role is _DESCEND:
                        if type(value) is dict or type(value) is list:
                            pending.append(value)
                    elif role is _WRITES:
                        return False
                    elif role is _CALL:
                        names = [part["String"]["sval"] for part in value["funcname"]]
                        if self._writes(names):
                            return False
                        pending.append(value)
        return True

    # -- sqlparse ---------------------------------------------------------------

    def _scan_long(self, sql: str) -> str:
        head = sql[:256].lower()  # a bulk INSERT is answered without reading it all
        replica = _LEADING_REPLICA_HINT.match(head)
        if not replica and not _LONG_READ_START.match(head):
            return WRITE
        low = sql.lower()
        if _PRIMARY_HINT.search(low) or "\x00" in low:
            return WRITE
        if replica:
            return READ
        if _LONG_WRITE_MARKS.search(low):
            return WRITE
        words = set(_WORD.findall(low))
        if not words.isdisjoint(self._long_words):
            return WRITE
        prefixes = WRITE_FUNCTION_PREFIXES
        return WRITE if any(word.startswith(prefixes) for word in words) else READ


_LONG_WRITE_WORDS = frozenset(word.lower() for word in _WRITE_KEYWORDS)
_LONG_READ_START = re.compile(r"[\s(]*(select|with|values|table)\b")
# a statement separator before the end, or a U&"..." identifier
_LONG_WRITE_MARKS = re.compile(r";(?!\s*\Z)|u&[\"']")
_WORD = re.compile(r"[^\W\d][\w$]*")


def _pg_role(key: str) -> str:
    other_statement = key.endswith("Stmt") and key[0].isupper() and key != "SelectStmt"
    role = _WRITES if other_statement or key in _PG_WRITE_NODES else _DESCEND
    _PG_ROLES[key] = role  # keys are libpg_query's node and field names: a few hundred
    return role
