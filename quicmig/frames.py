"""Wire format of qmig's QUIC server-migration extension (sans-I/O).

RFC 9000 lets only the client migrate.  qmig adds what a server needs to move to another
address with its connections: one transport parameter that says which strategies an endpoint
supports, and four frames.  Frames are only sent to a peer that advertised the parameter.

=========================  ===============  ================================================
what                       codepoint         body
=========================  ===============  ================================================
transport parameter        0x716d6967        varint bitmask of STRATEGY_* the sender accepts
SERVER_MIGRATION           0x716d6901        seq, address: the server will move there
POOL_MIGRATION_ADDRESS     0x716d6902        seq, count, addresses: where it may ever move
SERVER_MIGRATED            0x716d6903        seq, address: sent from the new address
MIGRATION_TRIGGER          0x716d6904        reason, hint: the client asks the server to move
=========================  ===============  ================================================

The codepoints spell "qmig" (0x716d6967) in ASCII: eight-byte varints far above the
registered ranges, where no IANA assignment can collide (the literature used 0x32-0x34).
An address is ``family(1) | ip(4 or 16) | port(2)``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

# Buffer is defined (and typed, in _buffer.pyi) in aioquic._buffer; aioquic.buffer only
# re-imports it without exporting it for type checkers.
from aioquic._buffer import Buffer, BufferReadError
from aioquic.buffer import size_uint_var

TRANSPORT_PARAMETER = 0x716D6967
SERVER_MIGRATION = 0x716D6901
POOL_MIGRATION_ADDRESS = 0x716D6902
SERVER_MIGRATED = 0x716D6903
MIGRATION_TRIGGER = 0x716D6904
FRAME_TYPES = (SERVER_MIGRATION, POOL_MIGRATION_ADDRESS, SERVER_MIGRATED, MIGRATION_TRIGGER)

# Strategy bits of the transport parameter.
STRATEGY_EXPLICIT = 0x1  # SERVER_MIGRATION (proactive and reactive clients)
STRATEGY_POOL = 0x2  # POOL_MIGRATION_ADDRESS
STRATEGY_ANNOUNCE = 0x4  # SERVER_MIGRATED from the new address
STRATEGY_TRIGGER = 0x8  # MIGRATION_TRIGGER
ALL_STRATEGIES = STRATEGY_EXPLICIT | STRATEGY_POOL | STRATEGY_ANNOUNCE | STRATEGY_TRIGGER

MAX_POOL = 16
MAX_HINT = 256
_FAMILY_V4 = 4
_FAMILY_V6 = 6


# Addresses a pool may hold: a client following a pool probes them all at once, each with a
# connection ID of its own (RFC 9000 section 9.5), next to its active path and the old one.
MAX_POOL_ADDRESSES = 14


class FrameError(ValueError):
    """A malformed extension frame: the connection closes with FRAME_ENCODING_ERROR."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __post_init__(self) -> None:
        ip = ipaddress.ip_address(self.host)  # raises ValueError for a non-IP host
        object.__setattr__(self, "host", str(ip))
        if not 0 < self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")

    @classmethod
    def parse(cls, text: str) -> Address:
        """``198.18.2.2:14567`` or ``[2001:db8::1]:14567``."""
        if text.startswith("["):
            host, _, port = text[1:].partition("]:")
        else:
            host, _, port = text.rpartition(":")
        if not host or not port:
            raise ValueError(f"not an address with a port: {text!r}")
        return cls(host, int(port))

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.host).version

    def matches(self, addr: tuple[Any, ...]) -> bool:
        """Equal to a socket address, also when that is an IPv4-mapped IPv6 tuple."""
        host = addr[0]
        if host.startswith("::ffff:"):
            host = host[7:]
        return int(addr[1]) == self.port and host == self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.version == 6 else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerMigration:
    sequence: int
    address: Address
    type: int = field(default=SERVER_MIGRATION, init=False)


@dataclass(frozen=True, slots=True)
class PoolMigrationAddress:
    sequence: int
    addresses: tuple[Address, ...]
    type: int = field(default=POOL_MIGRATION_ADDRESS, init=False)


@dataclass(frozen=True, slots=True)
class ServerMigrated:
    sequence: int
    address: Address
    type: int = field(default=SERVER_MIGRATED, init=False)


@dataclass(frozen=True, slots=True)
class MigrationTrigger:
    reason: int
    hint: str = ""
    type: int = field(default=MIGRATION_TRIGGER, init=False)


Frame = ServerMigration | PoolMigrationAddress | ServerMigrated | MigrationTrigger

# MIGRATION_TRIGGER reasons.
TRIGGER_CLIENT_MOVED = 0x1
TRIGGER_OPERATOR = 0x2


