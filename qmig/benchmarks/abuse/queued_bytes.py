"""``queued-bytes``: big QoS 1 messages for one offline persistent session.

The broker's queue limit used to count messages only (10,000), so 10,000 messages of 100 KB
each were all kept: about a gigabyte for one session nobody reads.  A persistent MQTT 5
subscriber subscribes at QoS 1 and goes away; a raw TCP MQTT 5 publisher then sends the
messages with 64 in flight, counting what its PUBACKs say (0x00, or 0x97 Quota exceeded once
the session's byte budget is full).  The subscriber comes back and takes what was kept, for
a few seconds at most.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import time
from typing import Any

from mqttproto.codec import PacketReader, encode
from mqttproto.packets import (
    MQTT_5,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Puback,
    Publish,
    Subscribe,
    Subscription,
)
from mqttproto.properties import PropertyId
from mqttproto.reasons import ReasonCode

from . import Context, StallMeter, rss_mb

NAME = "queued-bytes"
HELP = "QoS 1 messages of 100 KB for one offline persistent session: RSS and what is dropped"
TOPIC = "abuse/queued"
CLIENT_ID = "abuse-offline"
WINDOW = 64
SECONDS = 120.0  # the publishing phase never runs longer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument(
        "--queued-bytes-count",
        type=int,
        default=10_000,
        metavar="N",
        help="messages published to the offline session (default 10000)",
    )
    group.add_argument(
        "--queued-bytes-size",
        type=int,
        default=100_000,
        metavar="BYTES",
        help="payload of each (default 100000)",
    )
    group.add_argument(
        "--queued-bytes-budget",
        type=int,
        default=0,
        metavar="BYTES",
        help="start the broker with --max-queued-bytes BYTES (0: its default)",
    )
    group.add_argument(
        "--queued-bytes-resume",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds the returning subscriber reads for at most (default 5)",
    )


class Mqtt:
    """A blocking raw MQTT 5 client: just enough for the probe."""

    def __init__(self, port: int, client_id: str, **connect: Any) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = PacketReader(MQTT_5)
        self.inbox: list[Packet] = []
        self.sock.sendall(encode(Connect(client_id, MQTT_5, keep_alive=0, **connect), MQTT_5))
        connack = self.next(10.0)
        if not isinstance(connack, Connack) or connack.reason_code:
            raise ConnectionError(f"{client_id}: no CONNACK ({connack!r})")

    def next(self, timeout: float) -> Packet | None:
        """The next packet, or None if none came within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.inbox:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                return None
            if not data:
                raise ConnectionError("closed by the broker")
            self.inbox += self.decoder.feed(data)
        return self.inbox.pop(0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(encode(Disconnect(), MQTT_5))
        self.sock.close()


def run(args: argparse.Namespace, ctx: Context) -> dict[str, Any]:
    count, size, budget = args.queued_bytes_count, args.queued_bytes_size, args.queued_bytes_budget
    b = ctx.broker(extra=["--max-queued-bytes", str(budget)] if budget else [])
    session = {"clean_start": False, "properties": {PropertyId.SESSION_EXPIRY_INTERVAL: 600}}
    sub = Mqtt(b.port, CLIENT_ID, **session)
    sub.sock.sendall(encode(Subscribe(1, [Subscription(TOPIC, 1)]), MQTT_5))
    sub.next(5.0)  # SUBACK
    sub.close()
    rss_before = peak = rss_mb(b)
    meter = StallMeter(b.port)
    pub = Mqtt(b.port, "abuse-queued-publisher")
    payload = bytes(size)
    codes: dict[int, int] = {}
    sent = inflight = 0
    started = time.monotonic()
    deadline = started + SECONDS
    while (sent < count or inflight) and time.monotonic() < deadline:
        batch = []
        while sent < count and inflight < WINDOW:
            batch.append(encode(Publish(TOPIC, payload, 1, packet_id=sent % 65535 + 1), MQTT_5))
            sent += 1
            inflight += 1
        if batch:
            pub.sock.sendall(b"".join(batch))
        ack = pub.next(10.0)
        while isinstance(ack, Puback):
            codes[ack.reason_code] = codes.get(ack.reason_code, 0) + 1
            inflight -= 1
            ack = pub.inbox.pop(0) if pub.inbox else None
        if sent % 512 < WINDOW:
            peak = max(peak, rss_mb(b))
    publish_seconds = time.monotonic() - started
    peak = max(peak, rss_mb(b))
    stall = meter.stop()
    pub.close()
    # The session comes back: how much of it was kept, delivered in a bounded time.
    back = Mqtt(b.port, CLIENT_ID, **session)
    delivered = 0
    resume_deadline = time.monotonic() + args.queued_bytes_resume
    while time.monotonic() < resume_deadline:
        msg = back.next(1.0)
        if msg is None:
            break
        if isinstance(msg, Publish):
            delivered += 1
            back.sock.sendall(encode(Puback(msg.packet_id or 0), MQTT_5))
    peak = max(peak, rss_mb(b))
    back.close()
    return {
        "messages": count,
        "payload_bytes": size,
        "published": sent,
        "publish_seconds": round(publish_seconds, 2),
        "acked_success": codes.get(ReasonCode.SUCCESS, 0),
        "acked_quota_exceeded": codes.get(ReasonCode.QUOTA_EXCEEDED, 0),
        "acked_other": sum(v for k, v in codes.items() if k not in (0, 0x97)),
        "delivered_on_resume": delivered,
        "rss_before_mb": rss_before,
        "rss_peak_mb": peak,
        **stall,
    }
