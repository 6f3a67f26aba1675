"""A post-copy migration's commit point (broker.provisional): the rules, one by one.

While provisional the broker serves but acknowledges nothing a rollback to the frozen image
would forget; commit (or rollback) sends it all, in order.  Each test drives the sans-I/O
engine as a client would and checks what that client receives.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from broker.config import BrokerConfig
from broker.engine import Broker
from broker.persist import SqliteStore
from mqttproto.packets import (
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
)
from mqttproto.reasons import ReasonCode
from tests.sansio import FakeClient, FakeClock, make_broker


class FakeWall:
    def __init__(self) -> None:
        self.now = 1.7e9

    def __call__(self) -> float:
        return self.now


def provisional_broker(**settings: object) -> tuple[Broker, FakeWall]:
    broker, _ = make_broker(**settings)
    wall = FakeWall()
    broker.wall = wall
    broker.begin_provisional(60.0)
    return broker, wall


def clients(broker: Broker) -> tuple[FakeClient, FakeClient]:
    """A subscriber of t/# (QoS 2) and a publisher, both connected before the freeze."""
    sub, pub = FakeClient(broker), FakeClient(broker)
    sub.connect("sub")
    pub.connect("pub")
    # The SUBACK is held too (rule 2): subscribe before the provisional phase.
    held = broker.provisional
    broker.provisional = None
    sub.subscribe("t/#", qos=2)
    broker.provisional = held
    return sub, pub


def test_qos1_is_delivered_at_once_but_acknowledged_only_at_the_commit() -> None:
    broker, _ = provisional_broker()
    sub, pub = clients(broker)
    pid = pub.publish("t/1", b"m", qos=1)
    (delivered,) = sub.publishes()
    assert delivered.payload == b"m"  # rule 1: it keeps serving
    pub.expect_nothing()  # rule 2: no PUBACK a rollback would make a lie
    assert broker.end_provisional() == {"held_acks": 1, "held_qos2": 0, "held_qos2_bytes": 0}
    assert pub.expect(Puback).packet_id == pid
    assert broker.provisional is None


def test_qos2_is_kept_unrouted_until_the_commit_and_delivered_once() -> None:
    broker, _ = provisional_broker()
    sub, pub = clients(broker)
    pid = pub.publish("t/2", b"once", qos=2)
    sub.expect_nothing()  # rule 3: a rollback would see it resent; routed now, it came twice
    pub.expect_nothing()
    pub.send(Publish("t/2", b"once", 2, False, True, pid, {}))  # the client resends (DUP)
    sub.expect_nothing()
    assert broker.provisional is not None and broker.provisional.deferred_bytes > 0
    before = broker.queued_bytes
    released = broker.end_provisional()
    assert released["held_qos2"] == 1 and released["held_qos2_bytes"] > 0
    (delivered,) = sub.publishes()
    assert delivered.payload == b"once"
    assert broker.queued_bytes >= before - released["held_qos2_bytes"]
    recs = pub.packets()
    assert recs and all(isinstance(p, Pubrec) and p.packet_id == pid for p in recs)
    pub.send(Pubrel(pid))
    assert pub.expect(Pubcomp).packet_id == pid
    sub.expect_nothing()


def test_a_subscriber_keeps_its_qos2_packet_id_until_the_commit() -> None:
    broker, _ = make_broker()
    sub, pub = FakeClient(broker), FakeClient(broker)
    sub.connect("sub")
    sub.subscribe("t/#", qos=2)
    pub.connect("pub")
    pub.publish_acked("t/3", b"x", qos=2)  # routed before the freeze
    (delivery,) = sub.publishes()
    broker.begin_provisional(60.0)
    sub.send(Pubrec(delivery.packet_id))
    sub.expect_nothing()  # no PUBREL: the subscriber still knows the id, so a rollback's
    # resend of the message is answered as a duplicate, not delivered again
    broker.end_provisional()
    assert sub.expect(Pubrel).packet_id == delivery.packet_id


def test_pubcomp_for_a_message_of_before_the_freeze_waits_for_the_commit() -> None:
    broker, _ = make_broker()
    sub, pub = FakeClient(broker), FakeClient(broker)
    sub.connect("sub")
    sub.subscribe("t/#", qos=1)
    pub.connect("pub")
    pid = pub.publish("t/4", b"y", qos=2)
    assert pub.expect(Pubrec).packet_id == pid
    broker.begin_provisional(60.0)
    pub.send(Pubrel(pid))
    pub.expect_nothing()  # after a rollback the source still expects this PUBREL
    broker.end_provisional()
    assert pub.expect(Pubcomp).packet_id == pid


def test_suback_and_unsuback_wait_but_the_subscription_serves_at_once() -> None:
    broker, _ = provisional_broker()
    sub, pub = FakeClient(broker), FakeClient(broker)
    sub.connect("sub")
    pub.connect("pub")
    sub.send(Subscribe(7, [Subscription("s/#", 0)], {}))
    sub.expect_nothing()
    pub.publish("s/x", b"now", qos=0)
    (delivered,) = sub.publishes()
    assert delivered.payload == b"now"
    sub.send(Unsubscribe(8, ["nothing/#"], {}))
    broker.end_provisional()
    assert sub.expect(Suback).packet_id == 7
    unsuback = sub.expect(Unsuback)
    assert unsuback.packet_id == 8 and unsuback.reason_codes == [ReasonCode.NO_SUBSCRIPTION_EXISTED]


