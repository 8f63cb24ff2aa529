"""Merge specs for SELECTs answered by several shards (used by plan.py).

merge_plan(select) -> (MergeSpec | None, shard_sql | None, merge_error | None).
Supported: ORDER BY select items (position, alias, or the same expression), constant
LIMIT/OFFSET (shards get LIMIT offset+limit without OFFSET), count/sum/min/max/avg (avg ->
sum and count, count appended as a hidden column), GROUP BY select items, DISTINCT.
Everything else that a merge could get wrong is a merge_error (0A000). ORDER BY a column
that is not selected (incl. with SELECT *) is refused, not added as a hidden column.
"""
from pglast import ast, enums
from pglast.stream import RawStream

from .merge import Agg, MergeSpec, SortKey

AGGS = frozenset(("count", "sum", "min", "max", "avg"))
BYTEWISE_COLLATIONS = frozenset(("c", "posix", "ucs_basic"))   # the orders the merge compares in
OTHER_AGGS = frozenset((
    "array_agg", "string_agg", "json_agg", "jsonb_agg", "json_object_agg", "jsonb_object_agg",
    "bool_and", "bool_or", "every", "bit_and", "bit_or", "bit_xor", "xmlagg", "stddev",
    "stddev_pop", "stddev_samp", "variance", "var_pop", "var_samp", "corr", "covar_pop",
    "covar_samp", "regr_avgx", "regr_avgy", "regr_count", "regr_intercept", "regr_r2",
    "regr_slope", "regr_sxx", "regr_sxy", "regr_syy", "mode", "percentile_cont",
    "percentile_disc", "rank", "dense_rank", "percent_rank", "cume_dist", "range_agg",
    "range_intersect_agg", "any_value", "json_arrayagg", "json_objectagg"))


class Unsupported(Exception):
    pass


def merge_plan(node):
    try:
        return _merge(node)
    except Unsupported as exc:
        return None, None, ("0A000", "not supported over several shards: %s" % exc)


def _fname(call):
    return getattr(call.funcname[-1], "sval", "").lower()


def _text(node):
    return RawStream()(node)


