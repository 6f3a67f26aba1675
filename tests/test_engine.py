"""The broker engine (:mod:`broker.engine`, :mod:`broker.connection`) without sockets.

Every test drives :class:`~broker.connection.BrokerConnection` objects with encoded packets
(see :mod:`tests.sansio`) and moves time with a fake clock, so timers (keep alive, will
delay, session and message expiry, ``$SYS``) are exact and instant.  Normative statement
ids of MQTT 5.0 (or 3.1.1 where marked) are cited in names and docstrings.
"""

from __future__ import annotations

from typing import Any

import pytest
from sansio import FakeClient, make_broker

from broker.connection import State
from broker.engine import Broker
from mqttproto.codec import encode
from mqttproto.packets import (
    MQTT_3_1_1,
    MQTT_5,
    Connack,
    Connect,
    Disconnect,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)
from mqttproto.properties import PropertyId
from mqttproto.reasons import ReasonCode

P = PropertyId
R = ReasonCode


def connected(broker: Broker, client_id: str = "", version: int = MQTT_5, **kw: Any) -> FakeClient:
    client = FakeClient(broker, version)
    connack = client.connect(client_id, **kw)
    assert connack.reason_code == R.SUCCESS
    return client


# --------------------------------------------------------------------------- CONNECT


def test_connect_v5_assigns_client_identifier_mqtt_3_2_2_16() -> None:
    broker, _ = make_broker()
    client = FakeClient(broker)
    connack = client.connect("")
    assert connack.reason_code == R.SUCCESS
    assert not connack.session_present
    assigned = connack.properties[P.ASSIGNED_CLIENT_IDENTIFIER]
    assert assigned and client.conn.client_id == assigned
    assert broker.store.get_session(assigned) is not None
    # The CONNACK announces the server's limits.
    assert connack.properties[P.RECEIVE_MAXIMUM] == broker.config.receive_maximum
    assert connack.properties[P.MAXIMUM_PACKET_SIZE] == broker.config.max_packet_size
    assert connack.properties[P.TOPIC_ALIAS_MAXIMUM] == broker.config.topic_alias_maximum


def test_connect_v311_empty_client_id_clean_session_is_accepted_mqtt_3_1_3_6() -> None:
    broker, _ = make_broker()
    client = FakeClient(broker, MQTT_3_1_1)
    connack = client.connect("", clean_start=True)
    assert connack.reason_code == R.SUCCESS
    assert connack.properties == {}  # 3.1.1 CONNACK carries no properties
    assert client.conn.client_id  # a unique id was made up for it


def test_connect_v311_empty_client_id_without_clean_session_refused_mqtt_3_1_3_8() -> None:
    """3.1.1 MQTT-3.1.3-8: CONNACK return code 0x02 (identifier rejected), then close."""
    broker, _ = make_broker()
    client = FakeClient(broker, MQTT_3_1_1)
    client.send(Connect("", MQTT_3_1_1, clean_start=False))
    data = client.conn.data_to_send()
    assert data == b"\x20\x02\x00\x02"  # the 3.1.1 wire form: return code 2
    assert client.conn.closing
    client.poll()
    assert client.conn.state is State.CLOSED
    assert broker.store.session_count() == 0


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
def test_session_present_on_resume_mqtt_3_2_2_2_and_3(version: int) -> None:
    """Clean start 1 gives session present 0 (MQTT-3.2.2-2); resuming gives 1 (MQTT-3.2.2-3)."""
    broker, _ = make_broker()
    expiry = 100 if version == MQTT_5 else None
    c1 = FakeClient(broker, version)
    assert not c1.connect("keep", clean_start=False, session_expiry=expiry).session_present
    c1.disconnect()
    c2 = FakeClient(broker, version)
    assert c2.connect("keep", clean_start=False, session_expiry=expiry).session_present
    c2.disconnect()
    c3 = FakeClient(broker, version)
    assert not c3.connect("keep", clean_start=True, session_expiry=expiry).session_present


def test_clean_start_discards_existing_session_mqtt_3_1_2_4() -> None:
    broker, _ = make_broker()
    c1 = connected(broker, "cs", clean_start=False, session_expiry=100)
    c1.subscribe("a", qos=1)
    c1.disconnect()
    c2 = connected(broker, "cs", clean_start=True, session_expiry=100)
    pub = connected(broker, "pub")
    pub.publish("a", b"x", 1)
    assert pub.expect(Puback).reason_code == R.NO_MATCHING_SUBSCRIBERS
    c2.expect_nothing()


def test_enhanced_auth_refused_with_bad_authentication_method() -> None:
    broker, _ = make_broker()
    client = FakeClient(broker)
    connack = client.connect("x", properties={P.AUTHENTICATION_METHOD: "SCRAM-SHA-1"})
    assert connack.reason_code == R.BAD_AUTHENTICATION_METHOD
    assert client.closed


# --------------------------------------------------------------------------- QoS flows


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
def test_qos0_publish_is_routed(version: int) -> None:
    broker, _ = make_broker()
    sub = connected(broker, "sub", version)
    sub.subscribe("t/#", qos=2)
    pub = connected(broker, "pub", version)
    pub.publish("t/1", b"hello")
    pub.expect_nothing()  # QoS 0 has no acknowledgement
    msg = sub.expect(Publish)
    assert (msg.topic, msg.payload, msg.qos, msg.packet_id) == ("t/1", b"hello", 0, None)


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
def test_qos1_both_directions_mqtt_4_3_2(version: int) -> None:
    """PUBLISH -> PUBACK inbound; outbound PUBLISH kept in flight until PUBACK (MQTT-4.3.2-2)."""
    broker, _ = make_broker()
    sub = connected(broker, "sub", version)
    sub.subscribe("t", qos=1)
    pub = connected(broker, "pub", version)
    pid = pub.publish("t", b"m", 1)
    ack = pub.expect(Puback)
    assert ack.packet_id == pid and ack.reason_code == R.SUCCESS
    msg = sub.expect(Publish)
    assert msg.qos == 1 and msg.packet_id and not msg.dup
    session = broker.store.get_session("sub")
    assert session is not None and msg.packet_id in session.inflight
    sub.send(Puback(msg.packet_id))
    assert not session.inflight


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
def test_qos2_both_directions_mqtt_4_3_3(version: int) -> None:
    broker, _ = make_broker()
    sub = connected(broker, "sub", version)
    sub.subscribe("t", qos=2)
    pub = connected(broker, "pub", version)
    pid = pub.publish("t", b"m", 2)
    assert pub.expect(Pubrec).packet_id == pid
    # Method A: the message is routed on PUBLISH, before PUBREL.
    msg = sub.expect(Publish)
    assert msg.qos == 2
    pub.send(Pubrel(pid))  # type: ignore[arg-type]
    assert pub.expect(Pubcomp).packet_id == pid
    session = broker.store.get_session("sub")
    assert session is not None
    sub.send(Pubrec(msg.packet_id))  # type: ignore[arg-type]
    assert sub.expect(Pubrel).packet_id == msg.packet_id  # MQTT-4.3.3-4
    assert msg.packet_id in session.inflight  # still owned until PUBCOMP
    sub.send(Pubcomp(msg.packet_id))  # type: ignore[arg-type]
    assert not session.inflight


