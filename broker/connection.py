"""One client connection as a sans-I/O state machine (in the manner of h11 and aioquic).

The I/O layer feeds received bytes to :meth:`BrokerConnection.receive_data`, takes what to
write from :meth:`data_to_send` and closes the transport once :attr:`closing` is set and the
output is flushed.

Channels serve QUIC's multi-stream mode: channel 0 is the connection's control stream (and
the only channel of TCP, TLS, MPTCP and single-stream QUIC); other channels are data streams
that the I/O layer numbers.  A reply goes out on the channel its request came in on, and a
PUBLISH on the channel of the SUBSCRIBE that asked for it (:attr:`Delivery.channel`), so a
lost datagram on one topic's stream does not hold up another's.

A protocol violation closes only this connection, with the reason code the specification
asks for (section 4.13); the broker and other clients carry on.
"""

from __future__ import annotations

import logging
from collections import deque
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from mqttproto.codec import PacketReader, encode, encode_publish
from mqttproto.errors import MQTTError, ProtocolError, UnsupportedProtocolVersion
from mqttproto.packets import (
    MQTT_3_1_1,
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
)
from mqttproto.properties import PropertyId
from mqttproto.reasons import ReasonCode

from .session import AWAIT_PUBACK, AWAIT_PUBCOMP, AWAIT_PUBREC, Delivery, Session

if TYPE_CHECKING:
    from .engine import Broker

log = logging.getLogger("qmig.broker")

P = PropertyId
_MAX_PROPERTY_INT = 0xFFFFFFFF
# What a QUIC data stream may carry: the publish flows and (un)subscriptions.  CONNECT,
# DISCONNECT, PINGREQ and AUTH belong on the control stream.
DATA_STREAM_PACKETS = frozenset({Publish, Puback, Pubrec, Pubrel, Pubcomp, Subscribe, Unsubscribe})


class ConnectionIO(Protocol):
    """The I/O layer's handle for one connection: what ``BrokerServer.flush`` calls.

    Both the TCP/TLS/MPTCP ``StreamConnection`` and the QUIC ``BrokerQuicProtocol`` are one.
    """

    def write(self, data: bytes) -> None: ...

    def write_channel(self, channel: int, data: bytes) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


NO_WARNINGS: frozenset[str] = frozenset()  # frozenset() is not a singleton: one for all


class State(Enum):
    AWAIT_CONNECT = "await-connect"
    CONNECTED = "connected"
    CLOSED = "closed"


