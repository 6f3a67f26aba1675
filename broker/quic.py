"""MQTT over QUIC for the broker: aioquic connections carrying MQTT on client streams.

Single-stream mode (as EMQX does it): the client opens one bidirectional stream and MQTT
runs over it exactly as over TCP, so the same :class:`~broker.connection.BrokerConnection`
serves it.  Multi-stream mode (EMQX's too) follows from the client opening more streams: the
first bidirectional stream is the control stream (CONNECT, PINGREQ, DISCONNECT, and anything
else); every further client bidirectional stream is a data stream for PUBLISH, its acks and
(UN)SUBSCRIBE.  Replies go back on the stream of the request, and messages on the stream of
the subscription, so a datagram lost on one stream does not stall the others.  A data stream
that ends only ends itself.  aioquic is extended by subclassing its protocol class, never by
patching it.
Writes are batched: the broker's flush appends to the stream and each touched connection
transmits once per event-loop turn.  A client that stops acknowledging makes its stream's
send buffer grow; past a high-water mark the connection is paused like a full TCP socket.
New connections are admitted by :class:`~quicmig.server.GuardedQuicServer`: Initials
that do not decrypt are dropped, Retry validates addresses (``--quic-retry``), and
handshakes in progress are bounded in number and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import partial
from typing import TYPE_CHECKING, Any

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import stream_is_client_initiated, stream_is_unidirectional
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    QuicEvent,
    StreamDataReceived,
    StreamReset,
)
from aioquic.tls import CipherSuite

from quicmig.connection import (
    IDLE_TIMEOUT,
    MigratingQuicConnection,
    MigrationFrameAcknowledged,
    MigrationFrameReceived,
)
from quicmig.frames import ALL_STRATEGIES
from quicmig.server import GuardedProtocol, GuardedQuicServer, HandshakePolicy, serve_guarded
from quicmig.tickets import TicketStore

from .connection import BrokerConnection, State

if TYPE_CHECKING:
    from .server import BrokerServer

log = logging.getLogger("qmig.broker")

ALPN = "mqtt"
HIGH_WATER = 1 << 20  # unacknowledged bytes on the stream before the connection pauses
LOW_WATER = 256 << 10
CLOSE_LINGER = 3.0  # seconds to let a final DISCONNECT be acknowledged before closing
# The engine's CONNECT timeout starts once the MQTT stream exists; a connection that never
# opens one gets the same time from the end of its handshake.
STREAM_TIMEOUT = 10.0
# Bytes a client may send on data streams before its CONNECT is accepted (they wait).
EARLY_DATA_LIMIT = 64 << 10
# The empty set of data streams ended before CONNECT: one for all (frozenset() is not a
# singleton, and a set is 216 bytes a connection).
NO_STREAMS: frozenset[int] = frozenset()
# Application error codes in CONNECTION_CLOSE (RFC 9000 section 20.2: ours to define).
ERROR_NONE = 0x0
ERROR_PROTOCOL = 0x1


def server_configuration(cert: str, key: str) -> QuicConfiguration:
    """TLS 1.3 with ALPN ``mqtt``; flow-control windows sized for bursts of small messages.

    AES-128-GCM first: its SHA-256 key schedule is a little cheaper than AES-256-GCM's
    SHA-384 (aioquic's first choice), for the same 128-bit security level as X25519 and
    the P-256 certificate.
    """
    config = QuicConfiguration(
        is_client=False,
        alpn_protocols=[ALPN],
        max_data=16 << 20,
        max_stream_data=8 << 20,
        idle_timeout=IDLE_TIMEOUT,
        cipher_suites=[
            CipherSuite.AES_128_GCM_SHA256,
            CipherSuite.AES_256_GCM_SHA384,
            CipherSuite.CHACHA20_POLY1305_SHA256,
        ],
    )
    config.load_cert_chain(cert, key)
    return config


class BrokerQuicProtocol(GuardedProtocol):
    """One QUIC connection = one MQTT connection on its first client bidirectional stream."""

    def __init__(self, *args: Any, broker_server: BrokerServer, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Make aioquic's connection speak qmig's migration extension before any datagram.
        quic = MigratingQuicConnection.adopt(self._quic, ALL_STRATEGIES)
        config = broker_server.config
        if config.require_certificate:
            quic.client_cafile = config.cafile  # the TLS listener's rule, on QUIC too
        quic.ticket_store = broker_server.quic_tickets  # resumption (None: off)
        self.broker_server = broker_server
        broker_server.quic_protocols.add(self)
        self.stream_id: int | None = None  # the control stream
        self.conn: BrokerConnection | None = None
        # Multi-stream mode: data stream id <-> the connection's channel number for it.
        self.channels: dict[int, int] = {}
        self.channel_streams: dict[int, int] = {}
        self._early: dict[int, bytearray] = {}  # data sent before CONNECT was accepted
        self._early_ended = NO_STREAMS
        self.paused = False
        self._closing = False
        self._stream_timer: asyncio.TimerHandle | None = None

    # ----------------------------------------------------------------- events
    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            self._on_stream_data(event)
        elif isinstance(event, StreamReset):
            if event.stream_id == self.stream_id:
                self._lost()
                self.close()  # without its control stream the connection has no session
            elif event.stream_id in self.channels:
                self._end_data_stream(event.stream_id, reset=True)
        elif isinstance(event, ConnectionTerminated):
            self._lost()
        elif isinstance(event, HandshakeCompleted):
            self.handshake_done()  # no longer half-open for the listener
            trimmer = self.broker_server.trimmer
            if trimmer is not None:  # give back what the handshake allocated and freed
                trimmer.note()
            if self.stream_id is None:
                self._stream_timer = self._loop.call_later(STREAM_TIMEOUT, self._no_stream)
            self.broker_server.migration.connection_ready(self)
        elif isinstance(event, MigrationFrameReceived):
            self.broker_server.migration.frame_received(self, event)
        elif isinstance(event, MigrationFrameAcknowledged):
            self.broker_server.migration.frame_acknowledged(self, event)

    def _no_stream(self) -> None:
        self._stream_timer = None
        if self.stream_id is None and not self._closing:
            self._reject(f"no MQTT stream within {STREAM_TIMEOUT:g} s")

    def _on_stream_data(self, event: StreamDataReceived) -> None:
        sid = event.stream_id
        if self.stream_id is None:
            if not stream_is_client_initiated(sid) or stream_is_unidirectional(sid):
                self._reject(f"MQTT must start on a client bidirectional stream, not {sid}")
                return
            self.stream_id = sid
            self._cancel_stream_timer()
            addr = self._quic._network_paths[0].addr if self._quic._network_paths else None
            peer = f"{addr[0]}:{addr[1]}" if addr else "?"
            self.conn = self.broker_server.broker.open_connection("quic", peer)
            self.conn.io = self
        elif sid != self.stream_id:
            self._on_data_stream(event)
            return
        conn = self.conn
        assert conn is not None
        if event.data:
            conn.receive_data(event.data)
            if self._early and conn.state is State.CONNECTED:
                self._release_early_data(conn)
        if event.end_stream:
            conn.connection_lost()
            self.close()

    def _on_data_stream(self, event: StreamDataReceived) -> None:
        sid = event.stream_id
        channel = self.channels.get(sid)
        if channel is None:
            if not stream_is_client_initiated(sid) or stream_is_unidirectional(sid):
                self._reject(f"MQTT data streams are client bidirectional streams, not {sid}")
                return
            channel = len(self.channel_streams) + 1  # never reused within the connection
            self.channels[sid] = channel
            self.channel_streams[channel] = sid
        conn = self.conn
        if conn is None or conn.state is not State.CONNECTED:
            early = self._early.setdefault(sid, bytearray())
            early += event.data
            if event.end_stream:
                self._early_ended = self._early_ended | {sid}
            if sum(len(b) for b in self._early.values()) > EARLY_DATA_LIMIT:
                self._reject(f"over {EARLY_DATA_LIMIT} bytes on data streams before CONNECT")
            return
        if event.data:
            conn.receive_data(event.data, channel)
        if event.end_stream:
            self._end_data_stream(sid)

    def _release_early_data(self, conn: BrokerConnection) -> None:
        """CONNECT was accepted: handle what the client pipelined on its data streams."""
        early, self._early = self._early, {}
        for sid, data in early.items():
            if data and not conn.closing:
                conn.receive_data(bytes(data), self.channels[sid])
            if sid in self._early_ended:
                self._end_data_stream(sid)
        self._early_ended = NO_STREAMS

    def _end_data_stream(self, sid: int, reset: bool = False) -> None:
        """The client ended a data stream: end ours too; the connection carries on."""
        channel = self.channels.pop(sid, None)
        if channel is None:
            return
        del self.channel_streams[channel]
        if self.conn is not None:
            self.conn.channel_closed(channel)
        with contextlib.suppress(Exception):  # the stream may be gone already
            if reset:
                self._quic.reset_stream(sid, ERROR_NONE)
            else:
                self._quic.send_stream_data(sid, b"", end_stream=True)
        self.broker_server.quic_touched(self)

    def _reject(self, why: str) -> None:
        log.info("closing QUIC connection: %s", why)
        self._quic.close(error_code=ERROR_PROTOCOL, reason_phrase=why)
        self.transmit()
        self._lost()

    def _cancel_stream_timer(self) -> None:
        if self._stream_timer is not None:
            self._stream_timer.cancel()
            self._stream_timer = None

    def _lost(self) -> None:
        self.broker_server.quic_protocols.discard(self)
        self.broker_server.migration.connection_gone(self)
        self._cancel_stream_timer()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.connection_lost()
            conn.io = None

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        observer = self.broker_server.observer
        if observer is not None:
            observer.datagram(self, addr)
        if self.paused and self.conn is not None and self._unacked() < LOW_WATER:
            self.paused = False
            self.conn.set_writable(True)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._lost()

    def transmit(self) -> None:
        """Send what this connection has, after what its datagram made the broker send.

        aioquic transmits (the acknowledgement, often) right after handling a datagram;
        the PUBLISHes that datagram routed to other clients would wait for that and for
        the next loop turn.  Flushing them first takes both off every message's latency.
        """
        server = self.broker_server
        if server.flush_pending:
            server.flush()
        super().transmit()

    # ----------------------------------------------------------------- output (BrokerServer.flush)
    def _unacked(self) -> int:
        # aioquic has no public send-buffer size; its stream senders' offsets tell it.
        streams = self._quic._streams
        total = 0
        for sid in (self.stream_id, *self.channels):
            stream = streams.get(sid) if sid is not None else None
            if stream is not None:
                total += stream.sender._buffer_stop - stream.sender._buffer_start
        return int(total)

    def write(self, data: bytes) -> None:
        if self.stream_id is None or self._closing:
            return
        self._quic.send_stream_data(self.stream_id, data)
        self._sent()

    def write_channel(self, channel: int, data: bytes) -> None:
        """Output for a data stream; if the client ended it meanwhile, the control stream."""
        sid = self.channel_streams.get(channel)
        if sid is None:
            self.write(data)
            return
        if self._closing:
            return
        self._quic.send_stream_data(sid, data)
        self._sent()

    def _sent(self) -> None:
        self.broker_server.quic_touched(self)
        if not self.paused and self.conn is not None and self._unacked() > HIGH_WATER:
            self.paused = True
            self.conn.set_writable(False)

    def abort(self) -> None:
        """Drop the connection at once (its output failed): CONNECTION_CLOSE, no linger."""
        if not self._closing:
            self._closing = True
            self._quic.close(error_code=ERROR_PROTOCOL, reason_phrase="internal error")
            self.broker_server.quic_touched(self)
        self._lost()

    # Not aioquic's close(error_code, reason_phrase): this is ConnectionIO.close (a graceful
    # end of the MQTT stream), which the broker calls; it closes the QUIC connection itself.
    def close(self) -> None:  # type: ignore[override]
        """Finish the stream, then close once it is acknowledged (or after a linger)."""
        if self._closing:
            return
        self._closing = True
        if self.stream_id is not None:
            # The peer may have finished or reset the stream already.
            with contextlib.suppress(Exception):
                self._quic.send_stream_data(self.stream_id, b"", end_stream=True)
        self.transmit()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_LINGER

        def check() -> None:
            transport = self._transport
            if transport is None or transport.is_closing():
                return  # the listener closed meanwhile (broker stop): nothing to send with
            if self._unacked() == 0 or loop.time() >= deadline:
                self._quic.close(error_code=ERROR_NONE)
                self.transmit()
            else:
                loop.call_later(0.05, check)

        loop.call_later(0.01, check)


async def start_quic_listener(
    broker_server: BrokerServer, host: str, port: int, cert: str, key: str
) -> GuardedQuicServer:
    config = broker_server.config
    if config.quic_tickets > 0 and broker_server.quic_tickets is None:
        broker_server.quic_tickets = TicketStore(
            max_tickets=config.quic_tickets,
            max_bytes=config.quic_ticket_bytes,
            lifetime=config.quic_ticket_lifetime,
        )
    if broker_server.trimmer is not None and broker_server.trimmer.available:
        log.debug("malloc_trim after QUIC handshakes, at most once a second")
    policy = HandshakePolicy(
        retry=config.quic_retry,
        max_half_open=config.quic_max_handshakes,
        handshake_timeout=config.quic_handshake_timeout,
    )
    return await serve_guarded(
        host,
        port,
        configuration=server_configuration(cert, key),
        create_protocol=partial(BrokerQuicProtocol, broker_server=broker_server),
        policy=policy,
    )
