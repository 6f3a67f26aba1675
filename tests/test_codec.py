"""Conformance tests for ``mqttproto.codec`` against the MQTT 3.1.1 and 5.0 specifications.

Normative statements are cited by their identifiers.  The same number can mean different
things in the two specifications, so each citation says which one: "3.1.1 MQTT-3.8.3-3" or
"5.0 MQTT-3.8.3-5".  Malformed input is built byte by byte in this file (not with the
encoder under test), and every rejection is checked for its exception class *and* the MQTT 5
reason code the connection is to be closed with (section 4.13).

The last part drives a real paho-mqtt client (v3.1.1 and v5) against a tiny asyncio server
that speaks through our codec: our decoder reads what paho writes, paho reads what our
encoder writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import random
import struct
from collections.abc import Callable
from typing import Any

import pytest

from mqttproto.codec import (
    MAX_REMAINING_LENGTH,
    PacketReader,
    encode,
    encode_properties,
    encode_publish,
    encode_varint,
)
from mqttproto.errors import (
    MalformedPacket,
    MQTTError,
    PacketTooLarge,
    ProtocolError,
    UnsupportedProtocolVersion,
)
from mqttproto.packets import (
    MQTT_3_1,
    MQTT_3_1_1,
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)
from mqttproto.properties import SPEC, WILL, Properties, PropertyId, WireType
from mqttproto.reasons import ReasonCode, connack_code_311, suback_code_311

P = PropertyId
V4 = MQTT_3_1_1
V5 = MQTT_5

# The reason code each error class must carry, spelled out rather than read from the class.
REASON = {
    MalformedPacket: 0x81,
    ProtocolError: 0x82,
    UnsupportedProtocolVersion: 0x84,
    PacketTooLarge: 0x95,
}

# --------------------------------------------------------------------------- raw builders
# Deliberately independent of the encoder under test.


def vbi(n: int) -> bytes:
    """Variable Byte Integer, the algorithm of 5.0 section 1.5.5."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def u16(n: int) -> bytes:
    return struct.pack("!H", n)


def u32(n: int) -> bytes:
    return struct.pack("!I", n)


def s(text: str | bytes) -> bytes:
    """A length-prefixed UTF-8 string (or binary data, given bytes)."""
    data = text.encode() if isinstance(text, str) else text
    return u16(len(data)) + data


def pkt(first: int, body: bytes) -> bytes:
    return bytes((first,)) + vbi(len(body)) + body


def props(*items: bytes) -> bytes:
    """A property section: Property Length, then the properties."""
    data = b"".join(items)
    return vbi(len(data)) + data


def prop(pid: int, value: Any) -> bytes:
    """One property, its value encoded by the wire type from the 5.0 table below."""
    return vbi(pid) + raw_value(TABLE_2_4[pid][0], value)


def raw_value(wire: str, value: Any) -> bytes:
    if wire == "byte":
        return bytes((value,))
    if wire == "u16":
        return u16(value)
    if wire == "u32":
        return u32(value)
    if wire == "vbi":
        return vbi(value)
    if wire in ("utf8", "binary"):
        return s(value)
    key, val = value
    return s(key) + s(val)


def raw_connect(
    version: int = V5,
    *,
    name: bytes | None = None,
    flags: int | None = None,
    keep_alive: int = 60,
    properties: bytes = b"\x00",
    client_id: bytes | str = b"cid",
    will: tuple[bytes | str, bytes] | None = None,
    will_properties: bytes = b"\x00",
    username: bytes | str | None = None,
    password: bytes | None = None,
    trailer: bytes = b"",
) -> bytes:
    if name is None:
        name = b"MQIsdp" if version == MQTT_3_1 else b"MQTT"
    if flags is None:
        flags = 0x02
        flags |= 0x04 if will is not None else 0
        flags |= 0x80 if username is not None else 0
        flags |= 0x40 if password is not None else 0
    body = s(name) + bytes((version, flags)) + u16(keep_alive)
    if version == V5:
        body += properties
    body += s(client_id)
    if will is not None:
        if version == V5:
            body += will_properties
        body += s(will[0]) + s(will[1])
    if username is not None:
        body += s(username)
    if password is not None:
        body += s(password)
    return pkt(0x10, body + trailer)


CONNECT_V4 = raw_connect(V4)
CONNECT_V5 = raw_connect(V5)

# A minimal valid body for every packet type, per version (used where only the fixed header
# or the position of the packet in the connection is under test).
MINIMAL_BODY: dict[int, dict[int, bytes]] = {
    V4: {
        2: b"\x00\x00",
        3: s("t"),
        4: u16(1),
        5: u16(1),
        6: u16(1),
        7: u16(1),
        8: u16(1) + s("t") + b"\x01",
        9: u16(1) + b"\x01",
        10: u16(1) + s("t"),
        11: u16(1),
        12: b"",
        13: b"",
        14: b"",
    },
    V5: {
        2: b"\x00\x00\x00",
        3: s("t") + b"\x00",
        4: u16(1),
        5: u16(1),
        6: u16(1),
        7: u16(1),
        8: u16(1) + b"\x00" + s("t") + b"\x01",
        9: u16(1) + b"\x00\x01",
        10: u16(1) + b"\x00" + s("t"),
        11: u16(1) + b"\x00\x00",
        12: b"",
        13: b"",
        14: b"",
        15: b"",
    },
}
# Fixed-header flags: 5.0 Table 2-2 / 3.1.1 Table 2.2.
REQUIRED_FLAGS = {t: 0 for t in range(1, 16)} | {6: 0b0010, 8: 0b0010, 10: 0b0010}


# --------------------------------------------------------------------------- helpers


def reader_for(version: int | None) -> PacketReader:
    """A server-side reader before CONNECT (None) or a reader on an established connection."""
    return PacketReader(version=version)


def decode_one(data: bytes, version: int | None) -> Packet:
    reader = reader_for(version)
    packets = reader.feed(data)
    assert len(packets) == 1, packets
    assert reader.buffered == 0
    return packets[0]


def expect_error(
    data: bytes,
    version: int | None,
    error: type[MQTTError],
    *,
    at_end: bool = True,
    reader_factory: Callable[[], PacketReader] | None = None,
) -> MQTTError:
    """``data`` must be rejected with ``error`` and its reason code, whole or byte by byte.

    Fed byte by byte, an error in the body surfaces exactly when the last byte arrives
    (``at_end``): the reader neither raises on a packet it has not seen all of nor sits on a
    complete one.  Either way the reader drops its buffer.
    """
    make = reader_factory or (lambda: reader_for(version))
    reader = make()
    with pytest.raises(error) as info:
        reader.feed(data)
    assert type(info.value) is error, repr(info.value)
    assert info.value.reason_code == REASON[error]
    assert int(info.value.reason_code) == REASON[error]
    assert reader.buffered == 0

    reader = make()
    raised_at = None
    for i in range(len(data)):
        try:
            assert reader.feed(data[i : i + 1]) == []
        except MQTTError as exc:
            assert type(exc) is error
            raised_at = i
            break
    assert raised_at is not None, "byte-by-byte feeding never raised"
    if at_end:
        assert raised_at == len(data) - 1
    assert reader.buffered == 0
    return info.value


def feed_in_chunks(reader: PacketReader, data: bytes, sizes: list[int]) -> list[Packet]:
    out: list[Packet] = []
    pos = 0
    for size in sizes:
        out += reader.feed(data[pos : pos + size])
        pos += size
    out += reader.feed(data[pos:])
    return out


# --------------------------------------------------------------------------- 5.0 Table 2-4
# Property identifiers, wire types and the packets each may appear in, transcribed from the
# 5.0 specification (section 2.2.2.2).  WILL (0) stands for the Will Properties.

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, DISCONNECT, AUTH = 8, 9, 10, 11, 14, 15
CARRIERS = (WILL, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 14, 15)  # everything with properties

TABLE_2_4: dict[int, tuple[str, frozenset[int]]] = {
    0x01: ("byte", frozenset({PUBLISH, WILL})),
    0x02: ("u32", frozenset({PUBLISH, WILL})),
    0x03: ("utf8", frozenset({PUBLISH, WILL})),
    0x08: ("utf8", frozenset({PUBLISH, WILL})),
    0x09: ("binary", frozenset({PUBLISH, WILL})),
    0x0B: ("vbi", frozenset({PUBLISH, SUBSCRIBE})),
    0x11: ("u32", frozenset({CONNECT, CONNACK, DISCONNECT})),
    0x12: ("utf8", frozenset({CONNACK})),
    0x13: ("u16", frozenset({CONNACK})),
    0x15: ("utf8", frozenset({CONNECT, CONNACK, AUTH})),
    0x16: ("binary", frozenset({CONNECT, CONNACK, AUTH})),
    0x17: ("byte", frozenset({CONNECT})),
    0x18: ("u32", frozenset({WILL})),
    0x19: ("byte", frozenset({CONNECT})),
    0x1A: ("utf8", frozenset({CONNACK})),
    0x1C: ("utf8", frozenset({CONNACK, DISCONNECT})),
    0x1F: (
        "utf8",
        frozenset({CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, DISCONNECT, AUTH}),
    ),
    0x21: ("u16", frozenset({CONNECT, CONNACK})),
    0x22: ("u16", frozenset({CONNECT, CONNACK})),
    0x23: ("u16", frozenset({PUBLISH})),
    0x24: ("byte", frozenset({CONNACK})),
    0x25: ("byte", frozenset({CONNACK})),
    0x26: ("pair", frozenset(CARRIERS)),
    0x27: ("u32", frozenset({CONNECT, CONNACK})),
    0x28: ("byte", frozenset({CONNACK})),
    0x29: ("byte", frozenset({CONNACK})),
    0x2A: ("byte", frozenset({CONNACK})),
}
_WIRE_NAMES = {
    WireType.BYTE: "byte",
    WireType.UINT16: "u16",
    WireType.UINT32: "u32",
    WireType.VARINT: "vbi",
    WireType.UTF8: "utf8",
    WireType.BINARY: "binary",
    WireType.UTF8_PAIR: "pair",
}

# One valid wire value per property (lists for the two that may repeat).
VALUE: dict[int, Any] = {
    P.PAYLOAD_FORMAT_INDICATOR: 1,
    P.MESSAGE_EXPIRY_INTERVAL: 86_400,
    P.CONTENT_TYPE: "application/json; charset=utf-8",
    P.RESPONSE_TOPIC: "reply/to/ü",
    P.CORRELATION_DATA: b"\x00\x01\xffcorr",
    P.SUBSCRIPTION_IDENTIFIER: 268_435_455,
    P.SESSION_EXPIRY_INTERVAL: 0xFFFF_FFFF,
    P.ASSIGNED_CLIENT_IDENTIFIER: "auto-7f3a",
    P.SERVER_KEEP_ALIVE: 120,
    P.AUTHENTICATION_METHOD: "SCRAM-SHA-256",
    P.AUTHENTICATION_DATA: b"\x00n,,n=user,r=nonce",
    P.REQUEST_PROBLEM_INFORMATION: 0,
    P.WILL_DELAY_INTERVAL: 30,
    P.REQUEST_RESPONSE_INFORMATION: 1,
    P.RESPONSE_INFORMATION: "responses/",
    P.SERVER_REFERENCE: "edge-2.example:8883",
    P.REASON_STRING: "because 💡",
    P.RECEIVE_MAXIMUM: 65_535,
    P.TOPIC_ALIAS_MAXIMUM: 32,
    P.TOPIC_ALIAS: 7,
    P.MAXIMUM_QOS: 1,
    P.RETAIN_AVAILABLE: 0,
    P.USER_PROPERTY: ("ключ", "värde"),
    P.MAXIMUM_PACKET_SIZE: 268_435_460,
    P.WILDCARD_SUBSCRIPTION_AVAILABLE: 1,
    P.SUBSCRIPTION_IDENTIFIER_AVAILABLE: 0,
    P.SHARED_SUBSCRIPTION_AVAILABLE: 1,
}
REPEATABLE = {P.USER_PROPERTY, P.SUBSCRIPTION_IDENTIFIER}
USER_PROPS = [("k", "v"), ("k", "v2"), ("", ""), ("ключ", "värde ✓")]


