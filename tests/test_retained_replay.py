"""Retained messages on subscribe: one replay per filter, sent in paced batches.

Issue #13: with 100,000 retained messages, one 165-byte SUBSCRIBE listing ``#`` 40 times
made 4,000,000 PUBLISH packets in one event-loop turn.  A filter repeated in a SUBSCRIBE
is one subscription (MQTT-3.8.4-3 replaces, it never adds), so it gets one replay; and a
replay goes out in bounded batches, one per connection and turn
(:meth:`broker.engine.Broker.step_replays`), with other connections served in between.

Pacing tests read ``conn.data_to_send()`` themselves: ``FakeClient.poll`` would run every
replay to its end, as the server's successive turns do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sansio import FakeClient, make_broker

from broker.engine import REPLAY_STEP_BYTES, REPLAY_STEP_MESSAGES, REPLAY_TURN_MESSAGES, Broker
from mqttproto.codec import encode_publish
from mqttproto.packets import (
    MQTT_3_1_1,
    MQTT_5,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
    Unsubscribe,
)
from mqttproto.properties import PropertyId
from mqttproto.reasons import ReasonCode

P = PropertyId
R = ReasonCode


def connected(broker: Broker, client_id: str, version: int = MQTT_5, **kw: Any) -> FakeClient:
    client = FakeClient(broker, version)
    assert client.connect(client_id, **kw).reason_code == R.SUCCESS
    return client


def retain(
    broker: Broker, count: int, prefix: str = "r", payload: bytes = b"v", qos: int = 0
) -> None:
    """``count`` retained messages ``{prefix}/{i}``, sent by one client in one read."""
    pub = connected(broker, f"retainer-{prefix}", MQTT_3_1_1)
    pub.send_raw(
        b"".join(
            encode_publish(
                f"{prefix}/{i}", payload, qos, True, False, i % 65535 + 1 if qos else None, None, 4
            )
            for i in range(count)
        )
    )
    pub.packets()  # its PUBACKs


def take(client: FakeClient) -> list[Packet]:
    """What the broker queued for ``client`` this turn, without running replays."""
    return client.reader.feed(client.conn.data_to_send())


def topics(packets: Sequence[Packet]) -> list[str]:
    return [p.topic for p in packets if isinstance(p, Publish)]


def receive_acking(client: FakeClient) -> list[Publish]:
    """Every PUBLISH until the broker has no more, acknowledging each batch."""
    got: list[Publish] = []
    while batch := client.publishes():
        got += batch
        client.send(*[Puback(p.packet_id) for p in batch if p.qos])  # type: ignore[arg-type]
    return got


# --------------------------------------------------------------------------- duplicates


def test_filter_repeated_in_one_subscribe_is_one_subscription_and_one_replay() -> None:
    broker, _ = make_broker()
    retain(broker, 50)
    sub = connected(broker, "sub")
    suback = sub.subscribe(*["#"] * 40, qos=1)
    assert suback.reason_codes == [R.GRANTED_QOS_1] * 40  # each entry answered (MQTT-3.9.3-1)
    got = sub.publishes()
    assert sorted(p.topic for p in got) == sorted(f"r/{i}" for i in range(50))  # once each
    assert all(p.retain for p in got)
    session = broker.store.get_session("sub")
    assert session is not None and list(session.subscriptions) == ["#"]
    assert broker.store.subscription_count() == 1
    connected(broker, "pub").publish("r/live", b"x")
    assert topics(sub.packets()) == ["r/live"]  # and one live copy


def test_last_copy_of_a_repeated_filter_sets_its_options() -> None:
    broker, _ = make_broker()
    retain(broker, 3, qos=1)
    sub = connected(broker, "sub")
    suback = sub.subscribe(Subscription("#", 0), Subscription("#", 1))
    assert suback.reason_codes == [0, 1]
    got = sub.publishes()
    assert len(got) == 3 and {p.qos for p in got} == {1}


def test_repeated_filter_with_retain_handling_1_replays_once() -> None:
    broker, _ = make_broker()
    retain(broker, 5)
    sub = connected(broker, "sub")
    sub.subscribe(*[Subscription("r/+", 0, retain_handling=1)] * 10)
    assert len(sub.publishes()) == 5
    sub.subscribe(Subscription("r/+", 0, retain_handling=1))  # exists now: none (3.3.1-10)
    sub.expect_nothing()


def test_many_subscribe_packets_for_one_filter_keep_one_replay() -> None:
    """40 SUBSCRIBEs of ``#`` in one read: each restarts the one replay, none adds one."""
    broker, _ = make_broker()
    retain(broker, 3000)
    sub = connected(broker, "sub")
    sub.send(*[Subscribe(i + 1, [Subscription("#", 0)]) for i in range(40)])
    session = broker.store.get_session("sub")
    assert session is not None and len(session.replays) == 1
    got = sub.packets()
    assert sum(isinstance(p, Suback) for p in got) == 40
    assert sorted(topics(got)) == sorted(f"r/{i}" for i in range(3000))


# --------------------------------------------------------------------------- pacing


def test_replay_goes_out_in_batches_with_other_clients_served_in_between() -> None:
    broker, _ = make_broker()
    total = 5 * REPLAY_STEP_MESSAGES
    retain(broker, total)
    sub = connected(broker, "sub")
    bystander = connected(broker, "bystander")
    sub.send(Subscribe(1, [Subscription("#", 0)]))
    first = take(sub)
    assert [type(p) for p in first] == [Suback]  # nothing replayed within the SUBSCRIBE
    seen: list[str] = []
    turns = 0
    while broker.replaying:
        broker.step_replays()
        turns += 1
        batch = topics(take(sub))
        assert 0 < len(batch) <= REPLAY_STEP_MESSAGES
        seen += batch
        bystander.send(Pingreq())  # answered right away, between two batches
        assert [type(p) for p in take(bystander)] == [Pingresp]
    assert turns >= 5
    assert sorted(seen) == sorted(f"r/{i}" for i in range(total))  # all, once


