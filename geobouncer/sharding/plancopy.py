"""COPY ... FROM STDIN plans (CopySpec)."""
from pglast import ast


class CopySpec:
    """COPY table [(cols)] FROM STDIN: what the loop needs to route rows.

    columns None: the table's own column order (the loop looks it up). key_rule: the rule
    whose column is in `columns` (or, with columns None, the rule naming this table).
    key_candidates: with columns None, the table=* rules (table None) that apply if the
    table has their column -- the loop checks them against the looked-up column list.
    key_rule None and no candidate that applies: the table is not sharded, the loop sends
    every row to every shard (a replicated table)."""

    __slots__ = ("table", "schema", "columns", "format", "delimiter", "null", "header",
                 "quote", "escape", "key_rule", "key_candidates")

    def __init__(self, **kw):
        for name in self.__slots__:
            object.__setattr__(self, name, kw.get(name))

    def __setattr__(self, name, value):
        raise AttributeError("CopySpec is immutable")


def copy_plan(sdb, sql, node, hint):
    from .plan import Plan
    if not node.is_from or node.filename is not None or node.is_program \
            or not isinstance(node.relation, ast.RangeVar) or node.query is not None:
        return Plan("all", sql, hint, bool(node.is_from))
    opts = {}
    for d in node.options or ():
        arg = d.arg
        val = getattr(arg, "sval", None)
        if val is None:
            val = getattr(arg, "ival", None)
        if val is None and hasattr(arg, "boolval"):
            val = arg.boolval
        opts[d.defname.lower()] = True if arg is None else val
    fmt = str(opts.get("format", "text")).lower()
    csv = fmt == "csv"
    rel = node.relation
    cols = tuple(c.sval for c in node.attlist) if node.attlist else None
    rule, candidates = None, []
    for r in sdb.columns_for(rel.relname, rel.schemaname):
        if cols is None and r.table is None:
            candidates.append(r)
        elif rule is None and (cols is None or r.column in cols):
            rule = r
    header = opts.get("header", False)
    spec = CopySpec(table=rel.relname, schema=rel.schemaname, columns=cols, format=fmt,
                    delimiter=opts.get("delimiter", "," if csv else "\t"),
                    null=opts.get("null", "" if csv else "\\N"),
                    header=header if isinstance(header, bool) else str(header).lower() in
                    ("1", "true", "on", "match"),
                    quote=opts.get("quote", '"') if csv else None,
                    escape=opts.get("escape", opts.get("quote", '"')) if csv else None,
                    key_rule=rule, key_candidates=tuple(candidates) if rule is None else ())
    return Plan("route", sql, hint, True, copy=spec)
