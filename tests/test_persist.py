"""The durable store (broker.persist): every record type survives a reload of the file.

Each test runs a sans-I/O broker on a :class:`SqliteStore` in a temporary directory, commits,
closes it, and opens a second broker on the same directory, as a restart would.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from broker.config import BrokerConfig
from broker.engine import Broker
from broker.persist import SqliteStore, StoreError
from broker.session import AWAIT_PUBACK, AWAIT_PUBCOMP
from mqttproto.packets import Puback, Pubcomp, Publish, Pubrec, Pubrel, Subscription, Will
from mqttproto.properties import PropertyId
from tests.sansio import FakeClient, FakeClock

P = PropertyId
WALL = 1_700_000_000.0


def open_broker(
    directory: Path, clock: FakeClock | None = None, wall: float = WALL, **settings: object
) -> tuple[Broker, SqliteStore, FakeClock]:
    settings.setdefault("sys_interval", 0.0)
    clock = clock or FakeClock()
    store = SqliteStore(directory, strict=settings.get("persistence_sync") == "strict")
    broker = Broker(BrokerConfig(**settings).validate(), store=store, clock=clock)  # type: ignore[arg-type]
    broker.restore(wall)
    return broker, store, clock


def restart(broker: Broker, store: SqliteStore, directory: Path, wall: float = WALL, **kw: object):
    store.commit(broker.now(), WALL)  # the file is written at WALL, read back at ``wall``
    store.close()
    return open_broker(directory, wall=wall, **kw)


def test_retained_round_trip_with_properties_and_clear(tmp_path: Path) -> None:
    broker, store, _ = open_broker(tmp_path)
    pub = FakeClient(broker)
    pub.connect("pub")
    props = {
        P.CONTENT_TYPE: "text/plain",
        P.USER_PROPERTY: [("k", "v")],
        P.MESSAGE_EXPIRY_INTERVAL: 600,
    }
    pub.publish("a/1", b"one", qos=1, retain=True, properties=props)
    pub.publish("a/2", b"two", retain=True)
    pub.publish("a/2", b"", retain=True)  # cleared: not back after the restart
    broker, store, _ = restart(broker, store, tmp_path, wall=WALL + 100)
    assert store.retained_count() == 1
    message = store.retained("a/1")
    assert message is not None and message.payload == b"one" and message.qos == 1
    assert message.properties[P.CONTENT_TYPE] == "text/plain"
    assert list(message.properties[P.USER_PROPERTY]) == [("k", "v")]
    assert message.expires_at is not None
    assert broker.now() + 499 < message.expires_at < broker.now() + 501  # 100 s passed
    sub = FakeClient(broker)
    sub.connect("sub")
    sub.subscribe("a/#", qos=1)
    (got,) = sub.publishes()
    assert got.topic == "a/1" and got.retain and got.payload == b"one"


def test_session_subscriptions_queue_and_owner_round_trip(tmp_path: Path) -> None:
    broker, store, _ = open_broker(tmp_path)
    sub = FakeClient(broker)
    sub.connect("dev", clean_start=False, session_expiry=3600)
    sub.subscribe(Subscription("q/+", 1, no_local=True, retain_as_published=True), sub_id=7)
    sub.drop()
    pub = FakeClient(broker)
    pub.connect("pub")
    for i in range(5):
        pub.publish_acked("q/x", f"m{i}".encode())
    broker.store.get_session("dev").username = "alice"  # type: ignore[union-attr]
    broker.store.note_session(broker.store.get_session("dev"))  # type: ignore[arg-type]
    broker, store, _ = restart(broker, store, tmp_path)
    session = store.get_session("dev")
    assert session is not None and session.connection is None and session.username == "alice"
    opts = session.subscriptions["q/+"]
    assert (opts.qos, opts.no_local, opts.retain_as_published, opts.subscription_id) == (
        1,
        True,
        True,
        7,
    )
    assert [d.message.payload for d in session.pending] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert broker.queued_bytes > 0 and session.held_bytes > 0
    assert "dev" in broker._expiring  # offline: its expiry clock runs
    back = FakeClient(broker)
    assert back.connect("dev", clean_start=False, session_expiry=3600).session_present
    got = back.publishes()
    assert [p.payload for p in got] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert got[0].properties[P.SUBSCRIPTION_IDENTIFIER] == [7]
    # matching still works from the trie rebuilt at load
    pub = FakeClient(broker)
    pub.connect("pub")
    pub.publish_acked("q/y", b"live")
    assert [p.payload for p in back.publishes()] == [b"live"]


def test_inflight_states_and_inbound_qos2_round_trip(tmp_path: Path) -> None:
    broker, store, _ = open_broker(tmp_path)
    sub = FakeClient(broker)
    sub.connect("dev", clean_start=False, session_expiry=3600)
    sub.subscribe("t/#", qos=2)
    pub = FakeClient(broker)
    pub.connect("pub2", clean_start=False, session_expiry=3600)
    pub.publish("t/1", b"q1", qos=1)
    pub.publish("t/2", b"q2", qos=2, packet_id=42)
    pub.packets()
    first, second = sub.publishes()
    sub.send(Pubrec(second.packet_id))  # type: ignore[arg-type]
    assert isinstance(sub.expect(Pubrel), Pubrel)
    broker, store, _ = restart(broker, store, tmp_path)
    session = store.get_session("dev")
    assert session is not None
    states = {pid: (d.state, d.message.payload) for pid, d in session.inflight.items()}
    assert states == {
        first.packet_id: (AWAIT_PUBACK, b"q1"),
        second.packet_id: (AWAIT_PUBCOMP, b"q2"),
    }
    assert store.get_session("pub2").inbound_qos2 == {42}  # type: ignore[union-attr]
    # The publisher resends its QoS 2 PUBLISH: a duplicate, not routed again.
    pub = FakeClient(broker)
    pub.connect("pub2", clean_start=False, session_expiry=3600)
    pub.send(Publish("t/2", b"q2", 2, False, True, 42, {}))
    assert pub.expect(Pubrec).packet_id == 42
    back = FakeClient(broker)
    back.connect("dev", clean_start=False, session_expiry=3600)
    out = back.packets()
    # PUBLISH q1 again (DUP), PUBREL for the completed-by-PUBREC q2, nothing more.
    assert [type(p) for p in out] == [Publish, Pubrel], out
    assert out[0].dup and out[0].payload == b"q1"  # type: ignore[union-attr]
    back.send(Puback(out[0].packet_id), Pubcomp(out[1].packet_id))  # type: ignore[union-attr]
    pub.send(Pubrel(42))
    assert pub.expect(Pubcomp).packet_id == 42
    back.expect_nothing()


def test_expiry_on_load(tmp_path: Path) -> None:
    broker, store, _ = open_broker(tmp_path)
    for cid, expiry in (("short", 60), ("long", 7200), ("live", 300)):
        c = FakeClient(broker)
        c.connect(cid, clean_start=False, session_expiry=expiry)
        if cid != "live":
            c.drop()
    clean = FakeClient(broker)
    clean.connect("clean")  # expiry 0: never written
    # Down for 10 minutes: "short" expired meanwhile, "long" has 6600 s left, and "live"
    # (connected at the crash) gets its whole interval again.
    broker, store, _ = restart(broker, store, tmp_path, wall=WALL + 600)
    assert store.get_session("clean") is None
    assert {s.client_id for s in store.sessions()} == {"short", "long", "live"}
    now = broker.now()
    assert store.get_session("live").expires_at == now + 300  # type: ignore[union-attr]
    assert 6599 < store.get_session("long").expires_at - now < 6601  # type: ignore[union-attr,operator]
    broker.tick()
    assert store.get_session("short") is None and store.get_session("long") is not None


def test_delayed_will_round_trip(tmp_path: Path) -> None:
    broker, store, clock = open_broker(tmp_path)
    watcher = FakeClient(broker)
    watcher.connect("watcher", clean_start=False, session_expiry=3600)
    watcher.subscribe("wills/#", qos=1)
    watcher.drop()
    c = FakeClient(broker)
    will = Will("wills/dev", b"gone", 1, False, {P.WILL_DELAY_INTERVAL: 30})
    c.connect("dev", clean_start=False, session_expiry=3600, will=will)
    c.drop()
    broker, store, clock = restart(broker, store, tmp_path, wall=WALL + 10)
    assert "dev" in broker._wills
    clock.advance(19)
    broker.tick()
    assert not store.get_session("watcher").pending  # type: ignore[union-attr]
    clock.advance(2)
    broker.tick()
    assert [d.message.payload for d in store.get_session("watcher").pending] == [b"gone"]  # type: ignore[union-attr]


def test_clean_start_and_expiry_remove_rows(tmp_path: Path) -> None:
    broker, store, clock = open_broker(tmp_path)
    c = FakeClient(broker)
    c.connect("dev", clean_start=False, session_expiry=10)
    c.subscribe("x", qos=1)
    c.drop()
    store.commit(broker.now(), WALL)
    clock.advance(11)
    broker.tick()
    broker, store, _ = restart(broker, store, tmp_path)
    assert store.session_count() == 0


def test_strict_mode_holds_acks_until_commit(tmp_path: Path) -> None:
    broker, store, _ = open_broker(tmp_path, persistence_sync="strict")
    pub = FakeClient(broker)
    pub.connect("pub")
    pub.publish("t", b"x", qos=1)
    pub.publish("t", b"y", qos=2)
    pub.expect_nothing()  # not durable yet
    acks = broker.take_acks()
    assert len(acks) == 2
    store.commit(broker.now(), WALL)
    broker.release_acks(acks)
    assert isinstance(pub.expect(Puback), Puback)
    assert isinstance(pub.expect(Pubrec), Pubrec)


def test_locked_directory_refused(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path)
    with pytest.raises(StoreError, match="in use by another broker"):
        SqliteStore(tmp_path)
    first.close()
    SqliteStore(tmp_path).close()


def test_sqlite_write_lock_refused(tmp_path: Path) -> None:
    SqliteStore(tmp_path).close()
    other = sqlite3.connect(tmp_path / "qmig.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="locked"):
            s = SqliteStore(tmp_path)
            s.restore(0.0, WALL)
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_corrupt_file_refused(tmp_path: Path) -> None:
    (tmp_path / "qmig.db").write_bytes(b"this is not an SQLite database" * 200)
    with pytest.raises(StoreError, match=r"qmig\.db"):
        SqliteStore(tmp_path)


def test_unreadable_record_refused(tmp_path: Path) -> None:
    broker, store, _ = open_broker(tmp_path)
    c = FakeClient(broker)
    c.connect("dev", clean_start=False, session_expiry=60)
    store.commit(broker.now(), WALL)
    store.close()
    db = sqlite3.connect(tmp_path / "qmig.db")
    db.execute("UPDATE sessions SET subscriptions = 'not json'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="cannot read"):
        open_broker(tmp_path)


def test_config_yaml_key_and_flags() -> None:
    import argparse

    from broker.config import ConfigError, add_broker_arguments, config_from_args, parse_settings

    assert parse_settings("persistence: /var/lib/qmig\npersistence-sync: strict\n") == {
        "persistence": "/var/lib/qmig",
        "persistence_sync": "strict",
    }
    parser = argparse.ArgumentParser()
    add_broker_arguments(parser)
    args = parser.parse_args(["--persistence", "/tmp/q", "--persistence-interval", "0.5"])
    config = config_from_args(args)
    assert (config.persistence, config.persistence_sync, config.persistence_interval) == (
        "/tmp/q", "batch", 0.5,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="persistence_sync"):
        BrokerConfig(persistence_sync="sometimes").validate()
    with pytest.raises(ConfigError, match="persistence_interval"):
        BrokerConfig(persistence_interval=0).validate()


def test_a_delivery_acked_within_the_interval_never_touches_the_file(tmp_path: Path) -> None:
    """A persistent subscriber that keeps up: its deliveries live and die between two commits,
    so the commit writes no row and deletes none; one left unacked is written, and deleted
    once acknowledged."""
    broker, store, _ = open_broker(tmp_path)
    sub = FakeClient(broker)
    sub.connect("dev", clean_start=False, session_expiry=3600)
    sub.subscribe(Subscription("q/#", 1))
    pub = FakeClient(broker)
    pub.connect("pub")
    store.commit(broker.now(), WALL)
    statements: list[str] = []
    assert store._db is not None
    store._db.set_trace_callback(statements.append)
    for i in range(50):
        pub.publish_acked("q/x", f"m{i}".encode())
        for p in sub.publishes():
            sub.ack(p)
    store.commit(broker.now(), WALL)
    assert not [s for s in statements if "deliveries" in s], statements
    pub.publish_acked("q/x", b"late")
    (late,) = sub.publishes()
    store.commit(broker.now(), WALL)  # not acknowledged yet: on disk
    assert store._db.execute("SELECT count(*) FROM deliveries").fetchone() == (1,)
    sub.ack(late)
    store.commit(broker.now(), WALL)
    assert store._db.execute("SELECT count(*) FROM deliveries").fetchone() == (0,)