def test_qos_downgraded_to_subscription_maximum_mqtt_3_8_4_6() -> None:
    broker, _ = make_broker()
    sub = connected(broker, "sub")
    sub.subscribe("t", qos=1)
    pub = connected(broker, "pub")
    pub.publish_acked("t", b"m", 2)
    assert sub.expect(Publish).qos == 1


def test_qos2_duplicate_publish_not_routed_twice_method_a_mqtt_4_3_3_10() -> None:
    """A re-sent QoS 2 PUBLISH before PUBREL is acknowledged but not delivered again."""
    broker, _ = make_broker()
    sub = connected(broker, "sub")
    sub.subscribe("t", qos=0)
    pub = connected(broker, "pub")
    pub.publish("t", b"once", 2, packet_id=7)
    assert pub.expect(Pubrec).packet_id == 7
    pub.send(Publish("t", b"once", 2, dup=True, packet_id=7))
    assert pub.expect(Pubrec).packet_id == 7
    assert [m.payload for m in sub.publishes()] == [b"once"]
    pub.send(Pubrel(7))
    assert pub.expect(Pubcomp).packet_id == 7
    # After PUBCOMP the identifier is free: the same id is a new message.
    pub.publish("t", b"twice", 2, packet_id=7)
    pub.expect(Pubrec)
    assert [m.payload for m in sub.publishes()] == [b"twice"]


def test_qos2_duplicate_across_reconnect_not_routed_twice_mqtt_4_3_3_10() -> None:
    broker, _ = make_broker()
    sub = connected(broker, "sub")
    sub.subscribe("t")
    pub = connected(broker, "pub", clean_start=False, session_expiry=60)
    pub.publish("t", b"m", 2, packet_id=9)
    pub.expect(Pubrec)
    pub.drop()
    pub2 = connected(broker, "pub", clean_start=False, session_expiry=60)
    pub2.send(Publish("t", b"m", 2, dup=True, packet_id=9))
    assert pub2.expect(Pubrec).packet_id == 9
    pub2.send(Pubrel(9))
    pub2.expect(Pubcomp)
    assert len(sub.publishes()) == 1


def test_pubrel_unknown_packet_id_v5_pubcomp_0x92() -> None:
    broker, _ = make_broker()
    client = connected(broker, "c")
    client.send(Pubrel(42))
    comp = client.expect(Pubcomp)
    assert (comp.packet_id, comp.reason_code) == (42, R.PACKET_IDENTIFIER_NOT_FOUND)
    assert not client.closed


def test_pubrel_unknown_packet_id_v311_still_pubcomp_mqtt_4_3_3() -> None:
    broker, _ = make_broker()
    client = connected(broker, "c", MQTT_3_1_1)
    client.send(Pubrel(42))
    assert client.expect(Pubcomp).packet_id == 42
    assert not client.closed


def test_unknown_puback_and_pubrec_are_harmless() -> None:
    broker, _ = make_broker()
    client = connected(broker, "c")
    client.send(Puback(5), Pubcomp(6))
    client.expect_nothing()
    client.send(Pubrec(7))
    rel = client.expect(Pubrel)
    assert (rel.packet_id, rel.reason_code) == (7, R.PACKET_IDENTIFIER_NOT_FOUND)


def test_pingreq_pingresp_mqtt_3_12_4_1() -> None:
    broker, _ = make_broker()
    client = connected(broker, "c", MQTT_3_1_1)
    client.send(Pingreq())
    client.expect(Pingresp)


def test_unsubscribe_stops_delivery_mqtt_3_10_4_1() -> None:
    broker, _ = make_broker()
    sub = connected(broker, "sub")
    sub.subscribe("a", "b")
    sub.send(Unsubscribe(3, ["a", "zzz"]))
    unsuback = sub.expect(Unsuback)
    assert unsuback.packet_id == 3
    assert unsuback.reason_codes == [R.SUCCESS, R.NO_SUBSCRIPTION_EXISTED]
    pub = connected(broker, "pub")
    pub.publish("a", b"1")
    pub.publish("b", b"2")
    assert [m.topic for m in sub.publishes()] == ["b"]


# --------------------------------------------------------------------------- flow control


def test_inflight_window_is_client_receive_maximum_mqtt_3_3_4_9() -> None:
    """No more unacknowledged QoS>0 PUBLISH than the client's Receive Maximum; the rest
    wait and are released in order as PUBACKs arrive."""
    broker, _ = make_broker()
    sub = connected(broker, "sub", properties={P.RECEIVE_MAXIMUM: 2})
    sub.subscribe("t", qos=1)
    pub = connected(broker, "pub")
    for i in range(5):
        pub.publish_acked("t", str(i).encode())
    first = sub.publishes()
    assert [m.payload for m in first] == [b"0", b"1"]
    session = broker.store.get_session("sub")
    assert session is not None and len(session.inflight) == 2 and len(session.pending) == 3
    sub.send(Puback(first[0].packet_id))  # type: ignore[arg-type]
    third = sub.publishes()
    assert [m.payload for m in third] == [b"2"]
    sub.send(Puback(first[1].packet_id), Puback(third[0].packet_id))  # type: ignore[arg-type]
    assert [m.payload for m in sub.publishes()] == [b"3", b"4"]
    # Packet ids of messages in flight together are distinct (MQTT-2.2.1-3).
    assert len(session.inflight) == 2 and len(set(session.inflight)) == 2


def test_inflight_window_qos2_released_on_pubcomp() -> None:
    broker, _ = make_broker()
    sub = connected(broker, "sub", properties={P.RECEIVE_MAXIMUM: 1})
    sub.subscribe("t", qos=2)
    pub = connected(broker, "pub")
    pub.publish_acked("t", b"a", 2)
    pub.publish_acked("t", b"b", 2)
    (a,) = sub.publishes()
    sub.send(Pubrec(a.packet_id))  # type: ignore[arg-type]
    sub.expect(Pubrel)
    sub.expect_nothing()  # still in flight until PUBCOMP
    sub.send(Pubcomp(a.packet_id))  # type: ignore[arg-type]
    assert [m.payload for m in sub.publishes()] == [b"b"]


def test_inbound_receive_maximum_exceeded_disconnect_0x93_mqtt_3_3_4_8() -> None:
    broker, _ = make_broker(receive_maximum=2)
    client = FakeClient(broker)
    assert client.connect("c").properties[P.RECEIVE_MAXIMUM] == 2
    client.publish("t", b"1", 2)
    client.publish("t", b"2", 2)
    assert len([p for p in client.packets() if isinstance(p, Pubrec)]) == 2
    client.publish("t", b"3", 2)  # a third unreleased QoS 2 PUBLISH
    assert client.expect(Disconnect).reason_code == R.RECEIVE_MAXIMUM_EXCEEDED
    assert client.closed


def test_writes_paused_qos0_dropped_qos1_queued_until_resume() -> None:
    broker, _ = make_broker()
    sub = connected(broker, "sub")
    sub.subscribe("t", qos=1)
    pub = connected(broker, "pub")
    sub.conn.set_writable(False)
    pub.publish("t", b"q0", 0)
    pub.publish_acked("t", b"q1", 1)
    sub.expect_nothing()
    session = broker.store.get_session("sub")
    assert session is not None and session.dropped == 1 and len(session.pending) == 1
    sub.conn.set_writable(True)
    (msg,) = sub.publishes()
    assert (msg.payload, msg.qos) == (b"q1", 1)