def all_props(carrier: int) -> Properties:
    """Every property the 5.0 specification allows in ``carrier``, with valid values."""
    out: Properties = {}
    for pid, (_, where) in TABLE_2_4.items():
        if carrier in where:
            out[pid] = [VALUE[pid]] if pid in REPEATABLE else VALUE[pid]
    if P.USER_PROPERTY in out:
        out[P.USER_PROPERTY] = list(USER_PROPS)
    if carrier == PUBLISH:  # a server forwards one identifier per matching subscription
        out[P.SUBSCRIPTION_IDENTIFIER] = [1, 127, 128, 16_384, 268_435_455]
    return out


def test_property_table_matches_specification() -> None:
    """properties.SPEC is 5.0 Table 2-4: identifiers, data types and allowed packets."""
    assert set(SPEC) == set(TABLE_2_4)
    assert {int(p) for p in PropertyId} == set(TABLE_2_4)
    for pid, (wire, where) in TABLE_2_4.items():
        spec_wire, spec_where = SPEC[pid]
        assert _WIRE_NAMES[spec_wire] == wire, hex(pid)
        assert spec_where & set(CARRIERS) == where, hex(pid)


# --------------------------------------------------------------------------- 1.5.5 varint


@pytest.mark.parametrize(
    ("value", "wire"),
    [  # 5.0 Table 1-1 / 3.1.1 Table 2.4: the boundaries of each encoded size
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_151, b"\xff\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (268_435_455, b"\xff\xff\xff\x7f"),
    ],
)
def test_varint_table(value: int, wire: bytes) -> None:
    assert encode_varint(value) == wire
    assert vbi(value) == wire


@pytest.mark.parametrize("value", [-1, MAX_REMAINING_LENGTH + 1, 2**32])
def test_varint_out_of_range_is_refused_by_the_encoder(value: int) -> None:
    with pytest.raises(ValueError):
        encode_varint(value)


@pytest.mark.parametrize(
    "length",
    [b"\x80\x00", b"\x81\x00", b"\xff\x80\x00", b"\x80\x80\x00", b"\xff\xff\x80\x00"],
)
def test_remaining_length_not_minimal_is_malformed_mqtt_1_5_5_1(length: bytes) -> None:
    """5.0 MQTT-1.5.5-1: the encoded value MUST use the minimum number of bytes."""
    expect_error(b"\x30" + length, V5, MalformedPacket)


@pytest.mark.parametrize("version", [V4, V5, None])
def test_five_byte_remaining_length_is_malformed(version: int | None) -> None:
    """5.0 1.5.5 / 3.1.1 2.2.3: at most four bytes; a fifth is a Malformed Packet."""
    for first in (0x30, 0x10, 0xC0):
        data = bytes((first,)) + b"\xff\xff\xff\xff\x7f"
        expect_error(data, version, MalformedPacket, at_end=False)
        # Raised as soon as the fourth length byte says "more follows", before any body.
        reader = reader_for(version)
        with pytest.raises(MalformedPacket):
            reader.feed(data[:5])


def test_largest_remaining_length_is_accepted_and_awaited() -> None:
    reader = PacketReader(version=V5)
    assert reader.feed(b"\x30\xff\xff\xff\x7f") == []
    assert reader.buffered == 5


def test_property_length_and_subscription_identifier_not_minimal_mqtt_1_5_5_1() -> None:
    body = s("t") + b"\x80\x00"  # Property Length 0 in two bytes
    expect_error(pkt(0x30, body), V5, MalformedPacket)
    body = s("t") + props(vbi(0x0B) + b"\x81\x00")  # Subscription Identifier 1 in two bytes
    expect_error(pkt(0x30, body), V5, MalformedPacket)
    body = s("t") + props(vbi(0x0B) + b"\xff\xff\xff\xff\x01")  # five bytes
    expect_error(pkt(0x30, body), V5, MalformedPacket)
    body = s("t") + props(b"\x8b\x00" + b"\x01")  # identifier 0x0B in two bytes
    expect_error(pkt(0x30, body), V5, MalformedPacket)


# --------------------------------------------------------------------------- fixed header


def _fixed_header_cases() -> list[tuple[int, int, int]]:
    cases = []
    for version in (V4, V5):
        for kind in MINIMAL_BODY[version]:
            if kind == PUBLISH:
                continue
            for flags in range(16):
                if flags != REQUIRED_FLAGS[kind]:
                    cases.append((version, kind, flags))
    return cases


@pytest.mark.parametrize(("version", "kind", "flags"), _fixed_header_cases())
def test_reserved_fixed_header_flags_mqtt_2_1_3_1(version: int, kind: int, flags: int) -> None:
    """5.0 MQTT-2.1.3-1 / 3.1.1 MQTT-2.2.2-1 and -2: a reserved flag value that is not the
    one in the table is a Malformed Packet (includes 5.0/3.1.1 MQTT-3.6.1-1, MQTT-3.8.1-1,
    MQTT-3.10.1-1 for PUBREL, SUBSCRIBE and UNSUBSCRIBE)."""
    if kind == CONNECT:
        body = raw_connect(version)[2:]
        expect_error(pkt(0x10 | flags, body), None, MalformedPacket)
    else:
        expect_error(pkt(kind << 4 | flags, MINIMAL_BODY[version][kind]), version, MalformedPacket)


@pytest.mark.parametrize("version", [V4, V5])
def test_required_fixed_header_flags_are_accepted(version: int) -> None:
    assert isinstance(decode_one(raw_connect(version), None), Connect)
    for kind, body in MINIMAL_BODY[version].items():
        packet = decode_one(pkt(kind << 4 | REQUIRED_FLAGS[kind], body), version)
        assert packet.type == kind


@pytest.mark.parametrize("version", [V4, V5, None])
def test_reserved_packet_type_0_is_malformed(version: int | None) -> None:
    expect_error(b"\x00\x00", version, MalformedPacket)


def test_auth_does_not_exist_in_3_1_1() -> None:
    expect_error(b"\xf0\x00", V4, MalformedPacket)
    with pytest.raises(ValueError):
        encode(Auth(), V4)


# --------------------------------------------------------------------------- PUBLISH flags


@pytest.mark.parametrize("version", [V4, V5])
@pytest.mark.parametrize("flags", [0b0110, 0b0111, 0b1110, 0b1111])
def test_publish_qos_3_is_malformed_mqtt_3_3_1_4(version: int, flags: int) -> None:
    """5.0/3.1.1 MQTT-3.3.1-4: a PUBLISH MUST NOT have both QoS bits set."""
    body = s("a/b") + u16(1) + (b"\x00" if version == V5 else b"") + b"payload"
    expect_error(pkt(0x30 | flags, body), version, MalformedPacket)


@pytest.mark.parametrize("version", [V4, V5])
@pytest.mark.parametrize("retain", [0, 1])
def test_dup_on_qos_0_is_malformed_mqtt_3_3_1_2(version: int, retain: int) -> None:
    """5.0/3.1.1 MQTT-3.3.1-2: the DUP flag MUST be 0 for all QoS 0 messages."""
    body = s("a/b") + (b"\x00" if version == V5 else b"") + b"payload"
    expect_error(pkt(0x38 | retain, body), version, MalformedPacket)


@pytest.mark.parametrize("version", [V4, V5])
def test_publish_flags_decode(version: int) -> None:
    pp = b"\x00" if version == V5 else b""
    for qos in (0, 1, 2):
        for dup in (False, True) if qos else (False,):
            for retain in (False, True):
                first = 0x30 | dup << 3 | qos << 1 | retain
                body = s("a/b") + (u16(9) if qos else b"") + pp + b"x"
                packet = decode_one(pkt(first, body), version)
                assert packet == Publish("a/b", b"x", qos, retain, dup, 9 if qos else None)


# --------------------------------------------------------------------------- packet ids


def _packet_id_zero_cases() -> list[tuple[int, bytes]]:
    cases = []
    for version in (V4, V5):
        pp = b"\x00" if version == V5 else b""
        cases += [
            (version, pkt(0x32, s("t") + u16(0) + pp)),
            (version, pkt(0x34, s("t") + u16(0) + pp)),
            (version, pkt(0x82, u16(0) + pp + s("t") + b"\x00")),
            (version, pkt(0xA2, u16(0) + pp + s("t"))),
            (version, pkt(0x40, u16(0))),
            (version, pkt(0x50, u16(0))),
            (version, pkt(0x62, u16(0))),
            (version, pkt(0x70, u16(0))),
            (version, pkt(0x90, u16(0) + pp + b"\x00")),
            (version, pkt(0xB0, u16(0) + (pp + b"\x00" if version == V5 else b""))),
        ]
    return cases


@pytest.mark.parametrize(("version", "data"), _packet_id_zero_cases())
def test_packet_identifier_zero_is_a_protocol_error_mqtt_2_2_1_3(version: int, data: bytes) -> None:
    """5.0 MQTT-2.2.1-3 / 3.1.1 MQTT-2.3.1-1: SUBSCRIBE, UNSUBSCRIBE and QoS>0 PUBLISH MUST
    carry a non-zero Packet Identifier (and their acknowledgements echo it)."""
    expect_error(data, version, ProtocolError)


# --------------------------------------------------------------------------- UTF-8 strings

BAD_UTF8 = [
    pytest.param(b"\xff", id="invalid-byte"),
    pytest.param(b"a\xc3", id="truncated-sequence"),
    pytest.param(b"\xc0\xaf", id="overlong-slash"),
    pytest.param(b"\xe0\x80\xaf", id="overlong-3-byte"),
    pytest.param(b"\xed\xa0\x80", id="surrogate-D800"),
    pytest.param(b"\xed\xbf\xbf", id="surrogate-DFFF"),
    pytest.param(b"\xed\xa0\xbd\xed\xb2\xa1", id="cesu8-surrogate-pair"),
    pytest.param(b"\xf4\x90\x80\x80", id="above-10FFFF"),
    pytest.param(b"a\x00b", id="U+0000"),
    pytest.param(b"\x00", id="only-U+0000"),
]


def _utf8_sites(bad: bytes) -> list[tuple[str, int | None, bytes]]:
    """Every place a UTF-8 string is read, with ``bad`` in it."""
    return [
        ("PUBLISH v4 topic", V4, pkt(0x30, s(bad) + b"x")),
        ("PUBLISH v5 topic", V5, pkt(0x30, s(bad) + b"\x00x")),
        ("PUBLISH v5 qos1 topic", V5, pkt(0x32, s(bad) + u16(1) + b"\x00x")),
        ("CONNECT v4 client id", None, raw_connect(V4, client_id=bad)),
        ("CONNECT v5 client id", None, raw_connect(V5, client_id=bad)),
        ("CONNECT v4 will topic", None, raw_connect(V4, will=(bad, b"x"))),
        ("CONNECT v5 will topic", None, raw_connect(V5, will=(bad, b"x"))),
        ("CONNECT v4 user name", None, raw_connect(V4, username=bad)),
        ("CONNECT v5 user name", None, raw_connect(V5, username=bad)),
        ("SUBSCRIBE v4 filter", V4, pkt(0x82, u16(1) + s(bad) + b"\x00")),
        ("SUBSCRIBE v5 filter", V5, pkt(0x82, u16(1) + b"\x00" + s(bad) + b"\x00")),
        ("UNSUBSCRIBE v4 filter", V4, pkt(0xA2, u16(1) + s(bad))),
        ("UNSUBSCRIBE v5 filter", V5, pkt(0xA2, u16(1) + b"\x00" + s(bad))),
        ("user property key", V5, pkt(0xE0, b"\x00" + props(b"\x26" + s(bad) + s("v")))),
        ("user property value", V5, pkt(0xE0, b"\x00" + props(b"\x26" + s("k") + s(bad)))),
        ("reason string", V5, pkt(0x40, u16(1) + b"\x00" + props(b"\x1f" + s(bad)))),
        ("content type", V5, pkt(0x30, s("t") + props(b"\x03" + s(bad)))),
        (
            "will content type",
            None,
            raw_connect(V5, will=("t", b""), will_properties=props(b"\x03" + s(bad))),
        ),
        ("auth method", V5, pkt(0xF0, b"\x18" + props(b"\x15" + s(bad)))),
    ]


