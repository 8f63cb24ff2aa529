"""Which shards a statement goes to, from its pglast parse tree (pure, no I/O).

Planner(sdb).plan(sql) -> Plan, cached by text in a bounded LRU; plan() never raises.
Unparsable text -> kind "all" so every shard's PostgreSQL reports the syntax error.
"""
import collections
import re

import pglast
from pglast import ast, enums
from pglast.parser import scan

from .rules import ShardingError

HINT_RE = re.compile(r"/\*\s*geobouncer:shard\s*=\s*([^\s*]*)\s*\*/", re.I)
SHARD_GUC = "geobouncer.shard"
KEY_GUC = "geobouncer.sharding_key"
WRITE_NODES = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)
MAX_CACHED_TEXT = 16384
READ_NODES = (ast.SelectStmt, ast.VariableShowStmt, ast.ExplainStmt)


class Plan:
    """An immutable routing decision for one query text.

    kind: route | begin | commit | rollback | set_shard | set_key | reset_shard | all | error.
    value: the int (set_shard) or str (set_key). error: (sqlstate, text) for kind "error".
    merge_error: (sqlstate, text) or None -- the statement cannot be merged over several
    shards; the loop raises it only when targets() gives None or more than one shard (a
    single-shard plan never needs a merge). merge / shard_sql: see planmerge (computed
    for every top-level SELECT; the loop ignores them for one shard). copy: CopySpec.
    hint is reported, not applied: targets() ignores it (the loop gives it precedence).
    Several statements: "all" when none is keyed (and none needs a merge), "route" when all
    go to one shard (or a hint is given), otherwise "error" 0A000.
    targets() is never an empty set (contradictory keys: one shard).
    """

    __slots__ = ("kind", "sql", "hint", "write", "statements", "value", "error",
                 "merge", "shard_sql", "merge_error", "copy", "_cond", "_rows")

    def __init__(self, kind, sql, hint=None, write=False, statements=1, value=None,
                 error=None, cond=None, rows=None, merge=None, shard_sql=None,
                 merge_error=None, copy=None):
        s = object.__setattr__
        for k, v in (("kind", kind), ("sql", sql), ("hint", hint), ("write", write),
                     ("statements", statements), ("value", value), ("error", error),
                     ("_cond", cond), ("_rows", rows), ("merge", merge),
                     ("shard_sql", shard_sql), ("merge_error", merge_error),
                     ("copy", copy)):
            s(self, k, v)

    def __setattr__(self, name, value):
        raise AttributeError("Plan is immutable")

    def __repr__(self):
        return "Plan(%s, hint=%r, write=%r)" % (self.kind, self.hint, self.write)

    def targets(self, params=(), formats=()):
        """frozenset of shard numbers, or None for every shard (ShardingError on bad keys)."""
        if self.kind != "route":
            return None
        return _eval(self._cond, Args(params, formats))

    def split(self, params=(), formats=()):
        """{shard: sql} for a multi-row INSERT VALUES spanning shards, else None.

        A spanning insert whose rows hold $n parameters raises ShardingError 0A000 (the
        text cannot be rewritten per shard with the client's parameter numbering)."""
        if self.kind != "route" or self._rows is None:
            return None
        stmt, rows = self._rows
        args = Args(params, formats)
        per = collections.OrderedDict()
        for i, cond in enumerate(rows):
            got = _eval(cond, args)
            if got is None or len(got) != 1:
                return None  # not reached: an unkeyed row leaves _rows None
            per.setdefault(next(iter(got)), []).append(i)
        if len(per) < 2:
            return None
        if "$" in self.sql and _has_param(stmt):
            raise ShardingError("0A000", "a multi-row INSERT with parameters whose rows "
                                "go to different shards is not supported")
        return _deparse_split(stmt, per)


