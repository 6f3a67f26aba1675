"""Topic filters and subscription features: wildcards, overlap, identifiers, no-local,
shared subscriptions, topic aliases and message expiry."""

from __future__ import annotations

import time

import pytest
from brokers import BrokerProcess
from paho.mqtt.packettypes import PacketTypes

from .clients import V5, V311, ClientPool, topic_root, uid, v5_props

pytestmark = pytest.mark.interop

VERSIONS = pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])


@VERSIONS
def test_wildcards_plus_and_hash_mqtt_4_7_1(
    broker: BrokerProcess, clients: ClientPool, version: int
) -> None:
    """MQTT-4.7.1-1 / -2 and §4.7.1.2-3: '#' matches the parent and any number of levels,
    '+' exactly one (possibly empty) level."""
    r = topic_root("wild")
    marker = f"{r}-marker"
    topics = [r, f"{r}/a", f"{r}/a/c", f"{r}/b/c", f"{r}//c", f"{r}/a/c/d", f"{r}x/a"]
    expected = {
        f"{r}/+": [f"{r}/a"],
        f"{r}/#": [r, f"{r}/a", f"{r}/a/c", f"{r}/b/c", f"{r}//c", f"{r}/a/c/d"],
        f"{r}/+/c": [f"{r}/a/c", f"{r}/b/c", f"{r}//c"],
        f"{r}/a/#": [f"{r}/a", f"{r}/a/c", f"{r}/a/c/d"],
        f"{r}/+/+/d": [f"{r}/a/c/d"],
    }
    subs = {}
    for filt in expected:
        sub = clients.paho(broker, version=version)
        assert sub.subscribe([(filt, 1), (marker, 1)]) == [1, 1]
        subs[filt] = sub
    pub = clients.paho(broker, version=version)
    for t in topics:
        pub.publish(t, t.encode(), qos=1)
    pub.publish(marker, b"end", qos=1)
    for filt, sub in subs.items():
        sub.collector.wait_for(1, topic=marker)
        got = [m.topic for m in sub.collector.messages if m.topic != marker]
        assert got == expected[filt], filt


@VERSIONS
def test_overlapping_subscriptions_max_qos_mqtt_3_3_4_2(
    broker: BrokerProcess, clients: ClientPool, version: int
) -> None:
    """MQTT-3.3.4-2 (v5) / MQTT-3.3.5-1 (v3.1.1): one client with two matching filters gets
    the message respecting the maximum QoS of the matching subscriptions; the server MAY
    send one extra copy per additional matching subscription, each at that
    subscription's QoS."""
    r = topic_root("overlap")
    c = clients.paho(broker, version=version)
    assert c.subscribe(f"{r}/#", 0) == [0]
    assert c.subscribe(f"{r}/+", 2) == [2]
    # marker at QoS 2 too: paho hands a QoS 2 message to the app only after PUBREL
    assert c.subscribe(f"{r}-marker", 2) == [2]
    pub = clients.paho(broker, version=version)
    pub.publish(f"{r}/x", b"both", qos=2)
    pub.publish(f"{r}-marker", b"end", qos=2)
    c.collector.wait_for(1, topic=f"{r}-marker")
    copies = c.collector.matching(f"{r}/x")
    assert 1 <= len(copies) <= 2, copies
    assert max(m.qos for m in copies) == 2, copies
    if len(copies) == 2:
        assert sorted(m.qos for m in copies) == [0, 2], copies


def test_overlapping_subscription_identifiers_v5_mqtt_3_3_4_3_4_5(
    broker: BrokerProcess, clients: ClientPool
) -> None:
    """MQTT-3.3.4-2 / -3 / -4 / -5: with overlapping subscriptions carrying identifiers 1
    (QoS 0) and 2 (QoS 2), a single copy must carry both identifiers at QoS 2; if the server
    sends one copy per subscription, each carries its own identifier at its own QoS."""
    r = topic_root("overlapid")
    c = clients.paho(broker, version=V5)
    assert c.subscribe(f"{r}/#", 0, sub_id=1) == [0]
    assert c.subscribe(f"{r}/+", 2, sub_id=2) == [2]
    assert c.subscribe(f"{r}-marker", 2) == [2]  # QoS 2 marker: see the test above
    pub = clients.paho(broker, version=V5)
    pub.publish(f"{r}/x", b"both", qos=2)
    pub.publish(f"{r}-marker", b"end", qos=2)
    c.collector.wait_for(1, topic=f"{r}-marker")
    copies = c.collector.matching(f"{r}/x")
    if len(copies) == 1:  # MQTT-3.3.4-4
        [msg] = copies
        assert (msg.qos, sorted(msg.sub_ids)) == (2, [1, 2]), msg
    else:  # MQTT-3.3.4-5
        assert sorted((m.sub_ids[0], m.qos) for m in copies) == [(1, 0), (2, 2)], copies
        assert all(len(m.sub_ids) == 1 for m in copies), copies
    # the marker subscription has no identifier, so its messages carry none
    assert c.collector.matching(f"{r}-marker")[0].sub_ids == []