@pytest.mark.parametrize("bad", BAD_UTF8)
def test_ill_formed_utf8_is_malformed_mqtt_1_5_4_1_and_2(bad: bytes) -> None:
    """5.0 MQTT-1.5.4-1 (well-formed, no surrogate code points), MQTT-1.5.4-2 (no U+0000),
    MQTT-1.5.7-1 (both strings of a pair), 3.1.1 MQTT-1.5.3-1/-2: a Malformed Packet."""
    for site, version, data in _utf8_sites(bad):
        try:
            expect_error(data, version, MalformedPacket)
        except AssertionError as exc:  # pragma: no cover - message only
            raise AssertionError(f"{site}: {exc}") from exc


@pytest.mark.parametrize("version", [V4, V5])
def test_bom_is_not_stripped_mqtt_1_5_4_3(version: int) -> None:
    """5.0 MQTT-1.5.4-3 / 3.1.1 MQTT-1.5.3-3: 0xEF 0xBB 0xBF is U+FEFF and is kept."""
    pp = b"\x00" if version == V5 else b""
    packet = decode_one(pkt(0x30, s(b"\xef\xbb\xbfa/b") + pp), version)
    assert isinstance(packet, Publish)
    assert packet.topic == "\ufeffa/b"


def test_string_running_past_the_packet_is_malformed() -> None:
    expect_error(pkt(0x30, u16(10) + b"abc"), V4, MalformedPacket)
    expect_error(pkt(0x30, b"\x00"), V4, MalformedPacket)
    expect_error(pkt(0x30, b""), V5, MalformedPacket)


# --------------------------------------------------------------------------- CONNECT


@pytest.mark.parametrize(
    ("version", "kind"), [(v, k) for v in (V4, V5) for k in MINIMAL_BODY[v] if k != CONNECT]
)
def test_first_packet_must_be_connect_mqtt_3_1_0_1(version: int, kind: int) -> None:
    """5.0/3.1.1 MQTT-3.1.0-1: the first packet from the Client MUST be CONNECT; any other
    is a Protocol Error."""
    body = MINIMAL_BODY[version][kind]
    expect_error(pkt(kind << 4 | REQUIRED_FLAGS[kind], body), None, ProtocolError)


@pytest.mark.parametrize("version", [MQTT_3_1, V4, V5])
def test_second_connect_is_a_protocol_error_mqtt_3_1_0_2(version: int) -> None:
    """5.0/3.1.1 MQTT-3.1.0-2: a second CONNECT is a Protocol Error."""
    reader = PacketReader()
    [connect] = reader.feed(raw_connect(version))
    assert isinstance(connect, Connect)
    assert reader.version == version
    with pytest.raises(ProtocolError) as info:
        reader.feed(raw_connect(version))
    assert info.value.reason_code == 0x82

    # Byte by byte on a connected reader, and a CONNECT to a client-side reader.
    def connected() -> PacketReader:
        reader = PacketReader()
        reader.feed(raw_connect(version))
        return reader

    expect_error(raw_connect(version), None, ProtocolError, reader_factory=connected)
    expect_error(raw_connect(version), version, ProtocolError)


@pytest.mark.parametrize(
    "name", [b"MQTX", b"mqtt", b"MQ", b"", b"MQTT\x00", b"HTTP/1.1", b"MQIsdp!"]
)
@pytest.mark.parametrize("version", [V4, V5])
def test_unknown_protocol_name_mqtt_3_1_2_1(name: bytes, version: int) -> None:
    """5.0 MQTT-3.1.2-1: the name MUST be "MQTT"; a Server MAY answer CONNACK 0x84
    (Unsupported Protocol Version) and MUST close.  3.1.1 MQTT-3.1.2-1: MAY disconnect and
    MUST NOT go on processing the packet as MQTT."""
    exc = expect_error(raw_connect(version, name=name), None, UnsupportedProtocolVersion)
    assert isinstance(exc, UnsupportedProtocolVersion)
    assert exc.protocol_level == version  # lets a server pick the CONNACK format
    reader = PacketReader()
    with pytest.raises(UnsupportedProtocolVersion):
        reader.feed(raw_connect(version, name=name))
    assert reader.version is None  # nothing was learnt from it


@pytest.mark.parametrize(
    ("name", "level"),
    [
        (b"MQTT", 0),
        (b"MQTT", 1),
        (b"MQTT", 2),
        (b"MQTT", 6),
        (b"MQTT", 0x83),  # 3.1.1 bridge bit on level 3
        (b"MQTT", 0x84),  # bridge bit on level 4
        (b"MQTT", 255),
        (b"MQTT", MQTT_3_1),  # 3.1 uses "MQIsdp"
        (b"MQIsdp", MQTT_3_1_1),
        (b"MQIsdp", MQTT_5),
    ],
)
def test_unsupported_protocol_level_mqtt_3_1_2_2(name: bytes, level: int) -> None:
    """5.0 MQTT-3.1.2-2: an unsupported Protocol Version gets CONNACK 0x84; 3.1.1
    MQTT-3.1.2-2: return code 0x01 (see the CONNACK mapping below).  The rest of the packet
    cannot be parsed without knowing the version, so this check comes first."""
    body = s(name) + bytes((level, 0x02)) + u16(60) + s("cid")
    exc = expect_error(pkt(0x10, body), None, UnsupportedProtocolVersion)
    assert isinstance(exc, UnsupportedProtocolVersion)
    assert exc.protocol_level == level
    # ...even when the rest of the packet would be garbage for that version.
    body = s(name) + bytes((level, 0xFF)) + u16(60)
    expect_error(pkt(0x10, body), None, UnsupportedProtocolVersion)


def test_mqtt_3_1_is_accepted() -> None:
    packet = decode_one(raw_connect(MQTT_3_1, client_id="old-client"), None)
    assert packet == Connect("old-client", MQTT_3_1, True, 60)


@pytest.mark.parametrize("version", [MQTT_3_1, V4, V5])
def test_connect_reserved_flag_mqtt_3_1_2_3(version: int) -> None:
    """5.0/3.1.1 MQTT-3.1.2-3: the reserved Connect Flag MUST be 0 (else Malformed)."""
    expect_error(raw_connect(version, flags=0x03), None, MalformedPacket)


@pytest.mark.parametrize("version", [V4, V5])
@pytest.mark.parametrize(
    "flags",
    [
        pytest.param(0x02 | 0x08, id="will-qos-1"),
        pytest.param(0x02 | 0x10, id="will-qos-2"),
        pytest.param(0x02 | 0x18, id="will-qos-3"),
        pytest.param(0x02 | 0x20, id="will-retain"),
        pytest.param(0x02 | 0x28, id="will-qos-1-retain"),
    ],
)
def test_will_flags_without_will_mqtt_3_1_2_11_13_15(version: int, flags: int) -> None:
    """3.1.1 MQTT-3.1.2-11/-13/-15 and 5.0 MQTT-3.1.2-11/-13: with the Will Flag 0, Will
    QoS and Will Retain MUST be 0."""
    expect_error(raw_connect(version, flags=flags), None, MalformedPacket)


@pytest.mark.parametrize("version", [V4, V5])
def test_will_qos_3_mqtt_3_1_2_14(version: int) -> None:
    """3.1.1 MQTT-3.1.2-14 / 5.0 MQTT-3.1.2-12: Will QoS 3 is a Malformed Packet."""
    data = raw_connect(version, flags=0x02 | 0x04 | 0x18, will=("w", b"x"))
    expect_error(data, None, MalformedPacket)


@pytest.mark.parametrize("version", [MQTT_3_1, V4])
def test_password_without_user_name_3_1_1_mqtt_3_1_2_22(version: int) -> None:
    """3.1.1 MQTT-3.1.2-22: if the User Name Flag is 0 the Password Flag MUST be 0."""
    expect_error(raw_connect(version, password=b"secret"), None, MalformedPacket)


def test_password_without_user_name_is_allowed_in_5() -> None:
    """5.0 3.1.2.9 dropped that rule: a password alone is fine."""
    packet = decode_one(raw_connect(V5, password=b"secret"), None)
    assert packet == Connect("cid", V5, password=b"secret")


@pytest.mark.parametrize("version", [V4, V5])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"will": ("w", b"x")},
        {"username": "u"},
        {"username": "u", "password": b"p"},
        {"will": ("w", b"x"), "username": "u", "password": b"p"},
    ],
)
def test_connect_with_trailing_bytes_is_malformed(version: int, kwargs: dict[str, Any]) -> None:
    expect_error(raw_connect(version, trailer=b"\x00", **kwargs), None, MalformedPacket)


@pytest.mark.parametrize("version", [V4, V5])
@pytest.mark.parametrize(
    "field",
    [
        pytest.param(0x80, id="user-name-flag-without-user-name"),
        pytest.param(0xC0, id="password-flag-without-password"),
        pytest.param(0x04, id="will-flag-without-will"),
    ],
)
def test_connect_missing_payload_fields_is_malformed(version: int, field: int) -> None:
    """A flag promising a payload field that the packet does not hold."""
    expect_error(raw_connect(version, flags=0x02 | field), None, MalformedPacket)


def test_connect_truncated_variable_header_is_malformed() -> None:
    expect_error(pkt(0x10, s("MQTT") + b"\x05\x02\x00"), None, MalformedPacket)
    expect_error(pkt(0x10, s("MQTT")), None, MalformedPacket)
    expect_error(pkt(0x10, b"\x00"), None, MalformedPacket)
    expect_error(pkt(0x10, b""), None, MalformedPacket)
    # v5 without the Property Length (5.0 MQTT-2.2.2-1: zero properties is a 0 byte).
    expect_error(pkt(0x10, s("MQTT") + b"\x05\x02\x00\x3c"), None, MalformedPacket)


def test_version_is_learnt_from_connect_only() -> None:
    reader = PacketReader()
    assert reader.version is None
    with pytest.raises(MalformedPacket):
        reader.feed(raw_connect(V5, flags=0x03))
    assert reader.version is None
    reader = PacketReader()
    reader.feed(raw_connect(V4))
    assert reader.version == V4
    # ...and the rest of the connection is then read as 3.1.1 (no property sections).
    assert reader.feed(pkt(0x30, s("t") + b"\x00")) == [Publish("t", b"\x00")]


# --------------------------------------------------------------------------- SUBSCRIBE


@pytest.mark.parametrize("version", [V4, V5])
def test_subscribe_without_topic_filters_mqtt_3_8_3_3(version: int) -> None:
    """3.1.1 MQTT-3.8.3-3 / 5.0 MQTT-3.8.3-2: at least one Topic Filter; a SUBSCRIBE with
    no payload is a Protocol Error."""
    pp = b"\x00" if version == V5 else b""
    expect_error(pkt(0x82, u16(1) + pp), version, ProtocolError)
    if version == V5:
        expect_error(pkt(0x82, u16(1) + props(prop(0x0B, 5))), version, ProtocolError)


@pytest.mark.parametrize("options", [0x40, 0x80, 0xC0, 0xC1, 0x6D])
def test_subscribe_options_reserved_bits_v5_mqtt_3_8_3_5(options: int) -> None:
    """5.0 MQTT-3.8.3-5: reserved bits 6 and 7 of Subscription Options non-zero: Malformed."""
    body = u16(1) + b"\x00" + s("a/b") + b"\x01" + s("c") + bytes((options,))
    expect_error(pkt(0x82, body), V5, MalformedPacket)


@pytest.mark.parametrize("options", [0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFC, 0x05])
def test_subscribe_reserved_bits_3_1_1_mqtt_3_8_3_4(options: int) -> None:
    """3.1.1 MQTT-3.8.3-4: bits 7-2 of the Requested QoS byte are reserved: Malformed.
    (In 3.1.1 the No Local / Retain bits of 5.0 do not exist.)"""
    body = u16(1) + s("a/b") + bytes((options,))
    expect_error(pkt(0x82, body), V4, MalformedPacket)