def test_a_turn_examines_a_bounded_number_of_messages_over_all_connections() -> None:
    broker, _ = make_broker()
    retain(broker, 2 * REPLAY_STEP_MESSAGES)
    subs = [connected(broker, f"sub{i}") for i in range(8)]
    for sub in subs:
        sub.send(Subscribe(1, [Subscription("#", 0)]))
        take(sub)
    broker.step_replays()
    first = [len(topics(take(s))) for s in subs]
    assert 0 < sum(first) <= REPLAY_TURN_MESSAGES
    for sub, already in zip(subs, first, strict=True):  # each gets everything in the end
        assert already + len(sub.publishes()) == 2 * REPLAY_STEP_MESSAGES


def test_a_batch_is_bounded_in_bytes() -> None:
    broker, _ = make_broker()
    retain(broker, 40, payload=bytes(10_000))
    sub = connected(broker, "sub")
    sub.send(Subscribe(1, [Subscription("#", 0)]))
    take(sub)
    broker.step_replays()
    first = take(sub)
    assert 0 < len(first) < 40
    assert (
        sum(len(p.payload) for p in first if isinstance(p, Publish)) <= REPLAY_STEP_BYTES + 10_000
    )
    assert len(first) + len(sub.publishes()) == 40  # the rest, in later turns


def test_a_paused_connection_gets_no_batch_until_it_drains() -> None:
    broker, _ = make_broker()
    retain(broker, 3 * REPLAY_STEP_MESSAGES)
    sub = connected(broker, "sub")
    sub.send(Subscribe(1, [Subscription("#", 0)]))
    take(sub)
    sub.conn.set_writable(False)  # its socket is full
    broker.step_replays()
    assert take(sub) == [] and not broker.replaying  # QoS 0 waits instead of being dropped
    sub.conn.set_writable(True)
    assert broker.replaying
    assert len(sub.publishes()) == 3 * REPLAY_STEP_MESSAGES
    session = broker.store.get_session("sub")
    assert session is not None and session.dropped == 0


def test_qos1_replay_waits_for_the_in_flight_window_and_drops_nothing() -> None:
    """Before: 10 in flight, 100 queued, 2,890 of 3,000 retained messages dropped."""
    broker, _ = make_broker(max_queued_messages=100)
    retain(broker, 3000, qos=1)
    sub = connected(broker, "sub", properties={P.RECEIVE_MAXIMUM: 10})
    sub.send(Subscribe(1, [Subscription("#", 1)]))
    take(sub)
    received: list[str] = []
    while True:
        while broker.replaying:
            broker.step_replays()
        batch = [p for p in take(sub) if isinstance(p, Publish)]
        if not batch:
            break
        assert len(batch) <= 10
        received += [p.topic for p in batch]
        sub.send(*[Puback(p.packet_id) for p in batch])  # type: ignore[arg-type]
    assert sorted(received) == sorted(f"r/{i}" for i in range(3000))
    session = broker.store.get_session("sub")
    assert session is not None and session.dropped == 0 and not session.pending


# --------------------------------------------------------------------------- consistency


def test_messages_published_during_a_replay_arrive_once_and_in_order() -> None:
    broker, _ = make_broker()
    retain(broker, 3 * REPLAY_STEP_MESSAGES)
    sub = connected(broker, "sub")
    pub = connected(broker, "pub")
    sub.send(Subscribe(1, [Subscription("#", 0)]))
    take(sub)
    broker.step_replays()
    take(sub)
    last = f"r/{3 * REPLAY_STEP_MESSAGES - 1}"  # not replayed yet
    pub.publish(last, b"new", retain=True)  # replaces it: live now, not replayed after
    pub.publish("r/fresh", b"f", retain=True)  # retained after the SUBSCRIBE: live only
    live = [p for p in take(sub) if isinstance(p, Publish)]
    assert [(p.topic, p.payload) for p in live] == [(last, b"new"), ("r/fresh", b"f")]
    rest = sub.publishes()
    assert last not in topics(rest) and "r/fresh" not in topics(rest)
    assert len(rest) == 3 * REPLAY_STEP_MESSAGES - REPLAY_STEP_MESSAGES - 1


def test_unsubscribe_stops_the_replay() -> None:
    broker, _ = make_broker()
    retain(broker, 3 * REPLAY_STEP_MESSAGES)
    sub = connected(broker, "sub")
    sub.send(Subscribe(1, [Subscription("#", 0)]))
    take(sub)
    broker.step_replays()
    assert len(topics(take(sub))) == REPLAY_STEP_MESSAGES
    sub.send(Unsubscribe(2, ["#"]))
    assert not [p for p in sub.packets() if isinstance(p, Publish)]


def test_replay_resumes_with_the_session_on_a_new_connection() -> None:
    broker, _ = make_broker()
    total = 3 * REPLAY_STEP_MESSAGES
    retain(broker, total, qos=1)
    sub = connected(broker, "sub", clean_start=False, session_expiry=60)
    sub.send(Subscribe(1, [Subscription("#", 1)]))
    take(sub)
    broker.step_replays()
    first = [p for p in take(sub) if isinstance(p, Publish)]
    sub.send(*[Puback(p.packet_id) for p in first])  # type: ignore[arg-type]
    sub.drop()
    again = connected(broker, "sub", clean_start=False, session_expiry=60)
    rest = receive_acking(again)
    assert sorted([p.topic for p in first] + [p.topic for p in rest]) == sorted(
        f"r/{i}" for i in range(total)
    )
