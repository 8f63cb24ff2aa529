"""Late review of the sharded extended protocol (net/extended_shard.py,
net/shard_portal.py): a Describe of a portal deferred to the Execute that
follows it, a row-limited Execute kept in the pooler. Each exchange is sent as
raw protocol to the sharded entry ``app`` and to ``ref`` (the same rows in one
plain PostgreSQL database through the pooler); the message sequences must
agree (RowDescription's table OIDs aside, ErrorResponse by its SQLSTATE).
Also WORKER_EVENT from hostile admins and fields, /metrics/all with two workers
(flags and counts, a flood beside idle connections), and simple INSERTs whose
keys the shared template plans read back (sharding/template.py), end to end."""

from __future__ import annotations

import itertools
import socket
import struct
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest
from _util_pool import message, parse_error_fields, query_message
from fixtures.ports import free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families
from shardfix import expected_shards, placement, shard_pg, sharded, shards  # noqa: F401 (fixtures)
from test_failover import cluster_entry, make_topology
from test_shard_extended import _fill, _normal, _raw
from test_workers import start_workers

pytestmark = pytest.mark.geobouncer_only("sharding (PgDog style)")

KEYED = "SELECT id, name FROM users WHERE id = $1"
ALL = "SELECT id FROM users ORDER BY id"


def parse(sql: str, name: bytes = b"") -> bytes:
    return message(b"P", name + b"\x00" + sql.encode() + b"\x00\x00\x00")


def bind(portal: bytes = b"", statement: bytes = b"", *params: bytes) -> bytes:
    body = portal + b"\x00" + statement + b"\x00" + struct.pack("!HH", 0, len(params))
    body += b"".join(struct.pack("!i", len(p)) + p for p in params)
    return message(b"B", body + struct.pack("!H", 0))


def describe(portal: bytes = b"", kind: bytes = b"P") -> bytes:
    return message(b"D", kind + portal + b"\x00")


def execute(portal: bytes = b"", limit: int = 0) -> bytes:
    return message(b"E", portal + b"\x00" + struct.pack("!i", limit))


def close(portal: bytes = b"", kind: bytes = b"P") -> bytes:
    return message(b"C", kind + portal + b"\x00")


SYNC = message(b"S")


def _comparable(replies):
    out = []
    for mtype, body in _normal(replies):
        if mtype == b"E":
            body = parse_error_fields(body)["C"].encode()
        if mtype in (b"N", b"S", b"K"):          # notices and parameter reports: not compared
            continue
        out.append((mtype, body))
    return out


def _exchange(b, database: str, steps) -> list:
    """Each step is bytes to send then read up to a ReadyForQuery ('Z'), or a
    simple query text."""
    with _raw(b, database) as raw:
        out = []
        for step in steps:
            raw.send(query_message(step) if isinstance(step, str) else step)
            out += raw.read_until(b"Z")
        raw.send(query_message("SELECT 'still alive' FROM users WHERE id = 1"))
        out += raw.read_until(b"Z")
        return _comparable(out)


def _compare(b, steps):
    ref = _exchange(b, "ref", steps)
    app = _exchange(b, "app", steps)
    assert app == ref, "\n".join(f"{a!r:70} {r!r}" for a, r in itertools.zip_longest(app, ref))
    return app


