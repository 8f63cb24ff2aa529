"""Authentication, sans-IO: auth_file, secrets, client-facing and server-facing
password exchanges (cleartext, md5, SCRAM-SHA-256 with PgBouncer's pass-through).
No sockets here: callers move the bytes."""

from .client import AuthFailed, AuthResult, authenticate_client
from .secrets import (
    ScramSecret,
    md5_secret,
    parse_scram_secret,
    scram_secret_from_password,
    secret_kind,
)
from .server import ServerAuthenticator
from .userlist import AuthFileError, load_auth_file

__all__ = [
    "AuthFailed",
    "AuthFileError",
    "AuthResult",
    "ScramSecret",
    "ServerAuthenticator",
    "authenticate_client",
    "load_auth_file",
    "md5_secret",
    "parse_scram_secret",
    "scram_secret_from_password",
    "secret_kind",
]
