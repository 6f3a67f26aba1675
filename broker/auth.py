"""Passwords and topic ACLs in mosquitto's file formats, so existing deployments carry over.

Password file: ``user:$7$ITERATIONS$SALT_B64$HASH_B64`` (PBKDF2-HMAC-SHA512, what
``mosquitto_passwd`` writes) or the older ``user:$6$SALT_B64$HASH_B64`` (SHA-512 of
password + salt). ACL file: ``user NAME``, ``topic [read|write|readwrite|deny] FILTER`` and
``pattern [ACCESS] FILTER`` with ``%c``/``%u`` substitution; ``topic`` lines before the first
``user`` line apply to anonymous clients, ``pattern`` lines to everybody.

ACL checks run for every message, so with no ACL they return at once and otherwise the
decision is cached per (client, topic) in a bounded dict.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mqttproto.errors import MQTTError
from mqttproto.topics import parse_shared, topic_matches, validate_topic_filter

from .config import ConfigError

ACCESS_KINDS = ("read", "write", "readwrite", "deny")
DEFAULT_ITERATIONS = 101  # mosquitto_passwd's default
SALT_BYTES = 12  # as mosquitto_passwd
DECISION_CACHE_SIZE = 65536

Rule = tuple[str, str]  # (access, topic filter)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, iterations: int = DEFAULT_ITERATIONS) -> str:
    """Hash like ``mosquitto_passwd``: ``$7$iterations$salt_b64$hash_b64``."""
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${_b64(salt)}${_b64(digest)}"


@dataclass(frozen=True, slots=True)
class PasswordHash:
    """One parsed password-file hash; ``iterations == 0`` marks the plain SHA-512 ``$6$`` form."""

    salt: bytes
    digest: bytes
    iterations: int

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        """Parse ``$7$...`` or ``$6$...``; raises ValueError on anything else."""
        parts = text.split("$")
        if len(parts) == 5 and parts[0] == "" and parts[1] == "7":
            iterations = int(parts[2])
            if iterations < 1:
                raise ValueError("iterations must be >= 1")
            salt, digest = parts[3], parts[4]
        elif len(parts) == 4 and parts[0] == "" and parts[1] == "6":
            iterations, salt, digest = 0, parts[2], parts[3]
        else:
            raise ValueError("expected $7$ITERATIONS$SALT$HASH or $6$SALT$HASH")
        try:
            raw_salt = base64.b64decode(salt, validate=True)
            raw_digest = base64.b64decode(digest, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"bad base64: {exc}") from exc
        if len(raw_digest) != 64 or not raw_salt:
            raise ValueError("salt is empty or hash is not 64 bytes of SHA-512")
        return cls(raw_salt, raw_digest, iterations)

    def verify(self, password: bytes) -> bool:
        """Constant-time comparison, as the hash is secret-derived."""
        if self.iterations:
            candidate = hashlib.pbkdf2_hmac("sha512", password, self.salt, self.iterations)
        else:
            candidate = hashlib.sha512(password + self.salt).digest()
        return hmac.compare_digest(candidate, self.digest)


def load_password_file(path: str | Path) -> dict[str, PasswordHash]:
    """Read a mosquitto password file; blank lines and ``#`` comments are skipped."""
    users: dict[str, PasswordHash] = {}
    for lineno, line in _lines(path):
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise ConfigError(f"{path}:{lineno}: expected USER:HASH")
        try:
            users[user] = PasswordHash.parse(hashed.strip())
        except ValueError as exc:
            raise ConfigError(f"{path}:{lineno}: bad password hash for {user!r}: {exc}") from exc
    return users


