"""Sharding-key conditions of one statement's parse tree (used by plan.py).

A condition is None (unknown: every shard), ("leaf", rule, "const"|"param", text|number),
or ("or"|"and", [conditions]). Only the statement's own FROM/WHERE is looked at; keys
inside subqueries do not narrow the targets (they may, but every shard is always right).
"""
from pglast import ast, enums

K = enums.A_Expr_Kind
B = enums.BoolExprType


class KeyFinder:
    __slots__ = ("sdb", "scope")

    def __init__(self, sdb):
        self.sdb = sdb
        self.scope = {}  # alias or table name -> (table, schema)

    def statement(self, node):
        """(condition, rows): rows is a list of per-row conditions for INSERT VALUES."""
        if isinstance(node, ast.InsertStmt):
            return self._insert(node)
        if isinstance(node, ast.SelectStmt):
            if node.op != enums.SetOperation.SETOP_NONE:
                return None, None
            self._from(node.fromClause)
            return self._where(node.whereClause), None
        if isinstance(node, ast.UpdateStmt):
            self._range(node.relation)
            self._from(node.fromClause)
            return self._where(node.whereClause), None
        if isinstance(node, ast.DeleteStmt):
            self._range(node.relation)
            self._from(node.usingClause)
            return self._where(node.whereClause), None
        return None, None

    def _insert(self, node):
        rel = node.relation
        sel = node.selectStmt
        if not isinstance(sel, ast.SelectStmt) or not sel.valuesLists or not node.cols:
            return None, None
        table, schema = rel.relname, rel.schemaname
        index = []
        for i, col in enumerate(node.cols):
            rule = self.sdb.rule_for(table, schema, col.name)
            if rule is not None:
                index.append((i, rule))
        if not index:
            return None, None
        rows = []
        for row in sel.valuesLists:
            conds = []
            for i, rule in index:
                leaf = _leaf(rule, row[i]) if i < len(row) else None
                conds.append(leaf)
            rows.append(_and(conds))
        if any(r is None for r in rows):
            return None, None
        return (rows[0] if len(rows) == 1 else ("or", rows)), (rows if len(rows) > 1 else None)

    def _range(self, rv):
        if isinstance(rv, ast.RangeVar):
            entry = (rv.relname, rv.schemaname)
            self.scope[rv.alias.aliasname if rv.alias else rv.relname] = entry

    def _from(self, items):
        stack = list(items or ())
        while stack:
            item = stack.pop()
            if isinstance(item, ast.RangeVar):
                self._range(item)
            elif isinstance(item, ast.JoinExpr):
                stack.append(item.larg)
                stack.append(item.rarg)

    def _where(self, expr):
        if expr is None:
            return None
        if isinstance(expr, ast.BoolExpr):
            parts = [self._where(a) for a in expr.args]
            if expr.boolop == B.AND_EXPR:
                return _and(parts)
            if expr.boolop == B.OR_EXPR and all(p is not None for p in parts):
                return ("or", parts)
            return None
        if not isinstance(expr, ast.A_Expr) or not _is_eq(expr):
            return None
        if expr.kind == K.AEXPR_OP:
            rule = self._rule(expr.lexpr)
            other = expr.rexpr
            if rule is None:
                rule, other = self._rule(expr.rexpr), expr.lexpr
            return _leaf(rule, other) if rule is not None else None
        if expr.kind == K.AEXPR_IN:
            rule = self._rule(expr.lexpr)
            if rule is None or not isinstance(expr.rexpr, tuple):
                return None
            leaves = [_leaf(rule, v) for v in expr.rexpr]
            return ("or", leaves) if leaves and all(l is not None for l in leaves) else None
        if expr.kind == K.AEXPR_OP_ANY:
            rule = self._rule(expr.lexpr)
            items = _array_literal(expr.rexpr, rule) if rule is not None else None
            if not items:
                return None
            return ("or", [("leaf", rule, "const", v) for v in items])
        return None

    def _rule(self, ref):
        cast = None
        if isinstance(ref, ast.TypeCast):
            cast, ref = ref.typeName, ref.arg
        if not isinstance(ref, ast.ColumnRef):
            return None
        names = [getattr(f, "sval", None) for f in ref.fields]
        if not names or None in names:
            return None
        column = names[-1]
        if len(names) >= 2:
            entry = self.scope.get(names[-2])
            entries = [entry] if entry is not None else []
        else:
            entries = list(self.scope.values())
        for table, schema in entries:
            rule = self.sdb.rule_for(table, schema, column)
            if rule is not None:
                # key::othertype = v compares in another type (a text key as an
                # integer matches '010' too): only a cast within the key's own type
                # keeps the comparison the key's.
                return rule if cast is None or _cast_ok(rule, cast) else None
        return None


def _is_eq(expr):
    return len(expr.name) == 1 and getattr(expr.name[0], "sval", None) == "="


# The casts that leave a constant's text what the key's type reads (a string
# literal as the key's input; an integer printed as text is its digits).
_CASTS = {"int8": {"int8", "int4", "int2"}, "int4": {"int8", "int4", "int2"},
          "int2": {"int8", "int4", "int2"}, "text": {"text", "varchar"}, "uuid": {"uuid"}}


def _cast_ok(rule, type_name, array: bool = False) -> bool:
    names = [getattr(n, "sval", None) for n in type_name.names or ()]
    if not names or type_name.typmods or bool(type_name.arrayBounds) != array:
        return False
    return names[-1] in _CASTS.get(rule.ctype, ())


def _const_text(node, rule=None, array: bool = False):
    """A constant's text; through one cast that keeps it (``rule`` given),
    None for any other cast (1e1::text is '10', 'us '::char(3)::text 'us')."""
    if isinstance(node, ast.TypeCast):
        if rule is None or not _cast_ok(rule, node.typeName, array):
            return None
        node = node.arg
        if isinstance(node, ast.A_Const) and getattr(node.val, "fval", None) is not None:
            return None
    if isinstance(node, ast.A_Const) and not node.isnull:
        v = node.val
        for attr in ("ival", "fval", "sval"):
            got = getattr(v, attr, None)
            if got is not None:
                return str(got)
    return None


def _leaf(rule, node):
    if rule is None:
        return None
    if isinstance(node, ast.TypeCast) and isinstance(node.arg, ast.ParamRef):
        return ("leaf", rule, "param", node.arg.number) if _cast_ok(rule, node.typeName) else None
    if isinstance(node, ast.ParamRef):
        return ("leaf", rule, "param", node.number)
    text = _const_text(node, rule)
    return None if text is None else ("leaf", rule, "const", text)


def _array_literal(node, rule):
    """Items of a constant '{a,b}' array literal (simple, unquoted items only)."""
    text = _const_text(node, rule, array=True)
    if text is None or not text.startswith("{") or not text.endswith("}"):
        return None
    body = text[1:-1].strip()
    if not body or any(c in body for c in '"\\{}'):
        return None
    items = [t.strip() for t in body.split(",")]
    if any(not t or t.upper() == "NULL" for t in items):
        return None
    return items


def _and(conds):
    conds = [c for c in conds if c is not None]
    return None if not conds else conds[0] if len(conds) == 1 else ("and", conds)