@pytest.mark.parametrize("version", [V4, V5])
def test_subscribe_qos_3_is_malformed(version: int) -> None:
    """3.1.1 MQTT-3.8.3-4 / 5.0 3.8.3.1: a Maximum QoS of 3 is a Malformed Packet."""
    pp = b"\x00" if version == V5 else b""
    expect_error(pkt(0x82, u16(1) + pp + s("a/b") + b"\x03"), version, MalformedPacket)


def test_retain_handling_3_is_a_protocol_error() -> None:
    """5.0 3.8.3.1: it is a Protocol Error to send a Retain Handling value of 3."""
    expect_error(pkt(0x82, u16(1) + b"\x00" + s("a/b") + b"\x30"), V5, ProtocolError)


def test_no_local_on_a_shared_subscription_mqtt_3_8_3_4() -> None:
    """5.0 MQTT-3.8.3-4: No Local set on a Shared Subscription is a Protocol Error."""
    body = u16(1) + b"\x00" + s("$share/g/a/b") + b"\x05"
    expect_error(pkt(0x82, body), V5, ProtocolError)
    ok = decode_one(pkt(0x82, u16(1) + b"\x00" + s("$share/g/a/b") + b"\x01"), V5)
    assert ok == Subscribe(1, [Subscription("$share/g/a/b", 1)])


def test_subscribe_options_decode() -> None:
    body = u16(7) + b"\x00"
    expected = []
    for qos in range(3):
        for nl in (0, 1):
            for rap in (0, 1):
                for rh in range(3):
                    name = f"f/{qos}{nl}{rap}{rh}"
                    body += s(name) + bytes((rh << 4 | rap << 3 | nl << 2 | qos,))
                    expected.append(Subscription(name, qos, bool(nl), bool(rap), rh))
    assert decode_one(pkt(0x82, body), V5) == Subscribe(7, expected)


def test_subscribe_truncated_options_are_malformed() -> None:
    expect_error(pkt(0x82, u16(1) + b"\x00" + s("a/b")), V5, MalformedPacket)
    expect_error(pkt(0x82, u16(1) + s("a/b")), V4, MalformedPacket)
    expect_error(pkt(0x82, u16(1) + s("a/b") + b"\x00" + b"\x00"), V4, MalformedPacket)


def test_subscribe_subscription_identifier_rules() -> None:
    """5.0 3.8.2.1.2: value 1..268,435,455 (0 is a Protocol Error); more than once in a
    SUBSCRIBE is a Protocol Error."""
    tail = s("a/b") + b"\x00"
    ok = decode_one(pkt(0x82, u16(1) + props(prop(0x0B, 268_435_455)) + tail), V5)
    assert isinstance(ok, Subscribe)
    assert ok.properties == {P.SUBSCRIPTION_IDENTIFIER: [268_435_455]}
    expect_error(pkt(0x82, u16(1) + props(prop(0x0B, 0)) + tail), V5, ProtocolError)
    twice = props(prop(0x0B, 1), prop(0x0B, 2))
    expect_error(pkt(0x82, u16(1) + twice + tail), V5, ProtocolError)


# --------------------------------------------------------------------------- UNSUBSCRIBE


@pytest.mark.parametrize("version", [V4, V5])
def test_unsubscribe_without_topic_filters_mqtt_3_10_3_2(version: int) -> None:
    """5.0/3.1.1 MQTT-3.10.3-2: an UNSUBSCRIBE MUST contain at least one Topic Filter."""
    pp = b"\x00" if version == V5 else b""
    expect_error(pkt(0xA2, u16(1) + pp), version, ProtocolError)


def test_unsubscribe_truncated_filter_is_malformed() -> None:
    expect_error(pkt(0xA2, u16(1) + s("a/b") + b"\x00"), V4, MalformedPacket)
    expect_error(pkt(0xA2, u16(1) + b"\x00" + s("a/b") + b"\x00\x05ab"), V5, MalformedPacket)


# --------------------------------------------------------------------------- acknowledgements


@pytest.mark.parametrize("first", [0x40, 0x50, 0x62, 0x70])
def test_ack_forms(first: int) -> None:
    """5.0 3.4.2.1: Reason Code and Property Length may be omitted (code 0, no properties),
    and the Property Length alone may be omitted; 3.1.1 acks are exactly two bytes."""
    cls = {0x40: Puback, 0x50: Pubrec, 0x62: Pubrel, 0x70: Pubcomp}[first]
    code = 0x10 if first < 0x60 else 0x92  # No matching subscribers / Packet Id not found
    assert decode_one(pkt(first, u16(5)), V5) == cls(5)
    assert decode_one(pkt(first, u16(5) + bytes((code,))), V5) == cls(5, code)
    assert decode_one(pkt(first, u16(5) + bytes((code, 0))), V5) == cls(5, code)
    ps = props(prop(0x1F, "why"), prop(0x26, ("a", "b")))
    expected = cls(5, code, {P.REASON_STRING: "why", P.USER_PROPERTY: [("a", "b")]})
    assert decode_one(pkt(first, u16(5) + bytes((code,)) + ps), V5) == expected
    assert decode_one(pkt(first, u16(5)), V4) == cls(5)
    expect_error(pkt(first, b"\x00"), V4, MalformedPacket)
    expect_error(pkt(first, b""), V5, MalformedPacket)
    expect_error(pkt(first, u16(5) + b"\x00"), V4, MalformedPacket)  # trailing byte
    expect_error(pkt(first, u16(5) + b"\x00\x00\x00"), V5, MalformedPacket)
    expect_error(pkt(first, u16(5) + b"\x00\x05\x1f\x00"), V5, MalformedPacket)


# --------------------------------------------------------------------------- CONNACK


@pytest.mark.parametrize("version", [V4, V5])
@pytest.mark.parametrize("flags", [0x02, 0x80, 0xFE, 0x03])
def test_connack_reserved_flags_mqtt_3_2_2_1(version: int, flags: int) -> None:
    """5.0 MQTT-3.2.2-1 / 3.1.1 3.2.2.1: Connect Acknowledge Flags bits 7-1 are reserved."""
    pp = b"\x00" if version == V5 else b""
    expect_error(pkt(0x20, bytes((flags, 0)) + pp), version, MalformedPacket)


def test_connack_length_checks() -> None:
    expect_error(pkt(0x20, b"\x00"), V4, MalformedPacket)
    expect_error(pkt(0x20, b"\x00\x00\x00"), V4, MalformedPacket)
    expect_error(pkt(0x20, b"\x00\x00"), V5, MalformedPacket)  # no Property Length
    expect_error(pkt(0x20, b"\x00\x00\x00\x00"), V5, MalformedPacket)  # trailing byte


@pytest.mark.parametrize("code", [6, 0x80, 0xFF])
def test_connack_reserved_return_code_3_1_1(code: int) -> None:
    """3.1.1 3.2.2.3: return codes 6-255 are reserved."""
    expect_error(pkt(0x20, bytes((0, code))), V4, MalformedPacket)


# Table 3.1 (3.1.1) return codes and the MQTT 5 reason codes they stand for.
CONNACK_311 = [
    (ReasonCode.SUCCESS, 0),
    (ReasonCode.UNSUPPORTED_PROTOCOL_VERSION, 1),
    (ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, 2),
    (ReasonCode.SERVER_UNAVAILABLE, 3),
    (ReasonCode.BAD_USER_NAME_OR_PASSWORD, 4),
    (ReasonCode.NOT_AUTHORIZED, 5),
]
# Codes without a 3.1.1 twin: the closest return code.
CONNACK_311_LOSSY = [
    (ReasonCode.BANNED, 5),
    (ReasonCode.BAD_AUTHENTICATION_METHOD, 5),
    (ReasonCode.UNSPECIFIED_ERROR, 3),
    (ReasonCode.MALFORMED_PACKET, 3),
    (ReasonCode.PROTOCOL_ERROR, 3),
    (ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR, 3),
    (ReasonCode.SERVER_BUSY, 3),
    (ReasonCode.SERVER_MOVED, 3),
    (ReasonCode.USE_ANOTHER_SERVER, 3),
    (ReasonCode.QUOTA_EXCEEDED, 3),
    (ReasonCode.CONNECTION_RATE_EXCEEDED, 3),
]


@pytest.mark.parametrize(("reason", "code"), CONNACK_311 + CONNACK_311_LOSSY)
def test_connack_code_mapping_3_1_1(reason: ReasonCode, code: int) -> None:
    """Reason codes travel as 3.1.1 return codes (Table 3.1) on a 3.1.1 connection."""
    assert connack_code_311(reason) == code
    session_present = reason == ReasonCode.SUCCESS
    data = encode(Connack(session_present, reason, {P.REASON_STRING: "v5 only"}), V4)
    assert data == bytes((0x20, 2, int(session_present), code))


@pytest.mark.parametrize(("reason", "code"), CONNACK_311)
def test_connack_3_1_1_decodes_to_reason_codes(reason: ReasonCode, code: int) -> None:
    """A 3.1.1 return code is read back as its MQTT 5 reason code, so that
    ``Connack.reason_code`` (and ``reasons.is_error``) mean the same on both versions."""
    assert decode_one(pkt(0x20, bytes((0, code))), V4) == Connack(False, reason)
    assert decode_one(pkt(0x20, bytes((1, code))), V4) == Connack(True, reason)


def test_suback_code_mapping_3_1_1() -> None:
    """3.1.1 MQTT-3.9.3-2: only 0x00, 0x01, 0x02 and 0x80 (Failure) exist."""
    codes = [0, 1, 2, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2]
    assert [suback_code_311(c) for c in codes] == [0, 1, 2] + [0x80] * 9
    data = encode(Suback(3, codes, {P.REASON_STRING: "v5 only"}), V4)
    assert data == pkt(0x90, u16(3) + bytes((0, 1, 2)) + b"\x80" * 9)
    assert decode_one(data, V4) == Suback(3, [0, 1, 2] + [0x80] * 9)


@pytest.mark.parametrize("code", [0x03, 0x40, 0x7F, 0x81, 0x87, 0xFF])
def test_suback_reserved_return_code_3_1_1_mqtt_3_9_3_2(code: int) -> None:
    expect_error(pkt(0x90, u16(3) + bytes((0, code))), V4, MalformedPacket)


def test_unsuback_3_1_1_carries_only_a_packet_identifier() -> None:
    """3.1.1 3.11: UNSUBACK has no payload (remaining length 2)."""
    assert decode_one(pkt(0xB0, u16(9)), V4) == Unsuback(9, [])
    expect_error(pkt(0xB0, u16(9) + b"\x00"), V4, MalformedPacket)
    expect_error(pkt(0xB0, b"\x00"), V4, MalformedPacket)


# --------------------------------------------------------------------------- DISCONNECT, AUTH


def test_disconnect_and_ping_lengths() -> None:
    expect_error(b"\xe0\x01\x00", V4, MalformedPacket)  # 3.1.1 DISCONNECT has no body
    expect_error(b"\xc0\x01\x00", V5, MalformedPacket)
    expect_error(b"\xd0\x01\x00", V4, MalformedPacket)
    assert decode_one(b"\xe0\x00", V5) == Disconnect(0)
    assert decode_one(b"\xe0\x01\x04", V5) == Disconnect(4)  # 5.0 3.14.2.2.1 may omit
    assert decode_one(b"\xe0\x02\x8e\x00", V5) == Disconnect(0x8E)
    expect_error(b"\xe0\x03\x00\x00\x00", V5, MalformedPacket)  # trailing
    assert decode_one(b"\xf0\x00", V5) == Auth(0)
    assert decode_one(b"\xf0\x01\x18", V5) == Auth(0x18)
    expect_error(b"\xf0\x03\x18\x00\x00", V5, MalformedPacket)


@pytest.mark.parametrize("code", [0x01, 0x03, 0x7F, 0xFF])
def test_disconnect_unknown_reason_code_is_malformed(code: int) -> None:
    expect_error(bytes((0xE0, 1, code)), V5, MalformedPacket)