class BrokerConnection:
    """Protocol state of one network connection; the session it serves outlives it."""

    # Slots: an instance dict of its 32 attributes is 1.6 KB per connection (issue #16).
    __slots__ = (
        "__weakref__", "_out", "_out_bytes", "_readers", "_side", "_warned", "abort",
        "broker", "client_alias_max", "client_id", "client_max_packet", "close_reason",
        "closing", "disconnected_cleanly", "in_aliases", "incomplete_since", "input_held",
        "io", "keep_alive", "last_received", "opened_at", "out_aliases", "peer", "reader",
        "rx_channel", "send_quota", "session", "state", "transport", "username", "version",
        "will_grace", "writable",
    )  # fmt: skip

    def __init__(self, broker: Broker, transport: str, peer: str) -> None:
        self.broker = broker
        self.transport = transport
        self.peer = peer
        self.state = State.AWAIT_CONNECT
        self.version = 0
        self.client_id = ""
        self.username: str | None = None
        self.session: Session | None = None
        self.reader = self._new_reader(None)
        now = broker.now()
        self.opened_at = now
        self.last_received = now
        self.keep_alive = 0
        # Limits the client announced in CONNECT (MQTT 5).
        self.send_quota = 65535
        self.client_max_packet = 0  # 0: no limit announced
        self.client_alias_max = 0
        self.out_aliases: dict[str, int] = {}
        self.in_aliases: dict[int, str] = {}
        self.writable = True
        self.closing = False
        # Set with closing when the connection must not linger: the I/O layer aborts it
        # (a client that does not read would never take a final packet anyway).
        self.abort = False
        self.close_reason: int | None = None
        self.disconnected_cleanly = False
        # Set when the broker sends the client elsewhere (migration): its will waits this
        # long for the client to reconnect before it is published.
        self.will_grace = 0.0
        self.io: ConnectionIO | None = None  # the I/O layer's handle for this connection
        self._warned = NO_WARNINGS  # shared until the first warning
        self._out: list[bytes | bytearray] = []
        self._out_bytes = 0  # in _out and _side: held here while the transport is paused
        # Multi-stream QUIC: data channels' readers and output (channel 0 uses the above).
        self.rx_channel = 0  # the channel of the packet being handled: replies go there
        self._readers: dict[int, PacketReader] = {}
        self._side: dict[int, list[bytes | bytearray]] = {}
        # Incomplete packets: when each channel's began arriving, and the bytes all the
        # readers hold (the broker caps both: Broker.input_changed and Broker.tick).
        self.incomplete_since: dict[int, float] = {}
        self.input_held = 0

    def __repr__(self) -> str:
        return f"<BrokerConnection {self.transport} {self.peer} {self.client_id!r}>"

    def _new_reader(self, version: int | None) -> PacketReader:
        """A decoder that holds the client to the broker's limits (size, user properties)."""
        cfg = self.broker.config
        return PacketReader(
            version, cfg.max_packet_size, cfg.max_user_properties, cfg.max_user_properties_size
        )

    # ----------------------------------------------------------------- I/O interface
    def receive_data(self, data: bytes, channel: int = 0) -> None:
        """Handle bytes from the network; errors close this connection, never raise.

        ``channel`` > 0 is a QUIC data stream, fed only once the connection is CONNECTED.
        """
        if self.closing:
            return
        if channel:
            self._receive_on_channel(data, channel)
            return
        if (
            self.state is State.AWAIT_CONNECT
            and data
            and data[0] != 0x10
            and not self.reader.buffered
        ):
            # MQTT-3.1.0-1: the first byte already shows this is not a CONNECT; do not wait
            # (up to the CONNECT timeout) for the rest of something that is not MQTT.
            self.protocol_violation(ProtocolError("the first packet must be CONNECT"))
            return
        error: MQTTError | None = None
        reader = self.reader
        try:
            packets = reader.feed(data)
        except MQTTError as exc:
            # Without its traceback: kept in ``error``, it would form a cycle with this
            # frame and hold the reader's frames (and the refused packet's bytes, up to the
            # Maximum Packet Size) until the garbage collector happens to run.
            packets, error = exc.decoded, exc.with_traceback(None)
        self._handle_all(packets)
        if packets:
            self.last_received = self.broker.now()
        if error is not None and not self.closing:
            self.protocol_violation(error)
        if reader.buffered or self.incomplete_since:
            self._track_incomplete(0, reader, bool(packets))

    def _handle_all(self, packets: list[Packet]) -> None:
        """Handle control-stream packets in order until one closes the connection.

        (Apart from receive_data, whose early ``if self.closing: return`` would leave mypy
        sure that ``self.closing`` is still false here.)
        """
        handle = self._handle
        for packet in packets:
            if self.closing:
                break
            try:
                handle(packet)
            except MQTTError as exc:
                self.protocol_violation(exc)
                break

    def _receive_on_channel(self, data: bytes, channel: int) -> None:
        reader = self._readers.get(channel)
        if reader is None:
            reader = self._readers[channel] = self._new_reader(self.version)
        error: MQTTError | None = None
        try:
            packets = reader.feed(data)
        except MQTTError as exc:
            packets, error = exc.decoded, exc.with_traceback(None)  # as in receive_data
        self.rx_channel = channel
        try:
            for packet in packets:
                if self.closing:
                    break
                try:
                    if type(packet) not in DATA_STREAM_PACKETS:
                        raise ProtocolError(
                            f"{type(packet).__name__} belongs on the control stream"
                        )
                    self._handle(packet)
                except MQTTError as exc:
                    self.protocol_violation(exc)
                    break
        finally:
            self.rx_channel = 0
        if packets:
            self.last_received = self.broker.now()
        if error is not None and not self.closing:
            self.protocol_violation(error)
        if reader.buffered or self.incomplete_since:
            self._track_incomplete(channel, reader, bool(packets))

    def _track_incomplete(self, channel: int, reader: PacketReader, decoded: bool) -> None:
        """Note when ``channel``'s incomplete packet began, and report what is held."""
        since = self.incomplete_since
        if reader.buffered:
            if decoded or channel not in since:  # a new packet began in this data
                since[channel] = self.broker.now()
        else:
            since.pop(channel, None)
        self._report_input()

    def _report_input(self) -> None:
        held = self.reader.buffered
        if self._readers:
            held += sum(r.buffered for r in self._readers.values())
        if held != self.input_held:
            self.broker.input_changed(self, held)

    def drop_incomplete(self, reason: int, why: str, *args: Any) -> None:
        """Close for an incomplete packet (too old, or too much held), freeing it at once."""
        if not self.closing:
            log.info("closing %s (%s): " + why, self.client_id or self.peer, self.transport, *args)
            self.broker.stats.limit_closed += 1
        self.reader = PacketReader(self.reader.version, self.broker.config.max_packet_size)
        self._readers.clear()
        self.incomplete_since.clear()
        self.broker.input_changed(self, 0)
        self.close(reason)

    def channel_closed(self, channel: int) -> None:
        """A data stream ended: its PUBLISHes go to the control stream from now on."""
        reader = self._readers.pop(channel, None)
        if reader is not None and reader.buffered:  # an incomplete packet that never will be
            self.incomplete_since.pop(channel, None)
            self._report_input()
        session = self.session
        if session is not None:
            for opts in session.subscriptions.values():
                if opts.channel == channel:
                    opts.channel = 0

    def data_to_send(self) -> bytes:
        """Output for channel 0 (everything, on a single-stream transport).

        Nothing while the transport is paused (its buffer is full: the client is not
        reading): the output waits here, where it is counted against max_output_bytes,
        instead of piling up unseen in the transport.  A closing connection gets it all.
        """
        out = self._out
        if not out or not (self.writable or self.closing):
            return b""
        self._out = []
        data = out[0]
        if len(out) > 1 or isinstance(data, bytearray):
            data = b"".join(out)
        self._out_bytes -= len(data)
        return data

    @property
    def has_side_data(self) -> bool:
        return bool(self._side)

    def side_data_to_send(self) -> dict[int, bytes]:
        """Output for the data channels (multi-stream QUIC only), by channel; as above."""
        if not (self.writable or self.closing):
            return {}
        side, self._side = self._side, {}
        out = {channel: b"".join(chunks) for channel, chunks in side.items()}
        self._out_bytes -= sum(len(data) for data in out.values())
        return out

    def set_writable(self, writable: bool) -> None:
        """Flow control from the transport: while paused, QoS 0 is dropped, QoS > 0 waits,
        and other output is held (up to max_output_bytes)."""
        self.writable = writable
        if writable:
            if self._out or self._side:
                self.broker.mark_dirty(self)  # what waited while paused
            if self.session is not None and self.state is State.CONNECTED:
                self.pump()

    def connection_lost(self) -> None:
        """The transport closed (either side); tell the broker once."""
        if self.state is State.CLOSED:
            return
        was_connected = self.state is State.CONNECTED
        self.state = State.CLOSED
        self.closing = True
        if was_connected:
            self.broker.connection_closed(self, clean=self.disconnected_cleanly)
        else:
            self.broker.connection_dropped(self)

    # ----------------------------------------------------------------- output helpers
    def send_bytes(self, data: bytes, channel: int | None = None) -> None:
        """Queue output for ``channel``; by default the channel of the packet being handled."""
        if self.closing:
            return
        if channel is None:
            channel = self.rx_channel
        if not self._out and not self._side:
            self.broker.mark_dirty(self)
        if channel:
            chunks = self._side.get(channel)
            if chunks is None:
                chunks = self._side[channel] = []
        else:
            chunks = self._out
        self._out_bytes += len(data)
        if self.writable:
            chunks.append(data)
        else:
            # Held while paused, in one buffer: then what is counted is what is held (a list
            # of small packets costs several times their bytes in pointers and headers).
            if chunks and type(chunks[-1]) is bytearray:
                chunks[-1] += data
            else:
                chunks.append(bytearray(data))
            limit = self.broker.config.max_output_bytes
            if limit and self._out_bytes > limit:
                self._output_overflow(limit)

    def _output_overflow(self, limit: int) -> None:
        """The client does not read and its output passed the cap: drop it and close.

        No DISCONNECT: a client that does not read would not see it.  The session stays
        as the rules say (its QoS > 0 messages wait in it, within their own budgets).
        """
        log.info(
            "closing %s (%s): it does not read, %d bytes of output held (max_output_bytes %d)",
            self.client_id or self.peer, self.transport, self._out_bytes, limit,
        )  # fmt: skip
        self.broker.stats.limit_closed += 1
        self._out = []
        self._side = {}
        self._out_bytes = 0
        self.close_reason = ReasonCode.QUOTA_EXCEEDED
        self.closing = True
        self.abort = True
        self.broker.mark_dirty(self)

    def send(self, packet: Packet, channel: int | None = None) -> None:
        self.send_bytes(encode(packet, self.version or MQTT_5), channel)

    def close(self, reason: int = ReasonCode.SUCCESS, reference: str | None = None) -> None:
        """Close after flushing; MQTT 5 clients get a DISCONNECT with ``reason`` first."""
        if self.closing:
            return
        if self.version == MQTT_5 and self.state is State.CONNECTED:
            props: dict[int, Any] = {}
            if reference:
                props[P.SERVER_REFERENCE] = reference
            self.send(Disconnect(reason, props), channel=0)
        self.close_reason = reason
        self.closing = True
        self.broker.mark_dirty(self)

    def warn_once(self, key: str, message: str, *args: Any) -> None:
        """Log a condition at INFO the first time on this connection, at DEBUG after that."""
        if key in self._warned:
            log.debug(message, *args)
            return
        self._warned = self._warned | {key}
        log.info(message, *args)

    def protocol_violation(self, exc: MQTTError) -> None:
        log.info(
            "closing %s (%s): %s [reason %#04x]",
            self.client_id or self.peer,
            self.transport,
            exc.message,
            exc.reason_code,
        )
        self.broker.stats.protocol_errors += 1
        if isinstance(exc, UnsupportedProtocolVersion) and self.state is State.AWAIT_CONNECT:
            # MQTT-3.1.2-2 (3.1.1 and 5.0): CONNACK return code 1 / reason 0x84, then close.
            # The level was refused, so answer in the format of the nearest one known.
            level = exc.protocol_level or 0
            version = MQTT_5 if level >= MQTT_5 else MQTT_3_1_1
            self.send_bytes(encode(Connack(False, exc.reason_code), version))
            self.closing = True
            self.close_reason = exc.reason_code
            self.broker.mark_dirty(self)
            return
        if self.state is State.AWAIT_CONNECT and self.version:
            # A CONNECT that failed validation after its header was read.
            self.send(Connack(False, exc.reason_code))
            self.closing = True
            self.close_reason = exc.reason_code
            self.broker.mark_dirty(self)
            return
        self.close(exc.reason_code)

    # ----------------------------------------------------------------- packet dispatch
    def _handle(self, packet: Packet) -> None:
        # ``type(packet) is C`` narrows the union for mypy and costs no more than an ``is``
        # on a saved ``type(packet)`` (a ``match`` or isinstance chain is slower).
        if type(packet) is Publish:
            self._on_publish(packet)
        elif type(packet) is Puback:
            self._on_puback(packet)
        elif type(packet) is Pubrec:
            self._on_pubrec(packet)
        elif type(packet) is Pubrel:
            self._on_pubrel(packet)
        elif type(packet) is Pubcomp:
            self._on_pubcomp(packet)
        elif type(packet) is Pingreq:
            self.send_bytes(b"\xd0\x00")
        elif type(packet) is Subscribe:
            self.broker.subscribe(self, packet)
        elif type(packet) is Unsubscribe:
            self._on_unsubscribe(packet)
        elif type(packet) is Connect:
            self._on_connect(packet)
        elif type(packet) is Disconnect:
            self._on_disconnect(packet)
        elif type(packet) is Auth:
            raise ProtocolError("AUTH without an authentication method")  # MQTT-4.12.0-1
        else:
            raise ProtocolError(f"{type(packet).__name__} is not sent by clients")

    def _on_connect(self, packet: Connect) -> None:
        self.version = packet.protocol_version
        if packet.properties.get(P.AUTHENTICATION_METHOD) is not None:
            # Enhanced authentication is not offered (MQTT-4.12.0-1 lets us refuse it).
            self._refuse(ReasonCode.BAD_AUTHENTICATION_METHOD, "enhanced auth not supported")
            return
        self.broker.connect(self, packet)

    def _refuse(self, reason: int, why: str, properties: dict[int, Any] | None = None) -> None:
        log.info("refusing %s (%s): %s", self.peer, self.transport, why)
        self.send(Connack(False, reason, properties or {}))
        self.closing = True
        self.close_reason = reason
        self.broker.mark_dirty(self)

    def accept(self, session: Session, present: bool, connack_props: dict[int, Any]) -> None:
        """Called by the broker once CONNECT is accepted: CONNACK, then resend in-flight."""
        self.state = State.CONNECTED
        self.session = session
        # The data streams of an earlier connection are gone; this one numbers its own.
        for opts in session.subscriptions.values():
            opts.channel = 0
        for delivery in session.inflight.values():
            delivery.channel = 0
        for delivery in session.pending:
            delivery.channel = 0
        self.send(Connack(present, ReasonCode.SUCCESS, connack_props))
        # MQTT-4.4.0-1: resend unacknowledged PUBLISH (DUP) and PUBREL on session resume.
        for pid, delivery in list(session.inflight.items()):
            if delivery.state == AWAIT_PUBCOMP:
                self.send_bytes(encode(Pubrel(delivery.packet_id), self.version))
            elif not self._transmit(delivery, dup=True):
                # Too big for the client's new Maximum Packet Size: discarded as if
                # delivered (MQTT-3.1.2-25) instead of holding an in-flight slot forever.
                del session.inflight[pid]
                self.broker.release(session, delivery)
        self.pump()

    def _on_disconnect(self, packet: Disconnect) -> None:
        session = self.session
        if self.version == MQTT_5 and session is not None:
            expiry = packet.properties.get(P.SESSION_EXPIRY_INTERVAL)
            if expiry is not None:
                if session.expiry_interval == 0 and expiry != 0:
                    raise ProtocolError("session expiry set on DISCONNECT after 0 in CONNECT")
                session.expiry_interval = self.broker.cap_expiry(expiry)
        # MQTT-3.14.4-3: a normal DISCONNECT discards the will; 0x04 asks for it.
        # MQTT-3.1.2-10: only reason 0x00 deletes the will; any other reason publishes it.
        self.disconnected_cleanly = packet.reason_code == ReasonCode.SUCCESS
        self.closing = True
        self.broker.mark_dirty(self)

    # ----------------------------------------------------------------- inbound PUBLISH
    def _on_publish(self, packet: Publish) -> None:
        session = self.session
        if session is None:
            raise ProtocolError("PUBLISH before CONNECT")
        topic = packet.topic
        props = packet.properties
        if props:
            alias = props.pop(P.TOPIC_ALIAS, None)
            if alias is not None:
                if alias > self.broker.config.topic_alias_maximum:
                    raise MQTTError("topic alias out of range", ReasonCode.TOPIC_ALIAS_INVALID)
                if topic:
                    self.in_aliases[alias] = topic
                else:
                    topic = self.in_aliases.get(alias, "")
                    if not topic:
                        raise ProtocolError("unknown topic alias")  # MQTT-3.3.4-? / 3.3.2-8
            if P.SUBSCRIPTION_IDENTIFIER in props:
                raise ProtocolError("subscription identifier sent by a client")  # 3.3.4-6
            if props.get(P.PAYLOAD_FORMAT_INDICATOR) == 1:
                try:
                    packet.payload.decode()
                except UnicodeDecodeError:
                    self._ack_error(packet, ReasonCode.PAYLOAD_FORMAT_INVALID)
                    return
        if not topic or "+" in topic or "#" in topic:
            raise MQTTError(f"invalid topic name {topic!r}", ReasonCode.TOPIC_NAME_INVALID)
        qos = packet.qos
        if qos == 2:
            pid = packet.packet_id
            assert pid is not None  # the decoder requires one for QoS > 0
            if pid in session.inbound_qos2:
                # Duplicate of a message we already routed (method A, section 4.3.3), or
                # keep until a migration's commit (broker.provisional, rule 3).
                self.broker.send_ack(self, b"\x50\x02" + pid.to_bytes(2, "big"))
                return
            if len(session.inbound_qos2) >= self.broker.config.receive_maximum:
                raise MQTTError("receive maximum exceeded", ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)
            if self.broker.provisional is not None:
                if self.broker.defer_qos2(self, topic, packet):
                    session.qos2_ids().add(pid)
                elif self.version == MQTT_5:
                    self.send_bytes(encode(Pubrec(pid, ReasonCode.QUOTA_EXCEEDED), MQTT_5))
                else:
                    self.close(ReasonCode.QUOTA_EXCEEDED)
                return
            self.route_qos2(topic, packet)
            return
        reason = self.broker.publish_from(self, topic, packet)
        if qos == 1:
            pid = packet.packet_id
            assert pid is not None  # the decoder requires one for QoS > 0
            if reason and self.version == MQTT_5:
                self.broker.send_ack(self, encode(Puback(pid, reason), MQTT_5))
            else:
                self.broker.send_ack(self, b"\x40\x02" + pid.to_bytes(2, "big"))

    def route_qos2(self, topic: str, packet: Publish) -> None:
        """Route an inbound QoS 2 message and answer PUBREC (now, or kept until a
        migration's commit: then its packet id is already taken)."""
        session = self.session
        assert session is not None  # a CONNECTed connection
        pid = packet.packet_id
        assert pid is not None  # the decoder requires one for QoS > 0
        reason = self.broker.publish_from(self, topic, packet)
        if reason >= 0x80 and self.version == MQTT_5:
            # An error PUBREC ends the exchange: nothing to remember (section 4.3.3).
            session.inbound_qos2.discard(pid)
            self.send_bytes(encode(Pubrec(pid, reason), MQTT_5))
            return
        session.qos2_ids().add(pid)
        if self.broker.journal:
            self.broker.store.note_session(session)
        if reason and self.version == MQTT_5:
            self.broker.send_ack(self, encode(Pubrec(pid, reason), MQTT_5))
        else:
            self.broker.send_ack(self, b"\x50\x02" + pid.to_bytes(2, "big"))

    def _ack_error(self, packet: Publish, reason: int) -> None:
        pid = packet.packet_id
        if packet.qos == 1 and self.version == MQTT_5:
            assert pid is not None  # the decoder requires one for QoS > 0
            self.send(Puback(pid, reason))
        elif packet.qos == 2 and self.version == MQTT_5:
            assert pid is not None
            self.send(Pubrec(pid, reason))
        elif packet.qos:
            # MQTT 3.1.1 cannot say why: closing is the only refusal it knows.
            self.close(reason)

    def _on_pubrel(self, packet: Pubrel) -> None:
        session = self.session
        if session is None:
            raise ProtocolError("PUBREL before CONNECT")
        pid = packet.packet_id
        if pid in session.inbound_qos2:
            session.inbound_qos2.discard(pid)
            if self.broker.journal:
                self.broker.store.note_session(session)
            # Held in strict mode until the discard is durable: else a client reusing the
            # packet id after a crash would have its new message taken for a duplicate.
            self.broker.send_ack(self, b"\x70\x02" + pid.to_bytes(2, "big"))
        elif self.version == MQTT_5:
            self.send(Pubcomp(pid, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND))
        else:
            self.send_bytes(b"\x70\x02" + pid.to_bytes(2, "big"))

    # ----------------------------------------------------------------- outbound acks
    def _on_puback(self, packet: Puback) -> None:
        session = self.session
        if session is None:
            raise ProtocolError("PUBACK before CONNECT")
        delivery = session.inflight.get(packet.packet_id)
        if delivery is not None and delivery.state == AWAIT_PUBACK:
            del session.inflight[packet.packet_id]
            self.broker.release(session, delivery)
            if session.pending or session.replays:
                self.pump()

    def _on_pubrec(self, packet: Pubrec) -> None:
        session = self.session
        if session is None:
            raise ProtocolError("PUBREC before CONNECT")
        pid = packet.packet_id
        delivery = session.inflight.get(pid)
        if delivery is None or delivery.state == AWAIT_PUBACK:
            if self.version == MQTT_5:
                self.send(Pubrel(pid, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND))
            return
        if packet.reason_code >= 0x80:
            # The receiver refused the message: the exchange ends here (MQTT-4.3.3).
            del session.inflight[pid]
            self.broker.release(session, delivery)
            self.pump()
            return
        delivery.state = AWAIT_PUBCOMP
        if self.broker.journal:
            self.broker.store.note_delivery(session, delivery)
        # Held while provisional: the subscriber keeps the packet id until PUBREL, so a
        # rollback's resend of this message is taken for the duplicate it is.
        self.broker.send_ack(self, b"\x62\x02" + pid.to_bytes(2, "big"), durable=False)

    def _on_pubcomp(self, packet: Pubcomp) -> None:
        session = self.session
        if session is None:
            raise ProtocolError("PUBCOMP before CONNECT")
        delivery = session.inflight.get(packet.packet_id)
        if delivery is not None and delivery.state == AWAIT_PUBCOMP:
            del session.inflight[packet.packet_id]
            self.broker.release(session, delivery)
            if session.pending or session.replays:
                self.pump()

    def _on_unsubscribe(self, packet: Unsubscribe) -> None:
        session = self.session
        if session is None:
            raise ProtocolError("UNSUBSCRIBE before CONNECT")
        codes: list[int] = []
        store = self.broker.store
        for topic_filter in packet.topic_filters:
            found = store.unsubscribe(session, topic_filter)
            codes.append(ReasonCode.SUCCESS if found else ReasonCode.NO_SUBSCRIPTION_EXISTED)
        if session.replays:  # retained messages still owed to those filters are not sent
            gone = set(packet.topic_filters)
            session.replays = deque(r for r in session.replays if r.topic_filter not in gone)
        data = encode(Unsuback(packet.packet_id, codes), self.version or MQTT_5)
        self.broker.send_ack(self, data, durable=False)  # held while provisional

    def send_suback(self, packet_id: int, codes: list[int]) -> None:
        data = encode(Suback(packet_id, codes), self.version or MQTT_5)
        self.broker.send_ack(self, data, durable=False)  # held while provisional

    # ----------------------------------------------------------------- outbound PUBLISH
    def deliver(self, delivery: Delivery) -> bool:
        """Send now if the window allows, else queue in the session (MQTT-4.9.0-?).

        False if a queue limit of the session or the broker refused it (Broker.hold).
        """
        session = self.session
        assert session is not None
        if delivery.qos == 0:
            if self.writable:
                self._transmit(delivery, dup=False)
            else:
                session.dropped += 1
                self.broker.stats.dropped += 1
                self.warn_once(
                    "paused",
                    "client %s (%s) is not reading: dropping QoS 0 messages while its output"
                    " is paused",
                    self.client_id,
                    self.transport,
                )
            return True
        if self.writable and not session.pending and len(session.inflight) < self.send_quota:
            broker = self.broker
            if not broker.hold(session, delivery):  # in flight, it is held as if queued
                return False
            delivery.packet_id = session.allocate_packet_id()
            delivery.state = AWAIT_PUBACK if delivery.qos == 1 else AWAIT_PUBREC
            session.inflight[delivery.packet_id] = delivery
            if not self._transmit(delivery, dup=False):
                del session.inflight[delivery.packet_id]
                broker.release(session, delivery)
            return True
        return self.broker.enqueue(session, delivery)

    def pump(self) -> None:
        """Move queued deliveries into the in-flight window while it has room.

        Then a retained replay waiting for this (room, or the transport draining) goes on.
        """
        session = self.session
        if session is None or self.closing:
            return
        pending = session.pending
        inflight = session.inflight
        broker = self.broker
        if session.replays and self.writable:
            broker.replay_ready(self)  # its next batch comes after the queue below
        now = broker.now()
        while pending and self.writable and len(inflight) < self.send_quota:
            delivery = pending.popleft()
            expires_at = delivery.message.expires_at
            if expires_at is not None and expires_at <= now:
                broker.release(session, delivery)
                continue  # MQTT-3.3.2-5: expired messages are not delivered
            if not broker.may_receive(session, delivery.message):
                broker.release(session, delivery)
                continue  # the ACL is asked when a message is sent, not only when queued
            if delivery.qos:
                delivery.packet_id = session.allocate_packet_id()
                delivery.state = AWAIT_PUBACK if delivery.qos == 1 else AWAIT_PUBREC
                inflight[delivery.packet_id] = delivery
                if broker.journal:
                    broker.store.note_delivery(session, delivery)
                if not self._transmit(delivery, dup=False):
                    del inflight[delivery.packet_id]
                    broker.release(session, delivery)
            else:
                self._transmit(delivery, dup=False)
                broker.release(session, delivery)

    def _transmit(self, delivery: Delivery, dup: bool) -> bool:
        """Encode and queue one PUBLISH; False if the client's size limit forbids it."""
        message = delivery.message
        v5 = self.version == MQTT_5
        qos = delivery.qos
        retain = delivery.retain
        topic = message.topic
        props = message.properties
        new_alias = 0
        if v5 and (
            props
            or delivery.subscription_ids
            or message.expires_at is not None
            or self.client_alias_max
        ):
            props = dict(props)
            if delivery.subscription_ids:
                props[P.SUBSCRIPTION_IDENTIFIER] = delivery.subscription_ids
            if message.expires_at is not None:
                remaining = message.expires_at - self.broker.now()
                props[P.MESSAGE_EXPIRY_INTERVAL] = max(0, int(remaining + 0.999))  # 3.3.2-6
            # Streams are not ordered with each other: an alias set on one data stream
            # could be used on another before it arrives, so data streams send topics.
            if self.client_alias_max and not delivery.channel:
                alias = self.out_aliases.get(topic)
                if alias is not None:
                    topic = ""
                    props[P.TOPIC_ALIAS] = alias
                elif len(self.out_aliases) < self.client_alias_max:
                    # Assigned only once the PUBLISH is known to be sent (below): a
                    # discarded one must not teach us an alias the client never saw.
                    new_alias = len(self.out_aliases) + 1
                    props[P.TOPIC_ALIAS] = new_alias
            data = encode_publish(
                topic, message.payload, qos, retain, dup, delivery.packet_id or None, props, 5
            )
        elif qos == 0:
            cache = message.encoded
            key = (v5, retain)
            if cache is None:
                cache = message.encoded = {}
            cached = cache.get(key)
            if cached is None:
                cached = cache[key] = encode_publish(
                    topic, message.payload, 0, retain, False, None, None, self.version
                )
            data = cached
        else:
            data = encode_publish(
                topic, message.payload, qos, retain, dup, delivery.packet_id, None, self.version
            )
        if self.client_max_packet and len(data) > self.client_max_packet:
            # MQTT-3.1.2-25: discard as if delivered rather than exceed the client's limit.
            self.broker.stats.dropped += 1
            return False
        if new_alias:
            self.out_aliases[message.topic] = new_alias
        self.send_bytes(data, delivery.channel)
        self.broker.stats.messages_sent += 1
        return True
