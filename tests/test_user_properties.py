"""User Properties: capped per packet (count and bytes), decoded cheaply, kept compact.

A PUBLISH may repeat User Property (0x26) as often as its size allows: 1 MB of empty pairs
was 200,000 list entries in the broker's memory for every retained copy (issue #13).  The
broker now refuses a packet with more than ``max_user_properties`` of them, or more than
``max_user_properties_size`` bytes of keys and values, with 0x97 Quota exceeded, closing
only that client; below the caps they are forwarded unchanged and in order.
"""

from __future__ import annotations

import gc
import socket
import time
from typing import Any

import pytest
from sansio import FakeClient, make_broker

from broker.config import ConfigError, add_broker_arguments, config_from_args
from mqttproto.codec import PacketReader, encode, encode_varint
from mqttproto.errors import MQTTError
from mqttproto.packets import MQTT_5, Connack, Connect, Disconnect, Publish, Will
from mqttproto.properties import PropertyId, UserProperties
from mqttproto.reasons import ReasonCode

P = PropertyId
R = ReasonCode
HOST = "127.0.0.1"


def user_properties(pairs: list[tuple[str, str]]) -> bytes:
    """The wire form of ``pairs`` as User Property entries (no length prefix)."""
    out = b""
    for key, value in pairs:
        k, v = key.encode(), value.encode()
        out += b"\x26" + len(k).to_bytes(2, "big") + k + len(v).to_bytes(2, "big") + v
    return out


def publish_with(
    entries: bytes, topic: str = "t", tail: bytes = b"", retain: bool = False
) -> bytes:
    """A QoS 0 MQTT 5 PUBLISH whose property section is ``entries`` + ``tail``."""
    name = topic.encode()
    section = entries + tail
    body = len(name).to_bytes(2, "big") + name + encode_varint(len(section)) + section + b"p"
    return bytes((0x31 if retain else 0x30,)) + encode_varint(len(body)) + body


def empties(n: int) -> bytes:
    return b"\x26\x00\x00\x00\x00" * n


def one_publish(reader: PacketReader, data: bytes) -> Publish:
    [packet] = reader.feed(data)
    assert isinstance(packet, Publish)
    return packet


# --------------------------------------------------------------------------- codec


def test_decoded_user_properties_read_like_the_list_and_keep_the_wire_bytes() -> None:
    pairs = [("k", "v"), ("k", "v2"), ("", ""), ("ключ", "värde ✓")]
    data = encode(Publish("t", b"x", properties={P.USER_PROPERTY: pairs}), MQTT_5)
    packet = one_publish(PacketReader(MQTT_5), data)
    got = packet.properties[P.USER_PROPERTY]
    assert isinstance(got, UserProperties)
    assert got == pairs and list(got) == pairs and len(got) == 4
    assert got[3] == ("ключ", "värde ✓") and got[-1] == pairs[-1] and got[1:3] == pairs[1:3]
    # Stored as the entries' wire encoding, so a message costs its size on the wire.
    assert got.wire == user_properties(pairs)
    # Re-encoding copies them: same bytes, same order (MQTT-3.3.2-18).
    assert encode(packet, MQTT_5) == data


def test_user_properties_around_other_properties_keep_their_order() -> None:
    entries = user_properties([("a", "1")]) + b"\x01\x01" + user_properties([("b", "2")])
    packet = one_publish(PacketReader(MQTT_5), publish_with(entries))
    assert packet.properties == {
        P.USER_PROPERTY: [("a", "1"), ("b", "2")],
        P.PAYLOAD_FORMAT_INDICATOR: 1,
    }


@pytest.mark.parametrize(
    ("entries", "why"),
    [
        (b"\x26\x00\x01\xff\x00\x00", "invalid UTF-8"),
        (b"\x26\x00\x00\x00\x01\x00", r"U\+0000"),
        (b"\x26\x00\x05ab", "past the end"),
        (b"\x26\x00\x00\x00\x05ab", "past the end"),
        (b"\x26\x00", "truncated"),
        (b"\xa6\x00\x00\x00\x00\x00", "minimally"),  # 0x26 as a two-byte varint
    ],
)
def test_malformed_user_properties_are_still_malformed(entries: bytes, why: str) -> None:
    with pytest.raises(MQTTError, match=why) as err:
        PacketReader(MQTT_5).feed(publish_with(entries))
    assert err.value.reason_code == R.MALFORMED_PACKET


def test_count_cap_refuses_with_quota_exceeded_before_decoding_the_rest() -> None:
    reader = PacketReader(MQTT_5, max_user_properties=10, max_user_properties_size=1000)
    packet = one_publish(reader, publish_with(empties(10)))
    assert len(packet.properties[P.USER_PROPERTY]) == 10
    # The 11th is refused; the malformed string after it is never looked at.
    bad_tail = b"\x26\x00\x01\xff\x00\x00"
    with pytest.raises(MQTTError, match="user properties") as err:
        reader.feed(publish_with(empties(11), tail=bad_tail))
    assert err.value.reason_code == R.QUOTA_EXCEEDED


def test_size_cap_counts_key_and_value_bytes() -> None:
    reader = PacketReader(MQTT_5, max_user_properties=100, max_user_properties_size=10)
    ok = user_properties([("abc", "de"), ("fgh", "ij")])  # 10 bytes of keys and values
    packet = one_publish(reader, publish_with(ok))
    assert packet.properties[P.USER_PROPERTY] == [("abc", "de"), ("fgh", "ij")]
    with pytest.raises(MQTTError) as err:
        reader.feed(publish_with(ok + user_properties([("", "x")])))
    assert err.value.reason_code == R.QUOTA_EXCEEDED