def test_client_maximum_packet_size_respected_mqtt_3_1_2_25() -> None:
    """A PUBLISH larger than the client's Maximum Packet Size is discarded, not sent."""
    broker, _ = make_broker()
    sub = connected(broker, "sub", properties={P.MAXIMUM_PACKET_SIZE: 64})
    sub.subscribe("t", qos=1)
    pub = connected(broker, "pub")
    pub.publish_acked("t", b"x" * 100, 1)
    pub.publish("t", b"y" * 100, 0)
    pub.publish_acked("t", b"small", 1)
    (msg,) = sub.publishes()
    assert msg.payload == b"small"
    assert len(msg.payload) + len(msg.topic) + 10 < 64
    session = broker.store.get_session("sub")
    assert session is not None and len(session.inflight) == 1  # the big one is not in flight


# --------------------------------------------------------------------------- sessions


@pytest.mark.parametrize("qos", [1, 2])
def test_unacknowledged_publish_redelivered_with_dup_mqtt_4_4_0_1(qos: int) -> None:
    broker, _ = make_broker()
    sub = connected(broker, "sub", clean_start=False, session_expiry=60)
    sub.subscribe("t", qos=qos)
    pub = connected(broker, "pub")
    pub.publish_acked("t", b"m", qos)
    first = sub.expect(Publish)
    assert not first.dup
    sub.drop()
    sub2 = FakeClient(broker)
    assert sub2.connect("sub", clean_start=False, session_expiry=60).session_present
    again = sub2.expect(Publish)
    # MQTT-4.4.0-1 / MQTT-3.3.1-1: same packet id, DUP set.
    assert again.dup and again.packet_id == first.packet_id and again.payload == b"m"
    sub2.ack(again)
    session = broker.store.get_session("sub")
    assert session is not None and not session.inflight


def test_pubrel_resent_on_reconnect_mqtt_4_4_0_1() -> None:
    broker, _ = make_broker()
    sub = connected(broker, "sub", clean_start=False, session_expiry=60)
    sub.subscribe("t", qos=2)
    pub = connected(broker, "pub")
    pub.publish_acked("t", b"m", 2)
    msg = sub.expect(Publish)
    sub.send(Pubrec(msg.packet_id))  # type: ignore[arg-type]
    sub.expect(Pubrel)
    sub.drop()
    sub2 = FakeClient(broker)
    sub2.connect("sub", clean_start=False, session_expiry=60)
    rel = sub2.expect(Pubrel)  # not the PUBLISH again
    assert rel.packet_id == msg.packet_id
    sub2.expect_nothing()
    sub2.send(Pubcomp(rel.packet_id))
    session = broker.store.get_session("sub")
    assert session is not None and not session.inflight


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
def test_offline_session_queues_qos1_and_qos2_not_qos0(version: int) -> None:
    broker, _ = make_broker()
    expiry = 60 if version == MQTT_5 else None
    sub = connected(broker, "sub", version, clean_start=False, session_expiry=expiry)
    sub.subscribe("t", qos=2)
    sub.disconnect()
    pub = connected(broker, "pub")
    pub.publish("t", b"q0", 0)
    pub.publish_acked("t", b"q1", 1)
    pub.publish_acked("t", b"q2", 2)
    sub2 = FakeClient(broker, version)
    assert sub2.connect("sub", clean_start=False, session_expiry=expiry).session_present
    got = sub2.publishes()
    assert [(m.payload, m.qos) for m in got] == [(b"q1", 1), (b"q2", 2)]


def test_offline_queue_qos0_when_configured() -> None:
    broker, _ = make_broker(queue_qos0_messages=True)
    sub = connected(broker, "sub", clean_start=False, session_expiry=60)
    sub.subscribe("t", qos=0)
    sub.disconnect()
    connected(broker, "pub").publish("t", b"q0", 0)
    sub2 = connected(broker, "sub", clean_start=False, session_expiry=60)
    assert [m.payload for m in sub2.publishes()] == [b"q0"]


def test_max_queued_messages_drops_the_excess() -> None:
    broker, _ = make_broker(max_queued_messages=3)
    sub = connected(broker, "sub", clean_start=False, session_expiry=60)
    sub.subscribe("t", qos=1)
    sub.disconnect()
    pub = connected(broker, "pub")
    for i in range(5):
        pub.publish_acked("t", str(i).encode())
    session = broker.store.get_session("sub")
    assert session is not None and len(session.pending) == 3 and session.dropped == 2
    sub2 = connected(broker, "sub", clean_start=False, session_expiry=60)
    assert [m.payload for m in sub2.publishes()] == [b"0", b"1", b"2"]


def test_session_expiry_via_tick_mqtt_3_1_2_23() -> None:
    broker, clock = make_broker()
    sub = connected(broker, "sub", clean_start=False, session_expiry=30)
    sub.subscribe("t", qos=1)
    sub.disconnect()
    clock.advance(29)
    broker.tick()
    assert broker.store.get_session("sub") is not None
    clock.advance(1)
    broker.tick()
    assert broker.store.get_session("sub") is None
    assert broker.store.subscription_count() == 0
    sub2 = FakeClient(broker)
    assert not sub2.connect("sub", clean_start=False, session_expiry=30).session_present


def test_session_expiry_zero_ends_session_on_close_mqtt_3_1_2_23() -> None:
    broker, _ = make_broker()
    connected(broker, "gone").drop()
    assert broker.store.get_session("gone") is None


def test_session_expiry_changed_on_disconnect_mqtt_3_14_2() -> None:
    broker, clock = make_broker()
    client = connected(broker, "c", clean_start=False, session_expiry=10)
    client.disconnect(0, {P.SESSION_EXPIRY_INTERVAL: 100})
    clock.advance(50)
    broker.tick()
    assert broker.store.get_session("c") is not None


def test_session_expiry_set_on_disconnect_after_zero_is_protocol_error_mqtt_3_14_2_2() -> None:
    broker, _ = make_broker()
    client = connected(broker, "c")
    client.disconnect(0, {P.SESSION_EXPIRY_INTERVAL: 100})
    assert client.expect(Disconnect).reason_code == R.PROTOCOL_ERROR


def test_max_session_expiry_caps_and_is_announced_mqtt_3_2_2_3() -> None:
    broker, clock = make_broker(max_session_expiry=20)
    client = FakeClient(broker)
    connack = client.connect("c", clean_start=False, session_expiry=1000)
    assert connack.properties[P.SESSION_EXPIRY_INTERVAL] == 20
    client.drop()
    clock.advance(20)
    broker.tick()
    assert broker.store.get_session("c") is None


def test_session_takeover_disconnects_old_with_0x8e_mqtt_3_1_4_3() -> None:
    broker, _ = make_broker()
    old = connected(broker, "same", clean_start=False, session_expiry=60)
    old.subscribe("t", qos=1)
    new = FakeClient(broker)
    assert new.connect("same", clean_start=False, session_expiry=60).session_present
    assert old.expect(Disconnect).reason_code == R.SESSION_TAKEN_OVER
    assert old.closed
    pub = connected(broker, "pub")
    pub.publish_acked("t", b"after", 1)
    assert [m.payload for m in new.publishes()] == [b"after"]
    old.expect_nothing()


