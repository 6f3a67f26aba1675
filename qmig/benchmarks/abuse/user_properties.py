"""Probe ``user-properties``: retained PUBLISHes of ~1 MB made of empty user properties.

Each PUBLISH (MQTT 5, QoS 0, retained, under the default 1 MB Maximum Packet Size) carries
``--user-properties-count`` user properties whose key and value are both empty: 5 bytes on
the wire each, a list entry and a tuple in a naive decoder.  The attacker sends
``--user-properties-packets`` of them, each followed by a PINGREQ whose PINGRESP times how
long the broker spent on it; a broker that refuses one (DISCONNECT) is reconnected to for
the next.  Afterwards a subscriber counts how many of them the broker kept as retained.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import time
from typing import Any

from mqttproto.codec import PacketReader, encode, encode_varint
from mqttproto.errors import MQTTError
from mqttproto.packets import (
    MQTT_5,
    Connack,
    Connect,
    Disconnect,
    Pingresp,
    Publish,
    Suback,
    Subscribe,
    Subscription,
)
from qmig.benchmarks.brokers import HOST

from . import Context, PeakRss, StallMeter, rss_mb

NAME = "user-properties"
HELP = "retained ~1 MB PUBLISHes of 200,000 empty user properties: memory, stall, refusal"

PINGREQ = b"\xc0\x00"
EMPTY_USER_PROPERTY = b"\x26\x00\x00\x00\x00"  # identifier 0x26, "" and ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--user-properties-packets",
        type=int,
        default=20,
        metavar="N",
        help="PUBLISH packets sent (default 20)",
    )
    parser.add_argument("--user-properties-count", type=int, default=200_000, metavar="N",
                        help="empty user properties in each (default 200000, ~1 MB)")  # fmt: skip


def publish_packet(topic: str, count: int) -> bytes:
    """A retained QoS 0 MQTT 5 PUBLISH whose properties are ``count`` empty user properties."""
    name = topic.encode()
    props = EMPTY_USER_PROPERTY * count
    body = len(name).to_bytes(2, "big") + name + encode_varint(len(props)) + props + b"x"
    return b"\x31" + encode_varint(len(body)) + body


class _Client:
    """A blocking MQTT 5 connection that decodes what the broker sends."""

    def __init__(self, port: int, client_id: str) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=10.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = PacketReader(version=MQTT_5)
        self.pending: list[Any] = []
        self.sock.sendall(encode(Connect(client_id, MQTT_5, True, 0, None, None, None, {})))
        connack = self.next_packet(10.0)
        if not isinstance(connack, Connack) or connack.reason_code:
            raise ConnectionError(f"{client_id}: CONNECT refused: {connack!r}")

    def next_packet(self, timeout: float) -> Any:
        """The next packet, or None if the broker closed the connection or stayed silent."""
        if self.pending:
            return self.pending.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except OSError:  # TimeoutError included
                return None
            if not chunk:
                return None
            try:
                packets = self.reader.feed(chunk)
            except MQTTError:
                return None
            if packets:
                self.pending = packets[1:]
                return packets[0]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _send_one(c: _Client, packet: bytes) -> tuple[str, int | None, float]:
    """Send ``packet`` + PINGREQ; ("kept"|"refused"|"lost", reason code, seconds to answer)."""
    started = time.monotonic()
    try:
        c.sock.sendall(packet + PINGREQ)
    except OSError:
        return "lost", None, time.monotonic() - started
    while True:
        answer = c.next_packet(30.0)
        if isinstance(answer, Pingresp):
            return "kept", None, time.monotonic() - started
        if isinstance(answer, Disconnect):
            return "refused", answer.reason_code, time.monotonic() - started
        if answer is None:
            return "lost", None, time.monotonic() - started


def _count_retained(port: int, prefix: str, idle: float = 2.0) -> int:
    """How many retained messages under ``prefix/`` a new subscriber gets.

    The SUBACK may take long (a broker that encodes every replayed message within the
    SUBSCRIBE sends it with them); after it, ``idle`` seconds of silence end the count.
    """
    c = _Client(port, "abuse-up-reader")
    try:
        c.sock.sendall(encode(Subscribe(1, [Subscription(f"{prefix}/#", 0)], {})))
        found = 0
        if not isinstance(c.next_packet(60.0), Suback):
            return found
        while True:
            packet = c.next_packet(idle)
            if packet is None:
                return found
            if isinstance(packet, Publish) and packet.retain:
                found += 1
    finally:
        c.close()


def run(args: argparse.Namespace, ctx: Context) -> dict[str, Any]:
    packets: int = args.user_properties_packets
    count: int = args.user_properties_count
    b = ctx.broker()
    before = rss_mb(b)
    bystander = StallMeter(b.port)
    peak = PeakRss(b)
    outcomes: dict[str, int] = {"kept": 0, "refused": 0, "lost": 0}
    reasons: set[int] = set()
    worst = 0.0
    size = 0
    client: _Client | None = None
    try:
        for i in range(packets):
            if client is None:
                client = _Client(b.port, "abuse-user-properties")
            packet = publish_packet(f"up/{i}", count)
            size = len(packet)
            outcome, reason, seconds = _send_one(client, packet)
            outcomes[outcome] += 1
            worst = max(worst, seconds)
            if reason is not None:
                reasons.add(reason)
            if outcome != "kept":
                client.close()
                client = None
    finally:
        if client is not None:
            client.close()
        stall = bystander.stop()
        peak_mb = peak.stop()
    after = rss_mb(b)
    stored = _count_retained(b.port, "up") if b.alive() else 0
    return {
        "packets": packets,
        "packet_bytes": size,
        "user_properties_each": count,
        "kept": outcomes["kept"],
        "refused": outcomes["refused"],
        "lost_without_reason": outcomes["lost"],
        "refusal_reasons": sorted(f"{r:#04x}" for r in reasons),
        "retained_stored": stored,
        "worst_packet_ms": round(worst * 1000, 1),
        "rss_before_mb": before,
        "rss_peak_mb": peak_mb,
        "rss_after_mb": after,
        "rss_growth_mb": round(peak_mb - before, 1),
        "broker_alive": b.alive(),
        **stall,
    }
