"""Authenticating a client that connects to the pooler (PgBouncer's auth_type).

``authenticate_client`` is a generator, so the same procedure runs under any
I/O: it yields the backend messages to send, and is sent the body of each 'p'
message the client answers with (none after SASLFinal). Its return value is an
``AuthResult``; a refusal is an ``AuthFailed`` with the SQLSTATE to report.

    method           plain secret        md5 secret          SCRAM secret
    plain            cleartext           cleartext           cleartext
    md5              MD5 challenge       MD5 challenge       SCRAM (as PgBouncer)
    scram-sha-256    SCRAM, derived      fails after a       SCRAM, ClientKey
                     secret              mock exchange       recovered
    trust, any       no exchange

An unknown user (secret None) or an empty secret goes through the same
exchange and then fails with the same message as a wrong password, so the
answer does not tell whether the user exists (PostgreSQL's mock
authentication: a SCRAM mock salt is stable per user name).
"""

from __future__ import annotations

import functools
import hmac
import os
from collections.abc import Generator
from dataclasses import dataclass

from geobouncer.proto.messages import (
    AUTH_CLEARTEXT,
    ProtocolError,
    auth_md5_request,
    auth_sasl,
    auth_sasl_continue,
    auth_sasl_final,
    parse_sasl_initial_response,
)

from . import scram
from .secrets import (
    SCRAM_DEFAULT_ITERATIONS,
    SCRAM_SALT_LEN,
    ScramSecret,
    hmac_sha256,
    md5_response,
    md5_secret,
    parse_scram_secret,
    scram_secret_from_password,
    secret_kind,
    verify_scram_password,
)

# Keyed per process: mock salts are stable for a user name while we run, and
# unpredictable to anyone else.
_MOCK_KEY = os.urandom(32)


class AuthFailed(Exception):
    """Authentication refused. ``message`` and ``sqlstate`` go to the client in
    an ErrorResponse; ``log_detail`` (why, exactly) is for the log only."""

    def __init__(self, message: str, sqlstate: str = "28P01", log_detail: str | None = None):
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.log_detail = log_detail


@dataclass(frozen=True)
class AuthResult:
    method: str
    """What was done: "trust", "any", "plain", "md5" or "scram-sha-256"."""
    password: str | None = None
    """The cleartext the client typed (cleartext exchange only)."""
    scram_client_key: bytes | None = None
    """ClientKey recovered from the client's proof against a SCRAM secret."""
    scram_server_key: bytes | None = None
    """ServerKey of that SCRAM secret: with the ClientKey, enough to log in to a
    server that holds the same secret (PgBouncer's SCRAM pass-through)."""


AuthExchange = Generator[bytes, "bytes | None", AuthResult]


def password_failed(user: str, log_detail: str | None = None) -> AuthFailed:
    return AuthFailed(f'password authentication failed for user "{user}"', "28P01", log_detail)


def authenticate_client(method: str, user: str, secret: str | None,
                        channel_binding: bytes | None = None,
                        iterations: int = SCRAM_DEFAULT_ITERATIONS) -> AuthExchange:
    """Run the exchange for ``method`` (an auth_type) with the user's ``secret``
    from auth_file or auth_query (None: no such user). ``channel_binding``:
    tls-server-end-point data of a TLS client connection, which makes SCRAM
    offer SCRAM-SHA-256-PLUS. Does not send AuthenticationOk: the caller does,
    after its own checks. ``iterations``: scram_iterations, for the SCRAM
    secret made from a plain-text password (and for a user with none)."""
    method = method.lower()
    if method in ("trust", "any"):
        return AuthResult(method)
    if method == "plain":
        return (yield from _cleartext_exchange(user, secret or None))
    if method == "md5":
        if secret and secret_kind(secret) == "scram":
            return (yield from _scram_exchange(user, secret, channel_binding, iterations))
        return (yield from _md5_exchange(user, secret or None))
    if method == "scram-sha-256":
        return (yield from _scram_exchange(user, secret or None, channel_binding, iterations))
    raise AuthFailed(f'unsupported auth_type "{method}"', "28000")


def _message_body(body: object) -> bytes:
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise AuthFailed("expected password response", "08P01")
    return bytes(body)


def _password_from(body: object) -> str | None:
    """The string in a PasswordMessage body; None if it is not UTF-8 (then it
    cannot match any secret we hold)."""
    raw = _message_body(body)
    if not raw.endswith(b"\x00") or raw.index(b"\x00") != len(raw) - 1:
        raise AuthFailed("invalid password packet size", "08P01")
    try:
        return raw[:-1].decode("utf-8")
    except UnicodeDecodeError:
        return None


# --- cleartext and md5 -------------------------------------------------------

def _cleartext_matches(user: str, password: str, secret: str) -> bool:
    kind = secret_kind(secret)
    if kind == "md5":
        return hmac.compare_digest(md5_secret(user, password), secret)
    if kind == "scram":
        return verify_scram_password(password, parse_scram_secret(secret))
    return hmac.compare_digest(password.encode(), secret.encode())