def _merge(node):
    if node.op != enums.SetOperation.SETOP_NONE:
        if node.op == enums.SetOperation.SETOP_UNION and node.all and not node.sortClause \
                and node.limitCount is None and node.limitOffset is None:
            _check_no_aggs(node, ())
            return None, None, None
        raise Unsupported("UNION/INTERSECT/EXCEPT (only a plain UNION ALL)")
    if node.valuesLists:
        return None, None, None
    targets = list(node.targetList or ())
    top_aggs = []
    for t in targets:
        v = t.val
        if isinstance(v, ast.FuncCall) and _fname(v) in AGGS and not v.over:
            top_aggs.append(v)
    if node.havingClause is not None:
        raise Unsupported("HAVING")
    _check_no_aggs(node, top_aggs)
    distinct = False
    if node.distinctClause:
        if node.distinctClause != (None,):
            raise Unsupported("DISTINCT ON")
        distinct = True
    texts: list = []             # the select items deparsed, when an ORDER/GROUP BY needs them
    names = [t.name for t in targets]
    star = any(isinstance(t.val, ast.ColumnRef) and isinstance(t.val.fields[-1], ast.A_Star)
               for t in targets)

    def position(expr, what):
        if isinstance(expr, ast.A_Const) and isinstance(expr.val, ast.Integer):
            n = expr.val.ival
            if 1 <= n <= len(targets) and not (star and n > 1):
                return n - 1
            raise Unsupported("%s by position %d" % (what, n))
        if isinstance(expr, ast.ColumnRef) and len(expr.fields) == 1 \
                and getattr(expr.fields[0], "sval", None) in names:
            return names.index(expr.fields[0].sval)
        if not star:
            if not texts:
                texts.extend(_text(t.val) for t in targets)
            t = _text(expr)
            if t in texts:
                return texts.index(t)
        raise Unsupported("%s an expression that is not in the select list" % what)

    group = tuple(position(g, "GROUP BY") for g in node.groupClause or ())
    if any(isinstance(g, (ast.GroupingSet,)) for g in node.groupClause or ()):
        raise Unsupported("GROUPING SETS/ROLLUP/CUBE")
    aggregates, extra = [], []
    for i, t in enumerate(targets):
        v = t.val
        if any(v is a for a in top_aggs):
            if v.agg_distinct or v.agg_filter is not None or v.agg_order \
                    or v.agg_within_group:
                raise Unsupported("%s(DISTINCT/FILTER/ORDER BY)" % _fname(v))
            func = _fname(v)
            if func == "avg":
                count = ast.FuncCall(funcname=(ast.String(sval="count"),), args=v.args,
                                     agg_star=False, agg_distinct=False,
                                     func_variadic=False, agg_within_group=False,
                                     funcformat=v.funcformat)
                extra.append((i, count))
                aggregates.append(Agg(i, "avg", len(targets) + len(extra) - 1))
            else:
                aggregates.append(Agg(i, func))
        elif (top_aggs or group) and i not in group and not isinstance(v, ast.A_Const):
            raise Unsupported("a column that is neither grouped nor aggregated")
    order = []
    for s in node.sortClause or ():
        if s.sortby_dir == enums.SortByDir.SORTBY_USING:
            raise Unsupported("ORDER BY ... USING")
        nulls = {enums.SortByNulls.SORTBY_NULLS_FIRST: True,
                 enums.SortByNulls.SORTBY_NULLS_LAST: False}.get(s.sortby_nulls)
        expr, bytewise = s.node, False
        if isinstance(expr, ast.CollateClause):
            collation = expr.collname[-1].sval if expr.collname else ""
            if collation.lower() not in BYTEWISE_COLLATIONS:
                raise Unsupported(f'ORDER BY ... COLLATE "{collation}"')
            expr, bytewise = expr.arg, True
        order.append(SortKey(position(expr, "ORDER BY"),
                             s.sortby_dir == enums.SortByDir.SORTBY_DESC, nulls, bytewise))
    limit, offset = _int(node.limitCount, "LIMIT"), _int(node.limitOffset, "OFFSET") or 0
    if node.limitOption == enums.LimitOption.LIMIT_OPTION_WITH_TIES:
        raise Unsupported("FETCH ... WITH TIES")
    if node.lockingClause and (top_aggs or group or distinct):
        raise Unsupported("FOR UPDATE with aggregates")
    if not (order or limit is not None or offset or aggregates or group or distinct):
        return None, None, None
    spec = MergeSpec(order_by=tuple(order), limit=limit, offset=offset, group_by=group,
                     aggregates=tuple(aggregates), distinct=distinct,
                     visible=len(targets) if extra else None)
    return spec, _shard_sql(node, extra, limit, offset, bool(aggregates or group)), None


def _shard_sql(node, extra, limit, offset, grouped):
    if not extra and not offset and not (grouped and limit is not None):
        return None
    saved = (node.targetList, node.limitCount, node.limitOffset)
    try:
        tl = list(node.targetList)
        for i, count in extra:
            old = tl[i]
            tl[i] = ast.ResTarget(name=old.name, val=ast.FuncCall(
                funcname=(ast.String(sval="sum"),), args=old.val.args, agg_star=False,
                agg_distinct=False, func_variadic=False, agg_within_group=False,
                funcformat=old.val.funcformat))
            tl.append(ast.ResTarget(val=count))
        node.targetList = tuple(tl)
        if grouped:
            node.limitCount = node.limitOffset = None
        elif limit is not None:
            node.limitCount = ast.A_Const(isnull=False, val=ast.Integer(ival=limit + offset))
            node.limitOffset = None
        else:
            node.limitOffset = None
        return RawStream()(node)
    finally:
        node.targetList, node.limitCount, node.limitOffset = saved


def _int(expr, what):
    if expr is None or (isinstance(expr, ast.A_Const) and expr.isnull):
        return None
    if isinstance(expr, ast.A_Const) and isinstance(expr.val, ast.Integer) \
            and expr.val.ival >= 0:
        return expr.val.ival
    raise Unsupported("%s that is not a constant integer" % what)


def _check_no_aggs(node, allowed):
    from .plan import _walk
    for n in _walk(node):
        if isinstance(n, ast.FuncCall):
            if n.over is not None:
                raise Unsupported("window functions")
            name = _fname(n)
            if name in OTHER_AGGS or n.agg_within_group:
                raise Unsupported("the aggregate %s" % name)
            if name in AGGS and not any(n is a for a in allowed):
                raise Unsupported("aggregates inside expressions, subqueries or CTEs")
