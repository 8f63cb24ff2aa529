"""SCRAM-SHA-256 message parsing and proofs (RFC 5802, RFC 7677), both roles.

Theory of operation. Four messages, two in each direction:

    client-first   gs2-header client-first-bare     "n,,n=user,r=<cnonce>"
    server-first                                    "r=<cnonce+snonce>,s=<salt>,i=<iter>"
    client-final   "c=<b64 gs2-header>,r=<nonce>,p=<b64 ClientProof>"
    server-final   "v=<b64 ServerSignature>"

    AuthMessage     = client-first-bare "," server-first "," client-final-without-proof
    ClientProof     = ClientKey XOR HMAC(StoredKey, AuthMessage),  StoredKey = H(ClientKey)
    ServerSignature = HMAC(ServerKey, AuthMessage)

So a server holding StoredKey recovers ClientKey = ClientProof XOR
HMAC(StoredKey, AuthMessage) from a valid proof, and can itself log in to
another server that has the same secret (PgBouncer's SCRAM pass-through).

scramp does the RFC's work for ordinary peers, but its server refuses what
libpq sends (an empty ``n=`` user name: PostgreSQL takes the user from the
startup packet), refuses iteration counts below 4096 and salts under 12 bytes
that PostgreSQL secrets may carry, and does not expose ClientKey. Hence this
small module; scramp's SASLprep is used (secrets.py), and the tests check this
code against scramp's client and server.

Channel binding (SCRAM-SHA-256-PLUS, tls-server-end-point) is offered when
the caller has binding data, i.e. the client connection is TLS: then the gs2
header is "p=tls-server-end-point,," and the client-final "c=" carries it with
the hash of the pooler's certificate. A client that says "y" (it could bind but
thinks we cannot) while PLUS was offered is refused: a downgrade.
"""

from __future__ import annotations

import hmac
import os

from .secrets import SCRAM_KEY_LEN, b64, b64decode, hmac_sha256, sha256

MECHANISM = "SCRAM-SHA-256"
MECHANISM_PLUS = "SCRAM-SHA-256-PLUS"
CHANNEL_BINDING_TYPE = "tls-server-end-point"
NONCE_RAW_LEN = 18  # PostgreSQL's SCRAM_RAW_NONCE_LEN


class ScramError(Exception):
    """A malformed or unacceptable SCRAM message. ``sqlstate`` says which kind."""

    def __init__(self, message: str, detail: str | None = None, sqlstate: str = "08P01"):
        super().__init__(message if detail is None else f"{message}: {detail}")
        self.message = message
        self.detail = detail
        self.sqlstate = sqlstate


def malformed(detail: str) -> ScramError:
    return ScramError("malformed SCRAM message", detail)


def make_nonce() -> str:
    return b64(os.urandom(NONCE_RAW_LEN))


def is_printable(text: str) -> bool:
    """RFC 5802 "printable": %x21-2B / %x2D-7E (printable ASCII but ",")."""
    return bool(text) and all(0x21 <= ord(c) <= 0x7E and c != "," for c in text)


def escape_username(user: str) -> str:
    return user.replace("=", "=3D").replace(",", "=2C")


