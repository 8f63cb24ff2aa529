"""SCRAM-SHA-256 in geobouncer.auth: pass-through, interop with scramp and
libpq-style messages, malformed client messages, and what ServerAuthenticator
refuses."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from scramp import ScramClient, ScramException, ScramMechanism
from test_auth import auth_request, one_message, run_exchange

from geobouncer.auth import (
    AuthFailed,
    ServerAuthenticator,
    authenticate_client,
    md5_secret,
    parse_scram_secret,
    scram_secret_from_password,
)
from geobouncer.proto.messages import (
    parse_sasl_initial_response,
    password_message,
    sasl_initial_response,
)

USER = "bob"
PASSWORD = "s3cret"
SALT = b"0123456789abcdef"
SCRAM = scram_secret_from_password(PASSWORD, SALT, 4096)
MECHS = b"SCRAM-SHA-256\x00\x00"


def body_of(raw: bytes) -> bytes:
    return one_message(raw)[1]


def scramp_server(secret: str):
    parsed = parse_scram_secret(secret)
    server = ScramMechanism().make_server(
        lambda _user: (parsed.salt, parsed.stored_key, parsed.server_key, parsed.iterations))
    return server


def login_to_scramp(authenticator: ServerAuthenticator, secret: str) -> None:
    """ServerAuthenticator against scramp's SCRAM server holding ``secret``."""
    server = scramp_server(secret)
    mechanism, client_first = parse_sasl_initial_response(
        body_of(authenticator.respond(10, MECHS)))
    assert mechanism == "SCRAM-SHA-256"
    assert client_first.startswith(b"n,,")
    server.set_client_first(client_first.decode())
    client_final = body_of(authenticator.respond(11, server.get_server_first().encode()))
    server.set_client_final(client_final.decode())
    assert authenticator.respond(12, server.get_server_final().encode()) is None
    assert authenticator.respond(0, b"") is None


def client_at_continue(secret: str | None = SCRAM, user: str = USER):
    """A client-side generator that has sent SASL and wants the initial response."""
    gen = authenticate_client("scram-sha-256", user, secret)
    assert auth_request(next(gen)) == (10, MECHS)
    return gen


def send_initial(gen, client_first: bytes, mechanism: str = "SCRAM-SHA-256") -> str:
    code, data = auth_request(gen.send(body_of(sasl_initial_response(mechanism, client_first))))
    assert code == 11
    return data.decode()


# --- pass-through ------------------------------------------------------------

def test_pass_through_to_scramp_server():
    # 1. a client logs in to the pooler with SCRAM against the auth_file secret,
    result = run_exchange(authenticate_client("scram-sha-256", USER, SCRAM),
                          ServerAuthenticator(USER, PASSWORD))
    # 2. the pooler logs in to a server holding the same secret without the password.
    keys = (result.scram_client_key, result.scram_server_key)
    login_to_scramp(ServerAuthenticator(USER, SCRAM, scram_keys=keys), SCRAM)


def test_pass_through_to_another_pooler():
    result = run_exchange(authenticate_client("md5", USER, SCRAM),
                          ServerAuthenticator(USER, PASSWORD))
    keys = (result.scram_client_key, result.scram_server_key)
    second = run_exchange(authenticate_client("scram-sha-256", USER, SCRAM),
                          ServerAuthenticator(USER, SCRAM, scram_keys=keys))
    assert second.scram_client_key == result.scram_client_key


def test_pass_through_refuses_server_with_other_salt():
    result = run_exchange(authenticate_client("scram-sha-256", USER, SCRAM),
                          ServerAuthenticator(USER, PASSWORD))
    keys = (result.scram_client_key, result.scram_server_key)
    other = scram_secret_from_password(PASSWORD, b"another salt....", 4096)
    with pytest.raises(AuthFailed, match="salt or iteration"):
        login_to_scramp(ServerAuthenticator(USER, SCRAM, scram_keys=keys), other)


def test_scram_secret_without_keys_cannot_log_in():
    with pytest.raises(AuthFailed, match="with SCRAM secret without client key"):
        ServerAuthenticator(USER, SCRAM).respond(10, MECHS)


def test_plain_password_logs_in_to_scramp():
    login_to_scramp(ServerAuthenticator(USER, PASSWORD), SCRAM)


# --- other clients -------------------------------------------------------------

@pytest.mark.parametrize("secret", [SCRAM, PASSWORD])
def test_scramp_client_against_pooler(secret):
    client = ScramClient(["SCRAM-SHA-256"], USER, PASSWORD)
    gen = client_at_continue(secret)
    client.set_server_first(send_initial(gen, client.get_client_first().encode()))
    code, data = auth_request(gen.send(client.get_client_final().encode()))
    assert code == 12
    client.set_server_final(data.decode())  # verifies our ServerSignature
    with pytest.raises(StopIteration):
        gen.send(None)


