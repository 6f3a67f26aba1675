"""Finding 7 of issue #13: the broker's limits counted messages, not bytes.

Engine-level (sans-I/O, fake clock): a session's queue has a byte budget
(``max_queued_bytes``), all sessions together have one (``max_queued_bytes_total``, each
message counted once however many sessions share it), a client that does not read has its
held output capped (``max_output_bytes``), and a packet that has begun arriving must be
complete within ``incomplete_packet_timeout`` seconds, with incomplete packets of all
connections capped (``max_incomplete_bytes_total``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pytest
from sansio import FakeClient, make_broker

from broker.config import BrokerConfig, ConfigError, add_broker_arguments, config_from_args
from broker.engine import Broker
from broker.session import DELIVERY_OVERHEAD
from mqttproto.codec import encode
from mqttproto.packets import MQTT_3_1_1, MQTT_5, Connack, Connect, Disconnect, Pingreq, Publish
from mqttproto.properties import PropertyId
from mqttproto.reasons import ReasonCode

P = PropertyId
R = ReasonCode
PAYLOAD = b"p" * 1000
TOPIC = "t"
COST = len(PAYLOAD) + len(TOPIC) + DELIVERY_OVERHEAD  # what one queued delivery is charged


def connected(broker: Broker, client_id: str = "", version: int = MQTT_5, **kw: Any) -> FakeClient:
    client = FakeClient(broker, version)
    assert client.connect(client_id, **kw).reason_code == R.SUCCESS
    return client


def offline_subscriber(broker: Broker, client_id: str, topic: str = TOPIC) -> None:
    sub = connected(broker, client_id, clean_start=False, session_expiry=600)
    sub.subscribe(topic, qos=1)
    sub.disconnect()


def info_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage() for r in caplog.records
        if r.levelno >= logging.INFO and text in r.getMessage()
    ]  # fmt: skip


# --------------------------------------------------------------------------- queued bytes


def test_session_byte_budget_drops_beyond_it_and_says_quota_exceeded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """10 messages fit the session's budget; the rest are dropped, counted, logged once, and
    the publisher's PUBACK says 0x97 Quota exceeded, not 0x10 No matching subscribers."""
    caplog.set_level(logging.DEBUG, "qmig.broker")
    broker, _ = make_broker(max_queued_bytes=10 * COST)
    offline_subscriber(broker, "sub")
    pub = connected(broker, "pub")
    codes = [pub.publish_acked(TOPIC, PAYLOAD) for _ in range(25)]
    assert codes == [R.SUCCESS] * 10 + [R.QUOTA_EXCEEDED] * 15
    session = broker.store.get_session("sub")
    assert session is not None
    assert len(session.pending) == 10 and session.held_bytes == 10 * COST
    assert session.dropped == 15 and broker.stats.dropped == 15
    assert broker.stats.quota_dropped == 15
    assert len(info_lines(caplog, "max_queued_bytes")) == 1
    # A 3.1.1 publisher cannot be told why: a plain PUBACK, the message dropped all the same.
    old = connected(broker, "old", MQTT_3_1_1)
    assert old.publish_acked(TOPIC, PAYLOAD) == R.SUCCESS
    assert session.dropped == 16
    # The session gets what fitted, in order; once acknowledged it holds nothing.
    sub = connected(broker, "sub", clean_start=False, session_expiry=600)
    got = sub.publishes()
    assert len(got) == 10
    for msg in got:
        sub.ack(msg)
    assert session.held_bytes == 0 and broker.queued_bytes == 0
    assert pub.publish_acked(TOPIC, PAYLOAD) == R.SUCCESS  # room again


def test_in_flight_messages_count_against_the_session_budget() -> None:
    """A connected subscriber that never acknowledges is held to the budget too."""
    broker, _ = make_broker(max_queued_bytes=4 * COST)
    sub = connected(broker, "sub")
    sub.subscribe(TOPIC, qos=1)
    pub = connected(broker, "pub")
    codes = [pub.publish_acked(TOPIC, PAYLOAD) for _ in range(6)]
    assert codes == [R.SUCCESS] * 4 + [R.QUOTA_EXCEEDED] * 2
    got = sub.publishes()
    assert len(got) == 4
    sub.ack(got[0])
    assert pub.publish_acked(TOPIC, PAYLOAD) == R.SUCCESS
    assert len(sub.publishes()) == 1