def syntax_error(sql: str) -> str | None:
    """PostgreSQL's message for a text its parser refuses as a syntax error
    (None: it does not, or fails for another reason, e.g. bytes not UTF-8)."""
    try:
        pglast.parse_sql(sql)
    except pglast.parser.ParseError as exc:
        return str(exc.args[0]) if exc.args else "syntax error"
    except Exception:  # noqa: BLE001 - not a syntax error: the shard says what it is
        return None
    return None


def _names_shards(plan, params) -> bool:
    try:
        return plan.targets(params, ()) is not None
    except ShardingError:
        return False                 # the text's own plan reports the bad key


class Args:
    __slots__ = ("params", "formats")

    def __init__(self, params, formats):
        self.params, self.formats = tuple(params), tuple(formats)

    def shard(self, rule, number):
        if number < 1 or number > len(self.params):
            raise ShardingError("08P01", "no value for parameter $%d" % number)
        value = self.params[number - 1]
        if value is None:
            raise ShardingError("22004", "NULL sharding key for %s" % rule.column)
        f = self.formats
        fmt = 0 if not f else f[0] if len(f) == 1 else f[number - 1] if number <= len(f) else 0
        return rule.shard_for_binary(value) if fmt == 1 else rule.shard_for_text(value)


# conditions: None (unknown: every shard) | ("leaf", rule, kind, v) | ("or"|"and", [..])
def _eval(cond, args):
    if cond is None:
        return None
    op = cond[0]
    if op == "leaf":
        _, rule, kind, v = cond
        shard = rule.shard_for_text(v) if kind == "const" else args.shard(rule, v)
        return frozenset((shard,))
    parts = [_eval(c, args) for c in cond[1]]
    if op == "or":
        if any(p is None for p in parts):
            return None
        return frozenset().union(*parts)
    known = [p for p in parts if p is not None]
    if not known:
        return None
    out = known[0]
    for p in known[1:]:
        out = out & p
    # keys on different shards AND-ed: no row matches anywhere, any one shard answers right
    return out or frozenset((min(known[0]),))


def _has_param(node):
    return any(isinstance(n, ast.ParamRef) for n in _walk(node))


def _walk(node):
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, ast.Node):
            yield n
            for attr in n:
                stack.append(getattr(n, attr))
        elif isinstance(n, (tuple, list)):
            stack.extend(n)


def _deparse_split(stmt, per):
    from pglast.stream import RawStream
    select = stmt.selectStmt
    rows = select.valuesLists
    out = {}
    try:
        for shard, idx in per.items():
            select.valuesLists = tuple(rows[i] for i in idx)
            out[shard] = RawStream()(stmt)
    finally:
        select.valuesLists = rows
    return out


