"""Helpers that drive the sans-I/O broker engine without sockets or real time.

:class:`FakeClock` is injected as the broker's ``clock``; :class:`FakeClient` plays the
part of both a client and the asyncio layer of :mod:`broker.server`: it feeds packets
encoded by :func:`mqttproto.codec.encode` to a :class:`~broker.connection.BrokerConnection`,
decodes what the broker wants to send with a client-side :class:`PacketReader`, runs the
broker's retained replays, and, like the server's ``flush``, closes the "transport"
(``connection_lost``) once the connection is ``closing`` and its output has been read.
"""

from __future__ import annotations

from typing import Any, TypeVar

from broker.config import BrokerConfig
from broker.connection import BrokerConnection, State
from broker.engine import Broker
from mqttproto.codec import PacketReader, encode
from mqttproto.packets import (
    MQTT_5,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Will,
)
from mqttproto.properties import PropertyId

P = PropertyId
T = TypeVar("T")


class FakeClock:
    """A monotonic clock that only moves when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_broker(**settings: Any) -> tuple[Broker, FakeClock]:
    """A broker on a fake clock; ``$SYS`` is off unless ``sys_interval`` is given."""
    settings.setdefault("sys_interval", 0.0)
    clock = FakeClock()
    broker = Broker(BrokerConfig(**settings).validate(), clock=clock, version="qmig-test")
    return broker, clock


class FakeClient:
    """One client connection driven packet by packet.

    Received packets pile up in :attr:`inbox`; :meth:`expect` pops them in order.
    """

    _peer_seq = 0

    def __init__(
        self, broker: Broker, version: int = MQTT_5, transport: str = "tcp", peer: str = ""
    ) -> None:
        if not peer:
            FakeClient._peer_seq += 1
            peer = f"192.0.2.1:{40000 + FakeClient._peer_seq}"
        self.broker = broker
        self.version = version
        self.conn: BrokerConnection = broker.open_connection(transport, peer)
        self.reader = PacketReader(version=version)
        self.inbox: list[Packet] = []
        self._next_id = 0

    # ------------------------------------------------------------------ plumbing
    def send(self, *packets: Packet) -> None:
        self.send_raw(b"".join(encode(p, self.version) for p in packets))

    def send_raw(self, data: bytes) -> None:
        self.conn.receive_data(data)

    def poll(self) -> list[Packet]:
        """Move whatever the broker queued for this client into :attr:`inbox`.

        Retained replays are run to the end first, as the server's turns would (a test of
        their pacing calls ``broker.step_replays`` itself and reads ``conn.data_to_send``).
        """
        while self.broker.replaying:
            self.broker.step_replays()
        data = self.conn.data_to_send()
        if data:
            self.inbox.extend(self.reader.feed(data))
        if self.conn.closing and self.conn.state is not State.CLOSED:
            self.conn.connection_lost()  # what the server does after flushing a closing conn
        return self.inbox

    def packets(self) -> list[Packet]:
        """Every packet received so far and not yet expected; empties the inbox."""
        self.poll()
        out, self.inbox = self.inbox, []
        return out

    def expect(self, kind: type[T]) -> T:
        """The next received packet, which must be a ``kind``."""
        self.poll()
        assert self.inbox, f"expected {kind.__name__}, received nothing"
        packet = self.inbox.pop(0)
        assert isinstance(packet, kind), f"expected {kind.__name__}, got {packet!r}"
        return packet

    def expect_nothing(self) -> None:
        self.poll()
        assert not self.inbox, f"expected nothing, got {self.inbox!r}"

    def publishes(self) -> list[Publish]:
        """All received packets, which must all be PUBLISH."""
        out = self.packets()
        assert all(isinstance(p, Publish) for p in out), out
        return out  # type: ignore[return-value]

    @property
    def closed(self) -> bool:
        """True once the broker closed (or the test dropped) this connection."""
        self.poll()
        return self.conn.state is State.CLOSED

    def drop(self) -> None:
        """The network connection dies without a DISCONNECT."""
        self.conn.connection_lost()

    def next_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    # ------------------------------------------------------------------ MQTT verbs
    def connect(
        self,
        client_id: str = "",
        *,
        clean_start: bool = True,
        keep_alive: int = 0,
        will: Will | None = None,
        session_expiry: int | None = None,
        properties: dict[int, Any] | None = None,
    ) -> Connack:
        props = dict(properties or {})
        if session_expiry is not None:
            props[P.SESSION_EXPIRY_INTERVAL] = session_expiry
        connect = Connect(client_id, self.version, clean_start, keep_alive, None, None, will, props)
        self.send(connect)
        return self.expect(Connack)

    def subscribe(
        self,
        *subscriptions: str | Subscription,
        qos: int = 0,
        sub_id: int | None = None,
    ) -> Suback:
        subs = [s if isinstance(s, Subscription) else Subscription(s, qos) for s in subscriptions]
        props: dict[int, Any] = {P.SUBSCRIPTION_IDENTIFIER: [sub_id]} if sub_id else {}
        pid = self.next_id()
        self.send(Subscribe(pid, subs, props))
        suback = self.expect(Suback)
        assert suback.packet_id == pid
        return suback

    def publish(
        self,
        topic: str,
        payload: bytes = b"",
        qos: int = 0,
        retain: bool = False,
        properties: dict[int, Any] | None = None,
        packet_id: int | None = None,
    ) -> int | None:
        """Send a PUBLISH; returns its packet id (acks are left in the inbox)."""
        if qos and packet_id is None:
            packet_id = self.next_id()
        self.send(Publish(topic, payload, qos, retain, False, packet_id, dict(properties or {})))
        return packet_id

    def publish_acked(self, topic: str, payload: bytes = b"", qos: int = 1, **kw: Any) -> int:
        """Publish at QoS 1 or 2 and complete the exchange; returns the final reason code."""
        pid = self.publish(topic, payload, qos, **kw)
        if qos == 1:
            ack = self.expect(Puback)
            assert ack.packet_id == pid
            return ack.reason_code
        rec = self.expect(Pubrec)
        assert rec.packet_id == pid
        if rec.reason_code >= 0x80:
            return rec.reason_code
        self.send(Pubrel(pid))  # type: ignore[arg-type]
        comp = self.expect(Pubcomp)
        assert comp.packet_id == pid
        return rec.reason_code

    def ack(self, publish: Publish) -> None:
        """Acknowledge a received QoS 1 or 2 PUBLISH completely."""
        if publish.qos == 1:
            self.send(Puback(publish.packet_id))  # type: ignore[arg-type]
        elif publish.qos == 2:
            self.send(Pubrec(publish.packet_id))  # type: ignore[arg-type]
            rel = self.expect(Pubrel)
            assert rel.packet_id == publish.packet_id
            self.send(Pubcomp(publish.packet_id))  # type: ignore[arg-type]

    def disconnect(self, reason: int = 0, properties: dict[int, Any] | None = None) -> None:
        self.send(Disconnect(reason, dict(properties or {})))
        self.poll()