def test_session_takeover_v311_closes_old_without_packet_mqtt_3_1_4_2() -> None:
    broker, _ = make_broker()
    old = connected(broker, "same", MQTT_3_1_1)
    new = connected(broker, "same", MQTT_3_1_1)
    assert old.packets() == [] and old.closed
    assert not new.closed


# --------------------------------------------------------------------------- wills


def will(topic: str = "will/c", payload: bytes = b"gone", delay: int | None = None) -> Will:
    props = {P.WILL_DELAY_INTERVAL: delay} if delay is not None else {}
    return Will(topic, payload, 1, False, props)


def will_watcher(broker: Broker) -> FakeClient:
    watcher = connected(broker, "watcher")
    watcher.subscribe("will/#", qos=1)
    return watcher


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
def test_will_published_on_abnormal_close_mqtt_3_1_2_8(version: int) -> None:
    broker, _ = make_broker()
    watcher = will_watcher(broker)
    client = connected(broker, "c", version, will=will())
    client.drop()
    (msg,) = watcher.publishes()
    assert (msg.topic, msg.payload, msg.qos) == ("will/c", b"gone", 1)


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
def test_will_not_published_on_normal_disconnect_mqtt_3_1_2_10(version: int) -> None:
    broker, _ = make_broker()
    watcher = will_watcher(broker)
    client = connected(broker, "c", version, will=will())
    client.disconnect()
    assert client.closed
    watcher.expect_nothing()


def test_will_published_on_disconnect_with_will_0x04_mqtt_3_14_4_3() -> None:
    broker, _ = make_broker()
    watcher = will_watcher(broker)
    client = connected(broker, "c", will=will())
    client.disconnect(R.DISCONNECT_WITH_WILL)
    assert client.closed
    assert [m.payload for m in watcher.publishes()] == [b"gone"]


def test_will_published_on_disconnect_with_error_reason_mqtt_3_1_2_10() -> None:
    """Only reason 0x00 deletes the will; a client DISCONNECT with 0x80 still publishes it."""
    broker, _ = make_broker()
    watcher = will_watcher(broker)
    client = connected(broker, "c", will=will())
    client.disconnect(R.UNSPECIFIED_ERROR)
    assert client.closed
    assert [m.payload for m in watcher.publishes()] == [b"gone"]


def test_will_waits_for_client_sent_away_by_migration() -> None:
    """disconnect_clients (server moved) holds wills back for the grace period."""
    broker, clock = make_broker()
    watcher = FakeClient(broker, transport="quic")  # QUIC clients are not sent away
    watcher.connect("watcher")
    watcher.subscribe("will/#", qos=1)
    c = connected(broker, "c", will=will(), clean_start=False, session_expiry=300)
    d = connected(broker, "d", will=will("will/d"), clean_start=False, session_expiry=300)
    broker.disconnect_clients({"tcp"}, R.SERVER_MOVED, "198.18.2.2:1883", will_grace=10)
    assert c.closed and d.closed
    clock.advance(5)
    broker.tick()
    watcher.expect_nothing()
    # "c" comes back in time: its will is never sent; "d" does not: its will goes out.
    back = FakeClient(broker)
    assert back.connect("c", clean_start=False, session_expiry=300).session_present
    clock.advance(6)
    broker.tick()
    assert [m.topic for m in watcher.publishes()] == ["will/d"]


def test_will_published_when_server_closes_on_protocol_error_mqtt_3_1_2_8() -> None:
    broker, _ = make_broker()
    watcher = will_watcher(broker)
    client = connected(broker, "c", will=will())
    client.send(Publish("bad/#", b"", 0))
    assert client.expect(Disconnect).reason_code == R.TOPIC_NAME_INVALID
    assert client.closed
    assert [m.payload for m in watcher.publishes()] == [b"gone"]


def test_will_retain_stores_retained_message_mqtt_3_1_2_17() -> None:
    broker, _ = make_broker()
    client = connected(broker, "c", will=Will("will/r", b"bye", 0, True))
    client.drop()
    late = connected(broker, "late")
    late.subscribe("will/r")
    (msg,) = late.publishes()
    assert msg.retain and msg.payload == b"bye"


def test_will_delay_then_published_by_tick_mqtt_3_1_3_9() -> None:
    broker, clock = make_broker()
    watcher = will_watcher(broker)
    client = connected(broker, "c", will=will(delay=10), clean_start=False, session_expiry=100)
    client.drop()
    watcher.expect_nothing()
    clock.advance(9)
    broker.tick()
    watcher.expect_nothing()
    clock.advance(1)
    broker.tick()
    msg = watcher.expect(Publish)
    assert msg.payload == b"gone"
    # The Will Delay Interval is not forwarded to subscribers.
    assert P.WILL_DELAY_INTERVAL not in msg.properties


def test_will_delay_cancelled_by_reconnect_mqtt_3_1_3_9() -> None:
    broker, clock = make_broker()
    watcher = will_watcher(broker)
    client = connected(broker, "c", will=will(delay=10), clean_start=False, session_expiry=100)
    client.drop()
    clock.advance(5)
    connected(broker, "c", clean_start=False, session_expiry=100)
    clock.advance(100)
    broker.tick()
    watcher.expect_nothing()


def test_will_delay_reconnect_with_clean_start_ends_session_and_sends_will_mqtt_3_1_2_8() -> None:
    """A reconnect with Clean Start 1 ends the old session, so its pending will is sent."""
    broker, _ = make_broker()
    watcher = will_watcher(broker)
    client = connected(broker, "c", will=will(delay=10), clean_start=False, session_expiry=100)
    client.drop()
    connected(broker, "c", clean_start=True, session_expiry=100)
    assert [m.payload for m in watcher.publishes()] == [b"gone"]


def test_will_published_when_session_ends_before_delay_mqtt_3_1_3_9() -> None:
    """Will Delay 100 but Session Expiry 5: the will goes out when the session ends."""
    broker, clock = make_broker()
    watcher = will_watcher(broker)
    client = connected(broker, "c", will=will(delay=100), clean_start=False, session_expiry=5)
    client.drop()
    clock.advance(4)
    broker.tick()
    watcher.expect_nothing()
    clock.advance(1)
    broker.tick()
    assert [m.payload for m in watcher.publishes()] == [b"gone"]
    assert broker.store.get_session("c") is None


def test_will_delay_with_session_expiry_zero_is_immediate_mqtt_3_1_3_9() -> None:
    broker, _ = make_broker()
    watcher = will_watcher(broker)
    client = connected(broker, "c", will=will(delay=100))
    client.drop()
    assert [m.payload for m in watcher.publishes()] == [b"gone"]


def test_takeover_resuming_session_keeps_delayed_will_unsent_mqtt_3_1_2_8() -> None:
    """Takeover by a Clean Start 0 connection before the Will Delay elapsed: no will."""
    broker, clock = make_broker()
    watcher = will_watcher(broker)
    old = connected(broker, "c", will=will(delay=10), clean_start=False, session_expiry=100)
    connected(broker, "c", clean_start=False, session_expiry=100)
    assert old.expect(Disconnect).reason_code == R.SESSION_TAKEN_OVER
    clock.advance(20)
    broker.tick()
    watcher.expect_nothing()


