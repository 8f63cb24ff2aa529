"""Helpers for the pooling / protocol / resilience integration tests.

- ``BackendSampler``: a thread that samples pg_stat_activity while a load runs
  and keeps the maximum number of server connections seen (bounded in time).
- ``RawClient``: a plain-socket PostgreSQL v3 client for garbage-input tests:
  builds startup packets, logs in with md5 / cleartext, parses ErrorResponse.
- small helpers: ``wait_no_backends``, ``pool_row``, ``run_in_thread``.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg2
from fixtures.ports import wait_until

PROTOCOL_3_0 = 196608
SSL_REQUEST = struct.pack("!II", 8, 80877103)


# -- PostgreSQL-side observations ---------------------------------------------

def backend_count(conn, dbname: str | None = None, user: str | None = None) -> int:
    """Client backends in ``dbname`` (and of ``user``), counted on an open direct connection."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            " AND pid <> pg_backend_pid()"
            " AND (%(db)s::text IS NULL OR datname = %(db)s) AND (%(u)s::text IS NULL OR usename = %(u)s)",
            {"db": dbname, "u": user},
        )
        return int(cur.fetchone()[0])


class BackendSampler:
    """Samples the number of backends of ``dbname`` (``user``) every ``interval``
    seconds in a thread until ``stop()``; ``max`` and ``samples`` hold the results.
    Stops by itself after ``limit`` seconds so it can never outlive a test for long."""

    def __init__(self, pg, dbname: str | None = None, user: str | None = None,
                 interval: float = 0.02, limit: float = 120.0):
        self.pg = pg
        self.dbname = dbname
        self.user = user
        self.interval = interval
        self.limit = limit
        self.samples: list[int] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="backend-sampler")

    def __enter__(self) -> BackendSampler:
        self._conn = self.pg.connect("postgres", "postgres")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        try:
            self._conn.close()
        except Exception:  # noqa: BLE001
            pass

    @property
    def max(self) -> int:
        return max(self.samples, default=0)

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.samples.append(backend_count(self._conn, self.dbname, self.user))
            except Exception as exc:  # noqa: BLE001
                self.errors.append(exc)
                return
            self._stop.wait(self.interval)


def wait_no_backends(pg, dbname: str = "app", user: str | None = None, timeout: float = 15.0) -> None:
    """Wait until no backend is left in ``dbname`` (left over by an earlier test's pooler)."""
    wait_until(lambda: pg.backends(dbname, user) == 0, timeout=timeout,
               message=f"no backends left in database {dbname}")


def terminate_backends(pg, dbname: str = "app", query_like: str | None = None) -> None:
    """pg_terminate_backend on the backends of ``dbname`` (whose query matches ``query_like``)."""
    pg.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        " AND pid <> pg_backend_pid() AND datname = %(db)s AND (%(q)s::text IS NULL OR query LIKE %(q)s)",
        {"db": dbname, "q": query_like},
    )


def pool_row(b, database: str = "app", user: str = "app"):
    """The SHOW POOLS row of (database, user), or None."""
    for row in b.admin("SHOW POOLS"):
        if row.database == database and row.user == user:
            return row
    return None


def server_rows(b, database: str = "app"):
    return [row for row in b.admin("SHOW SERVERS") if row.database == database]


# -- threads ------------------------------------------------------------------

class Outcome:
    """Result or exception of a function run in a thread."""

    def __init__(self):
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def get(self, timeout: float) -> Any:
        if not self.done.wait(timeout):
            raise TimeoutError(f"thread did not finish within {timeout}s")
        if self.error is not None:
            raise self.error
        return self.value


def run_in_thread(fn: Callable[..., Any], *args: Any) -> Outcome:
    out = Outcome()

    def target():
        try:
            out.value = fn(*args)
        except BaseException as exc:  # noqa: BLE001
            out.error = exc
        finally:
            out.done.set()

    threading.Thread(target=target, daemon=True).start()
    return out


def query_one(conn, sql: str, params: Any = None):
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()


def another_client_gets(b, sql: str = "SELECT 'served'", timeout: float = 15.0):
    """The row a second client gets for ``sql`` through pooler ``b`` (or the
    error it got, or TimeoutError), asked in a thread while the test's own
    client idles: does that client hold the pool?"""
    def ask():
        conn = b.connect(autocommit=True, connect_timeout=10)
        try:
            return query_one(conn, sql)
        finally:
            conn.close()

    try:
        return run_in_thread(ask).get(timeout)
    except (psycopg2.Error, TimeoutError) as exc:
        return exc


