"""A clean QUIC disconnect is clean even when the datagram carrying DISCONNECT is lost.

TCP's kernel keeps retransmitting after close(); a QUIC client that sends CONNECTION_CLOSE
right after DISCONNECT drops whatever was not yet acknowledged, so the broker would see an
abrupt close and publish the will of a client that left cleanly.
"""

from __future__ import annotations

import time

from client.client import Client
from mqttproto.client import make_will

from .conftest import HOST, QBroker
from .helpers import UdpRelay, assert_quiet, collect, make_client, uid


async def test_lost_disconnect_is_resent_and_will_discarded(qbroker: QBroker) -> None:
    topic = uid("will/")
    relay = await UdpRelay(qbroker.port("quic")).start()
    try:
        async with make_client(qbroker, "tcp") as watcher:
            await watcher.subscribe(topic, qos=1)
            leaver = Client(
                HOST,
                relay.port,
                transport="quic",
                cafile=qbroker.ca,
                will=make_will(topic, b"gone", qos=1),
                reconnect=False,
            )
            await leaver.connect()
            await leaver.publish(topic, b"alive", qos=1, timeout=5)
            assert [m.payload for m in await collect(watcher, 1)] == [b"alive"]
            relay.drop_from_client = 1  # the datagram that carries DISCONNECT
            started = time.monotonic()
            await leaver.disconnect()
            took = time.monotonic() - started
            assert relay.dropped_from_client == 1
            # The will is only published on an unclean end: nothing may arrive.
            await assert_quiet(watcher, 1.0)
            assert took < 2.0, f"disconnect took {took:.2f} s (its bound is 2 s)"
    finally:
        relay.close()
