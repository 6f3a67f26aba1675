"""Publish/subscribe across every pair of transports, over MQTT 5 and 3.1.1, with qmig's Client.

Every test asserts real deliveries: the payloads arrive, at the granted QoS, QoS 1 in order,
QoS 2 exactly once.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from client.client import Client
from mqttproto.packets import MQTT_3_1_1, MQTT_5

from .conftest import QBroker
from .helpers import VERSIONS, Paho, assert_quiet, collect, make_client, uid

TRANSPORTS = ("quic", "tcp", "tls", "mptcp")
PAIRS = list(itertools.product(TRANSPORTS, TRANSPORTS))
PER_QOS = 10


@pytest.mark.parametrize("version", list(VERSIONS), ids=list(VERSIONS))
@pytest.mark.parametrize(("pub_t", "sub_t"), PAIRS, ids=[f"{p}-to-{s}" for p, s in PAIRS])
async def test_pub_sub_all_qos(qbroker: QBroker, pub_t: str, sub_t: str, version: str) -> None:
    """QoS 0, 1 and 2 from a ``pub_t`` client reach a ``sub_t`` client: all, once, in order."""
    v = VERSIONS[version]
    root = uid("x/")
    async with (
        make_client(qbroker, sub_t, version=v) as sub,
        make_client(qbroker, pub_t, version=v) as pub,
    ):
        granted = await sub.subscribe([f"{root}/q0", f"{root}/q1", f"{root}/q2"], qos=2)
        assert granted == [2, 2, 2]
        for i in range(PER_QOS):
            for qos in (0, 1, 2):
                await pub.publish(f"{root}/q{qos}", f"{qos}:{i}".encode(), qos=qos, timeout=5)
        got = await collect(sub, 3 * PER_QOS)
        await assert_quiet(sub, 0.2)
    for qos in (0, 1, 2):
        mine = [m for m in got if m.topic == f"{root}/q{qos}"]
        assert [m.qos for m in mine] == [qos] * PER_QOS
        payloads = [m.payload for m in mine]
        # QoS 1 and 2 in publish order (per topic), each exactly once.
        assert payloads == [f"{qos}:{i}".encode() for i in range(PER_QOS)], (qos, payloads)


@pytest.mark.parametrize("version", [MQTT_5, MQTT_3_1_1], ids=["v5", "v311"])
async def test_qos2_exactly_once_many(qbroker: QBroker, version: int) -> None:
    """A burst of QoS 2 from QUIC to a QUIC and a TCP subscriber: no loss, no duplicate."""
    topic = uid("eo/")
    count = 200
    async with (
        make_client(qbroker, "quic", version=version) as q_sub,
        make_client(qbroker, "tcp", version=version) as t_sub,
        make_client(qbroker, "quic", version=version) as pub,
    ):
        await q_sub.subscribe(topic, qos=2)
        await t_sub.subscribe(topic, qos=2)
        await asyncio.gather(
            *(pub.publish(topic, str(i).encode(), qos=2, timeout=10) for i in range(count))
        )
        for sub in (q_sub, t_sub):
            got = await collect(sub, count, timeout=10)
            payloads = [m.payload for m in got]
            assert sorted(payloads, key=int) == [str(i).encode() for i in range(count)]
            assert len(set(payloads)) == count
            await assert_quiet(sub, 0.2)


async def test_qos1_order_per_topic(qbroker: QBroker) -> None:
    """Interleaved QoS 1 streams on several topics, TCP to QUIC: each topic in order."""
    root = uid("ord/")
    topics = [f"{root}/{n}" for n in range(4)]
    per_topic = 50
    async with (
        make_client(qbroker, "quic") as sub,
        make_client(qbroker, "tcp") as pub,
    ):
        await sub.subscribe(f"{root}/#", qos=1)
        sends = [
            pub.publish(t, f"{n}".encode(), qos=1, timeout=10)
            for n in range(per_topic)
            for t in topics
        ]
        await asyncio.gather(*sends)
        got = await collect(sub, per_topic * len(topics), timeout=10)
    for t in topics:
        assert [m.payload for m in got if m.topic == t] == [
            str(n).encode() for n in range(per_topic)
        ]


@pytest.mark.parametrize("pub_t", ["tcp", "quic"])
async def test_persistent_quic_session(qbroker: QBroker, pub_t: str) -> None:
    """A QUIC subscriber with a persistent session misses nothing while it is away."""
    client_id = uid("persist-")
    topic = uid("ps/")
    sub = make_client(qbroker, "quic", client_id=client_id, clean_start=False, session_expiry=60)
    async with sub:
        await sub.subscribe(topic, qos=1)
    async with make_client(qbroker, pub_t) as pub:
        for i in range(5):
            await pub.publish(topic, f"while-away-{i}".encode(), qos=1, timeout=5)
    back = make_client(qbroker, "quic", client_id=client_id, clean_start=False, session_expiry=60)
    async with back:
        assert back.session_present
        got = await collect(back, 5)
        assert [m.payload for m in got] == [f"while-away-{i}".encode() for i in range(5)]
        assert all(m.qos == 1 for m in got)
        # The subscription is part of the resumed session: live messages keep coming.
        async with make_client(qbroker, pub_t) as pub:
            await pub.publish(topic, b"live", qos=1, timeout=5)
        assert (await back.next_message(5)).payload == b"live"
        await assert_quiet(back, 0.2)
    # Clean up the session so it does not linger in the module's broker.
    async with make_client(qbroker, "quic", client_id=client_id, clean_start=True):
        pass


async def test_persistent_quic_session_mqtt311(qbroker: QBroker) -> None:
    """MQTT 3.1.1 persistent session (clean session 0) over QUIC."""
    client_id = uid("p311-")
    topic = uid("ps311/")
    opts = {"client_id": client_id, "clean_start": False, "version": MQTT_3_1_1}
    async with make_client(qbroker, "quic", **opts) as sub:
        await sub.subscribe(topic, qos=1)
    async with make_client(qbroker, "tcp", version=MQTT_3_1_1) as pub:
        for i in range(3):
            await pub.publish(topic, f"m{i}".encode(), qos=1, timeout=5)
    async with make_client(qbroker, "quic", **opts) as back:
        assert back.session_present
        got = await collect(back, 3)
        assert [m.payload for m in got] == [b"m0", b"m1", b"m2"]
    async with make_client(qbroker, "quic", client_id=client_id, version=MQTT_3_1_1):
        pass


@pytest.mark.parametrize("version", [MQTT_5, MQTT_3_1_1], ids=["v5", "v311"])
async def test_paho_tcp_to_quic_and_back(qbroker: QBroker, version: int) -> None:
    """paho over TCP publishes to a QUIC subscriber, which answers; paho receives the answer."""
    root = uid("paho/")
    paho = Paho(qbroker.port("tcp"), version)
    try:
        await asyncio.to_thread(paho.connect)
        await asyncio.to_thread(paho.subscribe, f"{root}/reply", 1)
        async with make_client(qbroker, "quic", version=version) as quic:
            await quic.subscribe(f"{root}/request", qos=2)
            for qos in (0, 1, 2):
                await asyncio.to_thread(paho.publish, f"{root}/request", f"ask{qos}".encode(), qos)
                msg = await quic.next_message(5)
                assert (msg.topic, msg.payload, msg.qos) == (
                    f"{root}/request",
                    f"ask{qos}".encode(),
                    qos,
                )
                await quic.publish(f"{root}/reply", msg.payload + b"-answered", qos=1, timeout=5)
                answer = await asyncio.to_thread(paho.get)
                assert (answer.topic, answer.payload, answer.qos) == (
                    f"{root}/reply",
                    f"ask{qos}-answered".encode(),
                    1,
                )
    finally:
        await asyncio.to_thread(paho.close)


@pytest.mark.parametrize("reader_t", ["tcp", "quic", "tls"])
async def test_retained_set_over_quic(qbroker: QBroker, reader_t: str) -> None:
    """A retained message published over QUIC is delivered to a later subscriber on TCP."""
    topic = uid("ret/")
    async with make_client(qbroker, "quic") as pub:
        await pub.publish(topic, b"kept", qos=1, retain=True, timeout=5)
    async with make_client(qbroker, reader_t) as reader:
        await reader.subscribe(topic, qos=1)
        msg = await reader.next_message(5)
        assert (msg.topic, msg.payload, msg.retain) == (topic, b"kept", True)
    # Clear it over QUIC (empty retained payload) and check a new subscriber gets nothing.
    async with make_client(qbroker, "quic") as pub:
        await pub.publish(topic, b"", qos=1, retain=True, timeout=5)
    async with make_client(qbroker, reader_t) as reader:
        await reader.subscribe(topic, qos=1)
        await assert_quiet(reader, 0.3)


async def test_paho_reads_retained_from_quic(qbroker: QBroker) -> None:
    topic = uid("ret-paho/")
    async with make_client(qbroker, "quic", version=MQTT_3_1_1) as pub:
        await pub.publish(topic, b"for paho", qos=2, retain=True, timeout=5)
    paho = Paho(qbroker.port("tcp"), MQTT_5)
    try:
        await asyncio.to_thread(paho.connect)
        await asyncio.to_thread(paho.subscribe, topic, 1)
        msg = await asyncio.to_thread(paho.get)
        assert (msg.topic, msg.payload, msg.retain, msg.qos) == (topic, b"for paho", True, 1)
    finally:
        await asyncio.to_thread(paho.close)
        async with make_client(qbroker, "tcp") as cleaner:
            await cleaner.publish(topic, b"", qos=1, retain=True, timeout=5)


def test_client_refuses_unknown_transport() -> None:
    with pytest.raises(ValueError):
        Client("127.0.0.1", 1, transport="carrier-pigeon")
