"""Broker settings: defaults, a YAML file and command-line flags, merged and validated.

Precedence is "flags win over the YAML file, the file wins over defaults", so every flag
defaults to ``None`` and only flags actually given override anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from quicmig.frames import MAX_POOL_ADDRESSES, Address

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MAX_PACKET_SIZE_LIMIT = 268_435_460  # largest MQTT packet: 1 + 4 length bytes + 268435455
UINT32_MAX = 4_294_967_295
QUIC_RETRY_MODES = ("auto", "always", "never")  # quicmig.server.HandshakePolicy
PERSISTENCE_SYNC_MODES = ("batch", "strict")  # docs/durability.md


class ConfigError(ValueError):
    """A bad setting or file; the CLI prints it as one line and exits with status 2."""


@dataclass
class BrokerConfig:
    """Everything the broker needs to start; port 0 disables that listener."""

    host: str = "0.0.0.0"
    tcp_port: int = 1883
    tls_port: int = 8883
    mptcp_port: int = 1885
    quic_port: int = 14567
    # New QUIC connections: address validation with Retry (auto: once a quarter of
    # quic_max_handshakes is taken), handshakes in progress at most (each costs ~90 KB; past
    # it the oldest is dropped), and the seconds a handshake may take.
    quic_retry: str = "auto"
    quic_max_handshakes: int = 256
    quic_handshake_timeout: float = 10.0
    # TLS session resumption over QUIC: session tickets kept in memory (at most this many,
    # 0 disables resumption, and this many bytes), each for this many seconds.  With
    # require_certificate only tickets of certificate-verified connections are honoured.
    quic_tickets: int = 65_536
    quic_ticket_bytes: int = 64 << 20
    quic_ticket_lifetime: float = 86_400.0
    # Addresses the broker may move to, "host:port,host:port" (also $QMIG_POOL): sent to QUIC
    # clients after the handshake (POOL_MIGRATION_ADDRESS) so pool clients can find it.
    pool: str | None = None
    cert: str | None = None
    key: str | None = None
    cafile: str | None = None
    require_certificate: bool = False
    password_file: str | None = None
    acl_file: str | None = None
    allow_anonymous: bool = True
    max_packet_size: int = 1_048_576
    receive_maximum: int = 1024
    max_inflight_messages: int = 1024
    max_queued_messages: int = 10_000
    # Byte budgets (0 = no limit).  A session's queued and in-flight messages (payload,
    # topic, properties, plus a fixed cost per delivery), as mosquitto's max_queued_bytes:
    # beyond it further QoS > 0 messages for that session are dropped.
    max_queued_bytes: int = 64 << 20
    # The same over all sessions, each message counted once however many sessions hold it.
    max_queued_bytes_total: int = 512 << 20
    # Output held for a client whose transport is full (it does not read); beyond it the
    # connection is closed.  Its session keeps its queued QoS > 0 messages.
    max_output_bytes: int = 8 << 20
    # A packet that has begun arriving must be complete within this many seconds (0: no
    # limit), and incomplete packets of all connections together hold at most this much.
    incomplete_packet_timeout: float = 30.0
    max_incomplete_bytes_total: int = 128 << 20
    queue_qos0_messages: bool = False
    topic_alias_maximum: int = 64
    max_keepalive: int = 0  # 0 = no cap
    max_session_expiry: int | None = None
    max_subscriptions_per_client: int = 5000
    # User Properties of one packet: how many (Subscription Identifiers, the only other
    # property that may repeat, count too), and the bytes of their keys and values.  A 1 MB
    # packet of empty ones was 200,000 list entries.  EMQX caps a CONNECT's at 100 by
    # default (mqtt.max_connect_user_properties, emqx/emqx#18974); past either cap the
    # client is closed with 0x97 Quota exceeded.
    max_user_properties: int = 256
    max_user_properties_size: int = 65_536
    sys_interval: float = 10.0  # 0 disables $SYS
    redirect: str | None = None  # server reference; new connections are refused with it
    # Durable store (broker.persist, docs/durability.md): a directory for its SQLite file
    # (None: state lives in memory only).  batch: changes are committed every
    # persistence_interval seconds (synchronous=NORMAL); strict: PUBACK/PUBREC/PUBCOMP
    # of inbound messages are sent only once a commit (synchronous=FULL) made them durable.
    persistence: str | None = None
    persistence_sync: str = "batch"
    persistence_interval: float = 0.1
    redirect_permanent: bool = False
    log_level: str = "INFO"
    # Control API for the edge host's orchestrator (broker.control); port 0 = off.  The
    # token comes from control_token_file or $QMIG_CONTROL_TOKEN, never from a flag (ps);
    # without either the broker generates one into control_token_file, by default
    # broker.control.default_token_file(control_port).
    control_host: str = "127.0.0.1"
    control_port: int = 0
    control_token: str | None = field(default=None, repr=False)
    control_token_file: str | None = None
    # Prometheus metrics (broker.metrics): port 0 = off; loopback unless told otherwise.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    # Where accepted MIGRATION_TRIGGERs go (broker.forward): the orchestrator's base URL, its
    # trigger token (orchestrator_token_file or $QMIG_ORCHESTRATOR_TOKEN, never a flag), and
    # the name the orchestrator's inventory gives this broker.
    orchestrator_url: str | None = None
    orchestrator_token: str | None = field(default=None, repr=False)
    orchestrator_token_file: str | None = None
    name: str = "broker"

    @property
    def tls_enabled(self) -> bool:
        """TLS listens only when it has a port and both a certificate and its key."""
        return self.tls_port != 0 and bool(self.cert) and bool(self.key)

    def pool_addresses_text(self) -> list[str]:
        return [a.strip() for a in (self.pool or "").split(",") if a.strip()]

    @property
    def quic_enabled(self) -> bool:
        """QUIC always runs TLS 1.3, so it too needs a certificate and its key."""
        return self.quic_port != 0 and bool(self.cert) and bool(self.key)

    def validate(self) -> BrokerConfig:
        """Check types and ranges so mistakes fail at start-up, not at the first client."""
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), _FIELD_TYPES[f.name], "")
        for name in ("tcp_port", "tls_port", "mptcp_port", "quic_port"):
            _check_range(name, getattr(self, name), 0, 65535)
        if not self.host:
            raise ConfigError("host must not be empty")
        pool = self.pool_addresses_text()
        for text in pool:
            try:
                Address.parse(text)
            except ValueError as exc:
                raise ConfigError(f"pool: {exc}") from exc
        if len(pool) > MAX_POOL_ADDRESSES:
            raise ConfigError(
                f"pool: {len(pool)} addresses, at most {MAX_POOL_ADDRESSES}: a pool client "
                "probes them all at once, each with a connection ID of its own"
            )
        if self.quic_retry not in QUIC_RETRY_MODES:
            choices = ", ".join(QUIC_RETRY_MODES)
            raise ConfigError(f"quic_retry must be one of {choices}, got {self.quic_retry!r}")
        _check_range("quic_max_handshakes", self.quic_max_handshakes, 1, None)
        _check_range("quic_tickets", self.quic_tickets, 0, None)
        _check_range("quic_ticket_bytes", self.quic_ticket_bytes, 0, None)
        if not 0 < self.quic_ticket_lifetime <= 7 * 86_400:  # RFC 8446 section 4.6.1
            raise ConfigError(
                f"quic_ticket_lifetime must be > 0 and at most 7 days, "
                f"got {self.quic_ticket_lifetime}"
            )
        if self.quic_handshake_timeout <= 0:
            raise ConfigError(
                f"quic_handshake_timeout must be > 0, got {self.quic_handshake_timeout}"
            )
        _check_range("max_packet_size", self.max_packet_size, 16, MAX_PACKET_SIZE_LIMIT)
        _check_range("receive_maximum", self.receive_maximum, 1, 65535)
        _check_range("max_inflight_messages", self.max_inflight_messages, 1, 65535)
        _check_range("max_queued_messages", self.max_queued_messages, 0, None)
        for name in (
            "max_queued_bytes",
            "max_queued_bytes_total",
            "max_output_bytes",
            "max_incomplete_bytes_total",
        ):
            _check_range(name, getattr(self, name), 0, None)
        if self.incomplete_packet_timeout < 0:
            raise ConfigError(
                "incomplete_packet_timeout must be >= 0 (0 disables), "
                f"got {self.incomplete_packet_timeout}"
            )
        _check_range("topic_alias_maximum", self.topic_alias_maximum, 0, 65535)
        _check_range("max_keepalive", self.max_keepalive, 0, 65535)
        if self.max_session_expiry is not None:
            _check_range("max_session_expiry", self.max_session_expiry, 0, UINT32_MAX)
        _check_range("max_subscriptions_per_client", self.max_subscriptions_per_client, 1, None)
        _check_range("max_user_properties", self.max_user_properties, 1, None)
        _check_range("max_user_properties_size", self.max_user_properties_size, 1, None)
        if self.persistence is not None and not self.persistence.strip():
            raise ConfigError("persistence must name a directory")
        if self.persistence_sync not in PERSISTENCE_SYNC_MODES:
            choices = ", ".join(PERSISTENCE_SYNC_MODES)
            raise ConfigError(
                f"persistence_sync must be one of {choices}, got {self.persistence_sync!r}"
            )
        if not 0 < self.persistence_interval <= 3600:
            raise ConfigError(
                f"persistence_interval must be > 0 and <= 3600, got {self.persistence_interval}"
            )
        if self.sys_interval < 0:
            raise ConfigError(f"sys_interval must be >= 0 (0 disables), got {self.sys_interval}")
        if bool(self.cert) != bool(self.key):
            raise ConfigError("cert and key must be given together")
        if self.require_certificate and (self.tls_enabled or self.quic_enabled) and not self.cafile:
            raise ConfigError("require_certificate needs cafile to verify client certificates")
        _check_range("control_port", self.control_port, 0, 65535)
        if self.control_port and not self.control_host:
            raise ConfigError("control_host must not be empty (0.0.0.0 if every address is meant)")
        self._check_control_token()
        _check_range("metrics_port", self.metrics_port, 0, 65535)
        if self.metrics_port and not self.metrics_host:
            raise ConfigError("metrics_host must not be empty (0.0.0.0 if every address is meant)")
        self._check_orchestrator()
        if self.redirect is not None and not self.redirect.strip():
            raise ConfigError("redirect must be a non-empty server reference such as host:port")
        level = self.log_level.upper()
        if level not in LOG_LEVELS:
            choices = ", ".join(LOG_LEVELS)
            raise ConfigError(f"log_level must be one of {choices}, got {self.log_level!r}")
        self.log_level = level
        return self

    def _check_control_token(self) -> None:
        """Read the control token file; refuse tokens that are easy to guess.

        The file wins over control_token / the environment.  With the control API on and no
        token anywhere, control_token_file names where the broker will generate one (at
        start, :meth:`broker.server.BrokerServer.start`); a named file that does not exist
        yet is generated too.
        """
        from .control import (
            ControlError,
            default_token_file,
            read_token_file,
            token_weakness,
        )

        if self.control_port and not self.control_token and not self.control_token_file:
            self.control_token_file = str(default_token_file(self.control_port))
        source = "$QMIG_CONTROL_TOKEN / control_token"
        if self.control_token_file:
            if self.control_port and not Path(self.control_token_file).exists():
                self.control_token = None  # generated at start
                return
            try:
                self.control_token = read_token_file(self.control_token_file)
            except ControlError as exc:
                raise ConfigError(str(exc)) from exc
            source = self.control_token_file
        weakness = token_weakness(self.control_token) if self.control_token else None
        if self.control_port and weakness:
            raise ConfigError(
                f"control token from {source} {weakness}: make one with `python3 -c 'import "
                "secrets; print(secrets.token_urlsafe(32))'`, or give none and the broker "
                "generates one into its control token file"
            )

    def _check_orchestrator(self) -> None:
        """An orchestrator URL needs http(s) and a token that is hard to guess."""
        if not self.name.strip():
            raise ConfigError("name must not be empty")
        if self.orchestrator_url is None:
            return
        url = self.orchestrator_url.strip()
        if not url.startswith(("http://", "https://")) or len(url) <= len("https://"):
            raise ConfigError(f"orchestrator_url must be an http:// or https:// URL, got {url!r}")
        from .control import ControlError, read_token_file, token_weakness

        source = "$QMIG_ORCHESTRATOR_TOKEN / orchestrator_token"
        if self.orchestrator_token_file:
            try:
                self.orchestrator_token = read_token_file(
                    self.orchestrator_token_file, "orchestrator token"
                )
            except ControlError as exc:
                raise ConfigError(str(exc)) from exc
            source = self.orchestrator_token_file
        if not self.orchestrator_token:
            raise ConfigError(
                "orchestrator_url needs the orchestrator's trigger token: "
                "orchestrator_token_file or $QMIG_ORCHESTRATOR_TOKEN"
            )
        weakness = token_weakness(self.orchestrator_token)
        if weakness:
            raise ConfigError(f"orchestrator token from {source} {weakness}")


_FIELD_TYPES: dict[str, Any] = typing.get_type_hints(BrokerConfig)
_FIELD_NAMES = frozenset(f.name for f in fields(BrokerConfig))


def _check_range(name: str, value: int, low: int, high: int | None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise ConfigError(f"{name} must be {bound}, got {value}")


def _type_ok(value: Any, expected: Any) -> bool:
    if isinstance(expected, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, expected)


def _type_name(expected: Any) -> str:
    if isinstance(expected, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(expected))
    return "null" if expected is type(None) else expected.__name__


def _check_type(name: str, value: Any, expected: Any, where: str) -> None:
    if not _type_ok(value, expected):
        raise ConfigError(
            f"{where}{name} must be {_type_name(expected)}, got {type(value).__name__} {value!r}"
        )


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML settings file into a dict of known, type-checked fields.

    Dashes in keys are accepted as underscores (``tcp-port`` is ``tcp_port``).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {p} is not UTF-8: {exc}") from exc
    return parse_settings(text, f"config file {p}")


def parse_settings(text: str, where: str = "config") -> dict[str, Any]:
    """The settings of a YAML document: known keys with values of the right types."""
    import yaml  # only a broker started from a file needs it (1.2 MB in every process)

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}".replace("\n", " ")) from exc
    except RecursionError:
        raise ConfigError(f"{where} nests too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"{where} must be a mapping of settings, not {kind}")
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in _FIELD_NAMES:
            raise ConfigError(f"unknown setting {raw_key!r} in {where}")
        expected = _FIELD_TYPES[key]
        _check_type(key, value, expected, f"{where}: ")
        if expected is float and isinstance(value, int):
            value = float(value)
        out[key] = value
    return out


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(LOG_LEVELS)}")
    return level


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the broker's flags; all default to None so unset flags never override the file."""
    add = parser.add_argument
    add("--config", metavar="FILE", default=None, help="YAML settings file")
    add("--host", default=None, help="address to listen on (default 0.0.0.0)")
    add("--tcp-port", type=int, default=None, help="plain MQTT port, 0 disables (default 1883)")
    add("--tls-port", type=int, default=None, help="MQTT over TLS port, 0 disables (default 8883)")
    add("--mptcp-port", type=int, default=None, help="MPTCP port, 0 disables (default 1885)")
    add(
        "--pool",
        default=None,
        metavar="HOST:PORT,...",
        help="addresses the broker may migrate to, sent to QUIC pool clients ($QMIG_POOL)",
    )
    add(
        "--quic-port",
        type=int,
        default=None,
        help="QUIC (UDP) port, 0 disables; needs --cert/--key (default 14567)",
    )
    add(
        "--quic-retry",
        choices=QUIC_RETRY_MODES,
        default=None,
        help="QUIC address validation with Retry: auto (under load), always, never (default auto)",
    )
    add(
        "--quic-max-handshakes",
        type=int,
        default=None,
        metavar="N",
        help="QUIC handshakes in progress at most, past it the oldest is dropped; auto "
        "Retry starts at a quarter of it (default 256)",
    )
    add(
        "--quic-handshake-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds a QUIC handshake may take (default 10)",
    )
    add(
        "--quic-tickets",
        type=int,
        default=None,
        metavar="N",
        help="TLS session tickets kept for QUIC resumption, 0 disables it (default 65536)",
    )
    add(
        "--quic-ticket-bytes",
        type=int,
        default=None,
        metavar="BYTES",
        help="memory the session tickets may take, oldest dropped first (default 64 MiB)",
    )
    add(
        "--quic-ticket-lifetime",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long a session ticket resumes a connection (default 86400)",
    )
    add("--cert", default=None, help="server certificate (PEM); TLS needs it and --key")
    add("--key", default=None, help="server private key (PEM)")
    add("--cafile", default=None, help="CA bundle for verifying client certificates")
    add(
        "--require-certificate",
        action="store_true",
        default=None,
        help="TLS clients must present a certificate signed by --cafile",
    )
    add("--password-file", default=None, help="mosquitto-format password file")
    add("--acl-file", default=None, help="mosquitto-format ACL file")
    add(
        "--allow-anonymous",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="accept clients without a username (default yes)",
    )
    add("--max-packet-size", type=int, default=None, help="largest accepted packet in bytes")
    add("--receive-maximum", type=int, default=None, help="QoS>0 publishes in flight per client")
    add("--max-queued-messages", type=int, default=None, help="per-session offline queue length")
    add(
        "--max-queued-bytes",
        type=int,
        default=None,
        help="bytes of QoS>0 messages queued or in flight per session, 0 = no limit (64 MiB)",
    )
    add(
        "--max-queued-bytes-total",
        type=int,
        default=None,
        help="the same over all sessions, each message once, 0 = no limit (512 MiB)",
    )
    add(
        "--max-output-bytes",
        type=int,
        default=None,
        help="output held for a client that does not read before it is closed (8 MiB)",
    )
    add(
        "--incomplete-packet-timeout",
        type=float,
        default=None,
        help="seconds a started packet may take to arrive, 0 = no limit (30)",
    )
    add(
        "--max-incomplete-bytes-total",
        type=int,
        default=None,
        help="bytes of incomplete packets of all connections, 0 = no limit (128 MiB)",
    )
    add(
        "--max-user-properties",
        type=int,
        default=None,
        help="user properties accepted in one packet (default 256)",
    )
    add(
        "--max-user-properties-size",
        type=int,
        default=None,
        metavar="BYTES",
        help="bytes of user property keys and values in one packet (default 65536)",
    )
    add("--max-keepalive", type=int, default=None, help="cap on keep-alive seconds, 0 = none")
    add("--sys-interval", type=float, default=None, help="seconds between $SYS updates, 0 disables")
    add(
        "--persistence",
        metavar="DIR",
        default=None,
        help="keep sessions, queued messages and retained messages in DIR/qmig.db (SQLite) "
        "so that they survive a restart or a crash (default: in memory only)",
    )
    add(
        "--persistence-sync",
        choices=PERSISTENCE_SYNC_MODES,
        default=None,
        help="batch: commit changes every --persistence-interval; strict: acknowledge "
        "inbound QoS 1/2 messages only once they are on disk (default batch)",
    )
    add(
        "--persistence-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds between commits in batch mode (default 0.1)",
    )
    add(
        "--redirect",
        metavar="HOST:PORT",
        default=None,
        help="refuse new connections, pointing clients at this server reference",
    )
    add(
        "--control-host",
        default=None,
        help="address of the migration control API (default 127.0.0.1)",
    )
    add(
        "--control-port",
        type=int,
        default=None,
        help="port of the migration control API, 0 disables (default 0)",
    )
    add(
        "--control-token-file",
        metavar="FILE",
        default=None,
        help="file holding the control API token, at least 32 characters (or set "
        "$QMIG_CONTROL_TOKEN); generated (mode 0600) if missing; default "
        "~/.qmig/control-PORT.token, or under $XDG_RUNTIME_DIR/qmig",
    )
    add(
        "--metrics-host",
        default=None,
        help="address of the Prometheus metrics endpoint (default 127.0.0.1)",
    )
    add(
        "--metrics-port",
        type=int,
        default=None,
        help="port of the Prometheus metrics endpoint (/metrics), 0 disables (default 0)",
    )
    add(
        "--orchestrator-url",
        metavar="URL",
        default=None,
        help="send accepted MIGRATION_TRIGGERs to this orchestrator (http://HOST:PORT)",
    )
    add(
        "--orchestrator-token-file",
        metavar="FILE",
        default=None,
        help="file holding the orchestrator's trigger token (or $QMIG_ORCHESTRATOR_TOKEN)",
    )
    add("--name", default=None, help="this broker's name in the orchestrator's inventory")
    add("--log-level", type=_log_level, default=None, help="DEBUG, INFO, WARNING or ERROR")


def config_from_args(args: argparse.Namespace) -> BrokerConfig:
    """Merge defaults, the ``--config`` file and the flags given, then validate."""
    values: dict[str, Any] = {}
    config_path = getattr(args, "config", None)
    if config_path:
        values.update(load_yaml(config_path))
    if os.environ.get("QMIG_POOL"):
        values["pool"] = os.environ["QMIG_POOL"]  # the container's environment
    if os.environ.get("QMIG_CONTROL_TOKEN", "").strip():
        values["control_token"] = os.environ["QMIG_CONTROL_TOKEN"].strip()
    if os.environ.get("QMIG_ORCHESTRATOR_TOKEN", "").strip():
        values["orchestrator_token"] = os.environ["QMIG_ORCHESTRATOR_TOKEN"].strip()
    for name in _FIELD_NAMES:
        flag = getattr(args, name, None)
        if flag is not None:
            values[name] = flag
    return dataclasses.replace(BrokerConfig(), **values).validate()