def _cleartext_exchange(user: str, secret: str | None) -> AuthExchange:
    password = _password_from((yield AUTH_CLEARTEXT))
    if secret is None or not password or not _cleartext_matches(user, password, secret):
        raise password_failed(user, _why_no_secret(user, secret))
    return AuthResult("plain", password=password)


def _md5_exchange(user: str, secret: str | None) -> AuthExchange:
    salt = os.urandom(4)
    response = _password_from((yield auth_md5_request(salt)))
    if secret is None or response is None:
        raise password_failed(user, _why_no_secret(user, secret))
    stored = secret if secret_kind(secret) == "md5" else md5_secret(user, secret)
    if not hmac.compare_digest(response.encode(), md5_response(stored, salt).encode()):
        raise password_failed(user, f'Password does not match for user "{user}".')
    return AuthResult("md5")


def _why_no_secret(user: str, secret: str | None) -> str:
    if secret is None:
        return f'Role "{user}" does not exist or has no password.'
    return f'Password does not match for user "{user}".'


# --- SCRAM-SHA-256 -----------------------------------------------------------

def _mock_secret(user: str, iterations: int = SCRAM_DEFAULT_ITERATIONS) -> ScramSecret:
    """A secret nobody can match, with a salt that is stable per user name
    (and the iteration count a real one made here would have)."""
    salt = hmac_sha256(_MOCK_KEY, user.encode())[:SCRAM_SALT_LEN]
    return ScramSecret(iterations, salt, os.urandom(32), os.urandom(32))


@functools.lru_cache(maxsize=1024)
def _derived_secret(user: str, password: str, iterations: int = SCRAM_DEFAULT_ITERATIONS) -> ScramSecret:
    # One PBKDF2 per (user, password, iterations) per process rather than one
    # per login: it costs ~1 ms of CPU, during which the hub runs nothing else.
    return parse_scram_secret(scram_secret_from_password(password, iterations=iterations))


def _scram_secret_for(user: str, secret: str | None,
                      iterations: int = SCRAM_DEFAULT_ITERATIONS) -> tuple[ScramSecret, str | None]:
    """-> (the secret to run the exchange with, why it must fail or None)."""
    if secret is None:
        return _mock_secret(user, iterations), f'Role "{user}" does not exist or has no password.'
    kind = secret_kind(secret)
    if kind == "scram":
        return parse_scram_secret(secret), None
    if kind == "plain":
        return _derived_secret(user, secret, iterations), None
    return _mock_secret(user, iterations), f'User "{user}" does not have a valid SCRAM secret.'


def _sasl_initial(body: object) -> tuple[str, bytes]:
    raw = _message_body(body)
    try:
        mechanism, data = parse_sasl_initial_response(raw)
    except ProtocolError:
        raise AuthFailed("malformed SASLInitialResponse message", "08P01") from None
    # The decoder tolerates a length that disagrees with the message: we do not.
    # (-1, "no initial response", is legal but no SCRAM client sends it.)
    length_at = raw.index(b"\x00") + 1
    declared = int.from_bytes(raw[length_at:length_at + 4], "big", signed=True)
    if declared != len(data) or length_at + 4 + declared != len(raw) or not data:
        raise AuthFailed("malformed SASLInitialResponse message", "08P01")
    return mechanism, data


def _scram_exchange(user: str, secret: str | None, channel_binding: bytes | None = None,
                    iterations: int = SCRAM_DEFAULT_ITERATIONS) -> AuthExchange:
    scram_secret, refusal = _scram_secret_for(user, secret, iterations)
    pass_through = secret is not None and secret_kind(secret) == "scram"
    # PostgreSQL lists the -PLUS mechanism first when it can bind.
    offered = [scram.MECHANISM_PLUS, scram.MECHANISM] if channel_binding else [scram.MECHANISM]
    mechanism, data = _sasl_initial((yield auth_sasl(offered)))
    if mechanism not in offered:
        raise AuthFailed("client selected an invalid SASL authentication mechanism", "08P01")
    plus = mechanism == scram.MECHANISM_PLUS
    try:
        first = scram.ClientFirst(scram.decode_message(data, "client-first-message"), plus,
                                  channel_binding is not None)
        server_first, nonce = scram.server_first_message(
            first.nonce, scram_secret.salt, scram_secret.iterations)
        body = yield auth_sasl_continue(server_first.encode())
        final = scram.ClientFinal(
            scram.decode_message(_message_body(body), "client-final-message"))
        auth_message = scram.check_client_final(first, server_first, nonce, final,
                                                channel_binding if plus else b"")
    except scram.ScramError as exc:
        raise AuthFailed(str(exc), exc.sqlstate) from None
    client_key = scram.recover_client_key(scram_secret.stored_key, auth_message, final.proof)
    if refusal is not None or client_key is None:
        raise password_failed(user, refusal or f'Password does not match for user "{user}".')
    server_final = scram.server_final_message(scram_secret.server_key, auth_message)
    yield auth_sasl_final(server_final.encode())
    if not pass_through:
        return AuthResult("scram-sha-256")
    return AuthResult("scram-sha-256", scram_client_key=client_key,
                      scram_server_key=scram_secret.server_key)
