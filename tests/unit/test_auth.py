"""geobouncer.auth: auth_file parsing, secrets, and both sides of every password
exchange, played against each other in-process (and against scramp)."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from scramp import ScramMechanism

from geobouncer.auth import (
    AuthFailed,
    AuthFileError,
    ServerAuthenticator,
    authenticate_client,
    load_auth_file,
    md5_secret,
    parse_scram_secret,
    scram_secret_from_password,
    secret_kind,
)
from geobouncer.proto.framing import split_messages
from geobouncer.proto.messages import parse_authentication

USER = "alice"
PASSWORD = "correct horse"
SALT = bytes(range(16))
SCRAM = scram_secret_from_password(PASSWORD, SALT, 4096)
SECRETS = {"plain": PASSWORD, "md5": md5_secret(USER, PASSWORD), "scram": SCRAM}


# --- helpers -------------------------------------------------------------------

def one_message(raw: bytes) -> tuple[bytes, bytes]:
    [(mtype, body)], used = split_messages(raw)
    assert used == len(raw)
    return bytes([mtype]), body


def auth_request(raw: bytes) -> tuple[int, bytes]:
    mtype, body = one_message(raw)
    assert mtype == b"R"
    return parse_authentication(body)


def run_exchange(gen, server: ServerAuthenticator, transcript: list | None = None):
    """Drive the client-side generator with ServerAuthenticator answering it.
    Returns the AuthResult; AuthFailed propagates from whichever side raised."""
    try:
        outgoing = next(gen)
        while True:
            code, data = auth_request(outgoing)
            if transcript is not None:
                transcript.append(code)
            reply = server.respond(code, data)
            if reply is None:
                outgoing = gen.send(None)
            else:
                mtype, body = one_message(reply)
                assert mtype == b"p"
                outgoing = gen.send(body)
    except StopIteration as stop:
        return stop.value


def login(method: str, secret: str | None, password: str | None, user: str = USER, **kw):
    transcript: list[int] = []
    result = run_exchange(authenticate_client(method, user, secret),
                          ServerAuthenticator(user, password, **kw), transcript)
    return result, transcript


def write(tmp_path, text: str | bytes):
    path = tmp_path / "userlist.txt"
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    return path


# --- auth_file -----------------------------------------------------------------

def test_userlist_fields_comments_and_escapes(tmp_path):
    path = write(tmp_path, (
        '; PgBouncer comment\n'
        '# hash comment\n'
        '\n'
        '   \t\n'
        '"plain" "secret" extra "fields" ignored\n'
        f'  "md5user"   "{SECRETS["md5"]}"\r\n'
        f'"scram" "{SCRAM}"\n'
        '"we""ird" "pa""ss"" "\n'
        '"a b" ""\n'
        '"plain" "replaced"\n'
    ))
    assert load_auth_file(path) == {
        "plain": "replaced",
        "md5user": SECRETS["md5"],
        "scram": SCRAM,
        'we"ird': 'pa"ss" ',
        "a b": "",
    }
    assert load_auth_file(str(path)) == load_auth_file(path)


@pytest.mark.parametrize(("line", "message"), [
    ("user password", "expected a double-quoted user name"),
    ('"user password', "unterminated user name"),
    ('"user"', "expected a double-quoted password"),
    ('"user" password', "expected a double-quoted password"),
    ('"user" "password', "unterminated password"),
    ('"user"x"password"', "expected a double-quoted password"),
])
def test_userlist_malformed_line_names_file_and_line(tmp_path, line, message):
    path = write(tmp_path, f'; header\n"ok" "pw"\n\n{line}\n"later" "pw"\n')
    with pytest.raises(AuthFileError) as info:
        load_auth_file(path)
    assert str(info.value).startswith(f"{path}:4: ")
    assert message in str(info.value)
    assert info.value.line == 4


def test_userlist_invalid_utf8(tmp_path):
    path = write(tmp_path, b'"ok" "pw"\n"bad\xff" "pw"\n')
    with pytest.raises(AuthFileError, match=r":2: line is not valid UTF-8"):
        load_auth_file(path)


def test_userlist_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(AuthFileError) as info:
        load_auth_file(path)
    assert str(path) in str(info.value)
    assert info.value.line is None


# --- secrets -------------------------------------------------------------------

def test_md5_secret_is_postgres_definition():
    # PostgreSQL: "md5" || md5(password || user); PgBouncer's docs give admin/1234.
    assert md5_secret("admin", "1234") == "md5" + hashlib.md5(b"1234admin").hexdigest()
    assert md5_secret("admin", "1234") == "md545f2603610af569b6155c45067268c6b"


@pytest.mark.parametrize(("secret", "kind"), [
    ("hunter2", "plain"),
    ("", "plain"),
    (SECRETS["md5"], "md5"),
    (SECRETS["md5"].upper(), "plain"),        # PostgreSQL only writes lowercase hex
    (SECRETS["md5"][:-1], "plain"),
    (SCRAM, "scram"),
    (SCRAM.replace("4096", "x"), "plain"),
    (SCRAM[:-4], "plain"),                     # ServerKey no longer 32 bytes
    ("SCRAM-SHA-256$4096:c2FsdA==", "plain"),
])
def test_secret_kind(secret, kind):
    assert secret_kind(secret) == kind


def test_parse_scram_secret_round_trip():
    parsed = parse_scram_secret(SCRAM)
    assert (parsed.iterations, parsed.salt) == (4096, SALT)
    assert str(parsed) == SCRAM
    assert parse_scram_secret("md5abc") is None


@pytest.mark.parametrize("password", ["pencil", "pässwörd", "I\u00adX"])
def test_scram_secret_matches_scramp(password):
    salt, stored_key, server_key, iterations = ScramMechanism().make_auth_info(
        password, iteration_count=4096, salt=SALT)
    assert parse_scram_secret(scram_secret_from_password(password, SALT, 4096)) == (
        iterations, salt, stored_key, server_key)


def test_scram_secret_random_salt():
    first, second = scram_secret_from_password("pw"), scram_secret_from_password("pw")
    assert first != second
    assert len(parse_scram_secret(first).salt) == 16


def test_scram_secret_password_that_saslprep_refuses():
    # A control character makes SASLprep fail; PostgreSQL then uses the raw bytes.
    secret = scram_secret_from_password("bell\x07", SALT, 4096)
    salted = hashlib.pbkdf2_hmac("sha256", b"bell\x07", SALT, 4096)
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    assert parse_scram_secret(secret).server_key == server_key


# --- every method x every secret kind, in-process --------------------------------

@pytest.mark.parametrize("kind", ["plain", "md5", "scram"])
def test_plain_method(kind):
    result, transcript = login("plain", SECRETS[kind], PASSWORD)
    assert transcript == [3]
    assert (result.method, result.password) == ("plain", PASSWORD)
    with pytest.raises(AuthFailed) as info:
        login("plain", SECRETS[kind], "wrong")
    assert info.value.message == f'password authentication failed for user "{USER}"'
    assert info.value.sqlstate == "28P01"


@pytest.mark.parametrize("kind", ["plain", "md5"])
def test_md5_method(kind):
    result, transcript = login("md5", SECRETS[kind], PASSWORD)
    assert transcript == [5]
    assert result.method == "md5" and result.password is None
    with pytest.raises(AuthFailed, match="password authentication failed"):
        login("md5", SECRETS[kind], "wrong")


def test_md5_method_with_scram_secret_does_scram():
    result, transcript = login("md5", SCRAM, PASSWORD)
    assert transcript == [10, 11, 12]
    assert result.method == "scram-sha-256" and result.scram_client_key
    with pytest.raises(AuthFailed, match="password authentication failed"):
        login("md5", SCRAM, "wrong")


def test_md5_challenge_salt_is_fresh():
    salts = {auth_request(next(authenticate_client("md5", USER, PASSWORD)))[1] for _ in range(5)}
    assert len(salts) == 5 and all(len(s) == 4 for s in salts)


def test_scram_method_with_plain_secret():
    result, transcript = login("scram-sha-256", PASSWORD, PASSWORD)
    assert transcript == [10, 11, 12]
    assert result.method == "scram-sha-256"
    assert result.scram_client_key is None  # derived secret: useless to any server
    with pytest.raises(AuthFailed, match="password authentication failed"):
        login("scram-sha-256", PASSWORD, "wrong")


def test_scram_method_with_scram_secret_recovers_client_key():
    result, _ = login("scram-sha-256", SCRAM, PASSWORD)
    salted = hashlib.pbkdf2_hmac("sha256", PASSWORD.encode(), SALT, 4096)
    assert result.scram_client_key == hmac.new(salted, b"Client Key", "sha256").digest()
    assert result.scram_server_key == parse_scram_secret(SCRAM).server_key
    with pytest.raises(AuthFailed, match="password authentication failed"):
        login("scram-sha-256", SCRAM, "wrong")


def test_scram_method_with_md5_secret_fails_after_exchange():
    transcript: list[int] = []
    with pytest.raises(AuthFailed) as info:
        run_exchange(authenticate_client("scram-sha-256", USER, SECRETS["md5"]),
                     ServerAuthenticator(USER, PASSWORD), transcript)
    assert transcript == [10, 11]
    assert info.value.message == f'password authentication failed for user "{USER}"'
    assert "SCRAM secret" in info.value.log_detail


@pytest.mark.parametrize("method", ["trust", "any"])
def test_trust_and_any_send_nothing(method):
    with pytest.raises(StopIteration) as stop:
        next(authenticate_client(method, USER, None))
    assert stop.value.value.method == method


def test_unsupported_method():
    with pytest.raises(AuthFailed, match="unsupported auth_type"):
        next(authenticate_client("cert", USER, PASSWORD))


@pytest.mark.parametrize("method", ["plain", "md5", "scram-sha-256"])
@pytest.mark.parametrize("secret", [None, ""])
def test_unknown_user_goes_through_the_challenge(method, secret):
    transcript: list[int] = []
    with pytest.raises(AuthFailed) as info:
        run_exchange(authenticate_client(method, "ghost", secret),
                     ServerAuthenticator("ghost", PASSWORD), transcript)
    assert transcript  # a challenge was sent, as for an existing user
    assert info.value.message == 'password authentication failed for user "ghost"'
    assert info.value.sqlstate == "28P01"


def server_first_of(user: str, secret: str | None) -> str:
    gen = authenticate_client("scram-sha-256", user, secret)
    next(gen)
    initial = ServerAuthenticator(user, "x").respond(10, b"SCRAM-SHA-256\x00\x00")
    return auth_request(gen.send(one_message(initial)[1]))[1].decode()


def test_unknown_user_mock_salt_is_stable_per_user():
    salt = server_first_of("ghost", None).split(",")[1]
    assert salt == server_first_of("ghost", None).split(",")[1]
    assert salt != server_first_of("spook", None).split(",")[1]