@pytest.mark.parametrize("secret", [PASSWORD, None], ids=["plain-password", "no-such-user"])
def test_scram_iterations_for_secrets_made_here(secret):
    """scram_iterations: the count the pooler's own secret (from a plain-text
    auth_file password, or the mock one for an unknown user) is made with; a
    client logs in with it. A SCRAM secret from the auth_file keeps its own."""
    client = ScramClient(["SCRAM-SHA-256"], USER, PASSWORD)
    gen = authenticate_client("scram-sha-256", USER, secret, None, 5001)
    assert auth_request(next(gen)) == (10, MECHS)
    server_first = send_initial(gen, client.get_client_first().encode())
    assert dict(part.split("=", 1) for part in server_first.split(","))["i"] == "5001"
    if secret is None:
        return
    client.set_server_first(server_first)
    code, data = auth_request(gen.send(client.get_client_final().encode()))
    assert code == 12
    client.set_server_final(data.decode())
    stored = authenticate_client("scram-sha-256", USER, SCRAM, None, 5001)
    next(stored)
    assert ",i=4096" in send_initial(stored, ScramClient(["SCRAM-SHA-256"], USER, PASSWORD)
                                     .get_client_first().encode())


def libpq_style_final(server_first: str, bare: str, gs2: str = "n,,") -> bytes:
    """client-final-message computed here from RFC 5802, not by geobouncer.auth."""
    attrs = dict(part.split("=", 1) for part in server_first.split(","))
    salt = base64.b64decode(attrs["s"])
    salted = hashlib.pbkdf2_hmac("sha256", PASSWORD.encode(), salt, int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    without_proof = f"c={base64.b64encode(gs2.encode()).decode()},r={attrs['r']}"
    auth_message = f"{bare},{server_first},{without_proof}".encode()
    signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, "sha256").digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()


@pytest.mark.parametrize("gs2", ["n,,", "y,,"])
def test_libpq_empty_user_name(gs2):
    # libpq sends "n=": PostgreSQL takes the user name from the startup packet.
    bare = "n=,r=rOprNGfwEbeRWgbNEkqO"
    gen = client_at_continue()
    server_first = send_initial(gen, f"{gs2}{bare}".encode())
    assert auth_request(gen.send(libpq_style_final(server_first, bare, gs2)))[0] == 12


# --- malformed client messages -----------------------------------------------------

NONCE = "rOprNGfwEbeRWgbNEkqO"


@pytest.mark.parametrize(("client_first", "sqlstate"), [
    (f"p=tls-server-end-point,,n=,r={NONCE}", "08P01"),
    (f"n,a=bob,n=,r={NONCE}", "0A000"),
    (f"n,,m=ext,n=,r={NONCE}", "0A000"),
    (f"x,,n=,r={NONCE}", "08P01"),
    ("hello", "08P01"),
    ("n,,", "08P01"),
    ("n,,r=abc", "08P01"),
    ("n,,n=,r=", "08P01"),
    ("n,,n=,r=a\x01b", "08P01"),
])
def test_malformed_client_first(client_first, sqlstate):
    gen = client_at_continue()
    with pytest.raises(AuthFailed) as info:
        send_initial(gen, client_first.encode())
    assert info.value.sqlstate == sqlstate


def test_client_first_not_utf8():
    with pytest.raises(AuthFailed, match="UTF-8") as info:
        send_initial(client_at_continue(), b"n,,n=\xff,r=abc")
    assert info.value.sqlstate == "08P01"


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256-PLUS", "PLAIN", ""])
def test_invalid_mechanism(mechanism):
    with pytest.raises(AuthFailed, match="invalid SASL authentication mechanism") as info:
        send_initial(client_at_continue(), f"n,,n=,r={NONCE}".encode(), mechanism)
    assert info.value.sqlstate == "08P01"


@pytest.mark.parametrize("body", [
    b"SCRAM-SHA-256",                                      # no terminator
    b"SCRAM-SHA-256\x00\x00\x00",                          # no length
    b"SCRAM-SHA-256\x00\x00\x00\x00\x10n,,n=,r=abc",       # length > data
    b"SCRAM-SHA-256\x00\x00\x00\x00\x02n,,n=,r=abc",       # length < data
    b"SCRAM-SHA-256\x00\xff\xff\xff\xff",                  # no initial response
])
def test_malformed_sasl_initial_response(body):
    with pytest.raises(AuthFailed) as info:
        client_at_continue().send(body)
    assert info.value.sqlstate == "08P01"


def final_variants():
    yield "wrong nonce", lambda f: f.replace(b",r=", b",r=X"), "Nonce does not match"
    yield "wrong binding", lambda f: f.replace(b"c=biws", b"c=eSws"), "channel binding"
    yield "no proof", lambda f: f.split(b",p=")[0], "proof"
    yield "bad base64", lambda f: f.split(b",p=")[0] + b",p=!!!", "proof"
    yield "short proof", lambda f: f.split(b",p=")[0] + b",p=AAAA", "proof"
    yield "trailing", lambda f: f + b",x=1", "proof"
    yield "junk", lambda f: b"junk", "malformed SCRAM message"