def test_a_session_holding_nothing_takes_a_message_larger_than_its_budget() -> None:
    broker, _ = make_broker(max_queued_bytes=100)
    offline_subscriber(broker, "sub")
    pub = connected(broker, "pub")
    assert pub.publish_acked(TOPIC, PAYLOAD) == R.SUCCESS
    assert pub.publish_acked(TOPIC, PAYLOAD) == R.QUOTA_EXCEEDED


def test_broker_wide_budget_refuses_every_session(caplog: pytest.LogCaptureFixture) -> None:
    """Sessions within their own budget are refused once all together hold the total."""
    caplog.set_level(logging.DEBUG, "qmig.broker")
    broker, _ = make_broker(max_queued_bytes=0, max_queued_bytes_total=6 * COST)
    offline_subscriber(broker, "a", "a")
    offline_subscriber(broker, "b", "b")
    pub = connected(broker, "pub")
    big = b"p" * (len(PAYLOAD) + len(TOPIC) - 1)  # topics "a"/"b": the same cost as PAYLOAD
    assert [pub.publish_acked("a", big) for _ in range(4)] == [R.SUCCESS] * 4
    assert [pub.publish_acked("b", big) for _ in range(3)] == [R.SUCCESS] * 2 + [R.QUOTA_EXCEEDED]
    assert broker.queued_bytes == 6 * COST
    assert len(info_lines(caplog, "max_queued_bytes_total")) == 1
    # Session "a" draining makes room for "b".
    a = connected(broker, "a", clean_start=False, session_expiry=600)
    for msg in a.publishes():
        a.ack(msg)
    assert broker.queued_bytes == 2 * COST
    assert pub.publish_acked("b", big) == R.SUCCESS


def test_a_message_shared_by_sessions_is_counted_once_broker_wide() -> None:
    """One message for five sessions is one object: the broker-wide budget counts its bytes
    once (plus the per-delivery overhead); each session's budget counts it whole."""
    broker, _ = make_broker(max_queued_bytes_total=2 * COST + 5 * DELIVERY_OVERHEAD)
    for n in range(5):
        offline_subscriber(broker, f"s{n}")
    pub = connected(broker, "pub")
    assert pub.publish_acked(TOPIC, PAYLOAD) == R.SUCCESS
    size = COST - DELIVERY_OVERHEAD
    assert broker.queued_bytes == size + 5 * DELIVERY_OVERHEAD
    for n in range(5):
        session = broker.store.get_session(f"s{n}")
        assert session is not None and len(session.pending) == 1
        assert session.held_bytes == COST
    # Sessions ending give it all back.
    for n in range(5):
        connected(broker, f"s{n}", clean_start=True).disconnect()
    assert broker.queued_bytes == 0


def test_refused_for_one_session_delivered_to_another_is_success() -> None:
    broker, _ = make_broker(max_queued_bytes=COST)
    offline_subscriber(broker, "full")
    pub = connected(broker, "pub")
    assert pub.publish_acked(TOPIC, PAYLOAD) == R.SUCCESS
    live = connected(broker, "live")
    live.subscribe(TOPIC, qos=0)
    assert pub.publish_acked(TOPIC, PAYLOAD) == R.SUCCESS
    assert len(live.publishes()) == 1


def test_expired_and_discarded_messages_are_released() -> None:
    broker, clock = make_broker()
    offline_subscriber(broker, "sub")
    pub = connected(broker, "pub")
    pub.publish_acked(TOPIC, PAYLOAD, properties={P.MESSAGE_EXPIRY_INTERVAL: 5})
    pub.publish_acked(TOPIC, PAYLOAD)
    assert broker.queued_bytes > 0
    clock.advance(10)
    sub = connected(broker, "sub", clean_start=False, session_expiry=600)
    assert len(sub.publishes()) == 1  # the expired one is not sent, and no longer held
    session = broker.store.get_session("sub")
    assert session is not None and session.held_bytes == COST
    sub.drop()  # in flight, unacknowledged: still held for the session
    assert broker.queued_bytes == COST
    connected(broker, "sub", clean_start=True)  # MQTT-3.1.2-4: the session is discarded
    assert broker.queued_bytes == 0


