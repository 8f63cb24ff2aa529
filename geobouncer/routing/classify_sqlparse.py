"""The sqlparse fallback of the read/write classifier (routing/classify.py),
used when pglast is not installed: sqlparse's tokens, checked against
PostgreSQL's lexical rules; anything it could split differently from the server
is a WRITE. A mixin of Classifier."""

from __future__ import annotations

import re
from itertools import pairwise

from sqlparse import lexer as _sqlparse_lexer
from sqlparse import tokens as T

READ, WRITE, BEGIN_READ_ONLY, BEGIN = "read", "write", "begin_read_only", "begin"

_WRITE_KEYWORDS = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "INTO", "SHARE"})
_BEGIN_WORDS = frozenset(
    {
        *("BEGIN", "START", "WORK", "TRANSACTION", "ISOLATION", "LEVEL", ","),
        *("SERIALIZABLE", "REPEATABLE", "READ", "COMMITTED", "UNCOMMITTED"),
        *("ONLY", "NOT", "DEFERRABLE"),
    }
)


class SqlparseFallback:
    def _sqlparse_kinds(self, sql: str) -> list[str]:
        lexed = _lex(sql)
        if lexed is None:
            return [WRITE]
        # the lexer cannot see a malformed statement; unbalanced parentheses are
        # the cheap part of that check (the server rejects the rest anyway)
        depth = 0
        statements: list[list[tuple]] = [[]]
        for token in lexed[0]:
            depth += (token[1] == "(") - (token[1] == ")")
            if depth < 0:
                return [WRITE]
            if token[1] == ";" and token[0] is T.Punctuation:
                if depth:
                    return [WRITE]
                statements.append([])
            else:
                statements[-1].append(token)
        if depth:
            return [WRITE]
        return [self._sqlparse_kind(tokens) for tokens in statements if tokens]

    def _sqlparse_kind(self, tokens: list[tuple]) -> str:
        words = [value.upper() for _, value in tokens]
        first = words[0]
        if first in ("SELECT", "WITH", "VALUES", "TABLE", "("):
            return READ if self._sqlparse_reads(tokens) else WRITE
        if first == "SHOW":
            return READ
        if first == "EXPLAIN":
            start = 1
            while start < len(tokens) and words[start] in (
                "ANALYZE",
                "ANALYSE",
                "VERBOSE",
                "(",
            ):
                start = _closing(words, start) + 1 if words[start] == "(" else start + 1
            inner = tokens[start:]
            return READ if inner and self._sqlparse_kind(inner) == READ else WRITE
        if first == "COPY":
            return self._sqlparse_copy(tokens, words)
        if first == "BEGIN" or words[:2] == ["START", "TRANSACTION"]:
            modes = set(pairwise(words))
            read_only = ("READ", "ONLY") in modes and ("READ", "WRITE") not in modes
            return (
                BEGIN_READ_ONLY
                if read_only and _BEGIN_WORDS.issuperset(words)
                else BEGIN
            )
        return WRITE

    def _sqlparse_copy(self, tokens: list[tuple], words: list[str]) -> str:
        """COPY (read) TO STDOUT and COPY table TO STDOUT read; all else writes."""
        rest = 1
        if words[1:2] == ["("]:
            rest = _closing(words, 1) + 1
            if rest < 4 or self._sqlparse_kind(tokens[2 : rest - 1]) != READ:
                return WRITE
        depth = 0
        for index in range(rest, len(words)):
            word = words[index]
            depth += (word == "(") - (word == ")")
            if depth == 0 and word in ("TO", "FROM"):
                return READ if words[index : index + 2] == ["TO", "STDOUT"] else WRITE
        return WRITE

    def _sqlparse_reads(self, tokens: list[tuple]) -> bool:
        for index, (ttype, value) in enumerate(tokens):
            if ttype in T.Name or ttype in T.Keyword:
                before = tokens[index - 1][1] if index else ""
                if value.upper() in _WRITE_KEYWORDS and before != ".":
                    return False
            nxt = tokens[index + 1][1] if index + 1 < len(tokens) else ""
            callable_name = ttype in T.Name or ttype in T.Keyword or ttype is _SYMBOL
            if (
                nxt == "("
                and callable_name
                and self._writes(_qualified_name(tokens, index))
            ):
                return False
        return True

    # -- texts over long_query --------------------------------------------------