def test_takeover_with_clean_start_sends_will_mqtt_3_1_2_8() -> None:
    broker, _ = make_broker()
    watcher = will_watcher(broker)
    connected(broker, "c", will=will(delay=10), clean_start=False, session_expiry=100)
    connected(broker, "c", clean_start=True)
    assert [m.payload for m in watcher.publishes()] == [b"gone"]


# --------------------------------------------------------------------------- keep alive


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
def test_keep_alive_timeout_at_one_and_a_half_mqtt_3_1_2_24(version: int) -> None:
    broker, clock = make_broker()
    client = connected(broker, "c", version, keep_alive=10)
    clock.advance(14)
    client.send(Pingreq())  # traffic resets the timer
    client.expect(Pingresp)
    clock.advance(15)
    broker.tick()
    assert not client.closed  # exactly 1.5 x keep alive is still allowed
    clock.advance(0.5)
    broker.tick()
    packets = client.packets()
    if version == MQTT_5:
        assert [type(p) for p in packets] == [Disconnect]
        assert packets[0].reason_code == R.KEEP_ALIVE_TIMEOUT  # type: ignore[union-attr]
    else:
        assert packets == []
    assert client.closed


def test_a_stall_of_the_broker_does_not_count_against_keep_alive() -> None:
    """Frozen for a checkpoint (or starved), the broker heard no one: that silence is its
    own.  Keep alive counts on from where it was, and still ends a silent client."""
    broker, clock = make_broker()
    client = connected(broker, "c", keep_alive=10)
    other = connected(broker, "d", keep_alive=10)
    clock.advance(5)
    other.send(Pingreq())
    other.expect(Pingresp)
    clock.advance(35)  # frozen for 35 s
    broker.allow_for_stall(35)
    broker.tick()
    assert not client.closed and not other.closed
    clock.advance(10.5)  # 5 + 10.5 s of the client's own silence: over 1.5 x 10
    broker.tick()
    assert client.closed and not other.closed
    assert [type(p) for p in client.packets()] == [Disconnect]


def test_keep_alive_zero_never_times_out_mqtt_3_1_2_10() -> None:
    broker, clock = make_broker()
    client = connected(broker, "c", keep_alive=0)
    clock.advance(100_000)
    broker.tick()
    assert not client.closed


def test_connect_never_sent_closed_after_timeout() -> None:
    broker, clock = make_broker()
    client = FakeClient(broker)
    client.send_raw(b"\x10")  # half a fixed header, then silence
    clock.advance(11)
    broker.tick()
    assert client.packets() == [] and client.closed
    assert client.conn not in broker.connections


def test_server_keep_alive_caps_client_mqtt_3_2_2_21() -> None:
    broker, clock = make_broker(max_keepalive=30)
    client = FakeClient(broker)
    connack = client.connect("c", keep_alive=600)
    assert connack.properties[P.SERVER_KEEP_ALIVE] == 30
    # MQTT-3.2.2-22: the client must use the server's value; the server enforces it.
    clock.advance(45.5)
    broker.tick()
    assert client.expect(Disconnect).reason_code == R.KEEP_ALIVE_TIMEOUT


def test_server_keep_alive_replaces_zero_mqtt_3_2_2_21() -> None:
    broker, _ = make_broker(max_keepalive=30)
    client = FakeClient(broker)
    assert client.connect("c", keep_alive=0).properties[P.SERVER_KEEP_ALIVE] == 30


def test_server_keep_alive_not_sent_when_within_cap() -> None:
    broker, _ = make_broker(max_keepalive=30)
    client = FakeClient(broker)
    assert P.SERVER_KEEP_ALIVE not in client.connect("c", keep_alive=20).properties


def test_server_keep_alive_cap_refuses_v311_client() -> None:
    broker, _ = make_broker(max_keepalive=30)
    client = FakeClient(broker, MQTT_3_1_1)
    connack = client.connect("c", keep_alive=600)
    assert connack.reason_code == R.CLIENT_IDENTIFIER_NOT_VALID  # return code 2
    assert client.closed


# --------------------------------------------------------------------------- retained


def test_retained_set_replace_and_clear_mqtt_3_3_1_5_to_7() -> None:
    broker, _ = make_broker()
    pub = connected(broker, "pub")
    pub.publish("r", b"one", 0, retain=True)
    pub.publish("r", b"two", 0, retain=True)  # replaces (MQTT-3.3.1-5)
    late = connected(broker, "late")
    late.subscribe("r")
    (msg,) = late.publishes()
    assert msg.payload == b"two" and msg.retain  # MQTT-3.3.1-9: RETAIN 1 on subscribe
    pub.publish("r", b"", 0, retain=True)  # empty payload clears (MQTT-3.3.1-6)
    assert [m.payload for m in late.publishes()] == [b""]
    later = connected(broker, "later")
    later.subscribe("r")
    later.expect_nothing()
    assert broker.store.retained_count() == 0


def test_retained_matching_wildcard_and_qos_mqtt_3_3_1_9() -> None:
    broker, _ = make_broker()
    pub = connected(broker, "pub")
    pub.publish_acked("r/a", b"a", 2, retain=True)
    pub.publish("r/b", b"b", 0, retain=True)
    pub.publish("other", b"o", 0, retain=True)
    late = connected(broker, "late")
    late.subscribe("r/+", qos=1)
    got = sorted((m.topic, m.qos) for m in late.publishes())
    assert got == [("r/a", 1), ("r/b", 0)]


@pytest.mark.parametrize(("handling", "first", "again"), [(0, 1, 1), (1, 1, 0), (2, 0, 0)])
def test_retain_handling_mqtt_3_3_1_9_to_11(handling: int, first: int, again: int) -> None:
    """0: on every subscribe; 1: only for a new subscription; 2: never."""
    broker, _ = make_broker()
    connected(broker, "pub").publish("r", b"kept", 0, retain=True)
    sub = connected(broker, "sub")
    opts = Subscription("r", 0, retain_handling=handling)
    sub.subscribe(opts)
    assert len(sub.publishes()) == first
    sub.subscribe(opts)
    assert len(sub.publishes()) == again


@pytest.mark.parametrize("rap", [False, True])
def test_retain_as_published_mqtt_3_3_1_12_and_13(rap: bool) -> None:
    broker, _ = make_broker()
    sub = connected(broker, "sub")
    sub.subscribe(Subscription("r", 0, retain_as_published=rap))
    connected(broker, "pub").publish("r", b"live", 0, retain=True)
    (msg,) = sub.publishes()
    assert msg.retain is rap


def test_retain_flag_cleared_for_v311_live_delivery_mqtt_3_3_1_9() -> None:
    broker, _ = make_broker()
    sub = connected(broker, "sub", MQTT_3_1_1)
    sub.subscribe("r")
    connected(broker, "pub").publish("r", b"live", 0, retain=True)
    assert sub.expect(Publish).retain is False


# --------------------------------------------------------------------------- message expiry


