"""Issue #13 findings 5 and 6 against a real broker, over TCP and QUIC.

* A SUBSCRIBE listing a filter 40 times is one subscription: each retained message comes
  once (it came 40 times), in paced batches, and live messages still flow.
* A PUBLISH of ~1 MB of empty user properties is refused with DISCONNECT 0x97 (Quota
  exceeded), closing only that client.
"""

from __future__ import annotations

import pytest

from mqttproto.codec import PacketReader, encode_varint
from mqttproto.packets import MQTT_5, Disconnect

from .conftest import QBroker
from .helpers import assert_quiet, collect, make_client, uid
from .test_quic_bad_input import raw_quic

RETAINED = 3000  # several replay batches (REPLAY_STEP_MESSAGES is 1024)


@pytest.mark.parametrize("transport", ["tcp", "quic"])
async def test_repeated_filter_gets_each_retained_message_once(
    qbroker: QBroker, transport: str
) -> None:
    root = uid("dup/")
    async with make_client(qbroker, "tcp") as pub:
        for i in range(RETAINED):
            await pub.publish(f"{root}/{i}", b"v", qos=0, retain=True)
        await pub.publish(f"{root}/last", b"v", qos=1, retain=True, timeout=10)  # all stored
        async with make_client(qbroker, transport) as sub:
            granted = await sub.subscribe([f"{root}/#"] * 40, qos=1)
            assert granted == [1] * 40
            got = await collect(sub, RETAINED + 1, timeout=20)
            await assert_quiet(sub, 0.5)  # no second copy of anything
            assert sorted(m.topic for m in got) == sorted(
                [f"{root}/{i}" for i in range(RETAINED)] + [f"{root}/last"]
            )
            assert all(m.retain for m in got)
            await pub.publish(f"{root}/live", b"now", qos=1, timeout=5)
            [live] = await collect(sub, 1)
            assert (live.topic, live.payload) == (f"{root}/live", b"now")
            await assert_quiet(sub, 0.3)


def _publish_of_empty_user_properties(topic: str, count: int) -> bytes:
    props = b"\x26\x00\x00\x00\x00" * count
    name = topic.encode()
    body = len(name).to_bytes(2, "big") + name + encode_varint(len(props)) + props + b"x"
    return b"\x31" + encode_varint(len(body)) + body


async def test_publish_of_200k_user_properties_refused_over_quic(qbroker: QBroker) -> None:
    topic = uid("up/")
    async with make_client(qbroker, "tcp") as bystander:
        await bystander.subscribe(f"{topic}/#", qos=1)
        async with raw_quic(qbroker) as proto:
            sid = await proto.mqtt_connect(uid("up-"))
            proto.send(sid, _publish_of_empty_user_properties(f"{topic}/big", 200_000))
            await proto.closed_by_peer(10)
            sent = PacketReader(MQTT_5).feed(bytes(proto.received[sid]))
            assert isinstance(sent[-1], Disconnect) and sent[-1].reason_code == 0x97
        await assert_quiet(bystander, 0.3)  # nothing of it was routed
        async with make_client(qbroker, "quic") as pub:  # and QUIC clients carry on
            await pub.publish(f"{topic}/ok", b"fine", qos=1, timeout=5)
        [msg] = await collect(bystander, 1)
        assert (msg.topic, msg.payload) == (f"{topic}/ok", b"fine")
    assert qbroker.alive()
