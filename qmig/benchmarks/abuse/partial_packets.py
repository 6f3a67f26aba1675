"""``partial-packets``: many connections each holding most of a PUBLISH that never completes.

Keep alive 0 turns the keep-alive timer off, so nothing used to close a connection that
sent ~1 MB of a PUBLISH and then nothing more: 300 of them held ~300 MB forever.  Each
connection here sends CONNECT (keep alive 0) and the first ``--partial-packets-bytes`` of a
PUBLISH a little longer than that, then stays silent; the probe watches, for a bounded time,
which connections the broker closes and when (seconds after that connection's last byte).
"""

from __future__ import annotations

import argparse
import contextlib
import select
import socket
import time
from typing import Any

from qmig.benchmarks.loadgen import connect_packet, raise_nofile

from . import Context, StallMeter, rss_mb

NAME = "partial-packets"
HELP = "300 keep-alive-0 connections each holding ~1 MB of an unfinished PUBLISH"
TAIL = 1000  # bytes of each PUBLISH never sent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument(
        "--partial-packets-conns",
        type=int,
        default=300,
        metavar="N",
        help="connections (default 300)",
    )
    group.add_argument(
        "--partial-packets-bytes",
        type=int,
        default=1_000_000,
        metavar="BYTES",
        help="bytes of the PUBLISH each one sends (default 1000000)",
    )
    group.add_argument(
        "--partial-packets-seconds",
        type=float,
        default=40.0,
        metavar="S",
        help="how long to watch them after the last was sent (default 40)",
    )
    group.add_argument(
        "--partial-packets-timeout",
        type=float,
        default=0.0,
        metavar="S",
        help="start the broker with --incomplete-packet-timeout S (0: default)",
    )
    group.add_argument(
        "--partial-packets-cap",
        type=int,
        default=0,
        metavar="BYTES",
        help="start the broker with --max-incomplete-bytes-total (0: default)",
    )


def publish_head(remaining: int) -> bytes:
    """The fixed header and topic of a QoS 0 PUBLISH of ``remaining`` bytes after the header."""
    length = bytearray()
    while True:
        byte, remaining = remaining & 0x7F, remaining >> 7
        length.append(byte | (0x80 if remaining else 0))
        if not remaining:
            break
    return b"\x30" + bytes(length) + b"\x00\x0bbig/partial"


def run(args: argparse.Namespace, ctx: Context) -> dict[str, Any]:
    n, size = args.partial_packets_conns, args.partial_packets_bytes
    extra: list[str] = []
    if args.partial_packets_timeout:
        extra += ["--incomplete-packet-timeout", str(args.partial_packets_timeout)]
    if args.partial_packets_cap:
        extra += ["--max-incomplete-bytes-total", str(args.partial_packets_cap)]
    raise_nofile(n + 64)
    b = ctx.broker(extra=extra)
    rss_before = peak = rss_mb(b)
    meter = StallMeter(b.port)
    head = publish_head(size + TAIL)  # a packet about TAIL bytes longer than what is sent
    body = head + bytes(size - len(head))
    socks: dict[socket.socket, float] = {}  # open connection: when its last byte went out
    closed_after: list[float] = []
    started = time.monotonic()
    try:
        for i in range(n):
            sock = socket.create_connection(("127.0.0.1", b.port), timeout=10.0)
            try:
                sock.sendall(connect_packet(f"abuse-partial-{i}", keep_alive=0))
                if sock.recv(4)[:1] != b"\x20":
                    raise ConnectionError("no CONNACK")
                sock.sendall(body)
            except OSError:  # closed while sending: by a cap over all connections
                closed_after.append(0.0)
                sock.close()
                continue
            socks[sock] = time.monotonic()
            if i % 16 == 0:
                peak = max(peak, rss_mb(b))
        sent_seconds = time.monotonic() - started
        peak = max(peak, rss_mb(b))
        deadline = time.monotonic() + args.partial_packets_seconds
        while socks and time.monotonic() < deadline:
            readable, _, _ = select.select(list(socks), [], [], 0.2)
            now = time.monotonic()
            for sock in readable:
                data = b""
                with contextlib.suppress(OSError):
                    data = sock.recv(65536)
                if not data:  # EOF or reset: the broker closed it
                    closed_after.append(now - socks.pop(sock))
                    sock.close()
            peak = max(peak, rss_mb(b))
        rss_end = rss_mb(b)
        still_open = len(socks)
    finally:
        for sock in socks:
            sock.close()
        stall = meter.stop()
    closed_after.sort()
    return {
        "connections": n,
        "bytes_each": size,
        "send_seconds": round(sent_seconds, 2),
        "rss_before_mb": rss_before,
        "rss_peak_mb": peak,
        "rss_end_mb": rss_end,
        "closed": len(closed_after),
        "closed_within_1s": sum(1 for t in closed_after if t <= 1.0),
        "closed_first_s": round(closed_after[0], 2) if closed_after else None,
        "closed_last_s": round(closed_after[-1], 2) if closed_after else None,
        "still_open_at_end": still_open,
        "watched_seconds": args.partial_packets_seconds,
        **stall,
    }