def test_queued_message_expires_mqtt_3_3_2_5() -> None:
    broker, clock = make_broker()
    sub = connected(broker, "sub", clean_start=False, session_expiry=600)
    sub.subscribe("t", qos=1)
    sub.disconnect()
    pub = connected(broker, "pub")
    pub.publish_acked("t", b"short", 1, properties={P.MESSAGE_EXPIRY_INTERVAL: 5})
    pub.publish_acked("t", b"long", 1, properties={P.MESSAGE_EXPIRY_INTERVAL: 50})
    pub.publish_acked("t", b"forever", 1)
    clock.advance(10)
    sub2 = connected(broker, "sub", clean_start=False, session_expiry=600)
    got = sub2.publishes()
    assert [m.payload for m in got] == [b"long", b"forever"]
    # MQTT-3.3.2-6: the interval sent is what is left of it.
    assert got[0].properties[P.MESSAGE_EXPIRY_INTERVAL] == 40
    assert P.MESSAGE_EXPIRY_INTERVAL not in got[1].properties


def test_live_delivery_carries_message_expiry_mqtt_3_3_2_6() -> None:
    broker, _ = make_broker()
    sub = connected(broker, "sub")
    sub.subscribe("t")
    connected(broker, "pub").publish("t", b"m", 0, properties={P.MESSAGE_EXPIRY_INTERVAL: 30})
    assert sub.expect(Publish).properties[P.MESSAGE_EXPIRY_INTERVAL] == 30


def test_retained_message_expiry_reduced_then_dropped_mqtt_3_3_2_6() -> None:
    broker, clock = make_broker()
    connected(broker, "pub").publish(
        "r", b"m", 0, retain=True, properties={P.MESSAGE_EXPIRY_INTERVAL: 10}
    )
    clock.advance(3)
    sub = connected(broker, "sub")
    sub.subscribe("r")
    assert sub.expect(Publish).properties[P.MESSAGE_EXPIRY_INTERVAL] == 7
    clock.advance(7)
    sub2 = connected(broker, "sub2")
    sub2.subscribe("r")
    sub2.expect_nothing()
    assert broker.store.retained_count() == 0


# --------------------------------------------------------------------------- routing


def test_overlapping_subscriptions_one_copy_max_qos_all_ids_mqtt_3_3_4_2_and_3() -> None:
    broker, _ = make_broker()
    sub = connected(broker, "sub")
    sub.subscribe("a/+", qos=0, sub_id=1)
    sub.subscribe("a/#", qos=2, sub_id=2)
    sub.subscribe("a/b", qos=1)  # no identifier
    connected(broker, "pub").publish_acked("a/b", b"m", 2)
    (msg,) = sub.publishes()
    assert msg.qos == 2
    assert sorted(msg.properties[P.SUBSCRIPTION_IDENTIFIER]) == [1, 2]


def test_subscription_identifier_single_match_mqtt_3_3_4_3() -> None:
    broker, _ = make_broker()
    sub = connected(broker, "sub")
    sub.subscribe("x", sub_id=77)
    connected(broker, "pub").publish("x", b"m")
    assert sub.expect(Publish).properties[P.SUBSCRIPTION_IDENTIFIER] == [77]


def test_no_local_mqtt_3_8_3_3() -> None:
    broker, _ = make_broker()
    me = connected(broker, "me")
    me.subscribe(Subscription("t", 1, no_local=True))
    other = connected(broker, "other")
    other.subscribe("t", qos=1)
    me.publish_acked("t", b"mine", 1)
    me.expect_nothing()
    assert [m.payload for m in other.publishes()] == [b"mine"]
    other.publish("t", b"theirs", 0)
    assert [m.payload for m in me.publishes()] == [b"theirs"]


def test_no_local_on_shared_subscription_is_protocol_error_mqtt_3_8_3_4() -> None:
    broker, _ = make_broker()
    client = connected(broker, "c")
    client.send(Subscribe(1, [Subscription("$share/g/t", 0, no_local=True)]))
    assert client.expect(Disconnect).reason_code == R.PROTOCOL_ERROR
    assert client.closed


def test_shared_subscription_round_robin_mqtt_4_8_2() -> None:
    broker, _ = make_broker()
    a = connected(broker, "a")
    b = connected(broker, "b")
    a.subscribe("$share/g/job", qos=1)
    b.subscribe("$share/g/job", qos=1)
    plain = connected(broker, "plain")
    plain.subscribe("job")
    pub = connected(broker, "pub")
    for i in range(6):
        pub.publish_acked("job", str(i).encode())
    got_a = [m.payload for m in a.publishes()]
    got_b = [m.payload for m in b.publishes()]
    assert len(got_a) == 3 and len(got_b) == 3
    assert sorted(got_a + got_b) == [str(i).encode() for i in range(6)]
    assert len(plain.publishes()) == 6  # non-shared subscribers get every message


def test_shared_subscription_prefers_connected_members_mqtt_4_8_2() -> None:
    broker, _ = make_broker()
    a = connected(broker, "a", clean_start=False, session_expiry=60)
    b = connected(broker, "b")
    a.subscribe("$share/g/job", qos=1)
    b.subscribe("$share/g/job", qos=1)
    a.disconnect()
    pub = connected(broker, "pub")
    for i in range(4):
        pub.publish_acked("job", str(i).encode())
    assert len(b.publishes()) == 4
    session = broker.store.get_session("a")
    assert session is not None and not session.pending


def test_shared_subscription_all_members_offline_queues_for_one() -> None:
    broker, _ = make_broker()
    a = connected(broker, "a", clean_start=False, session_expiry=60)
    b = connected(broker, "b", clean_start=False, session_expiry=60)
    a.subscribe("$share/g/job", qos=1)
    b.subscribe("$share/g/job", qos=1)
    a.disconnect()
    b.disconnect()
    pub = connected(broker, "pub")
    for i in range(4):
        pub.publish_acked("job", str(i).encode())
    sa = broker.store.get_session("a")
    sb = broker.store.get_session("b")
    assert sa is not None and sb is not None
    assert len(sa.pending) + len(sb.pending) == 4  # each message kept exactly once


def test_shared_subscription_no_retained_on_subscribe_mqtt_4_8_2() -> None:
    broker, _ = make_broker()
    connected(broker, "pub").publish("job", b"old", 0, retain=True)
    a = connected(broker, "a")
    a.subscribe("$share/g/job")
    a.expect_nothing()


def test_sys_topics_not_matched_by_leading_wildcard_mqtt_4_7_2_1() -> None:
    broker, _ = make_broker(sys_interval=10.0)
    everything = connected(broker, "all")
    everything.subscribe("#", "+/broker/#")
    sys_sub = connected(broker, "sys")
    sys_sub.subscribe("$SYS/#")
    broker.tick()
    everything.expect_nothing()
    got = {m.topic: m.payload for m in sys_sub.publishes()}
    assert got["$SYS/broker/version"] == b"qmig-test"
    assert got["$SYS/broker/clients/connected"] == b"2"


def test_sys_published_by_tick_every_interval() -> None:
    broker, clock = make_broker(sys_interval=10.0)
    sub = connected(broker, "sys")
    sub.subscribe("$SYS/broker/uptime")
    broker.tick()
    assert [m.payload for m in sub.publishes()] == [b"0 seconds"]
    clock.advance(5)
    broker.tick()
    sub.expect_nothing()
    clock.advance(5)
    broker.tick()
    assert [m.payload for m in sub.publishes()] == [b"10 seconds"]
    late = connected(broker, "late")
    late.subscribe("$SYS/broker/uptime")  # kept as a retained message
    assert late.expect(Publish).retain


