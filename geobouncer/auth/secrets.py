"""Password secrets as PostgreSQL and PgBouncer store them.

A secret is one of three kinds, told apart exactly as PgBouncer's
``get_password_type`` does:

- ``md5``: ``"md5"`` + 32 lowercase hex digits, md5(password + user);
- ``scram``: ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``
  (base64 fields, RFC 5803 as PostgreSQL writes it);
- ``plain``: anything else, the password itself.

The SCRAM key derivations (RFC 5802) live here too, so that the client-facing
and the server-facing sides compute them one way.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from typing import NamedTuple

from scramp.utils import ScramException, saslprep

SCRAM_PREFIX = "SCRAM-SHA-256$"
SCRAM_KEY_LEN = 32  # SHA-256 digest size
SCRAM_SALT_LEN = 16  # what PostgreSQL generates
SCRAM_DEFAULT_ITERATIONS = 4096  # PostgreSQL's and PgBouncer's default
_HEX = frozenset("0123456789abcdef")


class ScramSecret(NamedTuple):
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def __str__(self) -> str:
        return (f"{SCRAM_PREFIX}{self.iterations}:{b64(self.salt)}"
                f"${b64(self.stored_key)}:{b64(self.server_key)}")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def b64decode(text: str) -> bytes | None:
    """Strict base64 (no stray characters), None when invalid."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def md5_secret(user: str, password: str) -> str:
    """PostgreSQL's stored md5 secret: "md5" + md5(password + user)."""
    return "md5" + md5_hex(password.encode() + user.encode())


def md5_response(md5secret: str, salt: bytes) -> str:
    """What a client answers to an MD5 challenge, given the stored md5 secret."""
    return "md5" + md5_hex(md5secret[3:].encode("ascii") + salt)


def is_md5_secret(secret: str) -> bool:
    return len(secret) == 35 and secret.startswith("md5") and _HEX.issuperset(secret[3:])


def parse_scram_secret(secret: str) -> ScramSecret | None:
    """Split a SCRAM-SHA-256 secret into its parts; None if it is not one."""
    if not secret.startswith(SCRAM_PREFIX):
        return None
    iter_salt, _, keys = secret[len(SCRAM_PREFIX):].partition("$")
    iter_str, _, salt_str = iter_salt.partition(":")
    stored_str, _, server_str = keys.partition(":")
    if not (iter_str.isascii() and iter_str.isdigit()) or int(iter_str) < 1:
        return None
    salt = b64decode(salt_str)
    stored_key = b64decode(stored_str)
    server_key = b64decode(server_str)
    if not salt or stored_key is None or server_key is None:
        return None
    if len(stored_key) != SCRAM_KEY_LEN or len(server_key) != SCRAM_KEY_LEN:
        return None
    return ScramSecret(int(iter_str), salt, stored_key, server_key)


def secret_kind(secret: str) -> str:
    """"plain", "md5" or "scram"."""
    if is_md5_secret(secret):
        return "md5"
    if parse_scram_secret(secret) is not None:
        return "scram"
    return "plain"


def prepare_password(password: str) -> bytes:
    """SASLprep the password as PostgreSQL does: when SASLprep refuses it
    (prohibited or unassigned characters), the raw password is used as is."""
    try:
        return saslprep(password).encode()
    except ScramException:
        return password.encode()


def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", prepare_password(password), salt, iterations)


def hmac_sha256(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def client_and_server_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    salted = salted_password(password, salt, iterations)
    return hmac_sha256(salted, b"Client Key"), hmac_sha256(salted, b"Server Key")


def scram_secret_from_password(password: str, salt: bytes | None = None,
                               iterations: int = SCRAM_DEFAULT_ITERATIONS) -> str:
    """A SCRAM-SHA-256 secret in PostgreSQL's format (random 16-byte salt by default)."""
    if salt is None:
        salt = os.urandom(SCRAM_SALT_LEN)
    client_key, server_key = client_and_server_keys(password, salt, iterations)
    return str(ScramSecret(iterations, salt, sha256(client_key), server_key))


def verify_scram_password(password: str, secret: ScramSecret) -> bool:
    """Does the cleartext ``password`` produce ``secret``? (PostgreSQL's
    scram_verify_plain_password: compare the derived ServerKey.)"""
    _, server_key = client_and_server_keys(password, secret.salt, secret.iterations)
    return hmac.compare_digest(server_key, secret.server_key)
