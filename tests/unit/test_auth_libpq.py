"""authenticate_client against libpq (psycopg2): a tiny one-connection server
in a thread speaks the startup phase and hands the 'p' bodies to the generator.
libpq is the client that matters, and it sends what scramp does not (an empty
SCRAM user name), and it verifies our SCRAM ServerSignature."""

from __future__ import annotations

import socket
import struct
import threading

import psycopg2
import pytest

from geobouncer.auth import (
    AuthFailed,
    authenticate_client,
    md5_secret,
    scram_secret_from_password,
)
from geobouncer.proto.framing import message_at, parse_startup_params
from geobouncer.proto.messages import (
    AUTH_OK,
    READY_IDLE,
    backend_key_data,
    error_response,
    parameter_status,
)

USER = "carol"
PASSWORD = "pä55 word"
PARAMS = {"server_version": "15.0", "client_encoding": "UTF8", "DateStyle": "ISO, MDY",
          "integer_datetimes": "on", "standard_conforming_strings": "on"}


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("client went away")
        data += chunk
    return data


def recv_message(sock: socket.socket) -> tuple[bytes, bytes]:
    header = recv_exact(sock, 5)
    buf = header + recv_exact(sock, struct.unpack("!I", header[1:])[0] - 4)
    mtype, start, _ = message_at(buf, 0, 1 << 20)
    return bytes([mtype]), buf[start:]


def serve_one(listener: socket.socket, method: str, secret: str | None, outcome: dict) -> None:
    conn, _ = listener.accept()
    with conn:
        length = struct.unpack("!I", recv_exact(conn, 4))[0]
        user = parse_startup_params(recv_exact(conn, length - 4)[4:])["user"]
        gen = authenticate_client(method, user, secret)
        try:
            outgoing, reply = next(gen), None
            while True:
                conn.sendall(outgoing)
                code = struct.unpack("!I", outgoing[5:9])[0]
                reply = None if code == 12 else recv_message(conn)[1]
                outgoing = gen.send(reply)
        except StopIteration as stop:
            outcome["result"] = stop.value
            conn.sendall(AUTH_OK + b"".join(parameter_status(k, v) for k, v in PARAMS.items())
                         + backend_key_data(1, 2) + READY_IDLE)
            recv_message(conn)  # Terminate
        except AuthFailed as exc:
            outcome["error"] = exc
            conn.sendall(error_response(exc.sqlstate, exc.message, severity="FATAL"))


def libpq_login(method: str, secret: str | None, password: str) -> dict:
    outcome: dict = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        thread = threading.Thread(target=serve_one, args=(listener, method, secret, outcome))
        thread.start()
        try:
            psycopg2.connect(host="127.0.0.1", port=port, user=USER, password=password,
                             dbname="db", sslmode="disable", connect_timeout=10).close()
        except psycopg2.OperationalError as exc:
            outcome["client_error"] = str(exc)
        thread.join(10)
    return outcome


SECRETS = {
    "plain": PASSWORD,
    "md5": md5_secret(USER, PASSWORD),
    "scram": scram_secret_from_password(PASSWORD),
}
CASES = [("plain", "plain"), ("plain", "md5"), ("plain", "scram"), ("md5", "plain"),
         ("md5", "md5"), ("md5", "scram"), ("scram-sha-256", "plain"), ("scram-sha-256", "scram")]


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_libpq_logs_in(method, kind):
    outcome = libpq_login(method, SECRETS[kind], PASSWORD)
    assert "client_error" not in outcome, outcome
    result = outcome["result"]
    assert (result.scram_client_key is not None) == (kind == "scram" and method != "plain")


@pytest.mark.parametrize(("method", "kind"), [*CASES, ("scram-sha-256", "md5")])
def test_libpq_wrong_password(method, kind):
    outcome = libpq_login(method, SECRETS[kind], "wrong")
    assert outcome["error"].sqlstate == "28P01"
    assert f'password authentication failed for user "{USER}"' in outcome["client_error"]


def test_libpq_unknown_user():
    outcome = libpq_login("scram-sha-256", None, PASSWORD)
    assert f'password authentication failed for user "{USER}"' in outcome["client_error"]
