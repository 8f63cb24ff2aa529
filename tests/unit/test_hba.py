"""auth_hba_file (PgBouncer's subset of pg_hba.conf) and auth_ident_file maps."""

from __future__ import annotations

import pytest

from geobouncer.auth import AuthFailed
from geobouncer.auth.hba import HbaError, IdentMaps, cert_login, load_hba, load_ident, parse_hba

RULES = """\
# comment line
local     all           all                               peer   map=os
hostssl   app,"all"     alice, bob   10.0.0.0/8           cert
hostnossl all           all          0.0.0.0/0            reject
host      sameuser      all          192.168.1.0 255.255.255.0  md5
host      app           all          ::1/128              scram-sha-256
host      all           all          all                  password   # trailing comment
"""


def decide(rules, *, local=False, tls=False, addr="127.0.0.1", db="app", user="alice"):
    rule = rules.decide(local, tls, addr, db, user)
    return rule.method if rule is not None else None


def test_first_matching_line_decides():
    rules = parse_hba(RULES)
    assert decide(rules, local=True) == "peer"
    assert decide(rules, tls=True, addr="10.1.2.3") == "cert"
    assert decide(rules, tls=True, addr="10.1.2.3", user="carol") == "password"   # not in the user list
    assert decide(rules, tls=False, addr="10.1.2.3") == "reject"                  # hostnossl
    assert decide(rules, tls=True, addr="192.168.1.7", db="alice") == "md5"       # sameuser
    assert decide(rules, tls=True, addr="192.168.1.7", db="other") == "password"
    assert decide(rules, tls=True, addr="::1") == "scram-sha-256"
    assert decide(rules, tls=True, addr="::ffff:10.0.0.1") == "cert"              # v4-mapped v6


def test_quoted_all_is_a_name():
    rules = parse_hba('host "all" all 0.0.0.0/0 trust\nhost all all 0.0.0.0/0 reject\n')
    assert decide(rules, db="all") == "trust"
    assert decide(rules, db="app") == "reject"


def test_no_line_means_none():
    assert parse_hba("host app app 127.0.0.1/32 md5\n").decide(False, False, "127.0.0.2", "app", "app") is None


def test_at_file_lists(tmp_path):
    (tmp_path / "admins").write_text("alice\nbob, carol\n")
    path = tmp_path / "hba.conf"
    path.write_text("host all @admins 0.0.0.0/0 trust\nhost all all 0.0.0.0/0 reject\n")
    rules = load_hba(str(path))
    assert decide(rules, user="carol") == "trust"
    assert decide(rules, user="dave") == "reject"


@pytest.mark.parametrize("line,words", [
    ("hostgssenc all all 0.0.0.0/0 md5", "unknown type"),
    ("host all all 0.0.0.0/0 ldap", "unsupported method"),
    ("host all all 300.1.1.1/32 md5", "invalid address"),
    ("host all +admins 0.0.0.0/0 md5", "+group"),
    ("host all all 0.0.0.0/0 md5 clientcert=1", "unsupported parameter"),
    ("host all all 0.0.0.0/0 cert", "hostssl"),
    ("host all all", "missing"),
])
def test_errors_name_the_line(line, words):
    with pytest.raises(HbaError) as err:
        parse_hba(f"# ok\nhost all all 0.0.0.0/0 md5\n{line}\n", "x.conf")
    assert err.value.line == 3 and words in err.value.msg
    assert str(err.value).startswith("x.conf:3: ")


def test_ident_maps(tmp_path):
    path = tmp_path / "ident"
    path.write_text("# map system user\ncerts app scram_user\ncerts /^(\\w+)@corp$ \\1\nos root postgres\n")
    maps = load_ident(str(path))
    assert maps.allows("certs", "app", "scram_user")
    assert not maps.allows("certs", "app", "app")
    assert maps.allows("certs", "alice@corp", "alice")
    assert not maps.allows("certs", "alice@corp", "bob")
    assert not maps.allows("os", "app", "scram_user")
    bad = tmp_path / "bad"
    bad.write_text("certs onlytwo\n")
    with pytest.raises(HbaError, match=":1: "):
        load_ident(str(bad))


def test_cert_login():
    assert cert_login("app", "app", "cert").method == "cert"
    # The client is told what PgBouncer tells it; the log detail says why.
    with pytest.raises(AuthFailed) as err:
        cert_login("app", None, "cert")
    assert (err.value.sqlstate, err.value.message) == ("08P01", "certificate authentication failed")
    assert err.value.log_detail == "TLS client certificate required"
    with pytest.raises(AuthFailed) as err:
        cert_login("app", None, "cert", tls=False)
    assert err.value.log_detail == "TLS connection required"
    with pytest.raises(AuthFailed) as err:
        cert_login("app", "other", "cert")
    assert (err.value.sqlstate, err.value.message) == ("08P01", "certificate authentication failed")
    assert err.value.log_detail == 'TLS certificate name mismatch: certificate CN "other" is not user "app"'
    maps = IdentMaps([("m", "other", "app")])
    assert cert_login("app", "other", "cert", (maps, "m")).method == "cert"
    with pytest.raises(AuthFailed, match="Peer authentication failed"):
        cert_login("app", "root", "peer")
