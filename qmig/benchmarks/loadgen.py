"""MQTT 3.1.1 load generator for ``qmig bench broker``: one OS process per role.

Each role runs in its own ``python -m qmig.benchmarks.loadgen SPEC`` process so that the
publisher and the subscribers never share a GIL with each other or with the orchestrator.
Packets are encoded once with qmig's codec and only patched (sequence number, timestamp,
packet id) before big batched writes; the receive path scans fixed headers by hand instead
of decoding every PUBLISH, because a full decode would make the load generator the
bottleneck.

Control protocol, one JSON object per line:

* worker to orchestrator (stdout): ``{"event": "ready"}`` once connected and subscribed,
  then ``{"event": "result", ...}`` just before exiting;
* orchestrator to worker (stdin): ``{"cmd": "go", "start": t, "warm_end": t, "stop": t}``
  with ``time.monotonic()`` instants (the clock is system-wide, so processes agree on it),
  and ``{"cmd": "stop"}`` to end a ``hold`` worker.

Every worker also exits by itself at ``deadline_s`` after it started, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import select
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from aioquic.asyncio.client import connect as quic_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamDataReceived

from measure import percentile
from mqttproto.codec import PacketReader, encode
from mqttproto.packets import (
    MQTT_3_1_1,
    Connack,
    Connect,
    Disconnect,
    PacketType,
    Publish,
    Suback,
    Subscribe,
    Subscription,
)
from quicmig.connection import MigratingQuicConnection

PAYLOAD_SIZE = 64
"""Bytes of application payload per message: sequence (8), send time in ns (8), filler."""

_SEQ = struct.Struct(">Q")
_SEQ_TS = struct.Struct(">QQ")
_PID_SEQ = struct.Struct(">HQ")
_PID_SEQ_TS = struct.Struct(">HQQ")
_PUBACK_HEAD = b"\x40\x02"
_FLOOD_BATCH = 512
_WRITE_HIGH_WATER = 256 * 1024
_FLOOD_YIELD_S = 0.005
_CONNECT_PARALLEL = 50

DISCONNECT = encode(Disconnect(), MQTT_3_1_1)


def connect_packet(client_id: str, keep_alive: int = 60, persistent: bool = False) -> bytes:
    """CONNECT, with a clean session unless ``persistent`` (the broker then keeps, and a
    durable broker journals, every message queued or in flight to it)."""
    return encode(
        Connect(
            client_id=client_id,
            protocol_version=MQTT_3_1_1,
            keep_alive=keep_alive,
            clean_start=not persistent,
        ),
        MQTT_3_1_1,
    )


def subscribe_packet(topic: str, qos: int, packet_id: int = 1) -> bytes:
    return encode(Subscribe(packet_id, [Subscription(topic, qos=qos)]), MQTT_3_1_1)


def publish_template(topic: str, qos: int, payload_size: int = PAYLOAD_SIZE) -> tuple[bytes, int]:
    """One encoded PUBLISH and the offset of its payload, which is always the packet's tail.

    For QoS > 0 the packet id sits in the two bytes just before the payload, so callers can
    patch packet id, sequence and timestamp in place with one ``struct`` call.
    """
    payload = bytes(payload_size)
    packet_id = 1 if qos else None
    pkt = encode(Publish(topic, payload, qos=qos, packet_id=packet_id), MQTT_3_1_1)
    return pkt, len(pkt) - payload_size


def _ns_to_ms(ns: float | None) -> float:
    return float("nan") if ns is None else ns / 1e6


def raise_nofile(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (capped by the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


# --------------------------------------------------------------------------- connections


class _Transport(Protocol):
    """What :class:`_Conn` uses of its transport: an ``asyncio.Transport`` (TCP) or a
    :class:`QuicStreamTransport` (one QUIC stream)."""

    def write(self, data: bytes) -> None: ...
    def is_closing(self) -> bool: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def get_write_buffer_size(self) -> int: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class _Conn(asyncio.Protocol):
    """A client connection whose non-PUBLISH packets go through qmig's codec.

    Control traffic (CONNACK, SUBACK, PUBACK) is rare or cheap enough to decode; PUBLISH is
    the hot path and subclasses override :meth:`data_received` to scan it by hand.
    """

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport: _Transport | None = None
        self.reader = PacketReader(version=MQTT_3_1_1)
        self.connack: asyncio.Future[Connack] = loop.create_future()
        self.suback: asyncio.Future[Suback] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in (self.connack, self.suback):
            if not fut.done():
                fut.set_exception(ConnectionError(f"connection lost: {exc}"))
                fut.exception()  # mark retrieved: nobody awaits SUBACK on a publisher
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def data_received(self, data: bytes) -> None:
        for packet in self.reader.feed(data):
            self.on_packet(packet)

    def on_packet(self, packet: Any) -> None:
        if isinstance(packet, Connack) and not self.connack.done():
            self.connack.set_result(packet)
        elif isinstance(packet, Suback) and not self.suback.done():
            self.suback.set_result(packet)

    async def handshake(
        self, client_id: str, topic: str | None, qos: int, timeout: float, persistent: bool = False
    ) -> None:
        """CONNECT (+ SUBSCRIBE) and wait for the acks; raises if the broker refuses."""
        assert self.transport is not None
        self.transport.write(connect_packet(client_id, persistent=persistent))
        connack = await asyncio.wait_for(self.connack, timeout)
        if connack.reason_code:
            raise ConnectionError(f"CONNACK refused: {connack.reason_code}")
        if topic is not None:
            self.transport.write(subscribe_packet(topic, qos))
            suback = await asyncio.wait_for(self.suback, timeout)
            if not suback.reason_codes or suback.reason_codes[0] >= 0x80:
                raise ConnectionError(f"SUBACK refused: {suback.reason_codes}")

    async def disconnect(self, timeout: float = 1.0) -> None:
        """Send DISCONNECT and let the broker close first, so TIME_WAIT lands on its side."""
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(DISCONNECT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        self.transport.close()


class SubConn(_Conn):
    """Subscriber: counts PUBLISHes, checks sequence numbers, PUBACKs QoS 1, times latency."""

    def __init__(self, record_latency: bool = False, read_interval_s: float = 0.0) -> None:
        super().__init__()
        # In floods a reader that wakes for every segment spends its CPU on syscalls; pausing
        # briefly after each read lets the kernel queue pile up into one big read instead.
        self.read_interval_s = read_interval_s
        self._rest = b""
        self.received = 0
        self.duplicates = 0
        self.gaps = 0
        self.expected = 0
        self.record_latency = record_latency
        self.latencies_ns: list[int] = []
        # Latency samples count only for messages sent inside [lat_from_ns, lat_to_ns).
        self.lat_from_ns = 1 << 62
        self.lat_to_ns = 1 << 62

    def data_received(self, data: bytes) -> None:
        if self._rest:
            data = self._rest + data
        n = len(data)
        i = 0
        received = self.received
        expected = self.expected
        acks: list[bytes] = []
        lat = self.record_latency
        unpack = _SEQ_TS.unpack_from
        while i + 2 <= n:
            b0 = data[i]
            rl = data[i + 1]
            h = 2
            if rl & 0x80:
                rl, h = _varint_tail(data, i + 1, n)
                if h == 0:
                    break
            end = i + h + rl
            if end > n:
                break
            if b0 & 0xF0 == 0x30:
                p = i + h
                p += 2 + ((data[p] << 8) | data[p + 1])
                if b0 & 0x06:
                    acks.append(_PUBACK_HEAD + data[p : p + 2])
                    p += 2
                seq, ts = unpack(data, p)
                received += 1
                if seq == expected:
                    expected += 1
                elif seq > expected:
                    self.gaps += seq - expected
                    expected = seq + 1
                else:
                    self.duplicates += 1
                if lat:
                    now = time.monotonic_ns()
                    if self.lat_from_ns <= ts < self.lat_to_ns:
                        self.latencies_ns.append(now - ts)
            else:
                for packet in self.reader.feed(data[i:end]):
                    self.on_packet(packet)
            i = end
        self._rest = data[i:] if i < n else b""
        self.received = received
        self.expected = expected
        tr = self.transport
        if tr is not None:
            if acks:
                tr.write(b"".join(acks))
            if self.read_interval_s and not tr.is_closing():
                tr.pause_reading()
                asyncio.get_running_loop().call_later(self.read_interval_s, self._resume)

    def _resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


def _varint_tail(data: bytes, pos: int, n: int) -> tuple[int, int]:
    """Remaining length starting at ``pos``: (value, fixed header length) or (0, 0) if short."""
    value = 0
    for k in range(4):
        if pos + k >= n:
            return 0, 0
        byte = data[pos + k]
        value |= (byte & 0x7F) << (7 * k)
        if not byte & 0x80:
            return value, k + 2
    raise ValueError("malformed remaining length")


class PubConn(_Conn):
    """Publisher: QoS 0 flood, QoS 1 with a window of in-flight PUBLISHes, or a fixed rate."""

    def __init__(self, topic: str, qos: int, window: int) -> None:
        super().__init__()
        self.qos = qos
        self.window = window
        self.packet, self.payload_off = publish_template(topic, qos)
        self.size = len(self.packet)
        self.sent = 0
        self.acked = 0
        self.inflight = 0
        self.stop_at = 0.0
        self.running = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batch = _FLOOD_BATCH if qos == 0 else window
        self._batch = bytearray(self.packet * batch)
        # QoS 0 patches the sequence number; QoS 1 the packet id just before it as well.
        first = self.payload_off - (2 if qos else 0)
        self._offsets = [first + k * self.size for k in range(batch)]

    # QoS 0 flood -----------------------------------------------------------------------
    def start_flood(self, stop_at: float) -> None:
        self.stop_at = stop_at
        self.running = True
        self._pump()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.running and self.qos == 0:
            self._pump()

    def _pump(self) -> None:
        """Write batches until the transport pushes back, yielding every few ms for timers."""
        tr = self.transport
        assert tr is not None
        batch = self._batch
        offsets = self._offsets
        pack = _SEQ.pack_into
        began = time.monotonic()
        seq = self.sent
        while not self.paused:
            now = time.monotonic()
            if now >= self.stop_at or tr.is_closing():
                self.sent = seq
                self._finish()
                return
            if now - began > _FLOOD_YIELD_S:
                asyncio.get_running_loop().call_soon(self._pump)
                break
            for off in offsets:
                pack(batch, off, seq)
                seq += 1
            tr.write(bytes(batch))
        self.sent = seq

    # QoS 1 window ----------------------------------------------------------------------
    def start_window(self, stop_at: float) -> None:
        self.stop_at = stop_at
        self.running = True
        self._send_qos1(self.window)

    def _send_qos1(self, k: int) -> None:
        if k <= 0 or self.transport is None or self.transport.is_closing():
            return
        batch = self._batch
        pack = _PID_SEQ.pack_into
        seq = self.sent
        for off in self._offsets[:k]:
            pack(batch, off, seq % 65535 + 1, seq)
            seq += 1
        self.transport.write(bytes(batch[: k * self.size]))
        self.sent = seq
        self.inflight += k

    def data_received(self, data: bytes) -> None:
        acks = 0
        for packet in self.reader.feed(data):
            if packet.type == PacketType.PUBACK:
                acks += 1
            else:
                self.on_packet(packet)
        if acks:
            self.acked += acks
            self.inflight -= acks
            if not self.running:
                if self.inflight <= 0 and not self.done.done():
                    self.done.set_result(None)
            elif time.monotonic() >= self.stop_at:
                self._finish()
            else:
                self._send_qos1(self.window - self.inflight)

    # fixed rate (latency) --------------------------------------------------------------
    def start_rate(self, start: float, stop_at: float, rate: float) -> None:
        self.stop_at = stop_at
        self.running = True
        self._rate_start = start
        self._interval = 1.0 / rate
        asyncio.get_running_loop().call_at(start, self._tick)

    def _tick(self) -> None:
        """Send every message that is due, then sleep until the next one is."""
        tr = self.transport
        if tr is None or tr.is_closing():
            self._finish()
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= self.stop_at:
            self._finish()
            return
        batch = self._batch
        off = self._offsets[0]
        while self._rate_start + self.sent * self._interval <= now:
            if self.qos:
                seq = self.sent
                _PID_SEQ_TS.pack_into(batch, off, seq % 65535 + 1, seq, time.monotonic_ns())
            else:
                _SEQ_TS.pack_into(batch, off, self.sent, time.monotonic_ns())
            tr.write(bytes(batch[: self.size]))
            self.sent += 1
        loop.call_at(self._rate_start + self.sent * self._interval, self._tick)

    def _finish(self) -> None:
        self.running = False
        if (self.qos == 0 or self.inflight <= 0) and not self.done.done():
            self.done.set_result(None)


# --------------------------------------------------------------------------- QUIC transport

_QUIC_HIGH_WATER = 1 << 20
_QUIC_LOW_WATER = 256 * 1024


class QuicStreamTransport:
    """The slice of ``asyncio.Transport`` that :class:`_Conn` uses, over one QUIC stream.

    Writes go into aioquic's stream buffer and are transmitted once per event-loop turn, so a
    burst of writes becomes one batch of datagrams.  Back-pressure follows the stream's unacked
    bytes; pausing reads is a no-op (QUIC data arrives as datagrams, there is no socket to
    leave unread).
    """

    def __init__(self, proto: QuicClientProtocol, stream_id: int) -> None:
        self._proto = proto
        self._sid = stream_id
        self._flush_scheduled = False
        self._closing = False
        self._paused = False

    def write(self, data: bytes) -> None:
        if self._closing:
            return
        self._proto._quic.send_stream_data(self._sid, data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        if not self._paused and self.get_write_buffer_size() > _QUIC_HIGH_WATER:
            self._paused = True
            self._proto.mqtt.pause_writing()
            asyncio.get_running_loop().call_later(0.001, self._check_resume)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._proto.transmit()

    def _check_resume(self) -> None:
        if self._closing or not self._paused:
            return
        if self.get_write_buffer_size() <= _QUIC_LOW_WATER:
            self._paused = False
            self._proto.mqtt.resume_writing()
        else:
            asyncio.get_running_loop().call_later(0.001, self._check_resume)

    def get_write_buffer_size(self) -> int:
        # aioquic has no public send-buffer size; its stream sender's offsets tell it.
        stream = self._proto._quic._streams.get(self._sid)
        if stream is None:
            return 0
        sender = stream.sender
        return int(sender._buffer_stop - sender._buffer_start)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        """Send CONNECTION_CLOSE and consider the connection closed at once.

        aioquic otherwise waits three PTOs in its closing state before ``wait_closed``
        returns, which would make connect+subscribe measure that wait, not the broker.
        """
        self._closing = True
        self._proto.close()  # a no-op once the broker closed the connection first
        self._proto._closed.set()

    def abort(self) -> None:
        self.close()


class QuicClientProtocol(QuicConnectionProtocol):
    """aioquic connection whose first bidirectional stream feeds an MQTT :class:`_Conn`."""

    mqtt: _Conn

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # As qmig's client does: its key shares (X25519, P-256), no migration strategy.
        MigratingQuicConnection.adopt(self._quic, 0)

    def attach(self, conn: _Conn) -> None:
        self.mqtt = conn
        self.stream = QuicStreamTransport(self, self._quic.get_next_available_stream_id())
        conn.transport = self.stream

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            if event.data:
                self.mqtt.data_received(event.data)
            if event.end_stream:
                self._lost(None)
        elif isinstance(event, ConnectionTerminated):
            self._lost(None)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._lost(exc)

    def transmit(self) -> None:
        transport = self._transport
        if transport is not None and transport.is_closing():
            if self._timer is not None:  # closed early (see QuicStreamTransport.close)
                self._timer.cancel()
                self._timer = None
            return
        super().transmit()

    def _lost(self, exc: Exception | None) -> None:
        mqtt = getattr(self, "mqtt", None)
        if mqtt is not None and not mqtt.closed.done():
            self.stream._closing = True
            mqtt.connection_lost(exc)


def quic_configuration(session_ticket: Any = None) -> QuicConfiguration:
    config = QuicConfiguration(
        is_client=True, alpn_protocols=["mqtt"], max_data=16 << 20, max_stream_data=8 << 20
    )
    config.verify_mode = ssl.CERT_NONE
    config.session_ticket = session_ticket
    return config


async def open_quic(
    factory: Any,
    host: str,
    port: int,
    timeout: float,
    stack: contextlib.AsyncExitStack,
    tickets: list[Any] | None = None,
) -> Any:
    """Connect over QUIC (closed with ``stack``) and hand the stream to ``factory()``.

    ``tickets``: resume the TLS session from its last ticket, and append each new one.
    """
    cm = quic_connect(
        host,
        port,
        configuration=quic_configuration(tickets[-1] if tickets else None),
        create_protocol=QuicClientProtocol,
        session_ticket_handler=tickets.append if tickets is not None else None,
    )
    proto = await asyncio.wait_for(stack.enter_async_context(cm), timeout)
    assert isinstance(proto, QuicClientProtocol)  # made by create_protocol
    conn = factory()
    proto.attach(conn)
    return conn


# --------------------------------------------------------------------------- worker side


class _Control:
    """Reads orchestrator commands from stdin without blocking the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.go: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.stop: asyncio.Future[None] = loop.create_future()
        self.sent: int | None = None
        self._buf = b""
        self._fd = sys.stdin.fileno()
        os.set_blocking(self._fd, False)
        loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            chunk = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        if not chunk:  # orchestrator went away: stop holding, never start
            asyncio.get_running_loop().remove_reader(self._fd)
            if not self.stop.done():
                self.stop.set_result(None)
            if not self.go.done():
                self.go.set_exception(ConnectionError("orchestrator went away"))
                self.go.exception()
            return
        self._buf += chunk
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            msg = json.loads(line)
            if msg.get("cmd") == "go" and not self.go.done():
                self.go.set_result(msg)
            elif msg.get("cmd") == "stop" and not self.stop.done():
                self.stop.set_result(None)
            elif msg.get("cmd") == "sent":
                self.sent = int(msg["n"])


