"""``never-reads``: a client that floods PINGREQs and never reads the PINGRESPs.

Its receive window is tiny (SO_RCVBUF 4 KiB) and it never calls recv, so every PINGRESP the
broker makes waits in the broker: once the socket and the transport's buffer (1 MiB high
water) are full, in the engine, up to ``max_output_bytes`` before the broker closes it.  The
probe sends PINGREQs in 64 KiB batches for a bounded number of bytes and seconds, and says
whether and when the broker closed the connection and what it cost in memory.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

from . import PINGREQ, Context, StallMeter, mqtt_client, rss_mb

NAME = "never-reads"
HELP = "a client that floods PINGREQs and never reads: output held, RSS, when it is closed"
BATCH = PINGREQ * 32768  # 64 KiB


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument(
        "--never-reads-mb",
        type=float,
        default=64.0,
        metavar="MB",
        help="PINGREQ bytes to send at most (default 64)",
    )
    group.add_argument(
        "--never-reads-seconds",
        type=float,
        default=30.0,
        metavar="S",
        help="how long to keep sending at most (default 30)",
    )
    group.add_argument(
        "--never-reads-max-output",
        type=int,
        default=0,
        metavar="BYTES",
        help="start the broker with --max-output-bytes BYTES (0: its default)",
    )


def run(args: argparse.Namespace, ctx: Context) -> dict[str, Any]:
    cap = args.never_reads_max_output
    b = ctx.broker(extra=["--max-output-bytes", str(cap)] if cap else [])
    sock = mqtt_client(b.port, "abuse-never-reads", rcvbuf=4096)
    rss_before = peak = rss_mb(b)
    meter = StallMeter(b.port)
    limit = int(args.never_reads_mb * (1 << 20))
    sent = 0
    closed_after: float | None = None
    started = time.monotonic()
    deadline = started + args.never_reads_seconds
    sock.settimeout(0.5)
    batches = 0
    try:
        while sent < limit and time.monotonic() < deadline:
            try:
                sock.sendall(BATCH)
            except TimeoutError:  # the broker is not reading either, for now
                continue
            except OSError:  # reset: the broker closed it
                closed_after = time.monotonic() - started
                break
            sent += len(BATCH)
            batches += 1
            if batches % 8 == 0:
                peak = max(peak, rss_mb(b))
        if closed_after is None:
            # Sent everything: wait briefly for the broker to close it (a send then fails).
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                try:
                    sock.send(PINGREQ)
                except TimeoutError:
                    continue
                except OSError:
                    closed_after = time.monotonic() - started
                    break
                time.sleep(0.1)
        peak = max(peak, rss_mb(b))
    finally:
        with contextlib.suppress(OSError):
            sock.close()
        stall = meter.stop()
    time.sleep(0.5)  # the broker frees what it held once the connection is gone
    return {
        "pingreq_mb_sent": round(sent / (1 << 20), 1),
        "closed_by_broker": closed_after is not None,
        "closed_after_s": round(closed_after, 2) if closed_after is not None else None,
        "rss_before_mb": rss_before,
        "rss_peak_mb": peak,
        "rss_after_mb": rss_mb(b),
        **stall,
    }
