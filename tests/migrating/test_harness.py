"""Server-side QUIC migration end to end, in process: a live broker moves between addresses.

20 clients (five per strategy) publish QoS 1 and QoS 2 to themselves through two migrations
(A to B and back to A) with a freeze each time, as CRIU would impose; with and without a 3 %
loss relay.  Every message must arrive, none twice at QoS 2, and every client must end on
the broker's new address over the same QUIC connection (no new handshake).
"""

from __future__ import annotations

import asyncio

import pytest

from migration.harness import Harness, MigrationResult


async def run_two_migrations(
    loss: float, strategies: list[str]
) -> tuple[Harness, list[MigrationResult], bool]:
    harness = Harness(loss=loss, pool_position=2, seed=7)
    await harness.start()
    try:
        await harness.add_clients([s for s in strategies for _ in range(5)], rate=20)
        streams = [client._stream for client in harness.clients]
        await asyncio.sleep(0.5)
        results = []
        for _ in range(2):
            result = await harness.migrate(freeze=0.25, strategy="mixed")
            results.append(await harness.settle(result, after=1.2))
        await harness.drain(timeout=5.0)
        same = [client._stream for client in harness.clients] == streams
        return harness, results, same
    finally:
        await harness.stop()


# Pool clients probe addresses where nothing listens (decoys, the broker's former address):
# they used to go deaf among many others (tests/migrating/test_pool.py says why).
EVERY = ["proactive", "reactive", "pool", "announce"]


@pytest.mark.parametrize(
    ("loss", "strategies"), [(0.0, EVERY), (0.03, EVERY)], ids=["no-loss", "loss3"]
)
async def test_every_strategy_follows_two_migrations_without_loss(
    loss: float, strategies: list[str]
) -> None:
    harness, results, same_connections = await run_two_migrations(loss, strategies)
    assert same_connections  # no client opened a new QUIC connection
    for result in results:
        assert len(result.clients) == 5 * len(strategies)
        for client in result.clients:
            name = client["name"]
            assert client["moved"], f"{name} did not follow the broker: {client}"
            assert client["reconnects"] == 0, name
            assert client["interruption_ms"] is not None, name
            assert client["migrations"] and client["migrations"][0]["validated_at"], name
    for stats in harness.stats:
        # Everything published arrived (the harness drained: publishers stopped, and every
        # message had time to arrive; what is missing now was lost, not late).
        assert not stats.missing(), f"{stats.name} lost {stats.missing()}"
        assert not stats.qos2_duplicates(), f"{stats.name}: a QoS 2 message arrived twice"


async def test_the_broker_announces_only_to_clients_that_advertised_support() -> None:
    async with Harness() as harness:
        await harness.add_clients(["none", "proactive"], rate=5)
        status = harness.server.migration.status()  # type: ignore[union-attr]
        assert status["quic_clients_by_strategy"]["none"] == 1
        assert status["quic_clients_by_strategy"]["explicit"] == 1
        told = harness.server.migration.prepare(  # type: ignore[union-attr]
            __import__("quicmig.frames").frames.Address("127.0.0.3", harness.port)
        )
        assert told["quic_notified"] == 1


async def test_a_client_never_moves_to_an_address_it_was_not_told_about() -> None:
    """The broker reappears somewhere unannounced: clients must not follow (nor be hijacked)."""
    async with Harness(destination="127.0.0.3") as harness:
        await harness.add_clients(["proactive", "announce", "reactive"], rate=20)
        await asyncio.sleep(0.3)
        harness._go_dark()
        await asyncio.sleep(0.1)
        await harness._come_back("127.0.0.4")  # not prepared, not in any pool
        from quicmig.frames import Address

        await harness.server.migration.restored(Address("127.0.0.4", harness.port))  # type: ignore[union-attr]
        await asyncio.sleep(0.8)
        for client in harness.clients:
            quic = client._stream._quic  # type: ignore[union-attr]
            assert quic._network_paths[0].addr[0].endswith("127.0.0.2"), client.client_id


@pytest.mark.parametrize("position", [1, 3])
async def test_pool_clients_find_the_broker_whatever_its_position(position: int) -> None:
    """All pool addresses are probed at once: the destination's rank does not matter."""
    async with Harness(pool_position=position, seed=3) as harness:
        await harness.add_clients(["pool"] * 3, rate=50)
        await asyncio.sleep(0.5)
        result = await harness.settle(await harness.migrate(freeze=0.25, strategy="pool"), 1.0)
        for client in result.clients:
            assert client["moved"] and client["lost"] == 0, client


@pytest.mark.timeout(30)
async def test_a_rolled_back_move_leaves_every_client_where_it_was() -> None:
    """prepare(B), freeze, the broker comes back on A (the move failed), rollback(A).

    rollback's SERVER_MIGRATION names A ("stay"): proactive clients stop probing B, reactive
    ones never start, pool clients' silence probes are a false alarm; nobody loses a message
    or leaves A, and every connection still carries traffic afterwards.
    """
    from quicmig.frames import Address

    strategies = ["proactive", "reactive", "pool", "announce"]
    async with Harness(pool_position=2, seed=9) as harness:
        await harness.add_clients([s for s in strategies for _ in range(2)], rate=20)
        streams = [client._stream for client in harness.clients]
        await asyncio.sleep(0.5)
        result = await harness.settle(await harness.rollback(freeze=0.3, strategy="stay"), 1.5)
        here = Address(harness.source, harness.port)
        assert harness.source == "127.0.0.2"
        assert [client._stream for client in harness.clients] == streams
        for client, report in zip(harness.clients, result.clients, strict=True):
            name = report["name"]
            assert report["moved"], f"{name} left the broker's address: {report}"  # still on A
            assert report["lost"] == 0 and report["reconnects"] == 0, report
            follower = client.follower
            assert follower is not None and not follower.probing, name
            assert follower.current == here, name
            if client.follower.strategy.value in ("proactive", "reactive"):
                assert follower.announced == here, name  # the "stay" notice arrived
            reason = await asyncio.wait_for(
                client.publish(f"harness/{client.client_id}", b"after", qos=1), 3
            )
            assert reason < 0x80, name