def emit(obj: dict[str, Any]) -> None:
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


_quic_stack: contextlib.AsyncExitStack | None = None
"""Set in QUIC workers (spec ``transport: quic``): every connection then goes over QUIC."""


async def _open(factory: Any, host: str, port: int, timeout: float) -> Any:
    if _quic_stack is not None:
        return await open_quic(factory, host, port, timeout, _quic_stack)
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(loop.create_connection(factory, host, port), timeout)
    return proto


async def _role_sub(spec: dict[str, Any], ctl: _Control) -> dict[str, Any]:
    """N subscriber connections in this process; snapshot their counts at warm_end and stop."""
    loop = asyncio.get_running_loop()
    latency = spec.get("latency", False)
    interval = spec.get("read_interval_s", 0.0)
    conns: list[SubConn] = []
    for k in range(spec.get("connections", 1)):
        conn = await _open(lambda: SubConn(latency, interval), spec["host"], spec["port"], 10)
        await conn.handshake(f"{spec['client_id']}-{k}", spec["topic"], spec["qos"], 10,
                             spec.get("persistent", False))  # fmt: skip
        conns.append(conn)
    emit({"event": "ready"})
    go = await ctl.go
    for c in conns:
        c.lat_from_ns = int(go["warm_end"] * 1e9)
        c.lat_to_ns = int(go["stop"] * 1e9)
    snaps: dict[str, tuple[float, int]] = {}

    def snap(name: str) -> None:
        snaps[name] = (time.monotonic(), sum(c.received for c in conns))

    loop.call_at(go["warm_end"], snap, "warm")
    loop.call_at(go["stop"], snap, "stop")
    await asyncio.sleep(max(0.0, go["stop"] - loop.time()) + 0.01)
    # Drain what the broker still has queued: until every connection has all the messages the
    # publisher reports sent, or the broker goes quiet (real loss), or the cap.
    idle, drain_until = spec.get("drain_idle_s", 1.0), loop.time() + spec.get("drain_max_s", 5)
    last, quiet_since = -1, loop.time()
    while loop.time() < drain_until:
        if ctl.sent is not None and all(c.expected >= ctl.sent for c in conns):
            break
        total = sum(c.received for c in conns)
        if total != last:
            last, quiet_since = total, loop.time()
        elif loop.time() - quiet_since >= idle:
            break
        await asyncio.sleep(0.05)
    (t0, c0), (t1, c1) = snaps["warm"], snaps["stop"]
    lat = sorted(x for c in conns for x in c.latencies_ns)
    result = {
        "rate": (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0,
        "window_count": c1 - c0,
        "received": sum(c.received for c in conns),
        "unique": [c.received - c.duplicates for c in conns],
        "duplicates": sum(c.duplicates for c in conns),
        "gaps": sum(c.gaps for c in conns),
    }
    if latency:
        result["latency_ms"] = {
            "p50": _ns_to_ms(percentile(lat, 50)),
            "p99": _ns_to_ms(percentile(lat, 99)),
            "max": (lat[-1] / 1e6) if lat else float("nan"),
            "samples": len(lat),
        }
    for c in conns:
        await c.disconnect(0.5)
    return result


async def _role_pub(spec: dict[str, Any], ctl: _Control) -> dict[str, Any]:
    """One publisher: flood (QoS 0), windowed (QoS 1), or fixed rate (latency)."""
    loop = asyncio.get_running_loop()
    qos, mode = spec["qos"], spec["mode"]
    conn: PubConn = await _open(
        lambda: PubConn(spec["topic"], qos, spec.get("window", 100)), spec["host"], spec["port"], 10
    )
    await conn.handshake(spec["client_id"], None, 0, 10, spec.get("persistent", False))
    emit({"event": "ready"})
    go = await ctl.go
    await asyncio.sleep(max(0.0, go["start"] - loop.time()))
    if mode == "rate":
        conn.start_rate(go["start"], go["stop"], spec["rate"])
    elif qos == 0:
        conn.start_flood(go["stop"])
    else:
        conn.start_window(go["stop"])
    await asyncio.sleep(max(0.0, go["stop"] - loop.time()))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(conn.done, spec.get("drain_max_s", 5))
    result = {"sent": conn.sent, "acked": conn.acked, "inflight_left": conn.inflight}
    # Let buffered PUBLISHes reach the broker before DISCONNECT ends the session.
    while conn.transport is not None and conn.transport.get_write_buffer_size():
        if loop.time() > go["stop"] + spec.get("drain_max_s", 5):
            break
        await asyncio.sleep(0.01)
    await conn.disconnect(1.0)
    return result


async def _role_connsub(spec: dict[str, Any], ctl: _Control) -> dict[str, Any]:
    """Back-to-back CONNECT, CONNACK, SUBSCRIBE, SUBACK, DISCONNECT by ``connectors`` at once.

    One connector per process (TCP) uses blocking sockets: a handful of syscalls per step
    and no event-loop bookkeeping, so the client side stays cheaper than the broker's.
    More connectors per process (and QUIC always) run as event-loop tasks.  ``resume``
    (QUIC): each connector offers the session ticket of its previous connection.
    """
    loop = asyncio.get_running_loop()
    emit({"event": "ready"})
    go = await ctl.go
    await asyncio.sleep(max(0.0, go["start"] - loop.time()))
    prefix = spec["client_id"]
    connectors = int(spec.get("connectors", 1))
    if _quic_stack is None and connectors == 1:
        return _connsub_blocking(spec, go, prefix)
    results = await asyncio.gather(
        *(_connsub_loop(spec, go, f"{prefix}-{k}") for k in range(connectors))
    )
    window = go["stop"] - go["warm_end"]
    counted = sum(r["count"] for r in results)
    errors = [e for r in results for e in r["errors"]][:3]
    return {
        "rate": counted / window,
        "count": counted,
        "failures": sum(r["failures"] for r in results),
        "errors": errors,
        "resumed": sum(r["resumed"] for r in results),
    }


def _connsub_blocking(spec: dict[str, Any], go: dict[str, Any], prefix: str) -> dict[str, Any]:
    sub = subscribe_packet(f"bench/cs/{prefix}", 0)
    counted = failures = n = 0
    errors: list[str] = []
    addr = (spec["host"], spec["port"])
    # Blocks the loop on purpose: nothing else runs here, and every step has a timeout.
    while time.monotonic() < go["stop"]:
        n += 1
        try:
            _connect_subscribe_once(addr, connect_packet(f"{prefix}-{n}"), sub)
        except (OSError, ValueError) as exc:
            failures += 1
            if len(errors) < 3:
                errors.append(repr(exc))
            time.sleep(0.01)
            continue
        if go["warm_end"] <= time.monotonic() < go["stop"]:
            counted += 1
    window = go["stop"] - go["warm_end"]
    return {"rate": counted / window, "count": counted, "failures": failures, "errors": errors}


async def _connsub_loop(spec: dict[str, Any], go: dict[str, Any], prefix: str) -> dict[str, Any]:
    """One connector on the event loop: over QUIC a handshake per iteration (resumed from
    the previous connection's ticket with ``resume``), else a TCP connection."""
    counted = failures = n = resumed = 0
    errors: list[str] = []
    topic = f"bench/cs/{prefix}"
    tickets: list[Any] | None = [] if spec.get("resume") else None
    loop = asyncio.get_running_loop()
    while time.monotonic() < go["stop"]:
        n += 1
        try:
            async with contextlib.AsyncExitStack() as stack:
                if _quic_stack is not None:
                    conn = await open_quic(_Conn, spec["host"], spec["port"], 5.0, stack, tickets)
                else:
                    _, conn = await asyncio.wait_for(
                        loop.create_connection(_Conn, spec["host"], spec["port"]), 5.0
                    )
                await conn.handshake(f"{prefix}-{n}", topic, 0, 5.0)
                await conn.disconnect(1.0)
                conn.transport.close()
        except (OSError, ValueError, ConnectionError, TimeoutError) as exc:
            failures += 1
            if len(errors) < 3:
                errors.append(repr(exc))
            await asyncio.sleep(0.01)
            continue
        if go["warm_end"] <= time.monotonic() < go["stop"]:
            counted += 1
            if tickets is not None and len(tickets) > 1:  # offered one: was it taken?
                proto = conn.transport._proto if _quic_stack is not None else None
                resumed += bool(proto is not None and proto._quic.tls.session_resumed)
        if tickets is not None:
            del tickets[:-1]
    return {"count": counted, "failures": failures, "errors": errors, "resumed": resumed}


def _read_packet(sock: socket.socket, buf: bytearray) -> tuple[int, bytes]:
    """Next whole packet from a blocking socket: (first byte, body); leftovers stay in buf."""
    while True:
        if len(buf) >= 2:
            rl, h = (buf[1], 2) if buf[1] < 0x80 else _varint_tail(bytes(buf), 1, len(buf))
            if h and len(buf) >= h + rl:
                first, body = buf[0], bytes(buf[h : h + rl])
                del buf[: h + rl]
                return first, body
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf += chunk


def _connect_subscribe_once(addr: tuple[str, int], connect: bytes, sub: bytes) -> None:
    with socket.create_connection(addr, timeout=5.0) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray()
        sock.sendall(connect)
        first, body = _read_packet(sock, buf)
        if first != 0x20 or len(body) < 2 or body[1] != 0:
            raise ValueError(f"bad CONNACK {first:#x} {body!r}")
        sock.sendall(sub)
        first, body = _read_packet(sock, buf)
        if first != 0x90 or len(body) < 3 or body[2] >= 0x80:
            raise ValueError(f"bad SUBACK {first:#x} {body!r}")
        sock.sendall(DISCONNECT)
        # Wait for the broker to close first, so TIME_WAIT piles up on its side, not ours.
        with contextlib.suppress(OSError):
            sock.settimeout(1.0)
            while sock.recv(4096):
                pass


async def _role_hold(spec: dict[str, Any], ctl: _Control) -> dict[str, Any]:
    """Open N connections, each with one subscription of its own, and hold them until told."""
    raise_nofile(spec["clients"] + 256)
    sem = asyncio.Semaphore(_CONNECT_PARALLEL)
    conns: list[_Conn] = []
    errors: list[str] = []

    async def one(k: int) -> None:
        async with sem:
            try:
                conn = await _open(_Conn, spec["host"], spec["port"], 10)
                await conn.handshake(f"{spec['client_id']}-{k}", f"bench/rss/{k}", 0, 10)
                conns.append(conn)
            except (OSError, TimeoutError) as exc:
                if len(errors) < 3:
                    errors.append(repr(exc))

    await asyncio.gather(*(one(k) for k in range(spec["clients"])))
    emit({"event": "ready", "connected": len(conns), "errors": errors})
    await ctl.stop
    alive = sum(1 for c in conns if not c.closed.done())
    for c in conns:
        if c.transport is not None:
            c.transport.abort()
    return {"connected": len(conns), "alive_at_stop": alive, "errors": errors}


_ROLES = {"sub": _role_sub, "pub": _role_pub, "connsub": _role_connsub, "hold": _role_hold}


async def _worker(spec: dict[str, Any]) -> None:
    global _quic_stack
    loop = asyncio.get_running_loop()
    ctl = _Control(loop)
    async with contextlib.AsyncExitStack() as stack:
        if spec.get("transport") == "quic":
            _quic_stack = stack
        try:
            result = await asyncio.wait_for(_ROLES[spec["role"]](spec, ctl), spec["deadline_s"])
        except TimeoutError:
            result = {"error": f"worker deadline of {spec['deadline_s']} s reached"}
        except Exception as exc:
            result = {"error": repr(exc)}
        emit({"event": "result", **result})


def worker_main(argv: list[str]) -> int:
    """Entry point of a worker process; ``argv[0]`` is its JSON spec."""
    spec = json.loads(argv[0])
    asyncio.run(_worker(spec))
    return 0


# --------------------------------------------------------------------------- orchestrator side


class Worker:
    """A load-generator process seen from the orchestrator: spawn, talk, stop by PID."""

    def __init__(self, name: str, spec: dict[str, Any], log_dir: Path) -> None:
        self.name = name
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qmig.benchmarks.loadgen", json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
            )
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.proc.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """Wait for the next message of kind ``event``; an error result raises."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                msg = json.loads(line)
                if "error" in msg:
                    raise RuntimeError(f"{self.name}: {msg['error']}{self._log_tail()}")
                if msg.get("event") == event:
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no {event!r} within {timeout} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"{self.name} exited without {event!r}{self._log_tail()}")
                self._buf += chunk

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return f" ({lines[-1]})" if lines else ""

    def stop(self, timeout: float = 3.0) -> None:
        """Wait for a clean exit, then SIGTERM, then SIGKILL, always by this worker's PID."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(2)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