def test_acknowledgements_go_out_in_the_order_they_were_made() -> None:
    broker, _ = provisional_broker()
    _sub, pub = clients(broker)
    pids = [pub.publish("t/o", str(i).encode(), qos=1) for i in range(5)]
    broker.end_provisional()
    assert [pub.expect(Puback).packet_id for _ in pids] == pids


def test_a_closed_connection_loses_only_its_own_held_acknowledgements() -> None:
    broker, _ = provisional_broker()
    _sub, pub = clients(broker)
    other = FakeClient(broker)
    other.connect("other")
    pub.publish("t/a", b"1", qos=1)
    pid = other.publish("t/b", b"2", qos=1)
    pub.drop()  # its client sends the message again on its session (rule 5)
    assert broker.end_provisional()["held_acks"] == 2
    assert other.expect(Puback).packet_id == pid


def test_a_resumed_publisher_gets_its_resend_acknowledged_after_the_commit() -> None:
    broker, _ = provisional_broker()
    sub, _pub = clients(broker)
    pub2 = FakeClient(broker)
    pub2.connect("pub2", clean_start=False, session_expiry=300)
    pid = pub2.publish("t/r", b"r", qos=2)
    pub2.drop()
    again = FakeClient(broker)
    again.connect("pub2", clean_start=False, session_expiry=300)
    again.send(Publish("t/r", b"r", 2, False, True, pid, {}))
    again.expect_nothing()
    broker.end_provisional()
    (delivered,) = sub.publishes()
    assert delivered.payload == b"r"
    assert again.expect(Pubrec).packet_id == pid


def test_kept_qos2_messages_are_bounded_in_bytes() -> None:
    broker, _ = provisional_broker(max_queued_bytes_total=4096)
    sub, pub = clients(broker)
    first = pub.publish("t/big", b"a" * 2000, qos=2)
    second = pub.publish("t/big", b"b" * 2000, qos=2)
    refused = pub.expect(Pubrec)  # over the budget: refused now, nothing held for it
    assert refused.packet_id == second and refused.reason_code == ReasonCode.QUOTA_EXCEEDED
    broker.end_provisional()
    assert [p.payload[:1] for p in sub.publishes()] == [b"a"]
    assert pub.expect(Pubrec).packet_id == first


def test_the_deadline_commits_by_itself_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    broker, wall = provisional_broker()
    _sub, pub = clients(broker)
    pid = pub.publish("t/d", b"d", qos=1)
    wall.now += 59.0
    broker.tick()
    pub.expect_nothing()
    wall.now += 2.0
    with caplog.at_level(logging.WARNING, logger="qmig.broker"):
        broker.tick()
    assert pub.expect(Puback).packet_id == pid
    assert broker.provisional is None
    assert "committed by itself" in caplog.text


def test_strict_mode_acks_wait_for_the_disk_and_then_for_the_commit(tmp_path: Path) -> None:
    config = BrokerConfig(sys_interval=0.0, persistence_sync="strict").validate()
    store = SqliteStore(tmp_path, strict=True)
    broker = Broker(config, store=store, clock=FakeClock(), version="qmig-test")
    broker.begin_provisional(60.0)
    pub = FakeClient(broker)
    pub.connect("pub")
    pid = pub.publish("t", b"x", qos=1)
    acks = broker.take_acks()
    assert len(acks) == 1
    store.commit(broker.now(), 1.7e9)
    broker.release_acks(acks)
    pub.expect_nothing()  # durable now, but not committed by the migration yet
    broker.end_provisional()
    assert pub.expect(Puback).packet_id == pid
    store.close()


def test_a_held_ack_goes_out_on_the_stream_of_its_publish(tmp_path: Path) -> None:
    """Multi-stream QUIC: an ack held (for the disk, then for the commit) is sent on the
    stream that carried its PUBLISH, not on whatever stream is being read when it goes."""
    config = BrokerConfig(sys_interval=0.0, persistence_sync="strict").validate()
    store = SqliteStore(tmp_path, strict=True)
    broker = Broker(config, store=store, clock=FakeClock(), version="qmig-test")
    pub = FakeClient(broker, transport="quic")
    pub.connect("pub")
    conn = pub.conn
    for provisional in (False, True):
        if provisional:
            broker.begin_provisional(60.0)
        conn.rx_channel = 4  # the PUBLISH arrived on data stream 4
        broker.send_ack(conn, b"\x40\x02\x00\x09")
        conn.rx_channel = 8  # the next packet is being read from another stream
        acks = broker.take_acks()
        store.commit(broker.now(), 1.7e9)
        broker.release_acks(acks)
        broker.end_provisional()
        assert conn.side_data_to_send() == {4: b"\x40\x02\x00\x09"}, provisional
    store.close()
