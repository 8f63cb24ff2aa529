"""geobouncer.routing.classify: read/write classification of query text.

Every table runs with both parsers: pglast (PostgreSQL's own grammar) and the
sqlparse lexer that takes over when pglast is not installed.  Where the fallback
cannot be sure, it answers WRITE; ``PGLAST_READS`` lists those texts.
"""

from __future__ import annotations

import random

import pytest

from geobouncer.routing import classify as classify_module
from geobouncer.routing.classify import (
    BEGIN,
    BEGIN_READ_ONLY,
    READ,
    WRITE,
    Classifier,
)

KINDS = {READ, WRITE, BEGIN, BEGIN_READ_ONLY}
PARSERS = [
    pytest.param(
        "pglast",
        marks=pytest.mark.skipif(
            classify_module._pglast is None, reason="pglast is not installed"
        ),
    ),
    "sqlparse",
]


@pytest.fixture(params=PARSERS)
def parser(request) -> str:
    return request.param


@pytest.fixture
def classifier(parser) -> Classifier:
    return Classifier(parser=parser)


READS = [
    "select 1",
    "SELECT 1;",
    "  \n\tselect\n1  ;  ",
    "",
    "   \n ",
    ";",
    "/* only a comment */",
    "-- only a comment",
    "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
    "select * from t where id = $1 and name = $2 order by 1 limit 10 offset 5",
    "select * from t where note = 'for update'",
    "select 'nextval(1)', 'insert into t values (1)'",
    "select 'it''s for update'",
    "select * from t -- for update",
    "select * from t /* for update */",
    "select * from t /* nextval('s') */ where x = 1",
    "select $$ for update $$",
    "select $tag$ it's nextval('s') $$ $tag$",
    'select "for update", "nextval" from t',
    "select t.update, t.delete from t",
    "select nextval_count, currval_info from nextval_log",
    "select x$a$, y$a$ from t",
    "with x as (select 1) select * from x",
    (
        "with recursive r(n) as (select 1 union all select n + 1 from r where n < 5)"
        " select * from r"
    ),
    "select 1 union select 2",
    "(select 1) union all (select 2) order by 1",
    "select 1 intersect select 2 except select 3",
    "select count(*) from t where x in (select y from u where u.z = t.z)",
    "select now(), random(), pg_sleep(0), lower('X'), upper(name) from t",
    "select a[1], b::text[], c->>'k' from t",
    "select x::timestamptz at time zone 'UTC' from t",
    "select e'x', b'101', x'ff', n'abc'",
    "values (1), (2)",
    "VALUES (1, 'for update')",
    "table t",
    "show search_path",
    "SHOW ALL",
    "explain select * from t",
    "EXPLAIN (COSTS OFF, VERBOSE) SELECT 1",
    "explain analyze select * from t",
    "copy (select * from t) to stdout",
    "COPY t TO STDOUT WITH (FORMAT csv)",
    "copy t (a, b) to stdout",
    "select 1; select 2",
    "select 1;\nshow x;\n values (3)",
    "sElEcT 1 FrOm T",
    "select 1\x00",  # a C string's terminator
    "select 1 /* geobouncer */ -- geobouncer: ok",
]