def _push_address(buf: Buffer, address: Address) -> None:
    ip = ipaddress.ip_address(address.host)
    buf.push_uint8(_FAMILY_V4 if ip.version == 4 else _FAMILY_V6)
    buf.push_bytes(ip.packed)
    buf.push_uint16(address.port)


def _pull_address(buf: Buffer) -> Address:
    family = buf.pull_uint8()
    if family == _FAMILY_V4:
        raw = buf.pull_bytes(4)
    elif family == _FAMILY_V6:
        raw = buf.pull_bytes(16)
    else:
        raise FrameError(f"unknown address family {family}")
    port = buf.pull_uint16()
    if port == 0:
        raise FrameError("port 0")
    return Address(str(ipaddress.ip_address(raw)), port)


def encode_body(frame: Frame) -> bytes:
    """The frame's body, without its type (the QUIC packet builder writes that)."""
    buf = Buffer(capacity=32 + 19 * MAX_POOL + MAX_HINT * 4)
    if isinstance(frame, (ServerMigration, ServerMigrated)):
        buf.push_uint_var(frame.sequence)
        _push_address(buf, frame.address)
    elif isinstance(frame, PoolMigrationAddress):
        if not 0 < len(frame.addresses) <= MAX_POOL:
            raise ValueError(f"a pool holds 1 to {MAX_POOL} addresses")
        buf.push_uint_var(frame.sequence)
        buf.push_uint_var(len(frame.addresses))
        for address in frame.addresses:
            _push_address(buf, address)
    elif isinstance(frame, MigrationTrigger):
        hint = frame.hint.encode()
        if len(hint) > MAX_HINT:
            raise ValueError(f"hint longer than {MAX_HINT} bytes")
        buf.push_uint_var(frame.reason)
        buf.push_uint_var(len(hint))
        buf.push_bytes(hint)
    else:  # pragma: no cover - exhaustive
        raise TypeError(frame)
    return buf.data


def encode(frame: Frame) -> bytes:
    """Type and body, as the frame appears in a packet."""
    head = Buffer(capacity=8)
    head.push_uint_var(frame.type)
    return head.data + encode_body(frame)


def frame_size(frame: Frame) -> int:
    return size_uint_var(frame.type) + len(encode_body(frame))


def pull_frame(frame_type: int, buf: Buffer) -> Frame:
    """Read one frame's body from ``buf`` (positioned after the type)."""
    try:
        if frame_type in (SERVER_MIGRATION, SERVER_MIGRATED):
            sequence = buf.pull_uint_var()
            address = _pull_address(buf)
            if frame_type == SERVER_MIGRATION:
                return ServerMigration(sequence, address)
            return ServerMigrated(sequence, address)
        if frame_type == POOL_MIGRATION_ADDRESS:
            sequence = buf.pull_uint_var()
            count = buf.pull_uint_var()
            if not 0 < count <= MAX_POOL:
                raise FrameError(f"pool of {count} addresses")
            return PoolMigrationAddress(sequence, tuple(_pull_address(buf) for _ in range(count)))
        if frame_type == MIGRATION_TRIGGER:
            reason = buf.pull_uint_var()
            length = buf.pull_uint_var()
            if length > MAX_HINT:
                raise FrameError("trigger hint too long")
            try:
                hint = buf.pull_bytes(length).decode()
            except UnicodeDecodeError as exc:
                raise FrameError("trigger hint is not UTF-8") from exc
            return MigrationTrigger(reason, hint)
    except BufferReadError as exc:
        raise FrameError("truncated frame") from exc
    raise FrameError(f"not a migration frame: {frame_type:#x}")


def decode(data: bytes) -> Frame:
    """Decode one whole frame (type and body); trailing bytes are an error."""
    buf = Buffer(data=data)
    try:
        frame_type = buf.pull_uint_var()
    except BufferReadError as exc:
        raise FrameError("truncated frame type") from exc
    frame = pull_frame(frame_type, buf)
    if not buf.eof():
        raise FrameError("trailing bytes after frame")
    return frame


def encode_transport_parameter(strategies: int) -> bytes:
    """``id | length | value`` to append to the encoded transport parameters."""
    value = Buffer(capacity=8)
    value.push_uint_var(strategies)
    out = Buffer(capacity=24)
    out.push_uint_var(TRANSPORT_PARAMETER)
    out.push_uint_var(len(value.data))
    out.push_bytes(value.data)
    return out.data


def find_transport_parameter(data: bytes) -> int | None:
    """The peer's strategy bitmask from its encoded transport parameters, or None."""
    buf = Buffer(data=data)
    try:
        while not buf.eof():
            param_id = buf.pull_uint_var()
            length = buf.pull_uint_var()
            value = buf.pull_bytes(length)
            if param_id == TRANSPORT_PARAMETER:
                inner = Buffer(data=value)
                strategies = inner.pull_uint_var()
                return strategies if inner.eof() else None
    except BufferReadError:
        return None
    return None