async def test_the_freeze_waits_until_every_client_has_acknowledged_the_destination() -> None:
    """Everything the broker sends after prepare is lost for 0.3 s, longer than the notice.

    A client whose SERVER_MIGRATION is still in flight at the freeze can never learn the
    destination (it drops datagrams from server addresses it does not know): it went deaf
    until its keep-alive.  The move now waits, as pre-checkpoint does, until every told
    client has acknowledged the frame, and each one follows.
    """
    async with Harness(seed=5) as harness:
        await harness.add_clients(["proactive", "reactive"] * 3, rate=20)
        await asyncio.sleep(0.3)
        harness.blackout(0.3)
        result = await harness.settle(await harness.migrate(freeze=0.2, notice=0.1), 1.0)
        assert result.freeze_at - result.prepare_at >= 0.3  # it waited out the blackout
        for client in result.clients:
            assert client["moved"], f"{client['name']} did not follow the broker: {client}"
            assert client["reconnects"] == 0, client


async def test_pre_checkpoint_counts_clients_that_never_acknowledged() -> None:
    """A client that cannot be reached delays the freeze by the grace at most, and is named
    in the step's result rather than waited for."""
    from quicmig.frames import Address

    async with Harness(seed=6) as harness:
        await harness.add_clients(["proactive", "none"], rate=5)
        migration = harness.server.migration  # type: ignore[union-attr]
        harness.blackout(10)
        told = migration.prepare(Address(harness.destination, harness.port))
        assert told["quic_notified"] == 1  # the client without the extension is not told
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await migration.pre_checkpoint(None, grace=0.3)
        assert 0.3 <= loop.time() - started < 1.0
        assert result["quic_unacknowledged"] == 1
        await migration.rollback()


async def test_every_strategy_rides_out_a_freeze_longer_than_its_keep_alive() -> None:
    """A broker with 10,000 clients is frozen for tens of seconds, longer than many IoT
    clients' keep alive; a client that knows the broker is moving (told, or probing for it)
    must not take that silence for a dead connection and open a new one.  Keep alive 3 s,
    frozen 3.6 s: without the move grace every client reconnects."""
    async with Harness(pool_position=2, seed=11) as harness:
        await harness.add_clients(EVERY, rate=10, keep_alive=3)
        streams = [client._stream for client in harness.clients]
        await asyncio.sleep(0.5)
        result = await harness.settle(await harness.migrate(freeze=3.6), after=1.5)
        await harness.drain(timeout=5.0)
        for client in result.clients:
            assert client["reconnects"] == 0, f"{client['name']} reconnected: {client}"
            assert client["moved"], f"{client['name']} did not follow the broker: {client}"
        assert [client._stream for client in harness.clients] == streams
        for stats in harness.stats:
            assert not stats.missing(), f"{stats.name} lost {stats.missing()}"


async def test_a_connection_lost_during_an_announced_move_reconnects_where_the_broker_went() -> (
    None
):
    """A client that does give up during the freeze (no move grace here) must reconnect to
    the announced destination, not knock at the address the broker left for good."""
    async with Harness(seed=12) as harness:
        await harness.add_clients(["proactive"], rate=10, keep_alive=2, move_grace=0)
        await asyncio.sleep(0.5)
        result = await harness.settle(await harness.migrate(freeze=4.0), after=4.0)
        await harness.drain(timeout=5.0)
        (client,) = result.clients
        assert client["reconnects"] == 1, client  # the verdict came during the freeze
        qmig = harness.clients[0]
        assert (qmig.host, qmig.port) == (harness.source, harness.port)  # where it went
        assert qmig.connected
        assert not harness.stats[0].missing(), "QoS 1/2 messages were lost"


async def test_a_pool_client_that_gives_up_during_a_move_finds_the_broker_in_its_pool() -> None:
    """Never told where the broker went, a pool client whose connection died during the
    freeze tries its pool's addresses in turn: where it answers, the session resumes."""
    async with Harness(pool_position=2, seed=13) as harness:
        await harness.add_clients(["pool"], rate=10, keep_alive=2, move_grace=0)
        await asyncio.sleep(0.5)
        moved = await harness.migrate(freeze=4.0)
        qmig = harness.clients[0]
        await asyncio.wait_for(qmig.wait_connected(), 15.0)  # backing off: up to 2 s apart
        await harness.settle(moved, after=1.0)
        await harness.drain(timeout=5.0)
        assert (qmig.host, qmig.port) == (harness.source, harness.port)
        assert qmig.reconnects == 1 and qmig.session_present
        assert not harness.stats[0].missing(), "QoS 1/2 messages were lost"
