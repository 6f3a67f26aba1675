"""The sans-I/O client protocol's data channels (QUIC multi-stream mode), without sockets."""

from __future__ import annotations

from mqttproto.client import ClientProtocol, MessageReceived, ProtocolViolation, Subscribed
from mqttproto.codec import PacketReader, encode
from mqttproto.packets import MQTT_5, Connack, Puback, Publish, Suback, Subscription


def connected() -> ClientProtocol:
    proto = ClientProtocol("c1", MQTT_5)
    proto.connect()
    proto.data_to_send()
    proto.receive_data(encode(Connack(False, 0), MQTT_5))
    return proto


def decode(data: bytes) -> list[object]:
    return PacketReader(MQTT_5).feed(data)


def test_commands_go_on_their_channel() -> None:
    proto = connected()
    proto.subscribe([Subscription("a/#", 1)], channel=2)
    proto.publish("b", b"x", qos=1, channel=3)
    proto.publish("c", b"y", qos=0)
    assert [type(p) for p in decode(proto.data_to_send())] == [Publish]
    side = proto.side_data_to_send()
    assert sorted(side) == [2, 3]
    assert decode(side[3])[0].topic == "b"  # type: ignore[attr-defined]
    assert proto.side_data_to_send() == {}


def test_acks_go_back_on_the_channel_of_the_message() -> None:
    proto = connected()
    events = proto.receive_data(encode(Publish("t", b"m", 1, packet_id=9), MQTT_5), channel=5)
    assert isinstance(events[0], MessageReceived)
    assert proto.data_to_send() == b""
    ack = decode(proto.side_data_to_send()[5])[0]
    assert isinstance(ack, Puback) and ack.packet_id == 9
    pid = proto.subscribe([Subscription("s", 0)], channel=5)
    proto.side_data_to_send()
    events = proto.receive_data(encode(Suback(pid, [0]), MQTT_5), channel=5)
    assert isinstance(events[0], Subscribed)


def test_split_packet_across_reads_per_channel() -> None:
    """Each stream has its own reader: halves on two channels do not mix."""
    proto = connected()
    a = encode(Publish("ta", b"1" * 50), MQTT_5)
    b = encode(Publish("tb", b"2" * 50), MQTT_5)
    assert proto.receive_data(a[:20], channel=1) == []
    assert proto.receive_data(b[:30], channel=2) == []
    got_a = proto.receive_data(a[20:], channel=1)
    got_b = proto.receive_data(b[30:], channel=2)
    assert got_a[0].publish.topic == "ta"  # type: ignore[attr-defined]
    assert got_b[0].publish.topic == "tb"  # type: ignore[attr-defined]


def test_control_packet_on_a_data_channel_is_a_violation() -> None:
    proto = connected()
    events = proto.receive_data(encode(Connack(False, 0), MQTT_5), channel=1)
    assert isinstance(events[0], ProtocolViolation)
    assert proto.closed


def test_queued_publish_keeps_its_channel() -> None:
    proto = ClientProtocol("c2", MQTT_5)
    proto.publish("q", b"later", qos=1, channel=4)  # before CONNACK: queued
    proto.connect()
    proto.data_to_send()
    proto.receive_data(encode(Connack(False, 0), MQTT_5))
    assert decode(proto.side_data_to_send()[4])[0].topic == "q"  # type: ignore[attr-defined]