SCENARIOS = {
    "describe-execute": [parse(KEYED) + bind(b"", b"", b"3") + describe() + execute() + SYNC],
    "describe-then-sync": [parse(KEYED) + bind(b"p1", b"", b"3") + describe(b"p1") + SYNC],
    "describe-then-close": [parse(KEYED) + bind(b"p1", b"", b"3") + describe(b"p1") + close(b"p1")
                            + execute(b"p1") + SYNC],
    "describe-unknown-portal": [parse(KEYED) + describe(b"nope") + SYNC],
    "describe-then-execute-unknown": [parse(KEYED) + bind(b"p1", b"", b"3") + describe(b"p1")
                                      + execute(b"p2") + SYNC],
    "describe-one-execute-other": [parse(KEYED, b"s") + bind(b"p1", b"s", b"3") + bind(b"p2", b"s", b"4")
                                   + describe(b"p1") + execute(b"p2") + execute(b"p1") + SYNC],
    "describe-prefix-name": [parse(KEYED, b"s") + bind(b"p", b"s", b"3") + bind(b"pp", b"s", b"4")
                             + describe(b"p") + execute(b"pp") + SYNC],
    "describe-twice": [parse(KEYED) + bind(b"", b"", b"5") + describe() + describe() + execute() + SYNC],
    "describe-rebind": [parse(KEYED) + bind(b"", b"", b"5") + describe() + bind(b"", b"", b"6")
                        + execute() + SYNC],
    "describe-statement-and-portal": [parse(KEYED, b"s") + describe(b"s", b"S") + bind(b"", b"s", b"7")
                                      + describe() + execute() + SYNC],
    "describe-all-shards-limited": [parse(ALL) + bind() + describe() + execute(b"", 4) + execute(b"", 4)
                                    + describe() + execute(b"", 0) + execute(b"", 0) + SYNC],
    "describe-then-parse": [parse(KEYED) + bind(b"p1", b"", b"2") + describe(b"p1") + parse("SELECT 1")
                            + execute(b"p1") + SYNC],
    "describe-error-shard": [parse("SELECT 1/(id - id) FROM users WHERE id = $1") + bind(b"", b"", b"2")
                             + describe() + execute() + SYNC, parse(KEYED) + bind(b"", b"", b"2")
                             + describe() + execute() + SYNC],
    "describe-error-all-shards": [parse("SELECT 1/(id - id) FROM users") + bind() + describe() + execute()
                                  + SYNC],
    "execute-no-describe-limited": [parse(ALL) + bind() + execute(b"", 3) + describe() + execute(b"", 3)
                                    + SYNC],
    "limited-keyed": [parse(KEYED) + bind(b"", b"", b"9") + describe() + execute(b"", 1) + execute(b"", 1)
                      + execute(b"", 1) + SYNC],
    "kept-then-close": [parse(ALL) + bind(b"p1") + execute(b"p1", 3) + close(b"p1") + execute(b"p1")
                        + SYNC],
    "kept-then-sync": [parse(ALL) + bind(b"p1") + execute(b"p1", 3) + SYNC, execute(b"p1") + SYNC],
    "kept-rebind": [parse(ALL, b"s") + bind(b"", b"s") + execute(b"", 8) + bind(b"", b"s") + describe()
                    + execute(b"", 2) + SYNC],
    "limited-error-all-shards": [parse("SELECT id, 1/(id - 5) FROM users ORDER BY id") + bind() + describe()
                                 + execute(b"", 3) + execute(b"", 3) + SYNC, parse(ALL) + bind()
                                 + execute(b"", 2) + SYNC],
    "describe-begin": ["BEGIN", parse("SELECT name FROM users WHERE id = 4") + bind(b"p1") + describe(b"p1") + SYNC,
                       parse(KEYED) + bind(b"p2", b"", b"1") + describe(b"p2") + execute(b"p1")
                       + execute(b"p2", 1) + SYNC, execute(b"p2") + describe(b"p2") + SYNC, "COMMIT"],
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_sharded_extended_exchange_matches_postgresql(sharded, name):
    b = sharded()
    _fill(b)
    _compare(b, SCENARIOS[name])


def _describe_then_wait(b, database: str) -> list:
    """Describe + Flush, then wait for the description before the Execute (as a driver
    that needs the row type first does): the deferred Describe must not wait for an Execute."""
    with _raw(b, database) as raw:
        raw.send(parse(KEYED) + bind(b"p1", b"", b"3") + describe(b"p1") + message(b"H"))
        out = raw.read_until(b"Tn")
        raw.send(execute(b"p1") + SYNC)
        return _comparable(out + raw.read_until(b"Z"))


def test_a_describe_then_flush_is_answered_before_any_execute(sharded):
    b = sharded()
    _fill(b)
    assert _describe_then_wait(b, "app") == _describe_then_wait(b, "ref")


def test_a_portal_does_not_outlive_its_transaction(sharded):
    b = sharded()
    _fill(b)
    _compare(b, ["BEGIN", parse(ALL) + bind(b"p1") + execute(b"p1", 2) + SYNC, "COMMIT",
                 execute(b"p1", 2) + SYNC])


def _tags(replies):
    return [(t, body) if t in (b"C", b"s", b"Z") else (t, b"") for t, body in replies]


def test_a_row_limited_update_returning_tags_as_postgresql(sharded):
    b = sharded()
    _fill(b)
    steps = [parse("UPDATE users SET score = 1 WHERE id > 0 RETURNING id") + bind()
             + execute(b"", 4) + execute(b"", 4) + execute(b"", 4) + SYNC]
    ref = _tags(_exchange(b, "ref", steps))
    app = _tags(_exchange(b, "app", steps))
    assert app == ref


@pytest.mark.parametrize("describe_too", [False, True], ids=["execute", "describe-execute"])
def test_an_empty_extended_query_answers_empty_query_response(sharded, describe_too):
    b = sharded()
    _compare(b, [parse("") + bind() + (describe() if describe_too else b"") + execute() + SYNC])


def test_a_parse_of_invalid_sql_fails_at_the_parse(sharded):
    b = sharded()
    _compare(b, [parse("SELEKT") + bind() + describe() + execute() + SYNC])


def test_a_bind_of_a_bad_key_fails_at_the_bind(sharded):
    b = sharded()
    _compare(b, [parse(KEYED) + bind(b"", b"", b"abc") + describe() + execute() + SYNC])


def test_a_parse_in_an_aborted_transaction_is_refused_at_the_parse(sharded):
    b = sharded()
    _fill(b)
    _compare(b, ["BEGIN", parse("SELECT id, 1/(id - 5) FROM users ORDER BY id") + bind()
                 + execute(b"", 3) + SYNC, parse(ALL) + bind() + execute() + SYNC, "ROLLBACK"])


# --- WORKER_EVENT (admin/worker_events.py) --------------------------------------------
WORKER_MARK = "geobouncer-worker"            # admin/fanout.py's application_name of a worker


def _console(b, sql: str, application_name: str = "review"):
    """One console command as an admin; (rows or None, error text or None)."""
    conn = b.connect("pgbouncer", "postgres", autocommit=True, application_name=application_name)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return (cur.fetchall() if cur.description else []), None
    except psycopg2.Error as exc:
        return None, str(exc)
    finally:
        conn.close()


@pytest.fixture
def clustered(make_pg, bouncer):
    """A pooler whose app is a clustered database (a topology of one primary)."""
    primary = make_pg()
    make_topology(primary, [primary])
    return bouncer(databases={"app": cluster_entry(primary)},
                   pgbouncer={"admin_users": "postgres", "auth_type": "md5"})


def test_worker_events_are_refused_from_an_admin_calling_itself_a_worker(clustered):
    _, error = _console(clustered, 'WORKER_EVENT "nonsense"', application_name=WORKER_MARK)
    assert error is not None and "sent by geobouncer's workers" in error


@pytest.mark.parametrize("event", [
    "writer_failed app 127.0.0.1 99999999999999999999",
    "writer app 127.0.0.1 65536",
    "writer_failed app '' 5432",
    "ban app",
    "ban nowhere 127.0.0.1:1",
    "ban app 127.0.0.1:1 extra",
    "writer_failed",
    "",
    "   ",
    "writer_failed app \u00e9\u00e9 5432",
    "x" * 5000,
])
def test_hostile_worker_events_answer_and_leave_the_pooler_serving(clustered, event):
    _hostile_event(clustered, event)


def test_a_superscript_port_in_a_worker_event_is_refused(clustered):
    _hostile_event(clustered, "writer_failed app 127.0.0.1 \u00b2")


def _hostile_event(b, event: str) -> None:
    """A forwarded-looking WORKER_EVENT with bad fields: refused (or acted on) with an
    answer, no Traceback, and the pooler still serves clients and the console."""
    rows, error = _console(b, f'WORKER_EVENT "{event}"', application_name=WORKER_MARK)
    assert rows is not None or error is not None
    assert b.admin("SHOW VERSION")
    conn = b.connect("app", autocommit=True)
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    conn.close()
    assert "Traceback" not in b.log_text() + b.output_text()


# --- /metrics/all (metrics_all.py) ----------------------------------------------------
def _two_ports() -> int:
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise AssertionError("no two free ports in a row")


def _scrape(port: int, path: str = "/metrics/all", timeout: float = 10) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout).read().decode()
    return {f"{s.name}{sorted(s.labels.items())}": s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.fixture
def two_workers(pg, bouncer):
    port = _two_ports()
    b = start_workers(bouncer, metrics_port=port, metrics_listen_addr="127.0.0.1", admin_users="postgres",
                      metrics_request_timeout=3)
    for p in (port, port + 1):
        wait_until(lambda p=p: urllib.request.urlopen(f"http://127.0.0.1:{p}/healthz", timeout=5).status
                   == 200, timeout=15, message=f"metrics on {p}")
    return b, port


def _paused(values: dict) -> float:
    return next(v for k, v in values.items()
                if k.startswith("pgbouncer_databases_paused[") and "('name', 'app')" in k)


def test_metrics_all_keeps_flags_and_counts_of_configuration(two_workers):
    b, port = two_workers
    b.admin("PAUSE app")
    wait_until(lambda: all(_paused(_scrape(p, "/metrics")) == 1.0 for p in (port, port + 1)),
               timeout=10, message="both workers paused")
    one, every = _scrape(port, "/metrics"), _scrape(port)
    assert every["geobouncer_workers_scraped[]"] == 2.0
    assert (_paused(every), every["pgbouncer_databases[]"]) == (1.0, one["pgbouncer_databases[]"])


def test_metrics_all_answers_a_flood_and_idle_connections_in_bounded_time(two_workers):
    """32 connections that never send a request (metrics_request_timeout = 3) held on
    worker 2's port, then 40 /metrics/all at once on each worker: every scrape
    answers 200 within 15 s."""
    _, port = two_workers
    idle = [socket.create_connection(("127.0.0.1", port + 1), timeout=5) for _ in range(32)]
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(80) as pool:
            jobs = [pool.submit(_scrape, p, "/metrics/all", 15) for p in (port, port + 1) for _ in range(40)]
            results = [job.result() for job in jobs]
        assert time.monotonic() - started < 30
        assert all(r["pgbouncer_up[]"] == 1.0 for r in results)
    finally:
        for sock in idle:
            sock.close()
    assert _scrape(port)["geobouncer_workers_scraped[]"] == 2.0       # both answer again


# --- the template plans end to end (sharding/template.py) -------------------------------
def test_simple_inserts_put_each_row_on_its_keys_shard(sharded, shards):
    b = sharded()
    keys = {f"'k'\n'{i}'": f"k{i}" for i in range(6)}
    keys.update({f"0{i}::text": str(i) for i in range(10, 16)})
    conn = b.connect("app", autocommit=True)
    with conn.cursor() as cur:
        for written in keys:
            cur.execute(f"INSERT INTO docs (key, body) VALUES ({written}, 'x')")
    conn.close()
    placed = placement(shards, "docs", "key")
    assert set(placed) == set(keys.values())
    assert placed == expected_shards(shards, "docs", "key", list(keys.values()), "text")