def add_user(path: str | Path, user: str, password: str) -> None:
    """Add or replace ``user`` in a password file (created 0600), keeping the other lines."""
    if not user or ":" in user or any(c in user for c in "\r\n"):
        raise ConfigError(f"invalid user name {user!r}: must be non-empty without ':' or newlines")
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines() if p.exists() else []
    except OSError as exc:
        raise ConfigError(f"cannot read password file {p}: {exc.strerror or exc}") from exc
    entry = f"{user}:{hash_password(password)}"
    out: list[str] = []
    done = False
    for line in lines:
        if not line.lstrip().startswith("#") and line.partition(":")[0] == user:
            if not done:
                out.append(entry)
                done = True
            continue
        out.append(line)
    if not done:
        out.append(entry)
    tmp = p.with_name(f".{p.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(out) + "\n")
    os.replace(tmp, p)


def _lines(path: str | Path) -> list[tuple[int, str]]:
    """Numbered, stripped, non-comment lines of a file, or ConfigError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    out = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            out.append((lineno, line))
    return out


def filter_covers(acl_filter: str, sub_filter: str) -> bool:
    """Whether every topic ``sub_filter`` can match is also matched by ``acl_filter``."""
    acl = acl_filter.split("/")
    sub = sub_filter.split("/")
    if sub[0][:1] == "$" and acl[0] in ("+", "#"):
        return False  # wildcards at the first level never reach $-topics (MQTT-4.7.2-1)
    for i, a in enumerate(acl):
        if a == "#":
            return True
        if i >= len(sub):
            return False
        s = sub[i]
        if s == "#":
            # a sub '#' also matches its parent level, except at the very first level
            return i == 0 and acl[i:] == ["+", "#"]
        if a != "+" and a != s:
            return False
    return len(sub) == len(acl)


@dataclass
class Acl:
    """Parsed ACL file: rules for anonymous clients, per user, and patterns for everybody."""

    anonymous: list[Rule] = field(default_factory=list)
    users: dict[str, list[Rule]] = field(default_factory=dict)
    patterns: list[Rule] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> Acl:
        """Parse a mosquitto ACL file; bad lines raise ConfigError with file and line."""
        acl = cls()
        current = acl.anonymous
        for lineno, line in _lines(path):
            keyword, _, rest = line.partition(" ")
            rest = rest.strip()
            if keyword == "user":
                if not rest:
                    raise ConfigError(f"{path}:{lineno}: 'user' needs a name")
                current = acl.users.setdefault(rest, [])
            elif keyword in ("topic", "pattern"):
                rule = _parse_rule(rest, f"{path}:{lineno}")
                (current if keyword == "topic" else acl.patterns).append(rule)
            else:
                raise ConfigError(f"{path}:{lineno}: unknown ACL keyword {keyword!r}")
        return acl


def _parse_rule(rest: str, where: str) -> Rule:
    words = rest.split(None, 1)
    if not words:
        raise ConfigError(f"{where}: missing topic filter")
    if words[0] in ACCESS_KINDS and len(words) == 2:
        access, topic_filter = words[0], words[1].strip()
    else:
        access, topic_filter = "readwrite", rest
    try:
        validate_topic_filter(topic_filter)
    except MQTTError as exc:
        raise ConfigError(f"{where}: invalid topic filter: {exc.message}") from exc
    return access, topic_filter


class Authenticator:
    """Answers "may this client connect / publish / subscribe / receive" for the broker."""

    def __init__(
        self,
        users: dict[str, PasswordHash] | None = None,
        acl: Acl | None = None,
        allow_anonymous: bool = True,
        cache_size: int = DECISION_CACHE_SIZE,
    ) -> None:
        self.users = users
        self.acl = acl
        self.allow_anonymous = allow_anonymous
        self._cache_size = cache_size
        self._decisions: dict[tuple[str, str, str | None, str], bool] = {}
        self._rules: dict[tuple[str, str | None], list[Rule] | None] = {}

    @classmethod
    def from_files(
        cls, password_file: str | Path | None, acl_file: str | Path | None, allow_anonymous: bool
    ) -> Authenticator:
        """Load whichever files are given; None means no passwords / no ACL."""
        users = load_password_file(password_file) if password_file else None
        acl = Acl.load(acl_file) if acl_file else None
        return cls(users, acl, allow_anonymous)

    def check_password(self, username: str | None, password: bytes | None) -> bool:
        """CONNECT check, mosquitto-style: without a password file only anonymity matters."""
        if username is None or self.users is None:
            return self.allow_anonymous
        entry = self.users.get(username)
        if entry is None or password is None:
            return False
        return entry.verify(password)

    def can_publish(self, client_id: str, username: str | None, topic: str) -> bool:
        if self.acl is None:
            return True
        return self._decide("w", client_id, username, topic, topic_matches)

    def can_receive(self, client_id: str, username: str | None, topic: str) -> bool:
        if self.acl is None:
            return True
        return self._decide("r", client_id, username, topic, topic_matches)

    def can_subscribe(self, client_id: str, username: str | None, topic_filter: str) -> bool:
        """Allowed if a read rule covers the whole filter and no deny rule covers it.

        Narrower deny rules are enforced per message by ``can_receive``; for a shared
        subscription the filter after ``$share/NAME/`` is what counts.
        """
        if self.acl is None:
            return True
        try:
            _, inner = parse_shared(topic_filter)
        except MQTTError:
            return False
        return self._decide("s", client_id, username, inner, filter_covers)

    def _decide(
        self,
        kind: str,
        client_id: str,
        username: str | None,
        subject: str,
        match: Callable[[str, str], bool],
    ) -> bool:
        """Cached decision; ``kind`` is w(rite), r(eceive) or s(ubscribe)."""
        key = (kind, client_id, username, subject)
        cached = self._decisions.get(key)
        if cached is not None:
            return cached
        rules = self._rules_for(client_id, username)
        need = "write" if kind == "w" else "read"
        allowed = rules is not None and _allowed(rules, need, subject, match)
        if len(self._decisions) >= self._cache_size:
            del self._decisions[next(iter(self._decisions))]  # oldest first
        self._decisions[key] = allowed
        return allowed

    def _rules_for(self, client_id: str, username: str | None) -> list[Rule] | None:
        """The rules that apply to one client, patterns substituted; None means deny all.

        A client id or user name containing a wildcard would widen a pattern, so such a
        client gets nothing from patterns that use it (mosquitto refuses these too).
        """
        key = (client_id, username)
        if key in self._rules:
            return self._rules[key]
        assert self.acl is not None
        own = self.acl.anonymous if username is None else self.acl.users.get(username, [])
        found: list[Rule] = list(own)
        rules: list[Rule] | None = found
        for access, pattern in self.acl.patterns:
            if "%u" in pattern and username is None:
                continue
            uses = [v for ph, v in (("%c", client_id), ("%u", username or "")) if ph in pattern]
            if any("+" in v or "#" in v for v in uses):
                rules = None
                break
            found.append((access, pattern.replace("%c", client_id).replace("%u", username or "")))
        if len(self._rules) >= self._cache_size:
            del self._rules[next(iter(self._rules))]
        self._rules[key] = rules
        return rules


def _allowed(rules: list[Rule], need: str, subject: str, match: Callable[[str, str], bool]) -> bool:
    """Deny rules win; then any rule granting ``need`` (or readwrite) that matches allows."""
    if any(access == "deny" and match(f, subject) for access, f in rules):
        return False
    return any(access in (need, "readwrite") and match(f, subject) for access, f in rules)
