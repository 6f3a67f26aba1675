"""Keep alive, server keep alive and maximum packet size (client's and server's)."""

from __future__ import annotations

import time

import pytest
from brokers import BrokerFactory, BrokerProcess

from .clients import V5, V311, ClientPool, skip_on_mosquitto, topic_root, uid
from .rawmqtt import Will

pytestmark = pytest.mark.interop

VERSIONS = pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])


@skip_on_mosquitto(
    "deviates from MQTT-3.1.2-22: 2.0.11 checks keep-alive only every ~5 s, so a silent "
    "keep-alive-1 client is closed after 5-6 s instead of within 1.5 s"
)
@VERSIONS
def test_silent_client_disconnected_after_1_5_keepalive_mqtt_3_1_2_22(
    broker: BrokerProcess, clients: ClientPool, version: int
) -> None:
    """MQTT-3.1.2-22 (v5) / MQTT-3.1.2-24 (v3.1.1): a client with keep alive 1 s that sends
    nothing is disconnected after ~1.5 s, "as if the network had failed", so its will is
    published."""
    topic = topic_root("ka") + "/status"
    observer = clients.paho(broker, version=version)
    assert observer.subscribe(topic, 1) == [1]
    raw = clients.raw(broker)
    raw.connect(uid("silent"), version=version, keepalive=1, will=Will(topic, b"timeout", qos=1))
    t0 = time.monotonic()
    raw.wait_closed(6.0)
    elapsed = time.monotonic() - t0
    # 1.5 x keep alive is the deadline; brokers check on a timer, so allow some slack
    assert 1.0 <= elapsed <= 3.0, f"closed after {elapsed:.2f}s"
    [msg] = observer.collector.wait_for(1)
    assert msg.payload == b"timeout"


def test_server_keep_alive_from_max_keepalive_v5_mqtt_3_2_2_21(
    start_broker: BrokerFactory, clients: ClientPool
) -> None:
    """MQTT-3.2.2-21 / -22: with --max-keepalive 10 a client asking for 60 s gets Server Keep
    Alive 10 in CONNACK; one asking for 5 s keeps 5 (no larger Server Keep Alive)."""
    broker = start_broker(max_keepalive=10)
    greedy = clients.paho(broker, version=V5, keepalive=60)
    assert greedy.connack is not None
    assert greedy.connack.properties.get("ServerKeepAlive") == 10, greedy.connack
    modest = clients.paho(broker, version=V5, keepalive=5)
    assert modest.connack is not None
    assert modest.connack.properties.get("ServerKeepAlive", 5) == 5, modest.connack


def test_client_maximum_packet_size_respected_mqtt_3_1_2_24_25(
    broker: BrokerProcess, clients: ClientPool
) -> None:
    """MQTT-3.1.2-24 / -25: the server never sends a packet larger than the client's
    Maximum Packet Size; such a message is dropped for that client only and later,
    smaller messages still flow."""
    root = topic_root("cmps")
    small_client = clients.paho(broker, version=V5, connect_properties={"MaximumPacketSize": 128})
    assert small_client.subscribe(f"{root}/#", 1) == [1]
    big_client = clients.paho(broker, version=V5)
    assert big_client.subscribe(f"{root}/#", 1) == [1]
    pub = clients.paho(broker, version=V5)
    pub.publish(f"{root}/big", b"x" * 300, qos=1)
    pub.publish(f"{root}/small", b"fits", qos=1)
    pub.publish(f"{root}/end", b"m", qos=1)
    small_client.collector.wait_for(1, topic=f"{root}/end")
    assert [m.topic for m in small_client.collector.messages] == [f"{root}/small", f"{root}/end"]
    assert [len(m.payload) for m in big_client.collector.wait_for(3)] == [300, 4, 1]
    assert small_client.is_connected


@VERSIONS
def test_server_maximum_packet_size_mqtt_3_2_2_15(
    start_broker: BrokerFactory, clients: ClientPool, version: int
) -> None:
    """MQTT 5 §3.2.2.3.6 / MQTT-3.2.2-15 / §4.13: the server announces Maximum Packet Size
    1024 in CONNACK (v5); a larger PUBLISH closes only the offending connection, with
    DISCONNECT 0x95 (Packet too large) for v5; other clients are unaffected and the
    oversized message is not delivered."""
    broker = start_broker(max_packet_size=1024)
    root = topic_root("smps")
    observer = clients.paho(broker, version=V5)
    assert observer.subscribe(f"{root}/#", 1) == [1]
    offender = clients.paho(broker, version=version)
    assert offender.connack is not None
    if version == V5:
        assert offender.connack.properties.get("MaximumPacketSize") == 1024
    # The broker refuses the packet from its fixed header and closes at once, so paho's own
    # write of the rest may already fail locally (rc 4): only the disconnect matters here.
    offender.client.publish(f"{root}/big", b"x" * 2000, qos=0)
    gone = offender.wait_disconnected()
    if version == V5:
        assert gone.reason_code == 0x95, gone
    other = clients.paho(broker, version=version)
    other.publish(f"{root}/ok", b"still works", qos=1)
    observer.collector.wait_for(1)
    assert [m.topic for m in observer.collector.messages] == [f"{root}/ok"]
    assert observer.is_connected
