"""MQTT 5 properties: identifiers, wire types and where each may appear (section 2.2.2.2).

Properties travel as a plain ``dict`` keyed by :class:`PropertyId`.  Two identifiers may
repeat and so always hold sequences: ``USER_PROPERTY`` (pairs of strings: give the encoder a
``list[tuple[str, str]]``; the decoder hands back a :class:`UserProperties`, which reads and
compares like that list) and ``SUBSCRIPTION_IDENTIFIER`` (``list[int]``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from enum import IntEnum
from typing import Any, overload

Properties = dict[int, Any]


class PropertyId(IntEnum):
    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


class WireType(IntEnum):
    BYTE = 1
    UINT16 = 2
    UINT32 = 4
    VARINT = 5
    UTF8 = 6
    BINARY = 7
    UTF8_PAIR = 8


# Where a property may appear: packet type numbers (1..15), plus WILL for will properties.
WILL = 0
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, DISCONNECT, AUTH = 8, 9, 10, 11, 14, 15
_ACKS = frozenset({PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, DISCONNECT, AUTH, CONNACK})
_ALL = frozenset(range(0, 16))

P = PropertyId
SPEC: dict[int, tuple[WireType, frozenset[int]]] = {
    P.PAYLOAD_FORMAT_INDICATOR: (WireType.BYTE, frozenset({PUBLISH, WILL})),
    P.MESSAGE_EXPIRY_INTERVAL: (WireType.UINT32, frozenset({PUBLISH, WILL})),
    P.CONTENT_TYPE: (WireType.UTF8, frozenset({PUBLISH, WILL})),
    P.RESPONSE_TOPIC: (WireType.UTF8, frozenset({PUBLISH, WILL})),
    P.CORRELATION_DATA: (WireType.BINARY, frozenset({PUBLISH, WILL})),
    P.SUBSCRIPTION_IDENTIFIER: (WireType.VARINT, frozenset({PUBLISH, SUBSCRIBE})),
    P.SESSION_EXPIRY_INTERVAL: (WireType.UINT32, frozenset({CONNECT, CONNACK, DISCONNECT})),
    P.ASSIGNED_CLIENT_IDENTIFIER: (WireType.UTF8, frozenset({CONNACK})),
    P.SERVER_KEEP_ALIVE: (WireType.UINT16, frozenset({CONNACK})),
    P.AUTHENTICATION_METHOD: (WireType.UTF8, frozenset({CONNECT, CONNACK, AUTH})),
    P.AUTHENTICATION_DATA: (WireType.BINARY, frozenset({CONNECT, CONNACK, AUTH})),
    P.REQUEST_PROBLEM_INFORMATION: (WireType.BYTE, frozenset({CONNECT})),
    P.WILL_DELAY_INTERVAL: (WireType.UINT32, frozenset({WILL})),
    P.REQUEST_RESPONSE_INFORMATION: (WireType.BYTE, frozenset({CONNECT})),
    P.RESPONSE_INFORMATION: (WireType.UTF8, frozenset({CONNACK})),
    P.SERVER_REFERENCE: (WireType.UTF8, frozenset({CONNACK, DISCONNECT})),
    P.REASON_STRING: (WireType.UTF8, _ACKS),
    P.RECEIVE_MAXIMUM: (WireType.UINT16, frozenset({CONNECT, CONNACK})),
    P.TOPIC_ALIAS_MAXIMUM: (WireType.UINT16, frozenset({CONNECT, CONNACK})),
    P.TOPIC_ALIAS: (WireType.UINT16, frozenset({PUBLISH})),
    P.MAXIMUM_QOS: (WireType.BYTE, frozenset({CONNACK})),
    P.RETAIN_AVAILABLE: (WireType.BYTE, frozenset({CONNACK})),
    P.USER_PROPERTY: (WireType.UTF8_PAIR, _ALL),
    P.MAXIMUM_PACKET_SIZE: (WireType.UINT32, frozenset({CONNECT, CONNACK})),
    P.WILDCARD_SUBSCRIPTION_AVAILABLE: (WireType.BYTE, frozenset({CONNACK})),
    P.SUBSCRIPTION_IDENTIFIER_AVAILABLE: (WireType.BYTE, frozenset({CONNACK})),
    P.SHARED_SUBSCRIPTION_AVAILABLE: (WireType.BYTE, frozenset({CONNACK})),
}

# Identifiers that may appear more than once; all others more than once is a Protocol Error.
REPEATABLE = frozenset({P.USER_PROPERTY, P.SUBSCRIPTION_IDENTIFIER})

# Byte-valued properties whose only legal values are 0 and 1.
BOOLEAN = frozenset(
    {
        P.PAYLOAD_FORMAT_INDICATOR,
        P.REQUEST_PROBLEM_INFORMATION,
        P.REQUEST_RESPONSE_INFORMATION,
        P.MAXIMUM_QOS,
        P.RETAIN_AVAILABLE,
        P.WILDCARD_SUBSCRIPTION_AVAILABLE,
        P.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        P.SHARED_SUBSCRIPTION_AVAILABLE,
    }
)

# Properties for which a value of 0 is a Protocol Error.
NONZERO = frozenset(
    {P.RECEIVE_MAXIMUM, P.MAXIMUM_PACKET_SIZE, P.TOPIC_ALIAS, P.SUBSCRIPTION_IDENTIFIER}
)


class UserProperties(Sequence[tuple[str, str]]):
    """Decoded User Properties (0x26), kept as their wire encoding and read on demand.

    A pair of empty strings is 5 bytes on the wire but a tuple and a list slot (64 bytes)
    once decoded, so a packet of them grew 13-fold in memory.  The decoder validates every
    string, then keeps the encoded entries (identifier byte included) as one ``bytes``: a
    retained or queued message costs what its user properties weigh on the wire, and the
    broker forwards them unchanged and in order (MQTT-3.3.2-17, MQTT-3.3.2-18) by copying
    :attr:`wire` instead of encoding them again.  Iterating decodes the pairs each time.
    """

    __slots__ = ("_count", "wire")

    def __init__(self, wire: bytes, count: int) -> None:
        self.wire = wire  # entries as on the wire: 0x26, key length, key, value length, value
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[tuple[str, str]]:
        wire = self.wire
        pos = 0
        end = len(wire)
        while pos < end:
            kstop = pos + 3 + ((wire[pos + 1] << 8) | wire[pos + 2])
            vstop = kstop + 2 + ((wire[kstop] << 8) | wire[kstop + 1])
            yield wire[pos + 3 : kstop].decode(), wire[kstop + 2 : vstop].decode()
            pos = vstop

    @overload
    def __getitem__(self, index: int) -> tuple[str, str]: ...
    @overload
    def __getitem__(self, index: slice) -> list[tuple[str, str]]: ...
    def __getitem__(self, index: int | slice) -> tuple[str, str] | list[tuple[str, str]]:
        return list(self)[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, UserProperties):
            return self.wire == other.wire
        if isinstance(other, list | tuple):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-looking, like the list it stands for

    def __repr__(self) -> str:
        return f"UserProperties({list(self)!r})"