WRITES = [
    # DML and DDL
    "insert into t values (1)",
    "INSERT INTO t SELECT * FROM u",
    "insert into t values (1) on conflict do nothing",
    "update t set x = 1",
    "delete from t",
    "merge into t using s on t.id = s.id when matched then update set x = s.x",
    "create table t (id int)",
    "create temp table x as select 1",
    "drop table t",
    "alter table t add column x int",
    "truncate t",
    "grant select on t to u",
    "comment on table t is 'x'",
    "refresh materialized view v",
    # locking reads
    "select * from t for update",
    "SELECT * FROM t FOR SHARE",
    "select * from t for no key update",
    "select * from t for key share",
    "select * from t for update of t nowait",
    "select * from t for update skip locked",
    "select * from t\nfor\n  update",
    "select * from t /* lock */ for /* it */ update",
    "select * from (select * from t for update) s",
    "select * from t where id in (select id from u for share)",
    "with x as (select * from t for update) select * from x",
    # SELECT INTO and writing CTEs
    "select * into t2 from t",
    "SELECT * INTO TEMP x FROM t",
    "with x as (insert into t values (1) returning id) select * from x",
    "with d as (delete from t returning *) select count(*) from d",
    "WITH u AS (UPDATE t SET x = 1 RETURNING *) SELECT * FROM u",
    (
        "with m as (merge into t using s on t.id = s.id when matched then delete"
        " returning *) select * from m"
    ),
    "with x as (select 1) insert into t select * from x",
    # functions
    "select nextval('s')",
    "SELECT NEXTVAL('s')",
    "select pg_catalog.nextval('s')",
    "select \"nextval\"('s')",
    "select pg_catalog.\"setval\"('s', 1)",
    "select nextval /* comment */ ('s')",
    "select nextval\n('s')",
    "select U&\"\\006Eextval\"('s')",
    "select currval('s')",
    "select lastval()",
    "select setval('s', 1, true)",
    "select pg_advisory_lock(1)",
    "select pg_try_advisory_xact_lock(1)",
    "select pg_advisory_unlock_all()",
    "select txid_current()",
    "select pg_current_xact_id()",
    "select pg_notify('c', 'x')",
    "select set_config('a.b', '1', false)",
    "select * from t where id = nextval('s')",
    "select x, (select nextval('s')) from t",
    "select * from generate_series(1, nextval('s'))",
    "select * from t where exists (select pg_advisory_lock(t.id))",
    "explain select nextval('s')",
    # session state, transactions, utility
    "set search_path = x",
    "SET LOCAL statement_timeout = 0",
    "set transaction read only",
    "reset all",
    "discard all",
    "listen c",
    "notify c, 'x'",
    "unlisten *",
    "copy t from stdin",
    "copy t to '/tmp/f'",
    "COPY t TO PROGRAM 'cat'",
    "copy (delete from t returning *) to stdout",
    "call p()",
    "do $$ begin perform 1; end $$",
    "prepare p as select 1",
    "execute p",
    "deallocate p",
    "deallocate all",
    "lock table t",
    "vacuum",
    "vacuum analyze t",
    "analyze t",
    "checkpoint",
    "cluster t",
    "reindex table t",
    "commit",
    "rollback",
    "end",
    "abort",
    "savepoint s",
    "release savepoint s",
    "declare c cursor for select 1",
    "fetch 10 from c",
    "close c",
    "explain analyze insert into t values (1)",
    "explain analyze delete from t",
    "EXPLAIN (ANALYZE) UPDATE t SET x = 1",
    "explain insert into t values (1)",
    # several statements
    "select 1; insert into t values (1)",
    "select 1; set x = 1",
    "show x; select nextval('s')",
    "begin; select 1; commit",
    "begin read only; select 1",
    # unparsable or unknown
    "select 'abc",
    'select "abc',
    "select $$abc",
    "select /* abc",
    "select (1",
    "select 1)",
    "select (1; select 2)",
    "hello world",
    "selec 1",
    "\x00select 1",
    "select 1\x00; delete from t",
    # text that sqlparse would lex differently from PostgreSQL
    "select 'a\\' , nextval('s') -- '",
    "select 1 /* /* */ ' */, nextval('s') -- '",
    "select 1 +-- '\n 2, nextval('s') -- '",
    "select a#nextval('s')",
    "select `x`, 1",
    "select [a] from t",
    "select a[1:nextval('s')] from t",
]

BEGINS = [
    ("begin", BEGIN),
    ("BEGIN;", BEGIN),
    ("begin work", BEGIN),
    ("begin transaction", BEGIN),
    ("start transaction", BEGIN),
    ("begin isolation level serializable", BEGIN),
    ("begin read write", BEGIN),
    ("begin read only read write", BEGIN),
    ("begin read only", BEGIN_READ_ONLY),
    ("BEGIN TRANSACTION READ ONLY", BEGIN_READ_ONLY),
    ("start transaction read only;", BEGIN_READ_ONLY),
    ("begin isolation level repeatable read read only", BEGIN_READ_ONLY),
    ("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", BEGIN_READ_ONLY),
    ("begin read only, isolation level serializable, deferrable", BEGIN_READ_ONLY),
    ("START TRANSACTION ISOLATION LEVEL READ COMMITTED, READ ONLY", BEGIN_READ_ONLY),
    ("/* app */ begin\n read\n only", BEGIN_READ_ONLY),
]

HINTS = [
    ("select 1 /* geobouncer:primary */", WRITE),
    ("-- geobouncer:primary\nselect 1", WRITE),
    ("/* GEOBOUNCER:PRIMARY */ select 1", WRITE),
    ("begin read only /* geobouncer:primary */", WRITE),
    ("select 'geobouncer:primary'", WRITE),  # honoured anywhere: WRITE is safe
    ("/* geobouncer:replica */ insert into t values (1)", READ),
    ("delete from t -- GeoBouncer:Replica", READ),
    ("update t set x = 1 /* geobouncer:replica */", READ),
    ("select nextval('s') /* geobouncer:replica */", READ),
    ("/* geobouncer:replica */ /* geobouncer:primary */ select 1", WRITE),
    ("insert into t values ('/* geobouncer:replica */')", WRITE),
    ("insert into t values ($$ -- geobouncer:replica $$)", WRITE),
    ("select 'abc /* geobouncer:replica */", WRITE),
]