def test_clients_cannot_publish_to_sys() -> None:
    broker, _ = make_broker(sys_interval=10.0)
    sub = connected(broker, "sub")
    sub.subscribe("$SYS/#")
    pub = connected(broker, "pub")
    assert pub.publish_acked("$SYS/broker/version", b"fake", 1) == R.NOT_AUTHORIZED
    sub.expect_nothing()


def test_no_matching_subscribers_reason_v5_only() -> None:
    broker, _ = make_broker()
    v5 = connected(broker, "v5")
    assert v5.publish_acked("nobody", b"", 1) == R.NO_MATCHING_SUBSCRIBERS
    v4 = connected(broker, "v4", MQTT_3_1_1)
    assert v4.publish_acked("nobody", b"", 1) == 0


# --------------------------------------------------------------------------- topic aliases


def test_inbound_topic_alias_mqtt_3_3_2_12() -> None:
    broker, _ = make_broker()
    sub = connected(broker, "sub")
    sub.subscribe("long/topic/name")
    pub = connected(broker, "pub")
    pub.publish("long/topic/name", b"1", properties={P.TOPIC_ALIAS: 3})
    pub.publish("", b"2", properties={P.TOPIC_ALIAS: 3})
    got = sub.publishes()
    assert [(m.topic, m.payload) for m in got] == [("long/topic/name", b"1")] * 1 + [
        ("long/topic/name", b"2")
    ]
    assert all(P.TOPIC_ALIAS not in m.properties for m in got)  # not forwarded


def test_inbound_unknown_topic_alias_disconnect_0x82_mqtt_3_3_4() -> None:
    broker, _ = make_broker()
    pub = connected(broker, "pub")
    pub.publish("", b"x", properties={P.TOPIC_ALIAS: 1})
    assert pub.expect(Disconnect).reason_code == R.PROTOCOL_ERROR
    assert pub.closed


def test_inbound_topic_alias_above_maximum_disconnect_0x94_mqtt_3_3_2_10() -> None:
    broker, _ = make_broker(topic_alias_maximum=4)
    pub = connected(broker, "pub")
    pub.publish("t", b"x", properties={P.TOPIC_ALIAS: 5})
    assert pub.expect(Disconnect).reason_code == R.TOPIC_ALIAS_INVALID
    assert pub.closed


def test_inbound_topic_alias_when_none_allowed_0x94_mqtt_3_3_2_9() -> None:
    broker, _ = make_broker(topic_alias_maximum=0)
    client = FakeClient(broker)
    assert P.TOPIC_ALIAS_MAXIMUM not in client.connect("pub").properties
    client.publish("t", b"x", properties={P.TOPIC_ALIAS: 1})
    assert client.expect(Disconnect).reason_code == R.TOPIC_ALIAS_INVALID


def test_outbound_topic_alias_when_client_allows_mqtt_3_3_2_11() -> None:
    broker, _ = make_broker()
    sub = connected(broker, "sub", properties={P.TOPIC_ALIAS_MAXIMUM: 2})
    sub.subscribe("#")
    pub = connected(broker, "pub")
    for topic in ("a/1", "a/1", "a/2", "a/3", "a/2", "a/3"):
        pub.publish(topic, b"")
    got = [(m.topic, m.properties.get(P.TOPIC_ALIAS)) for m in sub.publishes()]
    assert got == [
        ("a/1", 1),
        ("", 1),
        ("a/2", 2),
        ("a/3", None),  # above the client's Topic Alias Maximum: full name, no alias
        ("", 2),
        ("a/3", None),
    ]
    for _, alias in got:
        assert alias is None or alias <= 2  # MQTT-3.3.2-9


def test_no_outbound_topic_alias_without_client_maximum_mqtt_3_3_2_9() -> None:
    broker, _ = make_broker()
    sub = connected(broker, "sub")
    sub.subscribe("t")
    pub = connected(broker, "pub")
    pub.publish("t", b"1")
    pub.publish("t", b"2")
    assert all(m.topic == "t" and P.TOPIC_ALIAS not in m.properties for m in sub.publishes())


def test_outbound_alias_not_assigned_by_a_dropped_oversized_publish_mqtt_3_1_2_25() -> None:
    """A PUBLISH discarded for the client's Maximum Packet Size must not consume an alias
    the client never learnt; the next PUBLISH on that topic carries the full topic name."""
    broker, _ = make_broker()
    sub = connected(broker, "sub", properties={P.TOPIC_ALIAS_MAXIMUM: 5, P.MAXIMUM_PACKET_SIZE: 64})
    sub.subscribe("t/alias")
    pub = connected(broker, "pub")
    pub.publish("t/alias", b"x" * 200)
    pub.publish("t/alias", b"small")
    (msg,) = sub.publishes()
    assert msg.topic == "t/alias" and msg.payload == b"small"


# --------------------------------------------------------------------------- protocol errors


def test_publish_wildcard_topic_disconnect_0x90_mqtt_3_3_2_2() -> None:
    broker, _ = make_broker()
    client = connected(broker, "c")
    client.publish("a/+", b"")
    assert client.expect(Disconnect).reason_code == R.TOPIC_NAME_INVALID
    assert client.closed


def test_second_connect_is_protocol_error_mqtt_3_1_0_2() -> None:
    broker, _ = make_broker()
    client = connected(broker, "c")
    client.send(Connect("c"))
    assert client.expect(Disconnect).reason_code == R.PROTOCOL_ERROR
    assert client.closed


def test_packet_before_connect_closes_silently_mqtt_3_1_0_1() -> None:
    broker, _ = make_broker()
    client = FakeClient(broker)
    client.send(Publish("t", b"x", 0))
    assert client.packets() == [] and client.closed


