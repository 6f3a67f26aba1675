"""Finding 3 of issue #13, the engine's rules (the transports are in tests/quic).

- With a password file, a session is its user's: another user's CONNECT for its client id is
  refused with Not authorized, whatever Clean Start says, and the session stays as it was.
- Queued messages are checked against the receiving user's ACL when they are sent, not only
  when they were queued: without a password file user names are mere claims, so a client id
  can change hands, and the queue must not follow it past the ACL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sansio import FakeClient, make_broker

from broker.auth import add_user
from broker.engine import Broker
from broker.session import Session
from mqttproto.packets import MQTT_5, Connack, Connect, Publish
from mqttproto.properties import PropertyId
from mqttproto.reasons import ReasonCode

ACL = "user bob\ntopic readwrite bob/#\nuser alice\ntopic readwrite alice/#\n"


def _connect(client: FakeClient, client_id: str, user: str, password: bytes | None,
             clean_start: bool = False) -> Connack:  # fmt: skip
    props = {PropertyId.SESSION_EXPIRY_INTERVAL: 300}
    client.send(Connect(client_id, MQTT_5, clean_start, 0, user, password, None, props))
    return client.expect(Connack)


def _queue_for_bob(
    broker_kw: dict[str, Any], passwords: dict[str, bytes | None]
) -> tuple[Broker, Session]:
    broker, _clock = make_broker(**broker_kw)
    bob = FakeClient(broker)
    assert _connect(bob, "device", "bob", passwords["bob"]).reason_code == 0
    bob.subscribe("bob/inbox", qos=1)
    bob.disconnect()
    for n in range(3):
        publisher = FakeClient(broker)
        assert _connect(publisher, f"pub{n}", "bob", passwords["bob"], clean_start=True)
        publisher.publish_acked("bob/inbox", f"secret {n}".encode())
        publisher.disconnect()
    return broker, broker.store.get_session("device")


def test_another_user_is_refused_and_the_session_stays(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    add_user(passwd, "bob", "builder")
    add_user(passwd, "alice", "wonderland")
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    kw = {"password_file": str(passwd), "acl_file": str(acl)}
    broker, session = _queue_for_bob(kw, {"bob": b"builder"})
    assert len(session.pending) == 3
    for clean_start in (False, True):
        alice = FakeClient(broker)
        connack = _connect(alice, "device", "alice", b"wonderland", clean_start)
        assert connack.reason_code == ReasonCode.NOT_AUTHORIZED
        assert not connack.session_present
        assert alice.closed
        assert broker.store.get_session("device") is session and len(session.pending) == 3
    bob = FakeClient(broker)
    assert _connect(bob, "device", "bob", b"builder").session_present
    assert [p.payload for p in bob.publishes()] == [b"secret 0", b"secret 1", b"secret 2"]


def test_queued_messages_are_checked_against_the_receivers_acl(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    broker, session = _queue_for_bob({"acl_file": str(acl)}, {"bob": None})
    assert len(session.pending) == 3
    alice = FakeClient(broker)  # no password file: "alice" is a claim; the id is hers now
    assert _connect(alice, "device", "alice", None).session_present
    assert [p for p in alice.packets() if isinstance(p, Publish)] == []
    assert not session.pending