#: pglast reads these exactly; the sqlparse fallback cannot, so it says WRITE.
PGLAST_READS = [
    "select E'\\n'",
    "select * from t where x ~ '\\d+'",
    "select /* nested /* comment */ for update */ 1",
    "select 1 # 2",
]


@pytest.mark.parametrize("sql", READS)
def test_reads(classifier, sql):
    assert classifier.classify(sql) == READ


@pytest.mark.parametrize("sql", WRITES)
def test_writes(classifier, sql):
    assert classifier.classify(sql) == WRITE


@pytest.mark.parametrize(("sql", "kind"), BEGINS)
def test_begin(classifier, sql, kind):
    assert classifier.classify(sql) == kind


@pytest.mark.parametrize(("sql", "kind"), HINTS)
def test_hints(classifier, sql, kind):
    assert classifier.classify(sql) == kind


@pytest.mark.parametrize("sql", PGLAST_READS)
def test_fallback_is_conservative(parser, sql):
    expected = READ if parser == "pglast" else WRITE
    assert Classifier(parser=parser).classify(sql) == expected


WRITE_FRAGMENTS = [
    "insert into t values (1)",
    "select * from t for update",
    "select nextval('s')",
    "select pg_advisory_lock(1)",
    "set x = 1",
    "begin",
]


@pytest.mark.parametrize("fragment", WRITE_FRAGMENTS)
def test_write_text_in_literals_and_comments_is_not_a_write(classifier, fragment):
    quoted = fragment.replace("'", "''")
    assert classifier.classify(f"select 1; {fragment}") == WRITE
    assert classifier.classify(f"select 1 /* {fragment} */") == READ
    assert classifier.classify(f"select 1 -- {fragment}\n") == READ
    assert classifier.classify(f"select '{quoted}'") == READ
    assert classifier.classify(f"select $q${fragment}$q$") == READ
    assert classifier.classify(f'select 1 as "{fragment}"') == READ


def test_user_write_functions(parser):
    classifier = Classifier(["audit_log", "App.Bump", ' "quoted" '], parser=parser)
    assert classifier.classify("select audit_log(1)") == WRITE
    assert classifier.classify("select public.audit_log(1)") == WRITE
    assert classifier.classify("select AUDIT_LOG(1)") == WRITE
    assert classifier.classify("select * from audit_log()") == WRITE
    assert classifier.classify("select app.bump()") == WRITE
    assert classifier.classify("select bump()") == WRITE  # search_path may find it
    assert classifier.classify("select other.bump()") == READ
    assert classifier.classify("select quoted()") == WRITE
    assert classifier.classify("select 'audit_log(1)'") == READ
    assert classifier.classify("select audit_log_count from audit_log") == READ
    assert Classifier(parser=parser).classify("select audit_log(1)") == READ


LONG = 2000  # long_query for these tests


def long_select(suffix: str = "", prefix: str = "select ") -> str:
    columns = ", ".join(f"c{i}" for i in range(LONG // 5))
    return f"{prefix}{columns} from t{suffix}"


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        (long_select(), READ),
        (long_select(";\n"), READ),
        (long_select(prefix="(select "), READ),
        (long_select(" for update"), WRITE),
        (long_select(" for key share"), WRITE),
        (long_select(" where x = nextval('s')"), WRITE),
        (long_select(" where x = pg_try_advisory_lock(1)"), WRITE),
        (long_select(" where x = 'nextval'"), WRITE),  # words count even in literals
        (long_select("; select 1"), WRITE),
        (long_select(" /* geobouncer:primary */"), WRITE),
        (long_select(prefix="/* geobouncer:replica */ insert into t select "), READ),
        (long_select(prefix="insert into t select "), WRITE),
        (long_select(prefix="/* x */ select "), WRITE),
        (long_select(prefix='select U&"\\0061", '), WRITE),
        (long_select("\x00"), WRITE),
    ],
    ids=lambda value: value[-40:] if isinstance(value, str) else None,
)
def test_long_queries_get_a_conservative_scan(parser, sql, kind):
    classifier = Classifier(parser=parser, long_query=LONG)
    assert len(sql) > LONG
    assert classifier.classify(sql) == kind
    assert len(classifier) == 0  # never cached


def test_long_scan_knows_user_functions(parser):
    classifier = Classifier(["audit_log"], parser=parser, long_query=LONG)
    assert classifier.classify(long_select(" where audit_log(x)")) == WRITE


