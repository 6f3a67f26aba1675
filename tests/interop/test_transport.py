"""Transport matrix: every real client publishes and subscribes over TCP and TLS.

MQTT-4.2.0-1 (v5) / §4.2 (v3.1.1): MQTT runs over an ordered, lossless byte
stream; TLS is the same protocol over a TLS-protected stream (§5.1, port 8883
convention).  Each test asserts a real end-to-end delivery.
"""

from __future__ import annotations

import asyncio

import pytest
from brokers import BrokerProcess

from .clients import V5, V311, ClientPool, amqtt_client, amqtt_receive, mosquitto_pub, topic_root

pytestmark = pytest.mark.interop

TRANSPORTS = pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
VERSIONS = pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])


@TRANSPORTS
@VERSIONS
def test_paho_pubsub_mqtt_4_2_0_1(
    broker: BrokerProcess, clients: ClientPool, version: int, tls: bool
) -> None:
    """MQTT-4.2.0-1: paho publisher -> broker -> paho subscriber, QoS 0/1/2."""
    root = topic_root("paho")
    sub = clients.paho(broker, version=version, tls=tls)
    assert sub.subscribe(f"{root}/#", 2) == [2]
    pub = clients.paho(broker, version=version, tls=tls)
    for qos in (0, 1, 2):
        pub.publish(f"{root}/q{qos}", f"hello {qos}".encode(), qos=qos)
    got = sub.collector.wait_for(3)
    assert sorted((m.topic, m.payload, m.qos) for m in got) == [
        (f"{root}/q{q}", f"hello {q}".encode(), q) for q in (0, 1, 2)
    ]


@TRANSPORTS
@VERSIONS
def test_mosquitto_cli_pubsub_mqtt_4_2_0_1(
    broker: BrokerProcess, clients: ClientPool, version: int, tls: bool
) -> None:
    """MQTT-4.2.0-1: mosquitto_pub -> broker -> mosquitto_sub (-C 2 exits after delivery)."""
    root = topic_root("mcli")
    sub = clients.mosquitto_sub(f"{root}/#", broker, qos=2, count=2, version=version, tls=tls)
    mosquitto_pub(broker, f"{root}/a", "one", qos=1, version=version, tls=tls)
    mosquitto_pub(broker, f"{root}/b", b"\x00two\xff", qos=2, version=version, tls=tls)
    assert sub.wait_exit(10) == 0, sub.output()
    got = sub.collector.messages
    assert [(m.topic, m.payload, m.qos) for m in got] == [
        (f"{root}/a", b"one", 1),
        (f"{root}/b", b"\x00two\xff", 2),
    ]


@TRANSPORTS
async def test_amqtt_pubsub_mqtt_4_2_0_1(broker: BrokerProcess, tls: bool) -> None:
    """MQTT-4.2.0-1: amqtt publisher -> broker -> amqtt subscriber (MQTT 3.1.1), QoS 0/1/2."""
    root = topic_root("amqtt")
    async with amqtt_client(broker, tls=tls) as sub, amqtt_client(broker, tls=tls) as pub:
        assert await sub.subscribe([(f"{root}/#", 2)]) == [2]
        for qos in (0, 1, 2):
            await pub.publish(f"{root}/q{qos}", f"amqtt {qos}".encode(), qos=qos)
        got = await amqtt_receive(sub, 3)
    assert sorted((m.topic, m.payload, m.qos) for m in got) == [
        (f"{root}/q{q}", f"amqtt {q}".encode(), q) for q in (0, 1, 2)
    ]


@TRANSPORTS
async def test_cross_client_paho_mosquitto_amqtt_mqtt_4_2_0_1(
    broker: BrokerProcess, clients: ClientPool, tls: bool
) -> None:
    """MQTT-4.2.0-1: paho v5 -> mosquitto_sub (v3.1.1) + amqtt, and back to paho.

    Also checks that a message crosses protocol versions unchanged (v5 publisher,
    v3.1.1 subscribers and vice versa).
    """
    root = topic_root("cross")
    paho_sub = await asyncio.to_thread(clients.paho, broker, version=V5, tls=tls)
    await asyncio.to_thread(paho_sub.subscribe, f"{root}/back/#", 1)
    msub = await asyncio.to_thread(
        clients.mosquitto_sub, f"{root}/out", broker, qos=1, count=1, version=V311, tls=tls
    )
    async with amqtt_client(broker, tls=tls) as asub:
        assert await asub.subscribe([(f"{root}/out", 1)]) == [1]
        paho_pub = await asyncio.to_thread(clients.paho, broker, version=V5, tls=tls)
        await asyncio.to_thread(paho_pub.publish, f"{root}/out", b"from paho", 1)
        [a_msg] = await amqtt_receive(asub, 1)
        assert (a_msg.topic, a_msg.payload, a_msg.qos) == (f"{root}/out", b"from paho", 1)
        assert await asyncio.to_thread(msub.wait_exit, 10) == 0, msub.output()
        [m_msg] = msub.collector.messages
        assert (m_msg.topic, m_msg.payload, m_msg.qos) == (f"{root}/out", b"from paho", 1)

        # ... and back: amqtt and mosquitto_pub publish, paho receives.
        await asub.publish(f"{root}/back/amqtt", b"from amqtt", qos=1)
        await asyncio.to_thread(
            mosquitto_pub,
            broker,
            f"{root}/back/mosq",
            "from mosquitto_pub",
            qos=1,
            version=V311,
            tls=tls,
        )
        got = await asyncio.to_thread(paho_sub.collector.wait_for, 2)
    assert sorted((m.topic, m.payload, m.qos) for m in got) == [
        (f"{root}/back/amqtt", b"from amqtt", 1),
        (f"{root}/back/mosq", b"from mosquitto_pub", 1),
    ]
