"""qmig's Client in multi-stream mode: streams per topic or per QoS, against the real broker.

What a user cares about: every QoS arrives exactly as in single-stream mode, across
transports, and each topic (or QoS) really has its own QUIC stream.
"""

from __future__ import annotations

import pytest

from client.client import Client

from .conftest import QBroker
from .helpers import assert_quiet, collect, make_client, uid


def data_streams(client: Client) -> dict[int, int]:
    """The client's channel -> QUIC stream map (its data streams)."""
    return dict(client._stream._channel_streams)  # type: ignore[union-attr]


@pytest.mark.parametrize("streams", ["per-topic", "per-qos"])
@pytest.mark.parametrize("other", ["quic", "tcp"])
async def test_all_qos_both_ways(qbroker: QBroker, streams: str, other: str) -> None:
    root = uid("msc/")
    topics = [f"{root}/q{q}" for q in (0, 1, 2)]
    async with (
        make_client(qbroker, "quic", streams=streams) as multi,
        make_client(qbroker, other) as plain,
    ):
        for q, topic in enumerate(topics):
            assert await multi.subscribe(f"{topic}/down", qos=q) == [q]
        await plain.subscribe(f"{root}/+/up", qos=2)
        for i in range(10):
            for q, topic in enumerate(topics):
                await plain.publish(f"{topic}/down", f"{q}:{i}".encode(), qos=q, timeout=5)
                await multi.publish(f"{topic}/up", f"{q}:{i}".encode(), qos=q, timeout=5)
        down = await collect(multi, 30)
        up = await collect(plain, 30)
        await assert_quiet(multi, 0.2)
        streams_used = data_streams(multi)
    for got in (down, up):
        for q, topic in enumerate(topics):
            mine = [m.payload for m in got if m.topic.startswith(topic)]
            assert mine == [f"{q}:{i}".encode() for i in range(10)], (q, mine)
    # per-topic: 3 subscriptions + 3 publish topics; per-qos: one stream per QoS level.
    assert len(streams_used) == (6 if streams == "per-topic" else 3), streams_used
    assert 0 not in streams_used.values()  # stream 0 is the control stream


async def test_multi_stream_session_resumes(qbroker: QBroker) -> None:
    """A persistent session subscribed on a data stream gets what was queued while away."""
    topic, client_id = uid("msc-resume/"), uid("msc-")
    opts = dict(client_id=client_id, clean_start=False, session_expiry=300, streams="per-topic")
    async with make_client(qbroker, "quic", **opts) as first:
        await first.subscribe(topic, qos=1)
    async with make_client(qbroker, "tcp") as pub:
        for i in range(5):
            await pub.publish(topic, f"q{i}".encode(), qos=1, timeout=5)
    async with make_client(qbroker, "quic", **opts) as again:
        assert again.session_present
        got = await collect(again, 5)
    assert [m.payload for m in got] == [f"q{i}".encode() for i in range(5)]


def test_streams_need_quic() -> None:
    with pytest.raises(ValueError, match="needs transport='quic'"):
        Client("127.0.0.1", 1883, transport="tcp", streams="per-topic")


async def test_many_topics_share_a_bounded_set_of_streams(qbroker: QBroker) -> None:
    """More topics than a broker lets a client keep streams open: they share streams."""
    from client.client import MAX_DATA_STREAMS

    root = uid("msc-many/")
    count = MAX_DATA_STREAMS * 3  # beyond aioquic's 128 concurrent streams too
    async with (
        make_client(qbroker, "quic", streams="per-topic") as multi,
        make_client(qbroker, "tcp") as plain,
    ):
        await plain.subscribe(f"{root}/#", qos=1)
        for i in range(count):
            await multi.publish(f"{root}/{i}", b"x", qos=1, timeout=5)
        got = await collect(plain, count)
        assert len(data_streams(multi)) == MAX_DATA_STREAMS
    assert sorted(m.topic for m in got) == sorted(f"{root}/{i}" for i in range(count))
