"""Probe ``dup-filters``: one SUBSCRIBE listing ``#`` many times over many retained messages.

A raw TCP client first retains ``--dup-filters-retained`` small messages (pipelined QoS 0
PUBLISHes, then a PINGREQ whose PINGRESP proves the broker handled them all).  The attacker
then sends a single SUBSCRIBE carrying ``#`` ``--dup-filters-copies`` times and reads what
comes back until the broker falls silent (or the time budget ends), counting PUBLISH
packets and bytes.  A duplicate filter in one SUBSCRIBE is one subscription (MQTT-3.8.4-3
replaces, it never adds), so each retained message should arrive once.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import time
from typing import Any

from mqttproto.codec import encode, encode_publish
from mqttproto.packets import MQTT_3_1_1, Subscribe, Subscription
from qmig.benchmarks.brokers import RunningBroker

from . import Context, PeakRss, StallMeter, mqtt_client, rss_mb

NAME = "dup-filters"
HELP = "one SUBSCRIBE with '#' repeated over many retained messages: amplification, memory, stall"

PINGREQ = b"\xc0\x00"
IDLE_SECONDS = 2.0  # silence after which the attacker decides the replay is over


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dup-filters-retained",
        type=int,
        default=100_000,
        metavar="N",
        help="retained messages stored before the attack (default 100000)",
    )
    parser.add_argument(
        "--dup-filters-copies",
        type=int,
        default=40,
        metavar="N",
        help="times '#' is listed in the one SUBSCRIBE (default 40)",
    )
    parser.add_argument("--dup-filters-seconds", type=float, default=60.0, metavar="S",
                        help="longest the attacker reads the answer (default 60)")  # fmt: skip


def _wait_pingresp(sock: socket.socket, timeout: float) -> None:
    """Read until a PINGRESP: the broker has handled everything sent before the PINGREQ."""
    sock.settimeout(timeout)
    got = b""
    while not got.endswith(b"\xd0\x00"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed while waiting for PINGRESP")
        got = got[-1:] + chunk


def retain_messages(port: int, count: int, prefix: str = "dup") -> float:
    """Store ``count`` retained messages ``{prefix}/{i}`` through one raw TCP client."""
    started = time.monotonic()
    sock = mqtt_client(port, f"abuse-{prefix}-retainer")
    try:
        batch: list[bytes] = []
        for i in range(count):
            batch.append(encode_publish(f"{prefix}/{i}", b"v", 0, True, False, None, None, 4))
            if len(batch) == 4096:
                sock.sendall(b"".join(batch))
                batch = []
        sock.sendall(b"".join(batch) + PINGREQ)
        _wait_pingresp(sock, 120.0)
    finally:
        with contextlib.suppress(OSError):
            sock.sendall(b"\xe0\x00")
        sock.close()
    return time.monotonic() - started


def read_replay(sock: socket.socket, budget: float) -> dict[str, Any]:
    """Count the PUBLISH packets (and their bytes) arriving until silence or ``budget`` ends.

    Only fixed headers are walked, so the reader keeps up with millions of small packets.
    """
    deadline = time.monotonic() + budget
    publishes = publish_bytes = 0
    suback_at: float | None = None
    first = time.monotonic()
    last = first
    rest = b""
    closed = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        # Until the SUBACK the broker may be busy building the answer: only silence after
        # it started answering means the replay is over.
        sock.settimeout(min(IDLE_SECONDS, left) if suback_at is not None else left)
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            break  # silent for IDLE_SECONDS: the replay is over
        except OSError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        last = time.monotonic()
        data = rest + chunk if rest else chunk
        n = len(data)
        pos = 0
        while n - pos >= 2:
            kind = data[pos] >> 4
            length = 0
            shift = 0
            i = pos + 1
            while i < n:
                byte = data[i]
                i += 1
                length |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
            else:
                break  # the remaining length itself is incomplete
            stop = i + length
            if stop > n:
                break
            if kind == 3:
                publishes += 1
                publish_bytes += stop - pos
            elif kind == 9 and suback_at is None:
                suback_at = last
            pos = stop
        rest = data[pos:]
    return {
        "publishes": publishes,
        "publish_bytes": publish_bytes,
        "suback": suback_at is not None,
        "read_seconds": round(last - first, 2),
        "attacker_closed": closed,
        "budget_ran_out": time.monotonic() >= deadline,
    }


def _cpu_seconds(b: RunningBroker) -> float:
    times = b.ps.cpu_times()
    return float(times.user + times.system)


def run(args: argparse.Namespace, ctx: Context) -> dict[str, Any]:
    count: int = args.dup_filters_retained
    copies: int = args.dup_filters_copies
    b = ctx.broker()
    retain_s = retain_messages(b.port, count)
    before = rss_mb(b)
    cpu_before = _cpu_seconds(b)
    subscribe = encode(Subscribe(1, [Subscription("#", 0) for _ in range(copies)]), MQTT_3_1_1)
    attacker = mqtt_client(b.port, "abuse-dup-filters")
    bystander = StallMeter(b.port)
    peak = PeakRss(b)
    try:
        attacker.sendall(subscribe)
        got = read_replay(attacker, args.dup_filters_seconds)
    finally:
        with contextlib.suppress(OSError):
            attacker.close()
        stall = bystander.stop()
        peak_mb = peak.stop()
    return {
        "retained": count,
        "retain_seconds": round(retain_s, 2),
        "subscribe_bytes": len(subscribe),
        "filters_in_subscribe": copies,
        "publish_packets": got["publishes"],
        "publish_mb": round(got["publish_bytes"] / 1e6, 1),
        "copies_per_retained": round(got["publishes"] / count, 2) if count else None,
        "suback_received": got["suback"],
        "replay_seconds": got["read_seconds"],
        "budget_ran_out": got["budget_ran_out"],
        "broker_cpu_s": round(_cpu_seconds(b) - cpu_before, 2),
        "rss_before_mb": before,
        "rss_peak_mb": peak_mb,
        "rss_growth_mb": round(peak_mb - before, 1),
        "broker_alive": b.alive(),
        **stall,
    }
