"""Property-based tests of ``mqttproto.codec``.

(a) Every valid packet of every type round-trips through ``encode`` and ``PacketReader`` for
    MQTT 3.1.1 and 5.0, however the bytes are chunked, and re-encodes to the same bytes.
(b) Arbitrary bytes, fed in arbitrary chunks to a fresh (server-side) reader or to one on an
    established 3.1.1 / 5.0 connection, never raise anything but ``MQTTError`` subclasses
    carrying a Malformed / Protocol Error / Unsupported Version / Packet Too Large reason
    code; the reader never holds more than one incomplete packet (bounded by its maximum
    packet size) and holds nothing after an error.  Whatever it does decode is well-formed:
    it re-encodes and decodes to the same packet.
(c) The same guarantees for valid encodings with bytes flipped, inserted and deleted.

Budget: about 20 s in all.  ``HYPOTHESIS_PROFILE=ci`` makes the runs reproducible
(derandomized, no example database); ``QMIG_FUZZ_SCALE=10`` runs ten times the examples.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from mqttproto.codec import MAX_PACKET_SIZE, PacketReader, encode
from mqttproto.errors import MQTTError
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
from mqttproto.properties import BOOLEAN, NONZERO, SPEC, WILL, Properties, PropertyId, WireType

# --------------------------------------------------------------------------- settings

try:
    settings.get_profile("ci")  # a conftest may have registered its own
except InvalidArgument:
    settings.register_profile(
        "ci",
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])

_SCALE = float(os.environ.get("QMIG_FUZZ_SCALE", "1"))


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=max(1, int(examples * _SCALE)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


V4, V5 = MQTT_3_1_1, MQTT_5
SUBSCRIBE = 8
P = PropertyId
# What a reader may raise, and with which reason codes (4.13).
EXPECTED_REASONS = {0x81, 0x82, 0x84, 0x95}

# --------------------------------------------------------------------------- strategies

# Valid MQTT UTF-8: no surrogates (the codec excludes them), no U+0000 (MQTT-1.5.4-2).
text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
binary = st.binary(max_size=24)
packet_id = st.integers(1, 65_535)
qos = st.integers(0, 2)


def _value(pid: int, carrier: int) -> st.SearchStrategy[Any]:
    wire = SPEC[pid][0]
    low = 1 if pid in NONZERO else 0
    if pid in BOOLEAN:
        base: st.SearchStrategy[Any] = st.integers(0, 1)
    elif wire is WireType.BYTE:
        base = st.integers(0, 255)
    elif wire is WireType.UINT16:
        base = st.integers(low, 65_535)
    elif wire is WireType.UINT32:
        base = st.integers(low, 2**32 - 1)
    elif wire is WireType.VARINT:
        base = st.integers(1, 268_435_455)
    elif wire is WireType.UTF8:
        base = text
    elif wire is WireType.BINARY:
        base = binary
    else:
        base = st.tuples(text, text)
    if pid == P.SUBSCRIPTION_IDENTIFIER and carrier == SUBSCRIBE:
        return st.lists(base, min_size=1, max_size=1)  # at most one in SUBSCRIBE
    if pid in (P.USER_PROPERTY, P.SUBSCRIPTION_IDENTIFIER):
        return st.lists(base, min_size=1, max_size=3)
    return base


@st.composite
def properties(draw: st.DrawFn, carrier: int) -> Properties:
    """A valid property dict for packet type ``carrier`` (or WILL), in random order."""
    allowed = [pid for pid, (_, where) in SPEC.items() if carrier in where]
    chosen = draw(st.lists(st.sampled_from(allowed), unique=True, max_size=len(allowed)))
    return {pid: draw(_value(pid, carrier)) for pid in chosen}


def _props(version: int, carrier: int) -> st.SearchStrategy[Properties]:
    return properties(carrier) if version == V5 else st.just({})


def _reason(version: int, codes: list[int]) -> st.SearchStrategy[int]:
    return st.sampled_from(codes) if version == V5 else st.just(0)


ACK_REASONS = {
    4: [0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99],
    5: [0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99],
    6: [0x00, 0x92],
    7: [0x00, 0x92],
}
CONNACK_REASONS_V5 = [0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A]
CONNACK_REASONS_V5 += [0x8C, 0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F]
# On 3.1.1 only these survive the trip (the others map onto one of them).
CONNACK_REASONS_V4 = [0x00, 0x84, 0x85, 0x88, 0x86, 0x87]
SUBACK_REASONS_V5 = [0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2]
UNSUBACK_REASONS_V5 = [0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91]
DISCONNECT_REASONS_V5 = [0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F]
DISCONNECT_REASONS_V5 += [0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C]
DISCONNECT_REASONS_V5 += [0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2]


@st.composite
def connects(draw: st.DrawFn, version: int) -> Connect:
    will = None
    if draw(st.booleans()):
        will = Will(
            draw(text), draw(binary), draw(qos), draw(st.booleans()), draw(_props(version, WILL))
        )
    username = draw(st.none() | text)
    # 3.1.1 MQTT-3.1.2-22: no password without a user name.
    password = draw(st.none() | binary) if version == V5 or username is not None else None
    return Connect(
        draw(text),
        version,
        draw(st.booleans()),
        draw(st.integers(0, 65_535)),
        username,
        password,
        will,
        draw(_props(version, 1)),
    )


@st.composite
def publishes(draw: st.DrawFn, version: int) -> Publish:
    q = draw(qos)
    return Publish(
        draw(text),
        draw(st.binary(max_size=300)),
        q,
        draw(st.booleans()),
        draw(st.booleans()) if q else False,  # MQTT-3.3.1-2
        draw(packet_id) if q else None,
        draw(_props(version, 3)),
    )


@st.composite
def subscriptions(draw: st.DrawFn, version: int) -> Subscription:
    topic_filter = draw(text | st.just("$share/g/t"))
    if version != V5:
        return Subscription(topic_filter, draw(qos))
    no_local = draw(st.booleans()) and not topic_filter.startswith("$share/")  # MQTT-3.8.3-4
    return Subscription(
        topic_filter, draw(qos), no_local, draw(st.booleans()), draw(st.integers(0, 2))
    )


def packets(version: int) -> st.SearchStrategy[Packet]:
    """Every packet type except CONNECT, valid for ``version``."""
    v5 = version == V5
    acks = [
        st.builds(cls, packet_id, _reason(version, ACK_REASONS[kind]), _props(version, kind))
        for kind, cls in ((4, Puback), (5, Pubrec), (6, Pubrel), (7, Pubcomp))
    ]
    strategies: list[st.SearchStrategy[Packet]] = [
        st.builds(
            Connack,
            st.booleans(),
            st.sampled_from(CONNACK_REASONS_V5 if v5 else CONNACK_REASONS_V4),
            _props(version, 2),
        ),
        publishes(version),
        *acks,
        st.builds(
            Subscribe,
            packet_id,
            st.lists(subscriptions(version), min_size=1, max_size=4),
            _props(version, 8),
        ),
        st.builds(
            Suback,
            packet_id,
            st.lists(st.sampled_from(SUBACK_REASONS_V5 if v5 else [0, 1, 2, 0x80]), max_size=4),
            _props(version, 9),
        ),
        st.builds(
            Unsubscribe, packet_id, st.lists(text, min_size=1, max_size=4), _props(version, 10)
        ),
        st.builds(
            Unsuback,
            packet_id,
            st.lists(st.sampled_from(UNSUBACK_REASONS_V5), max_size=4) if v5 else st.just([]),
            _props(version, 11),
        ),
        st.just(Pingreq()),
        st.just(Pingresp()),
        st.builds(Disconnect, _reason(version, DISCONNECT_REASONS_V5), _props(version, 14)),
    ]
    if v5:
        strategies.append(st.builds(Auth, st.sampled_from([0x00, 0x18, 0x19]), properties(15)))
    return st.one_of(strategies)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for point in [*points, len(data)]:
        out.append(data[prev:point])
        prev = point
    return out


cuts = st.lists(st.integers(0, 10_000), max_size=8)


def feed_all(reader: PacketReader, pieces: list[bytes]) -> list[Packet]:
    out: list[Packet] = []
    for piece in pieces:
        out += reader.feed(piece)
    return out


# --------------------------------------------------------------------------- (a) round trip


@fuzz_settings(250)
@given(
    version=st.sampled_from([MQTT_3_1, V4, V5]),
    data=st.data(),
    cut_points=cuts,
)
def test_round_trip_session(version: int, data: st.DataObject, cut_points: list[int]) -> None:
    """A CONNECT and a run of packets, encoded as one stream and read back in random
    chunks by a server-side reader, come back equal; re-encoding gives the same bytes."""
    wire_version = V4 if version == MQTT_3_1 else version
    connect = data.draw(connects(version))
    rest = data.draw(st.lists(packets(wire_version), max_size=6))
    stream = encode(connect, version) + b"".join(encode(p, wire_version) for p in rest)
    reader = PacketReader()
    got = feed_all(reader, chunked(stream, cut_points))
    assert got == [connect, *rest]
    assert reader.buffered == 0
    assert reader.version == version
    assert encode(got[0], version) + b"".join(encode(p, wire_version) for p in got[1:]) == stream


@fuzz_settings(300)
@given(version=st.sampled_from([V4, V5]), data=st.data())
def test_round_trip_each_packet(version: int, data: st.DataObject) -> None:
    packet = data.draw(packets(version))
    encoded = encode(packet, version)
    reader = PacketReader(version=version)
    assert reader.feed(encoded) == [packet]
    # Byte by byte as well: nothing until the last byte.
    reader = PacketReader(version=version)
    for i in range(len(encoded) - 1):
        assert reader.feed(encoded[i : i + 1]) == []
    assert reader.feed(encoded[-1:]) == [packet]


# --------------------------------------------------------------------------- (b) arbitrary bytes

READERS = ["fresh", "v4", "v5", "v5-small"]


def make_reader(kind: str) -> PacketReader:
    if kind == "fresh":
        return PacketReader()
    if kind == "v4":
        return PacketReader(version=V4)
    if kind == "v5-small":
        return PacketReader(version=V5, max_packet_size=64)
    return PacketReader(version=V5)


def check_robust(reader: PacketReader, pieces: list[bytes]) -> None:
    """Feed ``pieces``: only MQTTError may escape, memory stays bounded, and every packet
    that comes out is one the encoder can write and the decoder reads back unchanged."""
    limit = reader.max_packet_size
    fed = 0
    for piece in pieces:
        version_before = reader.version
        fed += len(piece)
        try:
            out = reader.feed(piece)
        except MQTTError as exc:
            assert int(exc.reason_code) in EXPECTED_REASONS, exc
            assert reader.buffered == 0  # a reader that raised keeps nothing
            return
        # At most one incomplete packet, within the limit (or a fixed header in the making).
        assert reader.buffered <= fed
        assert reader.buffered < max(limit, 5)
        for packet in out:
            check_reencodes(packet, version_before if version_before else reader.version)
            version_before = reader.version


def check_reencodes(packet: Packet, version: int | None) -> None:
    assert version is not None
    if isinstance(packet, Connect):
        again = PacketReader().feed(encode(packet, packet.protocol_version))
    else:
        again = PacketReader(version=version).feed(encode(packet, version))
    assert again == [packet]


# First bytes that pass the fixed-header checks (PUBLISH first: it is what shrinking and
# sampling favour), to get the body decoders fuzzed rather than only the framing.
VALID_FIRST = [0x30 | f for f in range(16) if (f >> 1) & 3 != 3 and not (f & 8 and not f & 6)]
VALID_FIRST += [0x82, 0xA2, 0x40, 0x50, 0x62, 0x70, 0x20, 0x90, 0xB0, 0xE0, 0xF0, 0xC0, 0xD0]


def _vbi(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _vbi(len(body)) + body


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


# Bodies made of plausible fields (length-prefixed strings, packet ids, property sections
# with real identifiers) get past the first length check far more often than random bytes.
_property = st.builds(
    lambda pid, value: _vbi(pid) + value,
    st.sampled_from([*sorted(SPEC), 0x00, 0x7F]),
    st.binary(max_size=5) | st.binary(max_size=8).map(_lp),
)
_field = st.one_of(
    st.binary(max_size=4),
    st.binary(max_size=10).map(_lp),
    text.map(lambda t: _lp(t.encode())),
    st.integers(0, 65_535).map(lambda n: n.to_bytes(2, "big")),
    st.lists(_property, max_size=4).map(lambda ps: _vbi(sum(map(len, ps))) + b"".join(ps)),
)
body = st.lists(_field, max_size=6).map(b"".join) | st.binary(max_size=80)
framed = st.builds(_frame, st.sampled_from(VALID_FIRST), body)
# A CONNECT whose name and level are right, so that flags and payload get fuzzed.
fuzzed_connect = st.builds(
    lambda name, level, flags, rest: _frame(0x10, name + bytes((level, flags)) + rest),
    st.sampled_from([b"\x00\x04MQTT", b"\x00\x06MQIsdp"]),
    st.sampled_from([MQTT_3_1, V4, V5]),
    st.integers(0, 255),
    body,
)
CONNECTS = [encode(Connect("c", v)) for v in (MQTT_3_1, V4, V5)]


@st.composite
def noisy(draw: st.DrawFn) -> tuple[str, bytes]:
    """A reader kind and bytes for it: mostly framed packets, sometimes raw noise; a fresh
    reader usually gets a (possibly fuzzed) CONNECT first."""
    kind = draw(st.sampled_from(READERS))
    if draw(st.integers(0, 4)):
        data = b"".join(draw(st.lists(framed, min_size=1, max_size=5)))
    else:
        data = draw(st.binary(max_size=300))
    if kind == "fresh" and draw(st.integers(0, 4)):
        data = draw(fuzzed_connect | st.sampled_from(CONNECTS)) + data
    return kind, data


@fuzz_settings(700)
@given(case=noisy(), cut_points=cuts)
def test_arbitrary_bytes_only_raise_mqtt_errors(
    case: tuple[str, bytes], cut_points: list[int]
) -> None:
    kind, data = case
    check_robust(make_reader(kind), chunked(data, cut_points))


@fuzz_settings(100)
@given(kind=st.sampled_from(READERS), blob=st.binary(min_size=1, max_size=40))
def test_arbitrary_bytes_byte_by_byte(kind: str, blob: bytes) -> None:
    check_robust(make_reader(kind), [blob[i : i + 1] for i in range(len(blob))])


def test_announced_huge_packet_is_not_buffered_beyond_the_limit() -> None:
    """A peer announcing a maximal packet and dribbling bytes costs at most the limit."""
    reader = PacketReader(version=V5, max_packet_size=MAX_PACKET_SIZE)
    reader.feed(b"\x30\xff\xff\xff\x7f")
    for _ in range(100):
        reader.feed(b"\x00" * 1_000)
    assert reader.buffered == 5 + 100_000


# --------------------------------------------------------------------------- (c) mutation


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["fresh", "v4", "v5"]))
    if kind == "fresh":
        version = draw(st.sampled_from([MQTT_3_1, V4, V5]))
        first = draw(connects(version))
        wire = V4 if version == MQTT_3_1 else version
        rest = draw(st.lists(packets(wire), max_size=3))
        data = bytearray(encode(first, version) + b"".join(encode(p, wire) for p in rest))
    else:
        version = V4 if kind == "v4" else V5
        data = bytearray(
            b"".join(
                encode(p, version) for p in draw(st.lists(packets(version), min_size=1, max_size=4))
            )
        )
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "dup"]))
        if not data and op != "insert":
            continue
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[at] = draw(
                st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))])
            )
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        elif op == "truncate":
            del data[at:]
        else:
            stop = draw(st.integers(at, len(data)))
            data[stop:stop] = data[at:stop]
    return kind, bytes(data)


@fuzz_settings(700)
@given(case=mutated(), cut_points=cuts)
def test_mutated_encodings_only_raise_mqtt_errors(
    case: tuple[str, bytes], cut_points: list[int]
) -> None:
    kind, data = case
    check_robust(make_reader(kind), chunked(data, cut_points))
