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


def _options(node) -> dict:
    opts = {}
    for d in node.options or ():
        arg = d.arg
        val = getattr(arg, "sval", None)
        if val is None:
            val = getattr(arg, "ival", None)
        if val is None and hasattr(arg, "boolval"):
            val = arg.boolval
        opts[d.defname.lower()] = True if arg is None else val
    return opts


def _true(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "on", "match")


def copy_out_plan(sql, node, hint):
    """COPY ... TO STDOUT: every shard's rows, one after the other (the merge
    keeps the first shard's CSV header only). A query that would need merging
    (aggregates, ORDER BY, LIMIT, DISTINCT) cannot be concatenated: refused
    over several shards, as for a SELECT that cannot be merged."""
    from .merge import MergeSpec
    from .plan import Plan
    opts = _options(node)
    merge_error = None
    if str(opts.get("format", "text")).lower() == "binary":
        merge_error = ("0A000", "COPY ... TO STDOUT in binary format cannot be combined across shards")
    elif node.query is not None:
        from .planmerge import merge_plan
        spec, _, error = merge_plan(node.query)
        if spec is not None or error is not None:
            merge_error = ("0A000", "COPY (query) TO STDOUT across shards is sent as is and its rows "
                                    "concatenated: this query needs a merge (run it as a SELECT)")
    return Plan("all", sql, hint, False, merge=MergeSpec(copy_header=_true(opts.get("header", False))),
                merge_error=merge_error)


def copy_plan(sdb, sql, node, hint):
    from .plan import Plan
    if not node.is_from and node.filename is None and not node.is_program:
        return copy_out_plan(sql, node, hint)
    if not node.is_from or node.filename is not None or node.is_program \
            or not isinstance(node.relation, ast.RangeVar) or node.query is not None:
        return Plan("all", sql, hint, bool(node.is_from))
    opts = _options(node)
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
                    header=_true(header),
                    quote=opts.get("quote", '"') if csv else None,
                    escape=opts.get("escape", opts.get("quote", '"')) if csv else None,
                    key_rule=rule, key_candidates=tuple(candidates) if rule is None else ())
    return Plan("route", sql, hint, True, copy=spec)
