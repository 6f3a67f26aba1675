"""Retained messages, retain handling / retain-as-published, `$` topics and `$SYS`."""

from __future__ import annotations

import re

import pytest
from brokers import BrokerProcess

from .clients import V5, V311, ClientPool, Received, topic_root, uid

pytestmark = pytest.mark.interop

VERSIONS = pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])


@VERSIONS
def test_retained_delivered_on_subscribe_mqtt_3_3_1_5(
    broker: BrokerProcess, clients: ClientPool, version: int
) -> None:
    """MQTT-3.3.1-5 / MQTT-3.3.1-9 (v5), MQTT-3.3.1-5 / MQTT-3.3.1-8 / MQTT-3.3.1-9 (v3.1.1).

    A retained message is stored and sent to a new subscriber with RETAIN=1; a live
    delivery to an existing subscription carries RETAIN=0; only the last one is kept.
    """
    root = topic_root("ret")
    topic = f"{root}/state"
    live = clients.paho(broker, version=version)
    assert live.subscribe(topic, 1) == [1]
    pub = clients.paho(broker, version=version)
    pub.publish(topic, b"old", qos=1, retain=True)
    pub.publish(topic, b"current", qos=1, retain=True)
    got = live.collector.wait_for(2)
    assert [(m.payload, m.retain) for m in got] == [(b"old", False), (b"current", False)]

    late = clients.paho(broker, version=version)
    assert late.subscribe(f"{root}/#", 1) == [1]
    [msg] = late.collector.wait_for(1)
    assert (msg.topic, msg.payload, msg.retain, msg.qos) == (topic, b"current", True, 1)


@VERSIONS
def test_empty_retained_payload_clears_mqtt_3_3_1_6_7(
    broker: BrokerProcess, clients: ClientPool, version: int
) -> None:
    """MQTT-3.3.1-6 / -7 (v5), MQTT-3.3.1-10 / -11 (v3.1.1): a zero-byte retained publish
    is delivered normally to current subscribers, removes the retained message and is not
    itself stored."""
    root = topic_root("clear")
    topic, marker = f"{root}/state", f"{root}/zz-marker"
    live = clients.paho(broker, version=version)
    assert live.subscribe(topic, 1) == [1]
    pub = clients.paho(broker, version=version)
    pub.publish(topic, b"to be cleared", qos=1, retain=True)
    pub.publish(topic, b"", qos=1, retain=True)
    assert [m.payload for m in live.collector.wait_for(2)] == [b"to be cleared", b""]

    late = clients.paho(broker, version=version)
    assert late.subscribe(f"{root}/#", 1) == [1]
    pub.publish(marker, b"m", qos=1)
    late.collector.wait_for(1, topic=marker)
    assert [m.topic for m in late.collector.messages] == [marker]


def test_retain_handling_0_1_2_mqtt_3_3_1_9_10_11(
    broker: BrokerProcess, clients: ClientPool
) -> None:
    """MQTT-3.3.1-9 / -10 / -11 and MQTT-3.8.4-4 (v5 retain handling).

    0: retained messages are sent on every subscribe (also when re-subscribing);
    1: sent only if the subscription did not exist yet; 2: never sent.
    """
    root = topic_root("rh")
    topic, marker = f"{root}/state", f"{root}/marker"
    pub = clients.paho(broker, version=V5)
    pub.publish(topic, b"kept", qos=1, retain=True)

    def retained_after(client_sub: list[tuple[int, str]]) -> dict[str, int]:
        """Subscribe with each retain handling, then count retained copies received."""
        c = clients.paho(broker, version=V5)
        assert c.subscribe(marker, 1) == [1]
        counts: dict[str, int] = {}
        for i, (rh, label) in enumerate(client_sub):
            assert c.subscribe(topic, 1, retain_handling=rh) == [1]
            pub.publish(marker, str(i).encode(), qos=1)
            c.collector.wait_for(i + 1, topic=marker)
            counts[label] = sum(1 for m in c.collector.messages if m.topic == topic)
        return counts

    assert retained_after([(0, "first"), (0, "again")]) == {"first": 1, "again": 2}
    assert retained_after([(1, "first"), (1, "again")]) == {"first": 1, "again": 1}
    assert retained_after([(2, "first"), (2, "again")]) == {"first": 0, "again": 0}