# -- sqlparse lexing, checked against PostgreSQL's rules -------------------------

_PG_NAME = re.compile(r"[^\W\d][\w$]*\Z")
_DOLLAR_TAG = re.compile(r"\$(?:[^\W\d]\w*)?\$")
_TIME_ZONE = re.compile(r"at\s+time\s+zone\s+'[^']*'\Z", re.IGNORECASE)
# in a code token, text that starts or ends a literal, comment or quoted name
_SUSPECT_CODE = re.compile(r"['\"`´\[\]$]|--|/\*|\*/")
_SYMBOL = T.String.Symbol  # a double-quoted name
_UNICODE_ESCAPE = re.compile(r"u&['\"]", re.IGNORECASE)


def _lex(sql: str) -> tuple[list[tuple], list[str]] | None:
    """(code tokens without whitespace or comments, comments), or None when sqlparse
    might not split the text where PostgreSQL does."""
    if "\\" in sql or _UNICODE_ESCAPE.search(sql):
        return None  # backslash escapes: sqlparse reads 'a\' as unterminated
    code: list[tuple] = []
    comments: list[str] = []
    previous = ""
    for ttype, value in _sqlparse_lexer.tokenize(sql):
        if value[:1] == "*" and previous[-1:] == "/":
            return None  # an unterminated /* comment, lexed as "/" and "*"
        previous = value
        if ttype in T.Comment:
            if not _pg_comment(value):
                return None  # '# ' comments, nested /* /* */ */
            comments.append(value)
        elif ttype in T.Whitespace:
            continue
        elif _pg_token(ttype, value):
            code.append((ttype, value))
        else:
            return None
    return code, comments


def _pg_comment(value: str) -> bool:
    if value.startswith("--"):
        return True
    return value.startswith("/*") and value.endswith("*/") and "/*" not in value[2:]


def _pg_token(ttype, value: str) -> bool:
    """Whether PostgreSQL would read this code token with the same extent."""
    if ttype is T.String.Single:
        return len(value) > 1 and value[0] == value[-1] == "'"
    if ttype is _SYMBOL:
        return len(value) > 1 and value[0] == value[-1] == '"'
    if ttype is T.Literal:
        tag = _DOLLAR_TAG.match(value)
        return (
            tag is not None and len(value) >= 2 * len(tag[0]) and value.endswith(tag[0])
        )
    if ttype is T.Keyword.TZCast:
        return _TIME_ZONE.match(value) is not None
    if ttype in T.Error:
        return False
    if ttype is T.Name or ttype is T.Name.Builtin:
        return _PG_NAME.match(value) is not None
    if ttype is T.Name.Placeholder and value.startswith("$"):
        return value[1:].isdigit()
    return ttype is T.Punctuation or _SUSPECT_CODE.search(value) is None


def _qualified_name(tokens: list[tuple], index: int) -> list[str]:
    parts = []
    while True:
        ttype, value = tokens[index]
        if ttype is _SYMBOL:
            value = value[1:-1].replace('""', '"')
        parts.append(value.lstrip(":"))  # sqlparse's :name is PostgreSQL's a[1:name]
        if index < 2 or tokens[index - 1][1] != ".":
            return parts[::-1]
        index -= 2


def _closing(words: list[str], start: int) -> int:
    """Index of the parenthesis closing words[start], or len(words)."""
    depth = 0
    for index in range(start, len(words)):
        depth += (words[index] == "(") - (words[index] == ")")
        if depth == 0:
            return index
    return len(words)