def test_subscription_identifier_v5_mqtt_3_3_4_3(
    broker: BrokerProcess, clients: ClientPool
) -> None:
    """MQTT-3.3.4-3 / §3.8.2.1.2: messages carry the Subscription Identifier of the
    subscription they matched; a new SUBSCRIBE for the same filter replaces it."""
    r = topic_root("subid")
    c = clients.paho(broker, version=V5)
    assert c.subscribe(f"{r}/a", 1, sub_id=7) == [1]
    assert c.subscribe(f"{r}/b", 1, sub_id=268435455) == [1]  # maximum value
    pub = clients.paho(broker, version=V5)
    pub.publish(f"{r}/a", b"1", qos=1)
    pub.publish(f"{r}/b", b"2", qos=1)
    got = c.collector.wait_for(2)
    assert [(m.topic, m.sub_ids) for m in got] == [(f"{r}/a", [7]), (f"{r}/b", [268435455])]
    assert c.subscribe(f"{r}/a", 1, sub_id=9) == [1]  # MQTT-3.8.4-3 replaces the subscription
    pub.publish(f"{r}/a", b"3", qos=1)
    assert c.collector.wait_for(3)[-1].sub_ids == [9]


def test_no_local_v5_mqtt_3_8_3_3(broker: BrokerProcess, clients: ClientPool) -> None:
    """MQTT-3.8.3-3: with No Local, a client's own publications are not forwarded back to
    it; other clients (and other clients' publications to it) are unaffected."""
    r = topic_root("nolocal")
    topic = f"{r}/t"
    me = clients.paho(broker, version=V5)
    assert me.subscribe(topic, 1, no_local=True) == [1]
    other = clients.paho(broker, version=V5)
    assert other.subscribe(topic, 1) == [1]
    me.publish(topic, b"mine", qos=1)
    assert other.collector.wait_for(1)[0].payload == b"mine"
    other.publish(topic, b"theirs", qos=1)
    me.collector.wait_for(1)
    assert me.collector.payloads() == [b"theirs"]


def test_shared_subscription_splits_messages_v5_mqtt_4_8_2(
    broker: BrokerProcess, clients: ClientPool
) -> None:
    """MQTT 5 §4.8.2 (MQTT-4.8.2-1 / -2 / -3): '$share/g/<filter>' members share the
    messages: each message goes to exactly one member, at the granted QoS, while a normal
    subscriber to the same filter gets every message."""
    r = topic_root("share")
    group = uid("g")
    topic, marker = f"{r}/jobs", f"{r}/marker"
    members = []
    for _ in range(2):
        m = clients.paho(broker, version=V5)
        assert m.subscribe([(f"$share/{group}/{r}/jobs", 1), (marker, 1)]) == [1, 1]
        members.append(m)
    plain = clients.paho(broker, version=V5)
    assert plain.subscribe(topic, 1) == [1]
    pub = clients.paho(broker, version=V5)
    n = 20
    for i in range(n):
        pub.publish(topic, f"job{i}".encode(), qos=1)
    pub.publish(marker, b"end", qos=1)
    for m in members:
        m.collector.wait_for(1, topic=marker)
    shares = [m.collector.matching(topic) for m in members]
    payloads = [msg.payload for share in shares for msg in share]
    assert sorted(payloads) == sorted(f"job{i}".encode() for i in range(n))  # exactly once
    assert all(len(share) > 0 for share in shares), [len(s) for s in shares]
    assert all(msg.qos == 1 for share in shares for msg in share)
    assert sorted(plain.collector.payloads(topic)) == sorted(payloads)


