"""ServerAuthenticator against real PostgreSQL, over a plain blocking socket.

Each role of the ``pg`` fixture is reached through a different pg_hba method:
md5_user (md5, md5-stored), scram_user (scram-sha-256), plain_user (password,
i.e. cleartext) and trust_user (trust).
"""

from __future__ import annotations

import socket

import pytest

from geobouncer.auth import (
    AuthFailed,
    ServerAuthenticator,
    authenticate_client,
    md5_secret,
    parse_scram_secret,
    scram_secret_from_password,
)
from geobouncer.proto.framing import message_at
from geobouncer.proto.messages import (
    TERMINATE,
    parse_authentication,
    parse_error_fields,
    startup_message,
)

MAX_MESSAGE = 1 << 20


def read_message(sock: socket.socket, buf: bytearray) -> tuple[bytes, bytes]:
    while True:
        found = message_at(buf, 0, MAX_MESSAGE)
        if found is not None:
            mtype, body_start, end = found
            message = bytes([mtype]), bytes(buf[body_start:end])
            del buf[:end]
            return message
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk


def server_login(pg, user: str, password: str | None,
                 scram_keys: tuple[bytes, bytes] | None = None) -> tuple[str, list[int]]:
    """Log in as ``user``: "ok" on AuthenticationOk, else the ErrorResponse's SQLSTATE.
    Also returns the authentication codes the server sent. AuthFailed propagates."""
    authenticator = ServerAuthenticator(user, password, scram_keys)
    codes: list[int] = []
    with socket.create_connection((pg.host, pg.port), timeout=10) as sock:
        sock.sendall(startup_message({"user": user, "database": "postgres"}))
        buf = bytearray()
        while True:
            mtype, body = read_message(sock, buf)
            if mtype == b"E":
                return parse_error_fields(body)["C"], codes
            assert mtype == b"R", mtype
            code, data = parse_authentication(body)
            codes.append(code)
            reply = authenticator.respond(code, data)
            if code == 0:
                sock.sendall(TERMINATE)
                return "ok", codes
            if reply is not None:
                sock.sendall(reply)


def stored_secret(pg, role: str) -> str:
    return pg.psql("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,))[0][0]


def client_scram_keys(user: str, secret: str, password: str) -> tuple[bytes, bytes]:
    """The keys the pooler recovers when ``user`` logs in to it with SCRAM."""
    gen = authenticate_client("scram-sha-256", user, secret)
    client = ServerAuthenticator(user, password)
    outgoing = next(gen)
    try:
        while True:
            reply = client.respond(*parse_authentication(outgoing[5:]))
            outgoing = gen.send(None if reply is None else reply[5:])
    except StopIteration as stop:
        return stop.value.scram_client_key, stop.value.scram_server_key


@pytest.mark.parametrize(("role", "codes"), [
    ("md5_user", [5, 0]),
    ("scram_user", [10, 11, 12, 0]),
    ("plain_user", [3, 0]),
    ("trust_user", [0]),
])
def test_right_and_wrong_password(pg, role, codes):
    assert server_login(pg, role, pg.passwords[role]) == ("ok", codes)
    wrong = server_login(pg, role, "not the password")
    expected = "ok" if role == "trust_user" else "28P01"
    assert wrong[0] == expected


def test_md5_secret_logs_in_as_md5_user(pg):
    secret = stored_secret(pg, "md5_user")
    assert secret == md5_secret("md5_user", pg.passwords["md5_user"])
    assert server_login(pg, "md5_user", secret) == ("ok", [5, 0])
    assert server_login(pg, "md5_user", md5_secret("md5_user", "wrong"))[0] == "28P01"


def test_scram_secret_is_postgres_format(pg):
    secret = stored_secret(pg, "scram_user")
    parsed = parse_scram_secret(secret)
    assert parsed is not None
    assert scram_secret_from_password(pg.passwords["scram_user"], parsed.salt,
                                      parsed.iterations) == secret


def test_scram_pass_through_with_server_secret(pg):
    password = pg.passwords["scram_user"]
    secret = stored_secret(pg, "scram_user")
    keys = client_scram_keys("scram_user", secret, password)
    assert server_login(pg, "scram_user", secret, keys) == ("ok", [10, 11, 12, 0])
    with pytest.raises(AuthFailed, match="without client key"):
        server_login(pg, "scram_user", secret)


def test_scram_pass_through_needs_the_same_secret(pg):
    password = pg.passwords["scram_user"]
    other = scram_secret_from_password(password)  # same password, another salt
    keys = client_scram_keys("scram_user", other, password)
    with pytest.raises(AuthFailed, match="salt or iteration"):
        server_login(pg, "scram_user", other, keys)


@pytest.mark.parametrize(("role", "secret_of", "message"), [
    ("plain_user", "md5_user", "cleartext password but only a md5 secret"),
    ("scram_user", "md5_user", "cannot do SCRAM login with md5 secret"),
    ("md5_user", None, "none is known"),
    ("scram_user", None, "none is known"),
])
def test_secrets_that_cannot_log_in(pg, role, secret_of, message):
    password = md5_secret(role, pg.passwords[role]) if secret_of else None
    with pytest.raises(AuthFailed, match=message):
        server_login(pg, role, password)