class Planner:
    __slots__ = ("sdb", "cache_size", "_cache", "bytewise_text")

    def __init__(self, sdb, cache_size=2048):
        self.sdb = sdb
        self.cache_size = max(1, int(cache_size))
        self._cache = collections.OrderedDict()
        self.bytewise_text = None      # do the shards order text by its bytes? (asked by the loop)

    def plan(self, sql):
        cache = self._cache
        plan = cache.get(sql)
        if plan is not None:
            cache.move_to_end(sql)
            return plan
        try:
            plan = self._plan(sql)
        except ShardingError as exc:
            plan = Plan("error", sql, error=(exc.sqlstate, exc.text))
        except Exception:  # a pglast surprise: let PostgreSQL judge the text
            try:
                plan = Plan("all", sql, hint=_hint(sql), write=True)
            except ShardingError as exc:
                plan = Plan("error", sql, error=(exc.sqlstate, exc.text))
        if len(sql) > MAX_CACHED_TEXT:
            return plan  # huge texts (bulk INSERTs) are planned each time, not kept
        cache[sql] = plan
        if len(cache) > self.cache_size:
            cache.popitem(last=False)
        return plan

    def plan_text(self, sql):
        """A simple Query's (plan, text parameters): the plan of the text, or of
        its normalized form with the constants as parameters (template.py),
        so texts that differ only in their constants share one parse."""
        plan = self._cache.get(sql)
        if plan is None and sql.isascii() and len(sql) <= MAX_CACHED_TEXT:
            from . import template
            found = template.constants(sql)
            if found is not None:
                shared = self.plan(found[0])
                # Shared only when it names the shards: a text the template
                # would send everywhere is planned itself (it may hold a key
                # the parameters hide, as in = any('{1,4}')).
                if template.usable(shared) and _names_shards(shared, found[1]):
                    return shared, found[1]
        return self.plan(sql), ()

    def _plan(self, sql):
        hint = _hint(sql)
        try:
            stmts = pglast.parse_sql(sql)
        except Exception:
            return Plan("all", sql, hint=hint, write=True, statements=0)
        if not stmts:
            return Plan("all", sql, hint=hint, statements=0)
        if len(stmts) == 1:
            return self._one(sql, stmts[0].stmt, hint)
        plans = [self._one(sql, s.stmt, hint) for s in stmts]
        write = any(p.write for p in plans)
        n = len(plans)
        consts = [_const_targets(p) if p.kind == "route" else None for p in plans]
        if all(p.kind in ("route", "all") and c is None and p.merge is None
               and p.merge_error is None and p.copy is None for p, c in zip(plans, consts)):
            return Plan("all", sql, hint, write, n)  # unkeyed statements: every shard
        if all(p.kind in ("route", "all") for p in plans) and hint is not None:
            return Plan("route", sql, hint, write, n)
        if all(p.kind == "route" and p.copy is None for p in plans):
            if all(c is not False and c is not None and len(c) == 1 for c in consts) \
                    and len(set(consts)) == 1:
                return Plan("route", sql, hint, write, n, cond=plans[0]._cond)
        return Plan("error", sql, hint, write, n, error=(
            "0A000", "a query text with several statements must go to one shard or to all "
                     "shards; send the statements one by one"))

    def _one(self, sql, node, hint):
        if isinstance(node, ast.TransactionStmt):
            return _transaction(sql, node, hint)
        if isinstance(node, ast.VariableSetStmt):
            return _variable(sql, node, hint)
        if isinstance(node, ast.CopyStmt):
            from .plancopy import copy_plan
            return copy_plan(self.sdb, sql, node, hint)
        write = isinstance(node, WRITE_NODES)
        if not write and not isinstance(node, READ_NODES):
            return Plan("all", sql, hint, True)  # DDL and utility: every shard
        explain = isinstance(node, ast.ExplainStmt)
        if explain:  # EXPLAIN's rows are plan text: route like its query, never merge
            write = isinstance(node.query, WRITE_NODES)
            node = node.query
        if isinstance(node, ast.UpdateStmt) and self._sets_key(node, node.targetList):
            return Plan("error", sql, hint, True, error=(
                "0A000", "UPDATE of a sharding key column is not supported (the row would "
                         "have to move to another shard)"))
        conflict = getattr(node, "onConflictClause", None) if isinstance(node, ast.InsertStmt) else None
        if conflict is not None and self._sets_key(node, conflict.targetList):
            return Plan("error", sql, hint, True, error=(
                "0A000", "INSERT ... ON CONFLICT DO UPDATE of a sharding key column is not "
                         "supported (the row would have to move to another shard)"))
        from .keys import KeyFinder
        finder = KeyFinder(self.sdb)
        cond, rows = finder.statement(node)
        if cond is None and hint is None and isinstance(node, ast.InsertStmt) \
                and not explain and self._sharded(node.relation):
            return Plan("error", sql, hint, True, error=(
                "0A000", "INSERT into the sharded table %s needs its key column in the column "
                         "list with a constant or a parameter in every row (or a "
                         "geobouncer:shard hint)" % node.relation.relname))
        merge, shard_sql, merge_error = None, None, None
        if isinstance(node, ast.SelectStmt) and node.intoClause is not None:
            return Plan("all", sql, hint, True)  # SELECT INTO creates a table: every shard
        if isinstance(node, ast.SelectStmt) and not explain:
            from .planmerge import merge_plan
            merge, shard_sql, merge_error = merge_plan(node)
        return Plan("route", sql, hint, write or _locks(node), cond=cond,
                    rows=(node, rows) if rows else None, merge=merge,
                    shard_sql=shard_sql, merge_error=merge_error)

    def _sharded(self, rel):
        """The table has a rule of its own (table=* rules may not apply to it)."""
        return any(r.table is not None for r in self.sdb.columns_for(rel.relname,
                                                                      rel.schemaname))

    def _sets_key(self, node, targets):
        """Does this SET list (UPDATE's, or ON CONFLICT DO UPDATE's) assign a key column?"""
        rel = node.relation
        return any(isinstance(t, ast.ResTarget) and t.name and
                   self.sdb.rule_for(rel.relname, rel.schemaname, t.name) is not None
                   for t in targets or ())


