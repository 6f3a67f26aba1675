"""120 consecutive migrations with 50 clients (issue #18), in process.

The broker moves between two addresses a hundred times, with a short freeze each time, while
50 QUIC clients (all four strategies) publish QoS 1 and QoS 2 to themselves.  What must hold
after the hundredth move as after the first: every client follows every move over the same
QUIC connection, no message is lost, none arrives twice at QoS 2, and nothing a connection
keeps per move grows with the number of moves (connection IDs, network paths, packets in
flight, migration records on the broker).  The real-container version of this is the soak,
``make soak`` (migration/soak.py).
"""

from __future__ import annotations

import asyncio

import pytest

from migration.harness import Harness
from quicmig.frames import Address

MOVES = 120  # more than the broker's history and a follower's records keep
STRATEGIES = ["proactive", "reactive", "pool", "announce"]


def _client_state(harness: Harness) -> list[dict[str, int]]:
    out = []
    for client in harness.clients:
        quic = client._stream._quic  # type: ignore[union-attr]
        out.append({
            "paths": len(quic._network_paths),
            "peer_cids": len(quic._peer_cid_available),
            "host_cids": len(quic._host_cids),
            "records": len(client.follower.records) if client.follower else 0,
        })  # fmt: skip
    return out


def _server_state(harness: Harness) -> dict[str, int]:
    assert harness.server is not None
    listener = harness.server.listeners["quic"].server
    protos = set(listener._protocols.values())
    return {
        "protocols": len(protos),
        "table": len(listener._protocols),
        "max_host_cids": max(len(p._quic._host_cids) for p in protos),
        "max_paths": max(len(p._quic._network_paths) for p in protos),
        "max_sent_packets": max(
            sum(len(s.sent_packets) for s in p._quic._loss.spaces) for p in protos
        ),
    }


async def _followed(harness: Harness, timeout: float) -> list[str]:
    """Wait until every client's connection is on the broker's address; those that are not."""
    here = Address(harness.source, harness.port)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        behind = [client.client_id for client in harness.clients
                  if not here.matches(client._stream._quic._network_paths[0].addr)]  # type: ignore[union-attr]  # fmt: skip
        if not behind or loop.time() >= deadline:
            return behind
        await asyncio.sleep(0.02)


@pytest.mark.timeout(240)
async def test_over_a_hundred_consecutive_migrations_keep_every_client_and_every_message() -> None:
    harness = Harness(pool_position=2, seed=18)
    await harness.start()
    try:
        kinds = [STRATEGIES[i % 4] for i in range(50)]
        await harness.add_clients(kinds, rate=4)
        streams = [client._stream for client in harness.clients]
        await asyncio.sleep(0.5)
        first_client: list[dict[str, int]] = []
        first_server: dict[str, int] = {}
        for move in range(MOVES):
            await harness.migrate(freeze=0.05, notice=0.02)
            # Reactive and pool clients move on silence with data outstanding, which at
            # 4 msg/s may come a publish interval after the resume: each gets 2 s.
            behind = await _followed(harness, timeout=2.0)
            assert not behind, f"move {move + 1}: {behind} did not follow the broker"
            assert all(c.reconnects == 0 for c in harness.clients), f"move {move + 1}"
            if move == 1:  # after the first round trip A -> B -> A
                first_client, first_server = _client_state(harness), _server_state(harness)
        await harness.drain(timeout=10.0)
        assert [client._stream for client in harness.clients] == streams  # no new handshake
        for stats in harness.stats:
            assert not stats.missing(), f"{stats.name} lost {stats.missing()}"
            assert not stats.qos2_duplicates(), f"{stats.name}: a QoS 2 message arrived twice"
        # Nothing kept per move grows with the number of moves.
        last_client, last_server = _client_state(harness), _server_state(harness)
        for before, after, client in zip(first_client, last_client, harness.clients, strict=True):
            name = client.client_id
            assert after["paths"] <= before["paths"] + 1, (name, before, after)
            assert after["peer_cids"] <= before["peer_cids"] + 2, (name, before, after)
            assert after["host_cids"] <= before["host_cids"], (name, before, after)
        assert last_server["protocols"] == first_server["protocols"] == 50
        assert last_server["table"] <= first_server["table"] + 50, (first_server, last_server)
        assert last_server["max_host_cids"] <= first_server["max_host_cids"]
        assert last_server["max_paths"] <= first_server["max_paths"] + 1
        assert last_server["max_sent_packets"] < 200, last_server
        assert all(after["records"] <= 64 for after in last_client)  # follower.max_records
        assert all(len(client.moves) <= 64 for client in harness.clients)  # client.max_moves
        migration = harness.server.migration  # type: ignore[union-attr]
        assert migration.outcomes["restored"] == MOVES  # counted, every one of them...
        assert len(migration.history) <= 100  # ...but only the latest are kept
    finally:
        await harness.stop()