def decode_message(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise malformed(f"{what} is not valid UTF-8") from None


def split_attributes(text: str, what: str) -> list[tuple[str, str]]:
    """ "a=1,b=2" -> [("a", "1"), ("b", "2")], each attribute a single letter."""
    attrs = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or not (part[0].isascii() and part[0].isalpha()):
            raise malformed(f"attribute expected in {what}, found {part[:10]!r}")
        attrs.append((part[0], part[2:]))
    return attrs


# --- the server's side (a client logs in to the pooler) ----------------------

class ClientFirst:
    """A parsed client-first-message."""

    def __init__(self, text: str, plus: bool = False, plus_offered: bool = False):
        flag, sep1, rest = text.partition(",")
        authzid, sep2, bare = rest.partition(",")
        if not (sep1 and sep2):
            raise malformed("gs2 header expected in client-first-message")
        if plus:
            if not flag.startswith("p="):
                raise malformed("The client selected SCRAM-SHA-256-PLUS, but the SCRAM message "
                                "does not include channel binding data.")
            if flag[2:] != CHANNEL_BINDING_TYPE:
                raise malformed(f"unsupported SCRAM channel-binding type {flag[2:][:30]!r}")
        elif flag.startswith("p="):
            raise malformed("The client selected SCRAM-SHA-256 without channel binding, "
                            "but the SCRAM message includes channel binding data.")
        elif flag == "y" and plus_offered:
            raise ScramError("SCRAM channel binding negotiation error",
                             "The client supports SCRAM channel binding but thinks the server "
                             "does not. However, this server does support channel binding.")
        elif flag not in ("n", "y"):
            raise malformed(f"unexpected channel-binding flag {flag[:10]!r}")
        if authzid:
            raise ScramError("client uses authorization identity, but it is not supported",
                             sqlstate="0A000")
        attrs = split_attributes(bare, "client-first-message")
        if attrs[0][0] == "m":
            raise ScramError("client requires an unsupported SCRAM extension", sqlstate="0A000")
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r":
            raise malformed("user name and nonce expected in client-first-message")
        if not is_printable(attrs[1][1]):
            raise malformed("client nonce contains invalid characters")
        self.gs2_header = text[:len(flag) + len(authzid) + 2]
        self.bare = bare
        self.nonce = attrs[1][1]


class ClientFinal:
    """A parsed client-final-message."""

    def __init__(self, text: str):
        without_proof, sep, proof_str = text.rpartition(",p=")
        if not sep:
            raise malformed("proof expected at the end of client-final-message")
        attrs = split_attributes(without_proof, "client-final-message")
        if len(attrs) < 2 or attrs[0][0] != "c" or attrs[1][0] != "r":
            raise malformed("channel binding and nonce expected in client-final-message")
        proof = b64decode(proof_str)
        if proof is None or len(proof) != SCRAM_KEY_LEN:
            raise malformed("Malformed proof in client-final-message.")
        self.channel_binding = attrs[0][1]
        self.nonce = attrs[1][1]
        self.without_proof = without_proof
        self.proof = proof


def server_first_message(client_nonce: str, salt: bytes, iterations: int) -> tuple[str, str]:
    """-> (server-first-message, the combined nonce)."""
    nonce = client_nonce + make_nonce()
    return f"r={nonce},s={b64(salt)},i={iterations}", nonce


def check_client_final(first: ClientFirst, server_first: str, nonce: str,
                       final: ClientFinal, binding_data: bytes = b"") -> str:
    """Check binding (``binding_data``: tls-server-end-point hash under PLUS)
    and nonce; return the AuthMessage for the proof."""
    if final.channel_binding != b64(first.gs2_header.encode() + binding_data):
        raise ScramError("SCRAM channel binding check failed")
    if final.nonce != nonce:
        raise malformed("Nonce does not match.")
    return f"{first.bare},{server_first},{final.without_proof}"


def recover_client_key(stored_key: bytes, auth_message: str, proof: bytes) -> bytes | None:
    """ClientKey from a proof, or None if the proof does not match StoredKey."""
    signature = hmac_sha256(stored_key, auth_message.encode())
    client_key = bytes(a ^ b for a, b in zip(proof, signature))
    return client_key if hmac.compare_digest(sha256(client_key), stored_key) else None


def server_final_message(server_key: bytes, auth_message: str) -> str:
    return "v=" + b64(hmac_sha256(server_key, auth_message.encode()))


# --- the client's side (the pooler logs in to a server) ----------------------

def client_first_bare(user: str, nonce: str) -> str:
    # PostgreSQL ignores this user name (it has the startup packet's), libpq
    # and PgBouncer send "n=". We send the name anyway: RFC 5802 asks for it and
    # other SCRAM servers (scramp's among them) refuse an empty one.
    return f"n={escape_username(user)},r={nonce}"


def parse_server_first(text: str, client_nonce: str) -> tuple[str, bytes, int]:
    """server-first-message -> (nonce, salt, iterations)."""
    attrs = split_attributes(text, "server-first-message")
    if [k for k, _ in attrs[:3]] != ["r", "s", "i"]:
        raise malformed("nonce, salt and iteration count expected in server-first-message")
    nonce, salt_str, iter_str = (v for _, v in attrs[:3])
    if not nonce.startswith(client_nonce) or len(nonce) <= len(client_nonce):
        raise malformed("invalid SCRAM response (nonce mismatch)")
    if not is_printable(nonce):
        raise malformed("server nonce contains invalid characters")
    salt = b64decode(salt_str)
    if not salt:
        raise malformed("invalid salt in server-first-message")
    if not (iter_str.isascii() and iter_str.isdigit()) or int(iter_str) < 1:
        raise malformed("invalid iteration count in server-first-message")
    return nonce, salt, int(iter_str)


def client_final_message(client_key: bytes, nonce: str, bare: str,
                         server_first: str) -> tuple[str, str]:
    """-> (client-final-message, AuthMessage). Channel binding: none ("n,,")."""
    without_proof = f"c={b64(b'n,,')},r={nonce}"
    auth_message = f"{bare},{server_first},{without_proof}"
    signature = hmac_sha256(sha256(client_key), auth_message.encode())
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    return f"{without_proof},p={b64(proof)}", auth_message


def parse_server_final(text: str) -> bytes:
    """server-final-message -> ServerSignature (raises on "e=" errors)."""
    attrs = split_attributes(text, "server-final-message")
    key, value = attrs[0]
    if key == "e":
        raise ScramError("error received from server in SCRAM exchange", value, "28000")
    signature = b64decode(value) if key == "v" else None
    if signature is None or len(signature) != SCRAM_KEY_LEN:
        raise malformed("malformed server signature")
    return signature
