"""Passwords and ACLs in mosquitto's formats: real files, real decisions."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from broker.auth import (
    Acl,
    Authenticator,
    add_user,
    filter_covers,
    hash_password,
    load_password_file,
)
from broker.config import BrokerConfig, ConfigError


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- passwords -----------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd absent")
def test_password_made_by_mosquitto_passwd_verifies(tmp_path: Path) -> None:
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "user", "pass"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(pwfile), "other", "p:w d"], check=True)
    auth = Authenticator.from_files(pwfile, None, allow_anonymous=False)
    assert auth.check_password("user", b"pass")
    assert auth.check_password("other", b"p:w d")
    assert not auth.check_password("user", b"wrong")
    assert not auth.check_password("other", b"pass")


def test_hash_password_format_and_roundtrip(tmp_path: Path) -> None:
    line = hash_password("s3cret")
    kind, iterations, salt, digest = line.split("$")[1:]
    assert (kind, iterations) == ("7", "101")
    assert len(base64.b64decode(salt)) == 12
    expected = hashlib.pbkdf2_hmac("sha512", b"s3cret", base64.b64decode(salt), 101)
    assert base64.b64decode(digest) == expected
    pwfile = write(tmp_path, "pw", f"# comment\n\nalice:{line}\n")
    assert load_password_file(pwfile)["alice"].verify(b"s3cret")


def test_sha512_six_format_is_read(tmp_path: Path) -> None:
    salt = b"0123456789ab"
    digest = hashlib.sha512(b"old-pass" + salt).digest()
    line = f"bob:$6${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}\n"
    auth = Authenticator.from_files(write(tmp_path, "pw", line), None, allow_anonymous=False)
    assert auth.check_password("bob", b"old-pass")
    assert not auth.check_password("bob", b"old-pas")


def test_add_user_creates_replaces_and_keeps_others(tmp_path: Path) -> None:
    pwfile = tmp_path / "pw"
    add_user(pwfile, "alice", "one")
    add_user(pwfile, "bob", "two")
    add_user(pwfile, "alice", "three")
    lines = pwfile.read_text().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["alice", "bob"]
    assert pwfile.stat().st_mode & 0o777 == 0o600
    auth = Authenticator.from_files(pwfile, None, allow_anonymous=False)
    assert auth.check_password("alice", b"three") and not auth.check_password("alice", b"one")
    assert auth.check_password("bob", b"two")
    with pytest.raises(ConfigError):
        add_user(pwfile, "a:b", "x")


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd absent")
def test_mosquitto_passwd_accepts_our_file(tmp_path: Path) -> None:
    """mosquitto_passwd rewrites our file without complaint, so our lines are valid to it."""
    pwfile = tmp_path / "pw"
    add_user(pwfile, "alice", "one")
    subprocess.run(["mosquitto_passwd", "-b", str(pwfile), "bob", "two"], check=True)
    auth = Authenticator.from_files(pwfile, None, allow_anonymous=False)
    assert auth.check_password("alice", b"one") and auth.check_password("bob", b"two")


@pytest.mark.parametrize(
    "text",
    ["alice\n", "alice:plaintext\n", "alice:$7$x$abc$def\n", "alice:$6$!!$AAAA\n", ":$6$a$b\n"],
)
def test_bad_password_file_names_file_and_line(tmp_path: Path, text: str) -> None:
    pwfile = write(tmp_path, "pw", "# header\n" + text)
    with pytest.raises(ConfigError) as err:
        load_password_file(pwfile)
    assert f"{pwfile}:2" in str(err.value)


def test_anonymous_and_unknown_users(tmp_path: Path) -> None:
    pwfile = tmp_path / "pw"
    add_user(pwfile, "alice", "pw")
    open_auth = Authenticator.from_files(pwfile, None, allow_anonymous=True)
    assert open_auth.check_password(None, None)  # anonymous allowed
    assert not open_auth.check_password("mallory", b"pw")  # named users must be in the file
    assert not open_auth.check_password("alice", None)
    closed = Authenticator.from_files(pwfile, None, allow_anonymous=False)
    assert not closed.check_password(None, None)
    no_file = Authenticator.from_files(None, None, allow_anonymous=True)
    assert no_file.check_password("anyone", b"anything")
    assert not Authenticator.from_files(None, None, allow_anonymous=False).check_password("a", b"")


def test_from_config(tmp_path: Path) -> None:
    pwfile = tmp_path / "pw"
    add_user(pwfile, "alice", "pw")
    config = BrokerConfig(password_file=str(pwfile), allow_anonymous=False)
    auth = Authenticator.from_files(config.password_file, config.acl_file, config.allow_anonymous)
    assert auth.check_password("alice", b"pw") and auth.acl is None


# --- ACLs ----------------------------------------------------------------------------------

ACL = """\
# anonymous clients: only public/
topic read public/#
topic write public/anon/+

user alice
topic readwrite sensors/#
topic deny sensors/secret/#
topic write cmd/alice
topic $SYS/#

user bob
topic read sensors/+/temp

