"""Pool clients (and every other strategy) keep working through repeated moves and freezes.

The pool strategy probes every pool address at once, and pools contain addresses where
nothing listens (decoys, the broker's former address).  Each probe to such an address earns
an ICMP port-unreachable; these tests run enough of them to catch a client that lets them
pile up (the bug: the client's UDP socket queued every ICMP error it never read until its
receive buffer was full, after which the kernel dropped every datagram from the broker and
the connection went silent for good, looking like a false alarm that never validated).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import time

import pytest

from migration.harness import Harness
from quicmig.frames import Address

pytestmark = pytest.mark.timeout(40)

MIXED = ["proactive", "reactive", "pool", "announce", "pool", "pool", "none"]
FOLLOWERS = ("proactive", "reactive", "pool", "announce")


def socket_memory(client: object) -> int | None:
    """Bytes the kernel holds for the client's UDP socket (data + error queues), Linux only."""
    stream = getattr(client, "_stream", None)
    transport = getattr(stream, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sys.platform != "linux":
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, 55, 36)  # SO_MEMINFO: rmem_alloc first
    return int(struct.unpack("9I", raw)[0])


async def check_clients(harness: Harness, strategies: tuple[str, ...] = FOLLOWERS) -> None:
    """Every following client: nothing lost, on the broker's address, connection alive."""
    end = time.monotonic()
    here = Address(harness.source, harness.port)
    problems = []
    for client, stats in zip(harness.clients, harness.stats, strict=True):
        if stats.strategy not in strategies:
            continue
        sent = {s for s, t in stats.sent.items() if t < end - 1.0}
        got = {s for s, _ in stats.received}
        lost = sorted(sent - got)
        quic = client._stream._quic  # type: ignore[union-attr]
        where = quic._network_paths[0].addr
        try:  # the connection is alive: a publish now is acknowledged
            await asyncio.wait_for(
                client.publish(f"harness/{client.client_id}", b"alive", qos=1), 3
            )
            alive = True
        except Exception:
            alive = False
        memory = socket_memory(client)
        if lost or not here.matches(where) or not alive or client.reconnects:
            problems.append(
                f"{stats.name}: lost {len(lost)} {lost[:5]}, on {where[0]} (broker on "
                f"{here.host}), alive {alive}, socket holds {memory} bytes, "
                f"migrations {client.migrations[-2:]}"
            )
        # ICMP errors must not pile up on the socket (they fill its receive buffer).
        if memory is not None and memory > 64 << 10:
            problems.append(f"{stats.name}: its UDP socket holds {memory} bytes")
    assert not problems, "\n".join(problems)


async def test_mixed_clients_follow_three_moves_back_and_forth() -> None:
    """A -> B -> A -> B with pool clients among the others, then traffic after the last."""
    async with Harness(pool_position=2, seed=11) as harness:
        await harness.add_clients(MIXED, rate=20)
        streams = [client._stream for client in harness.clients]
        await asyncio.sleep(0.5)
        for _ in range(3):
            await harness.settle(await harness.migrate(freeze=0.25, strategy="mixed"), 1.0)
        await asyncio.sleep(1.5)
        assert [client._stream for client in harness.clients] == streams
        await check_clients(harness)


async def test_clients_survive_a_long_freeze_probing_dead_addresses() -> None:
    """A 3 s freeze: pool clients probe three dead addresses meanwhile (50 a second, then less),
    proactive ones the announced destination, where nothing listens either.

    The broker comes back where it was (the move failed and is rolled back): the clients
    must carry on over the address they never left.
    """
    async with Harness(pool_position=2, seed=5) as harness:
        await harness.add_clients(["pool", "pool", "proactive", "reactive", "announce"], rate=20)
        await asyncio.sleep(0.5)
        await harness.rollback(freeze=3.0)
        await asyncio.sleep(2.0)
        await check_clients(harness)


@pytest.mark.parametrize("size", [8, 12])
async def test_large_pool_destination_last(size: int) -> None:
    """A pool larger than aioquic's eight connection IDs, the destination last in it: the
    client needs a connection ID per probed address, and still has spares afterwards."""
    async with Harness(pool_position=size, pool_size=size, seed=7) as harness:
        await harness.add_clients(["pool", "pool"], rate=20)
        await asyncio.sleep(0.5)
        for _ in range(2):  # there and back: the decoys' IDs must not run out
            result = await harness.settle(await harness.migrate(freeze=0.25, strategy="pool"))
            assert result.summary()["moved"] == 2, result.summary()
        await check_clients(harness)