def test_connect_and_will_properties_share_one_allowance() -> None:
    will = Will("w", b"x", properties={P.USER_PROPERTY: [("w", "1")] * 3})
    connect = Connect("c", MQTT_5, will=will, properties={P.USER_PROPERTY: [("c", "1")] * 3})
    data = encode(connect, MQTT_5)
    assert PacketReader(max_user_properties=6).feed(data)[0] == connect
    with pytest.raises(MQTTError) as err:
        PacketReader(max_user_properties=5).feed(data)
    assert err.value.reason_code == R.QUOTA_EXCEEDED


def test_subscription_identifiers_count_too() -> None:
    """The other property that may repeat: 1 MB of them was 0.8 s of decoding."""
    reader = PacketReader(MQTT_5, max_user_properties=4)
    packet = one_publish(reader, publish_with(b"\x0b\x01" * 4))
    assert packet.properties == {P.SUBSCRIPTION_IDENTIFIER: [1, 1, 1, 1]}
    with pytest.raises(MQTTError) as err:
        reader.feed(publish_with(b"\x0b\x01" * 500_000))
    assert err.value.reason_code == R.QUOTA_EXCEEDED


def test_caps_apply_to_every_packet_type() -> None:
    reader = PacketReader(MQTT_5, max_user_properties=1)
    data = encode(Disconnect(0, {P.USER_PROPERTY: [("a", "b"), ("c", "d")]}), MQTT_5)
    with pytest.raises(MQTTError) as err:
        reader.feed(data)
    assert err.value.reason_code == R.QUOTA_EXCEEDED


# --------------------------------------------------------------------------- config


def _parse(*argv: str) -> Any:
    import argparse

    parser = argparse.ArgumentParser()
    add_broker_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_config_defaults_flags_and_ranges() -> None:
    cfg = _parse()
    assert (cfg.max_user_properties, cfg.max_user_properties_size) == (256, 65536)
    cfg = _parse("--max-user-properties", "20", "--max-user-properties-size", "8192")
    assert (cfg.max_user_properties, cfg.max_user_properties_size) == (20, 8192)
    for flag in ("--max-user-properties", "--max-user-properties-size"):
        with pytest.raises(ConfigError):
            _parse(flag, "0")


# --------------------------------------------------------------------------- engine


def test_broker_refuses_a_publish_over_the_cap_and_only_that_client() -> None:
    broker, _ = make_broker(max_user_properties=8, max_user_properties_size=64)
    sub = FakeClient(broker)
    sub.connect("sub")
    sub.subscribe("t/#")
    pub = FakeClient(broker)
    pub.connect("pub")
    pairs = [(f"k{i}", "v") for i in range(8)]
    pub.send_raw(publish_with(user_properties(pairs), "t/ok", retain=True))
    [got] = sub.publishes()
    assert got.properties[P.USER_PROPERTY] == pairs  # forwarded unchanged, in order
    pub.send_raw(publish_with(empties(9), "t/over", retain=True))
    assert pub.expect(Disconnect).reason_code == R.QUOTA_EXCEEDED
    assert pub.closed
    sub.expect_nothing()  # nothing of it was routed ...
    assert broker.store.retained_count() == 1  # ... or retained
    other = FakeClient(broker)  # ... and everyone else carries on
    other.connect("other")
    other.publish("t/after", b"x")
    assert [p.topic for p in sub.publishes()] == ["t/after"]


def test_a_refused_packet_is_freed_at_once_not_by_the_garbage_collector() -> None:
    """Its bytes (up to the Maximum Packet Size) must not wait in a reference cycle.

    The probe saw the broker's RSS grow by 1 MB per refused connection until the cyclic
    collector ran: the kept exception's traceback held the decoder's frames.
    """
    broker, _ = make_broker(max_user_properties=8)
    client = FakeClient(broker)
    client.connect("c")
    gc.collect()
    gc.disable()
    try:
        client.send_raw(publish_with(empties(9), "t"))
        assert client.expect(Disconnect).reason_code == R.QUOTA_EXCEEDED
        assert client.closed
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_broker_refuses_a_connect_over_the_cap() -> None:
    broker, _ = make_broker(max_user_properties=2)
    client = FakeClient(broker)
    client.send(Connect("c", MQTT_5, properties={P.USER_PROPERTY: [("a", "b")] * 3}))
    assert client.closed
    assert not [p for p in client.packets() if isinstance(p, Connack) and p.reason_code == 0]


# --------------------------------------------------------------------------- real broker


def _read_until_closed(sock: socket.socket, timeout: float = 5.0) -> list[Any]:
    reader = PacketReader(MQTT_5)
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            return out
        out.extend(reader.feed(data))
    pytest.fail(f"broker did not close the connection; received {out!r}")


def test_real_broker_closes_a_publish_of_200k_user_properties_with_0x97(
    broker: Any, broker_kind_name: str
) -> None:
    """The issue's packet: ~1 MB of empty user properties, under the default packet size."""
    if broker_kind_name != "qmig":
        pytest.skip("qmig's limit on user properties")
    with socket.create_connection((HOST, broker.tcp_port), timeout=5.0) as sock:
        sock.sendall(encode(Connect("up-over", MQTT_5)))
        reader = PacketReader(MQTT_5)
        connack = reader.feed(sock.recv(64))
        assert connack and isinstance(connack[0], Connack) and connack[0].reason_code == 0
        sock.sendall(publish_with(empties(200_000), "up/big", retain=True))  # ~1 MB
        got = _read_until_closed(sock)
    assert [type(p) for p in got] == [Disconnect]
    assert got[0].reason_code == R.QUOTA_EXCEEDED
