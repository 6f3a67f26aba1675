"""Session state: persistence across connections, clean start, expiry, takeover."""

from __future__ import annotations

import time

import pytest
from brokers import BrokerProcess

from .clients import V5, V311, ClientPool, skip_on_mosquitto, topic_root, uid

pytestmark = pytest.mark.interop

VERSIONS = pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])


def _persistent(version: int) -> dict[str, object]:
    """Connect options for a session that outlives the connection."""
    return {"clean": False, "session_expiry": 300} if version == V5 else {"clean": False}


@VERSIONS
def test_offline_messages_delivered_on_resume_mqtt_3_2_2_3(
    broker: BrokerProcess, clients: ClientPool, version: int
) -> None:
    """MQTT-3.2.2-3 (v5) / MQTT-3.2.2-2 (v3.1.1), MQTT-3.1.2-5 / MQTT-4.5.0-1.

    Clean start 0 + session expiry > 0: QoS 1/2 messages published while the
    subscriber is offline are queued and delivered on reconnect, with session present 1.
    """
    root = topic_root("resume")
    cid = uid("persist")
    first = clients.paho(broker, version=version, client_id=cid, **_persistent(version))
    assert first.connack is not None and first.connack.session_present is False
    assert first.subscribe([(f"{root}/q1", 1), (f"{root}/q2", 2)]) == [1, 2]
    first.disconnect()

    pub = clients.paho(broker, version=version)
    pub.publish(f"{root}/q1", b"one", qos=1)
    pub.publish(f"{root}/q2", b"two", qos=2)

    again = clients.paho(broker, version=version, client_id=cid, **_persistent(version))
    assert again.connack is not None and again.connack.session_present is True
    got = again.collector.wait_for(2)
    assert sorted((m.topic, m.payload, m.qos) for m in got) == [
        (f"{root}/q1", b"one", 1),
        (f"{root}/q2", b"two", 2),
    ]
    # the subscriptions are part of the resumed session, too
    pub.publish(f"{root}/q1", b"live", qos=1)
    assert again.collector.wait_for(3)[-1].payload == b"live"


@VERSIONS
def test_clean_start_discards_session_mqtt_3_1_2_4(
    broker: BrokerProcess, clients: ClientPool, version: int
) -> None:
    """MQTT-3.1.2-4 / MQTT-3.2.2-2 (v5), MQTT-3.1.2-6 / MQTT-3.2.2-1 (v3.1.1).

    Reconnecting with clean start 1 discards the stored session: session present 0,
    no queued messages, no subscriptions.
    """
    root = topic_root("clean")
    cid = uid("clean")
    first = clients.paho(broker, version=version, client_id=cid, **_persistent(version))
    assert first.subscribe(f"{root}/q1", 1) == [1]
    first.disconnect()
    pub = clients.paho(broker, version=version)
    pub.publish(f"{root}/q1", b"queued", qos=1)

    again = clients.paho(broker, version=version, client_id=cid, clean=True)
    assert again.connack is not None and again.connack.session_present is False
    assert again.subscribe(f"{root}/marker", 1) == [1]
    pub.publish(f"{root}/q1", b"after", qos=1)  # old subscription must be gone too
    pub.publish(f"{root}/marker", b"m", qos=1)
    again.collector.wait_for(1, topic=f"{root}/marker")
    assert [m.topic for m in again.collector.messages] == [f"{root}/marker"]


def test_session_expiry_zero_ends_session_v5_mqtt_3_1_2_23(
    broker: BrokerProcess, clients: ClientPool
) -> None:
    """MQTT 5 §3.1.2.11.2 / MQTT-3.1.2-23: session expiry 0 (absent) ends the session at
    disconnect, so clean start 0 afterwards finds no session (session present 0)."""
    root = topic_root("exp0")
    cid = uid("exp0")
    first = clients.paho(broker, version=V5, client_id=cid, clean=False, session_expiry=0)
    assert first.subscribe(f"{root}/q1", 1) == [1]
    first.disconnect()
    pub = clients.paho(broker, version=V5)
    pub.publish(f"{root}/q1", b"lost", qos=1)

    again = clients.paho(broker, version=V5, client_id=cid, clean=False, session_expiry=0)
    assert again.connack is not None and again.connack.session_present is False
    assert again.subscribe(f"{root}/marker", 1) == [1]
    pub.publish(f"{root}/marker", b"m", qos=1)
    again.collector.wait_for(1, topic=f"{root}/marker")
    assert [m.topic for m in again.collector.messages] == [f"{root}/marker"]


def test_session_expires_after_interval_v5_mqtt_4_1_0_2(
    broker: BrokerProcess, clients: ClientPool
) -> None:
    """MQTT-4.1.0-2: the server discards the session once the expiry interval has passed."""
    root = topic_root("exp1")
    cid = uid("exp1")
    first = clients.paho(broker, version=V5, client_id=cid, clean=False, session_expiry=1)
    assert first.subscribe(f"{root}/q1", 1) == [1]
    first.disconnect()
    time.sleep(2.2)  # nothing observable happens when a session expires: wait it out
    again = clients.paho(broker, version=V5, client_id=cid, clean=False, session_expiry=1)
    assert again.connack is not None and again.connack.session_present is False


def test_session_takeover_v5_mqtt_3_1_4_3(broker: BrokerProcess, clients: ClientPool) -> None:
    """MQTT-3.1.4-3: a second connection with the same client id takes over: the old
    connection is closed, the new one resumes the session (session present 1) and works."""
    root = topic_root("takeover")
    cid = uid("dup")
    old = clients.paho(broker, version=V5, client_id=cid, clean=False, session_expiry=60)
    assert old.subscribe(f"{root}/t", 1) == [1]
    new = clients.paho(broker, version=V5, client_id=cid, clean=False, session_expiry=60)
    old.wait_disconnected()
    assert new.connack is not None and new.connack.session_present is True
    pub = clients.paho(broker, version=V5)
    pub.publish(f"{root}/t", b"to new", qos=1)
    [msg] = new.collector.wait_for(1)
    assert msg.payload == b"to new"
    assert old.collector.messages == []
    assert new.is_connected


def test_session_takeover_v311_closes_old_connection_mqtt_3_1_4_2(
    broker: BrokerProcess, clients: ClientPool
) -> None:
    """MQTT-3.1.4-2 (v3.1.1): if the client id is already connected the server MUST
    disconnect the existing client; the new connection works."""
    root = topic_root("takeover311")
    cid = uid("dup311")
    old = clients.paho(broker, version=V311, client_id=cid)
    new = clients.paho(broker, version=V311, client_id=cid)
    old.wait_disconnected()
    assert new.subscribe(f"{root}/t", 1) == [1]
    pub = clients.paho(broker, version=V311)
    pub.publish(f"{root}/t", b"to new", qos=1)
    assert new.collector.wait_for(1)[0].payload == b"to new"


@skip_on_mosquitto(
    "deviates from MQTT-3.1.4-3: 2.0.11 closes the old connection without DISCONNECT 0x8E"
)
def test_session_takeover_v5_sends_disconnect_0x8e_mqtt_3_1_4_3(
    broker: BrokerProcess, clients: ClientPool
) -> None:
    """MQTT-3.1.4-3: the server sends DISCONNECT with reason 0x8E (Session taken over) to
    the existing connection before closing it."""
    cid = uid("dup8e")
    old = clients.paho(broker, version=V5, client_id=cid)
    clients.paho(broker, version=V5, client_id=cid)
    gone = old.wait_disconnected()
    assert gone.reason_code == 0x8E, gone