@pytest.mark.parametrize(("name", "mangle", "message"), list(final_variants()))
def test_malformed_client_final(name, mangle, message):
    bare = f"n=,r={NONCE}"
    gen = client_at_continue()
    final = libpq_style_final(send_initial(gen, f"n,,{bare}".encode()), bare)
    with pytest.raises(AuthFailed, match=message) as info:
        gen.send(mangle(final))
    assert info.value.sqlstate == "08P01"


def test_response_that_is_not_a_message_body():
    with pytest.raises(AuthFailed) as info:
        client_at_continue().send(None)
    assert info.value.sqlstate == "08P01"


@pytest.mark.parametrize("body", [b"password", b"pass\x00word\x00"])
def test_malformed_password_message(body):
    gen = authenticate_client("plain", USER, PASSWORD)
    next(gen)
    with pytest.raises(AuthFailed) as info:
        gen.send(body)
    assert info.value.sqlstate == "08P01"


# --- ServerAuthenticator -------------------------------------------------------------

def test_server_cleartext_and_md5_answers():
    auth = ServerAuthenticator(USER, PASSWORD)
    assert auth.respond(3, b"") == password_message(PASSWORD.encode() + b"\x00")
    salt = b"\x01\x02\x03\x04"
    inner = hashlib.md5(PASSWORD.encode() + USER.encode()).hexdigest()
    expected = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
    assert auth.respond(5, salt) == password_message(expected.encode() + b"\x00")
    by_secret = ServerAuthenticator(USER, md5_secret(USER, PASSWORD))
    assert by_secret.respond(5, salt) == password_message(expected.encode() + b"\x00")
    assert auth.respond(0, b"") is None


@pytest.mark.parametrize(("password", "code", "data", "message"), [
    (None, 3, b"", "none is known"),
    (None, 5, b"salt", "none is known"),
    (None, 10, MECHS, "none is known"),
    (md5_secret(USER, PASSWORD), 3, b"", "cleartext password but only a md5 secret"),
    (SCRAM, 3, b"", "cleartext password but only a scram secret"),
    (SCRAM, 5, b"salt", "only a SCRAM secret"),
    (md5_secret(USER, PASSWORD), 10, MECHS, "cannot do SCRAM login with md5 secret"),
    (PASSWORD, 10, b"SCRAM-SHA-256-PLUS\x00\x00", "no supported SASL mechanism"),
    (PASSWORD, 5, b"sal", "malformed"),
    (PASSWORD, 2, b"", "KerberosV5"),
    (PASSWORD, 7, b"", "GSSAPI"),
    (PASSWORD, 9, b"", "SSPI"),
    (PASSWORD, 11, b"r=x,s=c2FsdA==,i=1", "unexpected"),
    (PASSWORD, 12, b"v=x", "unexpected"),
])
def test_server_refusals(password, code, data, message):
    with pytest.raises(AuthFailed, match=message):
        ServerAuthenticator(USER, password).respond(code, data)


def test_server_prefers_plain_scram_even_when_plus_offered():
    offered = b"SCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00"
    reply = ServerAuthenticator(USER, PASSWORD).respond(10, offered)
    mechanism, data = parse_sasl_initial_response(body_of(reply))
    assert mechanism == "SCRAM-SHA-256" and data.startswith(b"n,,n=bob,r=")


def started_scram(password: str = PASSWORD):
    auth = ServerAuthenticator(USER, password)
    _, first = parse_sasl_initial_response(body_of(auth.respond(10, MECHS)))
    return auth, first.decode().split("r=")[1]


@pytest.mark.parametrize(("server_first", "message"), [
    ("r=someoneelse,s=c2FsdA==,i=4096", "nonce mismatch"),
    ("r={n},s=c2FsdA==,i=4096", "nonce mismatch"),  # not extended by the server
    ("r={n}xyz,s=!!,i=4096", "salt"),
    ("r={n}xyz,s=c2FsdA==,i=0", "iteration"),
    ("r={n}xyz,i=4096,s=c2FsdA==", "expected"),
])
def test_server_first_checks(server_first, message):
    auth, nonce = started_scram()
    with pytest.raises(AuthFailed, match=message) as info:
        auth.respond(11, server_first.format(n=nonce).encode())
    assert info.value.sqlstate == "08P01"


def test_server_signature_mismatch_and_server_errors():
    for final, message in [(b"v=" + base64.b64encode(bytes(32)), "signature mismatch"),
                           (b"e=invalid-proof", "error received from server"),
                           (b"v=AAAA", "malformed server signature")]:
        auth, nonce = started_scram()
        auth.respond(11, f"r={nonce}xyz,s=c2FsdA==,i=4096".encode())
        with pytest.raises(AuthFailed, match=message):
            auth.respond(12, final)


def test_server_ok_before_scram_finished():
    auth, nonce = started_scram()
    auth.respond(11, f"r={nonce}xyz,s=c2FsdA==,i=4096".encode())
    with pytest.raises(AuthFailed, match="before the SCRAM exchange completed"):
        auth.respond(0, b"")


def test_scramp_server_rejects_wrong_password():
    with pytest.raises(ScramException):
        login_to_scramp(ServerAuthenticator(USER, "wrong"), SCRAM)