# 5.0 reason codes per packet type, from the tables in each packet's section.
REASON_TABLES = {
    # 3.2.2.2, MQTT-3.2.2-8
    CONNACK: bytes.fromhex("00 80 81 82 83 84 85 86 87 88 89 8A 8C 90 95 97 99 9A 9B 9C 9D 9F"),
    PUBACK: bytes.fromhex("00 10 80 83 87 90 91 97 99"),  # 3.4.2.1, MQTT-3.4.2-1
    PUBREC: bytes.fromhex("00 10 80 83 87 90 91 97 99"),  # 3.5.2.1, MQTT-3.5.2-1
    PUBREL: bytes.fromhex("00 92"),  # 3.6.2.1, MQTT-3.6.2-1
    PUBCOMP: bytes.fromhex("00 92"),  # 3.7.2.1, MQTT-3.7.2-1
    SUBACK: bytes.fromhex("00 01 02 80 83 87 8F 91 97 9E A1 A2"),  # 3.9.3, MQTT-3.9.3-1
    UNSUBACK: bytes.fromhex("00 11 80 83 87 8F 91"),  # 3.11.3, MQTT-3.11.3-1
    # 3.14.2.1, MQTT-3.14.2-1
    DISCONNECT: bytes.fromhex("00 04 80 81 82 83 87 89 8B 8D 8E 8F 90 93 94 95 96 97 98 99")
    + bytes.fromhex("9A 9B 9C 9D 9E 9F A0 A1 A2"),
    AUTH: bytes.fromhex("00 18 19"),  # 3.15.2.1, MQTT-3.15.2-1
}


def _with_reason(kind: int, code: int) -> bytes:
    body = {
        CONNACK: b"\x00" + bytes((code,)) + b"\x00",
        SUBACK: u16(1) + b"\x00" + bytes((0, code)),
        UNSUBACK: u16(1) + b"\x00" + bytes((0, code)),
        DISCONNECT: bytes((code,)),
        AUTH: bytes((code,)) + b"\x00",
    }.get(kind, u16(1) + bytes((code,)))
    return pkt(kind << 4 | REQUIRED_FLAGS[kind], body)


@pytest.mark.parametrize("kind", sorted(REASON_TABLES))
def test_reason_codes_valid_for_the_packet_type(kind: int) -> None:
    """5.0 MQTT-3.2.2-8, -3.4.2-1, -3.5.2-1, -3.6.2-1, -3.7.2-1, -3.9.3-1, -3.11.3-1,
    -3.14.2-1, -3.15.2-1: the sender MUST use one of that packet's reason codes; any other
    value is refused as a Malformed Packet."""
    valid = set(REASON_TABLES[kind])
    for code in range(256):
        data = _with_reason(kind, code)
        if code in valid:
            decode_one(data, V5)
        else:
            with pytest.raises(MalformedPacket) as info:
                PacketReader(version=V5).feed(data)
            assert info.value.reason_code == 0x81, hex(code)


# --------------------------------------------------------------------------- properties


# Where to put a raw property section to make a complete packet of each kind.
def with_properties(carrier: int, section: bytes) -> tuple[bytes, int | None]:
    if carrier == CONNECT:
        return raw_connect(V5, properties=section), None
    if carrier == WILL:
        return raw_connect(V5, will=("w/t", b"bye"), will_properties=section), None
    body = {
        CONNACK: b"\x00\x00" + section,
        PUBLISH: s("t") + u16(1) + section + b"payload",
        PUBACK: u16(1) + b"\x00" + section,
        PUBREC: u16(1) + b"\x00" + section,
        PUBREL: u16(1) + b"\x00" + section,
        PUBCOMP: u16(1) + b"\x00" + section,
        SUBSCRIBE: u16(1) + section + s("a/b") + b"\x01",
        SUBACK: u16(1) + section + b"\x01",
        UNSUBSCRIBE: u16(1) + section + s("a/b"),
        UNSUBACK: u16(1) + section + b"\x00",
        DISCONNECT: b"\x00" + section,
        AUTH: b"\x18" + section,
    }[carrier]
    first = {PUBLISH: 0x32}.get(carrier, carrier << 4 | REQUIRED_FLAGS[carrier])
    return pkt(first, body), V5


def properties_of(packet: Packet, carrier: int) -> Properties:
    if carrier == WILL:
        assert isinstance(packet, Connect) and packet.will is not None
        return packet.will.properties
    return packet.properties  # type: ignore[union-attr]


def _matrix() -> list[tuple[int, int]]:
    return [(carrier, pid) for carrier in CARRIERS for pid in sorted(TABLE_2_4)]


@pytest.mark.parametrize(("carrier", "pid"), _matrix())
def test_property_allowed_or_malformed(carrier: int, pid: int) -> None:
    """5.0 2.2.2.2: a Property Identifier not valid for the packet type is a Malformed
    Packet; every valid one is decoded with its value."""
    data, version = with_properties(carrier, props(prop(pid, VALUE[pid])))
    if carrier in TABLE_2_4[pid][1]:
        packet = decode_one(data, version)
        value = [VALUE[pid]] if pid in REPEATABLE else VALUE[pid]
        assert properties_of(packet, carrier) == {pid: value}
    else:
        expect_error(data, version, MalformedPacket)


@pytest.mark.parametrize("carrier", CARRIERS)
@pytest.mark.parametrize("pid", [0x00, 0x04, 0x0A, 0x10, 0x20, 0x2B, 0x7F, 0x80])
def test_unknown_property_identifier_is_malformed(carrier: int, pid: int) -> None:
    data, version = with_properties(carrier, props(vbi(pid) + b"\x00\x00\x00\x00"))
    expect_error(data, version, MalformedPacket)


@pytest.mark.parametrize("carrier", CARRIERS)
def test_every_allowed_property_at_once(carrier: int) -> None:
    section = b""
    expected = all_props(carrier)
    for pid, value in expected.items():
        for item in value if pid in REPEATABLE else [value]:
            section += prop(pid, item)
    data, version = with_properties(carrier, props(section))
    assert properties_of(decode_one(data, version), carrier) == expected


def _duplicates() -> list[tuple[int, int]]:
    return [
        (carrier, pid)
        for carrier in CARRIERS
        for pid, (_, where) in sorted(TABLE_2_4.items())
        if carrier in where and pid not in REPEATABLE
    ]


@pytest.mark.parametrize(("carrier", "pid"), _duplicates())
def test_duplicate_property_is_a_protocol_error(carrier: int, pid: int) -> None:
    """5.0 3.x.2.x: "It is a Protocol Error to include <property> more than once"."""
    section = props(prop(pid, VALUE[pid]), prop(P.USER_PROPERTY, ("a", "b")), prop(pid, VALUE[pid]))
    data, version = with_properties(carrier, section)
    expect_error(data, version, ProtocolError)


@pytest.mark.parametrize("carrier", CARRIERS)
def test_user_property_may_repeat_in_order(carrier: int) -> None:
    """5.0 3.1.2.11.8 etc.: User Property may appear more than once, with the same name
    too, and order is preserved (MQTT-3.3.2-18 for PUBLISH)."""
    pairs = [("b", "1"), ("a", "2"), ("b", "3"), ("b", "3")]
    section = props(*(prop(P.USER_PROPERTY, pair) for pair in pairs))
    data, version = with_properties(carrier, section)
    assert properties_of(decode_one(data, version), carrier) == {P.USER_PROPERTY: pairs}


ZERO_IS_PROTOCOL_ERROR = [
    (CONNECT, P.RECEIVE_MAXIMUM),  # 5.0 3.1.2.11.3
    (CONNACK, P.RECEIVE_MAXIMUM),  # 5.0 3.2.2.3.3
    (CONNECT, P.MAXIMUM_PACKET_SIZE),  # 5.0 3.1.2.11.4
    (CONNACK, P.MAXIMUM_PACKET_SIZE),  # 5.0 3.2.2.3.6
    (PUBLISH, P.TOPIC_ALIAS),  # 5.0 MQTT-3.3.2-8
    (PUBLISH, P.SUBSCRIPTION_IDENTIFIER),  # 5.0 3.3.2.3.8
    (SUBSCRIBE, P.SUBSCRIPTION_IDENTIFIER),  # 5.0 3.8.2.1.2
]


@pytest.mark.parametrize(("carrier", "pid"), ZERO_IS_PROTOCOL_ERROR)
def test_zero_receive_maximum_topic_alias_subscription_identifier(carrier: int, pid: int) -> None:
    """A value of 0 for Receive Maximum, Maximum Packet Size, Topic Alias (MQTT-3.3.2-8)
    or Subscription Identifier is a Protocol Error."""
    data, version = with_properties(carrier, props(prop(pid, 0)))
    expect_error(data, version, ProtocolError)


BOOLEAN_PROPERTIES = [
    (PUBLISH, P.PAYLOAD_FORMAT_INDICATOR),
    (WILL, P.PAYLOAD_FORMAT_INDICATOR),
    (CONNECT, P.REQUEST_PROBLEM_INFORMATION),
    (CONNECT, P.REQUEST_RESPONSE_INFORMATION),
    (CONNACK, P.MAXIMUM_QOS),
    (CONNACK, P.RETAIN_AVAILABLE),
    (CONNACK, P.WILDCARD_SUBSCRIPTION_AVAILABLE),
    (CONNACK, P.SUBSCRIPTION_IDENTIFIER_AVAILABLE),
    (CONNACK, P.SHARED_SUBSCRIPTION_AVAILABLE),
]


@pytest.mark.parametrize(("carrier", "pid"), BOOLEAN_PROPERTIES)
@pytest.mark.parametrize("value", [2, 0xFF])
def test_byte_properties_other_than_0_or_1(carrier: int, pid: int, value: int) -> None:
    """5.0: "It is a Protocol Error to include a value other than 0 or 1" (Maximum QoS,
    Retain Available, Request Problem/Response Information, the *Available flags)."""
    data, version = with_properties(carrier, props(prop(pid, value)))
    expect_error(data, version, ProtocolError)


@pytest.mark.parametrize(
    "section",
    [
        pytest.param(b"\x05\x02\x00\x00\x00", id="u32-cut-by-property-length"),
        pytest.param(b"\x02\x23\x00", id="u16-cut"),
        pytest.param(b"\x01\x01", id="byte-missing"),
        pytest.param(b"\x03\x03\x00\x05", id="string-cut"),
        pytest.param(b"\x02\x0b\x80", id="varint-cut"),
        pytest.param(b"\x7f", id="property-length-past-packet"),
        pytest.param(b"\x80", id="property-length-cut"),
        pytest.param(b"\x04\x26\x00\x00\x00", id="pair-missing-value"),
    ],
)
def test_property_values_running_past_their_section_are_malformed(section: bytes) -> None:
    """A packet whose lengths do not add up (5.0 2.2.2.1, 4.13 "Malformed Packet")."""
    expect_error(pkt(0x30, s("t") + section), V5, MalformedPacket)


# --------------------------------------------------------------------------- round trips

