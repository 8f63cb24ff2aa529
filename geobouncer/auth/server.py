"""The pooler logging in to PostgreSQL: answers to Authentication ('R') messages.

The caller reads each 'R' message, hands its code and data to
``ServerAuthenticator.respond`` and sends back whatever comes out (nothing for
AuthenticationOk and SASLFinal).

What the pooler knows decides what it can do:

    server asks      plain password   md5 secret      SCRAM secret
    cleartext (3)    yes              no              no
    md5 (5)          yes              yes             no
    SASL (10)        yes              no              only with the ClientKey a
                                                      client's SCRAM login gave
"""

from __future__ import annotations

import hmac

from geobouncer.proto.messages import (
    AUTH_MD5,
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    parse_sasl_mechanisms,
    password_message,
    sasl_initial_response,
    sasl_response,
)

from . import scram
from .client import AuthFailed
from .secrets import (
    client_and_server_keys,
    hmac_sha256,
    md5_response,
    md5_secret,
    parse_scram_secret,
    secret_kind,
    sha256,
)

# proto.messages has these two as prebuilt messages; here we need the codes.
CODE_OK = 0
CODE_CLEARTEXT = 3

UNSUPPORTED_METHODS = {
    2: "KerberosV5",
    6: "SCM credentials",
    7: "GSSAPI",
    8: "GSSAPI",
    9: "SSPI",
}


class ServerAuthenticator:
    """One login's worth of state. ``password`` is a plain password, an md5
    secret or a SCRAM secret; ``scram_keys`` is (ClientKey, ServerKey) from a
    client's SCRAM login against the same SCRAM secret."""

    def __init__(self, user: str, password: str | None,
                 scram_keys: tuple[bytes, bytes] | None = None):
        self.user = user
        self.password = password or None
        self.kind = secret_kind(password) if password else None
        self.scram_keys = scram_keys
        self._nonce: str | None = None
        self._first_bare = ""
        self._server_signature: bytes | None = None
        self._scram_done = False

    def respond(self, code: int, data: bytes) -> bytes | None:
        if code == CODE_OK:
            if self._nonce is not None and not self._scram_done:
                raise AuthFailed("server accepted the login before the SCRAM exchange "
                                 "completed", "08P01")
            return None
        if code == CODE_CLEARTEXT:
            return password_message(self._cleartext().encode() + b"\x00")
        if code == AUTH_MD5:
            return password_message(self._md5(bytes(data)).encode() + b"\x00")
        if code == AUTH_SASL:
            return self._sasl_start(bytes(data))
        if code == AUTH_SASL_CONTINUE:
            return self._sasl_continue(bytes(data))
        if code == AUTH_SASL_FINAL:
            self._sasl_final(bytes(data))
            return None
        name = UNSUPPORTED_METHODS.get(code, f"unknown ({code})")
        raise AuthFailed(f"server requested unsupported authentication method {name} "
                         f"(code {code}) for user \"{self.user}\"", "28000")

    # --- cleartext and md5 ---------------------------------------------------

    def _no_password(self) -> AuthFailed:
        return AuthFailed(f'server requested a password but none is known for user "{self.user}"')

    def _cleartext(self) -> str:
        if self.password is None:
            raise self._no_password()
        if self.kind != "plain":
            raise AuthFailed(f"server requested a cleartext password but only a {self.kind} "
                             f'secret is known for user "{self.user}"')
        return self.password

    def _md5(self, salt: bytes) -> str:
        if len(salt) != 4:
            raise AuthFailed("malformed AuthenticationMD5Password message", "08P01")
        if self.password is None:
            raise self._no_password()
        if self.kind == "scram":
            raise AuthFailed("server requested md5 authentication but only a SCRAM "
                             f'secret is known for user "{self.user}"')
        stored = self.password if self.kind == "md5" else md5_secret(self.user, self.password)
        return md5_response(stored, salt)

    # --- SCRAM-SHA-256 -------------------------------------------------------

    def _sasl_start(self, data: bytes) -> bytes:
        mechanisms = parse_sasl_mechanisms(data)
        if scram.MECHANISM not in mechanisms:
            raise AuthFailed("server offered no supported SASL mechanism: "
                             f"{', '.join(mechanisms) or 'none'}", "28000")
        if self.kind == "md5":
            raise AuthFailed("cannot do SCRAM login with md5 secret")
        if self.kind == "scram" and self.scram_keys is None:
            raise AuthFailed("cannot do SCRAM login with SCRAM secret without client key")
        if self.password is None and self.scram_keys is None:
            raise self._no_password()
        self._nonce = scram.make_nonce()
        self._first_bare = scram.client_first_bare(self.user, self._nonce)
        return sasl_initial_response(scram.MECHANISM, f"n,,{self._first_bare}".encode())

    def _keys(self, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
        """(ClientKey, ServerKey) for the server's salt and iteration count."""
        if self.kind == "plain":
            return client_and_server_keys(self.password, salt, iterations)
        client_key, server_key = self.scram_keys
        secret = parse_scram_secret(self.password) if self.kind == "scram" else None
        if secret is not None and (secret.salt, secret.iterations) != (salt, iterations):
            raise AuthFailed("SCRAM secret does not match the server's (salt or iteration "
                             f'count differ) for user "{self.user}"')
        if secret is not None and sha256(client_key) != secret.stored_key:
            raise AuthFailed(f'SCRAM client key does not match the secret of user "{self.user}"')
        return client_key, server_key

    def _sasl_continue(self, data: bytes) -> bytes:
        if self._nonce is None or self._server_signature is not None:
            raise AuthFailed("unexpected AuthenticationSASLContinue message", "08P01")
        try:
            server_first = scram.decode_message(data, "server-first-message")
            nonce, salt, iterations = scram.parse_server_first(server_first, self._nonce)
        except scram.ScramError as exc:
            raise AuthFailed(str(exc), exc.sqlstate) from None
        client_key, server_key = self._keys(salt, iterations)
        final, auth_message = scram.client_final_message(
            client_key, nonce, self._first_bare, server_first)
        self._server_signature = hmac_sha256(server_key, auth_message.encode())
        return sasl_response(final.encode())

    def _sasl_final(self, data: bytes) -> None:
        if self._server_signature is None or self._scram_done:
            raise AuthFailed("unexpected AuthenticationSASLFinal message", "08P01")
        try:
            signature = scram.parse_server_final(scram.decode_message(data, "server-final-message"))
        except scram.ScramError as exc:
            raise AuthFailed(str(exc), exc.sqlstate) from None
        if not hmac.compare_digest(signature, self._server_signature):
            raise AuthFailed(f'server signature mismatch in SCRAM login for user "{self.user}": '
                             "the server does not know this password", "28000")
        self._scram_done = True
