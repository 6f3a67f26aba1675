"""A plain TCP MQTT client behind `qmig bridge` keeps its connection when the broker moves."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from client.bridge import Bridge
from client.client import Client
from migration.harness import Harness
from quicmig.frames import Address


@pytest.mark.timeout(40)
@pytest.mark.parametrize("follow", ["proactive", "reactive"])
async def test_the_bridge_follows_the_broker_and_the_tcp_client_notices_nothing(
    follow: str,
) -> None:
    async with Harness() as harness:
        bridge = Bridge(harness.source, harness.port, cafile=harness.cafile, follow=follow)
        host, port = await bridge.start("127.0.0.1", 0)
        client = Client(host, port, transport="tcp", client_id=f"behind-{follow}",
                        clean_start=True, session_expiry=60)  # fmt: skip
        got: list[int] = []
        try:
            await client.connect()
            await client.subscribe("bridge/t", qos=1)

            async def receive() -> None:
                async for message in client.messages():
                    got.append(int(message.payload))

            receiver = asyncio.create_task(receive())
            sent = 0

            async def publish(n: int) -> None:
                nonlocal sent
                for _ in range(n):
                    sent += 1
                    await client.publish("bridge/t", str(sent).encode(), qos=1)
                    await asyncio.sleep(0.02)

            await publish(10)
            result = harness.migrate(freeze=0.3)  # moves to 127.0.0.3 while we publish
            await asyncio.wait_for(asyncio.gather(result, publish(40)), 15)
            await asyncio.sleep(1.0)
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver
            assert sorted(set(got)) == list(range(1, sent + 1))  # nothing lost at QoS 1
            assert client.reconnects == 0  # the TCP leg never noticed
            assert bridge.moves == [Address(harness.source, harness.port)]
            # A client arriving after the move is bridged to the new address directly.
            async with Client(host, port, transport="tcp", client_id="late") as late:
                await asyncio.wait_for(late.publish("bridge/t", b"0", qos=1), 5)
        finally:
            await client.disconnect()
            await bridge.stop()
