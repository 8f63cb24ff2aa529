"""SCRAM-SHA-256-PLUS (tls-server-end-point channel binding) in geobouncer.auth,
against scramp's client: offered only with binding data, checked, and a
downgrade ("y" while PLUS is offered) refused."""

from __future__ import annotations

import hashlib

import pytest
from scramp import ScramClient
from test_auth import auth_request
from test_auth_scram import body_of

from geobouncer.auth import AuthFailed, authenticate_client, scram_secret_from_password
from geobouncer.proto.messages import sasl_initial_response

USER, PASSWORD = "alice", "secret pw"
SECRET = scram_secret_from_password(PASSWORD)
BINDING = hashlib.sha256(b"the pooler's certificate").digest()


def start(binding=BINDING):
    gen = authenticate_client("scram-sha-256", USER, SECRET, binding)
    code, data = auth_request(next(gen))
    assert code == 10
    return gen, [m for m in data.decode().split("\0") if m]


def initial(gen, mechanism: str, first: str) -> str:
    code, data = auth_request(gen.send(body_of(sasl_initial_response(mechanism, first.encode()))))
    assert code == 11
    return data.decode()


def test_plus_offered_first_only_with_binding_data():
    assert start()[1] == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    assert start(None)[1] == ["SCRAM-SHA-256"]


def test_scramp_client_binds():
    gen, mechanisms = start()
    client = ScramClient(mechanisms, USER, PASSWORD, channel_binding=("tls-server-end-point", BINDING))
    assert client.mechanism_name == "SCRAM-SHA-256-PLUS"
    client.set_server_first(initial(gen, client.mechanism_name, client.get_client_first()))
    code, data = auth_request(gen.send(client.get_client_final().encode()))
    assert code == 12
    client.set_server_final(data.decode())
    with pytest.raises(StopIteration):
        gen.send(None)


def test_other_binding_data_fails():
    gen, mechanisms = start()
    client = ScramClient(mechanisms, USER, PASSWORD,
                         channel_binding=("tls-server-end-point", hashlib.sha256(b"a MITM's").digest()))
    client.set_server_first(initial(gen, client.mechanism_name, client.get_client_first()))
    with pytest.raises(AuthFailed, match="channel binding check failed"):
        gen.send(client.get_client_final().encode())


def test_downgrade_refused():
    gen, _ = start()
    with pytest.raises(AuthFailed, match="channel binding negotiation error"):
        initial(gen, "SCRAM-SHA-256", "y,,n=,r=abcdefghijkl")


def test_plus_without_binding_flag_refused():
    gen, _ = start()
    with pytest.raises(AuthFailed, match="does not include channel binding data"):
        initial(gen, "SCRAM-SHA-256-PLUS", "n,,n=,r=abcdefghijkl")
    gen, _ = start()
    with pytest.raises(AuthFailed, match="unsupported SCRAM channel-binding type"):
        initial(gen, "SCRAM-SHA-256-PLUS", "p=tls-unique,,n=,r=abcdefghijkl")


def test_plus_not_accepted_when_not_offered():
    gen, _ = start(None)
    with pytest.raises(AuthFailed, match="invalid SASL authentication mechanism"):
        initial(gen, "SCRAM-SHA-256-PLUS", "p=tls-server-end-point,,n=,r=abcdefghijkl")
