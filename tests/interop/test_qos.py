"""QoS 0/1/2 delivery, QoS downgrade, exactly-once and per-topic ordering."""

from __future__ import annotations

import pytest
from brokers import BrokerProcess

from .clients import V5, V311, ClientPool, topic_root

pytestmark = pytest.mark.interop

VERSIONS = pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])


@VERSIONS
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_qos_level_delivery_mqtt_4_3(
    broker: BrokerProcess, clients: ClientPool, version: int, qos: int
) -> None:
    """MQTT-4.3.1-1 / 4.3.2-2 / 4.3.3-2: a QoS n publish reaches a QoS 2 subscriber at QoS n."""
    topic = topic_root("qos") + "/t"
    sub = clients.paho(broker, version=version)
    assert sub.subscribe(topic, 2) == [2]
    pub = clients.paho(broker, version=version)
    assert pub.publish(topic, b"payload", qos=qos) == 0
    [msg] = sub.collector.wait_for(1)
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == (topic, b"payload", qos, False)


@VERSIONS
def test_delivered_qos_is_min_of_publish_and_granted_mqtt_3_8_4_6(
    broker: BrokerProcess, clients: ClientPool, version: int
) -> None:
    """MQTT-3.8.4-6 (v3.1.1) / MQTT-3.8.4-8 (v5): delivered QoS = min(publish QoS, granted QoS).

    Three subscribers granted QoS 0, 1 and 2 each receive publishes at QoS 0, 1 and 2.
    """
    root = topic_root("minqos")
    subs = {}
    for granted in (0, 1, 2):
        sub = clients.paho(broker, version=version)
        assert sub.subscribe(f"{root}/#", granted) == [granted]
        subs[granted] = sub
    pub = clients.paho(broker, version=version)
    for qos in (0, 1, 2):
        pub.publish(f"{root}/p{qos}", b"x", qos=qos)
    for granted, sub in subs.items():
        got = {m.topic: m.qos for m in sub.collector.wait_for(3)}
        assert got == {f"{root}/p{q}": min(q, granted) for q in (0, 1, 2)}, f"granted {granted}"


@VERSIONS
def test_qos2_exactly_once_mqtt_4_3_3(
    broker: BrokerProcess, clients: ClientPool, version: int
) -> None:
    """MQTT-4.3.3-10 (v5) / MQTT-4.3.3-2 (v3.1.1): QoS 2 messages are delivered exactly once.

    50 QoS 2 publishes; the subscriber (paho, and mosquitto_sub as a second
    implementation) sees each payload once; a final marker proves nothing else is pending.
    """
    root = topic_root("qos2")
    topic, marker = f"{root}/data", f"{root}/marker"
    sub = clients.paho(broker, version=version)
    assert sub.subscribe(f"{root}/#", 2) == [2]
    msub = clients.mosquitto_sub(f"{root}/#", broker, qos=2, count=51, version=version)
    pub = clients.paho(broker, version=version)
    for i in range(50):
        pub.publish(topic, f"m{i}".encode(), qos=2, wait=False)
    pub.publish(marker, b"end", qos=2)
    got = sub.collector.wait_for(1, topic=marker)
    data = [m.payload for m in sub.collector.messages if m.topic == topic]
    assert sorted(data) == sorted(f"m{i}".encode() for i in range(50))
    assert all(m.qos == 2 for m in got)
    assert msub.wait_exit(10) == 0, msub.output()
    assert sorted(msub.collector.payloads(topic)) == sorted(f"m{i}".encode() for i in range(50))


@VERSIONS
def test_qos1_ordering_per_topic_mqtt_4_6_0(
    broker: BrokerProcess, clients: ClientPool, version: int
) -> None:
    """MQTT-4.6.0-5/-6: messages on one topic from one publisher keep their order (QoS 1)."""
    root = topic_root("order")
    sub = clients.paho(broker, version=version)
    assert sub.subscribe(f"{root}/#", 1) == [1]
    pub = clients.paho(broker, version=version)
    n = 200
    for i in range(n):
        pub.publish(f"{root}/a", f"a{i}".encode(), qos=1, wait=False)
        pub.publish(f"{root}/b", f"b{i}".encode(), qos=1, wait=False)
    pub.publish(f"{root}/a", b"last", qos=1)
    sub.collector.wait_for(2 * n + 1, timeout=10)
    assert sub.collector.payloads(f"{root}/a") == [f"a{i}".encode() for i in range(n)] + [b"last"]
    assert sub.collector.payloads(f"{root}/b") == [f"b{i}".encode() for i in range(n)]