def _locks(node):
    """FOR UPDATE/SHARE, or a data-modifying WITH (the statement writes)."""
    if getattr(node, "lockingClause", None):
        return True
    with_ = getattr(node, "withClause", None)
    return with_ is not None and any(isinstance(n, WRITE_NODES) for n in _walk(with_))


def _const_targets(plan):
    try:
        return plan.targets()
    except ShardingError:
        return False


def _hint(sql):
    """The /* geobouncer:shard=N */ comment; text in string literals does not count
    (unscannable text: the first match anywhere)."""
    m = None
    if "geobouncer" in sql:
        try:
            for tok in scan(sql):  # offsets are in characters, end inclusive
                if tok.name == "C_COMMENT":
                    m = HINT_RE.search(sql[tok.start:tok.end + 1])
                    if m is not None:
                        break
        except Exception:
            m = HINT_RE.search(sql)
    if m is None:
        return None
    value = m.group(1)
    if not value.isascii() or not value.isdigit():
        # A hint that cannot be read is an error, never a silent route by the query.
        raise ShardingError("22023", f"invalid shard number in /* geobouncer:shard={value} */")
    return int(value)


def _transaction(sql, node, hint):
    k = enums.TransactionStmtKind
    if node.kind in (k.TRANS_STMT_BEGIN, k.TRANS_STMT_START):
        return Plan("begin", sql, hint)
    if node.kind in (k.TRANS_STMT_COMMIT, k.TRANS_STMT_ROLLBACK):
        if node.chain:
            return Plan("error", sql, hint, error=(
                "0A000", "COMMIT/ROLLBACK AND CHAIN is not supported on a sharded database"))
        return Plan("commit" if node.kind == k.TRANS_STMT_COMMIT else "rollback", sql, hint)
    return Plan("all", sql, hint, True)  # savepoints, PREPARE TRANSACTION, ...


def _variable(sql, node, hint):
    k = enums.VariableSetKind
    name = (node.name or "").lower()
    if name not in (SHARD_GUC, KEY_GUC):
        return Plan("all", sql, hint)
    if node.kind in (k.VAR_RESET, k.VAR_SET_DEFAULT):
        return Plan("reset_shard", sql, hint)
    args = node.args or ()
    if node.kind != k.VAR_SET_VALUE or len(args) != 1 or not isinstance(args[0], ast.A_Const) \
            or args[0].isnull:
        return Plan("error", sql, hint, error=("22023", "invalid value for %s" % name))
    val = args[0].val
    raw = getattr(val, "ival", None)
    if raw is None:
        raw = getattr(val, "sval", None) or getattr(val, "fval", None)
    if name == KEY_GUC:
        return Plan("set_key", sql, hint, value=str(raw))
    try:
        shard = int(raw)
    except (TypeError, ValueError):
        shard = -1
    if shard < 0:
        return Plan("error", sql, hint, error=("22023", "geobouncer.shard must be a shard "
                                                        "number"))
    return Plan("set_shard", sql, hint, value=shard)