@pytest.mark.parametrize("first", [b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00\x01", b"\x30\x10"])
def test_first_byte_not_connect_closes_at_once_mqtt_3_1_0_1(first: bytes) -> None:
    """HTTP, a TLS ClientHello or a PUBLISH header: no need to wait for a whole packet."""
    broker, _ = make_broker()
    client = FakeClient(broker)
    client.send_raw(first)
    assert client.packets() == [] and client.closed
    assert broker.stats.protocol_errors == 1


def test_connect_split_in_single_bytes_is_accepted() -> None:
    broker, _ = make_broker()
    client = FakeClient(broker)
    for byte in encode(Connect("split", properties={P.SESSION_EXPIRY_INTERVAL: 5}), MQTT_5):
        client.send_raw(bytes((byte,)))
    assert client.expect(Connack).reason_code == R.SUCCESS


def test_unsupported_protocol_level_connack_0x84_mqtt_3_1_2_2() -> None:
    broker, _ = make_broker()
    client = FakeClient(broker)
    data = bytearray(encode(Connect("c"), MQTT_5))
    data[8] = 6  # protocol level byte
    client.send_raw(bytes(data))
    assert client.conn.data_to_send() == b"\x20\x03\x00\x84\x00"
    client.poll()
    assert client.closed


def test_unsupported_protocol_level_v311_return_code_1_mqtt_3_1_2_2() -> None:
    """3.1.1 MQTT-3.1.2-2: CONNACK return code 0x01 then disconnect."""
    broker, _ = make_broker()
    client = FakeClient(broker, MQTT_3_1_1)
    data = bytearray(encode(Connect("c", MQTT_3_1_1), MQTT_3_1_1))
    data[8] = 2
    client.send_raw(bytes(data))
    assert client.conn.data_to_send() == b"\x20\x02\x00\x01"
    client.poll()
    assert client.closed


def test_max_subscriptions_suback_0x97() -> None:
    broker, _ = make_broker(max_subscriptions_per_client=2)
    client = connected(broker, "c")
    suback = client.subscribe("a", "b", "c", qos=1)
    assert suback.reason_codes == [1, 1, R.QUOTA_EXCEEDED]
    # Replacing an existing subscription does not count against the limit.
    assert client.subscribe("a", qos=2).reason_codes == [2]
    v4 = connected(broker, "v4", MQTT_3_1_1)
    assert v4.subscribe("a", "b", "c").reason_codes == [0, 0, 0x80]  # 3.1.1 failure code


def test_invalid_topic_filter_suback_0x8f() -> None:
    broker, _ = make_broker()
    client = connected(broker, "c")
    assert client.subscribe("a/#/b", "ok").reason_codes == [R.TOPIC_FILTER_INVALID, 0]


# --------------------------------------------------------------------------- migration API


def test_disconnect_clients_server_moved_keeps_sessions_mqtt_3_14_2() -> None:
    broker, _ = make_broker()
    v5 = connected(broker, "v5", clean_start=False, session_expiry=300)
    v5.subscribe("t", qos=1)
    v4 = connected(broker, "v4", MQTT_3_1_1, clean_start=False)
    v4.subscribe("t", qos=1)
    other = FakeClient(broker, transport="mptcp")
    other.connect("mp")
    closed = broker.disconnect_clients({"tcp"}, R.SERVER_MOVED, "198.18.2.2:1883")
    assert closed == 2
    disc = v5.expect(Disconnect)
    assert disc.reason_code == R.SERVER_MOVED
    assert disc.properties[P.SERVER_REFERENCE] == "198.18.2.2:1883"
    assert v5.closed
    assert v4.packets() == [] and v4.closed
    assert not other.closed
    # Sessions stay and keep collecting messages for the clients' return.
    pub = FakeClient(broker, transport="mptcp")
    pub.connect("pub")
    pub.publish_acked("t", b"while-away")
    for client_id, version in (("v5", MQTT_5), ("v4", MQTT_3_1_1)):
        back = FakeClient(broker, version)
        expiry = 300 if version == MQTT_5 else None
        assert back.connect(client_id, clean_start=False, session_expiry=expiry).session_present
        assert [m.payload for m in back.publishes()] == [b"while-away"]


@pytest.mark.parametrize(
    ("permanent", "code"), [(False, R.USE_ANOTHER_SERVER), (True, R.SERVER_MOVED)]
)
def test_set_redirect_connack_with_server_reference_mqtt_4_11(permanent: bool, code: int) -> None:
    broker, _ = make_broker()
    broker.set_redirect("198.18.2.2:1883", permanent)
    client = FakeClient(broker)
    connack = client.connect("c")
    assert connack.reason_code == code
    assert connack.properties[P.SERVER_REFERENCE] == "198.18.2.2:1883"
    assert client.closed
    v4 = FakeClient(broker, MQTT_3_1_1)
    assert v4.connect("d").reason_code == R.SERVER_UNAVAILABLE  # 3.1.1 return code 3
    broker.set_redirect(None)
    assert FakeClient(broker).connect("e").reason_code == R.SUCCESS


def test_take_dirty_lists_connections_with_output() -> None:
    broker, _ = make_broker()
    a = connected(broker, "a")
    b = connected(broker, "b")
    a.subscribe("t")
    broker.take_dirty()
    b.publish("t", b"x")
    assert a.conn in broker.take_dirty()
    assert broker.take_dirty() == set()


def test_clean_start_session_not_ended_by_old_session_expiry_mqtt_3_1_2_4() -> None:
    """The expiry timer of a session discarded by Clean Start must not end its successor."""
    broker, clock = make_broker()
    connected(broker, "c", clean_start=False, session_expiry=10).disconnect()
    client = connected(broker, "c", clean_start=True, session_expiry=100)
    client.subscribe("t", qos=1)
    clock.advance(11)
    broker.tick()
    session = broker.store.get_session("c")
    assert session is not None and session.connection is client.conn
    connected(broker, "pub").publish_acked("t", b"still-subscribed")
    assert [m.payload for m in client.publishes()] == [b"still-subscribed"]


@pytest.mark.parametrize("topic", ["will/#", "will/+/x"])
def test_will_topic_with_wildcard_refused_v5_connack_0x90_mqtt_3_1_3_11(topic: str) -> None:
    """The Will Topic is a topic name (MQTT-3.1.3-11), so wildcards are not allowed
    (MQTT-4.7.0-1); otherwise subscribers would receive a PUBLISH they must reject."""
    broker, _ = make_broker()
    watcher = will_watcher(broker)
    client = FakeClient(broker)
    connack = client.connect("c", will=Will(topic, b"x"))
    assert connack.reason_code == R.TOPIC_NAME_INVALID
    assert client.closed
    watcher.expect_nothing()
    assert broker.store.get_session("c") is None


def test_will_topic_with_wildcard_v311_closed_without_connack_mqtt_3_1_3_11() -> None:
    broker, _ = make_broker()
    watcher = will_watcher(broker)
    client = FakeClient(broker, MQTT_3_1_1)
    client.send(Connect("c", MQTT_3_1_1, will=Will("will/#", b"x")))
    assert client.packets() == [] and client.closed
    watcher.expect_nothing()


def test_will_cannot_publish_to_sys() -> None:
    """A client cannot write to $SYS by PUBLISH, and not through its will either."""
    broker, _ = make_broker(sys_interval=10.0)
    broker.tick()
    client = connected(broker, "c", will=Will("$SYS/broker/version", b"forged", 0, True))
    client.drop()
    reader = connected(broker, "reader")
    reader.subscribe("$SYS/broker/version")
    assert [m.payload for m in reader.publishes()] == [b"qmig-test"]


def test_takeover_after_normal_disconnect_does_not_send_will_mqtt_3_14_4_3() -> None:
    """DISCONNECT 0x00 discards the will even if the new connection arrives before the
    transport of the old one is closed (the I/O layer closes it asynchronously)."""
    broker, _ = make_broker()
    watcher = will_watcher(broker)
    old = connected(broker, "c", will=will(), clean_start=False, session_expiry=60)
    old.send(Disconnect())  # not yet polled: connection_lost has not happened
    connected(broker, "c", clean_start=False, session_expiry=60)
    old.poll()
    watcher.expect_nothing()


def test_valid_packets_before_a_malformed_one_are_processed() -> None:
    """Bad input loses nothing: a PUBLISH that arrived whole before garbage is delivered."""
    broker, _ = make_broker()
    sub = connected(broker, "sub")
    sub.subscribe("t", qos=1)
    pub = connected(broker, "pub")
    good = encode(Publish("t", b"kept", 1, packet_id=1), MQTT_5)
    pub.send_raw(good + b"\x00\x00")  # packet type 0 is reserved: malformed
    assert [m.payload for m in sub.publishes()] == [b"kept"]
    assert pub.expect(Puback).packet_id == 1
    assert pub.expect(Disconnect).reason_code == R.MALFORMED_PACKET
    assert pub.closed