pattern readwrite clients/%c/#
pattern read users/%u/inbox
pattern deny clients/%c/locked
"""


@pytest.fixture
def auth(tmp_path: Path) -> Authenticator:
    return Authenticator.from_files(None, write(tmp_path, "acl", ACL), allow_anonymous=True)


def test_no_acl_allows_everything() -> None:
    auth = Authenticator.from_files(None, None, allow_anonymous=True)
    assert auth.can_publish("c", None, "any/topic")
    assert auth.can_subscribe("c", "u", "#")
    assert auth.can_receive("c", "u", "$SYS/broker/uptime")


def test_user_rules_with_deny(auth: Authenticator) -> None:
    assert auth.can_publish("c1", "alice", "sensors/room1/temp")
    assert auth.can_receive("c1", "alice", "sensors/room1/temp")
    assert not auth.can_publish("c1", "alice", "sensors/secret/key")  # deny wins
    assert not auth.can_receive("c1", "alice", "sensors/secret/a/b")
    assert auth.can_publish("c1", "alice", "cmd/alice")
    assert not auth.can_receive("c1", "alice", "cmd/alice")  # write only
    assert not auth.can_publish("c1", "alice", "public/x")  # anonymous rules are not alice's
    assert auth.can_receive("c1", "alice", "$SYS/broker/uptime")


def test_read_only_user(auth: Authenticator) -> None:
    assert auth.can_receive("c2", "bob", "sensors/room1/temp")
    assert not auth.can_receive("c2", "bob", "sensors/room1/humidity")
    assert not auth.can_publish("c2", "bob", "sensors/room1/temp")
    assert not auth.can_receive("c2", "unknown-user", "sensors/room1/temp")


def test_anonymous_rules(auth: Authenticator) -> None:
    assert auth.can_receive("anon", None, "public/news")
    assert not auth.can_publish("anon", None, "public/news")
    assert auth.can_publish("anon", None, "public/anon/x")
    assert not auth.can_publish("anon", None, "public/anon/x/y")
    assert not auth.can_receive("anon", None, "sensors/room1/temp")


def test_patterns_substitute_client_id_and_username(auth: Authenticator) -> None:
    assert auth.can_publish("dev42", "bob", "clients/dev42/status")
    assert auth.can_receive("dev42", None, "clients/dev42/cmd/reboot")  # %c applies to anonymous
    assert not auth.can_publish("dev42", "bob", "clients/dev43/status")
    assert not auth.can_publish("dev42", "bob", "clients/dev42/locked")  # deny pattern
    assert auth.can_receive("x", "bob", "users/bob/inbox")
    assert not auth.can_receive("x", "bob", "users/alice/inbox")
    assert not auth.can_receive("x", None, "users//inbox")  # %u patterns skip anonymous


def test_wildcards_in_ids_do_not_widen_patterns(auth: Authenticator) -> None:
    assert not auth.can_publish("+", "bob", "clients/dev42/status")
    assert not auth.can_receive("x", "#", "users/bob/inbox")


def test_subscribe_needs_a_covering_read_rule(auth: Authenticator) -> None:
    assert auth.can_subscribe("c1", "alice", "sensors/#")
    assert auth.can_subscribe("c1", "alice", "sensors/+/temp")
    assert not auth.can_subscribe("c1", "alice", "sensors/secret/#")  # deny covers it
    assert not auth.can_subscribe("c1", "alice", "#")
    assert not auth.can_subscribe("c1", "alice", "cmd/alice")  # write-only
    assert auth.can_subscribe("c2", "bob", "sensors/+/temp")
    assert auth.can_subscribe("c2", "bob", "sensors/kitchen/temp")
    assert not auth.can_subscribe("c2", "bob", "sensors/#")
    assert auth.can_subscribe("c2", "bob", "$share/group/sensors/+/temp")
    assert not auth.can_subscribe("c2", "bob", "$share/group/sensors/#")
    assert auth.can_subscribe("anon", None, "public/#")


def test_decisions_are_cached_and_bounded(tmp_path: Path) -> None:
    auth = Authenticator(acl=Acl.load(write(tmp_path, "acl", ACL)), cache_size=4)
    for i in range(10):
        assert auth.can_publish("c", "alice", f"sensors/{i}")
    assert len(auth._decisions) <= 4
    assert auth.can_publish("c", "alice", "sensors/9")


@pytest.mark.parametrize(
    ("acl_filter", "sub_filter", "covered"),
    [
        ("#", "a/b", True),
        ("#", "#", True),
        ("#", "$SYS/x", False),
        ("+/#", "$SYS/#", False),
        ("$SYS/#", "$SYS/broker/+", True),
        ("a/#", "a", True),
        ("a/#", "a/#", True),
        ("a/#", "#", False),
        ("+/#", "#", True),
        ("+/+/#", "#", False),
        ("a/+", "a/b", True),
        ("a/+", "a/+", True),
        ("a/+", "a/#", False),
        ("a/+", "a/b/c", False),
        ("a/b", "a/+", False),
        ("a/b", "a/b", True),
        ("a/+/c", "a/+/c", True),
        ("a/b/#", "a/b", True),
        ("a/b/#", "a/+", False),
    ],
)
def test_filter_covers(acl_filter: str, sub_filter: str, covered: bool) -> None:
    assert filter_covers(acl_filter, sub_filter) is covered


@pytest.mark.parametrize(
    "text",
    ["user\n", "topic\n", "topic read a/#/b\n", "pattern write a+\n", "usr alice\n"],
)
def test_bad_acl_names_file_and_line(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, "acl", "# header\n" + text)
    with pytest.raises(ConfigError) as err:
        Acl.load(path)
    assert f"{path}:2" in str(err.value)


def test_acl_default_access_is_readwrite_and_topics_may_have_spaces(tmp_path: Path) -> None:
    acl = Acl.load(write(tmp_path, "acl", "user u\ntopic a b/c\ntopic read\n"))
    assert acl.users["u"] == [("readwrite", "a b/c"), ("readwrite", "read")]