# --------------------------------------------------------------------------- unread output


def test_output_waits_in_the_engine_while_paused_and_flows_on_resume() -> None:
    broker, _ = make_broker()
    client = connected(broker, "c")
    client.conn.set_writable(False)
    client.send(Pingreq())
    assert client.conn.data_to_send() == b""  # held, counted, not handed to the transport
    broker.take_dirty()
    client.conn.set_writable(True)
    assert client.conn in broker.take_dirty()
    assert client.conn.data_to_send() == b"\xd0\x00"


def test_a_client_that_never_reads_is_closed_at_the_output_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PINGRESPs (or acks) for a client whose transport is full are held up to
    max_output_bytes; one byte more closes it, without lingering, and its session keeps
    its queued QoS 1 messages."""
    caplog.set_level(logging.DEBUG, "qmig.broker")
    broker, _ = make_broker(max_output_bytes=1000)
    sloth = connected(broker, "sloth", clean_start=False, session_expiry=600)
    sloth.subscribe(TOPIC, qos=1)
    bystander = connected(broker, "bystander")
    sloth.conn.set_writable(False)
    pub = connected(broker, "pub")
    assert pub.publish_acked(TOPIC, PAYLOAD) == R.SUCCESS  # queued: the transport is full
    ping = encode(Pingreq(), MQTT_5)
    sloth.send_raw(ping * 500)  # 1000 bytes of PINGRESP: at the cap, not over it
    assert not sloth.conn.closing
    sloth.send_raw(ping)
    assert sloth.conn.closing and sloth.conn.abort
    assert sloth.conn.data_to_send() == b""  # dropped, not sent: it would not be read
    assert broker.stats.limit_closed == 1
    assert len(info_lines(caplog, "max_output_bytes")) == 1
    sloth.poll()
    assert sloth.closed
    # Nobody else noticed; the session waits with its message.
    bystander.send(Pingreq())
    assert bystander.conn.data_to_send() == b"\xd0\x00"
    back = connected(broker, "sloth", clean_start=False, session_expiry=600)
    assert [m.payload for m in back.publishes()] == [PAYLOAD]


# --------------------------------------------------------------------------- incomplete packets

BIG = encode(Publish("big", b"b" * 5000, 0), MQTT_5)


def test_a_packet_that_never_completes_times_out_even_with_keep_alive_0(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, "qmig.broker")
    broker, clock = make_broker(incomplete_packet_timeout=30)
    staller = connected(broker, "staller", keep_alive=0)
    staller.send_raw(BIG[:1000])
    assert broker.incomplete_bytes == 1000
    clock.advance(20)
    staller.send_raw(BIG[1000:2000])  # trickling does not extend the deadline
    clock.advance(10)
    broker.tick()
    assert not staller.conn.closing
    clock.advance(1)
    broker.tick()
    assert staller.expect(Disconnect).reason_code == R.KEEP_ALIVE_TIMEOUT
    assert staller.closed
    assert broker.incomplete_bytes == 0 and broker.stats.limit_closed == 1
    assert len(info_lines(caplog, "a packet incomplete")) == 1


def test_packets_that_keep_completing_do_not_time_out() -> None:
    """A busy client always has some packet half-arrived; each new one restarts the clock."""
    broker, clock = make_broker(incomplete_packet_timeout=30)
    busy = connected(broker, "busy", keep_alive=0)
    busy.send_raw(BIG[:3000])
    for _ in range(5):
        clock.advance(20)
        busy.send_raw(BIG[3000:] + BIG[:3000])  # one completes, the next begins
        broker.tick()
    assert not busy.conn.closing


def test_a_stalled_data_stream_times_out_while_the_control_stream_is_busy() -> None:
    """Multi-stream QUIC: each channel's incomplete packet has its own clock."""
    broker, clock = make_broker(incomplete_packet_timeout=30)
    client = connected(broker, "multi", keep_alive=0)
    client.conn.receive_data(BIG[:100], channel=1)
    ping = encode(Pingreq(), MQTT_5)
    for _ in range(4):
        clock.advance(10)
        client.send_raw(ping + BIG[:10])  # channel 0: a fresh partial packet every time
        client.send_raw(BIG[10:])
        broker.tick()
    assert client.conn.closing
    assert broker.incomplete_bytes == 0