def test_retain_as_published_mqtt_3_3_1_12_13(broker: BrokerProcess, clients: ClientPool) -> None:
    """MQTT-3.3.1-12 / -13: retain-as-published 0 clears RETAIN on live deliveries, 1 keeps
    the publisher's flag."""
    root = topic_root("rap")
    topic = f"{root}/t"
    rap0 = clients.paho(broker, version=V5)
    assert rap0.subscribe(topic, 1, retain_as_published=False) == [1]
    rap1 = clients.paho(broker, version=V5)
    assert rap1.subscribe(topic, 1, retain_as_published=True) == [1]
    pub = clients.paho(broker, version=V5)
    pub.publish(topic, b"retained", qos=1, retain=True)
    pub.publish(topic, b"plain", qos=1, retain=False)
    pub.publish(topic, b"", qos=1, retain=True)  # clean up the retained message
    assert [(m.payload, m.retain) for m in rap0.collector.wait_for(3)] == [
        (b"retained", False),
        (b"plain", False),
        (b"", False),
    ]
    assert [(m.payload, m.retain) for m in rap1.collector.wait_for(3)] == [
        (b"retained", True),
        (b"plain", False),
        (b"", True),
    ]


@VERSIONS
def test_dollar_topics_not_matched_by_wildcards_mqtt_4_7_2_1(
    broker: BrokerProcess, clients: ClientPool, version: int
) -> None:
    """MQTT-4.7.2-1: filters starting with '#' or '+' never match topics starting with '$'.

    A '#' and a '+/broker/#' subscriber stay subscribed while a '$SYS/#' subscriber sees
    live $SYS updates; afterwards a normal marker reaches the wildcard subscribers and
    none of them ever got a '$' topic.
    """
    hash_sub = clients.paho(broker, version=version)
    assert hash_sub.subscribe("#", 0) == [0]
    plus_sub = clients.paho(broker, version=version)
    assert plus_sub.subscribe("+/broker/#", 0) == [0]
    sys_sub = clients.paho(broker, version=version)
    assert sys_sub.subscribe("$SYS/#", 0) == [0]
    # wait for a *live* (non-retained) $SYS publication made while '#' was subscribed
    sys_sub.collector.wait_until(
        lambda items: any(not m.retain for m in items), 5.0, "a live $SYS update"
    )
    marker = uid("dollar-") + "/broker/marker"  # matched by both '#' and '+/broker/#'
    pub = clients.paho(broker, version=version)
    pub.publish(marker, b"m", qos=1)
    hash_sub.collector.wait_for(1, topic=marker)
    plus_sub.collector.wait_for(1, topic=marker)
    for sub in (hash_sub, plus_sub):
        dollar = [m.topic for m in sub.collector.messages if m.topic.startswith("$")]
        assert dollar == []
    assert all(m.topic.startswith("$SYS/") for m in sys_sub.collector.messages)


SYS_TOPICS = (
    "$SYS/broker/uptime",
    "$SYS/broker/clients/connected",
    "$SYS/broker/messages/received",
    "$SYS/broker/messages/sent",
    "$SYS/broker/version",
)


def _first_int(msg: Received) -> int:
    found = re.search(rb"\d+", msg.payload)
    assert found, f"no number in {msg.topic}={msg.payload!r}"
    return int(found.group())


def test_sys_broker_statistics_present(broker: BrokerProcess, clients: ClientPool) -> None:
    """$SYS statistics (MQTT §4.7.2, names as mosquitto): uptime, connected clients,
    messages received/sent and version are published and updated every --sys-interval (1 s).
    """
    sub = clients.paho(broker, version=V5)
    assert sub.subscribe([(t, 0) for t in SYS_TOPICS]) == [0] * len(SYS_TOPICS)

    def all_seen(items: list[Received]) -> bool:
        return {m.topic for m in items} >= set(SYS_TOPICS)

    sub.collector.wait_until(all_seen, 4.0, f"all of {SYS_TOPICS}")
    first_uptime = sub.collector.matching("$SYS/broker/uptime")[0]
    # a later uptime publication with a larger value shows the periodic update
    sub.collector.wait_until(
        lambda items: any(
            m.topic == "$SYS/broker/uptime" and _first_int(m) > _first_int(first_uptime)
            for m in items
        ),
        4.0,
        "an increased $SYS/broker/uptime",
    )
    [connected, *_] = sub.collector.matching("$SYS/broker/clients/connected")
    assert _first_int(connected) >= 1
    for name in ("received", "sent"):
        [count, *_] = sub.collector.matching(f"$SYS/broker/messages/{name}")
        assert _first_int(count) >= 0
    [version, *_] = sub.collector.matching("$SYS/broker/version")
    assert version.payload.strip()
