"""PgBouncer's TLS settings mapped onto ssl.SSLContext (geobouncer/net/tls_config.py),
and the config errors for bad ones: each names the file, the line and the key."""

from __future__ import annotations

import os
import ssl

import pytest
from fixtures.certs import TlsFiles

from geobouncer.config import ConfigError, load_config
from geobouncer.net.tls_config import TlsConfig, parse_protocols


@pytest.fixture(scope="module")
def files():
    made = TlsFiles()
    yield made
    made.destroy()


def build(tmp_path, lines: dict[str, str]):
    body = "[databases]\napp = host=127.0.0.1\n\n[pgbouncer]\nlisten_port = 6999\n"
    body += "".join(f"{k} = {v}\n" for k, v in lines.items())
    path = tmp_path / "geobouncer.ini"
    path.write_text(body)
    return TlsConfig.from_config(load_config(path)), path


def client(files, **extra) -> dict[str, str]:
    return {"client_tls_sslmode": "require", "client_tls_key_file": files.key("bouncer"),
            "client_tls_cert_file": files.cert("bouncer"), **extra}


def line_of(path, key: str) -> int:
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if text.startswith(f"{key} ="):
            return number
    raise AssertionError(key)


def test_protocol_names():
    v = ssl.TLSVersion
    assert parse_protocols("secure") == {v.TLSv1_2, v.TLSv1_3}
    assert parse_protocols("tlsv1.3") == {v.TLSv1_3}
    assert parse_protocols("all,!tlsv1.0,!tlsv1.1") == {v.TLSv1_2, v.TLSv1_3}
    assert parse_protocols("tlsv1.0:tlsv1.2") == {v.TLSv1, v.TLSv1_2}
    with pytest.raises(ValueError):
        parse_protocols("sslv3")


def test_settings_reach_the_context(tmp_path, files):
    tls, _ = build(tmp_path, client(files, client_tls_protocols="tlsv1.3",
                                    client_tls13_ciphers="TLS_AES_256_GCM_SHA384",
                                    client_tls_ciphers="secure", client_tls_ecdhcurve="X25519:P-256",
                                    client_tls_ca_file=files.path("ca.pem")))
    ctx = tls.client.context
    assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    tls13 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"]
    assert tls13 == ["TLS_AES_256_GCM_SHA384"]
    assert all("ECDHE" in c["name"] or "DHE" in c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2")
    assert ctx.verify_mode == ssl.CERT_OPTIONAL      # a CA file and mode < verify-ca: optional certificate
    # Server side defaults: prefer, no verification.
    assert tls.server.mode == "prefer" and tls.server.context.verify_mode == ssl.CERT_NONE


def test_gaps_in_protocols_are_closed(tmp_path, files):
    tls, _ = build(tmp_path, client(files, client_tls_protocols="tlsv1.1,tlsv1.3"))
    assert tls.client.context.options & ssl.OP_NO_TLSv1_2


def test_server_verify_modes(tmp_path, files):
    tls, _ = build(tmp_path, {"server_tls_sslmode": "verify-full", "server_tls_ca_file": files.path("ca.pem")})
    assert tls.server.context.verify_mode == ssl.CERT_REQUIRED and tls.server.context.check_hostname
    tls, _ = build(tmp_path, {"server_tls_sslmode": "verify-ca", "server_tls_ca_file": files.path("ca.pem")})
    assert tls.server.context.verify_mode == ssl.CERT_REQUIRED and not tls.server.context.check_hostname
    tls, _ = build(tmp_path, {"server_tls_sslmode": "disable"})
    assert tls.server.context is None


@pytest.mark.parametrize("key,value,words", [
    ("client_tls_protocols", "tlsv9", "unknown protocol"),
    ("client_tls_ciphers", "NOT-A-CIPHER", "invalid client_tls_ciphers"),
    ("client_tls13_ciphers", "TLS_NOPE", "invalid client_tls13_ciphers"),
    ("client_tls_ecdhcurve", "curve-nope", "invalid client_tls_ecdhcurve"),
])
def test_bad_values_name_file_line_key(tmp_path, files, key, value, words):
    with pytest.raises(ConfigError) as err:
        build(tmp_path, client(files, **{key: value}))
    path = tmp_path / "geobouncer.ini"
    assert err.value.key == key and err.value.file == str(path) and err.value.line == line_of(path, key)
    assert words in str(err.value)


def test_key_problems(tmp_path, files):
    # A key that does not belong to the certificate.
    with pytest.raises(ConfigError) as err:
        build(tmp_path, client(files, client_tls_key_file=files.key("pg")))
    assert err.value.key == "client_tls_key_file" and err.value.line
    # An unreadable key (no such file).
    with pytest.raises(ConfigError) as err:
        build(tmp_path, client(files, client_tls_key_file=str(tmp_path / "missing.key")))
    assert err.value.key == "client_tls_key_file" and "cannot read" in err.value.msg
    # Neither key nor cert: PgBouncer's message.
    with pytest.raises(ConfigError) as err:
        build(tmp_path, {"client_tls_sslmode": "require"})
    assert "client_tls_key_file and client_tls_cert_file must be set" in err.value.msg
    # verify-ca needs a CA; auth_type=cert needs verify-full (PgBouncer's rules).
    with pytest.raises(ConfigError, match="requires client_tls_ca_file"):
        build(tmp_path, client(files, client_tls_sslmode="verify-ca"))
    with pytest.raises(ConfigError, match="auth_type=cert requires client_tls_sslmode=verify-full"):
        build(tmp_path, client(files, auth_type="cert", client_tls_ca_file=files.path("ca.pem")))


def test_identity_follows_file_contents(tmp_path, files):
    cert = tmp_path / "b.crt"
    key = tmp_path / "b.key"
    cert.write_bytes(open(files.cert("bouncer"), "rb").read())
    key.write_bytes(open(files.key("bouncer"), "rb").read())
    settings = {"server_tls_sslmode": "require", "server_tls_cert_file": str(cert),
                "server_tls_key_file": str(key)}
    first, _ = build(tmp_path, settings)
    same, _ = build(tmp_path, settings)
    assert first.server.identity == same.server.identity
    cert.write_bytes(open(files.cert("client_app"), "rb").read())
    key.write_bytes(open(files.key("client_app"), "rb").read())
    os.utime(cert)
    changed, _ = build(tmp_path, settings)
    assert changed.server.identity != first.server.identity