def test_over_the_broker_wide_cap_the_oldest_incomplete_packet_is_shed() -> None:
    broker, clock = make_broker(max_incomplete_bytes_total=3000)
    clients = [connected(broker, f"c{n}", keep_alive=0) for n in range(3)]
    for client in clients:
        client.send_raw(BIG[:1200])
        clock.advance(1)
    first, second, third = clients
    assert first.expect(Disconnect).reason_code == R.QUOTA_EXCEEDED
    assert not second.conn.closing and not third.conn.closing
    assert broker.incomplete_bytes == 2400 and broker.stats.limit_closed == 1
    # The survivors' packets complete normally.
    second.send_raw(BIG[1200:])
    assert broker.incomplete_bytes == 1200
    third.drop()
    assert broker.incomplete_bytes == 0


def test_a_data_stream_ended_mid_packet_holds_nothing_and_times_nothing() -> None:
    broker, clock = make_broker(incomplete_packet_timeout=30)
    client = connected(broker, "multi", keep_alive=0)
    client.conn.receive_data(BIG[:100], channel=1)
    assert broker.incomplete_bytes == 100
    client.conn.channel_closed(1)
    assert broker.incomplete_bytes == 0
    clock.advance(60)
    broker.tick()
    assert not client.conn.closing


def test_budget_settings_from_flags_and_yaml(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_broker_arguments(parser)
    yaml_file = tmp_path / "broker.yaml"
    yaml_file.write_text("max-queued-bytes: 1000\nincomplete_packet_timeout: 5\n")
    args = parser.parse_args(
        ["--config", str(yaml_file), "--max-output-bytes", "4096",
         "--max-queued-bytes-total", "0", "--max-incomplete-bytes-total", "65536"]
    )  # fmt: skip
    config = config_from_args(args)
    assert (config.max_queued_bytes, config.max_queued_bytes_total) == (1000, 0)
    assert (config.max_output_bytes, config.max_incomplete_bytes_total) == (4096, 65536)
    assert config.incomplete_packet_timeout == 5.0
    defaults = BrokerConfig()
    assert defaults.max_queued_bytes == 64 << 20 and defaults.max_output_bytes == 8 << 20
    for name in ("max_queued_bytes", "max_output_bytes", "incomplete_packet_timeout"):
        with pytest.raises(ConfigError, match=name):
            BrokerConfig(**{name: -1}).validate()


def test_queued_messages_the_acl_withholds_are_released(tmp_path: Path) -> None:
    """Finding 3's send-time ACL check drops queued messages: their bytes go back too."""
    acl = tmp_path / "acl"
    acl.write_text("user bob\ntopic readwrite bob/#\nuser alice\ntopic readwrite alice/#\n")
    broker, _ = make_broker(acl_file=str(acl))
    expiry = {P.SESSION_EXPIRY_INTERVAL: 600}
    bob = FakeClient(broker)
    bob.send(Connect("device", MQTT_5, False, 0, "bob", None, None, dict(expiry)))
    bob.expect(Connack)
    bob.subscribe("bob/inbox", qos=1)
    bob.disconnect()
    pub = FakeClient(broker)
    pub.send(Connect("pub", MQTT_5, True, 0, "bob", None, None, {}))
    pub.expect(Connack)
    for _ in range(3):
        assert pub.publish_acked("bob/inbox", PAYLOAD) == R.SUCCESS
    assert broker.queued_bytes > 0
    alice = FakeClient(broker)  # no password file: the id changes hands, the ACL says no
    alice.send(Connect("device", MQTT_5, False, 0, "alice", None, None, dict(expiry)))
    assert alice.expect(Connack).session_present
    assert not [p for p in alice.packets() if isinstance(p, Publish)]
    session = broker.store.get_session("device")
    assert session is not None and session.held_bytes == 0
    assert broker.queued_bytes == 0