@pytest.mark.parametrize("parser_name", ["pglast", "sqlparse"])
def test_default_long_query(parser_name):
    text = long_select(" where x = 1")
    if parser_name == "pglast" and classify_module._pglast is None:
        pytest.skip("pglast is not installed")
    classifier = Classifier(parser=parser_name)
    assert classifier.long_query == classify_module.LONG_QUERY[parser_name]
    huge = text.replace("from t", ", ".join(["c"] * classifier.long_query) + " from t")
    assert classifier.classify(huge) == READ
    assert (classifier.misses, len(classifier)) == (1, 0)


def test_cache_counts_hits_and_misses(classifier):
    for _ in range(3):
        assert classifier.classify("select 1") == READ
    assert classifier.classify("select  1") == READ  # exact text: another entry
    assert (classifier.hits, classifier.misses, len(classifier)) == (2, 2, 2)
    assert classifier.classify("insert into t values (1)") == WRITE
    assert classifier.classify("insert into t values (1)") == WRITE
    assert (classifier.hits, classifier.misses, len(classifier)) == (3, 3, 3)
    assert "hits: 3 misses: 3" in repr(classifier)


def test_cache_evicts_oldest_when_full(parser):
    classifier = Classifier(cache_size=3, parser=parser)
    texts = [f"select {i}" for i in range(5)]
    for text in texts:
        classifier.classify(text)
    assert len(classifier) == 3
    classifier.classify(texts[4])
    assert classifier.hits == 1
    classifier.classify(texts[0])  # evicted, parsed again
    assert (classifier.hits, classifier.misses, len(classifier)) == (1, 6, 3)


def test_cache_is_bounded_in_characters(parser):
    classifier = Classifier(cache_chars=30, parser=parser)
    for i in range(20):
        classifier.classify(f"select {i:05}")  # 12 characters each
    assert len(classifier) == 2
    classifier.classify("select 1 from " + "t" * 40)  # bigger than the cache
    assert (classifier.misses, len(classifier)) == (21, 2)


def test_cache_can_be_off(parser):
    classifier = Classifier(cache_size=0, parser=parser)
    for _ in range(3):
        assert classifier.classify("select 1") == READ
    assert (classifier.hits, classifier.misses, len(classifier)) == (0, 3, 0)


def test_cached_answer_is_the_parsed_answer(parser):
    cached = Classifier(parser=parser)
    for sql in READS + WRITES + [sql for sql, _ in BEGINS + HINTS]:
        first = cached.classify(sql)
        assert cached.classify(sql) == first == Classifier(parser=parser).classify(sql)


def test_parser_choice():
    assert Classifier(parser="sqlparse").parser == "sqlparse"
    expected = "sqlparse" if classify_module._pglast is None else "pglast"
    assert Classifier().parser == expected
    with pytest.raises(ValueError):
        Classifier(parser="regex")


def test_sqlparse_is_the_fallback_without_pglast(monkeypatch):
    monkeypatch.setattr(classify_module, "_pglast", None)
    classifier = Classifier()
    assert classifier.parser == "sqlparse"
    assert classifier.classify("select 1") == READ
    with pytest.raises(ImportError):
        Classifier(parser="pglast")


def test_a_parser_bug_answers_write(classifier, monkeypatch):
    def broken(self, sql):
        raise RuntimeError("bug")

    monkeypatch.setattr(Classifier, "_pglast_kinds", broken)
    monkeypatch.setattr(Classifier, "_sqlparse_kinds", broken)
    assert classifier.classify("select 1") == WRITE


FRAGMENTS = [
    "select",
    " ",
    "\n",
    "'",
    '"',
    "$$",
    "$a$",
    "/*",
    "*/",
    "--",
    "(",
    ")",
    ";",
    "nextval",
    "for update",
    "\\",
    "e'",
    "u&",
    "#",
    "`",
    "[",
    "]",
    "1",
    "t",
    ".",
    "begin",
    "read only",
    "geobouncer:replica",
    "\x00",
    "é",
    "\ud800",
]


def test_garbage_never_raises(classifier):
    rng = random.Random(20240611)
    for _ in range(500):
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(60)))
        for text in (
            raw.decode("utf-8", "replace"),
            raw.decode("utf-8", "surrogateescape"),
            raw.decode("latin-1"),
            "".join(rng.choice(FRAGMENTS) for _ in range(rng.randrange(12))),
        ):
            assert classifier.classify(text) in KINDS


@pytest.mark.parametrize("quote", ["'", '"', "$$", "$x$", "/*", "E'", "U&'"])
def test_unterminated_quotes_are_writes(classifier, quote):
    assert classifier.classify(f"select 1, {quote}abc") == WRITE
    assert classifier.classify(f"select {quote}") == WRITE