SAMPLES_V5: list[Packet] = [
    Connect("", V5, True, 0),
    Connect(
        "client-ü",
        V5,
        False,
        65_535,
        "user",
        b"\x00pass\xff",
        Will("will/ü", b"\x00bye" * 100, 2, True, all_props(WILL)),
        all_props(CONNECT),
    ),
    Connect("c", V5, True, 30, None, b"token-only"),
    Connect("c", V5, True, 30, "", b"", Will("", b"", 1, False)),
    Connack(),
    Connack(True, 0, all_props(CONNACK)),
    Connack(False, ReasonCode.NOT_AUTHORIZED, {P.REASON_STRING: "no"}),
    Publish("a/b", b"", 0),
    Publish("a/b", b"payload", 0, True),
    Publish("a/b", bytes(range(256)) * 3, 1, False, True, 1, all_props(PUBLISH)),
    Publish("", b"aliased", 2, False, False, 65_535, {P.TOPIC_ALIAS: 1}),
    Publish("ü/😀/\ufeff", b"x" * 20_000, 2, True, True, 77, {P.CONTENT_TYPE: "c"}),
    Puback(1),
    Puback(2, ReasonCode.NO_MATCHING_SUBSCRIBERS),
    Puback(3, ReasonCode.QUOTA_EXCEEDED, all_props(PUBACK)),
    Pubrec(4, 0, all_props(PUBREC)),
    Pubrec(5, ReasonCode.PACKET_IDENTIFIER_IN_USE),
    Pubrel(6),
    Pubrel(7, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND, all_props(PUBREL)),
    Pubcomp(65_535, 0, all_props(PUBCOMP)),
    Subscribe(1, [Subscription("a/+")]),
    Subscribe(
        2,
        [
            Subscription("a/#", 2, True, True, 2),
            Subscription("$share/g/x", 1, False, True, 1),
            Subscription("ü/+/😀", 0, True, False, 0),
        ],
        all_props(SUBSCRIBE),
    ),
    Suback(1, [0]),
    Suback(2, [0, 1, 2, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2], all_props(SUBACK)),
    Unsubscribe(1, ["a/b"]),
    Unsubscribe(2, ["a/b", "#", "ü"], all_props(UNSUBSCRIBE)),
    Unsuback(1, [0]),
    Unsuback(2, [0, 0x11, 0x80, 0x87], all_props(UNSUBACK)),
    Pingreq(),
    Pingresp(),
    Disconnect(),
    Disconnect(ReasonCode.DISCONNECT_WITH_WILL),
    Disconnect(ReasonCode.SERVER_MOVED, all_props(DISCONNECT)),
    Disconnect(0, {P.SESSION_EXPIRY_INTERVAL: 0}),
    Auth(),
    Auth(ReasonCode.CONTINUE_AUTHENTICATION, all_props(AUTH)),
    Auth(ReasonCode.REAUTHENTICATE, {P.AUTHENTICATION_METHOD: "m"}),
]

SAMPLES_V4: list[Packet] = [
    Connect("", V4, True, 0),
    Connect("client", V4, False, 65_535, "user", b"\x00pass", Will("w/t", b"bye", 2, True)),
    Connect("client", V4, True, 10, "user"),
    Connect("c", V4, True, 10, None, None, Will("w", b"", 1)),
    Connect("legacy", MQTT_3_1, True, 10, "u", b"p"),
    Connack(),
    Connack(True, 0),
    Connack(False, ReasonCode.BAD_USER_NAME_OR_PASSWORD),
    Publish("a/b", b"", 0),
    Publish("a/b", b"payload", 0, True),
    Publish("a/b", bytes(range(256)), 1, False, True, 1),
    Publish("ü/😀", b"x" * 20_000, 2, True, False, 65_535),
    Puback(1),
    Pubrec(2),
    Pubrel(3),
    Pubcomp(4),
    Subscribe(1, [Subscription("a/+"), Subscription("#", 2), Subscription("x", 1)]),
    Suback(1, [0, 1, 2, 0x80]),
    Unsubscribe(1, ["a/b", "#"]),
    Unsuback(1),
    Pingreq(),
    Pingresp(),
    Disconnect(),
]

SAMPLES = [(V5, p) for p in SAMPLES_V5] + [(V4, p) for p in SAMPLES_V4]


def _id(sample: tuple[int, Packet]) -> str:
    return f"v{sample[0]}-{type(sample[1]).__name__}"


def read_back(version: int, packet: Packet, data: bytes) -> list[Packet]:
    reader = PacketReader() if isinstance(packet, Connect) else PacketReader(version=version)
    return reader.feed(data)


@pytest.mark.parametrize("sample", SAMPLES, ids=[_id(x) for x in SAMPLES])
def test_round_trip(sample: tuple[int, Packet]) -> None:
    """encode then decode gives the packet back, and re-encoding gives the same bytes."""
    version, packet = sample
    data = encode(packet, version)
    assert read_back(version, packet, data) == [packet]
    [again] = read_back(version, packet, data)
    assert encode(again, version) == data


def v4_view(packet: Packet) -> Packet:
    """What is left of a packet after a trip through MQTT 3.1.1."""
    packet = copy.deepcopy(packet)
    if hasattr(packet, "properties"):
        packet.properties = {}  # type: ignore[union-attr]
    if isinstance(packet, Connack):
        back = {code: reason for reason, code in CONNACK_311}
        packet.reason_code = back[connack_code_311(packet.reason_code)]
    elif isinstance(packet, (Puback, Pubrec, Pubrel, Pubcomp, Disconnect)):
        packet.reason_code = 0
    elif isinstance(packet, Subscribe):
        packet.subscriptions = [Subscription(x.topic_filter, x.qos) for x in packet.subscriptions]
    elif isinstance(packet, Suback):
        packet.reason_codes = [suback_code_311(c) for c in packet.reason_codes]
    elif isinstance(packet, Unsuback):
        packet.reason_codes = []
    return packet


V5_ONLY = [p for p in SAMPLES_V5 if not isinstance(p, (Connect, Auth))]


@pytest.mark.parametrize("packet", V5_ONLY, ids=[type(p).__name__ for p in V5_ONLY])
def test_v5_packets_encoded_for_3_1_1_drop_v5_fields(packet: Packet) -> None:
    data = encode(packet, V4)
    assert PacketReader(version=V4).feed(data) == [v4_view(packet)]


