"""Plans shared by queries that differ only in their constants (simple protocol).

A keyed lookup sent as text (``... WHERE id = 17``, then ``= 18``...) is a
new text each time, and a full parse costs far more than routing it. Here the
text is normalized (pg_query's normalize: each constant becomes ``$n``), the
constants are read back from the original text, and the plan of the
normalized text — the same statement with parameters where the constants
were — is evaluated with them as text parameters, exactly as a Bind's values
would be. Only what that covers is used: a plain integer, decimal or
'quoted' string constant, a statement planned as a route with nothing to
merge, split or rewrite. Anything else (escapes, dollar quoting, a text that
already has parameters, a constant that cannot be read back) returns None and
the caller plans the text itself.
"""

from __future__ import annotations

import re

from pglast.parser import normalize, scan

_PLACEHOLDER = re.compile(r"\$(\d+)")
_SIMPLE = frozenset(("ICONST", "FCONST", "SCONST"))
_SIGNS = frozenset(("ASCII_45", "ASCII_43"))       # - and +


def constants(sql: str) -> tuple[str, list[bytes]] | None:
    """(normalized text, constant values as text parameters), or None."""
    if "$" in sql:
        return None
    try:
        norm = normalize(sql)
        tokens = scan(sql)
    except Exception:  # noqa: BLE001 - unparsable: the caller's full plan reports it
        return None
    starts = {tok.start: i for i, tok in enumerate(tokens)}
    values: dict[int, bytes] = {}
    pos_n = pos_o = 0
    parts = []
    for match in _PLACEHOLDER.finditer(norm):
        gap = norm[pos_n:match.start()]
        if sql[pos_o:pos_o + len(gap)] != gap:
            return None
        pos_o += len(gap)
        span = _constant_at(sql, tokens, starts.get(pos_o))
        if span is None:
            return None
        end, value = span
        number = int(match.group(1))
        if number in values or number > 256:
            return None
        values[number] = value
        parts.append(gap + sql[pos_o:end])
        pos_o, pos_n = end, match.end()
    if sql[pos_o:] != norm[pos_n:] or sorted(values) != list(range(1, len(values) + 1)):
        return None
    return norm, [values[n] for n in range(1, len(values) + 1)]


def _constant_at(sql: str, tokens, index: int | None):
    """(end, text value) of the constant whose first token is ``tokens[index]``."""
    if index is None:
        return None
    tok = tokens[index]
    sign = ""
    if tok.name in _SIGNS:
        if index + 1 >= len(tokens) or tokens[index + 1].start != tok.end + 1:
            return None
        sign = "-" if tok.name == "ASCII_45" else ""
        tok = tokens[index + 1]
        if tok.name not in ("ICONST", "FCONST"):
            return None
    if tok.name not in _SIMPLE:
        return None
    raw = sql[tok.start:tok.end + 1]
    if tok.name == "SCONST":
        inner = raw[1:-1]
        if len(raw) < 2 or raw[0] != "'" or raw[-1] != "'" or "\\" in raw or "'" in inner.replace("''", ""):
            # E'', U&'', $$...$$, and 'a' <newline> 'b' (one string in two pieces):
            # the full plan reads those.
            return None
        return tok.end + 1, inner.replace("''", "'").encode("utf-8", "surrogateescape")
    if tok.name == "FCONST":
        return None                      # 1e1, .5, 1.50: as text they are not what was written
    try:                                 # an integer's value, as PostgreSQL prints it: 010 is 10
        value = int(raw, 0) if raw[:2].lower() in ("0x", "0o", "0b") else int(raw, 10)
    except ValueError:
        return None
    return tok.end + 1, str(-value if sign else value).encode()


def usable(plan) -> bool:
    """A template's plan that parameters can stand in for constants in."""
    return (plan.kind == "route" and plan.merge is None and plan.merge_error is None
            and plan.shard_sql is None and plan.copy is None and plan._rows is None
            and plan.statements == 1)