def close_quietly(*conns) -> None:
    for conn in conns:
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass


# -- a raw protocol client ----------------------------------------------------

def startup_packet(params: dict[str, str], code: int = PROTOCOL_3_0) -> bytes:
    body = struct.pack("!I", code)
    body += b"".join(k.encode() + b"\x00" + v.encode() + b"\x00" for k, v in params.items()) + b"\x00"
    return struct.pack("!I", len(body) + 4) + body


def message(mtype: bytes, body: bytes = b"") -> bytes:
    return mtype + struct.pack("!I", len(body) + 4) + body


def query_message(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\x00")


def parse_error_fields(body: bytes) -> dict[str, str]:
    fields = {}
    for part in body.split(b"\x00"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


class RawClient:
    """A blocking socket speaking just enough of the protocol to log in and
    read replies. ``read_until_close()`` collects every message until EOF."""

    def __init__(self, host: str, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = bytearray()
        self.closed = False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, data: bytes) -> bool:
        """Send; False if the peer already closed (EPIPE / reset)."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            self.closed = True
            return False
        self.buf += data
        return True

    def read_byte(self) -> bytes:
        while not self.buf:
            if not self._fill():
                return b""
        out = bytes(self.buf[:1])
        del self.buf[:1]
        return out

    def read_message(self) -> tuple[bytes, bytes] | None:
        """The next (type, body), or None at EOF. socket.timeout propagates."""
        while True:
            if len(self.buf) >= 5:
                length = struct.unpack_from("!I", self.buf, 1)[0]
                assert 4 <= length < (1 << 26), f"bad length from the pooler: {length}"
                if len(self.buf) >= 1 + length:
                    mtype, body = bytes(self.buf[:1]), bytes(self.buf[5:1 + length])
                    del self.buf[:1 + length]
                    return mtype, body
            if not self._fill():
                return None

    def read_until_close(self, limit: int = 1000) -> list[tuple[bytes, bytes]]:
        """Every message until the pooler closes (bounded in count; the socket timeout bounds time)."""
        out = []
        for _ in range(limit):
            msg = self.read_message()
            if msg is None:
                return out
            out.append(msg)
        raise AssertionError(f"more than {limit} messages without a close")

    def read_until(self, mtypes: bytes, limit: int = 1000) -> list[tuple[bytes, bytes]]:
        """Messages up to and including the first one whose type is in ``mtypes`` (or EOF)."""
        out = []
        for _ in range(limit):
            msg = self.read_message()
            if msg is None:
                return out
            out.append(msg)
            if msg[0] in [bytes([c]) for c in mtypes]:
                return out
        raise AssertionError(f"no {mtypes!r} in {limit} messages")

    def login(self, user: str, password: str, database: str, extra: dict[str, str] | None = None
              ) -> list[tuple[bytes, bytes]]:
        """Startup + md5/cleartext auth; returns the messages up to ReadyForQuery or the error."""
        self.send(startup_packet({"user": user, "database": database, **(extra or {})}))
        return self.authenticate(user, password)

    def authenticate(self, user: str, password: str) -> list[tuple[bytes, bytes]]:
        out = []
        for _ in range(100):
            msg = self.read_message()
            if msg is None:
                return out
            out.append(msg)
            mtype, body = msg
            if mtype == b"R":
                code = struct.unpack_from("!I", body)[0]
                if code == 5:
                    salt = body[4:8]
                    inner = hashlib.md5(password.encode() + user.encode()).hexdigest()
                    outer = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
                    self.send(message(b"p", outer.encode() + b"\x00"))
                elif code == 3:
                    self.send(message(b"p", password.encode() + b"\x00"))
                elif code != 0:
                    raise AssertionError(f"unsupported auth request {code}")
            elif mtype in (b"Z", b"E"):
                return out
        raise AssertionError("login did not finish")


def errors_in(messages: list[tuple[bytes, bytes]]) -> list[dict[str, str]]:
    return [parse_error_fields(body) for mtype, body in messages if mtype == b"E"]


def check_pooler_alive(b, keeper) -> None:
    """The process runs, an open connection still works and a new one logs in."""
    assert b.is_running(), f"the pooler died:\n{b.log_text()[-3000:]}"
    assert query_one(keeper, "SELECT 41 + 1") == (42,)
    conn = psycopg2.connect(b.dsn())
    try:
        conn.autocommit = True
        assert query_one(conn, "SELECT current_user, current_database()") == ("app", "app")
    finally:
        conn.close()
