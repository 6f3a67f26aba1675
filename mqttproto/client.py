"""The client side of MQTT as a sans-I/O state machine: what to send, what happened.

:class:`ClientProtocol` turns calls (``publish``, ``subscribe`` ...) into bytes to send and
received bytes into :class:`Event` objects, and keeps the session state that must outlive a
connection: unacknowledged outgoing QoS 1/2 messages and incoming QoS 2 packet ids.  A new
connection built with the same :class:`ClientSession` resumes it (MQTT-4.4.0-1): in-flight
PUBLISH packets are sent again with DUP, PUBRELs again as PUBRELs.  If the server has lost
the session (session present 0), unacknowledged messages are published again as new ones,
so a client that moves between brokers or reconnects never silently loses QoS > 0 data.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .codec import PacketReader, encode, encode_publish
from .errors import MQTTError, ProtocolError
from .packets import (
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingresp,
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
    Will,
)
from .properties import Properties, PropertyId
from .reasons import ReasonCode

P = PropertyId
# What the broker may send on a QUIC data stream (multi-stream mode).
DATA_STREAM_PACKETS = frozenset({Publish, Puback, Pubrec, Pubrel, Pubcomp, Suback, Unsuback})


# ------------------------------------------------------------------------------ events
class Event:
    """Something the application should know about."""


@dataclass(slots=True)
class Connected(Event):
    session_present: bool
    properties: Properties


@dataclass(slots=True)
class ConnectionRefused(Event):
    reason_code: int
    properties: Properties

    @property
    def server_reference(self) -> str | None:
        return self.properties.get(P.SERVER_REFERENCE)


@dataclass(slots=True)
class MessageReceived(Event):
    publish: Publish


@dataclass(slots=True)
class PublishCompleted(Event):
    """A QoS 1 PUBACK or QoS 2 PUBCOMP (or an error PUBREC) ended an outgoing exchange."""

    packet_id: int
    reason_code: int


@dataclass(slots=True)
class Subscribed(Event):
    packet_id: int
    reason_codes: list[int]


@dataclass(slots=True)
class Unsubscribed(Event):
    packet_id: int
    reason_codes: list[int]


@dataclass(slots=True)
class PingResponse(Event):
    pass


@dataclass(slots=True)
class ServerDisconnected(Event):
    """The server sent DISCONNECT (MQTT 5), e.g. 0x9D Server moved with a Server Reference."""

    reason_code: int
    properties: Properties

    @property
    def server_reference(self) -> str | None:
        return self.properties.get(P.SERVER_REFERENCE)


@dataclass(slots=True)
class ProtocolViolation(Event):
    """The server broke the protocol; the connection must be closed."""

    reason_code: int
    message: str


# ------------------------------------------------------------------------------ session
@dataclass(slots=True)
class _Outgoing:
    publish: Publish
    released: bool = False  # QoS 2: PUBREC received, PUBREL sent
    channel: int = 0  # the data channel it goes on (multi-stream QUIC)


@dataclass
class ClientSession:
    """State that survives reconnection (section 4.1): keep it to resume a session."""

    client_id: str
    outgoing: dict[int, _Outgoing] = field(default_factory=dict)
    queued: deque[Publish] = field(default_factory=deque)
    incoming_qos2: set[int] = field(default_factory=set)
    next_packet_id: int = 1

    def allocate(self, taken: set[int] | None = None) -> int:
        pid = self.next_packet_id
        for _ in range(65535):
            if pid not in self.outgoing and (taken is None or pid not in taken):
                break
            pid = pid + 1 if pid < 65535 else 1
        else:
            raise MQTTError("no free packet identifier", ReasonCode.QUOTA_EXCEEDED)
        self.next_packet_id = pid + 1 if pid < 65535 else 1
        return pid


class ClientProtocol:
    """One connection's worth of client protocol; ``session`` may be reused across them."""

    def __init__(
        self,
        client_id: str = "",
        version: int = MQTT_5,
        clean_start: bool = True,
        keep_alive: int = 60,
        username: str | None = None,
        password: bytes | None = None,
        will: Will | None = None,
        properties: Properties | None = None,
        session: ClientSession | None = None,
        max_packet_size: int = 268_435_460,
    ) -> None:
        self.version = version
        self.connect_packet = Connect(
            client_id, version, clean_start, keep_alive, username, password, will,
            dict(properties or {}),
        )  # fmt: skip
        if version == MQTT_5 and max_packet_size < 268_435_460:
            self.connect_packet.properties[P.MAXIMUM_PACKET_SIZE] = max_packet_size
        self.session = session or ClientSession(client_id)
        self.reader = PacketReader(version=version, max_packet_size=max_packet_size)
        self.connected = False
        self.closed = False
        self.keep_alive = keep_alive
        self.send_quota = 65535  # server's Receive Maximum
        self.server_max_packet = 0
        self.server_alias_max = 0
        self.server_reference: str | None = None
        self._pending_subs: set[int] = set()
        self._out: list[bytes] = []
        # Multi-stream QUIC: output and readers of the data channels (0: control stream).
        # Channels are the application's keys; the transport maps them to streams.
        self._side: dict[int, list[bytes]] = {}
        self._readers: dict[int, PacketReader] = {}
        self._rx_channel = 0
        self._max_packet_size = max_packet_size

    # ----------------------------------------------------------------- I/O interface
    def connect(self) -> None:
        self._out.append(encode(self.connect_packet, self.version))

    def data_to_send(self) -> bytes:
        """Output for the control stream (everything, on a single-stream transport)."""
        out, self._out = self._out, []
        return b"".join(out)

    def side_data_to_send(self) -> dict[int, bytes]:
        """Output for the data channels, by channel (multi-stream QUIC only)."""
        side, self._side = self._side, {}
        return {channel: b"".join(chunks) for channel, chunks in side.items()}

    def _send(self, data: bytes, channel: int | None = None) -> None:
        """Queue output; by default on the channel of the packet being handled."""
        if channel is None:
            channel = self._rx_channel
        if channel:
            self._side.setdefault(channel, []).append(data)
        else:
            self._out.append(data)

    def receive_data(self, data: bytes, channel: int = 0) -> list[Event]:
        """Handle bytes from the broker on ``channel`` (0: the control stream)."""
        reader = self._readers.get(channel) if channel else self.reader
        if reader is None:
            reader = self._readers[channel] = PacketReader(self.version, self._max_packet_size)
        error: MQTTError | None = None
        try:
            packets = reader.feed(data)
        except MQTTError as exc:
            packets, error = exc.decoded, exc
        events: list[Event] = []
        self._rx_channel = channel
        try:
            for packet in packets:
                try:
                    if channel and type(packet) not in DATA_STREAM_PACKETS:
                        raise ProtocolError(f"{type(packet).__name__} on a data stream")
                    event = self._handle(packet)
                except MQTTError as exc:
                    events.append(self._violation(exc))
                    return events
                if event is not None:
                    events.append(event)
        finally:
            self._rx_channel = 0
        if error is not None:
            events.append(self._violation(error))
        return events

    def channel_closed(self, channel: int) -> None:
        """The broker ended a data stream: a new one is opened if the channel is used again."""
        self._readers.pop(channel, None)

    def _violation(self, exc: MQTTError) -> ProtocolViolation:
        if self.version == MQTT_5 and self.connected:
            self._out.append(encode(Disconnect(exc.reason_code), MQTT_5))
        self.closed = True
        return ProtocolViolation(exc.reason_code, exc.message)

    # ----------------------------------------------------------------- commands
    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
        channel: int = 0,
    ) -> int | None:
        """Queue a PUBLISH; returns its packet id for QoS > 0 (to match the completion)."""
        if qos == 0:
            if self.connected:
                data = encode_publish(
                    topic, payload, 0, retain, False, None, properties, self.version
                )
                self._send(data, channel)
            return None
        pid = self.session.allocate()
        packet = Publish(topic, payload, qos, retain, False, pid, dict(properties or {}))
        self.session.outgoing[pid] = _Outgoing(packet, channel=channel)
        if self.connected and self._in_flight() <= self.send_quota:
            self._send(encode(packet, self.version), channel)
        else:
            self.session.queued.append(packet)
        return pid

    def _in_flight(self) -> int:
        return len(self.session.outgoing) - len(self.session.queued)

    def subscribe(
        self,
        subscriptions: list[Subscription],
        properties: Properties | None = None,
        channel: int = 0,
    ) -> int:
        """Queue a SUBSCRIBE; on a data channel the broker sends its messages there too."""
        pid = self.session.allocate(self._pending_subs)
        self._pending_subs.add(pid)
        packet = Subscribe(pid, subscriptions, dict(properties or {}))
        self._send(encode(packet, self.version), channel)
        return pid

    def unsubscribe(self, topic_filters: list[str], channel: int = 0) -> int:
        pid = self.session.allocate(self._pending_subs)
        self._pending_subs.add(pid)
        self._send(encode(Unsubscribe(pid, topic_filters), self.version), channel)
        return pid

    def ping(self) -> None:
        self._out.append(b"\xc0\x00")

    def disconnect(self, reason: int = 0, properties: Properties | None = None) -> None:
        self._out.append(encode(Disconnect(reason, dict(properties or {})), self.version))
        self.closed = True

    # ----------------------------------------------------------------- incoming
    def _handle(self, packet: Packet) -> Event | None:
        # ``type(packet) is C`` narrows the union for mypy and is as cheap as an ``is`` on a
        # saved ``type(packet)``.
        if type(packet) is Publish:
            return self._on_publish(packet)
        if not self.connected and type(packet) is not Connack:
            raise ProtocolError(f"{type(packet).__name__} before CONNACK")
        if type(packet) is Puback:
            return self._complete(packet.packet_id, packet.reason_code, 1)
        if type(packet) is Pubrec:
            return self._on_pubrec(packet)
        if type(packet) is Pubcomp:
            return self._complete(packet.packet_id, packet.reason_code, 2)
        if type(packet) is Pubrel:
            pid = packet.packet_id
            self.session.incoming_qos2.discard(pid)
            self._send(b"\x70\x02" + pid.to_bytes(2, "big"))
            return None
        if type(packet) is Suback:
            self._pending_subs.discard(packet.packet_id)
            return Subscribed(packet.packet_id, packet.reason_codes)
        if type(packet) is Unsuback:
            self._pending_subs.discard(packet.packet_id)
            return Unsubscribed(packet.packet_id, packet.reason_codes)
        if type(packet) is Pingresp:
            return PingResponse()
        if type(packet) is Connack:
            return self._on_connack(packet)
        if type(packet) is Disconnect:
            self.closed = True
            ref = packet.properties.get(P.SERVER_REFERENCE)
            if ref:
                self.server_reference = ref
            return ServerDisconnected(packet.reason_code, packet.properties)
        if type(packet) is Auth:
            raise ProtocolError("AUTH without authentication method")
        raise ProtocolError(f"{type(packet).__name__} is not sent by servers")

    def _on_connack(self, packet: Connack) -> Event:
        if self.connected:
            raise ProtocolError("second CONNACK")
        if packet.reason_code:
            self.closed = True
            ref = packet.properties.get(P.SERVER_REFERENCE)
            if ref:
                self.server_reference = ref
            return ConnectionRefused(packet.reason_code, packet.properties)
        self.connected = True
        props = packet.properties
        self.send_quota = props.get(P.RECEIVE_MAXIMUM, 65535)
        self.server_max_packet = props.get(P.MAXIMUM_PACKET_SIZE, 0)
        self.server_alias_max = props.get(P.TOPIC_ALIAS_MAXIMUM, 0)
        if P.SERVER_KEEP_ALIVE in props:
            self.keep_alive = props[P.SERVER_KEEP_ALIVE]
        assigned = props.get(P.ASSIGNED_CLIENT_IDENTIFIER)
        if assigned:
            self.session.client_id = assigned
        self._resume(packet.session_present)
        return Connected(packet.session_present, props)

    def _resume(self, session_present: bool) -> None:
        """Resend what the previous connection left unacknowledged (MQTT-4.4.0-1)."""
        session = self.session
        if not session_present:
            session.incoming_qos2.clear()
        queued = set(id(p) for p in session.queued)
        budget = self.send_quota
        for pid, out in list(session.outgoing.items()):
            if id(out.publish) in queued:
                continue
            if budget <= 0:
                break
            if out.released and session_present:
                self._send(encode(Pubrel(pid), self.version), out.channel)
            else:
                # A lost session means the server forgot the exchange: publish it again.
                out.released = False
                out.publish.dup = session_present
                self._send(encode(out.publish, self.version), out.channel)
            budget -= 1
        self._release_queued()

    def _release_queued(self) -> None:
        session = self.session
        while session.queued and self._in_flight() < self.send_quota:
            packet = session.queued.popleft()
            assert packet.packet_id is not None  # queued PUBLISHes are QoS > 0
            out = session.outgoing.get(packet.packet_id)
            self._send(encode(packet, self.version), out.channel if out else 0)

    def _on_publish(self, packet: Publish) -> Event | None:
        if not self.connected:
            raise ProtocolError("PUBLISH before CONNACK")
        if packet.qos == 1:
            assert packet.packet_id is not None  # the decoder requires one for QoS > 0
            self._send(b"\x40\x02" + packet.packet_id.to_bytes(2, "big"))
        elif packet.qos == 2:
            pid = packet.packet_id
            assert pid is not None  # the decoder requires one for QoS > 0
            self._send(b"\x50\x02" + pid.to_bytes(2, "big"))
            if pid in self.session.incoming_qos2:
                return None  # duplicate of a message already handed to the application
            self.session.incoming_qos2.add(pid)
        return MessageReceived(packet)

    def _on_pubrec(self, packet: Pubrec) -> Event | None:
        out = self.session.outgoing.get(packet.packet_id)
        if out is None:
            if self.version == MQTT_5:
                self._send(encode(Pubrel(packet.packet_id, 0x92), MQTT_5))
            return None
        if packet.reason_code >= 0x80:
            return self._complete(packet.packet_id, packet.reason_code, 2)
        out.released = True
        self._send(b"\x62\x02" + packet.packet_id.to_bytes(2, "big"))
        return None

    def _complete(self, pid: int, reason: int, qos: int) -> Event | None:
        out = self.session.outgoing.get(pid)
        if out is None or out.publish.qos != qos:
            return None
        del self.session.outgoing[pid]
        self._release_queued()
        return PublishCompleted(pid, reason)


def make_will(topic: str, payload: bytes, qos: int = 0, retain: bool = False,
              delay: int | None = None) -> Will:  # fmt: skip
    props: dict[int, Any] = {}
    if delay is not None:
        props[P.WILL_DELAY_INTERVAL] = delay
    return Will(topic, payload, qos, retain, props)