def test_topic_alias_client_to_server_v5_mqtt_3_3_2_12(
    broker: BrokerProcess, clients: ClientPool
) -> None:
    """MQTT-3.3.2-12: the server accepts Topic Alias values up to its Topic Alias Maximum;
    a PUBLISH with an empty topic name and a known alias goes to the aliased topic."""
    r = topic_root("alias")
    sub = clients.paho(broker, version=V5)
    assert sub.subscribe(f"{r}/#", 1) == [1]
    pub = clients.paho(broker, version=V5)
    assert pub.connack is not None
    alias_max = pub.connack.properties.get("TopicAliasMaximum", 0)
    assert alias_max >= 1, pub.connack
    pub.publish(
        f"{r}/long/topic/name",
        b"set",
        qos=1,
        properties=v5_props(PacketTypes.PUBLISH, TopicAlias=1),
    )
    pub.publish("", b"via alias", qos=1, properties=v5_props(PacketTypes.PUBLISH, TopicAlias=1))
    pub.publish(
        f"{r}/other", b"remap", qos=1, properties=v5_props(PacketTypes.PUBLISH, TopicAlias=1)
    )
    pub.publish("", b"remapped", qos=1, properties=v5_props(PacketTypes.PUBLISH, TopicAlias=1))
    got = sub.collector.wait_for(4)
    assert [(m.topic, m.payload) for m in got] == [
        (f"{r}/long/topic/name", b"set"),
        (f"{r}/long/topic/name", b"via alias"),
        (f"{r}/other", b"remap"),
        (f"{r}/other", b"remapped"),
    ]
    assert all("TopicAlias" not in m.properties for m in got)  # paho sub set no alias max


def test_message_expiry_queued_and_retained_v5_mqtt_3_3_2_5_6(
    broker: BrokerProcess, clients: ClientPool
) -> None:
    """MQTT-3.3.2-5 / -6: a queued (offline session) or retained message whose Message
    Expiry Interval (1 s) has passed is not delivered; surviving messages carry the
    remaining lifetime (received value minus time waited)."""
    r = topic_root("expiry")
    cid = uid("expiry")
    sleeper = clients.paho(broker, version=V5, client_id=cid, clean=False, session_expiry=60)
    assert sleeper.subscribe(f"{r}/q/#", 1) == [1]
    sleeper.disconnect()

    pub = clients.paho(broker, version=V5)
    short = v5_props(PacketTypes.PUBLISH, MessageExpiryInterval=1)
    long = v5_props(PacketTypes.PUBLISH, MessageExpiryInterval=60)
    pub.publish(f"{r}/q/short", b"expires", qos=1, properties=short)
    pub.publish(f"{r}/q/forever", b"stays", qos=1)
    pub.publish(f"{r}/q/long", b"stays too", qos=1, properties=long)
    pub.publish(f"{r}/ret/short", b"expires", qos=1, retain=True, properties=short)
    pub.publish(f"{r}/ret/long", b"stays", qos=1, retain=True, properties=long)
    published = time.monotonic()
    time.sleep(2.1)  # expiry is only observable by waiting past it

    back = clients.paho(broker, version=V5, client_id=cid, clean=False, session_expiry=60)
    assert back.connack is not None and back.connack.session_present is True
    assert back.subscribe(f"{r}/ret/#", 1) == [1]
    pub.publish(f"{r}/q/zz-marker", b"m", qos=1)
    back.collector.wait_for(1, topic=f"{r}/q/zz-marker")
    got = {m.topic: m for m in back.collector.messages}
    assert sorted(got) == sorted(
        [f"{r}/q/forever", f"{r}/q/long", f"{r}/ret/long", f"{r}/q/zz-marker"]
    )
    waited = time.monotonic() - published
    for topic in (f"{r}/q/long", f"{r}/ret/long"):
        remaining = got[topic].properties.get("MessageExpiryInterval")
        assert remaining is not None and remaining <= 60 - int(waited), (topic, remaining)
    assert "MessageExpiryInterval" not in got[f"{r}/q/forever"].properties
    pub.publish(f"{r}/ret/long", b"", qos=1, retain=True)