# Byte-exact encodings, worked out by hand from the specifications.
VECTORS = [
    (V4, Connect("abc", V4, True, 60), b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03abc"),
    (V5, Connect("abc", V5, True, 60), b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x03abc"),
    (
        V4,
        Connect("c", V4, False, 10, "u", b"p", Will("w", b"x", 1, True)),
        b"\x10\x19\x00\x04MQTT\x04\xec\x00\x0a\x00\x01c\x00\x01w\x00\x01x\x00\x01u\x00\x01p",
    ),
    (
        V5,
        Connect("c", V5, True, 10, None, None, Will("w", b"x", 0), {P.SESSION_EXPIRY_INTERVAL: 10}),
        b"\x10\x1a\x00\x04MQTT\x05\x06\x00\x0a\x05\x11\x00\x00\x00\x0a\x00\x01c\x00"
        b"\x00\x01w\x00\x01x",
    ),
    (MQTT_3_1, Connect("c", MQTT_3_1), b"\x10\x0f\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x01c"),
    (V4, Connack(True), b"\x20\x02\x01\x00"),
    (V5, Connack(True), b"\x20\x03\x01\x00\x00"),
    (V5, Connack(False, 0x9C, {P.SERVER_REFERENCE: "x"}), b"\x20\x07\x00\x9c\x04\x1c\x00\x01x"),
    (V4, Publish("a/b", b"hi", 1, False, False, 10), b"\x32\x09\x00\x03a/b\x00\x0ahi"),
    (V5, Publish("a/b", b"hi", 0, True), b"\x31\x08\x00\x03a/b\x00hi"),
    (
        V5,
        Publish("a", b"", 2, False, True, 1, {P.TOPIC_ALIAS: 5}),
        b"\x3c\x09\x00\x01a\x00\x01\x03\x23\x00\x05",
    ),
    (V4, Publish("t", b"z" * 125), b"\x30\x80\x01\x00\x01t" + b"z" * 125),
    (V5, Puback(1), b"\x40\x02\x00\x01"),
    (V5, Puback(1, 0x10), b"\x40\x03\x00\x01\x10"),
    (V5, Puback(1, 0, {P.REASON_STRING: "r"}), b"\x40\x08\x00\x01\x00\x04\x1f\x00\x01r"),
    (V4, Pubrel(1), b"\x62\x02\x00\x01"),
    (V4, Subscribe(1, [Subscription("a", 2)]), b"\x82\x06\x00\x01\x00\x01a\x02"),
    (
        V5,
        Subscribe(1, [Subscription("a", 1, True, True, 2)], {P.SUBSCRIPTION_IDENTIFIER: [200]}),
        b"\x82\x0a\x00\x01\x03\x0b\xc8\x01\x00\x01a\x2d",
    ),
    (V4, Suback(1, [0x80]), b"\x90\x03\x00\x01\x80"),
    (V5, Suback(1, [0x87]), b"\x90\x04\x00\x01\x00\x87"),
    (V4, Unsubscribe(1, ["a"]), b"\xa2\x05\x00\x01\x00\x01a"),
    (V5, Unsubscribe(1, ["a"]), b"\xa2\x06\x00\x01\x00\x00\x01a"),
    (V4, Unsuback(1, [0x11]), b"\xb0\x02\x00\x01"),
    (V5, Unsuback(1, [0x11]), b"\xb0\x04\x00\x01\x00\x11"),
    (V4, Pingreq(), b"\xc0\x00"),
    (V5, Pingresp(), b"\xd0\x00"),
    (V4, Disconnect(0x04), b"\xe0\x00"),
    (V5, Disconnect(), b"\xe0\x00"),
    (V5, Disconnect(0x04), b"\xe0\x01\x04"),
    (V5, Disconnect(0, {P.SESSION_EXPIRY_INTERVAL: 1}), b"\xe0\x07\x00\x05\x11\x00\x00\x00\x01"),
    (V5, Auth(), b"\xf0\x00"),
    (V5, Auth(0x18), b"\xf0\x02\x18\x00"),
]


@pytest.mark.parametrize(("version", "packet", "wire"), VECTORS)
def test_encoding_vectors(version: int, packet: Packet, wire: bytes) -> None:
    assert encode(packet, version) == wire
    reader = PacketReader() if isinstance(packet, Connect) else PacketReader(version=version)
    [decoded] = reader.feed(wire)
    if version == V4 and not isinstance(packet, Connect):
        packet = v4_view(packet)
    assert decoded == packet


def test_encode_publish_matches_encode() -> None:
    for version, packet in SAMPLES:
        if isinstance(packet, Publish):
            direct = encode_publish(
                packet.topic,
                packet.payload,
                packet.qos,
                packet.retain,
                packet.dup,
                packet.packet_id,
                packet.properties,
                version,
            )
            assert direct == encode(packet, version)


def test_large_remaining_lengths() -> None:
    """Two-, three- and four-byte Remaining Lengths (5.0 1.5.5 / 3.1.1 2.2.3)."""
    for size, header in ((16_375, 3), (16_376, 4), (2_097_143, 4), (2_097_144, 5)):
        packet = Publish("big", b"\xab" * size, 1, False, False, 1)
        data = encode(packet, V5)
        remaining = 2 + 3 + 2 + 1 + size
        assert data[:header] == b"\x32" + vbi(remaining)
        assert len(data) == header + remaining
        reader = PacketReader(version=V5)
        step = 65_536
        out = feed_in_chunks(reader, data, [step] * (len(data) // step))
        assert out == [packet]
        assert reader.buffered == 0


def test_encoder_refuses_what_it_cannot_express() -> None:
    with pytest.raises(ValueError):
        encode_publish("t", b"", 1, False, False, None, None, V5)  # QoS>0 needs a packet id
    with pytest.raises(ValueError):
        encode_properties({P.TOPIC_ALIAS: 1}, CONNECT)  # not allowed there
    with pytest.raises(ValueError):
        encode_properties({0x7F: 1}, PUBLISH)  # unknown identifier
    with pytest.raises(ValueError):
        encode(Subscribe(1, [Subscription("x" * 65_536)]), V5)  # string too long
    with pytest.raises(ValueError):
        encode(Connect("c", 6))  # unknown protocol level
    assert encode_properties({}, PUBLISH) == b"\x00"
    assert encode_properties({P.USER_PROPERTY: ("a", "b")}, PUBLISH) == props(
        prop(P.USER_PROPERTY, ("a", "b"))
    )


# --------------------------------------------------------------------------- incremental


def _stream(version: int) -> tuple[bytes, list[Packet]]:
    """A CONNECT followed by every other sample of that version, as one byte stream."""
    samples = SAMPLES_V5 if version == V5 else SAMPLES_V4
    connects = [p for p in samples if isinstance(p, Connect) and p.protocol_version == version]
    others = [p for p in samples if not isinstance(p, Connect)]
    packets: list[Packet] = [connects[-1], *others]
    return b"".join(encode(p, version) for p in packets), packets


@pytest.mark.parametrize("version", [V4, V5])
def test_many_packets_in_one_read(version: int) -> None:
    data, packets = _stream(version)
    reader = PacketReader()
    assert reader.feed(data) == packets
    assert reader.buffered == 0
    assert reader.version == version


@pytest.mark.parametrize("version", [V4, V5])
def test_byte_by_byte(version: int) -> None:
    data, packets = _stream(version)
    reader = PacketReader()
    out: list[Packet] = []
    for i in range(len(data)):
        before = reader.buffered
        got = reader.feed(data[i : i + 1])
        out += got
        assert reader.buffered == (0 if got else before + 1)
    assert out == packets
    assert reader.buffered == 0


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("version", [V4, V5])
def test_random_chunks(version: int, seed: int) -> None:
    data, packets = _stream(version)
    rng = random.Random(seed)
    sizes = [rng.choice([1, 2, 3, 5, 64, 1000, 4096, 30_000]) for _ in range(len(data))]
    reader = PacketReader()
    assert feed_in_chunks(reader, data, sizes) == packets
    assert reader.buffered == 0


def test_feed_accepts_bytearray_and_memoryview() -> None:
    data = encode(Publish("a", b"payload", 1, packet_id=3), V5) * 2
    for wrap in (bytearray, memoryview):
        reader = PacketReader(version=V5)
        out = reader.feed(wrap(data))  # type: ignore[arg-type]
        assert out == [Publish("a", b"payload", 1, packet_id=3)] * 2
        assert all(type(p.payload) is bytes for p in out)  # type: ignore[union-attr]
        assert reader.feed(wrap(data[:5])) == []
        assert reader.feed(wrap(data[5:])) == out[:1] * 2


def test_empty_feed() -> None:
    reader = PacketReader(version=V5)
    assert reader.feed(b"") == []
    assert reader.feed(b"\x30") == []
    assert reader.feed(b"") == []
    assert reader.buffered == 1


@pytest.mark.parametrize("sample", SAMPLES, ids=[_id(x) for x in SAMPLES])
def test_truncated_at_every_offset_waits_then_completes(sample: tuple[int, Packet]) -> None:
    """Any prefix of a valid packet is no error: ``feed`` returns [] and keeps the bytes;
    the rest completes it."""
    version, packet = sample
    data = encode(packet, version)
    if len(data) > 2_000:  # keep the quadratic loop cheap; the head is what matters
        offsets = list(range(0, 600)) + list(range(len(data) - 50, len(data)))
    else:
        offsets = list(range(len(data)))
    for k in offsets:
        reader = PacketReader() if isinstance(packet, Connect) else PacketReader(version=version)
        assert reader.feed(data[:k]) == [], k
        assert reader.buffered == k
        assert reader.feed(data[k:]) == [packet], k
        assert reader.buffered == 0


@pytest.mark.parametrize("sample", SAMPLES, ids=[_id(x) for x in SAMPLES])
def test_declared_length_shorter_than_contents(sample: tuple[int, Packet]) -> None:
    """A Remaining Length shorter than the fields inside it: the packet ends early.

    Cutting a packet anywhere must give a Malformed Packet (or, where a cut leaves a
    SUBSCRIBE/UNSUBSCRIBE without filters, a Protocol Error), never an exception of another
    kind and never a wait for bytes the header says are not coming.  Some cuts happen to
    leave a shorter valid packet (a PUBLISH payload, a trailing subscription): those must
    decode to something other than the original.
    """
    version, packet = sample
    data = encode(packet, version)
    header = 2 if data[1] < 128 else (3 if data[2] < 128 else (4 if data[3] < 128 else 5))
    body = data[header:]
    lengths = range(len(body)) if len(body) < 2_000 else range(0, 600)
    for n in lengths:
        short = bytes((data[0],)) + vbi(n) + body[:n]
        reader = PacketReader() if isinstance(packet, Connect) else PacketReader(version=version)
        try:
            out = reader.feed(short)
        except (MalformedPacket, ProtocolError) as exc:
            assert exc.reason_code in (0x81, 0x82)
            assert reader.buffered == 0
            continue
        assert reader.buffered == 0
        assert len(out) == 1 and out != [packet], n


@pytest.mark.parametrize(
    ("version", "data"),
    [
        pytest.param(None, raw_connect(V5, username="u", password=b"pw"), id="connect-password"),
        pytest.param(None, raw_connect(V4, will=("w", b"x")), id="connect-will-payload"),
        pytest.param(None, raw_connect(V5, client_id="client"), id="connect-client-id"),
        pytest.param(V5, pkt(0x32, s("a/b") + u16(1) + b"\x00"), id="publish-props"),
        pytest.param(V4, pkt(0x32, s("a/b") + u16(1)), id="publish-packet-id"),
        pytest.param(V4, pkt(0x30, s("a/b")), id="publish-topic"),
        pytest.param(V5, pkt(0x82, u16(1) + b"\x00" + s("a/b") + b"\x01"), id="subscribe"),
        pytest.param(V4, pkt(0xA2, u16(1) + s("a/b")), id="unsubscribe"),
        pytest.param(V4, pkt(0x20, b"\x00\x00"), id="connack-v4"),
        pytest.param(V5, pkt(0x20, b"\x00\x00\x00"), id="connack-v5"),
        pytest.param(V4, pkt(0x40, u16(1)), id="puback"),
        pytest.param(V5, pkt(0x40, u16(1) + b"\x00" + props(prop(0x1F, "r"))), id="puback-v5"),
        pytest.param(V5, pkt(0xE0, b"\x00" + props(prop(0x11, 5))), id="disconnect"),
    ],
)
def test_length_one_short_is_malformed(version: int | None, data: bytes) -> None:
    """Declared length one byte short of the last field: a field runs past the packet."""
    assert data[1] < 128
    short = bytes((data[0], data[1] - 1)) + data[2:-1]
    expect_error(short, version, MalformedPacket)
    # With the missing byte arriving afterwards it is still the same error.
    expect_error(short + data[-1:], version, MalformedPacket, at_end=False)


def test_reader_error_drops_buffer_and_packets_after_it() -> None:
    good = encode(Publish("a", b"1"), V5)
    bad = pkt(0x30, s(b"\xff"))
    reader = PacketReader(version=V5)
    assert reader.feed(good + good[:3]) == [Publish("a", b"1")]
    assert reader.buffered == 3
    with pytest.raises(MalformedPacket):
        reader.feed(good[3:] + bad + good)
    assert reader.buffered == 0


# --------------------------------------------------------------------------- maximum size


def test_packet_too_large_from_the_fixed_header_alone() -> None:
    """5.0 3.1.2.11.4 / MQTT-3.2.2-15 etc.: a packet larger than the Maximum Packet Size
    advertised is refused with 0x95 as soon as its fixed header is known."""
    reader = PacketReader(version=V5, max_packet_size=1_000)
    assert reader.feed(b"\x30") == []
    assert reader.feed(b"\xe6") == []  # length not complete yet: 0x66 + ...
    with pytest.raises(PacketTooLarge) as info:
        reader.feed(b"\x07")  # remaining length 998: 1 + 2 + 998 = 1001 bytes > 1000
    assert info.value.reason_code == 0x95
    assert reader.buffered == 0

    reader = PacketReader(version=V5, max_packet_size=1_000)
    with pytest.raises(PacketTooLarge):
        reader.feed(b"\x30\xff\xff\xff\x7f")  # 256 MB announced, nothing else sent


def packet_of_size(size: int) -> bytes | None:
    """A valid v5 packet of exactly ``size`` bytes (None where no Remaining Length fits)."""
    if size == 2:
        return b"\xc0\x00"  # PINGREQ
    for remaining in range(size - 5, size - 1):
        if remaining >= 3 and 1 + len(vbi(remaining)) + remaining == size:
            return pkt(0x30, s("") + b"\x00" + b"x" * (remaining - 3))
    return None


@pytest.mark.parametrize("limit", [2, 5, 10, 127, 128, 129, 130, 131, 1_000, 16_386, 16_387])
def test_packet_size_limit_is_inclusive_and_counts_the_fixed_header(limit: int) -> None:
    """Packet size is the whole packet, fixed header included (5.0 3.1.2.11.4): a packet of
    exactly the limit passes, one byte more is refused."""
    tried = 0
    for size in range(max(2, limit - 3), limit + 4):
        data = packet_of_size(size)
        if data is None:
            continue
        assert len(data) == size
        tried += 1
        if size > limit:
            expect_error(
                data,
                V5,
                PacketTooLarge,
                at_end=False,
                reader_factory=lambda: PacketReader(version=V5, max_packet_size=limit),
            )
        else:
            assert len(PacketReader(version=V5, max_packet_size=limit).feed(data)) == 1
    assert tried >= 2


def test_packet_too_large_before_connect() -> None:
    data = raw_connect(V5, client_id="x" * 200)
    expect_error(
        data,
        None,
        PacketTooLarge,
        at_end=False,
        reader_factory=lambda: PacketReader(max_packet_size=100),
    )
    assert len(PacketReader(max_packet_size=len(data)).feed(data)) == 1


# --------------------------------------------------------------------------- paho-mqtt interop

try:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties as PahoProperties
    from paho.mqtt.reasoncodes import ReasonCode as PahoReasonCode
    from paho.mqtt.subscribeoptions import SubscribeOptions
except ImportError:  # pragma: no cover - the rest of this module does not need paho
    paho = None

with_paho = pytest.mark.skipif(paho is None, reason="paho-mqtt is not installed")
TIMEOUT = 10.0


class Broker:
    """A one-connection MQTT server speaking through our codec, recording what it reads."""

    def __init__(self, connack: Connack, suback_codes: list[int], suback_props: Properties):
        self.received: asyncio.Queue[Packet] = asyncio.Queue()
        self.connack = connack
        self.suback_codes = suback_codes
        self.suback_props = suback_props
        self.writer: asyncio.StreamWriter | None = None
        self.version: int | None = None
        self.server: asyncio.Server | None = None
        self.errors: list[BaseException] = []
        self.done = asyncio.Event()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()
            await asyncio.wait_for(self.done.wait(), TIMEOUT)  # the handler saw EOF
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def send(self, packet: Packet) -> None:
        assert self.writer is not None and self.version is not None
        self.writer.write(encode(packet, self.version))

    async def next(self) -> Packet:
        return await asyncio.wait_for(self.received.get(), TIMEOUT)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        packets = PacketReader()
        try:
            while data := await reader.read(4096):
                for packet in packets.feed(data):
                    self.version = packets.version
                    self._answer(packet)
                    self.received.put_nowait(packet)
        except Exception as exc:  # surfaced by the test
            self.errors.append(exc)
        finally:
            self.done.set()

    def _answer(self, packet: Packet) -> None:
        if isinstance(packet, Connect):
            self.send(self.connack)
        elif isinstance(packet, Subscribe):
            self.send(Suback(packet.packet_id, self.suback_codes, self.suback_props))
        elif isinstance(packet, Unsubscribe):
            codes = [ReasonCode.SUCCESS, ReasonCode.NO_SUBSCRIPTION_EXISTED][
                : len(packet.topic_filters)
            ]
            self.send(Unsuback(packet.packet_id, codes, {P.REASON_STRING: "unsub"}))
        elif isinstance(packet, Publish) and packet.qos == 1:
            assert packet.packet_id is not None
            self.send(Puback(packet.packet_id))
        elif isinstance(packet, Publish) and packet.qos == 2:
            assert packet.packet_id is not None
            self.send(Pubrec(packet.packet_id))
        elif isinstance(packet, Pubrel):
            self.send(Pubcomp(packet.packet_id))
        elif isinstance(packet, Pingreq):
            self.send(Pingresp())


class Events:
    """paho callbacks run on paho's thread; hand them to the event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(self, name: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (name, value))

    async def expect(self, name: str) -> Any:
        got, value = await asyncio.wait_for(self.queue.get(), TIMEOUT)
        assert got == name, (got, value)
        return value


def paho_client(version: int, events: Events, client_id: str) -> Any:
    protocol = paho.MQTTv5 if version == V5 else paho.MQTTv311
    kwargs: dict[str, Any] = {"client_id": client_id, "protocol": protocol}
    if version == V4:
        kwargs["clean_session"] = False
    client = paho.Client(CallbackAPIVersion.VERSION2, **kwargs)
    client.on_connect = lambda c, u, flags, rc, props: events.put("connect", (flags, rc, props))
    client.on_subscribe = lambda c, u, mid, codes, props: events.put(
        "subscribe", (mid, codes, props)
    )
    client.on_unsubscribe = lambda c, u, mid, codes, props: events.put(
        "unsubscribe", (mid, codes, props)
    )
    client.on_publish = lambda c, u, mid, rc, props: events.put("publish", (mid, rc, props))
    client.on_message = lambda c, u, msg: events.put("message", msg)
    return client


def paho_props(kind: int, **values: Any) -> Any:
    out = PahoProperties(kind)
    for name, value in values.items():
        setattr(out, name, value)
    return out


@pytest.mark.interop
@with_paho
async def test_paho_v311_client() -> None:
    broker = Broker(Connack(session_present=True), [1, ReasonCode.NOT_AUTHORIZED], {})
    port = await broker.start()
    events = Events()
    client = paho_client(V4, events, "paho-311")
    client.username_pw_set("alice", "s3cret")
    client.will_set("clients/paho-311/status", b"offline", qos=1, retain=True)
    try:
        client.connect_async("127.0.0.1", port, keepalive=42)
        client.loop_start()

        assert await broker.next() == Connect(
            "paho-311",
            V4,
            clean_start=False,
            keep_alive=42,
            username="alice",
            password=b"s3cret",
            will=Will("clients/paho-311/status", b"offline", 1, True),
        )
        flags, rc, _ = await events.expect("connect")
        assert flags.session_present is True
        assert rc == 0

        _, mid = client.subscribe([("a/+/c", 1), ("d/#", 2)])
        assert await broker.next() == Subscribe(
            mid, [Subscription("a/+/c", 1), Subscription("d/#", 2)]
        )
        got_mid, codes, _ = await events.expect("subscribe")
        assert got_mid == mid
        assert [c.value for c in codes] == [1, 0x80]  # NOT_AUTHORIZED went out as Failure

        info = client.publish("a/b/c", b"\x00hello\xff", qos=1, retain=True)
        assert await broker.next() == Publish("a/b/c", b"\x00hello\xff", 1, True, False, info.mid)
        assert (await events.expect("publish"))[0] == info.mid

        info = client.publish("q/2", b"exactly once", qos=2)
        assert await broker.next() == Publish("q/2", b"exactly once", 2, False, False, info.mid)
        assert await broker.next() == Pubrel(info.mid)
        assert (await events.expect("publish"))[0] == info.mid

        info = client.publish("a/b/c", b"", qos=0)
        assert await broker.next() == Publish("a/b/c", b"")
        assert (await events.expect("publish"))[0] == info.mid

        broker.send(Publish("a/x/c", b"from qmig", 1, False, False, 513))
        message = await events.expect("message")
        assert (message.topic, message.payload, message.qos, message.mid) == (
            "a/x/c",
            b"from qmig",
            1,
            513,
        )
        assert await broker.next() == Puback(513)

        _, mid = client.unsubscribe(["a/+/c"])
        assert await broker.next() == Unsubscribe(mid, ["a/+/c"])
        assert (await events.expect("unsubscribe"))[0] == mid

        client.disconnect()
        assert await broker.next() == Disconnect()
    finally:
        await asyncio.to_thread(client.loop_stop)
        await broker.close()
    assert broker.errors == []


@pytest.mark.interop
@with_paho
async def test_paho_v5_client() -> None:
    connack_props: Properties = {
        P.SESSION_EXPIRY_INTERVAL: 600,
        P.RECEIVE_MAXIMUM: 10,
        P.MAXIMUM_QOS: 1,
        P.RETAIN_AVAILABLE: 1,
        P.MAXIMUM_PACKET_SIZE: 1_048_576,
        P.ASSIGNED_CLIENT_IDENTIFIER: "assigned-by-qmig",
        P.TOPIC_ALIAS_MAXIMUM: 5,
        P.REASON_STRING: "welcome",
        P.USER_PROPERTY: [("server", "qmig"), ("edge", "host-a")],
        P.WILDCARD_SUBSCRIPTION_AVAILABLE: 1,
        P.SUBSCRIPTION_IDENTIFIER_AVAILABLE: 1,
        P.SHARED_SUBSCRIPTION_AVAILABLE: 0,
        P.SERVER_KEEP_ALIVE: 45,
        P.RESPONSE_INFORMATION: "responses/",
    }
    suback_props = {P.REASON_STRING: "granted", P.USER_PROPERTY: [("k", "v")]}
    broker = Broker(
        Connack(True, 0, connack_props),
        [ReasonCode.GRANTED_QOS_1, ReasonCode.GRANTED_QOS_2, ReasonCode.NOT_AUTHORIZED],
        suback_props,
    )
    port = await broker.start()
    events = Events()
    client = paho_client(V5, events, "")
    client.username_pw_set("bob", None)
    will_props = paho_props(
        PacketTypes.WILLMESSAGE,
        WillDelayInterval=30,
        MessageExpiryInterval=3600,
        ContentType="text/plain",
        ResponseTopic="will/replies",
        CorrelationData=b"\x01\x02",
        PayloadFormatIndicator=1,
        UserProperty=[("why", "crash")],
    )
    client.will_set("clients/paho-5/status", "gone", qos=2, retain=False, properties=will_props)
    connect_props = paho_props(
        PacketTypes.CONNECT,
        SessionExpiryInterval=3600,
        ReceiveMaximum=20,
        MaximumPacketSize=65_536,
        TopicAliasMaximum=8,
        RequestResponseInformation=1,
        RequestProblemInformation=0,
        UserProperty=[("client", "paho"), ("client", "again")],
    )
    try:
        client.connect_async(
            "127.0.0.1", port, keepalive=60, clean_start=False, properties=connect_props
        )
        client.loop_start()

        assert await broker.next() == Connect(
            "",
            V5,
            clean_start=False,
            keep_alive=60,
            username="bob",
            password=None,
            will=Will(
                "clients/paho-5/status",
                b"gone",
                2,
                False,
                {
                    P.WILL_DELAY_INTERVAL: 30,
                    P.MESSAGE_EXPIRY_INTERVAL: 3600,
                    P.CONTENT_TYPE: "text/plain",
                    P.RESPONSE_TOPIC: "will/replies",
                    P.CORRELATION_DATA: b"\x01\x02",
                    P.PAYLOAD_FORMAT_INDICATOR: 1,
                    P.USER_PROPERTY: [("why", "crash")],
                },
            ),
            properties={
                P.SESSION_EXPIRY_INTERVAL: 3600,
                P.RECEIVE_MAXIMUM: 20,
                P.MAXIMUM_PACKET_SIZE: 65_536,
                P.TOPIC_ALIAS_MAXIMUM: 8,
                P.REQUEST_RESPONSE_INFORMATION: 1,
                P.REQUEST_PROBLEM_INFORMATION: 0,
                P.USER_PROPERTY: [("client", "paho"), ("client", "again")],
            },
        )
        flags, rc, cprops = await events.expect("connect")
        assert flags.session_present is True
        assert rc == 0 and not rc.is_failure
        assert cprops.SessionExpiryInterval == 600
        assert cprops.ReceiveMaximum == 10
        assert cprops.MaximumQoS == 1
        assert cprops.RetainAvailable == 1
        assert cprops.MaximumPacketSize == 1_048_576
        assert cprops.AssignedClientIdentifier == "assigned-by-qmig"
        assert cprops.TopicAliasMaximum == 5
        assert cprops.ReasonString == "welcome"
        assert cprops.UserProperty == [("server", "qmig"), ("edge", "host-a")]
        assert cprops.WildcardSubscriptionAvailable == 1
        assert cprops.SubscriptionIdentifierAvailable == 1
        assert cprops.SharedSubscriptionAvailable == 0
        assert cprops.ServerKeepAlive == 45
        assert cprops.ResponseInformation == "responses/"

        sub_props = paho_props(
            PacketTypes.SUBSCRIBE, SubscriptionIdentifier=42, UserProperty=[("s", "1")]
        )
        _, mid = client.subscribe(
            [
                (
                    "a/+/c",
                    SubscribeOptions(1, noLocal=True, retainAsPublished=True, retainHandling=1),
                ),
                ("d/#", SubscribeOptions(2, retainHandling=2)),
                ("$share/grp/e", SubscribeOptions(0)),
            ],
            properties=sub_props,
        )
        assert await broker.next() == Subscribe(
            mid,
            [
                Subscription("a/+/c", 1, True, True, 1),
                Subscription("d/#", 2, False, False, 2),
                Subscription("$share/grp/e", 0),
            ],
            {P.SUBSCRIPTION_IDENTIFIER: [42], P.USER_PROPERTY: [("s", "1")]},
        )
        got_mid, codes, sprops = await events.expect("subscribe")
        assert got_mid == mid
        assert [c.value for c in codes] == [1, 2, 0x87]
        assert sprops.ReasonString == "granted"
        assert sprops.UserProperty == [("k", "v")]

        pub_props = paho_props(
            PacketTypes.PUBLISH,
            PayloadFormatIndicator=1,
            MessageExpiryInterval=60,
            TopicAlias=3,
            ResponseTopic="replies/paho",
            CorrelationData=b"\xca\xfe",
            UserProperty=[("a", "1"), ("a", "2")],
            ContentType="application/json",
        )
        info = client.publish("a/b/c", b'{"t": 21.5}', qos=1, retain=True, properties=pub_props)
        assert await broker.next() == Publish(
            "a/b/c",
            b'{"t": 21.5}',
            1,
            True,
            False,
            info.mid,
            {
                P.PAYLOAD_FORMAT_INDICATOR: 1,
                P.MESSAGE_EXPIRY_INTERVAL: 60,
                P.TOPIC_ALIAS: 3,
                P.RESPONSE_TOPIC: "replies/paho",
                P.CORRELATION_DATA: b"\xca\xfe",
                P.USER_PROPERTY: [("a", "1"), ("a", "2")],
                P.CONTENT_TYPE: "application/json",
            },
        )
        assert (await events.expect("publish"))[0] == info.mid

        out_props = {
            P.PAYLOAD_FORMAT_INDICATOR: 0,
            P.SUBSCRIPTION_IDENTIFIER: [42, 7],
            P.USER_PROPERTY: [("from", "qmig")],
            P.CONTENT_TYPE: "application/octet-stream",
            P.MESSAGE_EXPIRY_INTERVAL: 59,
        }
        broker.send(Publish("a/x/c", b"\x00\x01", 1, True, False, 1_000, out_props))
        message = await events.expect("message")
        assert (message.topic, message.payload, message.qos, message.retain, message.mid) == (
            "a/x/c",
            b"\x00\x01",
            1,
            True,
            1_000,
        )
        assert message.properties.SubscriptionIdentifier == [42, 7]
        assert message.properties.UserProperty == [("from", "qmig")]
        assert message.properties.ContentType == "application/octet-stream"
        assert message.properties.MessageExpiryInterval == 59
        assert await broker.next() == Puback(1_000)

        _, mid = client.unsubscribe(
            ["a/+/c", "d/#"],
            properties=paho_props(PacketTypes.UNSUBSCRIBE, UserProperty=[("u", "x")]),
        )
        assert await broker.next() == Unsubscribe(
            mid, ["a/+/c", "d/#"], {P.USER_PROPERTY: [("u", "x")]}
        )
        got_mid, codes, uprops = await events.expect("unsubscribe")
        assert got_mid == mid
        assert [c.value for c in codes] == [0x00, 0x11]
        assert uprops.ReasonString == "unsub"

        client.disconnect(
            reasoncode=PahoReasonCode(PacketTypes.DISCONNECT, identifier=0x04),
            properties=paho_props(
                PacketTypes.DISCONNECT, SessionExpiryInterval=0, ReasonString="bye"
            ),
        )
        assert await broker.next() == Disconnect(
            ReasonCode.DISCONNECT_WITH_WILL,
            {P.SESSION_EXPIRY_INTERVAL: 0, P.REASON_STRING: "bye"},
        )
    finally:
        await asyncio.to_thread(client.loop_stop)
        await broker.close()
    assert broker.errors == []
