"""Multi-stream mode: a control stream plus data streams, driven with aioquic directly.

The first client bidirectional stream is the control stream; every further one is a data
stream.  Replies come back on the stream of the request, messages on the stream of the
subscription, and a data stream that ends only ends itself.
"""

from __future__ import annotations

import asyncio

from mqttproto.codec import PacketReader, encode
from mqttproto.packets import (
    MQTT_5,
    Connect,
    Packet,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
)

from .conftest import QBroker
from .helpers import collect, make_client, uid
from .test_quic_bad_input import RawQuic, raw_quic


def packets(proto: RawQuic, sid: int) -> list[Packet]:
    """Every MQTT packet the broker sent on stream ``sid`` so far."""
    return PacketReader(MQTT_5).feed(bytes(proto.received[sid]))


async def wait_packets(proto: RawQuic, sid: int, count: int, timeout: float = 5.0) -> list[Packet]:
    async with asyncio.timeout(timeout):
        while len(got := packets(proto, sid)) < count:
            proto.changed.clear()
            await proto.changed.wait()
    return got


def subscribe(proto: RawQuic, sid: int, topic: str, packet_id: int, qos: int = 1) -> None:
    proto.send(sid, encode(Subscribe(packet_id, [Subscription(topic, qos)]), MQTT_5))


async def test_replies_and_messages_use_the_stream_they_belong_to(qbroker: QBroker) -> None:
    root = uid("ms/")
    async with raw_quic(qbroker) as proto, make_client(qbroker, "tcp") as other:
        control = await proto.mqtt_connect(uid("multi-"))
        stream_a, stream_b = proto.new_stream(), None
        subscribe(proto, stream_a, f"{root}/a", 1)
        stream_b = proto.new_stream()
        subscribe(proto, stream_b, f"{root}/b", 2)
        assert isinstance((await wait_packets(proto, stream_a, 1))[0], Suback)
        assert isinstance((await wait_packets(proto, stream_b, 1))[0], Suback)
        await other.subscribe(f"{root}/up", qos=1)

        await other.publish(f"{root}/a", b"to a", qos=1, timeout=5)
        await other.publish(f"{root}/b", b"to b", qos=1, timeout=5)
        got_a = (await wait_packets(proto, stream_a, 2))[1]
        got_b = (await wait_packets(proto, stream_b, 2))[1]
        assert isinstance(got_a, Publish) and got_a.payload == b"to a"
        assert isinstance(got_b, Publish) and got_b.payload == b"to b"
        proto.send(stream_a, encode(Puback(got_a.packet_id), MQTT_5))  # type: ignore[arg-type]
        proto.send(stream_b, encode(Puback(got_b.packet_id), MQTT_5))  # type: ignore[arg-type]

        # A PUBLISH on a third stream is acknowledged on that stream and routed.
        stream_c = proto.new_stream()
        proto.send(stream_c, encode(Publish(f"{root}/up", b"up", 1, packet_id=7), MQTT_5))
        ack = (await wait_packets(proto, stream_c, 1))[0]
        assert isinstance(ack, Puback) and ack.packet_id == 7
        assert [m.payload for m in await collect(other, 1)] == [b"up"]
        # Nothing but the CONNACK went to the control stream.
        assert [type(p).__name__ for p in packets(proto, control)] == ["Connack"]


async def test_ending_a_data_stream_keeps_the_connection(qbroker: QBroker) -> None:
    topic = uid("ms-end/")
    async with raw_quic(qbroker) as proto, make_client(qbroker, "tcp") as other:
        control = await proto.mqtt_connect(uid("multi-end-"))
        data = proto.new_stream()
        subscribe(proto, data, topic, 1)
        await wait_packets(proto, data, 1)
        proto.send(data, b"", end_stream=True)
        async with asyncio.timeout(5):
            while data not in proto.ended:  # the broker ends its side too
                proto.changed.clear()
                await proto.changed.wait()
        # The subscription lives on: its messages now come on the control stream.
        await other.publish(topic, b"after", qos=1, timeout=5)
        got = (await wait_packets(proto, control, 2))[1]
        assert isinstance(got, Publish) and got.payload == b"after"
        assert not proto.terminated.done()


async def test_data_stream_pipelined_before_connack(qbroker: QBroker) -> None:
    """SUBSCRIBE on a data stream sent with CONNECT, before the CONNACK: it waits, then runs."""
    topic = uid("ms-early/")
    async with raw_quic(qbroker) as proto, make_client(qbroker, "tcp") as other:
        control = proto.new_stream()
        proto.send(control, encode(Connect(uid("early-"), MQTT_5), MQTT_5))
        data = proto.new_stream()
        subscribe(proto, data, topic, 3)
        suback = (await wait_packets(proto, data, 1))[0]
        assert isinstance(suback, Suback) and suback.packet_id == 3
        await other.publish(topic, b"hello", qos=1, timeout=5)
        got = (await wait_packets(proto, data, 2))[1]
        assert isinstance(got, Publish) and got.payload == b"hello"


async def test_resumed_session_gets_queued_messages_on_control_stream(qbroker: QBroker) -> None:
    """Streams belong to one connection: after a reconnect queued messages use control."""
    topic, client_id = uid("ms-resume/"), uid("resume-")
    connect = Connect(client_id, MQTT_5, clean_start=False, properties={0x11: 300})
    async with raw_quic(qbroker) as proto:
        control = proto.new_stream()
        proto.send(control, encode(connect, MQTT_5))
        await wait_packets(proto, control, 1)
        data = proto.new_stream()
        subscribe(proto, data, topic, 1)
        await wait_packets(proto, data, 1)
    async with make_client(qbroker, "tcp") as other:
        await other.publish(topic, b"queued", qos=1, timeout=5)
    async with raw_quic(qbroker) as proto:
        control = proto.new_stream()
        proto.send(control, encode(connect, MQTT_5))
        got = await wait_packets(proto, control, 2)
        assert isinstance(got[1], Publish) and got[1].payload == b"queued"


async def test_pingreq_on_a_data_stream_is_a_protocol_error(qbroker: QBroker) -> None:
    async with raw_quic(qbroker) as proto:
        control = await proto.mqtt_connect(uid("ping-"))
        data = proto.new_stream()
        proto.send(data, b"\xc0\x00")
        await proto.closed_by_peer(5)
        sent = packets(proto, control)
        assert type(sent[-1]).__name__ == "Disconnect"
        assert sent[-1].reason_code == 0x82  # type: ignore[attr-defined]
