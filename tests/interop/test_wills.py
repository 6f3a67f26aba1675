"""Will messages: abnormal close, normal DISCONNECT, will delay interval (v5).

The connection whose will is tested is a raw socket (see ``rawmqtt``) so that the
moment and the manner of the close are exact; observers are paho clients.  One test
uses a SIGKILLed mosquitto_sub as a real client with a will.
"""

from __future__ import annotations

import time

import pytest
from brokers import BrokerProcess

from .clients import V5, V311, ClientPool, topic_root, uid
from .rawmqtt import Will

pytestmark = pytest.mark.interop

VERSIONS = pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])


@VERSIONS
def test_will_published_on_abnormal_close_mqtt_3_1_2_8(
    broker: BrokerProcess, clients: ClientPool, version: int
) -> None:
    """MQTT-3.1.2-8 / MQTT-3.1.2-14 (v5), MQTT-3.1.2-8 / MQTT-3.1.2-16 (v3.1.1): the will
    is published, non-retained, when the network connection drops without DISCONNECT."""
    topic = topic_root("will") + "/status"
    observer = clients.paho(broker, version=version)
    assert observer.subscribe(topic, 1) == [1]
    raw = clients.raw(broker)
    connack = raw.connect(uid("willy"), version=version, will=Will(topic, b"gone", qos=1))
    assert raw.connack_code(connack) == 0
    raw.abort()
    [msg] = observer.collector.wait_for(1)
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == (topic, b"gone", 1, False)


@VERSIONS
def test_will_retain_publishes_retained_mqtt_3_1_2_15(
    broker: BrokerProcess, clients: ClientPool, version: int
) -> None:
    """MQTT-3.1.2-15 (v5) / MQTT-3.1.2-17 (v3.1.1): Will Retain 1 publishes the will as a
    retained message, which a later subscriber receives with RETAIN=1."""
    topic = topic_root("willret") + "/status"
    observer = clients.paho(broker, version=version)
    assert observer.subscribe(topic, 1) == [1]
    raw = clients.raw(broker)
    raw.connect(uid("willr"), version=version, will=Will(topic, b"offline", qos=1, retain=True))
    raw.abort()
    observer.collector.wait_for(1)
    late = clients.paho(broker, version=version)
    assert late.subscribe(topic, 1) == [1]
    [msg] = late.collector.wait_for(1)
    assert (msg.payload, msg.retain) == (b"offline", True)
    observer.publish(topic, b"", qos=1, retain=True)  # do not leave it behind


def test_will_published_when_mosquitto_sub_killed_mqtt_3_1_2_8(
    broker: BrokerProcess, clients: ClientPool
) -> None:
    """MQTT-3.1.2-8 with a real client: mosquitto_sub --will-topic, killed with SIGKILL."""
    topic = topic_root("willkill") + "/status"
    observer = clients.paho(broker, version=V5)
    assert observer.subscribe(topic, 1) == [1]
    sub = clients.mosquitto_sub(
        topic_root("willkill") + "/ignored",
        broker,
        version=V5,
        extra=["--will-topic", topic, "--will-payload", "killed", "--will-qos", "1"],
    )
    sub.kill()
    [msg] = observer.collector.wait_for(1)
    assert (msg.topic, msg.payload) == (topic, b"killed")


@VERSIONS
def test_no_will_on_normal_disconnect_mqtt_3_14_4_3(
    broker: BrokerProcess, clients: ClientPool, version: int
) -> None:
    """MQTT-3.14.4-3 / MQTT-3.1.2-10 (v5), MQTT-3.1.2-10 / MQTT-3.14.4-3 (v3.1.1): the will
    is discarded on a normal DISCONNECT (reason 0x00)."""
    topic = topic_root("nowill") + "/status"
    observer = clients.paho(broker, version=version)
    assert observer.subscribe(topic, 1) == [1]
    raw = clients.raw(broker)
    raw.connect(uid("polite"), version=version, will=Will(topic, b"should not", qos=1))
    raw.send_disconnect(version)
    raw.wait_closed(5.0)  # the server has processed DISCONNECT and closed the connection
    observer.publish(topic, b"marker", qos=1)
    observer.collector.wait_for(1)
    assert observer.collector.payloads() == [b"marker"]


def test_will_delay_interval_delays_will_v5_mqtt_3_1_2_8(
    broker: BrokerProcess, clients: ClientPool
) -> None:
    """MQTT-3.1.2-8 / MQTT 5 §3.1.3.2.2: with Will Delay Interval 1 s (session expiry longer)
    the will is published about 1 s after the connection drops, not immediately."""
    topic = topic_root("willdelay") + "/status"
    observer = clients.paho(broker, version=V5)
    assert observer.subscribe(topic, 1) == [1]
    raw = clients.raw(broker)
    raw.connect(
        uid("delayed"), version=V5, session_expiry=30, will=Will(topic, b"late", qos=1, delay=1)
    )
    t0 = time.monotonic()
    raw.abort()
    [msg] = observer.collector.wait_for(1, timeout=5.0)
    elapsed = msg.at - t0
    assert msg.payload == b"late"
    assert 0.9 <= elapsed <= 3.0, f"will after {elapsed:.2f}s, expected ~1 s"


def test_reconnect_within_will_delay_cancels_will_v5_mqtt_3_1_3_9(
    broker: BrokerProcess, clients: ClientPool
) -> None:
    """MQTT-3.1.3-9: a new connection for the session before the Will Delay Interval
    has passed means the will MUST NOT be sent."""
    topic = topic_root("willcancel") + "/status"
    observer = clients.paho(broker, version=V5)
    assert observer.subscribe(topic, 1) == [1]
    cid = uid("back")
    raw = clients.raw(broker)
    raw.connect(cid, version=V5, session_expiry=30, will=Will(topic, b"must not", qos=1, delay=1))
    t0 = time.monotonic()
    raw.abort()
    back = clients.paho(broker, version=V5, client_id=cid, clean=False, session_expiry=30)
    assert back.connack is not None and back.connack.session_present is True
    assert time.monotonic() - t0 < 1.0, "reconnect was too slow for this test"
    time.sleep(max(0.0, t0 + 2.0 - time.monotonic()))  # well past the 1 s will delay
    observer.publish(topic, b"marker", qos=1)
    observer.collector.wait_for(1)
    assert observer.collector.payloads() == [b"marker"]
    back.disconnect()
